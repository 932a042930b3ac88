"""The prompts of an RL run or of ``bin/eval --reward``: a ``--prompts`` file read and validated at once
(``preprocess.prompts.read_prompts``), then tokenized with the model's tokenizer.

A prompt's columns become keyword arguments of the reward functions (``train/rewards.py``), which receive
``prompts`` and ``completions`` themselves: a column with one of those names (:data:`RESERVED_COLUMNS`) is
refused when the file is read, naming ``file:line``. A prompt the tokenizer refuses, or one that leaves no
room for a completion in the model's context, is refused when it is tokenized, naming ``file:line`` and the
lengths. :class:`PromptSet` is the run's :class:`~train.batches.TrainingData` for the RL stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.chat_template import tools_of
from core.tokenizer import TextRefused, TokenizerInfo, prompt_ids
from preprocess.prompts import Prompt, read_prompts
from preprocess.records import RecordError

RESERVED_COLUMNS = ("prompts", "completions")  # the reward functions' own arguments


def located(error: RecordError, prompt: Prompt) -> RecordError:
    """``error`` located at the prompt's ``file:line``."""
    error.path, error.line = prompt.source, prompt.line or None
    return error


def check_columns(prompt: Prompt) -> None:
    """Refuse a column named like an argument the reward functions receive from the stage itself."""
    for name in RESERVED_COLUMNS:
        if name in prompt.columns:
            raise located(RecordError("reserved_column", f"a column named {name!r} would replace the reward "
                                      f"functions' own {name!r} argument; rename it", name), prompt)


def tokenize(prompt: Prompt, tok: TokenizerInfo, context: int, tools: list | None = None) -> list[int]:
    """The generation-prompt ids of ``prompt`` (``core.tokenizer.prompt_ids``; ``tools``: listed when the
    prompt lists none); RecordError naming ``file:line`` when the tokenizer refuses its text or it leaves no
    room for a completion in ``context`` positions."""
    try:
        ids = prompt_ids(tok, prompt.turns, tools=None if tools_of(prompt.turns) else tools)
    except TextRefused as e:
        raise located(RecordError("bad_unicode", e.message), prompt) from None
    if len(ids) >= context:
        raise located(RecordError("too_long", f"the prompt has {len(ids)} tokens, no room for a completion in the "
                                  f"model's context of {context}"), prompt)
    return ids


def function_names(tools: list | tuple) -> tuple[str, ...]:
    """The names of OpenAI-shaped (``{"function": {"name": ...}}``) or flat (``{"name": ...}``) definitions."""
    return tuple(str((t.get("function") or t)["name"]) for t in tools if isinstance(t, dict)
                 and isinstance(t.get("function") or t, dict) and "name" in (t.get("function") or t))


class PromptSet:
    """The prompts of a ``--prompts`` file, every record validated (and its columns checked) when read; token
    ids once :meth:`attach` has tokenized them with the model's tokenizer."""

    stage = "prompts"

    def __init__(self, path: str | Path) -> None:
        self.folder = Path(path)
        self.prompts: list[Prompt] = read_prompts(path)  # an empty file is refused there
        for prompt in self.prompts:
            check_columns(prompt)
        self.ids: list[list[int]] = []
        self.names: list[tuple[str, ...]] = []  # per prompt: the function names it offers
        self.tokenizer: dict[str, Any] | None = None
        self.seq_len = 0

    @property
    def n_rows(self) -> int:
        return len(self.prompts)

    @property
    def meta(self) -> dict[str, Any]:
        """The tokenizer record (``TrainingData.meta``) once :meth:`attach` ran, else ``{}``."""
        return {} if self.tokenizer is None else {"tokenizer": self.tokenizer}

    def attach(self, tok: TokenizerInfo, max_new_tokens: int, max_positions: int,
               default_tools: list | None = None) -> None:
        """Tokenize every prompt with the chat template (:func:`tokenize`; ``default_tools``: OpenAI function
        definitions offered to the prompts that list none) and record the tokenizer and each prompt's
        offered names; ``seq_len`` = longest prompt + ``max_new_tokens``, at most ``max_positions`` (the
        widest rollout row)."""
        tok.require_chat(f"the prompts of {self.folder}")
        self.ids = [tokenize(p, tok, max_positions, default_tools) for p in self.prompts]
        self.names = [function_names(tools_of(p.turns) or default_tools or ()) for p in self.prompts]
        self.tokenizer = {"fingerprint": tok.fingerprint, "path": str(tok.path), "vocab_size": tok.vocab_size,
                          "special_ids": dict(tok.special_ids)}
        self.seq_len = min(max(len(i) for i in self.ids) + max_new_tokens, max_positions)
