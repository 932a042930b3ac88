"""Ordered, bounded fan-out of batches to worker processes, and how batches are cut; shared by pack and clean.

Workers die with the process that started them (:func:`core.procs.die_with_parent`) and hold none of its
folder locks (``core.files`` closes them in a forked child), so a killed pack leaves nothing running and
nothing locked.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from core.errors import TinyLMError
from core.procs import die_with_parent
from preprocess.sources import Item

TAIL_RECORDS = 8  # the fewest records of a batch near the end (see chunks)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def chunks(items: Iterator[Item], records: int, size: float = float("inf"), expected: int | None = None,
           parts: int = 1) -> Iterator[list[Item]]:
    """``items`` in consecutive batches of at most ``records`` items, each closed as soon as its JSONL
    lines hold ``size`` bytes or more (Parquet rows count by number only; no ``size``: by number only).

    Tokenizing costs about the same per byte, so batches of equal bytes take the workers equally long: a
    run of long records (the first lines of a mix, say) is not one batch that keeps the in-order consumer,
    and with it every other worker, waiting. With ``expected`` (how many items there will be) a batch also
    holds at most ``1/parts`` of the items still to come (and at least TAIL_RECORDS): the last batches
    shrink, so the workers finish within a few records of each other instead of all but one idling while
    it encodes a whole batch. The output does not depend on where batches end."""
    def limit(left: int | None) -> int:
        return records if left is None else max(min(records, left // parts), TAIL_RECORDS)
    batch: list[Item] = []
    held = 0
    left, most = expected, limit(expected)
    for item in items:
        batch.append(item)
        if isinstance(item.payload, bytes):
            held += len(item.payload)
        if held >= size or len(batch) >= most:
            yield batch
            if left is not None:
                left -= len(batch)
                most = limit(left)
            batch, held = [], 0
    if batch:
        yield batch


def _start_worker(parent: int, initializer: Callable, initargs: tuple) -> None:
    die_with_parent(parent)
    initializer(*initargs)


def pool_map(fn: Callable[[list], object], batches: Iterator[list], workers: int, initializer: Callable,
             initargs: tuple, died: Callable[[object], TinyLMError]) -> Iterator:
    """``fn(batch)`` for every batch, in input order, computed by ``workers`` processes.

    At most ``2 x workers`` batches are in flight, so memory stays bounded; a worker that dies (killed,
    out of memory) raises ``died(first item of the batch it held)``, never a hang (``concurrent.futures``
    notices a dead worker, ``multiprocessing.Pool`` would wait for its lost task forever).

    The pool is shut down, and its manager thread joined, before this generator finishes, however it
    finishes: callers close it deterministically (``contextlib.closing``) when they stop early. A pool left
    shutting down while the interpreter exits races CPython's exit hook, which writes to the manager's
    wake-up pipe without its lock while the manager closes it (``OSError: [Errno 9]`` printed at exit)."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(), initializer=_start_worker,
                               initargs=(os.getpid(), initializer, initargs))
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
    finally:  # stopped early: the queued batches are cancelled, the running ones (a few) finish
        pool.shutdown(wait=True, cancel_futures=True)
