"""The built-in tools a model may call: their OpenAI function schemas and deterministic, bounded executors.

Contract: :data:`TOOLS` maps a function name to a :class:`Tool` (its OpenAI ``{"type": "function",
"function": {...}}`` schema and an executor from the call's arguments object to a JSON-able result).
:func:`execute` runs one call and never raises: an unknown name, arguments that are not a JSON object (or
longer than :data:`MAX_ARGUMENT_CHARS`), a refused input, an executor that runs past :data:`TIME_LIMIT_S`
or a result longer than :data:`MAX_RESULT_CHARS` all come back as ``{"error": "..."}``, a result the model
reads like any other. :func:`result_text` is the text of the tool turn. Every executor is a pure function
of its arguments (a fixed clock, randomness seeded from the arguments), so a rollout that is replayed, e.g.
when an RL run resumes, sees the same results.

The set :data:`BUILTIN` (``--tools builtin`` in bin/chat, bin/eval and training): ``calculate_math``
(MiniMind-3's schema and ``{"result": "..."}`` answer; the safe evaluator of ``core/calculator.py``, never
``eval``, non-finite results refused) and three harmless mocks that serve as distractors:
``get_current_time`` (the fixed instant :data:`FIXED_UTC` in a fixed-offset zone), ``get_current_weather``
(weather drawn from a generator seeded by the city's name) and ``random_number`` (drawn from a generator
seeded by the range). ``calculator`` (bin/chat's ``--tools calculator``) is the same evaluator under its
own schema; its tool turn is the bare number (or ``error: ...``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from core import calculator
from core.errors import TinyLMError

TIME_LIMIT_S = 2.0  # an executor still running after this is abandoned and the call answered with an error
MAX_ARGUMENT_CHARS = 4096
MAX_RESULT_CHARS = 2048  # MiniMind's agent RL cuts a tool result at 2048 characters
FIXED_UTC = datetime.datetime(2025, 3, 7, 6, 30, tzinfo=datetime.timezone.utc)  # 14:30 in Asia/Shanghai
DEFAULT_TIMEZONE = "Asia/Shanghai"
# fixed offsets (hours; a mock has no daylight saving time)
TIMEZONES = {"UTC": 0, "Asia/Shanghai": 8, "Asia/Tokyo": 9, "Asia/Kolkata": 5.5, "Asia/Singapore": 8,
             "Europe/London": 0, "Europe/Paris": 1, "Europe/Berlin": 1, "Europe/Moscow": 3,
             "America/New_York": -5, "America/Chicago": -6, "America/Los_Angeles": -8, "Australia/Sydney": 11}
CONDITIONS = ("晴", "多云", "阴", "小雨", "大雨", "雪")
MAX_RANDOM_SPAN = 10 ** 12
BUILTIN_SET = "builtin"


class ToolInputError(TinyLMError):
    """Arguments a tool refuses; its message is the ``error`` of the call's result."""


@dataclass(frozen=True)
class Tool:
    """One callable function: ``schema`` (OpenAI's shape), ``run`` (arguments object -> result object) and
    ``text`` (result object -> the tool turn's text)."""

    schema: dict
    run: Callable[[dict], dict]
    text: Callable[[dict], str] = lambda result: json.dumps(result, ensure_ascii=False)

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


def _string(arguments: dict, key: str, default: str | None = None, limit: int = 256) -> str:
    value = arguments.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ToolInputError(f"the arguments need a non-empty {key!r} string")
    if len(value) > limit:
        raise ToolInputError(f"{key!r} is longer than {limit} characters")
    return value.strip()


def _integer(arguments: dict, key: str, default: int) -> int:
    value = arguments.get(key, default)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) <= 20:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToolInputError(f"{key!r} must be an integer")
    return value


def _seeded(*parts: object) -> random.Random:
    """A generator seeded by ``parts`` only (never by the process: the same call gives the same draw)."""
    digest = hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---- the executors -------------------------------------------------------------------------------------

def calculate_math(arguments: dict) -> dict:
    """``{"result": "<number>"}`` of the ``expression`` (core/calculator.py: normalised, AST-walked, bounded)."""
    expression = _string(arguments, "expression", limit=calculator.MAX_CHARS)
    try:
        return {"result": calculator.format_number(calculator.evaluate(expression))}
    except calculator.CalculatorError as e:
        raise ToolInputError(str(e)) from None


def calculator_text(result: dict) -> str:
    """The ``calculator`` tool's turn: the bare number, or ``error: ...``."""
    return f"error: {result['error']}" if "error" in result else result["result"]


def get_current_time(arguments: dict) -> dict:
    """The fixed instant :data:`FIXED_UTC` in the asked zone (default Asia/Shanghai, MiniMind's)."""
    zone = _string(arguments, "timezone", DEFAULT_TIMEZONE, limit=64)
    if zone not in TIMEZONES:
        raise ToolInputError(f"unknown timezone {zone!r}; known: {', '.join(TIMEZONES)}")
    local = FIXED_UTC + datetime.timedelta(hours=TIMEZONES[zone])
    return {"datetime": local.strftime("%Y-%m-%d %H:%M:%S"), "timezone": zone}


def get_current_weather(arguments: dict) -> dict:
    """Mock weather of ``location``, drawn from a generator seeded by the city's name (and nothing else)."""
    city = _string(arguments, "location", limit=64)
    unit = arguments.get("unit", "celsius")
    if unit not in ("celsius", "fahrenheit"):
        raise ToolInputError("'unit' is celsius or fahrenheit")
    rng = _seeded("weather", city)
    celsius = rng.randint(-5, 35)
    temperature = f"{celsius}°C" if unit == "celsius" else f"{round(celsius * 9 / 5 + 32)}°F"
    return {"city": city, "temperature": temperature, "humidity": f"{rng.randint(20, 95)}%",
            "condition": rng.choice(CONDITIONS)}


