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
import multiprocessing
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

from echosearch.decode import ReportObject, VideoMeta, decode_video, read_meta, read_report_object
from echosearch.discover import DiscoverFailure, FileRecord, discover
from echosearch.errors import IngestError, ReportObjectFound
from echosearch.prepare import FramePolicy, find_sector, policy_manifest, prepare_frames, sample_indices

if TYPE_CHECKING:
    from echosearch.catalog import Catalog
    from echosearch.config import Settings

REPORT_STAGE = "report-object"


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
        raise IngestError("unrecognised file format: not DICOM (no DICM marker), AVI or MP4", stage="discover")
    meta = read_meta(record.path, record.kind)
    idx = sample_indices(meta.n_frames, policy)
    decoded = decode_video(record.path, record.kind, idx)
    uniq = np.unique(decoded.frame_indices, return_index=True)[1]
    sector = find_sector(decoded.frames[np.sort(uniq)], decoded.meta.regions)
    frames = prepare_frames(decoded.frames, sector, policy)
    return PreparedVideo(record, decoded.meta, frames, decoded.frame_indices, sector.bbox_list, sector.source)


def safe_process(record: FileRecord, policy: FramePolicy) -> PreparedVideo | FailedFile:
    """:func:`process_file` that never raises: failures and report objects become a :class:`FailedFile`."""
    try:
        return process_file(record, policy)
    except ReportObjectFound as exc:
        try:
            report = read_report_object(record.path)
        except IngestError:
            report = None
        return FailedFile(record.path, record.sha256, REPORT_STAGE, exc.reason, report)
    except IngestError as exc:
        return FailedFile(record.path, record.sha256, exc.stage, exc.reason)
    except MemoryError:
        return FailedFile(record.path, record.sha256, "decode", "out of memory while decoding (file too large)")
    except Exception as exc:  # a bug or an unforeseen codec failure must not stop the batch
        return FailedFile(record.path, record.sha256, "decode", f"unexpected {type(exc).__name__}: {exc}")


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; avoid oversubscription


def iter_processed(
    records: Iterable[FileRecord | DiscoverFailure], policy: FramePolicy, workers: int, prefetch: int = 8
) -> Iterator[PreparedVideo | FailedFile]:
    """Process records in ``workers`` spawned processes (0 = in this process), results in submission order.

    At most ``workers + prefetch`` files are in flight, so memory stays bounded however many files come.
    A worker that dies (a codec crash) costs only the file it was on: the pool is restarted and the
    other in-flight files are resubmitted.
    """
    if workers <= 0:
        for rec in records:
            yield _as_failure(rec) if isinstance(rec, DiscoverFailure) else safe_process(rec, policy)
        return
    ctx = multiprocessing.get_context("spawn")
    limit = workers + max(0, prefetch)
    pending: deque[tuple[FileRecord | DiscoverFailure, Future[PreparedVideo | FailedFile] | None]] = deque()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    try:
        it = iter(records)
        exhausted = False
        crashes = 0
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    rec = next(it)
                except StopIteration:
                    exhausted = True
                    break
                fut = None if isinstance(rec, DiscoverFailure) else pool.submit(safe_process, rec, policy)
                pending.append((rec, fut))
            if not pending:
                return
            rec, fut = pending.popleft()
            if fut is None:
                yield _as_failure(rec)  # type: ignore[arg-type]
                continue
            try:
                result = fut.result()
                crashes = 0
            except BrokenProcessPool:
                assert isinstance(rec, FileRecord)
                crashes += 1
                pool.shutdown(wait=False, cancel_futures=True)
                if crashes >= 3:  # workers cannot run at all here: finish in this process
                    yield safe_process(rec, policy)
                    rest = (r for r, _ in pending)
                    pending.clear()
                    yield from iter_processed(itertools.chain(rest, it), policy, 0)
                    return
                result = FailedFile(rec.path, rec.sha256, "decode", "decoder process crashed on this file")
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
                pending = deque(
                    (r, None if f is None else pool.submit(safe_process, r, policy)) for r, f in pending
                )
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _as_failure(f: DiscoverFailure) -> FailedFile:
    return FailedFile(f.path, f.sha256, f.stage, f.reason)


