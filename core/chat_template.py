"""The chat renderer: one function turns a conversation into the pieces of a document for any template family.

Layout (ChatML), for an optional leading ``system`` turn, then ``user`` turns, ``assistant`` turns and runs of
``tool`` turns::

    <|im_start|>{role}\n{content}<|im_end|>\n

with these additions, each described per family in ``core.chat_families`` (tinylm's own, MiniMind2's,
MiniMind-3's, Qwen3's), and nothing else:

- ``tools`` (OpenAI function definitions, passed explicitly or held by the leading system turn under
  ``"tools"``): the system turn becomes ``<|im_start|>system\n`` + ``{system content}\n\n`` + the family's
  tools intro, one ``json.dumps(tool, ensure_ascii=False)`` line per tool, its tools outro, ``<|im_end|>\n``;
  with tools and no system turn that block opens the conversation. A system turn with empty content that
  holds the tools is only their holder (``preprocess.chat_fields`` adds one for record-level tools): it
  renders as no system turn does, the tools block alone.
- assistant: the family's think block ``<think>\n{reasoning}\n</think>\n\n`` where it renders one; then its
  content; then each of ``tool_calls`` as ``<tool_call>\n{"name": <name>, "arguments": <arguments>}\n</tool_call>``
  (a string argument verbatim, an object as JSON; the name as JSON for tinylm, verbatim between quotes for
  the others), separated by ``\n`` from the content and each other. tinylm keeps content as it is (reasoning
  data holding ``<think>…</think><answer>…</answer>`` stays so); the other families with think blocks move a
  ``<think>…</think>`` prefix of the content into the block when reasoning_content is not a string.
- a run of consecutive ``tool`` turns: one ``user`` turn holding ``\n<tool_response>\n{content}\n</tool_response>``
  per result.
- ``add_generation_prompt``: ``<|im_start|>assistant\n`` and the family's text for the thinking switch
  (:meth:`ChatFamily.thinking_prompt`; tinylm: ``<think>\n`` on, the empty block off, nothing when not given).

Text is text. :func:`render_pieces` splits the same string into :class:`Piece` s that say how each part
becomes ids (``core.tokenizer.encode_documents`` does it):

- ``CONTROL``: a structural token, inserted as its single id. Only the template makes these:
  ``<|im_start|>`` and ``<|im_end|>`` around every turn, and those of :data:`STRUCTURE_TAGS` the tokenizer
  has as single ids (``tags``), where the template puts them: ``<think>`` ``</think>`` around the reasoning
  and in the generation prompt; ``<tool_call>`` ``</tool_call>`` around each call and in the tools
  instruction's format line; ``<tool_response>`` ``</tool_response>`` around tool results; and, inside
  **assistant** content only (where reasoning data and the model itself put them), the reasoning tags and
  ``<tool_call>`` ``</tool_call>``.
- ``TEXT``: role headers and everything else, encoded literally: no added token of the tokenizer (special
  or not) can match inside it, so ``<|im_end|>`` typed by a user is ten characters of text, not a turn end.
  User, system and tool-result text, reasoning, tool names, arguments and schemas are always TEXT, and so
  is ``<tools>`` (never a token). A structure tag the tokenizer lacks as one id is TEXT too.
- ``PARSED``: never made by the template; pretrain text under ``pack.py --parse-special``, where
  added-token strings in the text do become their ids.

Each piece carries ``supervised`` for the loss mask: an assistant turn's body (think block, content,
tool-call text) and its closing ``<|im_end|>`` are supervised, everything else (role headers,
system/user/tool text, the tools list, the newline after ``<|im_end|>``) is not. The whole think block is
supervised, the empty one included: a MiniMind-3 model learns to write ``<think>\n\n</think>\n\n`` itself
when it answers without reasoning, as MiniMind's own trainer teaches it (its labels cover everything after
``<|im_start|>assistant\n``). ``drop_empty_think`` leaves empty think blocks out (MiniMind's augmentation).
Adjacent TEXT pieces with the same flag are merged, so a prompt (``supervise="none"``) is tokenized exactly
as inference tokenizes it; with supervision, an assistant answer is tokenized apart from its
``assistant\n`` header, as the model generates it after the generation prompt. Invariants (tested against
transformers for every family): ``"".join(p.text for p in render_pieces(turns, family=F)) ==
tokenizer.apply_chat_template(turns, tools=..., chat_template=<F's template>, tokenize=False)``, and for
content without added-token strings the ids of ``render_pieces(turns, supervise="none", tags=...)`` equal
``apply_chat_template(..., tokenize=True)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from core.chat_families import CHAT_TEMPLATE, TINYLM, TOOLS_INTRO, TOOLS_OUTRO, ChatFamily

__all__ = ["CHAT_TEMPLATE", "TOOLS_INTRO", "TOOLS_OUTRO"]  # the tinylm family's Jinja form and tools block

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"  # text only: never tokens
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
TOOL_TAGS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)
STRUCTURE_TAGS = (*REASONING_TAGS, *TOOL_TAGS)  # single ids in the shipped tokenizer (ids 3..10)
CONTENT_TAGS = (*REASONING_TAGS, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)  # structure inside assistant content
_CALL_TAGS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *STRUCTURE_TAGS)
STOP_TOKENS = (IM_END, ENDOFTEXT)  # end an assistant turn: generation stops at either
ROLES = ("system", "user", "assistant", "tool")
THINKING_PROMPTS = TINYLM.generation_think  # the tinylm family's generation-prompt endings


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


def tools_of(turns: Sequence[dict], tools: list | None = None) -> list | None:
    """The tools a conversation lists: ``tools`` when given, else the leading system turn's ``"tools"``."""
    if tools is None and turns and turns[0]["role"] == "system":
        return turns[0].get("tools")
    return tools


