"""core/tools.py: the built-in tools' schemas, determinism, refusals (always a result, never an exception)
and limits; core/calculator.py's input normalisations."""

from __future__ import annotations

import json
import threading
import time

import pytest

from core import tools
from core.calculator import evaluate, normalize
from core.chat_schema import API_SHAPES, parse_tools


def test_builtin_set_and_schemas_are_valid_openai_tools():
    assert tools.tool_names("builtin") == list(tools.BUILTIN)
    assert tools.tool_names("calculator,builtin,calculator") == ["calculator", *tools.BUILTIN]
    schema = tools.tools_schema(tools.BUILTIN)
    assert parse_tools(schema, "tools", API_SHAPES) == schema  # the shared validator accepts them as sent
    calc = tools.get_tool("calculate_math").schema["function"]
    assert calc["parameters"]["required"] == ["expression"] and "expression" in calc["parameters"]["properties"]
    with pytest.raises(tools.UnknownToolError, match=r"unknown tool\(s\) shell, rm; built in: calculator"):
        tools.tool_names("shell,calculate_math,rm")


@pytest.mark.parametrize(("expression", "result"), [
    ("128*46", "5888"), ("128 × 46", "5888"), ("1000 ÷ 8", "125"), ("2^10", "1024"), ("（3＋4）×2", "14"),
    ("19² − 61", "300"), ("2³", "8"), ("sqrt(144)", "12"), ("math.sqrt(2.25)", "1.5"), ("１２＊３=", "36"),
    ("(125 + 375) / 4", "125"), ("7/2", "3.5"),
])
def test_calculate_math_answers_like_minimind(expression, result):
    assert tools.execute("calculate_math", json.dumps({"expression": expression})) == {"result": result}
    assert tools.run_call("calculate_math", {"expression": expression}) == json.dumps({"result": result})


def test_normalize_rewrites_notation_only():
    assert normalize("（1＋2）×3÷4^2") == "(1+2)*3/4**2"
    assert normalize("x²") == "x**2" and evaluate("1e3") == 1000.0


@pytest.mark.parametrize(("name", "arguments", "message"), [
    ("calculate_math", {"expression": "1e999"}, "too large"),
    ("calculate_math", {"expression": "2**99999"}, "exponent 99999 is larger than 1000"),
    ("calculate_math", {"expression": "1/0"}, "division by zero"),
    ("calculate_math", {"expression": "10.0**400"}, "too large"),  # a non-finite float result
    ("calculate_math", {"expression": "sqrt(-1)"}, "not a real number"),
    ("calculate_math", {"expression": "__import__('os')"}, "not Call"),
    ("calculate_math", {"expression": "1+" * 150 + "1"}, "longer than 200 characters"),
    ("calculate_math", {}, "need a non-empty 'expression'"),
    ("calculate_math", "[1]", "not a JSON object"),
    ("calculate_math", "{" * 100000, "longer than 4096 characters"),
    ("calculate_math", '{"expression": "' + "1" * 5000 + '"}', "longer than 4096 characters"),
    ("shell", {"cmd": "ls"}, "unknown tool(s) shell"),
    ("get_current_time", {"timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
    ("get_current_weather", {}, "need a non-empty 'location'"),
    ("random_number", {"min": 5, "max": 1}, "'min' 5 is greater than 'max' 1"),
    ("random_number", {"min": 0, "max": 10 ** 15}, "wider than"),
    ("random_number", {"min": "a"}, "must be an integer"),
])
def test_refusals_are_results_not_exceptions(name, arguments, message):
    result = tools.execute(name, arguments)
    assert list(result) == ["error"] and message in result["error"] and "\n" not in result["error"]


def test_mocks_are_deterministic_and_depend_only_on_their_arguments():
    assert tools.execute("get_current_time", {}) == {"datetime": "2025-03-07 14:30:00", "timezone": "Asia/Shanghai"}
    assert tools.execute("get_current_time", {"timezone": "America/New_York"})["datetime"] == "2025-03-07 01:30:00"
    beijing = tools.execute("get_current_weather", {"location": "北京"})
    assert beijing == tools.execute("get_current_weather", {"location": "北京"})
    assert set(beijing) == {"city", "temperature", "humidity", "condition"} and beijing["city"] == "北京"
    cities = [tools.execute("get_current_weather", {"location": c})["temperature"] for c in ("上海", "Tokyo", "Paris",
                                                                                           "Berlin", "Rome")]
    assert len(set(cities)) > 1  # seeded by the city: different cities, different weather
    draw = tools.execute("random_number", {"min": 1, "max": 1000})["result"]
    assert 1 <= draw <= 1000 and all(tools.execute("random_number", {"min": 1, "max": 1000})["result"] == draw
                                     for _ in range(3))


def test_calculator_alias_keeps_its_schema_and_bare_answer():
    assert tools.get_tool("calculator").schema["function"]["name"] == "calculator"
    assert tools.run_call("calculator", '{"expression": "2+3"}') == "5"
    assert tools.run_call("calculator", '{"expression": "1/0"}') == "error: division by zero"


def test_time_limit_and_result_size(monkeypatch):
    release = threading.Event()

    def slow(arguments: dict) -> dict:
        release.wait(5)
        return {"result": "late"}

    monkeypatch.setitem(tools.TOOLS, "slow", tools.Tool(tools._function("slow", "", {}, []), slow))
    monkeypatch.setitem(tools.TOOLS, "big", tools.Tool(tools._function("big", "", {}, []),
                                                       lambda a: {"result": "x" * 5000}))
    monkeypatch.setitem(tools.TOOLS, "buggy", tools.Tool(tools._function("buggy", "", {}, []), lambda a: 1 / 0))
    started = time.perf_counter()
    assert tools.execute("slow", {}, time_limit=0.2) == {"error": "slow took longer than 0.2 s"}
    assert time.perf_counter() - started < 3
    release.set()
    assert tools.execute("big", {}) == {"error": "the result of big is longer than 2048 characters"}
    assert tools.execute("buggy", {}) == {"error": "buggy failed: ZeroDivisionError"}
