"""Scan pipeline: discover -> decode -> prepare in worker processes, then one catalog commit per file.

``iter_processed`` is the producer that the encode pipeline consumes (decoding overlaps the model);
``scan`` fills the catalog: patients, studies and videos (identifiers pseudonymised), report text and
labels from sidecar files, and one ``ingest_errors`` row per input that could not be used. Every file is
committed on its own, so an interrupted scan loses nothing committed and a re-run resumes by content hash.

Identity rules (documented for users):

* DICOM: PatientID / StudyInstanceUID / AccessionNumber from the header. A file with no PatientID is its
  study's own patient (pseudonym of ``study:<StudyInstanceUID>``); one with no StudyInstanceUID is its
  own study (``2.25.<hash>`` UID derived from the file's sha256).
* AVI/MP4: identity from ``ground_truth.parquet`` at the source root when it lists the file, otherwise
  each file is its own patient and its own study (the EchoNet-Dynamic case).
* SR and encapsulated-PDF objects are report objects: an ``ingest_errors`` row with stage
  ``report-object`` (not counted as failures); SR text is attached to its study as a report.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echosearch.decode import VideoMeta, _date, _s, decode_video, explain, read_dicom_header
from echosearch.discover import DiscoverFailure, FileRecord, Sidecars, discover, load_sidecars, pick
from echosearch.errors import IngestError, ReportObjectFound
from echosearch.prepare import FramePolicy, policy_manifest, sample_indices, sector_and_input

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from echosearch.catalog import Catalog, VideoRecord
    from echosearch.config import Settings
    from echosearch.pseudonym import Pseudonymizer

log = logging.getLogger(__name__)
REPORT_STAGE = "report-object"
MAX_LISTED_FAILURES = 1000


@dataclass
class PreparedVideo:
    """One file ready for the encoder: model-input frames (N,S,S,3) uint8 and what was learnt on the way."""

    record: FileRecord
    meta: VideoMeta
    frames: np.ndarray
    frame_indices: np.ndarray
    sector_bbox: list[int]
    sector_source: str


@dataclass
class ReportObject:
    """Identity and text (SR only; PDF text is not extracted) of a DICOM report object."""

    study_uid: str | None
    accession: str | None
    patient_id: str | None
    kind: str
    text: str | None


@dataclass
class FailedFile:
    """An input that yields no video: a failure (stage/reason) or, with stage "report-object", a report."""

    path: Path
    sha256: str | None
    stage: str
    reason: str
    report: ReportObject | None = None

    @property
    def is_report(self) -> bool:
        return self.stage == REPORT_STAGE


@dataclass
class ScanSummary:
    """What a scan did; ``failed`` excludes report objects (they are not failures)."""

    discovered: int = 0
    skipped_known: int = 0
    videos_added: int = 0
    report_objects: int = 0
    failed: int = 0
    reports_attached: int = 0
    reports_unmatched: int = 0
    labels_recorded: int = 0
    labels_unmatched: int = 0
    elapsed_s: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


# ---- per-file work (runs in a worker process) ---------------------------------------------------------
def process_file(record: FileRecord, policy: FramePolicy) -> PreparedVideo:
    """Header -> sample indices -> decode only those frames -> sector -> model input. Raises IngestError."""
    if record.kind == "unknown":
        empty = record.size == 0
        raise IngestError("empty file (0 bytes)" if empty else "unrecognised file format: not DICOM (no DICM "
                          "marker), AVI or MP4", "discover")
    decoded = decode_video(record.path, record.kind, lambda meta: sample_indices(meta.n_frames, policy))
    keep = np.sort(np.unique(decoded.frame_indices, return_index=True)[1])  # repeats add nothing
    raw, indices = decoded.frames, decoded.frame_indices
    sector_frames: np.ndarray | None = keep
    if policy.sampling == "all" and len(keep) < len(indices):  # a header that over-counted: drop the repeats
        raw, indices, sector_frames = raw[keep], indices[keep], None
    frames, sector = sector_and_input(raw, decoded.meta.regions, policy, sector_frames)
    return PreparedVideo(record, decoded.meta, frames, indices, sector.bbox_list, sector.source)


def read_report_object(path: Path) -> ReportObject:
    """Identity of an SR / encapsulated-PDF object and, for SR, its text items joined in document order."""
    ds = read_dicom_header(path, check=False)
    kind = "pdf" if str(ds.get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.104.") else "sr"
    text = "\n".join(_sr_text(ds)) if kind == "sr" else None
    ids = (_s(ds, "StudyInstanceUID"), _s(ds, "AccessionNumber"), _s(ds, "PatientID"))
    return ReportObject(*ids, kind, text)


def _sr_text(ds: Dataset) -> Iterator[str]:
    for item in ds.get("ContentSequence", []) or []:
        if str(item.get("ValueType", "")) == "TEXT" and item.get("TextValue"):
            yield str(item.TextValue)
        yield from _sr_text(item)


def safe_process(record: FileRecord, policy: FramePolicy) -> PreparedVideo | FailedFile:
    """:func:`process_file` that never raises: failures and report objects become a :class:`FailedFile`."""
    try:
        return process_file(record, policy)
    except ReportObjectFound as exc:
        try:
            report: ReportObject | None = read_report_object(record.path)
        except IngestError:
            report = None
        return FailedFile(record.path, record.sha256, REPORT_STAGE, exc.reason, report)
    except IngestError as exc:
        return FailedFile(record.path, record.sha256, exc.stage, exc.reason)
    except MemoryError:
        return FailedFile(record.path, record.sha256, "decode", "out of memory while decoding (too large)")
    except Exception as exc:  # a bug or an unforeseen codec failure must not stop the batch
        return FailedFile(record.path, record.sha256, "decode",
                          explain(exc, "unexpected error while reading this file (a bug: please report it)"))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int, poll_s: float = 1.0) -> None:
    """Exit this worker when ``parent`` (the indexer) dies, even by ``kill -9``.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, then exit at once if the parent is already gone (it may
    have died before the call). Elsewhere (or if prctl fails): a daemon thread polls ``os.getppid()``."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if os.getppid() != parent:
            os._exit(1)
        if armed:
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="echosearch-parent-watch", daemon=True).start()


