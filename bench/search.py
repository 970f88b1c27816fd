"""Search benchmark: exact vs tuned FAISS, filtered plans, numpy and DuckDB brute force (prints a table).

Synthetic 512-d vectors with echo-like structure (view, patient and study components, several clips per
study, L2-normalised); queries are held-out clips of indexed studies. Usage:

    .venv/bin/python bench/search.py                 # quick: 100k vectors
    .venv/bin/python bench/search.py --full          # 100k and 1M
    .venv/bin/python bench/search.py --sizes 250000  # any sizes
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echosearch.store.vectorindex import build_vectors, normalise  # noqa: E402

D = 512
VIDEOS_PER_STUDY = 8
STUDIES_PER_PATIENT = 3
N_VIEWS = 8
SELECTIVITIES = (0.001, 0.01, 0.10, 0.50)
# weights of the (view, patient, study, clip noise) components of a clip vector
STRUCTURES = {
    "patient": (0.4, 1.0, 0.6, 0.5),  # clusters per patient, sub-clusters per study, a weaker shared view axis
    "view": (0.9, 0.7, 0.5, 0.45),  # view-dominated: nearest clips are a crowd of same-view clips (harder for ANN)
}


def synth(n: int, n_queries: int, seed: int, structure: str = "patient") -> tuple[np.ndarray, np.ndarray]:
    """(indexed vectors (n, D), held-out query vectors) with view/patient/study structure."""
    w_view, w_patient, w_study, w_noise = STRUCTURES[structure]
    rng = np.random.default_rng(seed)
    views = normalise(rng.standard_normal((N_VIEWS, D), dtype=np.float32))
    per_patient = VIDEOS_PER_STUDY * STUDIES_PER_PATIENT
    total = n + n_queries
    n_patients = -(-total // per_patient)
    patients = normalise(rng.standard_normal((n_patients, D), dtype=np.float32))
    out = np.empty((total, D), dtype=np.float32)
    chunk = per_patient * 4096
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        idx = np.arange(start, stop)
        pat, study = idx // per_patient, idx // VIDEOS_PER_STUDY
        srng = np.random.default_rng([seed, start])
        study_noise = srng.standard_normal((study[-1] - study[0] + 1, D), dtype=np.float32) / np.sqrt(D)
        noise = srng.standard_normal((len(idx), D), dtype=np.float32) / np.sqrt(D)
        block = (w_view * views[srng.integers(0, N_VIEWS, len(idx))] + w_patient * patients[pat]
                 + w_study * study_noise[study - study[0]] + w_noise * noise)
        out[start:stop] = normalise(block)
    # held-out queries: take every (n // n_queries)-th clip position out of the indexed set
    qpos = np.linspace(0, total - 1, n_queries).astype(np.int64)
    mask = np.ones(total, dtype=bool)
    mask[qpos] = False
    return np.ascontiguousarray(out[mask][:n]), np.ascontiguousarray(out[qpos])


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 1e6


def timed(fn: Any, queries: np.ndarray) -> tuple[float, float, list[np.ndarray]]:
    """(p50 ms, p95 ms, results) of single-query calls."""
    fn(queries[:1])
    times, results = [], []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        results.append(fn(queries[i:i + 1]))
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95)), results


def recall(got: list[np.ndarray], truth: list[np.ndarray]) -> float:
    hits = sum(len(np.intersect1d(g.ravel(), t.ravel())) for g, t in zip(got, truth, strict=True))
    return hits / max(1, sum(t.size for t in truth))


def numpy_topk(x: np.ndarray, q: np.ndarray, ids: np.ndarray, k: int = 10) -> np.ndarray:
    s = x @ q.ravel()
    part = np.argpartition(-s, k - 1)[:k]
    return ids[part[np.argsort(-s[part])]]


def duckdb_topk(n: int, x: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    flat = pa.array(x.ravel(), type=pa.float32())
    table = pa.table({"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(flat, D)})
    con.register("_vecs", table)
    con.execute(f"CREATE TABLE vecs AS SELECT id, embedding::FLOAT[{D}] AS embedding FROM _vecs")
    con.unregister("_vecs")
    del table, flat
    sql = (f"SELECT id FROM vecs ORDER BY array_cosine_similarity(embedding, $q::FLOAT[{D}]) DESC LIMIT 10")

    def run(q: np.ndarray) -> np.ndarray:
        return np.array([r[0] for r in con.sql(sql, params={"q": q.ravel().tolist()}).fetchall()])

    p50, p95, _ = timed(run, queries)
    con.close()
    return p50, p95


class Rows(list):  # type: ignore[type-arg]
    """Figures of one size, printed as they are measured (a 1M run takes many minutes)."""

    def append(self, row: tuple[str, str]) -> None:
        super().append(row)
        print(f"{row[0]:<32}  {row[1]}", flush=True)


def bench_size(n: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    print(f"\n== {n:,} vectors ==", flush=True)
    rows: list[tuple[str, str]] = Rows()
    nq = args.queries if n <= 200_000 else max(20, args.queries // 2)
    t0 = time.perf_counter()
    x, queries = synth(n, nq, args.seed, args.structure)
    ids = np.arange(1, n + 1, dtype=np.int64) * 3  # non-contiguous catalog-like keys
    rows.append(("data", f"{n:,} x {D}, {args.structure}-clustered (synth {time.perf_counter() - t0:.1f} s), "
                         f"{nq} held-out queries"))

    # exact references and numpy brute force
    np_p50, np_p95, truth = timed(lambda q: numpy_topk(x, q, ids), queries)
    rows.append(("numpy brute force", f"p50 {np_p50:.2f} ms  p95 {np_p95:.2f} ms"))

    base = rss_mb()
    flat = build_vectors(ids, x, force_type="flat")
    flat_mem = rss_mb() - base
    fl_p50, fl_p95, flat_res = timed(lambda q: flat.search(q, 10)[1], queries)
    rows.append(("exact IDMap2,Flat", f"build {flat.manifest['build_seconds']:.1f} s  mem {flat_mem:.0f} MB  "
                                      f"p50 {fl_p50:.2f} ms  p95 {fl_p95:.2f} ms  recall@10 {recall(flat_res, truth):.3f}"))
    flat = flat_res = None  # free the exact index before building the tuned one
    gc.collect()

    base = rss_mb()
    tuned = build_vectors(ids, x, force_type=args.force_type, target_recall=0.95)
    mem = rss_mb() - base
    m = tuned.manifest
    tu_p50, tu_p95, tuned_res = timed(lambda q: tuned.search(q, 10)[1], queries)
    rows.append(("tuned index", f"{m['index_type']} params {m['params']} ({m['choice_reason']})"))
    rows.append(("tuned index figures", f"build {m['build_seconds']:.1f} s  mem {mem:.0f} MB  p50 {tu_p50:.3f} ms  "
                                        f"p95 {tu_p95:.3f} ms  recall@10 {recall(tuned_res, truth):.3f} "
                                        f"(build-time estimate {m['recall_at_10']})"))

    rng = np.random.default_rng(args.seed + 7)
    for frac in SELECTIVITIES:
        n_sel = max(10, int(n * frac))
        sel = np.sort(rng.choice(ids, n_sel, replace=False))
        sub = x[(sel // 3) - 1]
        ftruth = [numpy_topk(sub, q, sel) for q in queries]
        plan = "exact scan" if tuned.plan_for(n_sel) == "exact" else "ANN + bitmap selector"
        f_p50, f_p95, fres = timed(lambda q, s=sel: tuned.search(q, 10, selector_ids=s)[1], queries)
        rows.append((f"filtered {frac:.1%} ({n_sel:,} ids)",
                     f"{plan}: p50 {f_p50:.2f} ms  p95 {f_p95:.2f} ms  recall@10 {recall(fres, ftruth):.3f}"))

    if not args.skip_duckdb:
        dq = queries[: (10 if n <= 200_000 else 3)]
        db_p50, _ = duckdb_topk(n, x, ids, dq)
        rows.append(("DuckDB array_cosine_similarity", f"p50 {db_p50:.1f} ms ({len(dq)} queries)"))
        rows.append(("ratio", f"tuned p50 is {db_p50 / tu_p50:.0f}x faster than DuckDB brute force"))
    rows.append(("ratio", f"tuned p50 is {np_p50 / tu_p50:.0f}x faster than numpy brute force, "
                          f"{fl_p50 / tu_p50:.0f}x faster than exact Flat"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma-separated vector counts (default 100000)")
    ap.add_argument("--full", action="store_true", help="run 100k and 1M")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force-type", default=None, help="flat | hnsw | ivf | ivf_fp16 (default: automatic)")
    ap.add_argument("--structure", choices=sorted(STRUCTURES), default="patient",
                    help="patient: clusters per patient (default); view: view-dominated, harder for ANN")
    ap.add_argument("--skip-duckdb", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([100_000, 1_000_000] if args.full else [100_000])
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, GPUs {faiss.get_num_gpus()}")
    report: dict[str, list[tuple[str, str]]] = {}
    for n in sizes:
        report[str(n)] = list(bench_size(n, args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
