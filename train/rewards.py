"""Reward functions for the RL stage, in TRL's convention, and the built-ins.

Convention (TRL ``GRPOTrainer``): ``f(prompts, completions, **columns) -> list[float]`` where ``prompts``
is a list of message lists (the turns shown to the model), ``completions`` a list of message lists
(``[{"role": "assistant", "content": text}]``, the raw assistant text with its ``<think>`` / ``<answer>``
tags) and every other dataset column is a keyword list with one value per completion (a prompt's
columns repeated for each of its samples). A value ``None`` means "does not apply" (TRL: NaN): it adds
nothing to the total and is left out of that function's mean.

A SPEC is ``NAME[@WEIGHT]``: a built-in name (:data:`BUILTINS`), ``module:function`` (a dotted importable
module) or ``path/to/file.py:function``; several specs are summed with their weights (default 1).
Every problem (an unknown name, a missing module or function, a function that raises or returns the
wrong number of values or something that is not a finite number) is a :class:`RewardError`: one line
naming the function.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import ground_truth
from core.calculator import CalculatorError, evaluate
from core.chat_template import tools_of
from core.completion import TOOL_CALL, parse_completion
from core.errors import TinyLMError
from core.tokenizer import TokenizerInfo, load_tokenizer
from preprocess.sources import split_number_suffix

RewardFn = Callable[..., Sequence[float | None]]
FLOAT32_MAX = 3.4028234663852886e38


class RewardError(TinyLMError):
    """A reward spec that cannot be loaded, or a reward function that misbehaves: one line naming it."""


# ---- built-ins -------------------------------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
HASHES = re.compile(r"####\s*(.+)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
FORMAT = re.compile(r"\s*<think>(?:(?!<think>|</think>|<answer>|</answer>).)*</think>\s*"
                    r"<answer>(?:(?!<think>|</think>|<answer>|</answer>).)*</answer>\s*", re.DOTALL)
LENGTH_RANGE = (1, 1024)  # characters of a completion the ``length`` reward does not penalise


def _text(completion: Any) -> str:
    """The assistant text of a completion (a message list, as TRL passes it, or a plain string)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def final_number(text: str | None) -> float | None:
    """The number a text answers: the last number inside ``<answer>…</answer>``, else after ``####``
    (GSM8K's own format); None when there is none. Thousands separators are ignored."""
    if not text:
        return None
    found = ANSWER_TAG.findall(text) or HASHES.findall(text)
    if not found:
        return None
    numbers = NUMBER.findall(found[-1])
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k(prompts: list, completions: list, reference: list | None = None, answer: list | None = None,
          **_: Any) -> list[float]:
    """1.0 when the completion's number (:func:`final_number`) equals the reference's, else 0.0. The
    reference is the ``reference`` column (a dropped final assistant turn), else GSM8K's ``answer``."""
    refs = reference if reference is not None else answer
    if refs is None:
        raise RewardError("needs a 'reference' column (a final assistant turn in each prompt record) or an "
                          "'answer' column")
    out = []
    for completion, ref in zip(completions, refs, strict=True):
        want, got = final_number(ref if isinstance(ref, str) else None), final_number(_text(completion))
        out.append(1.0 if want is not None and got is not None and math.isclose(want, got, abs_tol=1e-9) else 0.0)
    return out


def format_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """1.0 for exactly one well-formed ``<think>…</think><answer>…</answer>`` (whitespace around and between
    allowed, no tag inside another), else 0.0."""
    return [1.0 if FORMAT.fullmatch(_text(c)) else 0.0 for c in completions]


def length(prompts: list, completions: list, **_: Any) -> list[float]:
    """0 inside :data:`LENGTH_RANGE` characters; outside, minus the relative distance to the range, at most
    -1: ``-min(1, (lo - n) / lo)`` below, ``-min(1, (n - hi) / hi)`` above."""
    lo, hi = LENGTH_RANGE
    out = []
    for c in completions:
        n = len(_text(c))
        out.append(-min(1.0, (lo - n) / lo) if n < lo else -min(1.0, (n - hi) / hi) if n > hi else 0.0)
    return out