def tool_call_text(call: dict, family: ChatFamily = TINYLM) -> str:
    """The JSON line of one tool call between its tags: ``{"name": ..., "arguments": ...}`` (an arguments
    string verbatim, an object as JSON; the name as the family writes it); ``call`` is OpenAI's
    ``{"function": {...}}`` or the function itself."""
    function = call.get("function") or call
    arguments = function["arguments"]
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    name = json.dumps(function["name"], ensure_ascii=False) if family.call_name_json else f'"{function["name"]}"'
    return f'{{"name": {name}, "arguments": {arguments}}}'


def render_text(turns: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
                enable_thinking: bool | None = None, family: ChatFamily = TINYLM) -> str:
    """The chat string for ``turns``, as ``family``'s template renders it.

    For display and the transformers parity check only: tokenizing this string would turn special-token
    strings in content into control ids. Encode with ``core.tokenizer.encode_chat`` / ``prompt_ids``.
    """
    pieces = render_pieces(turns, add_generation_prompt, "none", tools=tools, enable_thinking=enable_thinking,
                           family=family)
    return "".join(p.text for p in pieces)


@lru_cache(maxsize=16)
def _tag_splitter(tags: tuple[str, ...]) -> re.Pattern | None:
    """A regex whose ``split`` keeps the content tags among ``tags`` as the odd-numbered parts (None: none)."""
    tags = tuple(t for t in tags if t in CONTENT_TAGS)
    return re.compile("(" + "|".join(map(re.escape, tags)) + ")") if tags else None


