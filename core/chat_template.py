"""The chat template: one definition used by training (pack.py) and by inference (tokenizer_config.json).

Layout (Qwen3 / MiniMind-3), for every turn of an optional leading ``system`` turn, then ``user`` turns,
``assistant`` turns and runs of ``tool`` turns::

    <|im_start|>{role}\n{content}<|im_end|>\n

with these additions, and nothing else (no default system prompt, nothing before the first turn):

- ``tools`` (OpenAI function definitions, passed explicitly or held by the leading system turn under
  ``"tools"``): the system turn becomes ``<|im_start|>system\n`` + ``{system content}\n\n`` (if any) +
  :data:`TOOLS_INTRO`, one ``json.dumps(tool, ensure_ascii=False)`` line per tool, :data:`TOOLS_OUTRO`,
  ``<|im_end|>\n``; with tools and no system turn that block opens the conversation.
- assistant: ``<think>\n{reasoning_content}\n</think>\n\n`` when it has ``reasoning_content``; then its
  content unchanged (reasoning data that holds ``<think>…</think><answer>…</answer>`` stays as it is);
  then each of ``tool_calls`` as ``<tool_call>\n{"name": <name as JSON>, "arguments": <arguments>}\n</tool_call>``
  (a string argument verbatim, an object as JSON), separated by ``\n`` from the content and each other.
- a run of consecutive ``tool`` turns: one ``user`` turn holding ``\n<tool_response>\n{content}\n</tool_response>``
  per result.
- ``add_generation_prompt``: ``<|im_start|>assistant\n``, then ``<think>\n`` for ``enable_thinking=True``
  or the empty block ``<think>\n\n</think>\n\n`` for ``enable_thinking=False`` (None: the model decides).

Text is text. :func:`render_pieces` splits the same string into :class:`Piece` s that say how each part
becomes ids (``core.tokenizer.encode_documents`` does it):

- ``CONTROL``: a structural token, inserted as its single id. Only the template makes these:
  ``<|im_start|>`` and ``<|im_end|>`` around every turn, and those of :data:`STRUCTURE_TAGS` the tokenizer
  has as single ids (``tags``), where the template puts them: ``<think>`` ``</think>`` around
  ``reasoning_content`` and in the generation prompt; ``<tool_call>`` ``</tool_call>`` around each call and
  in the tools instruction's format line; ``<tool_response>`` ``</tool_response>`` around tool results; and,
  inside **assistant** content only (where reasoning data and the model itself put them), the reasoning
  tags and ``<tool_call>`` ``</tool_call>``.
- ``TEXT``: role headers and everything else, encoded literally: no added token of the tokenizer (special
  or not) can match inside it, so ``<|im_end|>`` typed by a user is ten characters of text, not a turn end.
  User, system and tool-result text, reasoning_content, tool names, arguments and schemas are always
  TEXT, and so is ``<tools>`` (never a token). A structure tag the tokenizer lacks as one id is TEXT too.
- ``PARSED``: never made by the template; pretrain text under ``pack.py --parse-special``, where
  added-token strings in the text do become their ids.

Each piece carries ``supervised`` for the loss mask: an assistant turn's body (thinking, content,
tool-call text) and its closing ``<|im_end|>`` are supervised, everything else (role headers,
system/user/tool text, the tools list, the newline after ``<|im_end|>``) is not. Adjacent TEXT pieces
with the same flag are merged, so a prompt (``supervise="none"``) is tokenized exactly as inference
tokenizes it; with supervision, an assistant answer is tokenized apart from its ``assistant\n`` header,
as the model generates it after the generation prompt. Invariants (tested against transformers):
``"".join(p.text for p in render_pieces(turns)) == render_text(turns) == tokenizer.apply_chat_template(
turns, tokenize=False)`` (with the same ``tools`` / ``enable_thinking``), and for content without
added-token strings the ids of ``render_pieces(turns, supervise="none", tags=...)`` equal
``apply_chat_template(turns, tokenize=True)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

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
STOP_TOKENS = (IM_END, ENDOFTEXT)  # end an assistant turn: generation stops at either (the one stop list)
ROLES = ("system", "user", "assistant", "tool")
THINKING_PROMPTS = {None: "", True: f"{THINK_OPEN}\n", False: f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"}

# The tools block of the system turn: TOOLS_INTRO, one JSON line per tool (each after a "\n"), TOOLS_OUTRO.
TOOLS_INTRO = ("# Tools\n\nYou can call functions to help with the request. Their JSON signatures are listed "
               f"between {TOOLS_OPEN} and {TOOLS_CLOSE}:\n{TOOLS_OPEN}")
TOOLS_OUTRO = (f"\n{TOOLS_CLOSE}\n\nTo call a function, reply with one block per call, each holding a JSON "
               "object with the function's name and its arguments:\n"
               f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-object>}}\n{TOOL_CALL_CLOSE}')

# The Jinja form of render_text, written into tokenizer_config.json and chat_template.jinja for
# transformers / llama.cpp. ``tojson`` is transformers' filter: json.dumps(x, ensure_ascii=False).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(tools=none, prev='') %}"
    "{%- if tools is defined and tools is not none %}{%- set ns.tools = tools %}"
    "{%- elif messages and messages[0].role == 'system' and messages[0].tools is defined %}"
    "{%- set ns.tools = messages[0].tools %}{%- endif %}"
    "{%- if ns.tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' and messages[0].content %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- " + json.dumps(TOOLS_INTRO) + " }}"
    "{%- for tool in ns.tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- " + json.dumps(TOOLS_OUTRO) + " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'tool' %}"
    "{%- if ns.prev != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content is string and message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set function = call.function if call.function is defined else call %}"
    "{{- '<tool_call>\\n{\"name\": ' + function.name | tojson + ', \"arguments\": ' }}"
    "{%- if function.arguments is string %}{{- function.arguments }}{%- else %}{{- function.arguments | tojson }}"
    "{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif not (loop.first and message.role == 'system' and ns.tools) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns.prev = message.role %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is true %}{{- '<think>\\n' }}"
    "{%- elif enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


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


def tool_call_text(call: dict) -> str:
    """The JSON line of one tool call between its tags: ``{"name": ..., "arguments": ...}`` (an arguments
    string verbatim, an object as JSON); ``call`` is OpenAI's ``{"function": {...}}`` or the function itself."""
    function = call.get("function", call)
    arguments = function["arguments"]
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'{{"name": {json.dumps(function["name"], ensure_ascii=False)}, "arguments": {arguments}}}'