def _final_answer(completion: Any) -> str:
    """The final answer of a trajectory: the last message's content when it is an assistant turn without
    calls (a plain string is its own answer); "" when the rollout ended calling or cut (unfinished)."""
    if isinstance(completion, str):
        return completion
    last = completion[-1] if completion else None
    if not isinstance(last, dict) or last.get("role") != "assistant" or last.get("tool_calls"):
        return ""
    content = last.get("content")
    return content if isinstance(content, str) else ""


def tool_answer(prompts: list, completions: list, gt: list | None = None, **_: Any) -> list[float | None]:
    """1.0 when every value of the ``gt`` column (a string / number or a list of them, MiniMind's
    ``agent_rl`` records) is in the final answer (``core.ground_truth``: MiniMind's ``validate_gt_in_text``, as
    ``bin/eval --tool-eval`` scores), else 0.0; a row whose gt is None does not apply."""
    if gt is None:
        raise RewardError("needs a 'gt' column (the ground truth of each prompt record)")
    out: list[float | None] = []
    for i, (completion, value) in enumerate(zip(completions, gt, strict=True)):
        if value is None:
            out.append(None)
            continue
        try:
            wanted = ground_truth.values(value)
        except ground_truth.GroundTruthError as e:
            raise RewardError(f"the gt of completion {i}: {e}") from None
        out.append(1.0 if ground_truth.found(_final_answer(completion), wanted) == set(wanted) else 0.0)
    return out


def tool_format(prompts: list, completions: list, **_: Any) -> list[float | None]:
    """The fraction of call attempts that are well-formed calls to offered tools (parsed into
    ``tool_calls``; a ``<tool_call>`` block left in the content is malformed); a trajectory without any
    attempt (or a plain string) does not apply."""
    out: list[float | None] = []
    for completion in completions:
        attempts = calls = 0
        for m in completion if isinstance(completion, list) else ():
            if isinstance(m, dict) and m.get("role") == "assistant":
                calls += len(m.get("tool_calls") or ())
                attempts += len(m.get("tool_calls") or ()) + str(m.get("content") or "").count("<tool_call>")
        out.append(calls / attempts if attempts else None)
    return out


CALL_BONUS = 0.1  # a well-formed calculator call, whatever its value
CALCULATOR_TOOLS = ("calculate_math", "calculator")


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> TokenizerInfo:
    return load_tokenizer(path)


def _offered(prompt: Any) -> list[str]:
    """The names of the functions a prompt offers (its turns' ``tools``, OpenAI's wrapped or flat shape)."""
    listed = tools_of(prompt) if isinstance(prompt, list) else None
    return [(t.get("function") or t).get("name", "") for t in listed or () if isinstance(t, dict)]


def calculator_call(prompts: list, completions: list, gt: list | None = None, completion_ids: list | None = None,
                    tokenizer: list | None = None, **_: Any) -> list[float | None]:
    """The calculator recipe's verifiable reward, from the generated ids (``completion_ids``, TRL's name; the
    ``tokenizer`` column: its tokenizer.json) read by ``core.completion.parse_completion`` with the prompt's
    offered tools: 1.0 when the first call is to ``calculate_math`` (or ``calculator``) and its
    ``expression`` evaluates (``core/calculator.py``) to the ground truth ``gt`` (its first value, a
    number), plus :data:`CALL_BONUS` for any well-formed call; 0.0 without a call; None (does not apply)
    without a numeric gt or without ids."""
    out: list[float | None] = []
    for i, prompt in enumerate(prompts):
        truth = gt[i] if gt is not None else None
        truth = truth[0] if isinstance(truth, list) and truth else truth
        try:
            want = float(str(truth).replace(",", ""))
        except ValueError:
            want = math.nan
        if not math.isfinite(want) or completion_ids is None or tokenizer is None:
            out.append(None)
            continue
        events = parse_completion(_tokenizer(tokenizer[i]), completion_ids[i], tools=_offered(prompt))
        calls = [e.call for e in events if e.kind == TOOL_CALL]
        if not calls:
            out.append(0.0)
            continue
        value = CALL_BONUS
        try:
            expression = json.loads(calls[0].arguments).get("expression")
        except (ValueError, AttributeError):
            expression = None
        if calls[0].name in CALCULATOR_TOOLS and isinstance(expression, str):
            try:
                got = evaluate(expression)
            except CalculatorError:
                got = math.nan
            value += 1.0 if math.isclose(got, want, rel_tol=0, abs_tol=1e-6) else 0.0
        out.append(value)
    return out


