"""Worker processes of the local runner: a stage function mapped over inputs in spawned processes, results in
input order, memory bounded, surviving a worker that crashes, and dying with a killed parent.

:func:`ordered_map` is the runner's machinery (it knows no stage); :func:`iter_processed` is decode + prepare
of file records through it, for the training code that reads clips outside an index run.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # imported where used: a worker arms its parent watch before heavy imports
    from echosearch.ingest.discover import DiscoverFailure, FileRecord
    from echosearch.ingest.prepare import FramePolicy
    from echosearch.run.read import FailedFile, PreparedVideo

T = TypeVar("T")
R = TypeVar("R")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SHARED: Any = None  # what ordered_map's ``shared`` gave this worker process (sent once, not per input)


def _die_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Exit this worker when ``parent`` (the indexer) dies, even by ``kill -9``.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, then exit at once if the parent is already gone (it may
    have died before the call). Elsewhere (or if prctl fails): a daemon thread polls ``os.getppid()``."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if os.getppid() != parent:
            os._exit(1)
        if armed:
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="echosearch-parent-watch", daemon=True).start()


def _worker_init(parent: int | None = None, shared: Any = None) -> None:
    import cv2

    global _SHARED
    if parent is not None:
        _die_with_parent(parent)
    _SHARED = shared
    cv2.setNumThreads(1)  # one process per core already; avoid oversubscription


def _call(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    return fn(item, _SHARED)


def ordered_map(fn: Callable[[T, Any], R], items: Iterable[T], workers: int, *, shared: Any = None,
                on_crash: Callable[[T], R], prefetch: int = 8) -> Generator[R, None, None]:
    """``fn(item, shared)`` for every item in ``workers`` spawned processes (0 = in this process), yielded in
    input order. ``fn`` must be a module-level function; ``shared`` is sent to each worker once.

    At most ``workers + prefetch`` items are in flight, so memory stays bounded however many come. A worker
    that dies (a codec crash) costs only the item it was on (``on_crash(item)`` stands for its result): the
    pool is restarted and the other in-flight items resubmitted; after three crashes in a row the rest runs
    in this process."""
    if workers <= 0:
        for item in items:
            yield fn(item, shared)
        return
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(os.getpid(), shared))

    limit, crashes, it = workers + max(0, prefetch), 0, iter(items)
    pool = new_pool()
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        while True:
            while len(pending) < limit and (nxt := next(it, None)) is not None:
                pending.append((nxt, pool.submit(_call, fn, nxt)))
            if not pending:
                return
            item, fut = pending.popleft()
            try:
                result, crashes = fut.result(), 0
            except BrokenProcessPool:
                crashes += 1
                pool.shutdown(wait=False, cancel_futures=True)
                if crashes >= 3:  # workers cannot run here at all: finish in this process
                    rest = [r for r, _ in pending]
                    pending.clear()
                    yield from ordered_map(fn, itertools.chain([item], rest, it), 0, shared=shared,
                                           on_crash=on_crash)
                    return
                result = on_crash(item)
                pool = new_pool()
                pending = deque((r, pool.submit(_call, fn, r)) for r, _ in pending)
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _prepare(rec: FileRecord | DiscoverFailure, policy: FramePolicy) -> PreparedVideo | FailedFile:
    from echosearch.ingest.discover import DiscoverFailure
    from echosearch.run.read import FailedFile, safe_process

    if isinstance(rec, DiscoverFailure):
        return FailedFile(rec.path, rec.sha256, rec.stage, rec.reason)
    return safe_process(rec, policy)


def _crashed(rec: FileRecord | DiscoverFailure) -> FailedFile:
    from echosearch.run.read import FailedFile

    return FailedFile(rec.path, rec.sha256, "decode", "decoder process crashed on this file")


def iter_processed(records: Iterable[FileRecord | DiscoverFailure], policy: FramePolicy, workers: int,
                   prefetch: int = 8) -> Iterator[PreparedVideo | FailedFile]:
    """Decode + prepare ``records`` in ``workers`` processes (0 = in this process), in submission order (see
    :func:`ordered_map`); failures come back as :class:`FailedFile`."""
    return ordered_map(_prepare, records, workers, shared=policy, on_crash=_crashed, prefetch=prefetch)
