"""Floating-point precisions as users type them: one vocabulary for every dtype flag.

The names are torch's: ``float32``, ``bfloat16``, ``float16``. The short spellings ``fp32``/``f32``,
``bf16``, ``fp16``/``f16`` are aliases that every flag accepts too, so older command lines keep working;
a parsed value is always the full name. A flag may add words of its own (``auto``, a quantisation such as
``q8_0``); those are taken as written. Unknown text is an argparse error naming the flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

NAMES = ("float32", "bfloat16", "float16")
ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}
SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # the file formats' own names (GGUF, export)


def canonical(text: str) -> str | None:
    """The full name of ``text`` (a name or an alias, any case), or None when it names no precision."""
    key = text.strip().lower()
    return key if key in NAMES else ALIASES.get(key)


def dtype_flag(*allowed: str, extra: tuple[str, ...] = (), returns: dict[str, str] | None = None
               ) -> Callable[[str], str]:
    """An argparse ``type=`` accepting ``allowed`` (full names, default: all) by any spelling, plus the
    flag's own ``extra`` words; returns the full name (or ``returns[full name]``, e.g. :data:`SHORT` for a
    consumer that keys by the short names)."""
    names = allowed or NAMES
    spelled = [a for a, full in ALIASES.items() if full in names]

    def parse(text: str) -> str:
        if text in extra:
            return text
        name = canonical(text)
        if name is None or name not in names:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join((*extra, *names))} (or {', '.join(spelled)}),"
                                             f" got {text!r}")
        return returns[name] if returns is not None else name

    parse.__name__ = "dtype"
    return parse


def metavar(*allowed: str, extra: tuple[str, ...] = ()) -> str:
    """``{auto,float32,...}``: the choices as argparse would show them."""
    return "{" + ",".join((*extra, *(allowed or NAMES))) + "}"