class _Builder:
    """Collects pieces: ``put`` appends one that cannot merge (a CONTROL piece, or any piece right after
    one); ``text`` merges into a preceding TEXT piece with the same flag; empty texts are left out."""

    def __init__(self, tags: Sequence[str]) -> None:
        self.pieces: list[Piece] = []
        self.put = self.pieces.append
        self.tags = tags

    def text(self, text: str, learn: bool) -> None:
        if not text:
            return
        pieces = self.pieces
        last = pieces[-1] if pieces else None
        if last is not None and last.kind == TEXT and last.supervised == learn:
            pieces[-1] = Piece(last.text + text, TEXT, learn)
        else:
            pieces.append(Piece(text, TEXT, learn))

    def tag(self, tag: str, learn: bool) -> None:
        """A structure tag: CONTROL when the tokenizer has it as one id, else TEXT (weighted like text)."""
        if tag in self.tags:
            self.put(Piece(tag, CONTROL, learn))
        else:
            self.text(tag, learn)

    def split_tags(self, text: str, learn: bool, splitter: re.Pattern | None) -> None:
        """Text whose tags found by ``splitter`` (odd parts of the split) are structure: assistant content,
        the tools instruction."""
        if splitter is None:
            self.text(text, learn)
            return
        for j, part in enumerate(splitter.split(text)):
            self.tag(part, learn) if j % 2 else self.text(part, learn)


def render_pieces(turns: list[dict], add_generation_prompt: bool = False, supervise: str = "all",
                  tags: Sequence[str] = (), tools: list | None = None, enable_thinking: bool | None = None,
                  family: ChatFamily = TINYLM, drop_empty_think: bool = False) -> list[Piece]:
    """The rendered conversation as pieces (see the module docstring); empty pieces are left out.

    ``supervise="all"`` marks every assistant turn (SFT, reasoning); ``"last"`` only the final one
    (DPO: the sequence log-probability is taken over the final answer); ``"none"`` nothing (prompts).
    ``tags``: the structure tags that are single ids in the tokenizer (``TokenizerInfo.structural_tags``).
    ``tools``: function definitions to list (None: the system turn's ``"tools"``, if any).
    ``enable_thinking``: the thinking switch of the generation prompt (whatever the family calls it).
    ``drop_empty_think``: leave out the think blocks that would be empty.
    """
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, not {supervise!r}")
    out = _Builder(tags)
    splitter = _tag_splitter(tuple(tags))
    tools = tools_of(turns, tools)
    if tools:
        _render_tools(out, turns, tools, family)
    elif family.default_system is not None and (not turns or turns[0]["role"] != "system"):
        out.put(_START)
        out.put(Piece(f"system\n{family.default_system}", TEXT, False))
        out.put(_END)
        out.put(_NEWLINE)
    last = len(turns) - 1
    last_query = _last_query(turns) if family.think == "after_last_query" else -1
    as_given = family.think == "reasoning"
    for i, turn in enumerate(turns):
        role = turn["role"]
        if role == "assistant":
            if as_given:  # tinylm: content as given, a block only for reasoning_content
                content = turn.get("content")
                content = content if isinstance(content, str) else ""
                reasoning = turn.get("reasoning_content")
                parts = (content, content, reasoning if reasoning and isinstance(reasoning, str) else None)
            else:
                parts = _assistant_parts(turn, family, i > last_query, i == last, drop_empty_think)
            _render_assistant(out, turn, supervise == "all" or supervise == "last" and i == last, splitter,
                              family, *parts)
        elif role == "tool":
            _render_tool(out, turn, i == 0 or turns[i - 1]["role"] != "tool",
                         i == last or turns[i + 1]["role"] != "tool")
        elif not (i == 0 and role == "system" and tools):
            out.put(_START)
            content = turn.get("content")
            out.put(Piece(f"{role}\n{content if isinstance(content, str) else ''}", TEXT, False))
            out.put(_END)
            out.put(_NEWLINE)
    if add_generation_prompt:
        out.put(_START)
        out.put(_ASSISTANT_HEADER)
        out.split_tags(family.thinking_prompt(enable_thinking), False, _THINK_SPLITTER)
    return out.pieces


_THINK_SPLITTER = re.compile(f"({re.escape(THINK_OPEN)}|{re.escape(THINK_CLOSE)})")


def _text(value: object) -> str:
    """A message field as the templates use it: the string, else empty."""
    return value if isinstance(value, str) else ""


