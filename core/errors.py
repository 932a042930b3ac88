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

    def with_hint(self, hint: str) -> TinyLMError:
        """This same error (type and location kept, nothing re-wrapped) with ``; hint`` -- what the user can
        do about it -- appended to its message; returns it, for ``raise e.with_hint(...)``."""
        self.message = f"{self.message}; {hint}"
        self.args = (self.message,)
        return self

    def __reduce__(self) -> tuple:
        """Pickle by state, so that every subclass crosses to and from worker processes whatever its
        ``__init__`` takes."""
        return _restore, (type(self), self.__dict__)


def _restore(cls: type[TinyLMError], state: dict) -> TinyLMError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


def say_line(text: str) -> None:
    """``text`` and its newline to stderr in ONE write: processes sharing the stream (DDP ranks printing the
    same error at once) cannot interleave inside a line (``print`` writes the text and the newline
    separately, which an unbuffered stderr passes on as two writes)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_main(tool: str, main: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a tool's body: a TinyLMError is printed as one ``tool: error:`` line (exit 1); Ctrl-C prints
    ``tool: <interrupted>`` (say what to do next, e.g. how to resume) and exits 130."""
    try:
        return main() or 0
    except TinyLMError as e:
        say_line(f"{tool}: error: {e}")
        return 1
    except KeyboardInterrupt:
        say_line(f"{tool}: {interrupted}")
        return 130
