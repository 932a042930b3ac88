"""One error type for everything a user can get wrong.

Every user-facing problem (a bad input record, a corrupt shard, a checkpoint that is not one, a full
disk) is a :class:`TinyLMError` or a subclass. Its text is one line that names what it is about
(file, line, field); each tool's ``main`` catches this one type, prints ``tool: error: <text>`` and
exits 1. Anything else escaping is a bug in tinylm, not in the user's input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class TinyLMError(Exception):
    """A one-line user error. ``path``/``line``/``field`` say what it is about; they prefix the message
    when given (``path:line: field 'f': message``), so callers need not format locations themselves."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None, field: str | None = None):
        self.message, self.path, self.line, self.field = message, path, line, field
        super().__init__(message)

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}:" if self.line else f"{self.path}:"
        field = f" field '{self.field}':" if self.field else ""
        text = f"{where}{field} {self.message}" if where or field else self.message
        return " ".join(text.split("\n")).strip()


def run_main(tool: str, main: Callable[[], int | None]) -> int:
    """Run a tool's body: a TinyLMError is printed as one ``tool: error:`` line (exit 1), Ctrl-C exits 130."""
    try:
        return main() or 0
    except TinyLMError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        return 130