# ---- sidecars: ground truth, reports, labels ------------------------------------------------------------
LABEL_SKIP = {"filename", "file_name", "path", "sop_uid", "study_uid", "studyinstanceuid", "sopinstanceuid",
              "frameheight", "framewidth", "fps", "numberofframes"}


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def _read_table(path: Path) -> list[dict[str, Any]]:
    import polars as pl

    try:
        df = pl.read_parquet(path) if path.suffix.lower() == ".parquet" else pl.read_csv(
            path, infer_schema_length=10000)
    except Exception as exc:
        raise IngestError(f"cannot read {path.name}: {exc}", stage="discover") from exc
    return df.to_dicts()


def _pick(row: dict[str, Any], *names: str) -> Any:
    lowered = {_norm(k): v for k, v in row.items()}
    for n in names:
        v = lowered.get(n)
        if v is not None and str(v).strip():
            return v
    return None


@dataclass
class Sidecars:
    """Ground truth (view, AVI identity), report text and labels found beside or given with the sources."""

    truth: dict[str, dict[str, Any]] = field(default_factory=dict)  # absolute posix path -> row
    truth_by_sop: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: list[tuple[str, str, str, str]] = field(default_factory=list)  # key kind, key, text, source
    labels: list[tuple[str, str, str, float | str, str]] = field(default_factory=list)  # kind, key, name, v, src

    @classmethod
    def load(cls, sources: Sequence[Path], reports: Path | None = None, labels: Path | None = None) -> Sidecars:
        from echosearch.discover import is_manifest

        side = cls()
        for source in sources:
            root = source if source.is_dir() else source.parent
            if (root / "ground_truth.parquet").is_file():
                side._add_truth(root, _read_table(root / "ground_truth.parquet"))
            if (root / "reports.csv").is_file():
                side._add_reports(_read_table(root / "reports.csv"), "reports.csv")
            if source.is_file() and is_manifest(source):
                side._add_labels(_read_table(source), source.name)
        if reports is not None:
            side._add_reports(_read_table(reports), reports.name)
        if labels is not None:
            side._add_labels(_read_table(labels), labels.name)
        return side

    def _add_truth(self, root: Path, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row.get("path"):
                self.truth[(root / str(row["path"])).absolute().as_posix()] = row
            if row.get("sop_uid"):
                self.truth_by_sop[str(row["sop_uid"])] = row
            if row.get("ef") is not None and row.get("path"):
                self.labels.append(("file", Path(str(row["path"])).name, "EF", float(row["ef"]),
                                    "ground_truth.parquet"))

    def _add_reports(self, rows: list[dict[str, Any]], source: str) -> None:
        for row in rows:
            text = _pick(row, "report", "text", "report_text")
            if text is None:
                continue
            for kind, names in (("study_uid", ("study_uid", "studyinstanceuid")),
                                ("accession", ("accession_number", "accessionnumber", "accession")),
                                ("file", ("file_name", "filename", "path"))):
                key = _pick(row, *names)
                if key is not None:
                    self.add_report(kind, str(key), str(text), source)
                    break

    def add_report(self, kind: str, key: str, text: str, source: str) -> None:
        self.reports.append((kind, key, text, source))

    def _add_labels(self, rows: list[dict[str, Any]], source: str) -> None:
        for row in rows:
            key = None
            for kind, names in (("file", ("filename", "file_name", "path")), ("sop_uid", ("sop_uid",)),
                                ("study_uid", ("study_uid",))):
                if (value := _pick(row, *names)) is not None:
                    key = (kind, str(value))
                    break
            if key is None:
                continue
            for name, value in row.items():
                if _norm(name) in LABEL_SKIP or value is None or (isinstance(value, str) and not value.strip()):
                    continue
                self.labels.append((key[0], key[1], name, value if isinstance(value, str) else float(value), source))

    def identity_row(self, rec: FileRecord, meta: VideoMeta) -> dict[str, Any] | None:
        row = self.truth.get(_path_str(rec.path))
        if row is None and meta.sop_uid:
            row = self.truth_by_sop.get(meta.sop_uid)
        return row

    def apply(self, catalog: Catalog, pz: Any, summary: ScanSummary) -> None:
        """Attach reports and labels to what the catalog holds (this run's and earlier runs' videos)."""
        if not self.reports and not self.labels:
            return
        rows = catalog.con.execute(
            "SELECT v.video_key, v.path, v.sop_uid, s.study_uid, s.accession_pseudonym "
            "FROM videos v JOIN studies s USING (study_key)").fetchall()
        by_file: dict[str, tuple[int, str]] = {}
        by_sop: dict[str, int] = {}
        by_acc: dict[str, str] = {}
        for key, path, sop, study, acc in rows:
            p = Path(path)
            by_file.setdefault(p.name, (key, study))
            by_file.setdefault(p.stem, (key, study))
            if sop:
                by_sop[sop] = key
            if acc:
                by_acc[acc] = study
        studies = {r[3] for r in rows}
        for kind, key, text, source in self.reports:
            study = {"study_uid": key if key in studies else None, "accession": by_acc.get(pz.accession(key) or ""),
                     "file": (by_file.get(key) or by_file.get(Path(key).name) or (None, None))[1]}[kind]
            if study is not None and catalog.record_report(study, text, source):
                summary.reports_attached += 1
            else:
                summary.reports_unmatched += 1
        study_keys = {r[0]: r[1] for r in catalog.con.execute("SELECT study_uid, study_key FROM studies").fetchall()}
        for kind, key, name, value, source in self.labels:
            target: tuple[str, int] | None = None
            if kind == "file" and (hit := by_file.get(key) or by_file.get(Path(key).name)):
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


def video_record(item: PreparedVideo, side: Sidecars, pz: Any, store_raw: bool) -> Any:
    """The catalog row of a prepared video, with identity resolved and pseudonymised (see module doc)."""
    from echosearch.catalog import VideoRecord

    meta, rec = item.meta, item.record
    row = side.identity_row(rec, meta) or {}
    patient_id, study_uid, accession, study_date = meta.patient_id, meta.study_uid, meta.accession, meta.study_date
    if meta.kind != "dicom" and row:
        patient_id = _pick(row, "recorded_patient_id", "patient_id")
        study_uid = _pick(row, "study_uid")
        accession = _pick(row, "accession_number", "accession")
        study_date = _as_date(_pick(row, "study_date"))
    study_uid = str(study_uid) if study_uid else f"2.25.{int(rec.sha256[:30], 16)}"
    if patient_id:
        patient = pz.patient(str(patient_id))
    elif meta.kind == "dicom" and meta.study_uid:
        patient = pz.patient(f"study:{study_uid}")
    else:
        patient = pz.patient(f"file:{rec.sha256}")
    return VideoRecord(
        sha256=rec.sha256, path=_path_str(rec.path), size_bytes=rec.size, kind=rec.kind,
        patient_pseudonym=patient, study_uid=study_uid, accession_pseudonym=pz.accession(accession),
        study_date=study_date, series_uid=meta.series_uid, sop_uid=meta.sop_uid,
        view=_pick(row, "view"), n_frames=meta.n_frames, height=meta.height, width=meta.width,
        fps=round(meta.fps, 4), manufacturer=meta.manufacturer, manufacturer_model=meta.manufacturer_model,
        photometric=meta.photometric, transfer_syntax=meta.transfer_syntax, sector_bbox=item.sector_bbox,
        sector_source=item.sector_source,
        patient_id_raw=str(patient_id) if store_raw and patient_id else None,
        patient_name=meta.patient_name if store_raw else None, birth_date=meta.birth_date if store_raw else None,
    )


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date):
        return value
    from echosearch.decode import _date

    return _date(value)