BUILTINS: dict[str, RewardFn] = {"gsm8k": gsm8k, "format": format_reward, "length": length,
                                 "tool_answer": tool_answer, "tool_format": tool_format,
                                 "calculator_call": calculator_call}


# ---- specs -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reward:
    """One loaded reward: its log name (``reward/<name>``), the function, its weight and the spec given."""

    name: str
    fn: RewardFn
    weight: float
    spec: str


def split_weight(spec: str) -> tuple[str, float]:
    """``"gsm8k@0.5"`` -> ("gsm8k", 0.5); no ``@NUMBER`` suffix -> weight 1."""
    head, weight = split_number_suffix(spec, "@")
    if weight is None:
        return spec, 1.0
    if not math.isfinite(weight):
        raise RewardError(f"--reward {spec}: the weight must be a finite number, got {spec[len(head) + 1:]!r}")
    return head, weight


def load_function(target: str, flag: str = "--reward") -> RewardFn:
    """A built-in, ``module:function`` or ``file.py:function``, loaded; RewardError names ``flag`` and what is
    missing (``--tools`` loads its executor here too, built-ins excepted)."""
    if flag == "--reward" and target in BUILTINS:
        return BUILTINS[target]
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"{flag} {target}: not a built-in ({', '.join(BUILTINS)}) nor module:function / "
                          "path/to/file.py:function")
    module = _load_module(module_name, target, flag)
    try:
        fn = getattr(module, attr, None)
        usable = callable(fn)
    except Exception as e:  # noqa: BLE001  (a module __getattr__ of the user's that raises)
        raise RewardError(f"{flag} {target}: reading {module_name}.{attr} raised {_said(e)}") from None
    if fn is None:
        raise RewardError(f"{flag} {target}: {module_name} has no function {attr!r}")
    if not usable:
        raise RewardError(f"{flag} {target}: {module_name}.{attr} is not callable")
    return fn