def _worker_init(parent: int | None = None) -> None:
    import cv2

    if parent is not None:
        _die_with_parent(parent)
    cv2.setNumThreads(1)  # one process per core already; avoid oversubscription


def iter_processed(
    records: Iterable[FileRecord | DiscoverFailure], policy: FramePolicy, workers: int, prefetch: int = 8
) -> Iterator[PreparedVideo | FailedFile]:
    """Process records in ``workers`` spawned processes (0 = in this process), results in submission order.

    At most ``workers + prefetch`` files are in flight, so memory stays bounded however many files come.
    A worker that dies (a codec crash) costs only the file it was on: the pool is restarted and the other
    in-flight files are resubmitted; after three crashes in a row the rest is processed in this process.
    """
    if workers <= 0:
        for rec in records:
            yield _as_failure(rec) if isinstance(rec, DiscoverFailure) else safe_process(rec, policy)
        return
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                   initargs=(os.getpid(),))

    def submit(rec: FileRecord | DiscoverFailure) -> Future[PreparedVideo | FailedFile] | None:
        return None if isinstance(rec, DiscoverFailure) else pool.submit(safe_process, rec, policy)

    limit, crashes, it = workers + max(0, prefetch), 0, iter(records)
    pending: deque[tuple[FileRecord | DiscoverFailure, Future[PreparedVideo | FailedFile] | None]] = deque()
    pool = new_pool()
    try:
        while True:
            while len(pending) < limit and (nxt := next(it, None)) is not None:
                pending.append((nxt, submit(nxt)))
            if not pending:
                return
            rec, fut = pending.popleft()
            if fut is None or isinstance(rec, DiscoverFailure):
                yield _as_failure(rec)  # type: ignore[arg-type]
                continue
            try:
                result, crashes = fut.result(), 0
            except BrokenProcessPool:
                crashes += 1
                pool.shutdown(wait=False, cancel_futures=True)
                if crashes >= 3:  # workers cannot run here at all: finish in this process
                    rest = [r for r, _ in pending]
                    pending.clear()
                    yield from iter_processed(itertools.chain([rec], rest, it), policy, 0)
                    return
                result = FailedFile(rec.path, rec.sha256, "decode", "decoder process crashed on this file")
                pool = new_pool()
                pending = deque((r, submit(r)) for r, _ in pending)
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _as_failure(f: DiscoverFailure) -> FailedFile:
    return FailedFile(f.path, f.sha256, f.stage, f.reason)