# ---- scan: fill the catalog ---------------------------------------------------------------------------------
class _CountingKnown:
    """``known_hashes`` wrapper that counts how many discovered files were skipped as already indexed."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.hits = 0

    def __contains__(self, item: object) -> bool:
        hit = item in self.known
        self.hits += hit
        return hit


@contextmanager
def _progress(enabled: bool, total: int | None) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _name: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("scan"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), transient=False) as bar:
        task = bar.add_task("", total=total)
        yield lambda name: bar.update(task, advance=1, description=name[:40])


def scan(
    sources: Sequence[Path],
    catalog: Catalog,
    settings: Settings,
    policy: FramePolicy | None = None,
    reports: Path | None = None,
    labels: Path | None = None,
    progress: bool = True,
    on_video: Callable[[int, PreparedVideo], None] | None = None,
) -> ScanSummary:
    """Ingest ``sources`` into ``catalog``; a bad file becomes an ``ingest_errors`` row, never an exception.

    ``on_video(video_key, prepared)`` is called after each new video is committed (the encode pipeline
    can hook in here to embed the already-prepared frames).
    """
    from echosearch.discover import count_candidates
    from echosearch.pseudonym import Pseudonymizer

    t0 = time.perf_counter()
    policy = policy or default_policy(settings)
    pz = Pseudonymizer(settings.require_secret())
    catalog.check_pseudonym_key(pz.fingerprint())
    sources = [Path(s) for s in sources]
    side = Sidecars.load(sources, reports=reports, labels=labels)
    catalog.new_run("scan", {"sources": [str(s) for s in sources], "policy": policy_manifest(policy)})
    known = _CountingKnown(catalog.known_hashes())
    summary = ScanSummary()
    sr_reports: list[tuple[str, str]] = []
    with _progress(progress, count_candidates(sources) if progress else None) as advance:
        for item in iter_processed(discover(sources, known), policy, settings.workers):
            summary.discovered += 1
            advance(item.record.path.name if isinstance(item, PreparedVideo) else item.path.name)
            if isinstance(item, FailedFile):
                catalog.record_error(_path_str(item.path), item.sha256, item.stage, item.reason)
                if item.is_report:
                    summary.report_objects += 1
                    if item.report and item.report.text and item.report.study_uid:
                        sr_reports.append((item.report.study_uid, item.report.text))
                else:
                    summary.failed += 1
                    summary.failures.append({"path": str(item.path), "stage": item.stage, "reason": item.reason})
                continue
            rec = video_record(item, side, pz, settings.store_raw_identifiers)
            key = catalog.record_video(rec)
            catalog.clear_error(rec.path)
            summary.videos_added += 1
            if on_video is not None:
                on_video(key, item)
    summary.skipped_known = known.hits
    for study_uid, text in sr_reports:
        side.add_report("study_uid", study_uid, text, "dicom-sr")
    side.apply(catalog, pz, summary)
    summary.elapsed_s = round(time.perf_counter() - t0, 3)
    summary.counts = catalog.counts()
    return summary


def default_policy(settings: Settings, size: int | None = None) -> FramePolicy:
    """The frame policy of the settings; ``size`` comes from the encoder (112 / 224 when unknown)."""
    name = settings.frame_policy
    return FramePolicy(name, settings.frames_per_video, size or (224 if name == "echoclip" else 112))


def _path_str(path: Path) -> str:
    return path.absolute().as_posix()


def summary_dict(summary: ScanSummary) -> dict[str, Any]:
    """JSON-able form of a summary (for ``scan --json``)."""
    return asdict(summary)