def _load_module(name: str, target: str, flag: str) -> Any:
    """A ``.py`` file (loaded under a private name) or an importable dotted module."""
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise RewardError(f"{flag} {target}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"tinylm_reward_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise RewardError(f"{flag} {target}: {path} is not a Python file (.py)")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # noqa: BLE001  (the user's file: any failure is theirs, said in one line)
            raise RewardError(f"{flag} {target}: loading {path} failed ({_said(e)})") from None
        return module
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as e:  # noqa: BLE001  (ImportError, or the module's own error on import)
        raise RewardError(f"{flag} {target}: cannot import {name} ({_said(e)})") from None


def _function_name(fn: RewardFn, fallback: str) -> str:
    """The function's ``__name__`` when it is a plain string, else ``fallback`` (the name in the spec)."""
    try:
        name = getattr(fn, "__name__", fallback)
    except Exception:  # noqa: BLE001  (a callable object of the user's whose attribute lookup raises)
        return fallback
    return name if isinstance(name, str) and name else fallback


def load_rewards(specs: Sequence[str]) -> list[Reward]:
    """The rewards of ``--reward`` specs, in order; log names are the built-in or function name, made unique
    with ``_2``, ``_3``, ... when repeated."""
    if not specs:
        raise RewardError("give at least one --reward SPEC (built-ins: " + ", ".join(BUILTINS) + ")")
    out: list[Reward] = []
    seen: dict[str, int] = {}
    for spec in specs:
        target, weight = split_weight(spec)
        fn = load_function(target)
        base = target if target in BUILTINS else _function_name(fn, target.rpartition(":")[2])
        seen[base] = seen.get(base, 0) + 1
        out.append(Reward(base if seen[base] == 1 else f"{base}_{seen[base]}", fn, weight, spec))
    return out


# ---- scoring -----------------------------------------------------------------------------------------------

def call_reward(reward: Reward, prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
    """One function's values (None -> nan). Everything the user's code gives back is read inside the guard:
    a call or a read of its values that raises (``SystemExit`` included), a wrong count, a value that is not
    a finite number (a 2-D array, an int too large for a float, an object whose ``float()`` raises) is a
    RewardError naming the function. The function gets copies of its arguments, so one that edits them
    changes nothing else."""
    who = f"reward {reward.name} ({reward.spec})"
    n = len(completions)
    prompts, completions, columns = copy.deepcopy((prompts, completions, columns))
    try:
        returned = reward.fn(prompts=prompts, completions=completions, **columns)
    except RewardError as e:
        raise RewardError(f"{who}: {_message(e)}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001  (a user's function: its failure stops the run in one line)
        raise RewardError(f"{who} raised {_said(e)}") from None
    values = _values(returned, n, who)
    return [_number(v, i, who) for i, v in enumerate(values)]


def _values(returned: Any, n: int, who: str) -> list[Any]:
    """The returned sequence as a list of exactly ``n`` items (at most n + 1 are read from an iterator)."""
    if isinstance(returned, (str, bytes, dict)):
        raise RewardError(f"{who} returned {type(returned).__name__}, not a list of {n} numbers")
    try:
        ndim = getattr(returned, "ndim", 1)
        if ndim != 1:
            raise RewardError(f"{who} returned a {ndim}-D array, not a list of {n} numbers")
        values = list(returned) if isinstance(returned, (list, tuple)) else list(itertools.islice(returned, n + 1))
    except RewardError:
        raise
    except TypeError:
        raise RewardError(f"{who} returned {type(returned).__name__}, not a list of {n} numbers") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001  (a generator of the user's that raises while it is read)
        raise RewardError(f"{who}: reading its values raised {_said(e)}") from None
    if len(values) != n:
        count = f"more than {n}" if len(values) > n and not isinstance(returned, (list, tuple)) else len(values)
        raise RewardError(f"{who} returned {count} values for {n} completions")
    return values


def _number(value: Any, index: int, who: str) -> float:
    """One returned value as a finite float (None -> nan); RewardError naming the index otherwise."""
    if value is None:
        return math.nan
    try:
        scalar = getattr(value, "ndim", 0) == 0  # numpy / torch scalars pass, arrays do not
        if isinstance(value, (str, bytes)) or not scalar or not hasattr(value, "__float__"):
            shape = f"a {value.ndim}-D array" if not scalar else type(value).__name__
            raise RewardError(f"{who} returned {shape} at index {index}, not a number")
        number = float(value)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001  (10**400, an object whose float() raises)
        raise RewardError(f"{who} returned {_shown(value)} at index {index}, not a finite number ({_said(e)})") \
            from None
    if not math.isfinite(number):
        raise RewardError(f"{who} returned {number} at index {index} (use None for 'does not apply')")
    return number


def _message(e: BaseException) -> str:
    """``str(e)`` of a user's exception, or a placeholder when its ``__str__`` raises."""
    try:
        return str(e)
    except Exception:  # noqa: BLE001
        return "(its message cannot be shown)"


def _said(e: BaseException) -> str:
    message = _message(e)
    return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _shown(value: Any, limit: int = 40) -> str:
    """A short repr of a user's value (a 400-digit int is cut), or its type when ``repr`` raises."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        return type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def score(rewards: Sequence[Reward], prompts: list, completions: list,
          columns: dict[str, list]) -> tuple[list[float], dict[str, list[float]]]:
    """(total per completion = sum of weight x value over the functions that apply, each function's values)."""
    each = {r.name: call_reward(r, prompts, completions, columns) for r in rewards}
    totals = [sum(r.weight * each[r.name][i] for r in rewards if not math.isnan(each[r.name][i]))
              for i in range(len(completions))]
    for i, total in enumerate(totals):
        if not abs(total) <= FLOAT32_MAX:  # advantages are float32
            parts = ", ".join(f"{r.name} {each[r.name][i]:g} x {r.weight:g}" for r in rewards)
            raise RewardError(f"the total reward of completion {i} ({parts}) is {total:g}, beyond float32's range")
    return totals, each
