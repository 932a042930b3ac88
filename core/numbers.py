"""Numbers a user types: parsed strictly, checked for finiteness and range, refused in one line.

Every numeric command-line option of every tool is parsed by :func:`number` (an argparse ``type=``) or
checked by :func:`check_number` (for values that arrive some other way: ``FILE@WEIGHT``, a JSON body).
The contract:

- ``nan``, ``inf`` and ``-inf`` are never accepted, whatever the range (a comparison with NaN is always
  false, so a range check alone lets it through);
- integers are written in decimal digits with an optional sign; a float is anything ``float()`` reads that
  is finite; text longer than :data:`MAX_CHARS` is refused before it is converted (a 5,000-digit count);
- ``low``/``high`` bound the value, inclusive unless ``low_open``/``high_open``;
- the message names the value's expected form and the text given; argparse prefixes the flag.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

MAX_CHARS = 64
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def _describe(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    what = "an integer" if kind is int else "a finite number"
    bounds = _bounds(low, high, low_open, high_open)
    return f"{what} {bounds}" if bounds else what


def check_number(value: float | int, kind: type = float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> str | None:
    """What is wrong with ``value`` (not finite, wrong kind, out of range) as ``"must be …, got …"``, or None."""
    describe = _describe(kind, low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"must be {describe}, got {value!r}"
    if kind is int and not isinstance(value, int):
        return f"must be {describe}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be {describe}, got {value!r}"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        return f"must be {describe}, got {value!r}"
    return None


def parse_number(text: str, kind: type = float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float | int:
    """``text`` as a checked ``kind`` (int or float); ValueError with a ``must be …`` message otherwise."""
    describe = _describe(kind, low, high, low_open, high_open)
    shown = text if len(text) <= MAX_CHARS else text[:20] + f"… ({len(text)} characters)"
    stripped = text.strip()
    if len(stripped) > MAX_CHARS:
        raise ValueError(f"must be {describe}, got {shown!r}")
    try:
        if kind is int:
            if not _INTEGER.fullmatch(stripped):
                raise ValueError
            value: float | int = int(stripped)
        else:
            value = float(stripped)
    except (ValueError, OverflowError):
        raise ValueError(f"must be {describe}, got {shown!r}") from None
    problem = check_number(value, kind, low, high, low_open, high_open)
    if problem:
        raise ValueError(f"must be {describe}, got {shown!r}")
    return value


def number(kind: type = float, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type=`` that parses with :func:`parse_number`; argparse names the flag in its error
    (``tool: error: argument --lr: must be a finite number > 0, got 'nan'``)."""

    def parse(text: str) -> float | int:
        try:
            return parse_number(text, kind, low, high, low_open, high_open)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "integer" if kind is int else "number"  # argparse shows it for errors it makes itself
    return parse


positive_int = number(int, low=1)
non_negative_int = number(int, low=0)
positive_float = number(float, low=0, low_open=True)
non_negative_float = number(float, low=0)
probability = number(float, low=0, high=1)
seed = number(int, low=0, high=2**32 - 1)  # numpy and torch both accept this range
