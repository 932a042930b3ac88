"""The ChatML template: one definition used by training (pack.py) and by inference (tokenizer_config.json).

A conversation renders as, for every turn (an optional leading ``system`` turn, then strictly
alternating ``user`` / ``assistant``)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

There is no default system prompt and nothing before the first turn. ``add_generation_prompt``
appends ``<|im_start|>assistant\\n``.

:func:`render_segments` splits the same string into (text, supervised) pieces for the loss mask:
an assistant turn's content and its closing ``<|im_end|>`` are supervised, everything else (role
headers, user/system text, the newline after ``<|im_end|>``) is not. Adjacent pieces with the same
flag are merged, so a prompt is tokenized as one string, exactly as inference tokenizes it.
Invariant (tested against transformers): ``"".join(t for t, _ in render_segments(turns)) ==
render_text(turns) == tokenizer.apply_chat_template(turns, tokenize=False)``.
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *REASONING_TAGS)
ROLES = ("system", "user", "assistant")

# The Jinja form of render_text, written into tokenizer_config.json for transformers / llama.cpp.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_text(turns: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat string for ``turns`` (a list of ``{"role", "content"}``), as CHAT_TEMPLATE renders it."""
    text = "".join(f"{IM_START}{t['role']}\n{t['content']}{IM_END}\n" for t in turns)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def render_segments(turns: list[dict], supervise: str = "all") -> list[tuple[str, bool]]:
    """Split the rendered chat into merged (text, supervised) pieces.

    ``supervise="all"`` marks every assistant turn (SFT, reasoning); ``"last"`` only the final one
    (DPO: the sequence log-probability is taken over the final answer).
    """
    if supervise not in ("all", "last"):
        raise ValueError(f"supervise must be 'all' or 'last', not {supervise!r}")
    pieces: list[tuple[str, bool]] = []
    last = len(turns) - 1
    for i, turn in enumerate(turns):
        learn = turn["role"] == "assistant" and (supervise == "all" or i == last)
        pieces.append((f"{IM_START}{turn['role']}\n", False))
        pieces.append((turn["content"] + IM_END, learn))
        pieces.append(("\n", False))
    merged: list[tuple[str, bool]] = []
    for text, flag in pieces:
        if merged and merged[-1][1] == flag:
            merged[-1] = (merged[-1][0] + text, flag)
        else:
            merged.append((text, flag))
    return merged