def random_number(arguments: dict) -> dict:
    """A number in [min, max] drawn from a generator seeded by the range (the same range, the same number)."""
    low, high = _integer(arguments, "min", 0), _integer(arguments, "max", 100)
    if low > high:
        raise ToolInputError(f"'min' {low} is greater than 'max' {high}")
    if high - low > MAX_RANDOM_SPAN:
        raise ToolInputError(f"the range is wider than {MAX_RANDOM_SPAN}")
    return {"result": _seeded("random_number", low, high).randint(low, high)}


# ---- the registry --------------------------------------------------------------------------------------

_EXPRESSION = {"expression": {"type": "string", "description": "数学表达式，如123+456、2**10、sqrt(144)"}}
TOOLS: dict[str, Tool] = {tool.name: tool for tool in (
    Tool(calculator.TOOL, calculate_math, calculator_text),
    Tool(_function("calculate_math", "计算数学表达式的结果，支持加减乘除、幂运算、开方等", _EXPRESSION, ["expression"]),
         calculate_math),
    Tool(_function("get_current_time", "获取当前日期和时间，支持指定时区",
                   {"timezone": {"type": "string", "description": "时区名称，如Asia/Shanghai、America/New_York",
                                 "default": DEFAULT_TIMEZONE}}, []), get_current_time),
    Tool(_function("get_current_weather", "获取指定城市的当前天气信息，包括温度、湿度和天气状况",
                   {"location": {"type": "string", "description": "城市名称，如北京、上海、New York"},
                    "unit": {"type": "string", "description": "温度单位，celsius或fahrenheit",
                             "enum": ["celsius", "fahrenheit"], "default": "celsius"}}, ["location"]),
         get_current_weather),
    Tool(_function("random_number", "生成指定范围内的随机数",
                   {"min": {"type": "integer", "description": "最小值", "default": 0},
                    "max": {"type": "integer", "description": "最大值", "default": 100}}, []), random_number),
)}
BUILTIN = ("calculate_math", "get_current_time", "get_current_weather", "random_number")
SETS = {BUILTIN_SET: BUILTIN}


class UnknownToolError(TinyLMError):
    pass


def _unknown(names: Iterable[str]) -> UnknownToolError:
    return UnknownToolError(f"unknown tool(s) {', '.join(names)}; built in: {', '.join(TOOLS)} "
                            f"(the set {BUILTIN_SET}: {', '.join(BUILTIN)})")


def get_tool(name: str) -> Tool:
    """The tool called ``name``; UnknownToolError (one line listing the known names) otherwise."""
    tool = TOOLS.get(name)
    if tool is None:
        raise _unknown([name])
    return tool


def tool_names(spec: str | Iterable[str]) -> list[str]:
    """The tool names a ``--tools`` value stands for: comma-separated names and sets (``builtin``), in order,
    each once; UnknownToolError naming every item that is neither."""
    items = [i.strip() for i in (spec.split(",") if isinstance(spec, str) else spec)]
    unknown = [i for i in items if i and i not in TOOLS and i not in SETS]
    if unknown:
        raise _unknown(unknown)
    names: list[str] = []
    for item in items:
        for name in SETS.get(item, (item,) if item else ()):
            if name not in names:
                names.append(name)
    return names


def tools_schema(names: Iterable[str]) -> list[dict]:
    """The OpenAI ``tools`` list of a request offering ``names``."""
    return [get_tool(name).schema for name in names]


def _arguments(arguments: str | dict) -> dict:
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if len(arguments) > MAX_ARGUMENT_CHARS:
        raise ToolInputError(f"the arguments are longer than {MAX_ARGUMENT_CHARS} characters")
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise ToolInputError("the arguments are not a JSON object")
    return value


def execute(name: str, arguments: str | dict, time_limit: float = TIME_LIMIT_S) -> dict[str, Any]:
    """The result object of one call (``arguments``: the JSON text of an object, or the object); never
    raises: every failure is ``{"error": "..."}``. The executor runs in a daemon thread that is abandoned
    when it outlives ``time_limit``; the result's JSON must fit :data:`MAX_RESULT_CHARS`."""
    try:
        tool = get_tool(name)
        args = _arguments(arguments)
    except TinyLMError as e:
        return {"error": str(e)}
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = tool.run(args)
        except ToolInputError as e:
            box["result"] = {"error": str(e)}
        except Exception as e:  # a tool's bug is the call's error, never the caller's crash
            box["result"] = {"error": f"{name} failed: {type(e).__name__}"}

    worker = threading.Thread(target=work, name=f"tool-{name}", daemon=True)
    worker.start()
    worker.join(time_limit)
    if "result" not in box:
        return {"error": f"{name} took longer than {time_limit:g} s"}
    result = box["result"]
    if len(json.dumps(result, ensure_ascii=False)) > MAX_RESULT_CHARS:
        return {"error": f"the result of {name} is longer than {MAX_RESULT_CHARS} characters"}
    return result


def result_text(name: str, result: dict) -> str:
    """The tool turn's text for ``result`` (JSON, as MiniMind's mocks answer; ``calculator``: the number)."""
    tool = TOOLS.get(name)
    return tool.text(result) if tool is not None else json.dumps(result, ensure_ascii=False)


def run_call(name: str, arguments: str | dict) -> str:
    """The tool turn's text of one call: :func:`execute` then :func:`result_text`."""
    return result_text(name, execute(name, arguments))
