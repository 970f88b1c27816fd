"""The Ray Data runner against the local runner on one cohort, a killed worker, resume, idempotent merge, and vector
indexes built chunk by chunk (recall equal to the in-memory build).

One local Ray instance (2 CPUs, 127.0.0.1, no dashboard) serves the module; the runner joins it."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from echosearch.catalog import Catalog
from echosearch.config import Settings, load_settings
from echosearch.errors import ConfigError
from echosearch.run.compare import catalog_differences
from echosearch.run.encode import FAULT_KILL_ONCE
from echosearch.run.local import index_sources
from echosearch.run.units import SHARD_DIR
from echosearch.store.vectorindex import ArrayRows, build_from_rows, build_index, build_vectors

UNIT_FILES = 3


def _settings(model_dir: Path) -> Settings:
    """Identity vectors (the content tower as identity model) and frame vectors on: every column a shard carries."""
    return load_settings(model=f"local-dir:{model_dir}", identity_model=f"local-dir:{model_dir}", workers=1,
                         batch_size=24, frames_per_video=4, keep_frame_embeddings=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 DICOM clips of 2 patients, plus a copy of one clip in a folder walked first, a file that is not DICOM
    and an empty file (two ingest_errors rows)."""
    from echosearch.synth import generate_cohort

    root = tmp_path_factory.mktemp("raycohort") / "cohort"
    generate_cohort(root, patients=2, seed=23, visits=(2, 2), views=("A4C", "PLAX"), workers=1)
    first = sorted((root / "dicom").rglob("*.dcm"))[0]
    (root / "copy").mkdir()
    shutil.copy(first, root / "copy" / "dup.dcm")
    (root / "junk").mkdir()
    (root / "junk" / "bad.dcm").write_bytes(os.urandom(4096))
    (root / "junk" / "empty.dcm").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def local_index(cohort: Path, random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "idx"
    index_sources([cohort], out, _settings(random_model_dir), progress=False)
    return out


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray instance whose workers carry the kill-once fault (armed by the marker path given here)."""
    ray = pytest.importorskip("ray")
    from echosearch.run.ray_runner import start_local_ray

    marker = tmp_path_factory.mktemp("fault") / "killed"
    os.environ[FAULT_KILL_ONCE] = str(marker)
    try:
        start_local_ray(ray, num_cpus=2)
    finally:
        del os.environ[FAULT_KILL_ONCE]  # the driver's own encode calls never fault
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    try:
        yield marker
    finally:
        ray.shutdown()


def _ray(cohort: Path, out: Path, model_dir: Path, **kw: object) -> object:
    from echosearch.run.ray_runner import index_with_ray

    return index_with_ray([cohort], out, _settings(model_dir), unit_files=UNIT_FILES, progress=False, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ray_index(cohort: Path, random_model_dir: Path, ray_instance: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The cohort indexed by the Ray runner while one encode worker is killed (SIGKILL) mid-run."""
    out = tmp_path_factory.mktemp("ray") / "idx"
    return out, _ray(cohort, out, random_model_dir)


@pytest.mark.ray
def test_killed_encode_worker_loses_and_duplicates_nothing(ray_index: tuple[Path, object], local_index: Path,
                                                           ray_instance: Path) -> None:
    out, summary = ray_index
    assert ray_instance.is_file(), "the fault did not fire: no worker was killed"
    assert int(ray_instance.read_text()) != os.getpid()  # a Ray worker process, not this driver
    assert summary.units_run == summary.units >= 4 and summary.failed == 2  # type: ignore[attr-defined]
    assert summary.merge["videos_added"] == 8 and summary.clips_encoded == 9  # type: ignore[attr-defined]  # + the copy
    with Catalog.open(out, read_only=True) as cat:
        n, distinct = cat.one("SELECT count(*), count(DISTINCT sha256) FROM videos") or (0, 0)
        assert n == distinct == 8 and cat.counts()["video_embeddings"] == 8
        assert cat.con.sql("SELECT count(*) FROM ingest_errors").fetchall()[0][0] == 2


@pytest.mark.ray
def test_ray_runner_gives_the_local_runners_rows_and_vectors(ray_index: tuple[Path, object],
                                                             local_index: Path) -> None:
    out, summary = ray_index
    assert catalog_differences(local_index, out) == []
    shards = sorted((out / SHARD_DIR).glob("*.parquet"))
    assert len([s for s in shards if not s.name.startswith("sidecars-")]) == summary.units  # type: ignore[attr-defined]
    with Catalog.open(local_index, read_only=True) as a, Catalog.open(out, read_only=True) as b:
        assert a.counts() == b.counts() and a.counts()["ingest_errors"] == 2
        assert b.counts()["video_identity"] == 8 and b.counts()["study_identity"] == b.counts()["studies"]
        for level in ("video", "study", "video_identity", "study_identity"):
            ia, va = a.embeddings(level)
            ib, vb = b.embeddings(level)
            assert np.array_equal(ia, ib) and float(np.abs(va - vb).max()) <= 1e-6
        keys = [int(k) for k in a.embeddings("video")[0]]
        fa, fb = a.frame_embeddings(keys), b.frame_embeddings(keys)
        assert len(fb) == 8 and all(np.abs(fa[k] - fb[k]).max() <= 1e-6 for k in fa)
    for level in ("video", "study", "report"):
        assert (out / "vectors" / f"{level}.faiss").is_file()


@pytest.mark.ray
def test_merge_is_idempotent_and_shards_alone_rebuild_the_catalog(ray_index: tuple[Path, object], local_index: Path,
                                                                  random_model_dir: Path, tmp_path: Path) -> None:
    from echosearch.run.merge import merge_shards

    out, _ = ray_index
    with Catalog.open(out, read_only=True) as cat:
        before = (cat.generation(), cat.counts())
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "vectors").iterdir()}
    again = merge_shards(out, _settings(random_model_dir))
    assert again.shards_merged == 0 and again.videos_added == 0 and not again.vector_indexes_built
    assert again.videos_known == 9  # the copy's hash is the original's
    with Catalog.open(out, read_only=True) as cat:
        assert (cat.generation(), cat.counts()) == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "vectors").iterdir()} == stamp
    fresh = tmp_path / "fresh"  # a folder holding only the shards: merge builds the same catalog
    shutil.copytree(out / SHARD_DIR, fresh / SHARD_DIR)
    rebuilt = merge_shards(fresh, _settings(random_model_dir), chunk_rows=3)
    assert rebuilt.videos_added == 8 and rebuilt.vector_indexes_built
    assert catalog_differences(local_index, fresh) == []


