"""The index pipeline end to end on a synthetic cohort (random-weight model: fast, no training needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from echosearch.catalog import Catalog
from echosearch.config import load_settings
from echosearch.errors import ModelMismatchError
from echosearch.model.encode import load_encoder
from echosearch.model.models import write_model_folder
from echosearch.run.local import index_sources


def _index(cohort: Path, index_dir: Path, model_dir: Path, **kw: object) -> object:
    opts: dict[str, object] = {"model": f"local-dir:{model_dir}", "workers": 1, "batch_size": 24, "frames_per_video": 4}
    settings = load_settings(**{**opts, **kw})
    return index_sources([cohort], index_dir, settings, progress=False)


def test_index_stores_every_video_once_with_vectors_predictions_and_indexes(
        small_cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    truth = pl.read_parquet(small_cohort / "ground_truth.parquet")
    summary = _index(small_cohort, tmp_path / "idx", random_model_dir)
    assert summary.videos_encoded == truth.height and summary.failed == 0
    stages = summary.stage_seconds  # where the time went: fixed costs apart from the encoding loop
    assert set(stages) == {"setup", "scan_encode", "finalize"} and min(stages.values()) >= 0
    assert sum(stages.values()) == pytest.approx(summary.elapsed_s, abs=0.05)
    assert summary.steady_frames_per_s is not None and summary.steady_frames_per_s > 0  # several batches of 24
    with Catalog.open(tmp_path / "idx", read_only=True) as cat:
        counts = cat.counts()
        assert counts["videos"] == counts["video_embeddings"] == truth.height
        assert counts["studies"] == counts["study_embeddings"] == truth["study_uid"].n_unique()
        assert counts["report_embeddings"] == counts["reports"] == truth["study_uid"].n_unique()
        tasks = dict(cat.con.sql("SELECT task, count(*) FROM predictions WHERE level = 'video' GROUP BY task").fetchall())
        assert set(tasks) == {"ef", "pacer_lead", "tavr", "mitraclip", "lv_dilated"}
        assert all(v == truth.height for v in tasks.values())
        ids, vecs = cat.embeddings("video")
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
        # a study vector is the re-normalised mean of its videos' vectors (joined by key, not position)
        sk = cat.con.sql("SELECT study_key FROM studies ORDER BY study_key LIMIT 1").fetchall()[0][0]
        vk = [r[0] for r in cat.con.execute("SELECT video_key FROM videos WHERE study_key = ?", [sk]).fetchall()]
        _, sv = cat.embeddings("study", [sk])
        mean = vecs[np.isin(ids, vk)].mean(0)
        assert np.allclose(sv[0], mean / np.linalg.norm(mean), atol=1e-5)
        manifest = cat.manifest()
        assert manifest["model"]["preprocessing"]["name"] == "sector"
        assert manifest["zeroshot"] == {"method": "contrast", "prompts": "echosearch",  # auto: not an EchoCLIP model
                                        "thresholds": dict.fromkeys(set(tasks) - {"ef"}, 0.0)}
    for level in ("video", "study", "report"):
        assert (tmp_path / "idx" / "vectors" / f"{level}.faiss").is_file()
    again = _index(small_cohort, tmp_path / "idx", random_model_dir)
    assert again.videos_encoded == 0 and again.scan["skipped_known"] == truth.height
    assert again.studies_pooled == 0  # nothing stale: no study is pooled again
    assert again.steady_frames_per_s is None  # nothing encoded: no rate to report


def test_index_with_another_model_is_refused(small_cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    import open_clip
    import torch

    from echosearch.model.train import DEMO_MODEL_CFG

    _index(small_cohort, tmp_path / "idx", random_model_dir)
    torch.manual_seed(99)
    other = write_model_folder(open_clip.CLIP(**DEMO_MODEL_CFG), DEMO_MODEL_CFG, tmp_path / "other")
    with pytest.raises(ModelMismatchError, match="refusing"):
        _index(small_cohort, tmp_path / "idx", other)


def test_kill_9_mid_index_then_rerun_matches_uninterrupted(small_cohort: Path, random_model_dir: Path,
                                                           tmp_path: Path) -> None:
    env = {**os.environ, "ECHOSEARCH_FAULT_KILL_AFTER_COMMITS": "2", "ECHOSEARCH_MODEL": f"local-dir:{random_model_dir}",
           "ECHOSEARCH_WORKERS": "0", "ECHOSEARCH_BATCH_SIZE": "8", "ECHOSEARCH_FRAMES_PER_VIDEO": "4"}
    cmd = [sys.executable, "-m", "echosearch", "index", str(small_cohort), "--index", str(tmp_path / "killed"), "--json"]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    with Catalog.open(tmp_path / "killed", read_only=True) as cat:
        partial = cat.counts()["video_embeddings"]
    assert 0 < partial < pl.read_parquet(small_cohort / "ground_truth.parquet").height
    env.pop("ECHOSEARCH_FAULT_KILL_AFTER_COMMITS")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _index(small_cohort, tmp_path / "clean", random_model_dir, batch_size=8)
    with Catalog.open(tmp_path / "killed", read_only=True) as a, Catalog.open(tmp_path / "clean", read_only=True) as b:
        qa = "SELECT v.sha256, e.embedding FROM videos v JOIN video_embeddings e USING (video_key) ORDER BY v.sha256"
        ra, rb = a.con.sql(qa).fetchall(), b.con.sql(qa).fetchall()
        assert [r[0] for r in ra] == [r[0] for r in rb]  # each video exactly once
        assert a.con.sql("SELECT count(*) - count(DISTINCT sha256) FROM videos").fetchall()[0][0] == 0
        assert np.allclose(np.array([r[1] for r in ra]), np.array([r[1] for r in rb]), atol=1e-5)


def test_embed_file_matches_indexed_vector(small_cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    from echosearch.run.single import embed_file

    _index(small_cohort, tmp_path / "idx", random_model_dir)
    enc = load_encoder(f"local-dir:{random_model_dir}", frames_per_video=4)
    with Catalog.open(tmp_path / "idx", read_only=True) as cat:
        key = cat.con.sql("SELECT min(video_key) FROM videos").fetchall()[0][0]
        path = cat.locations([key])[key]
        _, stored = cat.embeddings("video", [key])
    vec, frames = embed_file(Path(path), enc)
    assert frames.shape == (4, enc.embed_dim)
    assert float(vec @ stored[0]) > 0.9999