# ---- identity and sidecars --------------------------------------------------------------------------------
def video_record(item: PreparedVideo, side: Sidecars, pz: Pseudonymizer, store_raw: bool) -> VideoRecord:
    """The catalog row of a prepared video, with identity resolved and pseudonymised (see module doc)."""
    from echosearch.catalog import VideoRecord

    meta, rec = item.meta, item.record
    row = side.identity_row(rec.path, meta.sop_uid) or {}
    patient_id, study_uid, accession = meta.patient_id, meta.study_uid, meta.accession
    study_date = meta.study_date
    if meta.kind != "dicom" and row:
        patient_id, study_uid = pick(row, "recorded_patient_id", "patient_id"), pick(row, "study_uid")
        accession, study_date = pick(row, "accession_number", "accession"), _as_date(pick(row, "study_date"))
    study_uid = str(study_uid) if study_uid else f"2.25.{int(rec.sha256[:30], 16)}"
    if patient_id:
        patient = pz.patient(str(patient_id))
    else:  # unknown patient: the study (DICOM) or the file (video) is its own patient
        own = f"study:{study_uid}" if meta.kind == "dicom" and meta.study_uid else f"file:{rec.sha256}"
        patient = pz.patient(own)
    assert patient is not None
    path, location = stored_location(rec.path, pz, store_raw)
    return VideoRecord(
        sha256=rec.sha256, path=path, location=location, size_bytes=rec.size, kind=rec.kind,
        patient_pseudonym=patient, study_uid=study_uid, accession_pseudonym=pz.accession(accession),
        study_date=study_date,
        series_uid=meta.series_uid, sop_uid=meta.sop_uid, view=pick(row, "view"), n_frames=meta.n_frames,
        height=meta.height, width=meta.width, fps=round(meta.fps, 4), manufacturer=meta.manufacturer,
        manufacturer_model=meta.manufacturer_model, photometric=meta.photometric,
        transfer_syntax=meta.transfer_syntax, sector_bbox=item.sector_bbox, sector_source=item.sector_source,
        patient_id_raw=str(patient_id) if store_raw and patient_id else None,
        patient_name=meta.patient_name if store_raw else None,
        birth_date=meta.birth_date if store_raw else None,
    )


def _as_date(value: Any) -> date | None:
    return value if value is None or isinstance(value, date) else _date(value)


