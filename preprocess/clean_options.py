"""The options of one clean.py run, their defaults and checks (each message names its flag)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import TinyLMError
from core.numbers import check_number
from preprocess.records import DEFAULT_MAX_RECORD_CHARS, STAGES

DEDUP_CHOICES = ("none", "exact", "near")
LANG_CHOICES = ("any", "zh", "en")


class CleanError(TinyLMError):
    """A fatal, user-facing problem of clean.py: one line, exit status 1."""


@dataclass(frozen=True)
class CleanOptions:
    """Everything one clean run needs (``preprocess/clean.py --help`` gives each flag's meaning)."""

    stage: str
    inputs: list[str]
    out: Path
    report: Path | None = None
    # duplicates
    dedup: str = "near"
    dedup_key: str = "conversation"
    near_threshold: float = 0.8
    # length, language
    min_chars: int = 0
    max_chars: int = 0  # 0: no limit
    min_turn_chars: int = 0
    max_turn_chars: int = 0
    min_cjk_ratio: float = 0.0
    lang: str = "any"
    # noise: shares of the text
    max_symbol_ratio: float = 0.3
    max_digit_ratio: float = 0.5
    max_url_ratio: float = 0.3
    # noise: repetition, and characters refused unless allowed
    max_char_run: int = 40
    max_dup_line_ratio: float = 0.5
    allow_control: bool = False
    allow_mojibake: bool = False
    # the user's own filters, held-out files
    filters: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    # output: placeholders, source field, order and size
    placeholders: dict[str, str] = field(default_factory=dict)
    source_field: bool = True
    shuffle: bool = False
    seed: int = 0
    target_mb: float = 0.0
    # reading and running
    skip_bad: bool = False
    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS
    workers: int = 0  # 0: every usable core
    quiet: bool = False

    def problem(self) -> str | None:
        """The first invalid option as a message naming its flag, or None."""
        checks = [
            (self.stage in STAGES, f"--stage must be one of {', '.join(STAGES)}"),
            (self.dedup in DEDUP_CHOICES, f"--dedup must be one of {', '.join(DEDUP_CHOICES)}"),
            (self.dedup_key in ("conversation", "first-user"), "--dedup-key must be conversation or first-user"),
            (self.dedup_key == "conversation" or self.stage in ("sft", "reason", "dpo"),
             "--dedup-key first-user applies to the chat stages (sft, reason, dpo)"),
            (check_number(self.near_threshold, float, 0, 1, low_open=True) is None,
             "--near-dup-threshold must be in (0, 1]"),
            (min(self.min_chars, self.max_chars, self.min_turn_chars, self.max_turn_chars) >= 0,
             "--min-chars / --max-chars / --min-turn-chars / --max-turn-chars must be >= 0"),
            (not self.max_chars or self.min_chars <= self.max_chars, "--min-chars must not exceed --max-chars"),
            (check_number(self.min_cjk_ratio, float, 0, 1) is None, "--min-cjk-ratio must be in [0, 1]"),
            (self.lang in LANG_CHOICES, f"--lang must be one of {', '.join(LANG_CHOICES)}"),
            (all(check_number(r, float, 0, 1) is None for r in (
                self.max_symbol_ratio, self.max_digit_ratio, self.max_url_ratio, self.max_dup_line_ratio)),
             "--max-symbol-ratio / --max-digit-ratio / --max-url-ratio / --max-dup-line-ratio must be in [0, 1]"),
            (self.max_char_run >= 0, "--max-char-run must be >= 0 (0: off)"),
            (check_number(self.target_mb, float, low=0) is None, "--target-mb must be a finite number >= 0"),
            (self.max_record_chars >= 1, "--max-record-chars must be at least 1"),
            (self.workers >= 0, "--workers must be at least 1"),
        ]
        return next((message for ok, message in checks if not ok), None)
