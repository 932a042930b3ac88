"""The options of how raw records become training rows, shared by ``preprocess/pack.py`` and ``bin/eval``.

One dataclass, one set of defaults, one argparse definition: a held-out set evaluated by ``bin/eval``
is read, rendered, truncated and weighted exactly as ``pack.py`` would pack it for training. The chat
format (``--chat-template``, see ``core.chat_families``) and MiniMind's augmentations (``preprocess.augment``)
are part of it, and :meth:`RecordOptions.chat_meta` is what meta.json records of them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from core.chat_families import FAMILY_NAMES
from core.numbers import number, positive_int
from core.tokenizer import TokenizerInfo
from preprocess.augment import Augment
from preprocess.records import DEFAULT_MAX_RECORD_CHARS

OVERLONG_CHOICES = ("truncate", "drop")


@dataclass(frozen=True)
class RecordOptions:
    """How records are read and rendered (every field changes the packed bytes, except ``skip_bad``'s
    effect on a clean input)."""

    overlong: str = "truncate"  # sft / reason / dpo units longer than seq_len: "truncate" or "drop"
    skip_bad: bool = False  # count and skip bad records instead of stopping at the first
    tag_weight: int = 10  # reason: loss weight of <think> </think> <answer> </answer>
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS  # larger records are bad ("too_long")
    parse_special: bool = False  # pretrain text: special-token strings become control ids (see pack.py)
    chat_template: str | None = None  # the chat family to render with (None: the tokenizer's template decides)
    drop_empty_think: float = 0.0  # probability of leaving out a conversation's empty think blocks
    add_system_prompt: float = 0.0  # probability of adding a system prompt to a conversation without one
    augment_seed: int = 0  # the seed of both augmentations
    hold_out_every: int = 0  # the records on line k * N of every source are the held-out slice (0: none)
    held_out_only: bool = False  # False: pack everything but the held-out slice (pack.py); True: only it (bin/eval)

    @property
    def augment(self) -> Augment:
        return Augment(self.drop_empty_think, self.add_system_prompt, self.augment_seed)

    def chat_meta(self, tok: TokenizerInfo, stage: str) -> dict | None:
        """What meta.json records of the chat format (None for pretrain, which renders no chats): the family,
        the sha256 of the tokenizer's template, whether it was declared, and the augmentations."""
        if stage == "pretrain":
            return None
        return {**tok.chat.record(), "augment": self.augment.record()}

    def problem(self) -> str | None:
        """The first invalid option as a message naming its flag, or None."""
        if self.overlong not in OVERLONG_CHOICES:
            return f"--overlong must be one of {', '.join(OVERLONG_CHOICES)}, not {self.overlong!r}"
        if not 1 <= self.tag_weight <= 255:
            return "--tag-weight must be in 1..255 (it is stored as uint8)"
        if self.max_record_chars < 1:
            return "--max-record-chars must be at least 1"
        if self.chat_template is not None and self.chat_template not in FAMILY_NAMES:
            return f"--chat-template must be one of {', '.join(FAMILY_NAMES)}, not {self.chat_template!r}"
        for flag, p in (("--drop-empty-think", self.drop_empty_think), ("--add-system-prompt", self.add_system_prompt)):
            if not 0.0 <= p <= 1.0:  # NaN fails this too
                return f"{flag} must be a probability in 0..1, not {p!r}"
        if self.augment_seed < 0:
            return "--augment-seed must be at least 0"
        if self.hold_out_every < 0 or self.hold_out_every == 1:
            return "--hold-out-every must be 0 (none) or at least 2"
        if self.held_out_only and not self.hold_out_every:
            return "the held-out slice needs --hold-out-every N"
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RecordOptions:
        """The options from a namespace filled by :func:`add_record_arguments` (missing ones: defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def add_record_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags of :class:`RecordOptions`, with its defaults."""
    d = RecordOptions()
    parser.add_argument("--overlong", choices=OVERLONG_CHOICES, default=d.overlong,
                        help="sft/reason/dpo records longer than --seq-len: truncate (default; a dpo pair loses "
                             "prompt tokens from the left, never answer tokens) or drop; counted either way")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip malformed records, counted per reason, instead of stopping at the first one")
    parser.add_argument("--tag-weight", type=number(int, low=1, high=255), default=d.tag_weight,
                        help="reason stage: loss weight of <think> </think> <answer> </answer> "
                             f"(default {d.tag_weight})")
    parser.add_argument("--max-record-chars", type=positive_int, default=d.max_record_chars,
                        help="a record with more content characters is a bad record (too_long), refused before "
                             f"tokenizing so memory stays bounded (default {d.max_record_chars:,})")
    parser.add_argument("--parse-special", action="store_true",
                        help="pretrain: encode special-token strings in the text (e.g. <|im_start|>) as control "
                             "tokens, for corpora that embed them on purpose (default: they are plain text)")
    parser.add_argument("--chat-template", choices=FAMILY_NAMES, default=d.chat_template, metavar="FAMILY",
                        help="render chats as this template family renders them (one of "
                             f"{', '.join(FAMILY_NAMES)}); default: the tokenizer's own template decides (none: "
                             "tinylm's), and a template of no known family is refused unless this is given")
    parser.add_argument("--drop-empty-think", type=number(float, 0, 1), default=d.drop_empty_think, metavar="P",
                        help="with probability P leave out a conversation's empty think blocks (MiniMind's "
                             "recipe: 0.8; default 0, off)")
    parser.add_argument("--add-system-prompt", type=number(float, 0, 1), default=d.add_system_prompt, metavar="P",
                        help="with probability P give a conversation without a system turn or tools one of "
                             "MiniMind's system prompts (MiniMind's recipe: 0.2; default 0, off)")
    parser.add_argument("--augment-seed", type=number(int, 0), default=d.augment_seed, metavar="N",
                        help="seed of --drop-empty-think and --add-system-prompt: the same seed packs the same "
                             f"bytes (default {d.augment_seed})")
    parser.add_argument("--hold-out-every", type=number(int, 0), default=d.hold_out_every, metavar="N",
                        help="the record on every N-th line of each source is the held-out slice: pack.py leaves it "
                             "out (counted as dropped: held_out), bin/eval --data evaluates only it; no second copy of "
                             "the data is made (default 0: none)")