def attach_sidecars(catalog: Catalog, side: Sidecars, pz: Pseudonymizer, summary: ScanSummary) -> None:
    """Attach reports and labels to what the catalog holds (this run's and earlier runs' videos)."""
    if not side.reports and not side.labels:
        return
    rows = catalog.con.execute("SELECT v.video_key, v.path, v.sop_uid, s.study_uid, s.accession_pseudonym, "
                               "s.study_key FROM videos v JOIN studies s USING (study_key)").fetchall()
    where = catalog.locations(None, pz)  # the files' own names (the catalog shows labels)
    by_file: dict[str, tuple[int, str]] = {}
    for key, _, _, study, *_ in rows:
        by_file.setdefault(where[int(key)].name, (key, study))
        by_file.setdefault(where[int(key)].stem, (key, study))
    by_sop = {sop: key for key, _, sop, *_ in rows if sop}
    by_acc = {acc: study for _, _, _, study, acc, _ in rows if acc}
    study_keys = {study: skey for *_, study, _, skey in rows}

    def file_hit(key: str) -> tuple[int, str] | None:
        return by_file.get(key) or by_file.get(Path(key).name)

    for kind, key, text, source in side.reports:
        hit = file_hit(key)
        study = {"study_uid": key if key in study_keys else None, "file": hit[1] if hit else None,
                 "accession": by_acc.get(pz.accession(key) or "")}[kind]
        attached = study is not None and catalog.record_report(study, text, source)
        summary.reports_attached += attached
        summary.reports_unmatched += not attached
    for kind, key, name, value, source in side.labels:
        target: tuple[str, int] | None = None
        if kind == "file" and (hit := file_hit(key)):
            target = ("video", hit[0])
        elif kind == "sop_uid" and key in by_sop:
            target = ("video", by_sop[key])
        elif kind == "study_uid" and key in study_keys:
            target = ("study", study_keys[key])
        if target is None:
            summary.labels_unmatched += 1
            continue
        catalog.record_label(target[0], target[1], name, value, source)
        summary.labels_recorded += 1


# ---- scan: fill the catalog ------------------------------------------------------------------------------
class _CountingKnown:
    """``known_hashes`` wrapper that counts how many discovered files were skipped as already indexed."""

    def __init__(self, known: set[str]) -> None:
        self.known, self.hits = known, 0

    def __contains__(self, item: object) -> bool:
        hit = item in self.known
        self.hits += hit
        return hit


