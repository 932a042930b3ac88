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
