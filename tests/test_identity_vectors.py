"""Identity vectors as their own level: an identity encoder configured apart from the content model, stored per
video and study with their own vector indexes, read by the audit, matching and the change scan; older indexes
fall back to the content vectors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echosearch.catalog import SCHEMA_VERSION, Catalog
from echosearch.config import load_settings
from echosearch.errors import ConfigError, ModelMismatchError
from echosearch.identity import audit, load_studies, match_patients
from echosearch.identity.model import IdentityHead, load_identity_encoder, save_head
from echosearch.model.encode import l2_normalise, load_encoder
from echosearch.run.local import index_sources
from echosearch.store.vectorindex import load_index


def _index(cohort: Path, index_dir: Path, model_dir: Path, **kw: object) -> object:
    opts: dict[str, object] = {"model": f"local-dir:{model_dir}", "workers": 1, "batch_size": 24, "frames_per_video": 4}
    return index_sources([cohort], index_dir, load_settings(**{**opts, **kw}), progress=False)


def _random_head(random_model_dir: Path, folder: Path, seed: int = 3) -> Path:
    enc = load_encoder(f"local-dir:{random_model_dir}", device="cpu")
    ident = enc.identity
    torch.manual_seed(seed)
    tower = {"model": f"local-dir:{random_model_dir}", "name": ident["name"],
             "weights_sha256": ident["weights_sha256"], "embed_dim": ident["embed_dim"]}
    return save_head(folder, IdentityHead(int(ident["embed_dim"]), 32, 64), tower, {"seed": seed})


@pytest.fixture(scope="module")
def identity_index(small_cohort: Path, random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("identity")
    head = _random_head(random_model_dir, root / "head")
    summary = _index(small_cohort, root / "idx", random_model_dir, identity_model=str(head))
    assert summary.failed == 0  # type: ignore[attr-defined]
    return root / "idx", head


def test_identity_vectors_stored_for_every_video_and_study(identity_index: tuple[Path, Path],
                                                           random_model_dir: Path) -> None:
    idx, head = identity_index
    with Catalog.open(idx, read_only=True) as cat:
        counts = cat.counts()
        assert counts["video_identity"] == counts["videos"] == counts["video_embeddings"] > 0
        assert counts["study_identity"] == counts["studies"] == counts["study_embeddings"]
        ident = cat.get_manifest("identity_model")
        assert ident["kind"] == "head" and ident["embed_dim"] == 32 and ident["shares_content_tower"] is True
        assert ident["tower"]["weights_sha256"] == cat.get_manifest("model")["weights_sha256"]
        assert cat.info()["identity"].startswith("head (head, 32-d)")
        vids, vvecs = cat.embeddings("video_identity")
        cids, cvecs = cat.embeddings("video")
        assert np.array_equal(vids, cids) and vvecs.shape[1] == 32
        assert np.allclose(np.linalg.norm(vvecs, axis=1), 1, atol=1e-5)
        # the head applied to the content video vector: the shared tower ran once
        enc = load_identity_encoder(str(head), load_encoder(f"local-dir:{random_model_dir}", device="cpu"))
        assert enc.shares_content_tower
        assert np.allclose(enc.apply_head(cvecs), vvecs, atol=1e-5)
        # a study's identity vector pools its videos' like the content vectors
        sk = int(cat.con.sql("SELECT min(study_key) FROM studies").fetchall()[0][0])
        vk = [r[0] for r in cat.con.execute("SELECT video_key FROM videos WHERE study_key = ?", [sk]).fetchall()]
        _, sv = cat.embeddings("study_identity", [sk])
        _, own = cat.embeddings("video_identity", vk)
        assert np.allclose(sv[0], l2_normalise(own.mean(axis=0)), atol=1e-5)
        # its own FAISS level, current with the catalog
        vi = load_index(idx, "study_identity", cat)
        assert vi.ntotal == counts["studies"] and vi.dim == 32


def test_audit_and_matching_read_identity_vectors(identity_index: tuple[Path, Path]) -> None:
    idx, _ = identity_index
    with Catalog.open(idx) as cat:
        S = load_studies(cat)
        assert S.source == "identity" and S.vecs.shape[1] == 32
        assert load_studies(cat, "content").vecs.shape[1] == 256  # search keeps the content vectors
        df = audit(cat, store=False)
        row = df.filter(df["n_refs"] >= 1).row(0, named=True)
        i = S.row(row["study_key"])
        others = np.nonzero((S.patient == S.patient[i]) & (S.keys != S.keys[i]))[0]
        cos = np.sort(S.vecs[others] @ S.vecs[i])[::-1][:2]
        assert row["own_score"] == pytest.approx(float(cos.mean()), abs=1e-5)
        top = match_patients(cat, int(S.keys[i]), k_patients=3).row(0, named=True)
        theirs = np.nonzero((S.patient == top["patient_key"]) & (S.keys != S.keys[i]))[0]
        assert top["supporting_cosines"][0] == pytest.approx(float(np.max(S.vecs[theirs] @ S.vecs[i])), abs=1e-4)


def test_rerun_keeps_identity_and_other_identity_models_are_refused(identity_index: tuple[Path, Path],
                                                                    small_cohort: Path, random_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    idx, head = identity_index
    # a rerun without the setting uses the identity model the index recorded (nothing new to encode)
    summary = _index(small_cohort, idx, random_model_dir)
    assert summary.videos_encoded == 0  # type: ignore[attr-defined]
    other = _random_head(random_model_dir, tmp_path / "other", seed=4)
    with pytest.raises(ModelMismatchError, match="identity"):
        _index(small_cohort, idx, random_model_dir, identity_model=str(other))


def test_old_index_without_identity_falls_back_to_content(small_cohort: Path, random_model_dir: Path,
                                                          tmp_path: Path) -> None:
    idx = tmp_path / "old"
    _index(small_cohort, idx, random_model_dir)
    with Catalog.open(idx) as cat:  # as an index written before schema version 3
        cat.con.execute("DELETE FROM schema_migrations WHERE version >= 3")  # later migrations re-apply safely
        cat.con.execute("UPDATE manifest SET value = '2' WHERE key = 'schema_version'")
        assert not cat.has_table("video_identity")
    with Catalog.open(idx, read_only=True) as cat:  # read-only commands open it without migrating
        assert cat.schema_version() == 2
        assert cat.info()["identity"] == "content vectors (no identity model)"
        assert load_studies(cat).source == "content"
    out = subprocess.run([sys.executable, "-m", "echosearch", "info", "--index", str(idx)], capture_output=True,
                         text=True, check=True).stdout
    assert "identity: content vectors (no identity model)" in out
    with Catalog.open(idx) as cat:
        assert cat.schema_version() == SCHEMA_VERSION
        df = audit(cat, store=False)
        assert df.height > 0 and df["own_score"].drop_nulls().len() > 0
    data = json.loads(subprocess.run([sys.executable, "-m", "echosearch", "info", "--index", str(idx), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert data["identity"] == "content vectors (no identity model)" and "study_identity" not in data["vector_indexes"]
    # videos encoded without identity vectors: an identity model is refused rather than leaving them without
    head = _random_head(random_model_dir, tmp_path / "head")
    with pytest.raises(ConfigError, match="without identity"):
        _index(small_cohort, idx, random_model_dir, identity_model=str(head))


def test_change_scan_reads_identity_for_different_heart(identity_index: tuple[Path, Path]) -> None:
    from echosearch.change import scan_changes

    idx, _ = identity_index
    with Catalog.open(idx) as cat:
        df = scan_changes(cat, store=False)
        S, C = load_studies(cat), load_studies(cat, "content")
        row = df.filter(df["prev_study_key"].is_not_null()).row(0, named=True)
        a, b = S.row(row["study_key"]), S.row(row["prev_study_key"])
        ca, cb = C.row(row["study_key"]), C.row(row["prev_study_key"])
        assert row["score_prev"] == pytest.approx(1 - float(C.vecs[ca] @ C.vecs[cb]), abs=1e-5)  # change: content
        from echosearch.identity import fit_identity_calibrations

        pair, _ = fit_identity_calibrations(cat, S)
        assert row["p_same_prev"] == pytest.approx(float(pair.predict(float(S.vecs[a] @ S.vecs[b]))), abs=1e-6)


def test_train_identity_is_deterministic_and_its_head_is_an_identity_model(
        small_cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    from echosearch.identity.model import HEAD_CONFIG, HEAD_WEIGHTS
    from echosearch.identity.train import IdentityTrainConfig, train_identity

    idx = tmp_path / "idx"
    _index(small_cohort, idx, random_model_dir, keep_frame_embeddings=True)  # features read from the catalog
    cfg = IdentityTrainConfig(method="head", epochs=3, steps_per_epoch=4, seed=5, hidden=32, out_dim=16,
                              residual=False)
    a = train_identity(idx, tmp_path / "a", cfg)
    out = subprocess.run([sys.executable, "-m", "echosearch", "train-identity", "--index", str(idx), "--out",
                          str(tmp_path / "b"), "--method", "head", "--epochs", "3", "--seed", "5", "--hidden", "32", "--dim", "16",
                          "--projection", "--json"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "a" / HEAD_WEIGHTS).read_bytes() != b""
    # same seed, same data: the same weights (the CLI's steps per epoch are the default, so train again here)
    b = train_identity(idx, tmp_path / "c", cfg)
    assert (tmp_path / "a" / HEAD_WEIGHTS).read_bytes() == (tmp_path / "c" / HEAD_WEIGHTS).read_bytes()
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    # held-out patients are never trained on; the AUC of head and content vectors on the same pairs, per epoch
    assert a.n_holdout_patients >= 2 and a.n_holdout_studies >= 4
    assert all("heldout_auc" in h and h["content_auc"] == a.content_auc for h in a.history)
    cfg_json = json.loads((tmp_path / "b" / HEAD_CONFIG).read_text())
    assert cfg_json["training"]["seed"] == 5 and cfg_json["tower"]["model"] == f"local-dir:{random_model_dir.resolve()}"
    enc = load_identity_encoder(str(tmp_path / "a"), load_encoder(f"local-dir:{random_model_dir}", device="cpu"))
    assert enc.kind == "head" and enc.shares_content_tower and enc.embed_dim == 16


def test_match_a_video_file_on_identity_vectors(identity_index: tuple[Path, Path], small_cohort: Path) -> None:
    idx, _ = identity_index
    f = sorted((small_cohort / "dicom").rglob("*.dcm"))[0]
    out = subprocess.run([sys.executable, "-m", "echosearch", "match", "--index", str(idx), "--video", str(f), "-k", "3",
                          "--json"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    cands = json.loads(out.stdout)["candidates"]
    assert 1 <= len(cands) <= 3 and all(0.0 <= c["p_same"] <= 1.0 for c in cands)
    with Catalog.open(idx, read_only=True) as cat:  # the file's own study is indexed: its patient comes first
        own = cat.con.execute("SELECT s.patient_key FROM videos v JOIN studies s USING (study_key) "
                              "WHERE v.sha256 = ?", [hashlib.sha256(f.read_bytes()).hexdigest()]
                              ).fetchall()[0][0]
    assert cands[0]["patient_key"] == own
    bad = subprocess.run([sys.executable, "-m", "echosearch", "match", "--index", str(idx)], capture_output=True,
                         text=True, check=False)
    assert bad.returncode != 0 and "--study" in bad.stderr


def test_residual_head_starts_from_the_tower_vectors() -> None:
    head = IdentityHead(8, hidden=4, residual=True)
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert head.out_dim == 8 and torch.allclose(head(x), x, atol=1e-6)  # training moves it from there


def test_trained_identity_models_beat_content_vectors_on_held_out_patients(tmp_path: Path) -> None:
    """80 synthetic patients over 2-4 visits, 5 % of studies under another patient's ID, the shipped model's
    tower: the cross-visit study-pair AUC on held-out patients of an identity map and of a head (each fitted on
    the other patients) beats the content vectors' on the same pairs (head measured 0.868 vs 0.722 at seed 0;
    seeds 1 and 2: 0.788 vs 0.720, 0.810 vs 0.766)."""
    from conftest import demo_model_available

    from echosearch.identity.train import IdentityTrainConfig, train_identity
    from echosearch.synth import generate_cohort

    if not demo_model_available():
        pytest.skip("the shipped demo model is not built")
    generate_cohort(tmp_path / "c", patients=80, seed=2024, visits=(2, 4), views=("A4C", "PLAX"), mislabel_rate=0.05)
    index_sources([tmp_path / "c"], tmp_path / "idx", load_settings(
        model="echosearch-demo", workers=1, frames_per_video=4, keep_frame_embeddings=True), progress=False)
    for method in ("map", "head"):
        res = train_identity(tmp_path / "idx", tmp_path / method, IdentityTrainConfig(method=method, seed=0))
        assert res.n_holdout_patients >= 15 and res.content_auc is not None and res.identity_auc is not None
        assert res.identity_auc > res.content_auc + 0.03, method
        assert 0 < len(res.dropped_study_keys) <= 0.1 * (res.n_train_studies + len(res.dropped_study_keys))


@pytest.mark.parametrize("pool", ["video", "frame"])
def test_training_pools_as_indexing_does(pool: str) -> None:
    """The study vectors a head is trained on are the ones indexing stores: frames pooled per video (before
    or after the head), videos per study, each level L2-normalised."""
    from echosearch.identity.model import IdentityEncoder
    from echosearch.identity.train import Features, _Data

    rng = np.random.default_rng(0)
    frames = [l2_normalise(rng.normal(size=(int(n), 8))).astype(np.float32) for n in rng.integers(2, 6, 7)]
    video_study = np.array([0, 0, 1, 1, 1, 2, 2])
    feats = Features(frames, video_study, np.array([10, 11, 12]), np.array([1, 1, 2]), {})
    torch.manual_seed(0)
    head = IdentityHead(8, 4, 6, pool=pool).eval()
    torch.nn.init.normal_(head.net[0].weight)  # type: ignore[index]
    with torch.no_grad():
        trained = _Data(feats).study_vectors(head, torch.arange(3)).numpy()
    enc = IdentityEncoder("h", "h", "head", head, None, {}, None, 4)
    vids = enc.video_vectors([np.zeros((len(f), 2, 2, 3), np.uint8) for f in frames], frames)
    stored = np.stack([l2_normalise(vids[video_study == s].mean(axis=0)) for s in range(3)])
    assert np.allclose(trained, stored, atol=1e-5)
    if pool == "frame":  # not the same as mapping the pooled vector
        pooled = enc.apply_head(np.stack([l2_normalise(f.mean(axis=0)) for f in frames]))
        assert not np.allclose(pooled, vids, atol=1e-3)


def test_backfill_gives_an_old_index_the_vectors_indexing_would_store(
        identity_index: tuple[Path, Path], small_cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    from echosearch.identity.model import backfill_identity

    built, head = identity_index
    idx = tmp_path / "old"
    _index(small_cohort, idx, random_model_dir)
    with Catalog.open(idx) as cat:
        assert not cat.has_identity()
        enc = load_identity_encoder(str(head), load_encoder(f"local-dir:{random_model_dir}", device="cpu"))
        assert backfill_identity(cat, enc) == cat.counts()["videos"] > 0
        assert cat.has_identity() and backfill_identity(cat, enc) == 0  # once only
        assert load_index(idx, "study_identity", cat).ntotal == cat.counts()["studies"]
        got = dict(zip(*[x.tolist() for x in cat.embeddings("study_identity")], strict=True))
        uid = dict(cat.con.sql("SELECT study_key, study_uid FROM studies").fetchall())
        other = _random_head(random_model_dir, tmp_path / "other", seed=4)
        with pytest.raises(ModelMismatchError):
            backfill_identity(cat, load_identity_encoder(str(other), enc.tower or load_encoder(
                f"local-dir:{random_model_dir}", device="cpu")))
    with Catalog.open(built, read_only=True) as cat:
        want = dict(zip(*[x.tolist() for x in cat.embeddings("study_identity")], strict=True))
        uid_b = dict(cat.con.sql("SELECT study_key, study_uid FROM studies").fetchall())
    by_uid = {uid_b[k]: v for k, v in want.items()}
    assert len(got) == len(by_uid)
    assert all(np.allclose(v, by_uid[uid[k]], atol=1e-5) for k, v in got.items())


def test_shipped_demo_head_is_demo_modes_identity_model() -> None:
    from echosearch.identity.model import HEAD_CONFIG, demo_identity_head
    from echosearch.model.models import resolve_model, weights_sha256

    head = demo_identity_head()
    if head is None:
        pytest.skip("no identity head shipped with the demo model")
    assert load_settings(mode="demo", secret="x" * 16).identity_model == str(head)
    assert load_settings(mode="demo", identity_model="none").identity_model is None  # opt out
    assert load_settings(mode="demo", model="echo-clip").identity_model is None  # the head fits its own tower only
    assert load_settings(secret="x" * 16).identity_model is None  # production: only when configured
    cfg = json.loads((head / HEAD_CONFIG).read_text())
    src = resolve_model("echosearch-demo")
    assert src.weights is not None and cfg["tower"]["model"] == "echosearch-demo"
    assert cfg["tower"]["weights_sha256"] == weights_sha256(src.weights), "trained on the shipped tower"
    t = cfg["training"]
    assert t["seed"] == 0 and "seed 31337" in t["data"] and t["command"].startswith("echosearch train-identity")
    text = (head / HEAD_CONFIG).read_text()
    assert "/tmp/" not in text and "/work/" not in text and "/root" not in text  # no machine path ships
    folder = src.weights.parent
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 40 * 2**20
