"""MiniMind's two SFT augmentations as explicit, seeded options, and a record's chat documents with them.

- ``add_system_prompt`` = p: a conversation with no system turn and no tools gets a system turn, with
  probability p, whose text is drawn uniformly from :data:`SYSTEM_PROMPTS` (MiniMind: p = 0.2; tool
  conversations are left whole). Only for sft / reason records, as MiniMind does (not for DPO pairs).
- ``drop_empty_think`` = p: with probability p, every empty think block ``<think>\\n\\n</think>\\n\\n`` of the
  conversation is left out (MiniMind: p = 0.8, one draw per conversation). For a DPO pair one draw covers
  both documents, so chosen and rejected share one format. Families that render no empty blocks (tinylm,
  MiniMind2) are unchanged by it.

Every draw comes from ``random.Random`` seeded with (seed, the record's file name, its line), so a record gets
the same choices whatever the worker count or chunking, and a re-run with the same seed packs the same bytes.
Both are off (0) unless asked; the values are recorded in meta.json.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from core.chat_template import Piece
from core.tokenizer import TokenizerInfo, chat_pieces

# The system prompts MiniMind draws from (jingyaogong/minimind, dataset/lm_dataset.py, pre_processing_chat).
SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)


@dataclass(frozen=True)
class Choice:
    """What the augmentations do to one record: the system prompt to add (None: none), whether to drop
    empty think blocks."""

    system_prompt: str | None = None
    drop_empty_think: bool = False


NO_CHOICE = Choice()


@dataclass(frozen=True)
class Augment:
    """The augmentation options (probabilities in [0, 1], a seed)."""

    drop_empty_think: float = 0.0
    add_system_prompt: float = 0.0
    seed: int = 0

    @property
    def active(self) -> bool:
        return self.drop_empty_think > 0 or self.add_system_prompt > 0

    def choose(self, source: str, line: int) -> Choice:
        """The choices for the record at ``line`` of ``source`` (deterministic for a seed, the file's name and
        the line)."""
        if not self.active:
            return NO_CHOICE
        # a str seed is hashed with sha512, so the draws are the same in every process
        rng = random.Random(f"{self.seed}\0{record_key(source, line)}")
        prompt = rng.choice(SYSTEM_PROMPTS) if rng.random() < self.add_system_prompt else None
        return Choice(prompt, rng.random() < self.drop_empty_think)

    def record(self) -> dict:
        return {"drop_empty_think": self.drop_empty_think, "add_system_prompt": self.add_system_prompt,
                "seed": self.seed}


def record_key(source: str, line: int) -> str:
    """A record's name for the draws: its file's name (not the path, so a moved file packs the same) and line."""
    return f"{Path(source).name}:{line}"


def with_system_prompt(turns: list[dict], prompt: str | None) -> list[dict]:
    """``turns`` with a leading system turn holding ``prompt``, unless ``prompt`` is None, the conversation has
    a system turn already or any turn carries tools."""
    if prompt is None or (turns and turns[0]["role"] == "system") or any(t.get("tools") for t in turns):
        return turns
    return [{"role": "system", "content": prompt}, *turns]


def chat_documents(tok: TokenizerInfo, record: object, stage: str, choice: Choice) -> list[list[Piece]]:
    """The documents of one chat record: a DPO pair (``.chosen`` / ``.rejected``) as two documents supervised
    on their final answer, any other conversation as one document supervised on every assistant turn."""
    if stage == "dpo":
        return [chat_pieces(tok, turns, "last", drop_empty_think=choice.drop_empty_think)
                for turns in (record.chosen, record.rejected)]  # type: ignore[attr-defined]
    turns = with_system_prompt(record, choice.system_prompt)  # type: ignore[arg-type]
    return [chat_pieces(tok, turns, "all", drop_empty_think=choice.drop_empty_think)]
