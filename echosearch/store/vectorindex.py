"""Vector indexes per level (video, study, report): chosen by size, tuned to a recall target, stored atomically.

Derived from the catalog alone; FAISS ids are catalog keys (``IndexIDMap2``), never row positions.
``vectors/<level>.faiss`` has a manifest ``<level>.json`` (model, catalog generation and count); a stale index
is refused. Kinds, tuning and filter planning: docs/search.md.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from echosearch.errors import IndexMismatchError, QueryError
from echosearch.store.vectorrows import LEVEL_TABLES as _TABLES
from echosearch.store.vectorrows import ArrayRows as ArrayRows
from echosearch.store.vectorrows import CatalogRows as CatalogRows
from echosearch.store.vectorrows import VectorRows as VectorRows
from echosearch.store.vectorrows import exact_neighbours as exact_neighbours
from echosearch.store.vectorrows import normalise as normalise

faiss: Any = _faiss  # the SWIG wrappers take keyword arguments and attributes its type stubs do not know

LEVELS = ("video", "study", "report")
IDENTITY_LEVELS = ("video_identity", "study_identity")  # built when the index has an identity model
KINDS = ("flat", "hnsw", "ivf", "ivf_fp16")
VECTOR_DIR = "vectors"
# Multiply-adds per millisecond of one exact single-query scan (ENVIRONMENT.md: 1M x 512 Flat ~145 ms, 2 cores).
FLAT_MADDS_PER_MS = 3.5e6
# Filtered search scans the selected vectors exactly up to this many (cost ~ rows x d; ~5 ms at 10k x 512).
EXACT_MAX_ROWS = 20_000
# ...or up to this fraction of the index (whichever is larger).
EXACT_MAX_FRACTION = 0.01
TUNE_QUERIES = 200
HNSW_M = 32


def nlist_for(n: int) -> int:
    """IVF list count ~ 4 sqrt(n) rounded to a power of two, with >= 39 training points per list."""
    if n < 78:
        return 1
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    return int(max(1, min(target, n // 39)))


def choose_kind(n: int, d: int, *, latency_ms: float = 10.0, memory_budget: int | None = None) -> tuple[str, str]:
    """Pick the index kind for ``n`` vectors of width ``d`` (autofaiss-style rules); returns (kind, reason)."""
    flat_ms = n * d / FLAT_MADDS_PER_MS
    if flat_ms <= latency_ms:
        return "flat", f"exact scan estimated {flat_ms:.1f} ms <= target {latency_ms} ms"
    budget = memory_budget if memory_budget is not None else _default_memory_budget()
    full, sq8 = n * d * 4, n * d
    if full + sq8 <= budget:
        return "ivf", f"exact scan estimated {flat_ms:.0f} ms > {latency_ms} ms; full vectors fit in memory"
    return "ivf_fp16", f"full vectors ({full / 1e9:.1f} GB) exceed the memory budget ({budget / 1e9:.1f} GB)"


def _default_memory_budget() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def factory_string(kind: str, n: int) -> str:
    """The ``faiss.index_factory`` description of a kind (always wrapped in IDMap2: ids are catalog keys)."""
    names = {"flat": "IDMap2,Flat", "hnsw": f"IDMap2,HNSW{HNSW_M},Flat", "ivf": f"IDMap2,IVF{nlist_for(n)},SQ8,RFlat",
             "ivf_fp16": f"IDMap2,IVF{nlist_for(n)},SQ8,Refine(SQfp16)"}
    if kind not in names:
        raise ValueError(f"unknown index type {kind!r}; choose one of {KINDS}")
    return names[kind]


class VectorIndex:
    """One level's FAISS index plus its manifest; :meth:`search` returns catalog keys."""

    def __init__(self, level: str, index: Any, manifest: dict[str, Any]) -> None:
        self.level, self.index, self.manifest = level, index, manifest
        self.kind: str = manifest["kind"]
        self.params: dict[str, float] = dict(manifest.get("params") or {})
        idmap = faiss.downcast_index(index)
        self._inner = faiss.downcast_index(idmap.index)
        self.ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
        self.ntotal, self.dim = int(index.ntotal), int(index.d)
        if not _strictly_increasing(self.ids):  # build_vectors adds rows in key order
            raise IndexMismatchError(f"{level} index rows are not in key order: run `echosearch reindex`")
        self._lut: np.ndarray | None = None  # key -> row table when keys are dense enough (catalog sequences)
        if self.ntotal and self.ids[0] >= 0 and self.ids[-1] < 4 * self.ntotal + 1024:
            self._lut = np.full(int(self.ids[-1]) + 1, -1, dtype=np.int64)
            self._lut[self.ids] = np.arange(self.ntotal)
        self._store, self._xb = _vector_store(self._inner, self.kind, self.dim)
        self._nlist = int(faiss.extract_index_ivf(self._inner).nlist) if self.kind.startswith("ivf") else 0
        self._gpu = _maybe_gpu(self._inner, self.kind)

    # ---- ids ----------------------------------------------------------------------------------
    def rows_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Sorted row positions of the given catalog keys that are in the index (others ignored)."""
        want = np.asarray(ids, dtype=np.int64).ravel()
        if len(want) == 0 or self.ntotal == 0:
            return np.zeros(0, dtype=np.int64)
        if self._lut is not None:
            want = want[(want >= 0) & (want < len(self._lut))]
            rows = self._lut[want]
            rows = rows[rows >= 0]
            return rows if _strictly_increasing(rows) else np.unique(rows)
        if not _strictly_increasing(want):
            want = np.unique(want)
        pos = np.minimum(np.searchsorted(self.ids, want), self.ntotal - 1)
        return pos[self.ids[pos] == want].astype(np.int64)

    def available(self, selector_ids: np.ndarray | list[int] | None) -> int:
        """How many vectors a search with this selector can return."""
        return self.ntotal if selector_ids is None else len(self.rows_of(selector_ids))

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored (normalised, float32) vectors of the given row positions (from :meth:`rows_of`)."""
        return self._full_vectors(np.asarray(rows, dtype=np.int64))

    def _full_vectors(self, rows: np.ndarray) -> np.ndarray:
        if self._xb is not None:
            return np.ascontiguousarray(self._xb[rows])
        return np.ascontiguousarray(self._store.reconstruct_batch(rows), dtype=np.float32)

    # ---- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, *, selector_ids: np.ndarray | list[int] | None = None,
               params: Mapping[str, float] | None = None, plan: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, catalog ids) per query, best first; shape (nq, min(k, available)).

        ``selector_ids`` restricts results to those keys; ``params`` overrides tuned search parameters
        (``nprobe``, ``k_factor``, ``efSearch``) for this call only; ``plan`` is ``auto``, ``exact`` or ``ann``.
        Scores are exact inner products of normalised vectors (cosine) in every plan.
        """
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise QueryError(f"query vectors have width {q.shape[1]}, the {self.level} index {self.dim}")
        p = {**self.params, **(params or {})}
        rows = None if selector_ids is None else self.rows_of(selector_ids)
        n_avail = self.ntotal if rows is None else len(rows)
        k_eff = max(0, min(int(k), n_avail))
        if k_eff == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if plan == "auto":
            plan = self.plan_for(None if rows is None else len(rows))
        scores, found = self._exact(q, k_eff, rows) if plan == "exact" else self._ann(q, k_eff, rows, p)
        return scores, self.ids[found]

    def plan_for(self, n_selected: int | None) -> str:
        """``exact``: scan exactly the selected vectors (few selected, or any search of a flat index);
        ``ann``: the ANN index restricted by a selector."""
        if n_selected is not None and n_selected <= max(EXACT_MAX_ROWS, EXACT_MAX_FRACTION * self.ntotal):
            return "exact"
        return "exact" if self.kind == "flat" and (self._gpu is None or n_selected is not None) else "ann"

    def _exact(self, q: np.ndarray, k: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact scan of exactly ``rows`` (all when None); returns (scores, rows).

        Few rows: gather their vectors and scan them (``faiss.knn``, one thread per query: BLAS thread
        wake-ups cost milliseconds on a busy machine). Many rows of a flat index: the index with a bitmap.
        """
        if self.kind == "flat" and rows is not None and len(rows) > max(EXACT_MAX_ROWS, 0.05 * self.ntotal):
            return self._ann(q, k, rows, {})
        if rows is None and self._xb is not None:
            mat = self._xb
        else:
            mat = self._full_vectors(np.arange(self.ntotal) if rows is None else rows)
        with _omp_threads(len(q)):
            scores, found = faiss.knn(q, mat, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores.astype(np.float32), found if rows is None else rows[found]

    def _faiss_params(self, p: Mapping[str, float], sel: Any) -> tuple[Any, list[Any]]:
        """Per-call search parameter objects (the shared index is never mutated); returns (params, keep-alive)."""
        if self.kind == "flat":
            obj = faiss.SearchParameters(sel=sel) if sel is not None else None
            return obj, [sel]
        if self.kind == "hnsw":
            obj = faiss.SearchParametersHNSW(efSearch=int(p.get("efSearch", 64)), sel=sel)
            return obj, [sel, obj]
        base = faiss.SearchParametersIVF(nprobe=int(min(self._nlist, p.get("nprobe", 8))), sel=sel)
        obj = faiss.IndexRefineSearchParameters(k_factor=float(p.get("k_factor", 4)), base_index_params=base)
        return obj, [sel, base, obj]

    def _ann(self, q: np.ndarray, k: int, rows: np.ndarray | None, p: dict[str, float]
             ) -> tuple[np.ndarray, np.ndarray]:
        """ANN search (optionally restricted to ``rows`` with a bitmap selector), widened until k results."""
        sel, keep = None, None
        n_sel = self.ntotal if rows is None else len(rows)
        if rows is not None:
            mask = np.zeros(self.ntotal, dtype=bool)
            mask[rows] = True
            keep = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(keep)
            boost = math.sqrt(min(self.ntotal / max(n_sel, 1), 64.0))  # rarer matches: probe wider
            p = {**p, "nprobe": math.ceil(p.get("nprobe", 8) * boost),
                 "efSearch": math.ceil(max(p.get("efSearch", 64), k) * boost)}
        gpu = self._gpu_search(q, k, p) if rows is None and self._gpu is not None else None
        while gpu is None:
            obj, _alive = self._faiss_params(p, sel)
            with _omp_threads(len(q)):
                dist, found = self._inner.search(q, k, params=obj) if obj is not None else self._inner.search(q, k)
            complete = bool(np.all((found[:, :k] >= 0).sum(axis=1) >= k))
            exhausted = (self.kind == "flat" or (self.kind == "hnsw" and p.get("efSearch", 64) >= n_sel)
                         or (self._nlist > 0 and p.get("nprobe", 8) >= self._nlist and p.get("k_factor", 4) * k >= n_sel))
            if complete or exhausted:
                break
            p = {**p, "nprobe": min(self._nlist, 2 * p.get("nprobe", 8)), "efSearch": 2 * p.get("efSearch", 64),
                 "k_factor": min(2 * p.get("k_factor", 4), max(1.0, n_sel / k))}
        del keep
        scores, out = (dist.astype(np.float32), found.copy()) if gpu is None else gpu
        short = np.flatnonzero((out >= 0).sum(axis=1) < k)
        if len(short):  # graph/list coverage ran out: exact scan for those queries
            scores[short], out[short] = self._exact(q[short], k, rows)
        return scores, out

    def _gpu_search(self, q: np.ndarray, k: int, p: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray] | None:
        """Unfiltered search on the GPU copy (flat: exact; IVF: shortlist re-ranked exactly here); None on failure."""
        try:
            if self.kind == "flat":
                dist, found = self._gpu.search(q, k)
                return dist.astype(np.float32), found
            ivf = faiss.SearchParametersIVF(nprobe=int(min(self._nlist, p.get("nprobe", 8))))
            _, cand = self._gpu.search(q, min(self.ntotal, math.ceil(k * p.get("k_factor", 4))), params=ivf)
        except Exception:  # the GPU is an optimisation only: fall back to the CPU index for good
            self._gpu = None
            return None
        scores, out = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        for i, row in enumerate(cand):
            c = np.unique(row[row >= 0])
            if len(c):
                s, r = self._exact(q[i:i + 1], min(k, len(c)), c)
                scores[i, :s.shape[1]], out[i, :s.shape[1]] = s[0], r[0]
        return scores, out

    # ---- persistence --------------------------------------------------------------------------
    def save(self, index_dir: Path | str) -> Path:
        """Write ``vectors/<level>.faiss`` and ``.json`` atomically (temp file, fsync, rename)."""
        vdir = Path(index_dir) / VECTOR_DIR
        vdir.mkdir(parents=True, exist_ok=True)
        target = vdir / f"{self.level}.faiss"
        tmp = vdir / f".{self.level}.faiss.{uuid.uuid4().hex}.tmp"
        tmp_json = vdir / f".{self.level}.json.{uuid.uuid4().hex}.tmp"
        try:
            faiss.write_index(self.index, str(tmp))
            _fsync(tmp)
            self.manifest["file_bytes"] = tmp.stat().st_size
            tmp_json.write_text(json.dumps(self.manifest, indent=2, sort_keys=True, default=str))
            _fsync(tmp_json)
            os.replace(tmp, target)
            os.replace(tmp_json, vdir / f"{self.level}.json")
            _fsync(vdir)
        finally:
            for leftover in (tmp, tmp_json):
                leftover.unlink(missing_ok=True)
        return target


@contextmanager
def _omp_threads(n_queries: int) -> Iterator[None]:
    """At most one OpenMP thread per query (FAISS parallelises over queries; idle threads cost wake-ups)."""
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(prev, n_queries)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


def _strictly_increasing(a: np.ndarray) -> bool:
    return len(a) < 2 or bool(np.all(a[1:] > a[:-1]))


def _vector_store(inner: Any, kind: str, d: int) -> tuple[Any, np.ndarray | None]:
    """The sub-index holding full vectors by row, and a zero-copy (ntotal, d) view when they are float32."""
    store = faiss.downcast_index(inner if kind == "flat" else inner.storage if kind == "hnsw" else inner.refine_index)
    if kind == "ivf_fp16":
        return store, None
    if store.ntotal == 0:
        return store, np.zeros((0, d), dtype=np.float32)
    return store, faiss.rev_swig_ptr(store.get_xb(), store.ntotal * d).reshape(store.ntotal, d)


def _maybe_gpu(inner: Any, kind: str) -> Any:
    """A GPU copy (flat, or the IVF shortlist stage) for unfiltered search when faiss-gpu sees a GPU; optional."""
    if kind == "hnsw" or inner.ntotal == 0 or os.environ.get("ECHOSEARCH_FAISS_GPU", "1") == "0":
        return None
    try:
        if faiss.get_num_gpus() <= 0:
            return None
        res = faiss.StandardGpuResources()
        src = inner if kind == "flat" else faiss.downcast_index(inner.base_index)
        gpu = faiss.index_cpu_to_gpu(res, 0, src)
        gpu.referenced_objects = [res]
        return gpu
    except Exception:
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with suppress(OSError) if path.is_dir() else nullcontext():  # some filesystems refuse directory fsync
            os.fsync(fd)
    finally:
        os.close(fd)


# ---- building and tuning ---------------------------------------------------------------------------
def build_vectors(ids: np.ndarray, vecs: np.ndarray, *, level: str = "video", target_recall: float = 0.95,
                  latency_ms: float = 10.0, force_type: str | None = None, memory_budget: int | None = None,
                  tune_queries: int = TUNE_QUERIES, seed: int = 0) -> VectorIndex:
    """Build and tune an index over (catalog keys, vectors) in memory; the catalog-free core of :func:`build_index`."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    x = normalise(vecs) if len(vecs) else np.zeros((0, vecs.shape[1] if vecs.ndim == 2 else 1), np.float32)
    if not _strictly_increasing(ids):  # rows in key order: key -> row lookups are a binary search
        order = np.argsort(ids, kind="stable")
        ids, x = ids[order], x[order]
        if not _strictly_increasing(ids):
            raise ValueError("ids must be unique catalog keys, one per vector")
    return build_from_rows(ArrayRows(ids, x), level=level, target_recall=target_recall, latency_ms=latency_ms,
                           force_type=force_type, memory_budget=memory_budget, tune_queries=tune_queries, seed=seed)


def build_from_rows(rows: VectorRows, *, level: str = "video", target_recall: float = 0.95, latency_ms: float = 10.0,
                    force_type: str | None = None, memory_budget: int | None = None,
                    tune_queries: int = TUNE_QUERIES, seed: int = 0) -> VectorIndex:
    """Build and tune an index over ``rows``: k-means trained on a sample, vectors added chunk by chunk, search
    parameters tuned against exact search of sampled queries (computed chunk by chunk too). In memory and
    chunked builds of the same vectors train on the same sample and add the same rows in the same order, so
    they give the same index."""
    start = time.perf_counter()
    n, d = rows.n, rows.d
    kind, reason = (force_type, "forced") if force_type else choose_kind(n, d, latency_ms=latency_ms,
                                                                          memory_budget=memory_budget)
    kind, reason = ("flat", "empty level") if n == 0 else (kind, reason)
    desc = factory_string(kind, n)
    index = faiss.index_factory(d, desc, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:  # k-means on a sample of 40 points per list (>= 20k)
        n_train = min(n, max(40 * nlist_for(n), 20_000))
        full = rows.all()
        if n_train >= n:
            train = full if full is not None else rows.take(np.arange(n))
        else:
            train = rows.take(np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)))
        index.train(train)
        del train
    t_train = time.perf_counter()
    for ids, x in rows.chunks():
        if len(ids):
            index.add_with_ids(x, ids)
    t_add = time.perf_counter()
    manifest: dict[str, Any] = {
        "level": level, "kind": kind, "index_type": desc, "choice_reason": reason, "metric": "inner_product",
        "normalised": True, "dim": d, "ntotal": n, "params": {}, "target_recall": target_recall,
        "latency_target_ms": latency_ms, "faiss_version": faiss.__version__,
    }
    vi = VectorIndex(level, index, manifest)
    recall, n_q = (1.0, 0) if kind == "flat" or n < 2 else _tune(vi, rows, target_recall, tune_queries, seed)
    if force_type is None and kind == "ivf" and vi.params["nprobe"] * 4 >= vi._nlist:  # scans >= 1/4: exact instead
        why = f"IVF needed nprobe {vi.params['nprobe']:.0f} of {vi._nlist} for recall@10 {target_recall}: exact instead"
        del vi, index
        flat = build_from_rows(rows, level=level, target_recall=target_recall, latency_ms=1e12)
        flat.manifest.update(build_seconds=round(time.perf_counter() - start, 3), choice_reason=why)
        return flat
    manifest.update(params=vi.params, recall_at_10=recall if n else None, recall_queries=n_q,
                    latency_p50_ms=_latency_p50(vi, rows, seed), build_seconds=round(time.perf_counter() - start, 3),
                    phase_seconds={"train": round(t_train - start, 3), "add": round(t_add - t_train, 3),
                                   "tune": round(time.perf_counter() - t_add, 3)},
                    created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return vi


def _tune(vi: VectorIndex, rows: VectorRows, target: float, n_queries: int, seed: int,
          k: int = 10) -> tuple[float, int]:
    """Cheapest search parameters whose recall@10 on sampled queries (vs exact, self excluded) meets ``target``.

    HNSW: the smallest efSearch. IVF: the smallest nprobe with a generous shortlist (binary search; recall grows
    with nprobe), then the cheapest (nprobe, k_factor) around it by a cost model in vector operations per query.
    """
    n = rows.n
    qrows = np.sort(np.random.default_rng(seed + 1).choice(n, min(n_queries, n), replace=False))
    q, self_ids = rows.take(qrows), rows.ids[qrows]
    _, gt_ids = exact_neighbours(rows, q, min(k + 1, n))
    truth = [set([int(j) for j in r if j >= 0 and j != s][:k]) for r, s in zip(gt_ids, self_ids, strict=True)]
    seen: dict[tuple[float, ...], float] = {}

    def recall(params: dict[str, float]) -> float:
        key = tuple(params.values())
        if key not in seen:
            _, got = vi.search(q, k + 1, params=params, plan="ann")
            hits = sum(len(t & (set(g.tolist()) - {int(s)})) for t, g, s in zip(truth, got, self_ids, strict=True))
            seen[key] = hits / max(1, sum(len(t) for t in truth))
        return seen[key]

    if vi.kind == "hnsw":
        grid = [{"efSearch": float(2**i)} for i in range(4, 13)]
        best = next((p for p in grid if recall(p) >= target), grid[-1])
        vi.params = best
        return round(recall(best), 4), len(q)
    nlist = vi._nlist
    probes = sorted({min(nlist, 2**i) for i in range(14)})
    lo, hi = 0, len(probes) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if recall({"nprobe": float(probes[mid]), "k_factor": 16.0}) >= target else (mid + 1, hi)
    near = {probes[lo], probes[min(lo + 1, len(probes) - 1)]}
    # coarse quantiser + SQ8 scan of the probed lists + random-access exact re-rank of k * k_factor
    grid = sorted(({"nprobe": float(p), "k_factor": kf} for p in near for kf in (1.0, 2.0, 4.0, 8.0, 16.0)),
                  key=lambda c: nlist + c["nprobe"] * n / nlist * 0.35 + k * c["k_factor"] * 4)
    best = next((p for p in grid if recall(p) >= target), max(grid, key=lambda c: (c["nprobe"], c["k_factor"])))
    vi.params = best
    return round(recall(best), 4), len(q)


def _latency_p50(vi: VectorIndex, rows: VectorRows, seed: int, n: int = 30) -> float | None:
    times = []
    picked = np.random.default_rng(seed + 2).choice(rows.n, min(n, rows.n), replace=False)
    queries = rows.take(np.asarray(picked, dtype=np.int64)) if len(picked) else np.zeros((0, rows.d), np.float32)
    for x in queries:
        t0 = time.perf_counter()
        vi.search(x[None, :], 10)
        times.append((time.perf_counter() - t0) * 1000)
    return round(float(np.median(times)), 4) if times else None


# ---- catalog-facing API ------------------------------------------------------------------------------
def catalog_count(catalog: Any, level: str) -> int:
    """Rows in the level's embedding table (0 when no model is bound yet)."""
    return int(catalog.row_count(_TABLES[level][0]))


def build_index(catalog: Any, level: str, *, target_recall: float = 0.95, latency_ms: float = 10.0,
                force_type: str | None = None, chunk_rows: int | None = None) -> VectorIndex:
    """Build, tune and atomically save the level's index from the catalog's embeddings.

    ``chunk_rows``: read the vectors that many at a time (train on a sample, add chunk by chunk) instead of
    loading the whole level first; the index is the same (see :func:`build_from_rows`)."""
    if level not in LEVELS + IDENTITY_LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {LEVELS + IDENTITY_LEVELS}")
    generation = catalog.generation()
    model = catalog.manifest().get("model")
    if chunk_rows:
        rows = CatalogRows(catalog, level, chunk_rows)
        vi = build_from_rows(rows, level=level, target_recall=target_recall, latency_ms=latency_ms,
                             force_type=force_type)
        n = rows.n
    else:
        empty = (np.zeros(0, np.int64), np.zeros((0, int(catalog.level_dim(level) or 1)), np.float32))
        ids, vecs = catalog.embeddings(level) if catalog_count(catalog, level) else empty
        vi = build_vectors(ids, vecs, level=level, target_recall=target_recall, latency_ms=latency_ms,
                           force_type=force_type)
        n = len(ids)
    vi.manifest.update(model=model, catalog_generation=generation, catalog_count=n)
    if level in IDENTITY_LEVELS:
        vi.manifest["identity_model"] = catalog.get_manifest("identity_model")
    vi.save(catalog.index_dir)
    return vi


def build_all(catalog: Any, **kwargs: Any) -> dict[str, VectorIndex]:
    """Build every level (empty levels get an empty exact index so that searches fail with a clear message), and
    the identity levels when the index has an identity model."""
    levels = LEVELS + (IDENTITY_LEVELS if catalog.has_identity() else ())
    return {level: build_index(catalog, level, **kwargs) for level in levels}


def read_manifest(index_dir: Path | str, level: str) -> dict[str, Any] | None:
    path = Path(index_dir) / VECTOR_DIR / f"{level}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexMismatchError(f"unreadable vector index manifest {path}: {exc}; run `echosearch reindex`") from exc


def check_manifest(manifest: dict[str, Any], catalog: Any, level: str) -> None:
    """Refuse an index that no longer matches its catalog (model, generation, count)."""
    hint = f"run `echosearch reindex --index {catalog.index_dir}`"
    model = catalog.manifest().get("model")
    if manifest.get("model") != model:
        raise IndexMismatchError(f"the {level} vector index was built with another model "
                                 f"({(manifest.get('model') or {}).get('name')}, catalog has "
                                 f"{(model or {}).get('name')}): {hint}")
    if level in IDENTITY_LEVELS and manifest.get("identity_model") != catalog.get_manifest("identity_model"):
        raise IndexMismatchError(f"the {level} vector index was built with another identity model: {hint}")
    if manifest.get("catalog_generation") != catalog.generation():
        raise IndexMismatchError(f"the {level} vector index is stale (catalog generation "
                                 f"{manifest.get('catalog_generation')} -> {catalog.generation()}): {hint}")
    count = catalog_count(catalog, level)
    if manifest.get("ntotal") != count:
        raise IndexMismatchError(f"the {level} vector index holds {manifest.get('ntotal')} vectors, "
                                 f"the catalog {count}: {hint}")


def load_index(index_dir: Path | str, level: str, catalog: Any) -> VectorIndex:
    """Load a level's index (memory-mapped where possible) after checking it against the catalog."""
    if level not in LEVELS + IDENTITY_LEVELS:
        raise QueryError(f"unknown level {level!r}; choose one of {LEVELS + IDENTITY_LEVELS}")
    path = Path(index_dir) / VECTOR_DIR / f"{level}.faiss"
    manifest = read_manifest(index_dir, level)
    if manifest is None or not path.exists():
        raise IndexMismatchError(f"no {level} vector index in {Path(index_dir) / VECTOR_DIR}: "
                                 f"run `echosearch reindex --index {index_dir}`")
    check_manifest(manifest, catalog, level)
    if manifest.get("file_bytes") not in (None, path.stat().st_size):
        raise IndexMismatchError(f"{path} does not match its manifest (interrupted write?): run `echosearch reindex`")
    index = _read(path)
    if index.ntotal != manifest.get("ntotal"):
        raise IndexMismatchError(f"{path} holds {index.ntotal} vectors, its manifest {manifest.get('ntotal')}: "
                                 "run `echosearch reindex`")
    return VectorIndex(level, index, manifest)


def _read(path: Path) -> Any:
    """``read_index`` memory-mapped (flat codes and inverted lists) when this faiss allows, else in memory."""
    for flags in (getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | getattr(faiss, "IO_FLAG_MMAP", 0), 0):
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            error = exc
    raise IndexMismatchError(f"cannot read {path}: {error}; run `echosearch reindex`") from error
