"""Vector indexes that follow a catalog being written: what the server searches while ingest jobs commit.

The FAISS files on disk are rebuilt at the end of an ingest job; between its batches the catalog's
generation moves on and :func:`echosearch.store.vectorindex.load_index` would refuse them as stale. A
:class:`LiveIndexes` therefore keeps a *snapshot* per catalog generation: each level's index loaded from
disk when it is current, else an exact index built in memory from the catalog's vectors. A query that
finds the generation moved rebuilds the snapshot (unless another thread is rebuilding it, then it uses the
previous one), so each committed batch becomes searchable at the next query. Rebuilds are spaced by a
multiple of their own cost so that a large catalog under ingest does not spend its CPU on them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echosearch.catalog import Catalog
from echosearch.errors import EchosearchError, QueryError
from echosearch.query import Searcher
from echosearch.store.vectorindex import (
    LEVELS,
    VectorIndex,
    catalog_count,
    factory_string,
    faiss,
    load_index,
    normalise,
    read_manifest,
)

log = logging.getLogger(__name__)

REBUILD_COST_FACTOR = 10.0
"""A snapshot is rebuilt at most once per this many times its last build time (e.g. 50 ms -> every 0.5 s)."""


def exact_index(level: str, ids: np.ndarray, vecs: np.ndarray) -> VectorIndex:
    """An exact in-memory index over (catalog keys in ascending order, vectors): no tuning, no timing."""
    x = normalise(vecs) if len(vecs) else np.zeros((0, vecs.shape[1]), np.float32)
    desc = factory_string("flat", len(x))
    index = faiss.index_factory(x.shape[1], desc, faiss.METRIC_INNER_PRODUCT)
    if len(x):
        index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
    return VectorIndex(level, index, {"level": level, "kind": "flat", "index_type": desc, "dim": x.shape[1],
                                      "ntotal": len(x), "params": {}, "live": True})


class LiveSearcher(Searcher):
    """A :class:`Searcher` over one snapshot's indexes (never reloads them, never refuses them as stale)."""

    def __init__(self, index_dir: Any, catalog: Catalog, indexes: dict[str, VectorIndex],
                 encoder: Callable[[], Any]) -> None:
        super().__init__(index_dir, catalog=catalog)
        self._indexes = dict(indexes)
        self._encoder_fn = encoder

    def index(self, level: str) -> VectorIndex:
        if level not in LEVELS:
            raise QueryError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
        vi = self._indexes[level]
        if vi.ntotal == 0 and level != "study":  # no study vectors yet (pooled at the end of a job): clips alone
            raise QueryError(f"index {self.index_dir} has no {level} embeddings yet: run `echosearch index` "
                             "first, or wait for the running ingest job")
        return vi

    def encoder(self) -> Any:
        return self._encoder_fn()


@dataclass
class Snapshot:
    """The vector indexes of one catalog generation, with a searcher over them (calls serialised by ``lock``)."""

    generation: int
    searcher: LiveSearcher
    built_in_memory: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)


class LiveIndexes:
    """Snapshots of ``root``'s vector indexes, renewed as its generation moves (thread-safe)."""

    def __init__(self, root: Catalog, encoder: Callable[[], Any]) -> None:
        self.root = root
        self.encoder = encoder
        self._snap: Snapshot | None = None
        self._build = threading.Lock()
        self._next_allowed = 0.0
        self.rebuilds = 0

    def generation(self) -> int:
        cur = self.root.cursor(read_only=True)
        try:
            return cur.generation()
        finally:
            cur.close()

    def invalidate(self) -> None:
        """Forget the rate limit: the next query rebuilds if the generation moved (end of an ingest job)."""
        self._next_allowed = 0.0

    def current(self) -> Snapshot:
        """The snapshot to search now: the current generation's, or the previous one while another thread
        builds it or while the rate limit holds."""
        snap = self._snap
        if snap is not None and (snap.generation == self.generation() or time.monotonic() < self._next_allowed):
            return snap
        if snap is not None and not self._build.acquire(blocking=False):
            return snap
        if snap is None:
            self._build.acquire()
        try:
            snap = self._snap
            if snap is None or snap.generation != self.generation():
                t0 = time.monotonic()
                snap = self._snap = self._make()
                cost = time.monotonic() - t0
                self._next_allowed = time.monotonic() + REBUILD_COST_FACTOR * cost
                self.rebuilds += 1
                log.debug("snapshot of generation %d in %.3f s (in memory: %s)", snap.generation, cost,
                          snap.built_in_memory)
            return snap
        finally:
            self._build.release()

    def _make(self) -> Snapshot:
        cat = self.root.cursor(read_only=True)
        gen = cat.generation()  # read first: a batch committed meanwhile is caught by the next check
        indexes: dict[str, VectorIndex] = {}
        in_memory: list[str] = []
        dim = cat.embed_dim() or 1
        for level in LEVELS:
            manifest = read_manifest(cat.index_dir, level)
            if manifest is not None and manifest.get("catalog_generation") == gen:
                try:
                    indexes[level] = load_index(cat.index_dir, level, cat)
                    continue
                except EchosearchError:  # moved on since, or half-written: build it here
                    pass
            n = catalog_count(cat, level)
            ids, vecs = cat.embeddings(level) if n else (np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
            indexes[level] = exact_index(level, ids, vecs)
            in_memory.append(level)
        return Snapshot(gen, LiveSearcher(cat.index_dir, cat, indexes, self.encoder), in_memory)
