"""Child processes that never outlive their parent.

A worker whose parent is killed (``kill -9``, the OOM killer) would otherwise run on, orphaned, holding
memory and whatever its parent had open. :func:`die_with_parent` is called first thing in a child: on
Linux it asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to kill the child when its parent dies; then it
checks that the parent is still the one expected (it may have died before the request took effect) and
exits at once if not. Where ``prctl`` is unavailable, a daemon thread polls the parent pid instead.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0


def _request_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(POLL_SECONDS)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Make this (child) process end when its parent does. ``parent``: the pid the caller expects as parent
    (recorded before the child started); when the parent is already another, the child exits now.

    The kernel's death signal follows the parent *thread* that started the child, so the parent must start
    its children from a thread that lives as long as they should (the main thread, or the pool's caller)."""
    armed = _request_death_signal(sig)
    expected = os.getppid() if parent is None else parent
    if os.getppid() != expected:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(expected,), daemon=True, name="die-with-parent").start()
