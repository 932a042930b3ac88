"""A safe arithmetic calculator: the evaluator behind the built-in tools ``calculate_math`` and ``calculator``
(``core/tools.py``).

:func:`evaluate` first rewrites the notations people and models write (:func:`normalize`: ``×`` ``÷`` ``^``
``−`` ``²`` ``³``, full-width characters such as ``（）＋`` by NFKC, a trailing ``=`` or ``?``), then parses
the expression with ``ast.parse(mode="eval")`` and walks the tree itself; only number literals (int,
float), parentheses, unary ``+ -``, binary ``+ - * / // % **`` and ``sqrt(x)`` (also ``math.sqrt(x)``) are
accepted, every other node (names, other calls, attributes, subscripts, comparisons, strings, ...) is
refused. Nothing is ever passed to ``eval``/``exec``. Limits keep every step cheap: the expression is at
most ``MAX_CHARS`` characters, integers stay under ``MAX_BITS`` bits (checked *before* a ``*`` or ``**`` is computed:
a product's size is bounded by the sum of its factors' sizes, a power's by base bits x
exponent), exponents are at most ``MAX_EXPONENT`` in magnitude, and float overflow (of a result or of a
literal such as ``1e999``), division by zero and non-finite results are errors. Every refusal is a
:class:`CalculatorError` with one line.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import unicodedata
from collections.abc import Callable

from core.errors import TinyLMError

MAX_CHARS = 200
MAX_BITS = 4096
MAX_EXPONENT = 1000

Number = int | float

_BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}

# the calculator as an OpenAI / template tool definition
TOOL = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses) and return the number.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                   "description": "e.g. (2 + 3) * 4"}},
                   "required": ["expression"]}}}


class CalculatorError(TinyLMError):
    pass


# applied before NFKC (which would turn ² into a plain 2), then NFKC, then _AFTER_NFKC
_BEFORE_NFKC = (("²", "**2"), ("³", "**3"))
_AFTER_NFKC = (("×", "*"), ("✕", "*"), ("·", "*"), ("÷", "/"), ("^", "**"), ("−", "-"), ("–", "-"), ("—", "-"))


def normalize(expression: str) -> str:
    """``expression`` in Python's arithmetic notation: MiniMind's replacements (``^`` -> ``**``, ``×`` -> ``*``,
    ``÷`` -> ``/``, ``−`` -> ``-``, ``²`` -> ``**2``, ``³`` -> ``**3``, full-width parentheses), full-width
    digits and operators by NFKC, and a trailing ``=`` / ``?`` dropped ("12*3=")."""
    for old, new in _BEFORE_NFKC:
        expression = expression.replace(old, new)
    expression = unicodedata.normalize("NFKC", expression)
    for old, new in _AFTER_NFKC:
        expression = expression.replace(old, new)
    return expression.strip().rstrip("=?").strip()


def _is_sqrt(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id == "sqrt") or (
        isinstance(func, ast.Attribute) and func.attr == "sqrt" and isinstance(func.value, ast.Name)
        and func.value.id == "math")


def _sqrt(x: Number) -> float:
    if x < 0:
        raise CalculatorError("the result is not a real number")
    try:
        return math.sqrt(x)
    except OverflowError:
        raise CalculatorError("the result is too large") from None


def _bits(x: Number) -> int:
    return x.bit_length() if isinstance(x, int) else 0


def _check_size(op: type, a: Number, b: Number) -> None:
    """Refuse an integer operation whose result could exceed MAX_BITS, before computing it."""
    if op is ast.Pow:
        if abs(b) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {b} is larger than {MAX_EXPONENT} in magnitude")
        if isinstance(a, int) and isinstance(b, int) and b > 0 and _bits(a) * b > MAX_BITS:
            raise CalculatorError(f"the result would have more than {MAX_BITS} bits")
    elif op is ast.Mult and _bits(a) + _bits(b) > MAX_BITS:
        raise CalculatorError(f"the result would have more than {MAX_BITS} bits")


def _apply(op: type, a: Number, b: Number) -> Number:
    _check_size(op, a, b)
    try:
        value = _BINARY[op](a, b)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    if isinstance(value, complex):  # e.g. (-8) ** 0.5
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large")
    if _bits(value) > MAX_BITS:
        raise CalculatorError(f"the result has more than {MAX_BITS} bits")
    return value


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):  # a literal such as 1e999
            raise CalculatorError("a number in the expression is too large")
        if _bits(node.value) > MAX_BITS:
            raise CalculatorError(f"a number in the expression has more than {MAX_BITS} bits")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _apply(type(node.op), _eval(node.left), _eval(node.right))
    if isinstance(node, ast.Call) and _is_sqrt(node.func) and len(node.args) == 1 and not node.keywords:
        return _sqrt(_eval(node.args[0]))
    raise CalculatorError(f"only numbers, + - * / // % **, sqrt() and parentheses are allowed, "
                          f"not {type(node).__name__}")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic ``expression`` after :func:`normalize` (CalculatorError with one line when
    refused)."""
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(normalize(expression), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    return _eval(tree.body)


def format_number(value: Number) -> str:
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def run(arguments: str) -> str:
    """The tool's answer to a call's JSON ``arguments``: the value, or ``error: ...`` (what the model reads)."""
    try:
        expression = json.loads(arguments).get("expression")
        if not isinstance(expression, str):
            raise CalculatorError("the arguments need an 'expression' string")
        return format_number(evaluate(expression))
    except CalculatorError as e:
        return f"error: {e}"
    except (ValueError, AttributeError, RecursionError):
        return "error: the arguments are not a JSON object"
