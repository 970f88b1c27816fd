"""Scan pipeline: real corpus counts, resume by hash, bad inputs, report objects, AVI manifests, CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pydicom
import pytest
from conftest import REAL_DICOM
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from echosearch.catalog import Catalog
from echosearch.config import Settings, load_settings
from echosearch.ingest.discover import FileRecord, discover, inspect_file
from echosearch.ingest.prepare import FramePolicy
from echosearch.run.local import scan
from echosearch.run.read import FailedFile, PreparedVideo, process_file
from echosearch.run.workers import iter_processed

REAL = REAL_DICOM
N_ULTRASOUND, N_NOT_ULTRASOUND = 9, 4
SMALL = ["US-MONO2-8-8x-execho.dcm", "SonoSite_echo_A4C_30f_JPEG_small.dcm", "US-RGB-8-esopecho.dcm"]


@pytest.fixture
def real_dir() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real DICOM corpus not found at {REAL} (needs ../shared/testdata/real-dicom)")
    return REAL


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ECHOSEARCH_SECRET", "test-secret-0123456789abcdef")
    return load_settings(workers=0)


def test_scan_real_corpus_counts_and_rescan(tmp_path: Path, real_dir: Path, settings: Settings) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([real_dir], cat, settings, progress=False)
        assert summary.videos_added == N_ULTRASOUND and summary.failed == N_NOT_ULTRASOUND
        counts = cat.counts()
        assert counts["videos"] == N_ULTRASOUND and counts["ingest_errors"] == N_NOT_ULTRASOUND
        where = cat.error_locations()
        errors = cat.con.sql("SELECT error_id, stage, reason FROM ingest_errors").fetchall()
        assert all(
            where[k].name.startswith("wrong_") and "not an ultrasound object" in r for k, _, r in errors
        )
        (acuson_key,) = [k for k, p in cat.locations(None).items() if "ACUSON" in p.name]
        acuson = cat.con.execute(
            "SELECT n_frames, height, width, sector_source, sector_bbox, kind FROM videos WHERE video_key = ?",
            [acuson_key],
        ).fetchone()
        assert acuson is not None and acuson[:4] == (65, 456, 576, "regions") and acuson[5] == "dicom"
        # identifiers are pseudonymised by default; raw values and names are not stored
        raw = cat.con.execute(
            "SELECT count(*) FROM patients WHERE patient_id_raw IS NOT NULL OR patient_name "
            "IS NOT NULL OR NOT starts_with(patient_pseudonym, 'P-')"
        ).fetchone()
        assert raw == (0,)
        again = scan([real_dir], cat, settings, progress=False)
        assert again.videos_added == 0 and again.skipped_known == N_ULTRASOUND
        assert cat.counts() == counts


def dicom_with(tmp: Path, name: str, **changes: object) -> Path:
    ds = pydicom.dcmread(REAL / "US-MONO2-8-8x-execho.dcm")
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID = generate_uid()
    path = tmp / name
    ds.save_as(path)
    return path


def test_bad_inputs_become_errors_and_the_batch_finishes(
    tmp_path: Path, real_dir: Path, settings: Settings
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real_dir / "US-MONO2-8-8x-execho.dcm", src / "good.dcm")
    data = (real_dir / "SonoSite_echo_A4C_30f_JPEG_small.dcm").read_bytes()
    (src / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (src / "zero.dcm").write_bytes(b"")
    (src / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    dicom_with(src, "absurd.dcm", Rows=60000, Columns=60000)
    corrupt = pydicom.dcmread(real_dir / "SonoSite_echo_A4C_30f_JPEG_small.dcm")
    frames = [os.urandom(500) for _ in range(30)]
    corrupt.PixelData = pydicom.encaps.encapsulate(frames)
    corrupt.save_as(src / "corrupt_pixels.dcm")
    native_short = pydicom.dcmread(real_dir / "US-MONO2-8-8x-execho.dcm")
    native_short.PixelData = native_short.PixelData[:1000]
    native_short.save_as(src / "short_native.dcm")
    vanished = src / "vanished.dcm"
    shutil.copy(real_dir / "US-RGB-8-esopecho.dcm", vanished)
    items = list(discover([src]))
    vanished.unlink()  # disappears between discovery and decoding
    results = list(iter_processed(items, FramePolicy(n_frames=4), workers=0))
    by_name = {(r.record.path if isinstance(r, PreparedVideo) else r.path).name: r for r in results}
    assert isinstance(by_name["good.dcm"], PreparedVideo)
    bad = {n: r for n, r in by_name.items() if isinstance(r, FailedFile)}
    assert set(bad) == {
        "truncated.dcm",
        "zero.dcm",
        "random.dcm",
        "absurd.dcm",
        "corrupt_pixels.dcm",
        "short_native.dcm",
        "vanished.dcm",
    }
    for name, failure in bad.items():
        assert failure.reason and len(failure.reason) > 10, name
    assert "unrecognised" in bad["random.dcm"].reason and bad["random.dcm"].stage == "discover"
    assert "empty file" in bad["zero.dcm"].reason
    assert "truncated" in bad["truncated.dcm"].reason and "truncated" in bad["short_native.dcm"].reason
    assert "absurd" in bad["absurd.dcm"].reason
    assert "vanished" in bad["vanished.dcm"].reason
    # the same through scan: one video, every bad file one ingest_errors row
    shutil.copy(real_dir / "US-RGB-8-esopecho.dcm", vanished)
    vanished.unlink()
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([src], cat, settings, progress=False)
        assert summary.videos_added == 1 and summary.failed == 6
        assert cat.counts()["ingest_errors"] == 6


def test_parallel_workers_keep_order(tmp_path: Path, real_dir: Path) -> None:
    recs = [inspect_file(real_dir / n) for n in SMALL] + [inspect_file(real_dir / "wrong_CT_small.dcm")]
    policy = FramePolicy(n_frames=4)
    out = list(iter_processed(recs, policy, workers=2, prefetch=1))
    assert [o.record.path if isinstance(o, PreparedVideo) else o.path for o in out] == [r.path for r in recs]
    assert isinstance(out[-1], FailedFile) and "modality CT" in out[-1].reason
    inline = process_file(recs[0], policy)
    assert isinstance(out[0], PreparedVideo)
    np.testing.assert_array_equal(out[0].frames, inline.frames)
    assert out[0].frames.shape == (4, 112, 112, 3)


def report_objects(tmp: Path, study_uid: str) -> None:
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    sr.Modality, sr.StudyInstanceUID, sr.PatientID = "SR", study_uid, "PAT-9"
    item = Dataset()
    item.ValueType, item.TextValue = "TEXT", "Severe aortic stenosis. Bioprosthetic mitral valve."
    sr.ContentSequence = [item]
    sr.save_as(tmp / "report_sr.dcm", enforce_file_format=True)


def test_report_objects_recorded_not_failed(tmp_path: Path, real_dir: Path, settings: Settings) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(real_dir / "US-MONO2-8-8x-execho.dcm", src / "echo.dcm")
    study = pydicom.dcmread(src / "echo.dcm", stop_before_pixels=True).StudyInstanceUID
    report_objects(src, study)
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([src], cat, settings, progress=False)
        assert summary.failed == 0 and summary.report_objects == 1 and summary.reports_attached == 1
        assert cat.con.sql("SELECT stage FROM ingest_errors").fetchall() == [("report-object",)]
        (text,) = cat.con.execute("SELECT text FROM reports").fetchall()[0]
        assert "aortic stenosis" in text


def write_avi(path: Path, n: int, shade: int) -> None:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 50.0, (112, 112))
    rng = np.random.default_rng(shade)
    for _ in range(n):
        frame = np.zeros((112, 112, 3), np.uint8)
        cv2.circle(frame, (56, 10), 90, (shade, shade, shade), -1)
        frame = np.clip(frame.astype(int) + rng.integers(0, 60, frame.shape) * (frame > 0), 0, 255)
        vw.write(frame.astype(np.uint8))
    vw.release()


def test_echonet_manifest_labels_reports_and_identity(tmp_path: Path, settings: Settings) -> None:
    root = tmp_path / "EchoNet"
    (root / "Videos").mkdir(parents=True)
    for i, name in enumerate(["0X1", "0X2", "0X3"]):
        write_avi(root / "Videos" / f"{name}.avi", 20 + i, 80 + 30 * i)
    (root / "FileList.csv").write_text(
        "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split\n"
        "0X1,61.5,20,52,112,112,50,20,TRAIN\n0X2,35.0,60,92,112,112,50,21,VAL\n"
        "0X3,55.0,30,66,112,112,50,22,TEST\n"
    )
    reports = tmp_path / "reports.parquet"
    pl.DataFrame({"file_name": ["0X2.avi"], "report": ["Moderately reduced LV function."]}).write_parquet(
        reports
    )
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([root / "FileList.csv"], cat, settings, reports=reports, progress=False)
        assert summary.videos_added == 3 and summary.failed == 0
        counts = cat.counts()
        assert (
            counts["patients"] == 3 and counts["studies"] == 3
        )  # each EchoNet file is its own patient/study
        where = cat.locations(None)
        ef = cat.con.sql(
            "SELECT v.video_key, l.value FROM labels l JOIN videos v ON l.key = v.video_key "
            "WHERE l.level = 'video' AND l.name = 'EF'"
        ).fetchall()
        assert sorted((where[k].stem, v) for k, v in ef) == [("0X1", 61.5), ("0X2", 35.0), ("0X3", 55.0)]
        assert summary.reports_attached == 1 and counts["reports"] == 1
        n_frames = cat.con.sql("SELECT video_key, n_frames, fps, kind FROM videos").fetchall()
        assert sorted((where[k].stem, *rest) for k, *rest in n_frames) == [
            ("0X1", 20, 50.0, "avi"), ("0X2", 21, 50.0, "avi"), ("0X3", 22, 50.0, "avi")]


def test_ground_truth_and_reports_sidecars_at_source_root(
    tmp_path: Path, real_dir: Path, settings: Settings
) -> None:
    src = tmp_path / "cohort"
    (src / "p1").mkdir(parents=True)
    shutil.copy(real_dir / "US-MONO2-8-8x-execho.dcm", src / "p1" / "a.dcm")
    write_avi(src / "p1" / "b.avi", 10, 120)
    study = pydicom.dcmread(src / "p1" / "a.dcm", stop_before_pixels=True).StudyInstanceUID
    pl.DataFrame(
        {
            "path": ["p1/a.dcm", "p1/b.avi"],
            "view": ["PLAX", "A4C"],
            "recorded_patient_id": ["X", "P1"],
            "study_uid": [study, "1.2.3.4"],
            "accession_number": [None, "ACC7"],
            "ef": [50.0, 40.0],
        }
    ).write_parquet(src / "ground_truth.parquet")
    pl.DataFrame(
        {"study_uid": ["1.2.3.4"], "accession_number": ["ACC7"], "report": ["Normal study."]}
    ).write_csv(src / "reports.csv")
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        scan([src], cat, settings, progress=False)
        rows = cat.con.sql(
            "SELECT v.kind, v.view, s.study_uid FROM videos v JOIN studies s USING (study_key) "
            "ORDER BY v.kind"
        ).fetchall()
        assert rows == [("avi", "A4C", "1.2.3.4"), ("dicom", "PLAX", study)]
        assert cat.counts()["reports"] == 1 and cat.counts()["labels"] == 2


def test_cli_scan_and_preview(tmp_path: Path, real_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from echosearch.cli import main

    monkeypatch.setenv("ECHOSEARCH_SECRET", "test-secret-0123456789abcdef")
    src = tmp_path / "src"
    src.mkdir()
    for name in SMALL[:2]:
        shutil.copy(real_dir / name, src / name)
    assert main(["scan", str(src), "--index", str(tmp_path / "idx"), "--workers", "0", "--json"]) == 0
    shutil.copy(real_dir / "wrong_CT_small.dcm", src / "ct.dcm")
    assert main(["scan", str(src), "--index", str(tmp_path / "idx"), "--workers", "0"]) == 10
    out = tmp_path / "prev.png"
    assert main(["preview", str(src / SMALL[1]), "--out", str(out)]) == 0
    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] > img.shape[0]
    assert main(["preview", str(src / "ct.dcm"), "--out", str(out)]) != 0


def test_unknown_kind_record(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"not an image")
    (result,) = list(iter_processed([FileRecord(path, 12, "0" * 64, "unknown")], FramePolicy(), workers=0))
    assert isinstance(result, FailedFile) and result.stage == "discover"


def test_scan_synthetic_cohort_identity_and_sidecars(tmp_path: Path, settings: Settings) -> None:
    synth = pytest.importorskip("echosearch.synth", reason="synthetic cohort generator not available")
    truth = synth.generate_cohort(tmp_path / "cohort", patients=2, seed=5, fmt="both", visits=(2, 2))
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([tmp_path / "cohort"], cat, settings, progress=False)
        assert summary.failed == 0 and summary.videos_added == truth.height
        counts = cat.counts()
        # DICOM and AVI copies of a study land in the same study and patient (AVI identity from ground truth)
        assert counts["studies"] == truth["study_uid"].n_unique()
        assert counts["patients"] == truth["recorded_patient_id"].n_unique()
        assert counts["reports"] == truth["study_uid"].n_unique()
        views = cat.con.execute("SELECT count(*) FROM videos WHERE view IS NULL").fetchall()
        assert views == [(0,)]


@pytest.mark.parametrize("record_batch", [1, 8])
def test_interrupted_scan_keeps_committed_files_and_resumes(
    tmp_path: Path, real_dir: Path, settings: Settings, record_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import echosearch.run.local as local

    src = tmp_path / "src"
    src.mkdir()
    for name in SMALL:
        shutil.copy(real_dir / name, src / name)
    written: list[object] = []
    real_write = local.write_batch

    def crash_after_two(cat: Catalog, batch: list, write: object) -> object:  # type: ignore[type-arg]
        done = real_write(cat, batch, write)  # type: ignore[arg-type]
        written.extend(batch)
        if len(written) >= 2:
            raise KeyboardInterrupt  # stands in for Ctrl-C / kill after the commit that holds the second file
        return done

    monkeypatch.setattr(local, "write_batch", crash_after_two)
    with Catalog.open(tmp_path / "idx", create=True) as cat, pytest.raises(KeyboardInterrupt):
        scan([src], cat, settings, progress=False, record_batch=record_batch)
    monkeypatch.undo()
    # one file per commit: the two handed on survived; one commit of all three: every file survived
    committed = 2 if record_batch == 1 else len(SMALL)
    with Catalog.open(tmp_path / "idx") as cat:
        assert cat.counts()["videos"] == committed
        summary = scan([src], cat, settings, progress=False, record_batch=record_batch)
        assert summary.skipped_known == committed and summary.videos_added == len(SMALL) - committed
        assert cat.counts()["videos"] == len(SMALL)


def odd_names_folder(tmp: Path, real_dir: Path) -> Path:
    """A valid clip plus files named with bytes that are not UTF-8, rich markup and an ANSI escape."""
    src = tmp / "odd"
    (src / "a[").mkdir(parents=True)
    shutil.copy(real_dir / "US-MONO2-8-8x-execho.dcm", src / "good.dcm")
    shutil.copy(real_dir / "US-RGB-8-esopecho.dcm", os.fsencode(src) + b"/bad\xff.dcm")
    (src / "a[" / "x].dcm").write_bytes(b"not a dicom " * 40)
    (src / "\x1b[31mred.dcm").write_bytes(b"neither " * 40)
    return src


def test_scan_survives_names_that_are_not_utf8_markup_or_escapes(
    tmp_path: Path, real_dir: Path, settings: Settings
) -> None:
    src = odd_names_folder(tmp_path, real_dir)
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([src], cat, settings, progress=False)
        assert summary.videos_added == 2 and summary.failed == 2
        videos = sorted(cat.locations(None).values())
        errors = sorted(p.name for p in cat.error_locations().values())
        assert [os.fsencode(p.name) for p in videos] == [b"bad\xff.dcm", b"good.dcm"]  # the bytes, exactly
        assert errors == ["\x1b[31mred.dcm", "x].dcm"]
        assert all(p.is_file() for p in videos)
        again = scan([src], cat, settings, progress=False)  # a re-run goes through the same files
        assert again.videos_added == 0 and again.failed == 2 and cat.counts()["ingest_errors"] == 2


def test_a_row_the_catalog_refuses_becomes_that_files_error(
    tmp_path: Path, real_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in SMALL:
        shutil.copy(real_dir / name, src / name)
    real_record = Catalog.record_videos
    rgb = hashlib.sha256((src / "US-RGB-8-esopecho.dcm").read_bytes()).hexdigest()

    def refuse_rgb(self: Catalog, recs: list) -> dict[str, int]:  # type: ignore[type-arg]
        if any(r.sha256 == rgb for r in recs):
            raise RuntimeError("row refused")
        return real_record(self, recs)

    monkeypatch.setattr(Catalog, "record_videos", refuse_rgb)
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([src], cat, settings, progress=False, record_batch=8)
        assert summary.videos_added == 2 and summary.failed == 1
        (key, stage, reason), = cat.con.sql("SELECT error_id, stage, reason FROM ingest_errors").fetchall()
        assert cat.error_locations()[key].name == "US-RGB-8-esopecho.dcm"
        assert stage == "catalog" and "row refused" in reason


def test_cli_scan_prints_odd_names_as_text(tmp_path: Path, real_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.cli import main

    src = odd_names_folder(tmp_path, real_dir)
    (src / "[red]c.dcm").write_bytes(b"junk " * 100)
    assert main(["scan", str(src), "--index", str(tmp_path / "i[/b]"), "--workers", "0"]) == 10
    out = capsys.readouterr().out
    assert "\x1b" not in out and "i[/b]" in out
    assert out.count("F-") >= 2 and "red.dcm" not in out  # failed files by their labels, never their names
