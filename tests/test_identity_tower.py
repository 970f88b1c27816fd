"""Identity towers: shared frozen early stages + a fine-tuned copy of the last stages + a head
(``train-identity --train-stages K``), saved as a folder the ``identity_model`` setting loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echosearch.catalog import Catalog
from echosearch.config import load_settings
from echosearch.identity.model import HEAD_CONFIG, HEAD_WEIGHTS, IdentityHead, load_identity_encoder, save_head
from echosearch.identity.tower import TAIL_WEIGHTS, TailRunner, TowerTail
from echosearch.model.encode import l2_normalise, load_encoder
from echosearch.run.local import index_sources


def _index(cohort: Path, index_dir: Path, model_dir: Path, **kw: object) -> object:
    opts: dict[str, object] = {"model": f"local-dir:{model_dir}", "workers": 1, "batch_size": 24, "frames_per_video": 4}
    return index_sources([cohort], index_dir, load_settings(**{**opts, **kw}), progress=False)


@pytest.fixture(scope="module")
def content_index(small_cohort: Path, random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    idx = tmp_path_factory.mktemp("tower") / "idx"
    assert _index(small_cohort, idx, random_model_dir).failed == 0  # type: ignore[attr-defined]
    return idx


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 112, 112, 3), dtype=np.uint8)


@pytest.mark.parametrize("stages", [1, 2])
def test_a_fresh_tail_is_the_content_tower_and_reuses_its_early_stages(random_model_dir: Path, stages: int) -> None:
    enc = load_encoder(f"local-dir:{random_model_dir}", device="cpu")
    frames = _frames(30)
    want = enc.encode_frames(frames, batch_size=8)
    tail = TowerTail(enc.model.visual, 4 - stages)
    runner = TailRunner(enc, tail, shared=True)
    enc.encode_frames(frames, batch_size=8)  # the content pass, as indexing runs it: the tap keeps its activations
    got = runner.frame_vectors([frames[:10], frames[10:]])
    assert runner.tap is not None and runner.tap.hits == 30 and runner.tap.misses == 0
    assert np.allclose(np.concatenate(got), want, atol=1e-5)
    # nothing in the tap (or other frames): computed, with the same result
    other = _frames(5, seed=1)
    assert np.allclose(runner.frame_vectors([other])[0], enc.encode_frames(other), atol=1e-5)
    assert runner.tap.misses == 5
    enc.encode_frames(frames[:5])
    assert np.allclose(runner.frame_vectors([other])[0], enc.encode_frames(other), atol=1e-5)  # wrong frames
    assert runner.tap.misses == 10


def test_tower_training_is_deterministic_and_round_trips(content_index: Path, random_model_dir: Path,
                                                         small_cohort: Path, tmp_path: Path) -> None:
    from echosearch.identity.model import backfill_identity
    from echosearch.identity.tower_train import _TowerData, tower_activations
    from echosearch.identity.train import IdentityTrainConfig, train_identity

    cfg = IdentityTrainConfig(epochs=2, steps_per_epoch=2, seed=5, hidden=32, batch_patients=4, train_stages=1,
                              aug_copies=2, frames_per_step=2, holdout=0.34)
    feats = tower_activations(content_index, cfg)
    # two versions of each clip, sharing its 4 frames: plain (0, 2) and augmented (1, 3)
    assert feats.split == 3 and feats.acts[0].shape[:2] == (2, 2) and feats.acts[0].dtype == torch.float16
    a = train_identity(content_index, tmp_path / "a", cfg, features=feats)
    b = train_identity(content_index, tmp_path / "b", cfg, features=feats)
    for name in (TAIL_WEIGHTS, HEAD_WEIGHTS):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.n_holdout_patients >= 2 and all("heldout_auc" in h for h in a.history)
    c = train_identity(content_index, tmp_path / "c", IdentityTrainConfig(**{**vars(cfg), "seed": 6}), features=feats)
    assert (tmp_path / "c" / TAIL_WEIGHTS).read_bytes() != (tmp_path / "a" / TAIL_WEIGHTS).read_bytes()
    assert c.history and (tmp_path / "a" / TAIL_WEIGHTS).stat().st_size > 0
    meta = json.loads((tmp_path / "a" / HEAD_CONFIG).read_text())
    assert meta["tail"]["split"] == 3 and meta["tail"]["stages"] == 1 and meta["training"]["seed"] == 5

    content = load_encoder(f"local-dir:{random_model_dir}", device="cpu")
    enc = load_identity_encoder(str(tmp_path / "a"), content)
    assert enc.kind == "tower-tail" and not enc.shares_content_tower and enc.tail is not None and enc.tail.shared
    assert enc.manifest["shared_stages"] == 3 and enc.embed_dim == 256
    trained_tail = enc.tail.tail
    assert any(not torch.equal(p, q) for p, q in zip(trained_tail.parameters(),
                                                     TowerTail(content.model.visual, 3).parameters(), strict=True))
    # an index's identity vectors from the saved folder are what training's evaluation computed for the studies
    idx = tmp_path / "idx"
    assert _index(small_cohort, idx, random_model_dir, identity_model=str(tmp_path / "a")).failed == 0  # type: ignore[attr-defined]
    with Catalog.open(idx, read_only=True) as cat:
        assert cat.get_manifest("identity_model")["kind"] == "tower-tail"
        sids, svecs = cat.embeddings("study_identity")
        uid = dict(cat.con.sql("SELECT study_key, study_uid FROM studies").fetchall())
    with Catalog.open(content_index, read_only=True) as cat:
        uid_train = dict(cat.con.sql("SELECT study_key, study_uid FROM studies").fetchall())
    _, head = enc.tail, enc.head
    assert head is not None
    plain = tower_activations(content_index, IdentityTrainConfig(**{**vars(cfg), "aug_copies": 1}))
    assert plain.acts[0].shape[:2] == (1, 4)
    assert torch.equal(plain.acts[0][0, ::2], feats.acts[0][0])  # the plain copy: the same frames
    with torch.no_grad():
        z = _TowerData(plain).study_vectors(trained_tail, head, torch.arange(len(plain.study_keys))).numpy()
    by_uid = {uid_train[int(k)]: v for k, v in zip(plain.study_keys, z, strict=True)}
    cos = [float(v @ by_uid[uid[int(k)]]) for k, v in zip(sids, svecs, strict=True)]
    assert len(cos) == len(by_uid) and min(cos) > 0.999  # float16 cache against float32 indexing
    # an index built without identity vectors gets the same ones by decoding its files again
    from echosearch.errors import ConfigError
    from echosearch.model.encode import encoder_for_index

    with Catalog.open(content_index) as cat:
        with pytest.raises(ConfigError, match="frame policy"):  # 16 frames a clip, the index has 4
            backfill_identity(cat, enc)
        enc = load_identity_encoder(str(tmp_path / "a"), encoder_for_index(cat, device="cpu"))
        assert backfill_identity(cat, enc) == cat.counts()["videos"]
        bids, bvecs = cat.embeddings("study_identity")
    got = {uid_train[int(k)]: v for k, v in zip(bids, bvecs, strict=True)}
    diffs = [float(np.abs(got[uid[int(k)]] - v).max()) for k, v in zip(sids, svecs, strict=True)]
    assert max(diffs) < 1e-5, diffs


def test_an_old_head_folder_still_loads(random_model_dir: Path, tmp_path: Path) -> None:
    content = load_encoder(f"local-dir:{random_model_dir}", device="cpu")
    ident = content.identity
    tower = {"model": f"local-dir:{random_model_dir}", "name": ident["name"],
             "weights_sha256": ident["weights_sha256"], "embed_dim": ident["embed_dim"]}
    torch.manual_seed(0)
    folder = save_head(tmp_path / "head", IdentityHead(int(ident["embed_dim"]), 16, 32), tower, {"seed": 0})
    assert not (folder / TAIL_WEIGHTS).exists()
    enc = load_identity_encoder(str(folder), content)
    assert enc.kind == "head" and enc.tail is None and enc.shares_content_tower
    frames = _frames(6)
    fv = content.encode_frames(frames)
    v = enc.video_vectors([frames], [fv])
    assert v.shape == (1, 16) and np.allclose(v[0], enc.apply_head(l2_normalise(fv.mean(axis=0))[None])[0], atol=1e-6)
