"""The options of how raw records become training rows, shared by ``preprocess/pack.py`` and ``bin/eval``.

One dataclass, one set of defaults, one argparse definition: a held-out set evaluated by ``bin/eval``
is read, rendered, truncated and weighted exactly as ``pack.py`` would pack it for training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from core.numbers import number, positive_int
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

    def problem(self) -> str | None:
        """The first invalid option as a message naming its flag, or None."""
        if self.overlong not in OVERLONG_CHOICES:
            return f"--overlong must be one of {', '.join(OVERLONG_CHOICES)}, not {self.overlong!r}"
        if not 1 <= self.tag_weight <= 255:
            return "--tag-weight must be in 1..255 (it is stored as uint8)"
        if self.max_record_chars < 1:
            return "--max-record-chars must be at least 1"
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
