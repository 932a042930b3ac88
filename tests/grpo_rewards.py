"""Reward functions the RL tests load by path (``tests/grpo_rewards.py:NAME``), written as a TRL user would."""

from __future__ import annotations


def digits(prompts, completions, **kwargs):
    """The share of a completion's characters that are ASCII digits (a toy task a tiny model learns fast)."""
    out = []
    for completion in completions:
        text = completion[0]["content"]
        out.append(sum(c.isdigit() for c in text) / max(len(text), 1))
    return out


def raises(prompts, completions, **kwargs):
    raise ValueError("bad reward")


def too_short(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def not_numbers(prompts, completions, **kwargs):
    return ["high"] * len(completions)


def echo_column(prompts, completions, level, **kwargs):
    """The prompt record's own ``level`` column (extra columns reach reward functions as keyword lists)."""
    return [float(x) for x in level]


def huge_int(prompts, completions, **kwargs):
    return [10**400] * len(completions)


def raising_generator(prompts, completions, **kwargs):
    yield 1.0
    raise RuntimeError("generator broke")


def endless(prompts, completions, **kwargs):
    while True:
        yield 0.0


def matrix(prompts, completions, **kwargs):
    import numpy as np

    return np.zeros((len(completions), 1))


class _NoFloat:
    def __float__(self):
        raise ArithmeticError("no float for you")


def float_raises(prompts, completions, **kwargs):
    return [_NoFloat() for _ in completions]


class _BadMessage(Exception):
    def __str__(self):
        raise RuntimeError("no message either")


def bad_message(prompts, completions, **kwargs):
    raise _BadMessage()


def edits_its_arguments(prompts, completions, **kwargs):
    """Changes what it was given (a careless user's function): nothing outside the call may change."""
    for p in prompts:
        p.append({"role": "user", "content": "injected"})
    for values in kwargs.values():
        values.clear()
    return [0.0] * len(completions)


def numpy_values(prompts, completions, **kwargs):
    import numpy as np

    return np.arange(len(completions), dtype=np.float64)


def overflowing(prompts, completions, **kwargs):
    return [1e300] * len(completions)


def exits(prompts, completions, **kwargs):
    raise SystemExit(0)
