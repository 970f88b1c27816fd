"""Background indexing of stored instances: the receiver acknowledges first, this thread indexes after.

Arrivals are batched (a study's clips come within a second or two of each other, and each indexing run
ends by rebuilding the vector indexes), then handed to an *index function*: by default
:class:`CatalogIndexer`, which runs the local runner (:func:`echosearch.run.local.index_sources`) on the new files
with an encoder loaded once. A server that owns the catalog passes its own function instead (for example
one that submits an ingest job). A failing run (the catalog held by another process, a model that does not
load) leaves the instances pending and is retried; nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from echosearch.config import Settings
from echosearch.errors import CatalogError
from echosearch.intake.store import IntakeStore, Stored

log = logging.getLogger(__name__)

IndexFn = Callable[[list[Path]], Any]
INLINE_DECODE_MAX = 12  # batches up to this many files are decoded in the indexing thread itself


class CatalogIndexer:
    """Index files through the local runner (read, encode, write, pool, vector indexes) into ``index_dir``,
    keeping one encoder across runs. ``warm()`` loads it ahead of the first study."""

    def __init__(self, index_dir: Path | str, settings: Settings, *, progress: bool = False) -> None:
        self.index_dir, self.settings, self.progress = Path(index_dir), settings, progress
        self._encoder: Any = None
        self._lock = threading.Lock()

    def warm(self) -> None:
        with self._lock:
            if self._encoder is None:
                from echosearch.run.setup import load_run_encoder

                self._encoder = load_run_encoder(self.settings)

    def __call__(self, paths: list[Path]) -> Any:
        from echosearch.run.local import index_sources

        self.warm()
        settings = self.settings
        if len(paths) <= INLINE_DECODE_MAX and settings.workers:  # a study: spawning decoders costs more than it saves
            settings = settings.model_copy(update={"workers": 0})
        return index_sources(paths, self.index_dir, settings, encoder=self._encoder, progress=self.progress)


class BackgroundIndexer(threading.Thread):
    """A daemon thread that indexes what the store holds and has not indexed yet, batch by batch."""

    def __init__(self, store: IntakeStore, index_fn: IndexFn, *, settle_s: float = 0.5, max_wait_s: float = 5.0,
                 retry_s: float = 1.0, batch_max: int = 64) -> None:
        super().__init__(name="echosearch-intake-indexer", daemon=True)
        self.store, self.index_fn = store, index_fn
        self.settle_s, self.max_wait_s, self.retry_s, self.batch_max = settle_s, max_wait_s, retry_s, batch_max
        self._wake = threading.Event()
        self._stop_flag = threading.Event()
        self._cond = threading.Condition()
        self._busy = False
        self._last_arrival = 0.0
        self.runs = 0
        self.indexed = 0
        self.last_error: str | None = None

    def notify(self) -> None:
        """A new instance was stored: index it after the arrivals settle."""
        self._last_arrival = time.monotonic()
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the batch in progress (pending instances stay journaled for the next start)."""
        self._stop_flag.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def idle(self) -> bool:
        with self._cond:
            return not self._busy and not self.store.pending()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending or running (True), or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self.store.pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def run(self) -> None:
        delay: float | None = 0.0  # first pass at once: instances left pending by an earlier process
        while not self._stop_flag.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop_flag.is_set():
                break
            self._settle()
            delay = None if self._index_once() else self.retry_s

    def _settle(self) -> None:
        start = time.monotonic()
        while not self._stop_flag.is_set():
            quiet = time.monotonic() - self._last_arrival
            if quiet >= self.settle_s or time.monotonic() - start >= self.max_wait_s:
                return
            time.sleep(min(self.settle_s - quiet, 0.1) + 0.01)

    def _index_once(self) -> bool:
        """Index pending instances batch by batch; False when a run failed (retried later)."""
        while not self._stop_flag.is_set():
            with self._cond:
                batch: list[Stored] = self.store.pending()[: self.batch_max]
                if not batch:
                    self._cond.notify_all()
                    return True
                self._busy = True
            t0 = time.perf_counter()
            try:
                result = self.index_fn([self.store.path_of(e) for e in batch])
                self.store.mark_indexed(batch)
            except Exception as exc:  # noqa: BLE001 - the instances stay pending; the next pass retries them
                self.last_error = f"{type(exc).__name__}: {exc}"
                busy = isinstance(exc, CatalogError) and "another process" in str(exc)  # a reader: soon gone
                if busy:
                    log.info("indexing %d received instance(s) waits for the catalog (a reader holds it)", len(batch))
                else:
                    log.warning("indexing %d received instance(s) failed (%s), retrying in %.0f s", len(batch),
                                type(exc).__name__, self.retry_s)  # its message may name files: not logged
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                return False
            self.runs += 1
            self.indexed += len(batch)
            self.last_error = None
            log.info("indexed %d received instance(s) in %.1f s%s", len(batch), time.perf_counter() - t0,
                     _describe(result))
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return True


def _describe(result: Any) -> str:
    """Counts of an ``IndexSummary`` for the log line (no file names: they carry UIDs)."""
    scan = getattr(result, "scan", None)
    if not isinstance(scan, dict):
        return ""
    return (f": {scan.get('videos_added', 0)} new video(s), {getattr(result, 'failed', 0)} failed, "
            f"{scan.get('skipped_known', 0)} already indexed")
