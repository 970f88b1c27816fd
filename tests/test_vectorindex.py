"""Vector indexes: catalog keys as ids, exact filtered search, tuning, atomic persistence, stale-index refusal."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog, VideoRecord
from echosearch.errors import IndexMismatchError, QueryError
from echosearch.store import vectorindex as vx

D = 32
MODEL = {"name": "test", "weights_sha256": "x", "embed_dim": D, "preprocessing": {}}


def clustered(n: int, seed: int = 0, d: int = D) -> np.ndarray:
    """Unit vectors in clusters (patients) with noise: like echo embeddings, and not trivially easy."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 8), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d))
    return vx.normalise(x.astype(np.float32))


def check_exact(q: np.ndarray, scores: np.ndarray, ids: np.ndarray, keys: np.ndarray, x: np.ndarray,
                allowed: np.ndarray | None, k: int) -> None:
    """Results equal brute force over the allowed set: valid distinct ids, true scores, the top-k scores."""
    pool = np.arange(len(keys)) if allowed is None else np.flatnonzero(np.isin(keys, allowed))
    sims = vx.normalise(q) @ x[pool].T
    for i in range(len(q)):
        ref = np.sort(sims[i])[::-1][:k]
        assert ids.shape[1] == min(k, len(pool))
        assert len(set(ids[i].tolist())) == ids.shape[1]
        assert np.isin(ids[i], keys[pool]).all()
        true = {int(kk): float(s) for kk, s in zip(keys[pool], sims[i], strict=True)}
        np.testing.assert_allclose(scores[i], [true[int(j)] for j in ids[i]], atol=1e-4)
        np.testing.assert_allclose(scores[i], ref, atol=1e-4)


# one set of indexes over non-contiguous keys, shared by the property tests
N = 1200
X = clustered(N, seed=1)
KEYS = np.sort(np.random.default_rng(2).choice(10**6, N, replace=False)).astype(np.int64) * 7 + 3
INDEXES = {kind: vx.build_vectors(KEYS, X, force_type=kind, tune_queries=100) for kind in ("flat", "hnsw", "ivf")}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivf_fp16"])
def test_ids_are_catalog_keys_even_when_sparse_or_unsorted(kind: str) -> None:
    rng = np.random.default_rng(3)
    x = clustered(400, seed=4)
    keys = rng.choice(2**40, 400, replace=False).astype(np.int64)  # sparse, unsorted: no row-position meaning
    vi = vx.build_vectors(keys, x, force_type=kind, tune_queries=50)
    _, ids = vi.search(x[:50], 1)
    assert (ids[:, 0] == keys[:50]).mean() >= 0.95
    dense = np.arange(400, dtype=np.int64) * 2 + 5  # dense keys use the key -> row table
    vd = vx.build_vectors(dense, x, force_type=kind, tune_queries=50)
    _, ids = vd.search(x[:50], 1, selector_ids=dense[:60])
    assert (ids[:, 0] == dense[:50]).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["flat", "hnsw", "ivf"]), frac=st.sampled_from([0.0, 0.003, 0.05, 0.3, 0.9, 1.0]),
       k=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_filtered_search_equals_brute_force(kind: str, frac: float, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    allowed = np.sort(rng.choice(KEYS, int(round(frac * N)), replace=False))
    q = clustered(3, seed=seed + 1)
    vi = INDEXES[kind]
    scores, ids = vi.search(q, k, selector_ids=allowed)
    check_exact(q, scores, ids, KEYS, X, allowed, k)
    assert vi.available(allowed) == len(allowed)
    # the ANN-with-selector plan, widened to exhaustive parameters, is exact too
    wide = {"nprobe": 1e9, "k_factor": float(N), "efSearch": float(4 * N)}
    scores, ids = vi.search(q, k, selector_ids=allowed, plan="ann", params=wide)
    check_exact(q, scores, ids, KEYS, X, allowed, k)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_plan_with_tuned_parameters_keeps_recall(kind: str) -> None:
    vi = INDEXES[kind]
    assert vi.manifest["recall_at_10"] >= 0.95
    q = clustered(40, seed=9)
    allowed = KEYS[::3]
    _, got = vi.search(q, 10, selector_ids=allowed, plan="ann")
    _, ref = INDEXES["flat"].search(q, 10, selector_ids=allowed, plan="exact")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), ref.tolist(), strict=True)])
    assert recall >= 0.9


def test_per_call_params_never_mutate_the_index() -> None:
    vi = INDEXES["ivf"]
    ivf = faiss.extract_index_ivf(vi._inner)
    before = (ivf.nprobe, vi.params.copy())
    q = clustered(5, seed=11)
    s0, i0 = vi.search(q, 10)
    vi.search(q, 10, params={"nprobe": 1, "k_factor": 1})
    s1, i1 = vi.search(q, 10)
    assert (ivf.nprobe, vi.params) == before
    np.testing.assert_array_equal(i0, i1)


def test_fewer_than_k_available_and_empty_index() -> None:
    vi = INDEXES["ivf"]
    scores, ids = vi.search(X[:2], 10, selector_ids=[KEYS[5], KEYS[9], KEYS[9], -1, 123])
    assert ids.shape == (2, 2) and set(ids[0].tolist()) == {KEYS[5], KEYS[9]}
    empty = vx.build_vectors(np.zeros(0, np.int64), np.zeros((0, D), np.float32))
    assert empty.search(X[:1], 5)[1].shape == (1, 0)
    with pytest.raises(QueryError):
        vi.search(np.ones((1, D + 1), np.float32), 3)


