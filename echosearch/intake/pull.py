"""``echosearch pull``: new ultrasound studies from a DICOMweb server (QIDO-RS to find, WADO-RS to retrieve).

One run: take the intake lock (a second run, e.g. an overlapping cron job, stops with :class:`IntakeBusy`),
ask QIDO-RS for studies with ``ModalitiesInStudy=US`` and ``StudyDate`` from the watermark on, list each
study's instances, retrieve the ultrasound ones the intake store does not hold yet (WADO-RS, original transfer
syntax, bytes kept as sent), store them durably like the receiver does, index what is pending, and move the
watermark.

The watermark (per DICOMweb source, in the catalog's manifest under ``pull:<hash of the URL>``) is the study
date the next run starts from. The query includes that day, so studies that arrive late on the same day are
found; instances already stored are skipped without being fetched. An instance that cannot be retrieved is
retried by the next runs and holds the watermark at its study's date until it succeeds or has failed
``max_attempts`` times; then it becomes an ``ingest_errors`` row (stage ``pull``) and stops holding it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from echosearch.config import Settings
from echosearch.errors import CatalogError
from echosearch.intake.indexer import CatalogIndexer, IndexFn
from echosearch.intake.store import ULTRASOUND_CLASSES, IntakeError, IntakeStore, file_lock, safe_uid

log = logging.getLogger(__name__)

PULL_LOCK = "pull.lock"
PULL_STAGE = "pull"
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_TAGS = {"StudyInstanceUID": "0020000D", "StudyDate": "00080020", "SeriesInstanceUID": "0020000E",
         "SOPInstanceUID": "00080018", "SOPClassUID": "00080016"}


@dataclass
class PullSummary:
    """What one pull did (counts only: no UIDs, no identifiers)."""

    source: str = ""
    watermark_before: str | None = None
    watermark_after: str | None = None
    studies: int = 0
    instances: int = 0
    fetched: int = 0
    already_stored: int = 0
    not_ultrasound: int = 0
    failed: int = 0  # instances (or studies) that failed this run: retried next run
    given_up: int = 0  # failed max_attempts runs: now an ingest_errors row each, no longer retried
    indexed: int = 0
    elapsed_s: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)


def source_key(url: str) -> tuple[str, str]:
    """(manifest key, URL shown in output) of a DICOMweb source: user, password and query left out."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    shown = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return "pull:" + hashlib.sha256(shown.encode()).hexdigest()[:12], shown


def _value(item: dict[str, Any], keyword: str) -> str | None:
    values = item.get(_TAGS[keyword], {}).get("Value") or []
    return str(values[0]) if values else None


def _date(value: str | None) -> date | None:
    try:
        return datetime.strptime((value or "")[:8], "%Y%m%d").date() if value else None
    except ValueError:
        return None


def search_all(search: Any, uid_keyword: str, page: int = 1000, **kwargs: Any) -> list[dict[str, Any]]:
    """Every QIDO-RS match, page by page (``limit``/``offset``), each UID once. dicomweb-client's own
    ``get_remaining`` loops forever on a server that ignores ``offset`` without ``limit`` (Orthanc 1.10)."""
    found: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        subset = search(limit=page, offset=offset, **kwargs)
        fresh = {uid: item for item in subset if (uid := _value(item, uid_keyword)) and uid not in found}
        found.update(fresh)
        if len(subset) < page or not fresh:  # the last page, or a server that ignores offset
            return list(found.values())
        offset += len(subset)


def retrieve_raw(client: Any, study: str, series: str, sop: str) -> bytes:
    """One instance's DICOM file bytes as the server holds them (WADO-RS, ``transfer-syntax=*``), unparsed, so
    that they hash and decode exactly as the PACS stored them."""
    from dicomweb_client.web import _Transaction

    url = client._get_instances_url(_Transaction.RETRIEVE, study, series, sop)
    resp = client._http_get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    if resp.headers.get("Content-Type", "").startswith("application/dicom"):
        return bytes(resp.content)
    parts = list(client._decode_multipart_message(resp, stream=False))
    if len(parts) != 1:
        raise IntakeError(f"the server answered {len(parts)} parts for one instance")
    return bytes(parts[0])