def _last_query(turns: list[dict]) -> int:
    """Qwen3's ``last_query_index``: the last user turn that is not a wrapped tool response (else the last turn)."""
    for i in range(len(turns) - 1, -1, -1):
        content = turns[i].get("content")
        if turns[i]["role"] == "user" and isinstance(content, str) and not (
                content.startswith(TOOL_RESPONSE_OPEN) and content.endswith(TOOL_RESPONSE_CLOSE)):
            return i
    return len(turns) - 1


def _split_think(turn: dict) -> tuple[str, str]:
    """(reasoning, content) as the Qwen-style templates read them: reasoning_content when it is a string,
    else a ``<think>…</think>`` prefix of the content (its newlines trimmed) moved out of the content."""
    content, reasoning = _text(turn.get("content")), turn.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if THINK_CLOSE in content:
        head, _, _ = content.partition(THINK_CLOSE)
        return head.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n"), content.split(THINK_CLOSE)[-1].lstrip("\n")
    return "", content


def _assistant_parts(turn: dict, family: ChatFamily, after_query: bool, is_last: bool,
                     drop_empty_think: bool) -> tuple[str, str, str | None]:
    """(content, content as shown, reasoning of the think block or None: no block) of an assistant turn for a
    family other than tinylm. A block's reasoning has its newlines stripped and the content shown after it
    its leading ones. ``after_query``: the turn comes after the last user query (Qwen3 renders blocks only
    there: on the last turn, and on others with reasoning). An empty block left out by ``drop_empty_think``
    still trims the content, as removing the block's text from the rendered string does."""
    if family.think == "never":
        content = _text(turn.get("content"))
        return content, content, None
    reasoning, content = _split_think(turn)
    if family.think == "after_last_query" and not (after_query and (is_last or reasoning)):
        return content, content, None
    reasoning = reasoning.strip("\n")
    return content, content.lstrip("\n"), None if drop_empty_think and not reasoning else reasoning


def _render_tools(out: _Builder, turns: list[dict], tools: list, family: ChatFamily) -> None:
    """The system turn with the tools block (unsupervised; the format line's call tags are structure)."""
    system = _text(turns[0].get("content")) if turns and turns[0]["role"] == "system" else ""
    head = f"{system}\n\n" if system else ""
    out.put(_START)
    out.text("system\n" + head + family.tools_intro
             + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools), False)
    out.split_tags(family.tools_outro, False, _tag_splitter(tuple(t for t in _CALL_TAGS if t in out.tags)))
    out.put(_END)
    out.put(_NEWLINE)


def _render_assistant(out: _Builder, turn: dict, learn: bool, splitter: re.Pattern | None, family: ChatFamily,
                      content: str, shown: str, reasoning: str | None) -> None:
    """Header, then (supervised when ``learn``) the think block holding ``reasoning`` (None: no block), the
    content as ``shown``, the tool calls and ``<|im_end|>``."""
    out.put(_START)
    out.put(_ASSISTANT_HEADER)
    if reasoning is not None:
        out.tag(THINK_OPEN, learn)
        out.text(f"\n{reasoning}\n", learn)
        out.tag(THINK_CLOSE, learn)
        out.text("\n\n", learn)
    out.split_tags(shown, learn, splitter)
    for j, call in enumerate(turn.get("tool_calls") or ()):
        if content or j:  # the templates test the content before its leading newlines are trimmed
            out.text("\n", learn)
        out.tag(TOOL_CALL_OPEN, learn)
        out.text(f"\n{tool_call_text(call, family)}\n", learn)
        out.tag(TOOL_CALL_CLOSE, learn)
    out.put(_END_LEARN if learn else _END)
    out.put(_NEWLINE)


def _render_tool(out: _Builder, turn: dict, first: bool, last: bool) -> None:
    """One tool result inside the user turn that a run of tool turns becomes (never supervised)."""
    if first:
        out.put(_START)
        out.text("user", False)
    out.text("\n", False)
    out.tag(TOOL_RESPONSE_OPEN, False)
    out.text(f"\n{turn.get('content') or ''}\n", False)
    out.tag(TOOL_RESPONSE_CLOSE, False)
    if last:
        out.put(_END)
        out.put(_NEWLINE)