def test_choice_rules() -> None:
    assert vx.choose_kind(1_000, 512)[0] == "flat"
    assert vx.choose_kind(1_000_000, 512, memory_budget=64 << 30)[0] == "ivf"
    assert vx.choose_kind(1_000_000, 512, memory_budget=1 << 30)[0] == "ivf_fp16"
    assert vx.nlist_for(1_000_000) == 4096 and vx.nlist_for(50) == 1
    assert vx.factory_string("ivf", 1_000_000) == "IDMap2,IVF4096,SQ8,RFlat"
    keys = np.arange(3000, dtype=np.int64)
    easy = vx.build_vectors(keys, clustered(3000, seed=5), latency_ms=1e-3, tune_queries=100)
    assert easy.kind == "ivf" and easy.manifest["recall_at_10"] >= 0.95
    noise = vx.normalise(np.random.default_rng(6).standard_normal((3000, D)).astype(np.float32))
    hard = vx.build_vectors(keys, noise, latency_ms=1e-3, tune_queries=100)  # IVF would scan most lists
    assert hard.kind == "flat" and "exact instead" in hard.manifest["choice_reason"]


# ---- catalog-backed persistence -------------------------------------------------------------
def make_catalog(root: Path, n_videos: int = 60, seed: int = 0) -> tuple[Path, np.ndarray]:
    cat = Catalog.open(root, create=True)
    cat.bind_model(MODEL)
    keys = [cat.record_video(VideoRecord(sha256=f"h{i}", path=f"/d/{i}.avi", size_bytes=1, kind="avi",
                                         patient_pseudonym=f"P{i // 6}", study_uid=f"1.2.{i // 3}",
                                         study_date=date(2020, 1, 1 + i % 28), view="A4C"))
            for i in range(n_videos)]
    vecs = clustered(n_videos, seed=seed)
    cat.store_video_embeddings(keys, vecs, [16] * n_videos)
    cat.close()
    return root, vecs


def test_saved_index_is_atomic_mmapped_and_matches(tmp_path: Path) -> None:
    root, vecs = make_catalog(tmp_path / "idx")
    with Catalog.open(root, read_only=True) as cat:
        built = vx.build_index(cat, "video", force_type="ivf")
        loaded = vx.load_index(root, "video", cat)
        again = vx.build_index(cat, "video", force_type="ivf")  # rebuilt from the catalog alone
    files = sorted(p.name for p in (root / "vectors").iterdir())
    assert files == ["video.faiss", "video.json"]  # no temporary files left
    manifest = json.loads((root / "vectors" / "video.json").read_text())
    assert manifest["model"] == MODEL and manifest["ntotal"] == 60 and manifest["recall_at_10"] is not None
    assert manifest["index_type"].startswith("IDMap2,IVF") and manifest["catalog_generation"] >= 1
    for other in (loaded, again):
        for sel in (None, built.ids[::4]):
            np.testing.assert_array_equal(built.search(vecs[:7], 5, selector_ids=sel)[1],
                                          other.search(vecs[:7], 5, selector_ids=sel)[1])


def test_failed_write_keeps_the_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = make_catalog(tmp_path / "idx")
    with Catalog.open(root, read_only=True) as cat:
        vx.build_index(cat, "video")
        before = (root / "vectors" / "video.faiss").read_bytes()

        def broken(index: faiss.Index, path: str) -> None:
            Path(path).write_bytes(b"partial")
            raise RuntimeError("disk full")

        monkeypatch.setattr(vx.faiss, "write_index", broken)
        with pytest.raises(RuntimeError):
            vx.build_index(cat, "video")
        monkeypatch.undo()
        assert (root / "vectors" / "video.faiss").read_bytes() == before
        assert sorted(p.name for p in (root / "vectors").iterdir()) == ["video.faiss", "video.json"]
        vx.load_index(root, "video", cat)


def test_stale_or_foreign_index_is_refused(tmp_path: Path) -> None:
    root, vecs = make_catalog(tmp_path / "idx")
    with Catalog.open(root, read_only=True) as cat:
        vx.build_index(cat, "video")
    with Catalog.open(root) as cat:  # the catalog changes after the build
        key = cat.record_video(VideoRecord(sha256="new", path="/d/new.avi", size_bytes=1, kind="avi",
                                           patient_pseudonym="P99", study_uid="9.9"))
        cat.store_video_embeddings([key], vecs[:1], [16])
    with Catalog.open(root, read_only=True) as cat, pytest.raises(IndexMismatchError, match="reindex"):
        vx.load_index(root, "video", cat)
    with Catalog.open(root, read_only=True) as cat:
        vx.build_index(cat, "video")
        vx.load_index(root, "video", cat)
        path = root / "vectors" / "video.json"
        good = json.loads(path.read_text())
        for change in ({"model": {**MODEL, "weights_sha256": "other"}}, {"ntotal": 5}):
            path.write_text(json.dumps({**good, **change}))
            with pytest.raises(IndexMismatchError, match="reindex"):
                vx.load_index(root, "video", cat)
        path.write_text(json.dumps(good))
        with (root / "vectors" / "video.faiss").open("ab") as fh:  # index file and manifest disagree
            fh.write(b"x")
        with pytest.raises(IndexMismatchError, match="reindex"):
            vx.load_index(root, "video", cat)
        with pytest.raises(IndexMismatchError, match="reindex"):
            vx.load_index(root, "study", cat)  # never built