@pytest.mark.ray
def test_resume_runs_only_units_without_a_finished_shard(ray_index: tuple[Path, object], local_index: Path,
                                                         cohort: Path, random_model_dir: Path) -> None:
    out, summary = ray_index
    from echosearch.run.shards import shard_meta

    shards = sorted(s for s in (out / SHARD_DIR).glob("*.parquet") if not s.name.startswith("sidecars-"))
    assert sum(shard_meta(s)["failures"] > 0 for s in shards) == 1  # the junk folder's unit
    gone = next(s for s in shards if shard_meta(s)["failures"] == 0 and shard_meta(s)["clips"] > 0)
    gone.unlink()
    resumed = _ray(cohort, out, random_model_dir)  # that unit, and the unit whose files failed (retried)
    assert resumed.units_run == 2 and resumed.units_done == summary.units - 2  # type: ignore[attr-defined]
    assert gone.is_file() and resumed.merge["videos_added"] == 0  # type: ignore[attr-defined]
    assert catalog_differences(local_index, out) == []


def test_the_ray_runners_stages_run_in_process_give_the_local_runners_catalog(
        cohort: Path, local_index: Path, random_model_dir: Path, tmp_path: Path) -> None:
    """What the Ray runner distributes (read_unit -> encode_unit -> write_shard per unit, then merge), run here
    without Ray: the local runner's catalog, because both runners only pass the same stages' records along."""
    from echosearch.ingest.discover import load_sidecars
    from echosearch.run.encode import EncodeStage
    from echosearch.run.merge import merge_shards, write_sidecars
    from echosearch.run.read import read_unit
    from echosearch.run.setup import load_run_encoder, prepare_run
    from echosearch.run.shards import write_shard
    from echosearch.run.units import plan_units, shard_path

    settings, out = _settings(random_model_dir), tmp_path / "units"
    enc = load_run_encoder(settings)
    with Catalog.open(out, create=True) as cat:
        setup = prepare_run(cat, settings, enc)
    meta = {**setup.meta, "run": "r1"}
    side = load_sidecars([cohort])
    write_sidecars(out, side, "r1")
    stage, ctx = EncodeStage.from_spec(setup.encode_spec()), setup.read_context(side)
    idim = int(meta["identity_model"]["embed_dim"])
    units = plan_units([cohort], meta["config"], UNIT_FILES)
    for unit in reversed(units):  # in any order: the merge orders shards by plan position
        done = stage.encode_unit(read_unit(unit.name, unit.ordinal, unit.items, ctx))
        write_shard(shard_path(out, unit.name), done, meta, enc.embed_dim, idim)
    merge_shards(out, settings, encoder=enc)
    assert catalog_differences(local_index, out) == []


