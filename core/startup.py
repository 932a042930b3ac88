"""Start-up tweaks for tools run as scripts.

:func:`freeze_startup_objects` moves the objects that exist when it is called (the imported modules,
which live until exit) out of the garbage collector's reach (``gc.freeze``): collections stop re-scanning
them, a forked worker does not copy their pages when a collection would touch them, and interpreter exit
does not walk them. A tool whose fixed cost matters (pack.py, clean.py, train_tokenizer.py start worker
processes) calls it once, after its imports and before its work: ``bench/bench_pack.py`` measures the
whole start-up.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Freeze what exists now, once per process: a frozen object is never collected, so a second call
    (a test session that runs tools in-process) freezes nothing more and later garbage stays collectable."""
    if not gc.get_freeze_count():
        gc.freeze()
