"""The ChatML template: one definition used by training (pack.py) and by inference (tokenizer_config.json).

A conversation renders as, for every turn (an optional leading ``system`` turn, then strictly
alternating ``user`` / ``assistant``)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

There is no default system prompt and nothing before the first turn. ``add_generation_prompt``
appends ``<|im_start|>assistant\\n``.

Text is text. :func:`render_pieces` splits the same string into :class:`Piece` s that say how each part
becomes ids (``core.tokenizer.encode_documents`` does it):

- ``CONTROL``: a structural token, inserted as its single id. Only the template makes these:
  ``<|im_start|>`` and ``<|im_end|>`` around every turn, and, inside **assistant** content only, the
  reasoning tags ``<think>`` ``</think>`` ``<answer>`` ``</answer>`` that the tokenizer has as single ids
  (``tags``: that is where reasoning data and the model itself put them).
- ``TEXT``: role headers and all content, encoded literally: no added token of the tokenizer (special
  or not) can match inside it, so ``<|im_end|>`` typed by a user is ten characters of text, not a turn end;
  in system/user content the reasoning tags are text too.
- ``PARSED``: never made by the template; pretrain text under ``pack.py --parse-special``, where
  added-token strings in the text do become their ids.

Each piece carries ``supervised`` for the loss mask: an assistant turn's content and its closing
``<|im_end|>`` are supervised, everything else (role headers, user/system text, the newline after
``<|im_end|>``) is not. Adjacent TEXT pieces with the same flag are merged, so a prompt
(``supervise="none"``) is tokenized exactly as inference tokenizes it; with supervision, an assistant
answer is tokenized apart from its ``assistant\\n`` header, as the model generates it after the
generation prompt. Invariants (tested against transformers): ``"".join(p.text for p in
render_pieces(turns)) == render_text(turns) == tokenizer.apply_chat_template(turns, tokenize=False)``,
and for content without added-token strings the ids of ``render_pieces(turns, supervise="none")`` equal
``apply_chat_template(turns, tokenize=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *REASONING_TAGS)
STOP_TOKENS = (IM_END, ENDOFTEXT)  # end an assistant turn: generation stops at either (the one stop list)
ROLES = ("system", "user", "assistant")

# The Jinja form of render_text, written into tokenizer_config.json for transformers / llama.cpp.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_text(turns: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat string for ``turns`` (a list of ``{"role", "content"}``), as CHAT_TEMPLATE renders it.

    For display and the transformers parity check only: tokenizing this string would turn special-token
    strings in content into control ids. Encode with ``core.tokenizer.encode_chat`` / ``prompt_ids``.
    """
    text = "".join(f"{IM_START}{t['role']}\n{t['content']}{IM_END}\n" for t in turns)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class Piece(NamedTuple):
    """One part of a rendered document: its text, how it becomes ids (``kind``), and its loss flag."""

    text: str
    kind: str  # TEXT, CONTROL or PARSED
    supervised: bool


TEXT, CONTROL, PARSED = "text", "control", "parsed"
SUPERVISE = ("all", "last", "none")
TEMPLATE_TEXTS = ("\n", "assistant\n")  # the template's constant TEXT pieces: encoders may cache their ids
_START, _END, _END_LEARN = Piece(IM_START, CONTROL, False), Piece(IM_END, CONTROL, False), Piece(IM_END, CONTROL, True)
_ASSISTANT_HEADER, _NEWLINE = Piece("assistant\n", TEXT, False), Piece("\n", TEXT, False)


@lru_cache(maxsize=16)
def _tag_splitter(tags: tuple[str, ...]) -> re.Pattern | None:
    """A regex whose ``split`` keeps the tags as the odd-numbered parts (None: no tags)."""
    return re.compile("(" + "|".join(map(re.escape, tags)) + ")") if tags else None


def render_pieces(turns: list[dict], add_generation_prompt: bool = False, supervise: str = "all",
                  tags: Sequence[str] = ()) -> list[Piece]:
    """The rendered conversation as pieces (see the module docstring); empty pieces are left out.

    ``supervise="all"`` marks every assistant turn (SFT, reasoning); ``"last"`` only the final one
    (DPO: the sequence log-probability is taken over the final answer); ``"none"`` nothing (prompts).
    ``tags``: the reasoning tags that are single ids in the tokenizer (``TokenizerInfo.structural_tags``).
    """
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, not {supervise!r}")
    splitter = _tag_splitter(tuple(tags))
    pieces: list[Piece] = []
    add = pieces.append
    last = len(turns) - 1
    for i, turn in enumerate(turns):
        role, content = turn["role"], turn["content"]
        assistant = role == "assistant"
        learn = assistant and (supervise == "all" or supervise == "last" and i == last)
        add(_START)
        # the content's parts: tags (odd positions) are CONTROL, only in assistant content
        parts = splitter.split(content) if assistant and splitter else (content,)
        if learn:
            add(_ASSISTANT_HEADER)
            first = 0
        else:  # the header merges with the first part, both unsupervised TEXT (the only merge possible:
            add(Piece(f"{role}\n{parts[0]}", TEXT, False))  # every other TEXT piece is between CONTROL ones)
            first = 1
        for j in range(first, len(parts)):
            if parts[j]:
                add(Piece(parts[j], CONTROL if j % 2 else TEXT, learn))
        add(_END_LEARN if learn else _END)
        add(_NEWLINE)
    if add_generation_prompt:
        pieces += [_START, _ASSISTANT_HEADER]
    return pieces