def test_local_runner_resumes_a_failed_run_without_duplicates(cohort: Path, local_index: Path, random_model_dir: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encode stage fails on the second batch: the first batch's rows and vectors are committed, nothing of
    the second; a re-run reads only the files not finished and ends with the uninterrupted run's catalog."""
    from echosearch.run.encode import EncodeStage

    real, calls = EncodeStage.encode, []

    def fail_second(self: EncodeStage, batch: list) -> list:  # type: ignore[type-arg]
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("encoder failed")
        return real(self, batch)

    monkeypatch.setattr(EncodeStage, "encode", fail_second)
    out = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="encoder failed"):
        index_sources([cohort], out, _settings(random_model_dir), progress=False)
    with Catalog.open(out, read_only=True) as cat:
        assert cat.counts()["videos"] == cat.counts()["video_embeddings"] == calls[0] < 8  # the first batch only
    monkeypatch.setattr(EncodeStage, "encode", real)
    again = index_sources([cohort], out, _settings(random_model_dir), progress=False)
    assert again.videos_encoded == 8 - calls[0]  # only the files not finished were read and encoded again
    assert again.scan["skipped_known"] == calls[0] + 1  # the finished files and the copy of one of them
    assert catalog_differences(local_index, out) == []


def test_scan_then_index_gives_the_catalog_of_index_alone(cohort: Path, local_index: Path, random_model_dir: Path,
                                                          tmp_path: Path) -> None:
    """Rows recorded by ``scan`` keep their keys when ``index`` later reads, encodes and writes their files."""
    from echosearch.run.local import scan

    out = tmp_path / "idx"
    with Catalog.open(out, create=True) as cat:
        scanned = scan([cohort], cat, _settings(random_model_dir), progress=False)
    assert scanned.videos_added == 8 and scanned.failed == 2
    summary = index_sources([], out, _settings(random_model_dir), progress=False)  # the scanned files alone
    assert summary.videos_encoded == 8 and summary.scan["videos_added"] == 0 and summary.failed == 0
    assert catalog_differences(local_index, out) == []


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.cli import main
    from echosearch.run.ray_runner import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r'pip install "echosearch\[ray\]"'):
        require_ray()
    assert main(["index", str(tmp_path), "--index", str(tmp_path / "idx"), "--executor", "ray"]) != 0
    assert 'pip install "echosearch[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()  # refused before anything was written


class _Chunked(ArrayRows):
    """Rows that are never handed over whole: the build must sample, add and search chunk by chunk."""

    def __init__(self, ids: np.ndarray, x: np.ndarray, size: int) -> None:
        super().__init__(ids, x)
        self.size, self.largest = size, 0

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, self.n, self.size):
            self.largest = max(self.largest, len(self.x[i:i + self.size]))
            yield self.ids[i:i + self.size], self.x[i:i + self.size]

    def all(self) -> None:  # type: ignore[override]
        return None


def _recall(vi: object, x: np.ndarray, ids: np.ndarray, q_rows: np.ndarray, k: int = 10) -> float:
    sims = x[q_rows] @ x.T
    truth = np.argsort(-sims, axis=1)[:, :k]
    _, got = vi.search(x[q_rows], k, plan="ann")  # type: ignore[attr-defined]
    return float(np.mean([len(set(ids[t]) & set(g)) / k for t, g in zip(truth, got, strict=True)]))


