"""Host work split over threads: NumPy copies and ufuncs on large arrays release the GIL.

Used by the streaming executor for the host-side gather of chunks and the
merge of partial states; `drain` consumes what a producer thread queues (the
streaming and out-of-core pipelines). Both are elementwise per chunk, so how the chunks
are split between threads never changes a bit of the result.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Callable

# Threads for host work; the streaming executor's own two threads (producer and
# main loop) come on top.
MAX_THREADS = 8


def _workers() -> int:
    return max(1, min(MAX_THREADS, (os.cpu_count() or 2) - 1))


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="stream-cqsa-host")


def for_ranges(count: int, work: Callable[[int, int], None], min_items: int = 1) -> None:
    """Calls ``work(lo, hi)`` over a partition of ``range(count)`` into contiguous ranges of at
    least `min_items` items, on the host thread pool; returns when all are done (re-raising
    the first error)."""
    parts = max(1, min(_workers(), count // max(1, min_items)))
    if parts == 1:
        work(0, count)
        return
    bounds = [count * i // parts for i in range(parts + 1)]
    futures = [_pool().submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    for future in futures:
        future.result()


def drain(feed):
    """Yields the items a producer thread puts in queue `feed` until it puts None; an exception
    it puts instead is raised here, in the consuming thread."""
    while True:
        item = feed.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            return
        yield item
