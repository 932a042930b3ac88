"""Command-line values of the serving tools (bin/chat, bin/serve) that are not numbers (those are
``core/numbers.py``'s): the torch device, and text that must be valid UTF-8.

Contract: ``--device auto`` (the default) resolves to ``cuda`` when torch sees a usable GPU, else ``cpu``;
any other name (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is passed on as given, and the loader refuses an
unusable one in one line. Text typed by a user (an argument, a line on stdin) whose bytes are not UTF-8
reaches Python as lone surrogates (``surrogateescape``), which the tokenizer, JSON and HTTP refuse:
:func:`text_problem` names the first bad byte, and :func:`utf8_text` is the argparse ``type=`` that refuses
it in one line. torch is imported only when ``auto`` is resolved, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

AUTO = "auto"
DEVICE_HELP = "auto (default: cuda when a GPU is available, else cpu), cpu, cuda, cuda:1, ..."


def resolve_device(name: str) -> str:
    """The device ``name`` stands for (``auto`` resolved, anything else unchanged)."""
    if name != AUTO:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def text_problem(text: str) -> str | None:
    """Why ``text`` is not valid UTF-8 text (its first lone surrogate, shown as the byte it escapes), or None."""
    bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if bad is None:
        return None
    code = ord(text[bad])
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
    return f"is not valid UTF-8 text ({what} at character {bad + 1})"


def utf8_text(text: str) -> str:
    """argparse ``type=``: ``text`` unchanged when it is valid UTF-8 text (argparse names the flag otherwise)."""
    problem = text_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def non_empty_utf8_text(text: str) -> str:
    """:func:`utf8_text` that also refuses the empty string."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return utf8_text(text)