@pytest.mark.parametrize("kind", ["ivf", "ivf_fp16"])
def test_chunked_build_has_the_recall_of_the_in_memory_build(kind: str) -> None:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(40, 32)).astype(np.float32)
    x = centres[rng.integers(0, 40, 6000)] + 0.35 * rng.normal(size=(6000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(6000, dtype=np.int64) * 3 + 5  # keys, not positions
    whole = build_vectors(ids, x, force_type=kind, seed=1)
    rows = _Chunked(ids, x, 700)
    chunked = build_from_rows(rows, force_type=kind, seed=1)
    assert rows.largest == 700  # never more than one chunk at a time
    assert chunked.manifest["params"] == whole.manifest["params"]
    assert chunked.manifest["recall_at_10"] == whole.manifest["recall_at_10"]
    q_rows = np.random.default_rng(3).choice(6000, 200, replace=False)
    r_whole, r_chunked = _recall(whole, x, ids, q_rows), _recall(chunked, x, ids, q_rows)
    assert r_chunked == r_whole and r_whole >= 0.9
    s1, f1 = whole.search(x[q_rows], 10, plan="ann")
    s2, f2 = chunked.search(x[q_rows], 10, plan="ann")
    assert np.array_equal(f1, f2) and np.allclose(s1, s2)


def test_catalog_chunked_build_equals_the_whole_level_build(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        cat.bind_model({"name": "t", "weights_sha256": "0", "embed_dim": 16, "preprocessing": {}})
        keys = (np.arange(3000) * 2 + 1).tolist()
        cat.store_video_embeddings(keys, x, [4] * 3000)
        whole = build_index(cat, "video", force_type="ivf")
        chunked = build_index(cat, "video", force_type="ivf", chunk_rows=256)
    assert chunked.manifest["ntotal"] == whole.manifest["ntotal"] == 3000
    assert chunked.manifest["recall_at_10"] == whole.manifest["recall_at_10"]
    q = x[:50]
    assert np.array_equal(whole.search(q, 10, plan="ann")[1], chunked.search(q, 10, plan="ann")[1])


def test_shard_round_trip_keeps_rows_vectors_frames_identity_and_failures(tmp_path: Path) -> None:
    from datetime import date

    from echosearch.catalog import VideoRecord
    from echosearch.run.records import EncodedClip, FailureRecord, UnitResult
    from echosearch.run.shards import read_shard, shard_meta, shard_rows, write_shard

    rng = np.random.default_rng(0)
    recs = [VideoRecord(sha256=f"{i:064x}", path=f"F-{i}.dcm", size_bytes=10 + i, kind="dicom",
                        patient_pseudonym="P-1", study_uid=f"1.2.{i}", study_date=date(2020, 1, i + 1),
                        sector_bbox=[1, 2, 3, 4], fps=30.0, location=b"\x00sealed" if i else None) for i in range(3)]
    clips = [EncodedClip(seq, rec, rng.normal(size=8).astype(np.float32), n, {"ef": 55.5 + seq},
                         rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=4).astype(np.float32),
                         {"in_scope": bool(seq % 2)})
             for seq, rec, n in ((0, recs[0], 3), (2, recs[1], 1), (3, recs[2], 5))]
    fail = FailureRecord(1, "F-x.dcm", b"loc", None, "decode", "bad file", None, None)
    unit = UnitResult("u1", 4, [], [fail], clips)
    path = write_shard(tmp_path / "u1.parquet", unit, {"keep_frames": True, "run": "r"}, 8, 4)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    meta = shard_meta(path)
    assert (meta["unit"], meta["ordinal"], meta["clips"], meta["failures"]) == ("u1", 4, 3, 1)
    table = read_shard(path)
    assert table.column("seq").to_pylist() == [0, 1, 2, 3]  # input order, failure in its place
    rows = shard_rows(table, 8, 4)
    assert rows.records == recs and rows.failures == [fail]
    assert np.array_equal(rows.vectors, np.stack([c.vector for c in clips]))
    assert rows.identity is not None and np.array_equal(rows.identity, np.stack([c.identity for c in clips]))
    assert rows.frame_vectors is not None
    assert all(np.array_equal(a, c.frame_vectors) for a, c in zip(rows.frame_vectors, clips, strict=True))
    assert rows.n_frames == [3, 1, 5] and rows.predictions == [{"ef": 55.5}, {"ef": 57.5}, {"ef": 58.5}]
    assert rows.scopes == [c.scope for c in clips]
    # a unit whose files are all in the catalog already (read skips them) writes an empty shard
    empty = shard_rows(read_shard(write_shard(tmp_path / "u2.parquet", UnitResult("u2", 5), {"keep_frames": True},
                                              8, 4)), 8, 4)
    assert empty.records == [] and empty.failures == [] and empty.vectors.shape == (0, 8)