def render_text(turns: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
                enable_thinking: bool | None = None) -> str:
    """The chat string for ``turns``, as CHAT_TEMPLATE renders it.

    For display and the transformers parity check only: tokenizing this string would turn special-token
    strings in content into control ids. Encode with ``core.tokenizer.encode_chat`` / ``prompt_ids``.
    """
    pieces = render_pieces(turns, add_generation_prompt, "none", tools=tools, enable_thinking=enable_thinking)
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
                  tags: Sequence[str] = (), tools: list | None = None,
                  enable_thinking: bool | None = None) -> list[Piece]:
    """The rendered conversation as pieces (see the module docstring); empty pieces are left out.

    ``supervise="all"`` marks every assistant turn (SFT, reasoning); ``"last"`` only the final one
    (DPO: the sequence log-probability is taken over the final answer); ``"none"`` nothing (prompts).
    ``tags``: the structure tags that are single ids in the tokenizer (``TokenizerInfo.structural_tags``).
    ``tools``: function definitions to list (None: the system turn's ``"tools"``, if any).
    """
    if supervise not in SUPERVISE:
        raise ValueError(f"supervise must be one of {SUPERVISE}, not {supervise!r}")
    out = _Builder(tags)
    splitter = _tag_splitter(tuple(tags))
    tools = tools_of(turns, tools)
    if tools:
        _render_tools(out, turns, tools)
    last = len(turns) - 1
    for i, turn in enumerate(turns):
        role = turn["role"]
        if role == "assistant":
            _render_assistant(out, turn, supervise == "all" or supervise == "last" and i == last, splitter)
        elif role == "tool":
            _render_tool(out, turn, i == 0 or turns[i - 1]["role"] != "tool",
                         i == last or turns[i + 1]["role"] != "tool")
        elif not (i == 0 and role == "system" and tools):
            out.put(_START)
            out.put(Piece(f"{role}\n{turn['content']}", TEXT, False))
            out.put(_END)
            out.put(_NEWLINE)
    if add_generation_prompt:
        out.put(_START)
        out.put(_ASSISTANT_HEADER)
        if enable_thinking is not None:
            out.tag(THINK_OPEN, False)
            if enable_thinking is False:
                out.text("\n\n", False)
                out.tag(THINK_CLOSE, False)
            out.text("\n\n" if enable_thinking is False else "\n", False)
    return out.pieces


def _render_tools(out: _Builder, turns: list[dict], tools: list) -> None:
    """The system turn with the tools block (unsupervised; the format line's call tags are structure)."""
    system = turns[0].get("content") if turns and turns[0]["role"] == "system" else ""
    out.put(_START)
    out.text("system\n" + (f"{system}\n\n" if system else "") + TOOLS_INTRO
             + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools), False)
    out.split_tags(TOOLS_OUTRO, False, _tag_splitter(tuple(t for t in _CALL_TAGS if t in out.tags)))
    out.put(_END)
    out.put(_NEWLINE)


def _render_assistant(out: _Builder, turn: dict, learn: bool, splitter: re.Pattern | None) -> None:
    """Header, then (supervised when ``learn``) thinking, content, tool calls and ``<|im_end|>``."""
    out.put(_START)
    out.put(_ASSISTANT_HEADER)
    reasoning = turn.get("reasoning_content")
    if reasoning:
        out.tag(THINK_OPEN, learn)
        out.text(f"\n{reasoning}\n", learn)
        out.tag(THINK_CLOSE, learn)
        out.text("\n\n", learn)
    content = turn.get("content") or ""
    out.split_tags(content, learn, splitter)
    for j, call in enumerate(turn.get("tool_calls") or ()):
        if content or j:
            out.text("\n", learn)
        out.tag(TOOL_CALL_OPEN, learn)
        out.text(f"\n{tool_call_text(call)}\n", learn)
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
