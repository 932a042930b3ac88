"""Ordered, bounded fan-out of batches to worker processes, shared by pack.py and clean.py."""

from __future__ import annotations

import itertools
import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from core.errors import TinyLMError


def pool_map(fn: Callable[[list], object], batches: Iterator[list], workers: int, initializer: Callable,
             initargs: tuple, died: Callable[[object], TinyLMError]) -> Iterator:
    """``fn(batch)`` for every batch, in input order, computed by ``workers`` processes.

    At most ``2 x workers`` batches are in flight, so memory stays bounded; a worker that dies (killed,
    out of memory) raises ``died(first item of the batch it held)``, never a hang (``concurrent.futures``
    notices a dead worker, ``multiprocessing.Pool`` would wait for its lost task forever)."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(), initializer=initializer, initargs=initargs)
    try:
        in_flight: deque[tuple[object, Future]] = deque()
        for batch in itertools.chain(batches, [None]):
            if batch is not None:
                in_flight.append((batch[0], pool.submit(fn, batch)))
            while in_flight and (batch is None or len(in_flight) >= 2 * workers):
                first, future = in_flight.popleft()
                try:
                    yield future.result()
                except BrokenProcessPool:
                    raise died(first) from None
    finally:  # not waiting: the workers exit while the caller writes its output (interpreter exit joins them)
        pool.shutdown(wait=False, cancel_futures=True)
