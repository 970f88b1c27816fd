"""Study-context search cost: `Searcher.by_vector(q, k, context=0.5)` against the same query at context 0.

A catalog of synthetic clips (bench/search.py's patient-structured vectors, 8 clips a study, 3 studies a
patient; study vectors = their clips' normalised mean) is indexed as `echosearch index` would, then the same
held-out queries are timed through the query API, unfiltered and with a one-view filter (1/8 of the clips),
and the context results are checked against a full scan. Prints ms per query and the ratio. Usage:

    .venv/bin/python bench/context_search.py [--clips 24000] [--queries 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search import N_VIEWS, STUDIES_PER_PATIENT, VIDEOS_PER_STUDY, synth  # noqa: E402

from echosearch.catalog import Catalog, VideoRecord  # noqa: E402
from echosearch.filters import Filters  # noqa: E402
from echosearch.query import Searcher, context_score  # noqa: E402
from echosearch.store.vectorindex import build_all, normalise  # noqa: E402

VIEWS = [f"V{i}" for i in range(N_VIEWS)]


def build(root: Path, x: np.ndarray) -> None:
    """Catalog + vector indexes for clip vectors ``x`` in synth's order (8 clips a study)."""
    n = len(x)
    cat = Catalog.open(root, create=True)
    cat.bind_model({"name": "bench", "weights_sha256": "bench", "embed_dim": x.shape[1], "preprocessing": {}})
    keys: list[int] = []
    per_patient = VIDEOS_PER_STUDY * STUDIES_PER_PATIENT
    for start in range(0, n, 4000):
        recs = [VideoRecord(sha256=f"c{i}", path=f"/b/{i}.dcm", size_bytes=1, kind="dicom",
                            patient_pseudonym=f"P{i // per_patient}", study_uid=f"1.7.{i // VIDEOS_PER_STUDY}",
                            view=VIEWS[i % N_VIEWS]) for i in range(start, min(n, start + 4000))]
        got = cat.record_videos(recs)
        keys += [got[r.sha256] for r in recs]
    cat.store_video_embeddings(keys, x, [16] * n)
    n_studies = n // VIDEOS_PER_STUDY
    smap = dict(cat.con.sql("SELECT study_uid, study_key FROM studies").fetchall())
    svec = normalise(x[: n_studies * VIDEOS_PER_STUDY].reshape(n_studies, VIDEOS_PER_STUDY, -1).mean(1))
    cat.store_level_embeddings("study", [smap[f"1.7.{s}"] for s in range(n_studies)], svec,
                               [VIDEOS_PER_STUDY] * n_studies)
    build_all(cat)
    cat.close()


def timed(s: Searcher, queries: np.ndarray, **kw: object) -> tuple[float, list[np.ndarray]]:
    out = [s.by_vector(q, 10, **kw)["video_key"].to_numpy() for q in queries[:5]]  # warm-up
    t0 = time.perf_counter()
    out = [s.by_vector(q, 10, **kw)["video_key"].to_numpy() for q in queries]
    return (time.perf_counter() - t0) / len(queries) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=24_000)
    ap.add_argument("--queries", type=int, default=100)
    a = ap.parse_args()
    x, queries = synth(a.clips - a.clips % VIDEOS_PER_STUDY, a.queries, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build(Path(tmp) / "idx", x)
        print(f"{len(x)} clips, {len(x) // VIDEOS_PER_STUDY} studies indexed in {time.perf_counter() - t0:.1f} s")
        with Searcher(Path(tmp) / "idx") as s:
            ids, vecs = s.catalog.embeddings("video")
            sids, svecs = s.catalog.embeddings("study")
            study_of = s._study_of(ids)
            srow = np.searchsorted(sids, study_of)
            for label, f in (("unfiltered", None), ("one view (1/8)", Filters(views=("V3",)))):
                plain, _ = timed(s, queries, filters=f)
                ctx, got = timed(s, queries, filters=f, context=0.5)
                allowed = np.ones(len(ids), bool) if f is None else np.isin(ids, s.catalog.con.sql(
                    "SELECT video_key FROM videos WHERE view = 'V3'").fetchnumpy()["video_key"])
                exact = 0
                for q, g in zip(queries, got, strict=True):
                    sc = context_score(vecs @ q, svecs[srow] @ q, 0.5)
                    sc[~allowed] = -np.inf
                    exact += len(set(ids[np.argsort(-sc)[:10]].tolist()) & set(g.tolist())) / 10
                print(f"{label:16s} context 0: {plain:6.2f} ms/query | context 0.5: {ctx:6.2f} ms/query "
                      f"(x{ctx / plain:.2f}) | top-10 overlap with a full scan {exact / len(queries):.3f}")


if __name__ == "__main__":
    main()
