"""Scale benchmark: the local runner and the Ray Data runner on the same cohort, and vector indexes built from the
catalog chunk by chunk (as ``merge`` builds them) against the in-memory build.

1. A synthetic cohort (its own seed: not one the tests use) indexed by both runners into two folders; prints
   each runner's wall time and clips/s, the Ray run's stages (driver setup, Ray start, units, merge) and
   whether the two catalogs hold the same rows and vectors (``echosearch.run.compare``).
2. ``--vectors`` clustered vectors stored in a catalog; the video index built with the whole level in memory
   and built ``--chunk-rows`` at a time; recall@10 of both against exact search on held-out queries.

Ray on one small machine adds start-up, serialisation and memory and gains nothing: the figures state that
overhead; the runner is for clusters (docs/scale.md). Usage:

    .venv/bin/python bench/scale.py                       # 6 patients, 50k vectors
    .venv/bin/python bench/scale.py --patients 12 --vectors 200000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def runners(work: Path, patients: int, seed: int, unit_files: int, cpus: int) -> dict[str, Any]:
    from echosearch.catalog import Catalog
    from echosearch.config import load_settings
    from echosearch.run.compare import catalog_differences
    from echosearch.run.local import index_sources
    from echosearch.run.ray_runner import index_with_ray
    from echosearch.synth import generate_cohort

    cohort = work / "cohort"
    generate_cohort(cohort, patients=patients, seed=seed, visits=(2, 3), views=("A4C", "PLAX"), workers=1)
    settings = load_settings(model="echosearch-demo", device="cpu", workers=max(1, cpus - 1))
    t0 = time.perf_counter()
    local = index_sources([cohort], work / "local", settings, progress=False)
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    ray = index_with_ray([cohort], work / "ray", settings, num_cpus=cpus, unit_files=unit_files, progress=False)
    t_ray = time.perf_counter() - t0
    clips = local.videos_encoded
    diffs = catalog_differences(work / "local", work / "ray")
    gaps = {}
    with Catalog.open(work / "local", read_only=True) as ca, Catalog.open(work / "ray", read_only=True) as cb:
        for level in ("video", "study", "report"):
            (ia, va), (ib, vb) = ca.embeddings(level), cb.embeddings(level)
            gaps[level] = float(np.abs(va - vb).max()) if np.array_equal(ia, ib) and len(ia) else None
    return {
        "clips": clips, "frames_per_clip": settings.frames_per_video, "cpus": cpus, "unit_files": unit_files,
        "units": ray.units,
        "local": {"wall_s": round(t_local, 2), "clips_per_s": round(clips / t_local, 2),
                  "stages_s": local.stage_seconds,
                  "encode_clips_per_s": round(clips / max(local.stage_seconds.get("scan_encode", 0), 1e-9), 2)},
        "ray": {"wall_s": round(t_ray, 2), "clips_per_s": round(clips / t_ray, 2), "stages_s": ray.stage_seconds,
                "encode_clips_per_s": round(clips / max(ray.stage_seconds.get("units", 0), 1e-9), 2),
                "actors": ray.actors},
        "ray_over_local_wall": round(t_ray / t_local, 2),
        "catalogs_equal": not diffs, "differences": diffs, "max_vector_gap": gaps,
    }


def _vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(8, n // 500), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(vi: Any, x: np.ndarray, keys: np.ndarray, q: np.ndarray, k: int = 10) -> float:
    import faiss

    _, truth = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, got = vi.search(q, k, plan="ann")
    return float(np.mean([len(set(keys[t].tolist()) & set(g.tolist())) / k for t, g in zip(truth, got, strict=True)]))


def chunked_index(work: Path, n: int, d: int, chunk_rows: int, seed: int, kind: str) -> dict[str, Any]:
    from echosearch.catalog import Catalog
    from echosearch.store.vectorindex import build_index

    x = _vectors(n + 500, d, seed)
    base, q = x[:n], x[n:]  # held-out queries: not in the index
    keys = np.arange(n, dtype=np.int64) * 2 + 1
    out: dict[str, Any] = {"vectors": n, "dim": d, "chunk_rows": chunk_rows, "kind": kind, "queries": len(q)}
    with Catalog.open(work / "vec", create=True) as cat:
        cat.bind_model({"name": "bench", "weights_sha256": "0", "embed_dim": d, "preprocessing": {}})
        for i in range(0, n, 50_000):
            cat.store_video_embeddings(keys[i:i + 50_000].tolist(), base[i:i + 50_000], [1] * len(base[i:i + 50_000]))
        for name, chunk in (("in_memory", None), ("chunked", chunk_rows)):
            t0 = time.perf_counter()
            vi = build_index(cat, "video", force_type=kind, chunk_rows=chunk)
            out[name] = {"build_s": round(time.perf_counter() - t0, 2), "params": vi.manifest["params"],
                         "tuned_recall_at_10": vi.manifest.get("recall_at_10"),
                         "heldout_recall_at_10": round(_recall(vi, base, keys, q), 4)}
    out["recall_equal"] = out["in_memory"]["heldout_recall_at_10"] == out["chunked"]["heldout_recall_at_10"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=2028, help="cohort seed (the tests use others)")
    ap.add_argument("--unit-files", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 2))
    ap.add_argument("--vectors", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--kind", default="ivf", choices=["ivf", "ivf_fp16"])
    ap.add_argument("--skip-runners", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    os.environ.setdefault("ECHOSEARCH_SECRET", "bench-secret-0123456789abcdef")
    work = Path(tempfile.mkdtemp(prefix="echosearch-scale-"))
    result: dict[str, Any] = {"cpus_on_machine": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        if not a.skip_runners:
            result["runners"] = runners(work, a.patients, a.seed, a.unit_files, a.cpus)
            r = result["runners"]
            print(f"{r['clips']} clips, {a.cpus} CPUs: local {r['local']['wall_s']} s ({r['local']['clips_per_s']} "
                  f"clips/s), Ray {r['ray']['wall_s']} s ({r['ray']['clips_per_s']} clips/s) = "
                  f"{r['ray_over_local_wall']}x the local wall time; Ray stages {r['ray']['stages_s']}; "
                  f"catalogs equal: {r['catalogs_equal']}")
        v = result["vector_index"] = chunked_index(work, a.vectors, a.dim, a.chunk_rows, a.seed, a.kind)
        print(f"{v['vectors']} x {v['dim']} {v['kind']}: held-out recall@10 in memory "
              f"{v['in_memory']['heldout_recall_at_10']} ({v['in_memory']['build_s']} s), chunked by "
              f"{v['chunk_rows']} {v['chunked']['heldout_recall_at_10']} ({v['chunked']['build_s']} s); "
              f"equal: {v['recall_equal']}")
        result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
        if a.json:
            a.json.write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps(result, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
