"""The strings a normalised conversation holds, for tokenizer training.

A conversation in the normalised form of ``core.chat_schema`` (``preprocess.records.parse_conversation``)
holds text in four places: each tool definition of the system turn (as the template writes it, one JSON
line), each assistant turn's ``reasoning_content``, every non-empty ``content``, and each tool call's line
(``core.chat_template.tool_call_text``). :func:`chat_texts` returns them in conversation order.
"""

from __future__ import annotations

import json

from core.chat_template import tool_call_text


def chat_texts(turns: list[dict]) -> list[str]:
    """The strings a conversation holds, for tokenizer training: contents, thinking, call lines, schemas."""
    texts = []
    for turn in turns:
        texts += [json.dumps(tool, ensure_ascii=False) for tool in turn.get("tools") or ()]
        texts += [turn["reasoning_content"]] if turn.get("reasoning_content") else []
        texts += [turn["content"]] if turn["content"] else []
        texts += [tool_call_text(call) for call in turn.get("tool_calls") or ()]
    return texts