def _check_uids(data: bytes, study: str, sop: str) -> None:
    """The retrieved file is the instance asked for (a proxy or a misconfigured server could send another)."""
    from io import BytesIO

    import pydicom

    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
    if str(ds.get("SOPInstanceUID", "")) != sop or str(ds.get("StudyInstanceUID", "")) != study:
        raise IntakeError("the server sent an instance other than the one asked for")


def _retry_locked(fn: Any, wait_s: float = 120.0) -> Any:
    """``fn()``, again every second for up to ``wait_s`` while another process (a receiver indexing, a
    search) holds the catalog."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn()
        except CatalogError as exc:
            if "another process" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def with_catalog(index_dir: Path, fn: Any, wait_s: float = 120.0) -> Any:
    """``fn(catalog)`` on the index's catalog, waiting up to ``wait_s`` while another process holds it."""
    from echosearch.catalog import Catalog

    def run() -> Any:
        with Catalog.open(index_dir, create=True) as cat:
            return fn(cat)

    return _retry_locked(run, wait_s)


def pull(url: str, index_dir: Path | str, settings: Settings, *, since: date | None = None,
         client: Any = None, progress: bool = True, max_attempts: int = 3, index_fn: IndexFn | None = None,
         index: bool = True) -> PullSummary:
    """Pull new ultrasound instances from the DICOMweb server at ``url`` into ``index_dir`` and index them.

    ``since`` overrides the stored watermark for this run (the watermark never moves back because of it).
    Safe to run from cron: a run that finds another one in progress raises :class:`IntakeBusy`.
    """
    from echosearch.ingest.pseudonym import Pseudonymizer

    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    pz = Pseudonymizer(settings.require_secret())
    key, shown = source_key(url)
    summary = PullSummary(source=shown)
    store = IntakeStore(index_dir)
    with file_lock(store.root / PULL_LOCK, blocking=False):
        state: dict[str, Any] = with_catalog(index_dir, lambda c: c.get_manifest(key)) or {}
        summary.watermark_before = state.get("watermark")
        start = since or _date((state.get("watermark") or "").replace("-", ""))
        attempts: dict[str, int] = dict(state.get("attempts", {}))
        given_up: set[str] = set(state.get("given_up", []))
        if client is None:
            from dicomweb_client.api import DICOMwebClient

            client = DICOMwebClient(url)
        filters: dict[str, Any] = {"ModalitiesInStudy": "US"}
        if start is not None:
            filters["StudyDate"] = f"{start:%Y%m%d}-"
        try:
            studies = search_all(client.search_for_studies, "StudyInstanceUID", search_filters=filters)
        except Exception as exc:  # noqa: BLE001 - connection refused, HTTP errors: one line
            raise IntakeError(f"QIDO-RS search at {shown} failed: {type(exc).__name__}: {_short(exc)}") from exc
        studies = sorted(studies, key=lambda s: (_value(s, "StudyDate") or "", _value(s, "StudyInstanceUID") or ""))
        summary.studies = len(studies)
        seen_dates: list[date] = []
        holding: list[date] = []
        errors: list[tuple[str, str]] = []
        with _bar(progress, len(studies)) as advance:
            for study in studies:
                advance()
                study_uid = _value(study, "StudyInstanceUID")
                study_date = _date(_value(study, "StudyDate"))
                if not study_uid or study_uid in given_up:
                    continue
                try:
                    instances = search_all(client.search_for_instances, "SOPInstanceUID",
                                           study_instance_uid=study_uid)
                    attempts.pop(study_uid, None)
                except Exception as exc:  # noqa: BLE001 - this study is tried again next run
                    attempts[study_uid] = attempts.get(study_uid, 0) + 1
                    reason = (f"QIDO-RS instance search failed {attempts[study_uid]} time(s): "
                              f"{type(exc).__name__}: {_short(exc)}")
                    log.warning("%s", reason)
                    if attempts[study_uid] >= max_attempts:  # one error row for the study; stop holding
                        given_up.add(study_uid)
                        attempts.pop(study_uid)
                        summary.given_up += 1
                        errors.append((_placeholder(store, study_uid, None), reason))
                    else:
                        summary.failed += 1
                        if study_date:
                            holding.append(study_date)
                    continue
                if study_date:
                    seen_dates.append(study_date)
                for inst in instances:
                    summary.instances += 1
                    sop, series = _value(inst, "SOPInstanceUID"), _value(inst, "SeriesInstanceUID")
                    if _value(inst, "SOPClassUID") not in ULTRASOUND_CLASSES:
                        summary.not_ultrasound += 1
                        continue
                    if not sop or not series:
                        continue
                    if sop in given_up or store.has(sop):
                        summary.already_stored += 1
                        continue
                    try:
                        data = retrieve_raw(client, study_uid, series, sop)
                        _check_uids(data, study_uid, sop)
                        store.put(data, study_uid, sop, via="dicomweb")
                        summary.fetched += 1
                        attempts.pop(sop, None)
                    except Exception as exc:  # noqa: BLE001 - one instance must not stop the run
                        attempts[sop] = attempts.get(sop, 0) + 1
                        reason = f"WADO-RS retrieval failed {attempts[sop]} time(s): {type(exc).__name__}: {_short(exc)}"
                        if attempts[sop] >= max_attempts:
                            given_up.add(sop)
                            attempts.pop(sop)
                            summary.given_up += 1
                            errors.append((_placeholder(store, study_uid, sop), reason))
                        else:
                            summary.failed += 1
                            if study_date:
                                holding.append(study_date)
                        log.warning("%s", reason)
        if holding:
            after: date | None = min(holding)
        else:
            old = _date((state.get("watermark") or "").replace("-", ""))
            after = max([d for d in (*seen_dates, old) if d is not None], default=None)
        summary.watermark_after = after.isoformat() if after else None

        def save(cat: Any) -> None:
            from echosearch.run.read import stored_location

            for where, reason in errors:
                label, location = stored_location(Path(where), pz, settings.store_raw_identifiers)
                cat.record_error(label, None, PULL_STAGE, reason, location)
            cat.set_manifest(key, {"source": shown, "watermark": summary.watermark_after,
                                   "attempts": attempts, "given_up": sorted(given_up),
                                   "last_run": datetime.now(timezone.utc).isoformat(timespec="seconds")})

        with_catalog(index_dir, save)
        if index:
            pending = store.pending()
            if pending:
                fn = index_fn or CatalogIndexer(index_dir, settings, progress=progress)
                result = _retry_locked(lambda: fn([store.path_of(e) for e in pending]))
                store.mark_indexed(pending)
                summary.indexed = len(pending)
                scan = getattr(result, "scan", None)
                if isinstance(scan, dict):
                    summary.index = {"videos_added": scan.get("videos_added", 0), "failed": result.failed,
                                     "skipped_known": scan.get("skipped_known", 0)}
    summary.elapsed_s = round(time.perf_counter() - t0, 3)
    log.info("pull: %d studies, %d fetched, %d already stored, %d failed, %d given up", summary.studies,
             summary.fetched, summary.already_stored, summary.failed, summary.given_up)
    return summary


def _placeholder(store: IntakeStore, study: str, sop: str | None) -> str:
    """Where the instance would have been stored (the study's folder for a study that could not be listed):
    its ingest error row carries that path's label."""
    try:
        folder = store.root / safe_uid(study, "Study Instance UID")
        return str(folder / f"{safe_uid(sop, 'SOP Instance UID')}.dcm" if sop is not None else folder)
    except IntakeError:
        return str(store.root / "invalid-uid.dcm")


def _short(exc: BaseException) -> str:
    """The first line of an error, URLs (they carry study and instance UIDs) left out: fit for logs and for
    the reason of an ingest error row."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return _URL.sub("<url>", text)[:200]


class _bar:
    """A rich progress bar over studies (counts only), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._progress: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("pull"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True))
        self._progress.__enter__()
        task = self._progress.add_task("", total=self.total)
        return lambda: self._progress.update(task, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def summary_dict(summary: PullSummary) -> dict[str, Any]:
    return asdict(summary)
