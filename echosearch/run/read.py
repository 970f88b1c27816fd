"""Read stage: an input file -> a prepared clip record (catalog row + model-input frames + cheap scope) or a
failure record. Discover (hash, sniff, skip what is finished) + decode + prepare + scope, never raising for a
bad file.

* :func:`find_inputs`: the discover step, in input order, skipping files whose hash is finished (or seen).
* :func:`read_file`: decode + prepare + scope + the file's catalog row (identifiers pseudonymised, path
  sealed), pure apart from reading the file: runners run it in worker processes or Ray tasks.
* :func:`read_unit`: both steps over a unit's files (a Ray read task).

Like ``decode``, ``prepare`` and ``discover``, this module imports without the catalog's libraries (DuckDB,
polars), so that decoding can be measured on a machine that has only the model's (``bench/device_check.py``).

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

from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echosearch.errors import IngestError, ReportObjectFound
from echosearch.ingest.decode import VideoMeta, _date, _s, decode_video, explain, read_dicom_header
from echosearch.ingest.discover import DiscoverFailure, FileRecord, Sidecars, discover, pick
from echosearch.ingest.prepare import FramePolicy, sample_indices, sector_and_input
from echosearch.ingest.pseudonym import Pseudonymizer
from echosearch.run.records import REPORT_STAGE, ClipRecord, FailureRecord, UnitResult

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from echosearch.catalog import VideoRecord
    from echosearch.config import Settings


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
class ReadContext:
    """What the read stage needs besides the files: the frame policy, sidecar ground truth (identity of
    AVI/MP4 files), the pseudonymisation secret (None: a query clip, no catalog row) and whether raw
    identifiers are stored. ``known``: hashes to skip (finished), used by :func:`read_unit`."""

    policy: FramePolicy
    sidecars: Sidecars
    secret: bytes | None
    store_raw: bool = False
    known: Container[str] = frozenset()


# ---- discover --------------------------------------------------------------------------------------------
class KnownFiles:
    """Finished hashes (a ``known_hashes`` container for :func:`echosearch.ingest.discover.discover`) that counts how
    many discovered files were skipped because of them."""

    def __init__(self, known: Container[str]) -> None:
        self.known, self.hits = known, 0

    def __contains__(self, item: object) -> bool:
        hit = item in self.known
        self.hits += hit
        return hit


def find_inputs(sources: Sequence[Path], known: Container[str]) -> Iterator[FileRecord | DiscoverFailure]:
    """Discover step: every candidate under ``sources`` in a deterministic order, hashed and sniffed; a file
    whose hash is in ``known`` or was seen earlier in this run is skipped."""
    return discover([Path(s) for s in sources], known)


# ---- decode + prepare ------------------------------------------------------------------------------------
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


# ---- the catalog row -------------------------------------------------------------------------------------
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


def stored_location(path: Path, pz: Pseudonymizer, store_raw: bool) -> tuple[str, bytes | None]:
    """(what the catalog shows as the file's path, its sealed location): the file's keyed label and its
    AES-GCM sealed absolute path by default (PACS exports name folders by patient and accession); the
    absolute path itself when the operator opted in to raw identifiers."""
    if store_raw:
        return _path_str(path), None
    return pz.file_label(path.absolute()), pz.seal(path.absolute())


def _path_str(path: Path) -> str:
    """The absolute path as stored and reported: names that are not UTF-8 get ``\\xHH`` escapes
    (:func:`echosearch.store.base.storable_path`)."""
    from echosearch.store.base import storable_path

    return storable_path(path.absolute().as_posix())


def clip_scope(path: Path, frames: np.ndarray, n_frames: int | None, kind: str) -> dict[str, Any]:
    """The clip's scope from cheap signals (header, frames): a ``clip_scope`` row without its key."""
    from echosearch.model import scope

    row = scope.cheap_scope(path, frames, n_frames, kind=kind).row(0)
    row.pop("video_key")
    return row


def default_policy(settings: Settings, size: int | None = None) -> FramePolicy:
    """The frame policy of the settings for their model; ``size`` comes from the encoder (else the model's)."""
    from echosearch.ingest.frame_policy import resolve_frame_policy

    return resolve_frame_policy(settings.model, setting=settings.frame_policy, n_frames=settings.frames_per_video,
                                size=size, sampling=settings.frame_sampling)


# ---- the read stage ----------------------------------------------------------------------------------------
def read_file(item: FileRecord | DiscoverFailure, ctx: ReadContext, seq: int = 0) -> ClipRecord | FailureRecord:
    """Read one discovered input: decode + prepare + scope + catalog row; never raises for a bad file."""
    pz = Pseudonymizer(ctx.secret) if ctx.secret is not None else None

    def failure(path: Path, sha256: str | None, stage: str, reason: str, report: Any = None) -> FailureRecord:
        shown, location = stored_location(path, pz, ctx.store_raw) if pz is not None else (_path_str(path), None)
        return FailureRecord(seq, shown, location, sha256, stage, reason,
                             getattr(report, "study_uid", None), getattr(report, "text", None))

    if isinstance(item, DiscoverFailure):
        return failure(item.path, item.sha256, item.stage, item.reason)
    got = safe_process(item, ctx.policy)
    if isinstance(got, FailedFile):
        return failure(got.path, got.sha256, got.stage, got.reason, got.report)
    row = None
    if pz is not None:
        try:
            row = video_record(got, ctx.sidecars, pz, ctx.store_raw)
        except Exception as exc:  # noqa: BLE001 - one bad header value must not end the run
            return failure(item.path, item.sha256, "catalog",
                           f"could not be recorded in the catalog [{type(exc).__name__}: {exc}]")
    return ClipRecord(seq, row, got.frames, clip_scope(item.path, got.frames, got.meta.n_frames, item.kind))


def read_numbered(item: tuple[int, FileRecord | DiscoverFailure], ctx: ReadContext) -> ClipRecord | FailureRecord:
    """:func:`read_file` of a numbered input (what the local runner's worker processes receive)."""
    return read_file(item[1], ctx, item[0])


class _SeenInUnit:
    """Known hashes plus those seen earlier in the unit (a file seen twice is read once)."""

    def __init__(self, known: Container[str], seen: set[str]) -> None:
        self.known, self.seen = known, seen

    def __contains__(self, item: object) -> bool:
        return item in self.seen or item in self.known


def read_unit(name: str, ordinal: int, items: Sequence[Path | DiscoverFailure], ctx: ReadContext) -> UnitResult:
    """The read stage over a unit's inputs (discover each, then :func:`read_file`); ``seq`` is the input's
    position in the unit."""
    out = UnitResult(name, ordinal)
    seen: set[str] = set()
    for seq, item in enumerate(items):
        found = [item] if isinstance(item, DiscoverFailure) else list(find_inputs([item], _SeenInUnit(ctx.known, seen)))
        for rec in found:
            if isinstance(rec, FileRecord) and rec.size:
                seen.add(rec.sha256)
            got = read_file(rec, ctx, seq)
            (out.clips if isinstance(got, ClipRecord) else out.failures).append(got)  # type: ignore[arg-type]
    return out
