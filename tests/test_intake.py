"""Intake from PACS against a real Orthanc: DICOMweb pull, C-STORE from Orthanc to the receiver, and a
kill -9 of the standalone receiver mid-intake. Orthanc tests skip (with the fix) when Orthanc is missing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import pydicom
import pytest
from orthanc import Orthanc, free_port, require_orthanc

from echosearch.catalog import Catalog
from echosearch.config import Settings, load_settings
from echosearch.errors import CatalogError
from echosearch.ingest.pseudonym import Pseudonymizer
from echosearch.intake import IntakeBusy, IntakeError, IntakeStore, start_receiver
from echosearch.intake.pull import pull
from echosearch.intake.store import file_lock

ROOT = Path(__file__).resolve().parents[1]
VERIFICATION, CT_IMAGE, US_MULTIFRAME = "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.3.1"
US_CLASSES = {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.6",
              "1.2.840.10008.5.1.4.1.1.3"}


def _settings(model_dir: Path, index: Path) -> Settings:
    return load_settings(index=index, model=f"local-dir:{model_dir}", frames_per_video=4, batch_size=24, workers=0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from echosearch.synth import generate_cohort

    out = tmp_path_factory.mktemp("intake") / "cohort"
    generate_cohort(out, patients=2, seed=5, visits=(1, 2), views=("A4C", "PLAX"), size="small")
    return out


def _cohort_files(cohort: Path) -> list[Path]:
    files = sorted((cohort / "dicom").rglob("*.dcm"))
    assert files and all(pydicom.dcmread(f, stop_before_pixels=True).Modality == "US" for f in files)
    return files


def _outcomes(index: Path, store: IntakeStore) -> dict[str, tuple[int, int]]:
    """SOP instance UID -> (video rows, ingest error rows) for every journaled instance."""
    pz = Pseudonymizer(load_settings().require_secret())
    with Catalog.open(index, read_only=True) as cat:
        videos = cat.con.sql("SELECT sop_uid FROM videos").pl()
        errors = cat.con.sql("SELECT path FROM ingest_errors").pl()
    out = {}
    for e in store.entries():
        label = pz.file_label(store.path_of(e).absolute())
        out[e.sop_uid] = (videos.filter(pl.col("sop_uid") == e.sop_uid).height,
                          errors.filter(pl.col("path") == label).height)
    return out


def _assert_one_each(index: Path, store: IntakeStore, expected: set[str]) -> dict[str, tuple[int, int]]:
    got = _outcomes(index, store)
    assert set(got) == expected
    assert all(v + e == 1 for v, e in got.values()), got  # one video or one error, none twice
    with Catalog.open(index, read_only=True) as cat:  # and no video the journal does not know
        n_videos = cat.one("SELECT count(*), count(DISTINCT sop_uid) FROM videos")
    assert n_videos is not None and n_videos[0] == n_videos[1] == sum(v for v, _ in got.values())
    return got


def _assert_pseudonymous(log_text: str, files: list[Path], index: Path) -> None:
    """No patient ID or name, no study or instance UID, no path of the index in the log lines."""
    assert "stored F-" in log_text or "pull:" in log_text  # the lines are there, by label
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in ("PatientID", "StudyInstanceUID", "SOPInstanceUID", "AccessionNumber"):
            value = str(ds.get(kw, "") or "")
            assert not value or value not in log_text, kw
        name = str(ds.get("PatientName", "") or "")
        assert not name or name not in log_text
    assert str(index) not in log_text


# ---- the store, without any network -------------------------------------------------------------------------
def test_store_is_durable_deduplicates_and_survives_a_torn_journal(tmp_path: Path) -> None:
    store = IntakeStore(tmp_path / "idx")
    outcome, entry = store.put(b"first", "1.2.3", "1.2.3.4", via="test")
    assert outcome == "stored" and store.path_of(entry).read_bytes() == b"first"
    assert store.put(b"other bytes", "1.2.3", "1.2.3.4", via="test")[0] == "duplicate"
    assert store.path_of(entry).read_bytes() == b"first"  # a duplicate never overwrites
    for bad in ("../../etc", "1.2.3/..", "", "1.2." + "3" * 70):
        with pytest.raises(IntakeError):
            store.put(b"x", bad, "1.2.9", via="test")
    # a writer killed mid-line leaves a torn line and a temp file: neither is an instance
    with store.journal.open("ab") as f:
        f.write(b'{"op": "stored", "sop": "9.9"')
    (store.root / "1.2.3" / ".incoming-9.9.dcm.1.2").write_bytes(b"partial")
    again = IntakeStore(tmp_path / "idx")
    assert [e.sop_uid for e in again.pending()] == ["1.2.3.4"]
    assert not list((again.root / "1.2.3").glob(".incoming-*"))
    assert again.put(b"second", "1.2.3", "1.2.3.5", via="test")[0] == "stored"  # appends after the torn line
    again.mark_indexed(again.pending()[:1])
    third = IntakeStore(tmp_path / "idx")
    assert [e.sop_uid for e in third.pending()] == ["1.2.3.5"]
    assert third.counts() == {"stored": 2, "indexed": 1}
    store.refresh()  # another store object (process) sees what this one appended
    assert store.has("1.2.3.5")


def test_a_second_pull_on_the_same_index_is_refused(tmp_path: Path) -> None:
    store = IntakeStore(tmp_path / "idx")
    with file_lock(store.root / "pull.lock", blocking=False), pytest.raises(IntakeBusy):
        pull("http://127.0.0.1:9/dicom-web", tmp_path / "idx", load_settings(), progress=False)


def test_error_reasons_leave_out_urls_that_carry_uids() -> None:
    from echosearch.intake.pull import _short

    exc = RuntimeError("500 Server Error for url: http://pacs:8042/dicom-web/studies/1.2.840.1/instances?limit=9\nmore")
    assert _short(exc) == "500 Server Error for url: <url>"


def test_receiver_answers_echo_refuses_other_classes_and_wrong_called_ae(tmp_path: Path) -> None:
    from pynetdicom import AE

    with start_receiver(tmp_path / "idx", load_settings(), port=0, index=False) as rx:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(VERIFICATION)
        scu.add_requested_context(CT_IMAGE)
        scu.add_requested_context(US_MULTIFRAME)
        assoc = scu.associate("127.0.0.1", rx.port, ae_title="ECHOSEARCH")
        assert assoc.is_established
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assert US_MULTIFRAME in accepted and CT_IMAGE not in accepted
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        wrong = scu.associate("127.0.0.1", rx.port, ae_title="NOT_US")
        assert wrong.is_rejected
    assert IntakeStore(tmp_path / "idx").counts()["stored"] == 0


# ---- a real Orthanc --------------------------------------------------------------------------------------
@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    require_orthanc()
    with Orthanc(tmp_path / "orthanc") as o:
        yield o


def _upload(o: Orthanc, files: list[Path]) -> tuple[dict[str, str], list[Path]]:
    """Orthanc id -> SOP class of each file Orthanc accepts; the files it refuses (DCMTK cannot parse them)."""
    ids, refused = {}, []
    for f in files:
        try:
            ids[o.upload(f)] = str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
            refused.append(f)
    return ids, refused


def test_pull_by_dicomweb_resumes_and_records_what_fails_as_one_error(
        orthanc: Orthanc, cohort: Path, real_dicom_dir: Path, random_model_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    files = _cohort_files(cohort)
    truth = pl.read_parquet(cohort / "ground_truth.parquet")
    first_study = truth.sort("study_date")["study_uid"][0]
    early = [f for f in files if str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) != first_study]
    late = [f for f in files if f not in early]
    _upload(orthanc, early)
    index = tmp_path / "idx"
    settings = _settings(random_model_dir, index)
    caplog.set_level(logging.INFO, logger="echosearch")

    s1 = pull(orthanc.dicomweb, index, settings, progress=False)
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in early}
    assert (s1.fetched, s1.failed, s1.indexed) == (len(early), 0, len(early))
    store = IntakeStore(index)
    got = _assert_one_each(index, store, sops)
    assert all(v == 1 for v, _ in got.values())  # synthetic clips all decode: videos
    assert s1.watermark_after == max(truth.filter(pl.col("study_uid") != first_study)["study_date"]).isoformat()

    s2 = pull(orthanc.dicomweb, index, settings, progress=False)  # cron again: nothing new to fetch
    assert (s2.fetched, s2.indexed, s2.watermark_after) == (0, 0, s1.watermark_after)
    assert s2.already_stored == s2.instances > 0  # the watermark day is asked again, its instances skipped

    # a study that reaches the PACS late, dated before the watermark (found with --since); one of its
    # instances cannot be retrieved (the connection drops on it, every time)
    late_ids, _ = _upload(orthanc, late)
    lost = orthanc.get(f"/instances/{next(iter(late_ids))}")["MainDicomTags"]["SOPInstanceUID"]
    flaky = _DroppingClient(orthanc.dicomweb, drop=f"/instances/{lost}")
    since = min(truth["study_date"])
    s3 = pull(orthanc.dicomweb, index, settings, since=since, client=flaky, progress=False, max_attempts=2)
    assert (s3.fetched, s3.failed, s3.given_up) == (len(late) - 1, 1, 0)
    assert s3.watermark_after == since.isoformat()  # held at the failing instance's study date
    s4 = pull(orthanc.dicomweb, index, settings, client=flaky, progress=False, max_attempts=2)
    assert (s4.fetched, s4.failed, s4.given_up) == (0, 0, 1)
    assert s4.watermark_after == s1.watermark_after  # released once the instance is recorded as an error
    pz = Pseudonymizer(settings.require_secret())
    with Catalog.open(index, read_only=True) as cat:
        rows = cat.con.sql("SELECT path, stage, reason FROM ingest_errors").fetchall()
    assert len(rows) == 1 and rows[0][1] == "pull" and "WADO-RS" in rows[0][2] and lost not in rows[0][0]
    assert rows[0][0] == pz.file_label((store.root / first_study / f"{lost}.dcm").absolute())

    # a study whose instances cannot be listed (its QIDO-RS answer is lost, every time): held, then one error
    thyroid = real_dicom_dir / "Acuson_thyroid_YBR_FULL_RLE.dcm"
    _upload(orthanc, [thyroid])
    unlisted = _DroppingClient(orthanc.dicomweb,
                               drop=f"/studies/{pydicom.dcmread(thyroid, stop_before_pixels=True).StudyInstanceUID}/instances")
    s5 = pull(orthanc.dicomweb, index, settings, since=date(2016, 10, 17), client=unlisted, progress=False,
              max_attempts=2)
    assert (s5.fetched, s5.failed, s5.given_up, s5.watermark_after) == (0, 1, 0, "2016-10-17")
    s6 = pull(orthanc.dicomweb, index, settings, client=unlisted, progress=False, max_attempts=2)
    assert (s6.fetched, s6.failed, s6.given_up) == (0, 0, 1)
    assert s6.watermark_after == max(s1.watermark_after or "", "2016-10-17")
    s7 = pull(orthanc.dicomweb, index, settings, client=unlisted, progress=False, max_attempts=2)
    assert (s7.fetched, s7.failed, s7.given_up) == (0, 0, 0)
    with Catalog.open(index, read_only=True) as cat:
        stages = cat.con.sql("SELECT stage, reason FROM ingest_errors ORDER BY error_id").fetchall()
    assert [st for st, _ in stages] == ["pull", "pull"] and "QIDO-RS" in stages[1][1]
    _assert_one_each(index, IntakeStore(index), sops | {
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in late} - {lost})

    _assert_pseudonymous(caplog.text, files + [thyroid], index)
    assert "WADO-RS retrieval failed 2 time(s)" in caplog.text  # failures are logged, by count and cause

    # the command cron runs: nothing new, JSON summary; exit status 12 while another pull holds the lock
    from echosearch.cli import main

    capsys.readouterr()
    assert main(["pull", "--dicomweb", orthanc.dicomweb, "--index", str(index), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["fetched"], out["watermark_after"]) == (0, s6.watermark_after)
    with file_lock(index / "received" / "pull.lock", blocking=False):
        assert main(["pull", "--dicomweb", orthanc.dicomweb, "--index", str(index)]) == IntakeBusy.exit_code
    assert "another intake process" in capsys.readouterr().err


class _DroppingClient:
    """The real DICOMweb client, except that GETs whose URL contains ``drop`` fail as a dropped connection."""

    def __new__(cls, url: str, drop: str) -> Any:
        import requests
        from dicomweb_client.api import DICOMwebClient

        class Dropping(DICOMwebClient):
            def _http_get(self, url: str, *args: Any, **kwargs: Any) -> Any:
                if drop in url:
                    raise requests.exceptions.ConnectionError("connection reset by peer")
                return super()._http_get(url, *args, **kwargs)

        return Dropping(url)


def test_cstore_from_orthanc_stores_ultrasound_refuses_the_rest_and_indexes_once(
        orthanc: Orthanc, cohort: Path, real_dicom_dir: Path, random_model_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    index = tmp_path / "idx"
    real = sorted(real_dicom_dir.glob("*.dcm"))
    caplog.set_level(logging.INFO, logger="echosearch")
    ids, refused_by_pacs = _upload(orthanc, _cohort_files(cohort) + real)
    assert {f.name for f in refused_by_pacs} <= {"ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm",
                                                 "Philips_iU22_abdomen_JPEGLS.dcm"}
    with start_receiver(index, _settings(random_model_dir, index), port=0, ae_title="ECHOSEARCH") as rx:
        orthanc.set_modality("echosearch", "ECHOSEARCH", rx.port)
        for oid, sop_class in ids.items():
            if sop_class in US_CLASSES:
                orthanc.store_to("echosearch", [oid])
            else:  # CT, MR, XA, ECG: no presentation context is accepted, the PACS gets a failure
                with pytest.raises(urllib.error.HTTPError):
                    orthanc.store_to("echosearch", [oid])
        us = [oid for oid, c in ids.items() if c in US_CLASSES]
        orthanc.store_to("echosearch", us)  # the PACS sends everything again: acknowledged duplicates
        assert rx.wait_idle(300), rx.indexer.last_error if rx.indexer else None
        assert (rx.stats.stored, rx.stats.duplicates) == (len(us), len(us))
    store = IntakeStore(index)
    sops = {orthanc.get(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"] for oid in us}
    got = _assert_one_each(index, store, sops)
    _assert_pseudonymous(caplog.text, _cohort_files(cohort) + real, index)
    cines = ("SonoSite_echo_A4C_30f_JPEG_small.dcm", "US-PAL-8-10x-echo_JPEGLS.dcm", "US-MONO2-8-8x-execho.dcm")
    for name in cines:  # real echo cines (JPEG, JPEG-LS palette, a retired SOP class) became videos
        assert got[str(pydicom.dcmread(real_dicom_dir / name, stop_before_pixels=True).SOPInstanceUID)] == (1, 0)


# ---- kill -9 of the standalone receiver mid-intake ---------------------------------------------------------
def _receiver_process(index: Path, port: int, model_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ECHOSEARCH_MODEL": f"local-dir:{model_dir}", "ECHOSEARCH_FRAMES_PER_VIDEO": "4",
           "ECHOSEARCH_BATCH_SIZE": "24", "ECHOSEARCH_WORKERS": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "echosearch", "receive", "--index", str(index), "--port",
                             str(port)], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    from pynetdicom import AE

    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(VERIFICATION)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        assoc = scu.associate("127.0.0.1", port, ae_title="ECHOSEARCH")
        if assoc.is_established:
            assoc.release()
            return proc
        time.sleep(0.3)
    raise AssertionError("the receiver did not start: " + log.read_text())


def _send(port: int, files: list[Path]) -> set[str]:
    """C-STORE ``files`` one association each (as a modality would); the SOP UIDs acknowledged with success."""
    from pynetdicom import AE

    acked = set()
    for f in files:
        ds = pydicom.dcmread(f)
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", port, ae_title="ECHOSEARCH")
        if not assoc.is_established:
            continue
        try:
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                acked.add(str(ds.SOPInstanceUID))
        finally:
            assoc.release()
    return acked


def test_kill_9_of_the_receiver_loses_nothing_acknowledged_and_indexes_it_once(
        cohort: Path, random_model_dir: Path, tmp_path: Path) -> None:
    files = _cohort_files(cohort)
    index, port, log = tmp_path / "idx", free_port(), tmp_path / "receiver.log"
    proc = _receiver_process(index, port, random_model_dir, log)
    try:
        acked = _send(port, files[: len(files) // 2 + 1])
        deadline = time.monotonic() + 60  # kill -9 once the indexing run has opened (and created) the catalog
        while not (index / "catalog.duckdb").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        pending_at_kill = len(IntakeStore(index).pending())
        assert acked and pending_at_kill > 0, "the kill came after indexing had finished: no crash was tested"
        proc = _receiver_process(index, port, random_model_dir, log)
        acked |= _send(port, files)  # the modality sends what was not acknowledged, and more
        store = IntakeStore(index)
        deadline = time.monotonic() + 300
        while store.pending() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not store.pending(), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    all_sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert acked == all_sops
    deadline = time.monotonic() + 30
    while True:  # the stopped receiver's catalog is free once its process has exited
        try:
            got = _assert_one_each(index, IntakeStore(index), all_sops)
            break
        except CatalogError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert all(v == 1 for v, _ in got.values())
    journal = [json.loads(line) for line in (index / "received" / "journal.jsonl").read_text().splitlines()
               if line.startswith("{") and line.endswith("}")]
    assert sum(r["op"] == "stored" for r in journal) == len(all_sops)  # each instance stored once
