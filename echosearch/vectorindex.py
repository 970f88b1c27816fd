"""Vector indexes per level (video, study, report): chosen by size, tuned to a recall target, stored atomically.

Derived data: every index is rebuilt from the catalog alone. FAISS ids are catalog keys (``IndexIDMap2``),
never row positions. The file ``vectors/<level>.faiss`` has a manifest ``<level>.json`` recording the model,
catalog generation and count it was built from; a stale index is refused (``IndexMismatchError``).

Kinds (see docs/search.md): ``flat`` (exact) while its estimated single-query latency meets the target;
``ivf`` (IVF-SQ8 shortlist re-ranked exactly with ``IndexRefineFlat``) beyond; ``ivf_sq8`` (no stored full
vectors; shortlist re-scored against catalog vectors) when full vectors exceed the memory budget; ``hnsw``
(HNSW32 over flat vectors) on request. Filtered searches pick an exact scan or ANN-with-selector by
selectivity (:meth:`VectorIndex.search`).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from echosearch.errors import IndexMismatchError, QueryError

LEVELS = ("video", "study", "report")
KINDS = ("flat", "hnsw", "ivf", "ivf_sq8")
VECTOR_DIR = "vectors"
# Multiply-adds per millisecond of one exact single-query scan (ENVIRONMENT.md: 1M x 512 Flat ~145 ms, 2 cores).
FLAT_MADDS_PER_MS = 3.5e6
# Filtered search scans the selected vectors exactly up to this many (cost ~ rows x d; ~5 ms at 10k x 512).
EXACT_MAX_ROWS = 20_000
# ...or up to this fraction of the index (whichever is larger).
EXACT_MAX_FRACTION = 0.01
TUNE_QUERIES = 200
HNSW_M = 32
_TABLES = {"video": ("video_embeddings", "video_key"), "study": ("study_embeddings", "study_key"),
           "report": ("report_embeddings", "study_key")}

VectorSource = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32 C-contiguous: inner product = cosine."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


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
    return "ivf_sq8", f"full vectors ({full / 1e9:.1f} GB) exceed the memory budget ({budget / 1e9:.1f} GB)"


def _default_memory_budget() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def factory_string(kind: str, n: int) -> str:
    """The ``faiss.index_factory`` description of a kind (always wrapped in IDMap2: ids are catalog keys)."""
    if kind == "flat":
        return "IDMap2,Flat"
    if kind == "hnsw":
        return f"IDMap2,HNSW{HNSW_M},Flat"
    if kind == "ivf":
        return f"IDMap2,IVF{nlist_for(n)},SQ8,RFlat"
    if kind == "ivf_sq8":
        return f"IDMap2,IVF{nlist_for(n)},SQ8"
    raise ValueError(f"unknown index type {kind!r}; choose one of {KINDS}")


class VectorIndex:
    """One level's FAISS index plus its manifest; :meth:`search` returns catalog keys."""

    def __init__(self, level: str, index: faiss.Index, manifest: dict[str, Any],
                 vector_source: VectorSource | None = None) -> None:
        self.level = level
        self.index = index
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.params: dict[str, float] = dict(manifest.get("params") or {})
        self.vector_source = vector_source
        idmap = faiss.downcast_index(index)
        self._inner = faiss.downcast_index(idmap.index)
        self.ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
        self.ntotal = int(index.ntotal)
        self.dim = int(index.d)
        self._order: np.ndarray | None = None
        if len(self.ids) > 1 and not bool(np.all(self.ids[1:] > self.ids[:-1])):
            self._order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids if self._order is None else self.ids[self._order]
        self._xb = _flat_vectors(self._inner, self.kind, self.dim)
        self._nlist = int(faiss.extract_index_ivf(self._inner).nlist) if self.kind.startswith("ivf") else 0
        self._gpu = _maybe_gpu(self._inner, self.kind)

    # ---- ids ----------------------------------------------------------------------------------
    def rows_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Sorted row positions of the given catalog keys that are in the index (others ignored)."""
        want = np.unique(np.asarray(ids, dtype=np.int64))
        if len(want) == 0 or self.ntotal == 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, want)
        pos = np.minimum(pos, self.ntotal - 1)
        pos = pos[self._sorted_ids[pos] == want]
        rows = pos if self._order is None else np.sort(self._order[pos])
        return rows.astype(np.int64)

    def available(self, selector_ids: np.ndarray | list[int] | None) -> int:
        """How many vectors a search with this selector can return."""
        return self.ntotal if selector_ids is None else len(self.rows_of(selector_ids))

    def _full_vectors(self, rows: np.ndarray) -> np.ndarray:
        if self._xb is not None:
            return np.ascontiguousarray(self._xb[rows])
        if self.vector_source is None:
            raise QueryError(f"the {self.level} index ({self.kind}) needs the catalog to re-score results")
        ids = self.ids[rows]
        got_ids, vecs = self.vector_source(ids)
        order = np.searchsorted(got_ids, ids)
        if len(got_ids) != len(np.unique(ids)) or not np.array_equal(got_ids[np.minimum(order, len(got_ids) - 1)], ids):
            raise IndexMismatchError(f"the catalog lacks vectors of the {self.level} index: run `echosearch reindex`")
        return normalise(vecs[order])

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
            exact = rows is not None and len(rows) <= max(EXACT_MAX_ROWS, EXACT_MAX_FRACTION * self.ntotal)
            plan = "exact" if exact or (rows is not None and len(rows) == self.ntotal and self.kind == "flat") else "ann"
        if plan == "exact":
            scores, found = self._exact(q, k_eff, np.arange(self.ntotal) if rows is None else rows)
        else:
            scores, found = self._ann(q, k_eff, rows, p)
        return scores, self.ids[found]

    def _exact(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scan of exactly ``rows`` (gathered vectors, one matmul); returns (scores, rows)."""
        sims = q @ self._full_vectors(rows).T
        if k < sims.shape[1]:
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(sims.shape[1]), sims.shape).copy()
        top = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1).astype(np.float32), rows[np.take_along_axis(part, order, axis=1)]

    def _faiss_params(self, p: Mapping[str, float], sel: faiss.IDSelector | None) -> tuple[Any, list[Any]]:
        """Per-call search parameter objects (the shared index is never mutated); returns (params, keep-alive)."""
        if self.kind == "flat":
            obj = faiss.SearchParameters(sel=sel) if sel is not None else None
            return obj, [sel]
        if self.kind == "hnsw":
            obj = faiss.SearchParametersHNSW(efSearch=int(p.get("efSearch", 64)), sel=sel)
            return obj, [sel, obj]
        base = faiss.SearchParametersIVF(nprobe=int(min(self._nlist, p.get("nprobe", 8))), sel=sel)
        if self.kind == "ivf_sq8":
            return base, [sel, base]
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
        if self.kind == "ivf_sq8" and self.vector_source is not None or self.kind == "ivf_sq8" and self._xb is not None:
            fetch_k = min(n_sel, math.ceil(k * p.get("k_factor", 4)))
        else:
            fetch_k = k
        while True:
            obj, _alive = self._faiss_params(p, sel)
            dist, found = self._search_inner(q, fetch_k, obj, filtered=rows is not None)
            complete = bool(np.all((found[:, :k] >= 0).sum(axis=1) >= k))
            exhausted = (self.kind == "flat" or (self.kind == "hnsw" and p.get("efSearch", 64) >= n_sel)
                         or (self.kind.startswith("ivf") and p.get("nprobe", 8) >= self._nlist
                             and p.get("k_factor", 4) * k >= n_sel))
            if complete or exhausted:
                break
            p = {**p, "nprobe": min(self._nlist, 2 * p.get("nprobe", 8)), "efSearch": 2 * p.get("efSearch", 64),
                 "k_factor": min(2 * p.get("k_factor", 4), max(1.0, n_sel / k))}
        del keep
        if self.kind == "ivf_sq8":
            return self._rescore(q, k, found)
        scores, out = dist[:, :k].astype(np.float32), found[:, :k]
        short = np.flatnonzero((out >= 0).sum(axis=1) < k)
        if len(short):  # graph/list coverage ran out: exact scan for those queries
            pool = np.arange(self.ntotal) if rows is None else rows
            scores[short], out[short] = self._exact(q[short], k, pool)
        return scores, out

    def _search_inner(self, q: np.ndarray, k: int, obj: Any, *, filtered: bool) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu is not None and not filtered:
            try:
                return self._gpu.search(q, k, params=obj) if obj is not None else self._gpu.search(q, k)
            except Exception:  # GPU path is an optimisation only
                self._gpu = None
        return self._inner.search(q, k, params=obj) if obj is not None else self._inner.search(q, k)

    def _rescore(self, q: np.ndarray, k: int, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact re-ranking of an approximate shortlist against full-precision vectors."""
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        out = np.full((len(q), k), -1, dtype=np.int64)
        for i in range(len(q)):
            cand = np.unique(found[i][found[i] >= 0])
            if len(cand):
                s, r = self._exact(q[i:i + 1], min(k, len(cand)), cand)
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
            _fsync_dir(vdir)
        finally:
            for leftover in (tmp, tmp_json):
                leftover.unlink(missing_ok=True)
        return target


def _flat_vectors(inner: faiss.Index, kind: str, d: int) -> np.ndarray | None:
    """Zero-copy (ntotal, d) view of the full-precision vectors stored in the index, by row."""
    if kind == "flat":
        store = inner
    elif kind == "hnsw":
        store = faiss.downcast_index(inner.storage)
    elif kind == "ivf":
        store = faiss.downcast_index(inner.refine_index)
    else:
        return None
    if store.ntotal == 0:
        return np.zeros((0, d), dtype=np.float32)
    return faiss.rev_swig_ptr(store.get_xb(), store.ntotal * d).reshape(store.ntotal, d)


def _maybe_gpu(inner: faiss.Index, kind: str) -> Any:
    """A GPU copy of flat indexes for unfiltered search when faiss-gpu sees a GPU (never required)."""
    if kind != "flat" or inner.ntotal == 0 or os.environ.get("ECHOSEARCH_FAISS_GPU", "1") == "0":
        return None
    try:
        if faiss.get_num_gpus() <= 0:
            return None
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, inner)
        gpu.referenced_objects = [res]
        return gpu
    except Exception:
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems refuse directory fsync
        pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- building and tuning ---------------------------------------------------------------------------
def build_vectors(ids: np.ndarray, vecs: np.ndarray, *, level: str = "video", target_recall: float = 0.95,
                  latency_ms: float = 10.0, force_type: str | None = None, memory_budget: int | None = None,
                  tune_queries: int = TUNE_QUERIES, seed: int = 0) -> VectorIndex:
    """Build and tune an index over (catalog keys, vectors) in memory; the catalog-free core of :func:`build_index`."""
    start = time.perf_counter()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    x = normalise(vecs) if len(vecs) else np.zeros((0, vecs.shape[1] if vecs.ndim == 2 else 1), np.float32)
    n, d = x.shape
    if len(np.unique(ids)) != n:
        raise ValueError("ids must be unique catalog keys, one per vector")
    if force_type is not None:
        kind, reason = force_type, "forced"
    else:
        kind, reason = choose_kind(n, d, latency_ms=latency_ms, memory_budget=memory_budget)
    if n == 0:
        kind, reason = "flat", "empty level"
    desc = factory_string(kind, n)
    index = faiss.index_factory(d, desc, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        n_train = min(n, max(64 * nlist_for(n), 20_000))
        sample = x if n_train >= n else x[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(sample)
    if n:
        index.add_with_ids(x, ids)
    manifest: dict[str, Any] = {
        "level": level, "kind": kind, "index_type": desc, "choice_reason": reason, "metric": "inner_product",
        "normalised": True, "dim": d, "ntotal": n, "params": {}, "target_recall": target_recall,
        "latency_target_ms": latency_ms, "faiss_version": faiss.__version__,
    }
    vi = VectorIndex(level, index, manifest)
    if kind == "ivf_sq8":
        vi.vector_source = lambda want: (want, x[vi.rows_of(want)])
    recall, n_q = (1.0, 0) if kind == "flat" else _tune(vi, x, ids, target_recall, tune_queries, seed)
    manifest.update(params=vi.params, recall_at_10=recall, recall_queries=n_q,
                    latency_p50_ms=_latency_p50(vi, x, seed), build_seconds=round(time.perf_counter() - start, 3),
                    created_at=_now())
    if n == 0:
        manifest["recall_at_10"] = None
    return vi


def _recall(vi: VectorIndex, q: np.ndarray, self_ids: np.ndarray, truth: list[set[int]], params: dict[str, float],
            k: int) -> float:
    _, got = vi.search(q, k + 1, params=params, plan="ann")
    hits = sum(len(truth[i] & (set(got[i].tolist()) - {int(self_ids[i])})) for i in range(len(q)))
    return hits / max(1, sum(len(t) for t in truth))


def _tune(vi: VectorIndex, x: np.ndarray, ids: np.ndarray, target: float, n_queries: int, seed: int,
          k: int = 10) -> tuple[float, int]:
    """Smallest-cost search parameters whose recall@10 (vs exact, self-match excluded) meets ``target``."""
    n = len(x)
    if n < 2:
        vi.params = {"nprobe": 1, "k_factor": 1.0} if vi.kind.startswith("ivf") else {"efSearch": 16}
        return 1.0, 0
    rng = np.random.default_rng(seed + 1)
    qrows = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    q, self_ids = x[qrows], ids[qrows]
    _, gt_rows = faiss.knn(q, x, min(k + 1, n), metric=faiss.METRIC_INNER_PRODUCT)
    truth = [set(ids[r[r >= 0]].tolist()) - {int(s)} for r, s in zip(gt_rows, self_ids, strict=True)]
    truth = [set(sorted(t)[:k]) if len(t) > k else t for t in truth]
    # truth sets must be the top-k by score, not by id: recompute ordered
    truth = []
    for r, s in zip(gt_rows, self_ids, strict=True):
        ordered = [int(ids[j]) for j in r if j >= 0 and int(ids[j]) != int(s)]
        truth.append(set(ordered[:k]))
    candidates: list[tuple[float, float, dict[str, float]]] = []  # (cost, -recall, params)
    if vi.kind == "hnsw":
        ef = 16
        while True:
            params = {"efSearch": float(ef)}
            r = _recall(vi, q, self_ids, truth, params, k)
            candidates.append((ef if r >= target else math.inf, -r, params))
            if r >= target or ef >= max(n, 16) or ef >= 4096:
                break
            ef *= 2
    else:
        nlist = vi._nlist
        per_list = n / nlist
        nprobe_floor = 1
        for kf in (16.0, 8.0, 4.0, 2.0, 1.0):
            nprobe = nprobe_floor
            while True:
                params = {"nprobe": float(nprobe), "k_factor": kf}
                r = _recall(vi, q, self_ids, truth, params, k)
                # cost in vector operations: coarse quantiser + SQ8 scan + random-access exact re-rank
                cost = nlist + nprobe * per_list * 0.35 + k * kf * 4 if r >= target else math.inf
                candidates.append((cost, -r, params))
                if r >= target or nprobe >= nlist:
                    break
                nprobe = min(nlist, nprobe * 2)
            nprobe_floor = nprobe
            if r < target:
                break
    cost, neg_recall, best = min(candidates, key=lambda c: (c[0], c[1]))
    if math.isinf(cost):
        _, neg_recall, best = min(candidates, key=lambda c: c[1])
    vi.params = best
    return round(-neg_recall, 4), len(q)


def _latency_p50(vi: VectorIndex, x: np.ndarray, seed: int, n: int = 30) -> float | None:
    if len(x) == 0:
        return None
    rng = np.random.default_rng(seed + 2)
    times = []
    for row in rng.choice(len(x), min(n, len(x)), replace=False):
        t0 = time.perf_counter()
        vi.search(x[row:row + 1], 10)
        times.append((time.perf_counter() - t0) * 1000)
    return round(float(np.median(times)), 4)


# ---- catalog-facing API ------------------------------------------------------------------------------
def catalog_count(catalog: Any, level: str) -> int:
    """Rows in the level's embedding table (0 when no model is bound yet)."""
    table = _TABLES[level][0]
    if not catalog.has_table(table):
        return 0
    row = catalog.con.sql(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _catalog_source(catalog: Any, level: str) -> VectorSource:
    return lambda want: catalog.embeddings(level, [int(i) for i in want])


def build_index(catalog: Any, level: str, *, target_recall: float = 0.95, latency_ms: float = 10.0,
                force_type: str | None = None) -> VectorIndex:
    """Build, tune and atomically save the level's index from the catalog's embeddings."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")
    generation = catalog.generation()
    model = catalog.manifest().get("model")
    if catalog_count(catalog, level):
        ids, vecs = catalog.embeddings(level)
    else:
        ids, vecs = np.zeros(0, np.int64), np.zeros((0, int(catalog.embed_dim() or 1)), np.float32)
    vi = build_vectors(ids, vecs, level=level, target_recall=target_recall, latency_ms=latency_ms,
                       force_type=force_type)
    vi.manifest.update(model=model, catalog_generation=generation, catalog_count=len(ids))
    vi.vector_source = _catalog_source(catalog, level)
    vi.save(catalog.index_dir)
    return vi


def build_all(catalog: Any, **kwargs: Any) -> dict[str, VectorIndex]:
    """Build every level (empty levels get an empty exact index so that searches fail with a clear message)."""
    return {level: build_index(catalog, level, **kwargs) for level in LEVELS}


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
    if manifest.get("catalog_generation") != catalog.generation():
        raise IndexMismatchError(f"the {level} vector index is stale (catalog generation "
                                 f"{manifest.get('catalog_generation')} -> {catalog.generation()}): {hint}")
    count = catalog_count(catalog, level)
    if manifest.get("ntotal") != count:
        raise IndexMismatchError(f"the {level} vector index holds {manifest.get('ntotal')} vectors, "
                                 f"the catalog {count}: {hint}")


def load_index(index_dir: Path | str, level: str, catalog: Any) -> VectorIndex:
    """Load a level's index (memory-mapped where possible) after checking it against the catalog."""
    if level not in LEVELS:
        raise QueryError(f"unknown level {level!r}; choose one of {LEVELS}")
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
    return VectorIndex(level, index, manifest, vector_source=_catalog_source(catalog, level))


def _read(path: Path) -> faiss.Index:
    """``read_index`` memory-mapped (flat codes and inverted lists) when this faiss allows, else in memory."""
    flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | getattr(faiss, "IO_FLAG_MMAP", 0)
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError:
        try:
            return faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexMismatchError(f"cannot read {path}: {exc}; run `echosearch reindex`") from exc
