"""Process-level memory policy of a training run: freed activations go back to the OS.

A training step allocates and frees the same few hundred large activation tensors every step. glibc's
malloc serves a request by ``mmap`` only above its *dynamic* threshold, which rises to the size of
every mmapped block freed (up to 32 MiB), so after the first step a model's large activations come
from the heap, whose freed holes fragment and are kept: later steps peak above the first
(``bench/memory.py`` measures it). Fixing the threshold at 1 MiB
(``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic adjustment off) returns every large
tensor's pages on free, so the peak is the live set. Small allocations are unaffected. Other C
libraries (macOS, musl) keep their default.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of >= ``threshold`` bytes by mmap (glibc only); whether the setting took."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
