"""Ground truth of a tool-use or math prompt (MiniMind's ``gt``) and whether an answer states it.

``values(gt)`` reads a ``gt`` field (a string or finite number, or a non-empty list of them) into the list of
strings to look for, raising :class:`GroundTruthError` (a ``ValueError`` naming the field path) for anything
else; ``found(text, wanted)`` is MiniMind's ``validate_gt_in_text``: a value counts when it appears in the text
(case-insensitive) or, for a number, when a number in the text is within 1e-6 of it. ``bin/eval --tool-eval``
and the RL reward ``tool_answer`` both score with these two functions.
"""

from __future__ import annotations

import json
import math
import re

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
NUMBER_IN_TEXT = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")


class GroundTruthError(ValueError):
    def __init__(self, message: str, field: str):
        self.message, self.field = message, field
        super().__init__(f"{field}: {message}")


def is_number(text: str) -> bool:
    return bool(NUMBER.fullmatch(text.replace(",", "")))


def values(value: object, field: str = "gt") -> list[str]:
    """The strings a ``gt`` field asks for (see the module contract)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise GroundTruthError("expected a non-empty list of strings or numbers", field)
    out = []
    for i, v in enumerate(items):
        finite = not isinstance(v, float) or math.isfinite(v)
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or not finite:
            raise GroundTruthError(f"expected a string or a finite number, got {json.dumps(v)[:40]}",
                                   f"{field}[{i}]" if isinstance(value, list) else field)
        if not str(v).strip():
            raise GroundTruthError("an empty ground truth matches everything", field)
        out.append(str(v).strip())
    return out


def found(text: str, wanted: list[str]) -> set[str]:
    """The values of ``wanted`` that ``text`` states (MiniMind's ``validate_gt_in_text``)."""
    numbers = [float(x) for x in NUMBER_IN_TEXT.findall(text.replace(",", ""))]
    return {g for g in wanted if g.lower() in text.lower()
            or (is_number(g) and any(abs(float(g.replace(",", "")) - n) < 1e-6 for n in numbers))}