@contextmanager
def _progress(enabled: bool, total: int | None) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _name: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("scan"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:  # stdout stays clean for --json
        task = bar.add_task("", total=total)
        yield lambda _name: bar.update(task, advance=1)  # no file names: they carry patient IDs


def scan(
    sources: Sequence[Path],
    catalog: Catalog,
    settings: Settings,
    policy: FramePolicy | None = None,
    reports: Path | None = None,
    labels: Path | None = None,
    progress: bool = True,
    on_video: Callable[[int, PreparedVideo], None] | None = None,
    record_batch: int = 8,
) -> ScanSummary:
    """Ingest ``sources`` into ``catalog``; a bad file becomes an ``ingest_errors`` row, never an exception.

    ``on_video(video_key, prepared)`` is called after each new video is committed (the encode pipeline
    can hook in here to embed the already-prepared frames instead of decoding them again). Videos are
    committed ``record_batch`` at a time (a few statements per batch instead of several per video); keep
    it within the decode prefetch so that the model never waits on it. An interrupted scan loses at
    most the uncommitted batch, which the next run finds again.
    """
    from echosearch.discover import count_candidates
    from echosearch.pseudonym import Pseudonymizer

    t0 = time.perf_counter()
    policy = policy or default_policy(settings)
    pz = Pseudonymizer(settings.require_secret())
    catalog.check_pseudonym_key(pz.fingerprint())
    if not settings.store_raw_identifiers:
        catalog.seal_plain_paths(pz)  # an index from before sealing: its paths carry identifiers
    sources = [Path(s) for s in sources]
    side = load_sidecars(sources, reports=reports, labels=labels)
    catalog.new_run("scan", {"sources": [str(s) for s in sources], "policy": policy_manifest(policy)})
    known = _CountingKnown(catalog.known_hashes())
    summary = ScanSummary()
    pending: list[tuple[VideoRecord, PreparedVideo]] = []

    def note(path: Path, sha256: str | None, stage: str, reason: str) -> str:
        """Record an ``ingest_errors`` row under the file's label; returns the label."""
        shown, location = stored_location(path, pz, settings.store_raw_identifiers)
        try:
            catalog.record_error(shown, sha256, stage, reason, location)
        except Exception as exc:  # noqa: BLE001 - one unrecordable row must not end the batch
            log.warning("could not record an ingest_errors row (%s): %s", stage, exc)
        return shown

    def fail(path: Path, sha256: str | None, stage: str, reason: str) -> None:
        summary.failed += 1
        shown = note(path, sha256, stage, reason)
        if len(summary.failures) < MAX_LISTED_FAILURES:  # all of them are in ingest_errors
            summary.failures.append({"path": shown, "stage": stage, "reason": reason})

    def record(batch: list[tuple[VideoRecord, PreparedVideo]]) -> dict[str, int]:
        with catalog.transaction():
            keys = catalog.record_videos([rec for rec, _ in batch])
            catalog.clear_errors([rec.path for rec, _ in batch])
        return keys

    def commit() -> None:
        if not pending:
            return
        done, keys = list(pending), {}
        try:
            keys = record(done)
        except Exception:  # noqa: BLE001 - find the row at fault: each file on its own, a failure is its error row
            done, keys = [], {}
            for one in pending:
                try:
                    keys |= record([one])
                    done.append(one)
                except Exception as exc:  # noqa: BLE001
                    fail(one[1].record.path, one[0].sha256, "catalog",
                         f"could not be recorded in the catalog [{type(exc).__name__}: {exc}]")
        summary.videos_added += len(done)
        if on_video is not None:
            for rec, item in done:
                on_video(keys[rec.sha256], item)
        pending.clear()

    with _progress(progress, count_candidates(sources) if progress else None) as advance:
        for item in iter_processed(discover(sources, known), policy, settings.workers):
            summary.discovered += 1
            if isinstance(item, FailedFile):
                advance(item.path.name)
                if not item.is_report:
                    fail(item.path, item.sha256, item.stage, item.reason)
                    continue
                note(item.path, item.sha256, item.stage, item.reason)
                summary.report_objects += 1
                if item.report and item.report.text and item.report.study_uid:
                    side.reports.append(("study_uid", item.report.study_uid, item.report.text, "dicom-sr"))
                continue
            advance(item.record.path.name)
            pending.append((video_record(item, side, pz, settings.store_raw_identifiers), item))
            if len(pending) >= record_batch:
                commit()
        commit()
    summary.skipped_known = known.hits
    attach_sidecars(catalog, side, pz, summary)
    summary.elapsed_s = round(time.perf_counter() - t0, 3)
    summary.counts = catalog.counts()
    return summary


def default_policy(settings: Settings, size: int | None = None) -> FramePolicy:
    """The frame policy of the settings for their model; ``size`` comes from the encoder (else the model's)."""
    from echosearch.frame_policy import resolve_frame_policy

    return resolve_frame_policy(settings.model, setting=settings.frame_policy, n_frames=settings.frames_per_video,
                                size=size, sampling=settings.frame_sampling)


def stored_location(path: Path, pz: Pseudonymizer, store_raw: bool) -> tuple[str, bytes | None]:
    """(what the catalog shows as the file's path, its sealed location): the file's keyed label and its
    AES-GCM sealed absolute path by default (PACS exports name folders by patient and accession); the
    absolute path itself when the operator opted in to raw identifiers."""
    if store_raw:
        return _path_str(path), None
    return pz.file_label(path.absolute()), pz.seal(path.absolute())


def _path_str(path: Path) -> str:
    """The absolute path as stored and reported: names that are not UTF-8 get ``\\xHH`` escapes
    (:func:`echosearch.catalog.storable_path`)."""
    from echosearch.catalog import storable_path

    return storable_path(path.absolute().as_posix())


def summary_dict(summary: ScanSummary) -> dict[str, Any]:
    """JSON-able form of a summary (for ``scan --json``)."""
    return asdict(summary)
