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
wrong number of values or a non-number) is a :class:`RewardError`: one line naming the function.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import TinyLMError
from preprocess.sources import split_number_suffix

RewardFn = Callable[..., Sequence[float | None]]


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


BUILTINS: dict[str, RewardFn] = {"gsm8k": gsm8k, "format": format_reward, "length": length}


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


def load_function(target: str) -> RewardFn:
    """A built-in, ``module:function`` or ``file.py:function``, loaded; RewardError names what is missing."""
    if target in BUILTINS:
        return BUILTINS[target]
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"--reward {target}: not a built-in ({', '.join(BUILTINS)}) nor module:function / "
                          "path/to/file.py:function")
    module = _load_module(module_name, target)
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"--reward {target}: {module_name} has no function {attr!r}")
    if not callable(fn):
        raise RewardError(f"--reward {target}: {module_name}.{attr} is not callable")
    return fn


def _load_module(name: str, target: str) -> Any:
    """A ``.py`` file (loaded under a private name) or an importable dotted module."""
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise RewardError(f"--reward {target}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"tinylm_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001  (the user's file: any failure is theirs, said in one line)
            raise RewardError(f"--reward {target}: loading {path} failed ({type(e).__name__}: {e})") from None
        return module
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001  (ImportError, or the module's own error on import)
        raise RewardError(f"--reward {target}: cannot import {name} ({type(e).__name__}: {e})") from None


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
        base = target if target in BUILTINS else getattr(fn, "__name__", target.rpartition(":")[2])
        seen[base] = seen.get(base, 0) + 1
        out.append(Reward(base if seen[base] == 1 else f"{base}_{seen[base]}", fn, weight, spec))
    return out


# ---- scoring -----------------------------------------------------------------------------------------------

def call_reward(reward: Reward, prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
    """One function's values (None -> nan); RewardError when it raises or returns a wrong value."""
    try:
        values = reward.fn(prompts=prompts, completions=completions, **columns)
    except RewardError as e:
        raise RewardError(f"reward {reward.name} ({reward.spec}): {e}") from None
    except Exception as e:  # noqa: BLE001  (a user's function: its failure stops the run in one line)
        raise RewardError(f"reward {reward.name} ({reward.spec}) raised {type(e).__name__}: {e}") from None
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {reward.name} ({reward.spec}) returned {type(values).__name__}, not a list of "
                          f"{len(completions)} numbers") from None
    if len(values) != len(completions):
        raise RewardError(f"reward {reward.name} ({reward.spec}) returned {len(values)} values for "
                          f"{len(completions)} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if not isinstance(v, (int, float)) and not hasattr(v, "__float__"):  # bools and numpy / torch scalars pass
            raise RewardError(f"reward {reward.name} ({reward.spec}) returned {type(v).__name__} at index {i}, "
                              "not a number")
        v = float(v)
        if not math.isfinite(v):
            raise RewardError(f"reward {reward.name} ({reward.spec}) returned {v} at index {i} (use None for "
                              "'does not apply')")
        out.append(v)
    return out


def score(rewards: Sequence[Reward], prompts: list, completions: list,
          columns: dict[str, list]) -> tuple[list[float], dict[str, list[float]]]:
    """(total per completion = sum of weight x value over the functions that apply, each function's values)."""
    each = {r.name: call_reward(r, prompts, completions, columns) for r in rewards}
    totals = [sum(r.weight * each[r.name][i] for r in rewards if not math.isnan(each[r.name][i]))
              for i in range(len(completions))]
    return totals, each
