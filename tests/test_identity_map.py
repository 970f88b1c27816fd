"""Identity maps (``train-identity --method map``): a closed-form projection of the tower's frame-mean activation
maps, fitted on the recorded patients, saved as a folder the ``identity_model`` setting loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog
from echosearch.config import load_settings
from echosearch.identity.map import MAP_WEIGHTS, fit_projection
from echosearch.identity.model import HEAD_CONFIG, backfill_identity, load_identity_encoder
from echosearch.identity.train import IdentityTrainConfig, pair_auc, train_identity
from echosearch.model.encode import l2_normalise, load_encoder
from echosearch.run.local import index_sources


def _index(cohort: Path, index_dir: Path, model_dir: Path, **kw: object) -> object:
    opts: dict[str, object] = {"model": f"local-dir:{model_dir}", "workers": 1, "batch_size": 24,
                               "frames_per_video": 4}
    return index_sources([cohort], index_dir, load_settings(**{**opts, **kw}), progress=False)


def _cohort_vectors(rng: np.random.Generator, patients: int, visits: int, dim: int, nuisance: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of patients' visits: a small per-patient signal in some directions, large visit-to-visit
    noise in others (what a within-patient whitening should shrink)."""
    ident = rng.normal(size=(patients, dim)) * np.r_[np.ones(dim // 2), np.zeros(dim - dim // 2)]
    noisy = np.r_[np.full(dim // 2, 0.3), np.full(dim - dim // 2, nuisance)]
    x = np.repeat(ident, visits, axis=0) + rng.normal(size=(patients * visits, dim)) * noisy
    return x, np.repeat(np.arange(patients), visits)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), nuisance=st.floats(2.0, 6.0))
def test_fit_separates_patients_better_than_the_raw_vectors(seed: int, nuisance: float) -> None:
    rng = np.random.default_rng(seed)
    x, y = _cohort_vectors(rng, 60, 3, 24, nuisance)
    proj = fit_projection(x, y, components=24)
    xt, yt = _cohort_vectors(np.random.default_rng(seed + 1), 30, 3, 24, nuisance)  # other patients
    raw = pair_auc(l2_normalise(xt - x.mean(0)), yt)
    fitted = pair_auc(proj(xt), yt)
    assert raw is not None and fitted is not None and fitted > raw + 0.05
    z = proj(xt)
    assert z.shape == (90, 24) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)


def test_fit_refuses_what_it_cannot_fit() -> None:
    from echosearch.errors import EchosearchError

    with pytest.raises(EchosearchError, match="two or more"):
        fit_projection(np.random.default_rng(0).normal(size=(6, 5)), np.arange(6), components=4)


@pytest.fixture(scope="module")
def content_index(small_cohort: Path, random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    idx = tmp_path_factory.mktemp("mapidx") / "idx"
    assert _index(small_cohort, idx, random_model_dir).failed == 0  # type: ignore[attr-defined]
    return idx


def test_train_map_is_deterministic_and_loads_as_an_identity_model(
        content_index: Path, random_model_dir: Path, tmp_path: Path) -> None:
    cfg = IdentityTrainConfig(seed=3, components=16, holdout=0.34)
    a = train_identity(content_index, tmp_path / "a", cfg)
    b = train_identity(content_index, tmp_path / "b", cfg)
    assert (tmp_path / "a" / MAP_WEIGHTS).read_bytes() == (tmp_path / "b" / MAP_WEIGHTS).read_bytes()
    assert a.n_holdout_patients >= 1 and a.n_train_studies > 0 and a.history
    assert [h.get("heldout_auc") for h in a.history] == [h.get("heldout_auc") for h in b.history]
    assert all(h["content_auc"] == a.content_auc for h in a.history)
    cfg_json = json.loads((tmp_path / "a" / HEAD_CONFIG).read_text())
    assert cfg_json["format"] == "echosearch-identity-map" and cfg_json["map"]["shape"] == [160, 7, 7]
    assert cfg_json["training"]["seed"] == 3 and cfg_json["training"]["config"]["method"] == "map"
    enc = load_identity_encoder(str(tmp_path / "a"), load_encoder(f"local-dir:{random_model_dir}", device="cpu"))
    assert enc.kind == "map" and not enc.shares_content_tower and enc.embed_dim == 16
    assert enc.manifest["shares_early_stages"] is True and enc.manifest["shared_stages"] == 3
    # the CLI runs the same fit and records the command
    out = subprocess.run([sys.executable, "-m", "echosearch", "train-identity", "--index", str(content_index), "--out",
                          str(tmp_path / "c"), "--seed", "3", "--components", "16", "--holdout", "0.34", "--json"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c" / MAP_WEIGHTS).read_bytes() == (tmp_path / "a" / MAP_WEIGHTS).read_bytes()
    assert json.loads((tmp_path / "c" / HEAD_CONFIG).read_text())["training"]["command"].startswith(
        "echosearch train-identity --index idx --out c --method map --components 16")


def test_indexing_with_a_map_stores_what_decoding_again_computes(
        content_index: Path, small_cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    """Indexing takes the split activations from the content encoder's own pass (the tap); backfilling an old
    index decodes the files again and computes them: the same identity vectors."""
    folder = tmp_path / "map"
    train_identity(content_index, folder, IdentityTrainConfig(seed=0, components=12, holdout=0.0, clean=False))
    built = tmp_path / "built"
    assert _index(small_cohort, built, random_model_dir, identity_model=str(folder)).failed == 0  # type: ignore[attr-defined]
    old = tmp_path / "old"
    _index(small_cohort, old, random_model_dir)
    with Catalog.open(old) as cat:
        from echosearch.model.encode import encoder_for_index

        enc = load_identity_encoder(str(folder), encoder_for_index(cat, device="cpu"))
        assert backfill_identity(cat, enc) == cat.counts()["videos"]
        uid = dict(cat.con.sql("SELECT video_key, sha256 FROM videos").fetchall())
        got = {uid[int(k)]: v for k, v in zip(*cat.embeddings("video_identity"), strict=True)}
    with Catalog.open(built, read_only=True) as cat:
        assert cat.get_manifest("identity_model")["kind"] == "map"
        uid = dict(cat.con.sql("SELECT video_key, sha256 FROM videos").fetchall())
        want = {uid[int(k)]: v for k, v in zip(*cat.embeddings("video_identity"), strict=True)}
    assert set(got) == set(want) and len(got) > 0
    assert all(np.allclose(got[k], want[k], atol=1e-4) for k in want)
