"""Where a vector index build reads its vectors: all in memory, or chunk by chunk from the catalog.

A build needs three things of its vectors: a sample by row position (k-means training, tuning queries), every
row in key order (adding to the index), and exact neighbours of the tuning queries. :class:`ArrayRows` serves
them from one array; :class:`CatalogRows` reads the catalog a chunk at a time, holding only the keys (8 bytes per
vector) throughout, so that building an index never needs a second full copy of a level's vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import faiss as _faiss
import numpy as np

from echosearch.errors import IndexMismatchError

faiss: Any = _faiss

LEVEL_TABLES = {"video": ("video_embeddings", "video_key"), "study": ("study_embeddings", "study_key"),
                "report": ("report_embeddings", "study_key"), "video_identity": ("video_identity", "video_key"),
                "study_identity": ("study_identity", "study_key")}


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32 C-contiguous: inner product = cosine."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if len(x) and float(np.abs(norms - 1.0).max()) < 1e-5:  # already unit length: no copy
        return np.ascontiguousarray(x)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


class VectorRows:
    """Where a build reads its vectors: ``n`` normalised vectors of width ``d`` under ascending unique ``ids``.

    :meth:`take` returns the vectors at given row positions (training sample, tuning queries);
    :meth:`chunks` yields (ids, vectors) in key order. The in-memory rows hold one array; the catalog rows
    read chunks from the catalog, so that a build holds the index and one chunk, never a second full copy."""

    ids: np.ndarray
    d: int

    @property
    def n(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def all(self) -> np.ndarray | None:
        """Every vector as one array when they are in memory already (else None: use :meth:`chunks`)."""
        return None


class ArrayRows(VectorRows):
    """Vectors already in memory (ids ascending, rows normalised)."""

    def __init__(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.ids, self.x, self.d = ids, x, int(x.shape[1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.x[rows]

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield self.ids, self.x

    def all(self) -> np.ndarray:
        return self.x


class CatalogRows(VectorRows):
    """A level's vectors read from the catalog ``chunk_rows`` at a time, in key order (only the ids, 8 bytes
    per vector, are held throughout)."""

    def __init__(self, catalog: Any, level: str, chunk_rows: int = 65_536) -> None:
        self.catalog, self.level, self.chunk_rows = catalog, level, max(1, int(chunk_rows))
        self.d = int(catalog.level_dim(level) or 1)
        self.ids = np.asarray(catalog.embedding_keys(level), np.int64)

    def take(self, rows: np.ndarray) -> np.ndarray:
        want = self.ids[np.asarray(rows, dtype=np.int64)]
        if len(want) == 0:
            return np.zeros((0, self.d), np.float32)
        ids, vecs = self.catalog.embeddings(self.level, np.unique(want).tolist())
        pos = np.minimum(np.searchsorted(ids, want), max(len(ids) - 1, 0))
        if len(ids) == 0 or not np.array_equal(ids[pos], want):
            raise IndexMismatchError(f"the catalog's {self.level} vectors changed during the build")
        return normalise(vecs[pos])

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.n, self.chunk_rows):
            want = self.ids[start:start + self.chunk_rows]
            ids, vecs = self.catalog.embeddings(self.level, want.tolist())
            if len(ids) != len(want) or not np.array_equal(ids, want):
                raise IndexMismatchError(f"the catalog's {self.level} vectors changed during the build")
            yield ids, normalise(vecs)


def exact_neighbours(rows: VectorRows, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, ids) of queries ``q`` over ``rows``, one chunk at a time (merged per chunk)."""
    full = rows.all()
    if full is not None:
        scores, found = faiss.knn(q, full, min(k, rows.n), metric=faiss.METRIC_INNER_PRODUCT)
        return scores, np.where(found >= 0, rows.ids[np.maximum(found, 0)], -1)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for ids, x in rows.chunks():
        s, f = faiss.knn(q, x, min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.where(f >= 0, ids[np.maximum(f, 0)], -1)], axis=1)
        top = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s_all, top, 1), np.take_along_axis(i_all, top, 1)
    return best_s, best_i
