"""core/calculator.py: the safe arithmetic evaluator (an AST walk, never eval) and its limits."""

from __future__ import annotations

import pytest

from core.calculator import MAX_BITS, CalculatorError, evaluate, format_number, run


@pytest.mark.parametrize(("expression", "value"), [
    ("2+3", 5), ("(2 + 3) * 4", 20), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1),
    ("2 ** 10", 1024), ("2 ** -1", 0.5), ("-3 ** 2", -9), ("+4 - -1", 5), ("1.5e3 * 2", 3000.0), ("2**3**2", 512),
])
def test_arithmetic_matches_python(expression, value):
    assert evaluate(expression) == value and type(evaluate(expression)) is type(value)


@pytest.mark.parametrize(("expression", "message"), [
    ("__import__('os').system('echo hi')", "not Call"),
    ("x + 1", "not Name"),
    ("(1).real", "not Attribute"),
    ("'a' * 3", "not Constant"),
    ("1 < 2", "not Compare"),
    ("True + 1", "not Constant"),
    ("1j * 2", "not Constant"),
    ("[1][0]", "not Subscript"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("9 ** 9 ** 9", "exponent 387420489 is larger than 1000"),
    ("(2 ** 1000) ** 5", f"more than {MAX_BITS} bits"),
    ("10.0 ** 400", "too large"),
    ("1e308 * 10", "too large"),
    ("1e999", "too large"),  # a literal that is already infinite: non-finite values are errors
    ("-1e999 + 1", "too large"),
    ("0 * 1e999", "too large"),
    ("(-8) ** 0.5", "not a real number"),
    ("2 +", "not an arithmetic expression"),
    ("1" + "+1" * 150, "longer than 200 characters"),
])
def test_everything_else_is_refused_in_one_line(expression, message):
    with pytest.raises(CalculatorError) as e:
        evaluate(expression)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_product_size_is_checked_before_computing():
    big = "(" + "*".join(["(2**1000)"] * 5) + ")"
    with pytest.raises(CalculatorError, match="bits"):
        evaluate(big)


def test_run_answers_the_model():
    assert run('{"expression": "(2 + 3) * 4"}') == "20"
    assert run('{"expression": "1/3"}') == format_number(1 / 3) == "0.333333333333"
    assert run('{"expression": "1/0"}') == "error: division by zero"
    assert run('{"expr": "1"}') == "error: the arguments need an 'expression' string"
    assert run("[1]") == "error: the arguments are not a JSON object"
    assert run("[" * 100000) == "error: the arguments are not a JSON object"  # too deep: an answer, not a crash
    assert run('{"expression": "1e999"}') == "error: a number in the expression is too large"
