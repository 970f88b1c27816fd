"""Cycle vectors (``echosearch.model.cycle``): how a clip's tower activations move over its frames, stored per
video at indexing from the content encoder's own forward pass, read by the change scan's EF probe."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog
from echosearch.config import load_settings
from echosearch.model.cycle import GRID, CycleRunner, cycle_info, cycle_vector
from echosearch.model.encode import load_encoder
from echosearch.run.local import index_sources


def _index(cohort: Path, index_dir: Path, model_dir: Path, **kw: object) -> object:
    opts: dict[str, object] = {"model": f"local-dir:{model_dir}", "workers": 1, "batch_size": 24,
                               "frames_per_video": 4}
    return index_sources([cohort], index_dir, load_settings(**{**opts, **kw}), progress=False)


@settings(max_examples=20, deadline=None)
@given(frames=st.integers(1, 6), channels=st.integers(1, 4), size=st.integers(3, 9), seed=st.integers(0, 999))
def test_cycle_vector_is_the_grid_mean_then_its_spread_over_frames(frames: int, channels: int, size: int,
                                                                   seed: int) -> None:
    acts = torch.from_numpy(np.random.default_rng(seed).normal(size=(frames, channels, size, size)).astype(np.float32))
    v = cycle_vector(acts)
    half = channels * GRID * GRID
    assert v.shape == (2 * half,) and v.dtype == np.float32
    pooled = torch.nn.functional.adaptive_avg_pool2d(acts, GRID).flatten(1).numpy()
    assert np.allclose(v[:half], pooled.mean(0), atol=1e-5)
    assert np.allclose(v[half:], pooled.std(0), atol=1e-5)  # population spread: 0 for a still clip
    still = cycle_vector(acts[:1].repeat(frames, 1, 1, 1))
    assert np.allclose(still[half:], 0, atol=1e-5) and np.allclose(still[:half], pooled[0], atol=1e-5)


def test_two_readers_of_a_batch_share_the_content_pass(random_model_dir: Path) -> None:
    """The identity map and the cycle vectors both read the split activations: the tap serves both."""
    from echosearch.identity.tower import SplitActivations, frozen_forward

    enc = load_encoder(f"local-dir:{random_model_dir}", device="cpu")
    info = cycle_info(enc)
    assert info is not None and info["dim"] == 2 * info["channels"] * GRID * GRID
    cycle = CycleRunner(enc, info)
    first = SplitActivations(enc, int(info["split"]), shared=True)  # e.g. the identity map's reader
    frames = np.random.default_rng(0).integers(0, 255, (12, 112, 112, 3), dtype=np.uint8)
    enc.encode_frames(frames, batch_size=8)
    h = first.split_activations(frames)
    got = cycle.video_vectors([frames[:5], frames[5:]])
    tap = cycle.acts.tap
    assert tap is not None and tap is first.tap and tap.misses == 0 and tap.hits == 24  # both readers served
    with torch.no_grad():
        want = frozen_forward(enc.model.visual, enc.frames_to_tensor(frames), int(info["split"])).float()
    assert torch.allclose(h, want, atol=1e-4)
    assert np.allclose(got, np.stack([cycle_vector(want[:5]), cycle_vector(want[5:])]), atol=1e-4)
    other = frames[::-1].copy()  # frames the tap never saw: computed, the same values
    assert np.allclose(cycle.video_vectors([other])[0], cycle_vector(want.flip(0)), atol=1e-4)
    assert tap.misses == 12


def test_indexing_stores_the_cycle_vectors_decoding_again_computes(
        small_cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    from echosearch.identity.tower import frozen_forward
    from echosearch.ingest.discover import FileRecord, sniff_kind
    from echosearch.run.read import FailedFile
    from echosearch.run.workers import iter_processed

    idx = tmp_path / "idx"
    assert _index(small_cohort, idx, random_model_dir).failed == 0  # type: ignore[attr-defined]
    with Catalog.open(idx, read_only=True) as cat:
        info = cat.get_manifest("cycle")
        keys, vecs = cat.embeddings("video_cycle")
        sha = dict(cat.con.sql("SELECT video_key, sha256 FROM videos").fetchall())
        assert cat.has_cycle() and len(keys) == cat.counts()["video_embeddings"] > 0
    stored = {sha[int(k)]: v for k, v in zip(keys, vecs, strict=True)}
    enc = load_encoder(f"local-dir:{random_model_dir}", device="cpu", frames_per_video=4)
    files = sorted(small_cohort.rglob("*.dcm"))[:4]
    records = []
    for f in files:
        with f.open("rb") as fh:
            records.append(FileRecord(path=f, size=f.stat().st_size, sha256=hashlib.sha256(f.read_bytes()).hexdigest(),
                                      kind=sniff_kind(fh.read(200))))
    checked = 0
    for item in iter_processed(records, enc.policy, 1):
        assert not isinstance(item, FailedFile)
        with torch.no_grad():
            h = frozen_forward(enc.model.visual, enc.frames_to_tensor(item.frames), int(info["split"]))
        assert np.allclose(stored[item.record.sha256], cycle_vector(h), atol=1e-3)
        checked += 1
    assert checked == len(files)


def test_an_index_keeps_its_choice_of_cycle_vectors(small_cohort: Path, random_model_dir: Path,
                                                    tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Off: no table. Videos encoded without them: a later run does not start storing them (they would be
    missing for the earlier videos), and says so."""
    idx = tmp_path / "idx"
    assert _index(small_cohort, idx, random_model_dir, cycle_vectors=False).failed == 0  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="echosearch.run.setup"):
        _index(small_cohort, idx, random_model_dir)  # cycle_vectors on (the default)
    assert "without cycle vectors" in caplog.text
    with Catalog.open(idx) as cat:
        assert not cat.has_cycle() and cat.get_manifest("cycle") is None
        enc = load_encoder(f"local-dir:{random_model_dir}", device="cpu")
        assert cat.bind_cycle(cycle_info(enc), True) is None and not cat.has_cycle()
    fresh = tmp_path / "fresh"
    with Catalog.open(fresh, create=True) as cat:
        info = cycle_info(enc)
        assert info is not None and cat.bind_cycle(info, True) == info and cat.has_cycle()
        from echosearch.errors import ModelMismatchError

        with pytest.raises(ModelMismatchError, match="cycle vectors"):
            cat.bind_cycle({**info, "dim": info["dim"] + 1}, True)
