"""The local runner: the indexing chain on one machine, resumable, the default of ``echosearch index``.

    find_inputs (discover)  ->  read_file (worker processes)  ->  frame_batches -> EncodeStage.encode
        -> write_batch (one transaction per batch)  ->  attach_sidecars  ->  finish_index

The runner passes each stage's records to the next; no stage calls another. Discovery hashes files in this
process and skips those already finished (a video with a vector); reading (decode, prepare, scope, the
catalog row) runs ahead in ``settings.workers`` processes while this process runs the model on batches of
``batch_size`` frames shared by several clips; each batch's rows and vectors are committed together, so a run
that is killed loses at most the batch in flight and a re-run resumes by content hash. ``scan`` is the same
chain without the encode stage (catalog rows only, ``record_batch`` clips per commit); videos it recorded are
encoded by the next ``index`` (their files are read again from the catalog's sealed locations).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from echosearch.catalog import Catalog
from echosearch.config import Settings
from echosearch.ingest.discover import DiscoverFailure, FileRecord, load_sidecars
from echosearch.ingest.prepare import FramePolicy, policy_manifest
from echosearch.model.encode import Encoder
from echosearch.run.encode import EncodeStage, frame_batches
from echosearch.run.finish import finish_index
from echosearch.run.read import KnownFiles, ReadContext, find_inputs, read_numbered, stored_location
from echosearch.run.records import ClipRecord, EncodedClip, FailureRecord
from echosearch.run.setup import RunSetup, load_run_encoder, prepare_run
from echosearch.run.workers import ordered_map
from echosearch.run.write import attach_sidecars, write_batch, write_encoded, write_failure, write_rows

log = logging.getLogger(__name__)
MAX_LISTED_FAILURES = 1000
FAULT_KILL_AFTER_COMMITS = "ECHOSEARCH_FAULT_KILL_AFTER_COMMITS"  # tests: SIGKILL this process after N commits


@dataclass
class ScanSummary:
    """What the read and write stages did; ``failed`` excludes report objects (they are not failures)."""

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


@dataclass
class IndexSummary:
    """What ``index`` did (scan summary plus encoding figures)."""

    scan: dict[str, Any] = field(default_factory=dict)
    videos_encoded: int = 0
    frames_encoded: int = 0
    encode_failed: int = 0  # videos recorded earlier (by ``scan``) whose files could not be read again
    studies_pooled: int = 0
    reports_embedded: int = 0
    elapsed_s: float = 0.0
    model_seconds: float = 0.0
    identity_seconds: float = 0.0  # part of model_seconds: the identity encoder (head only when it shares the tower)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # setup / scan_encode / finalize
    steady_frames_per_s: float | None = None  # first to last committed batch (>= 3): the pipeline when full
    vector_indexes: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return int(self.scan.get("failed", 0)) + self.encode_failed


class _Commits:
    """Committed batches: counts, progress callback, steady rate, fault injection."""

    def __init__(self, on_progress: Callable[[int, int], None] | None) -> None:
        self.videos = self.frames = self.n = 0
        self.on_progress = on_progress
        self.first: tuple[float, int] | None = None  # (time, frames) at the first commit
        self.last = 0.0
        self.kill_after = int(os.environ.get(FAULT_KILL_AFTER_COMMITS, "0") or 0)

    def add(self, videos: int, frames: int) -> None:
        self.videos, self.frames, self.n = self.videos + videos, self.frames + frames, self.n + 1
        if self.kill_after and self.n >= self.kill_after:  # fault injection for the resume test
            os.kill(os.getpid(), signal.SIGKILL)
        self.last = time.perf_counter()
        self.first = self.first or (self.last, self.frames)
        if self.on_progress:
            self.on_progress(self.videos, self.frames)

    def steady_rate(self) -> float | None:
        """Frames per second from the first to the last commit (3 commits at least: 2 intervals)."""
        if self.first is None or self.n < 3 or self.last <= self.first[0]:
            return None
        return (self.frames - self.first[1]) / (self.last - self.first[0])


@contextmanager
def _progress(enabled: bool, total: int | None) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("scan"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:  # stdout stays clean for --json
        task = bar.add_task("", total=total)
        yield lambda: bar.update(task, advance=1)  # no file names: they carry patient IDs


def _batches(clips: Iterable[ClipRecord], n: int) -> Iterator[list[ClipRecord]]:
    it = iter(clips)
    while batch := list(itertools.islice(it, n)):
        yield batch


def run_chain(sources: Sequence[Path], cat: Catalog, setup: RunSetup, encode: EncodeStage | None = None, *,
              reports: Path | None = None, labels: Path | None = None, progress: bool = True, record_batch: int = 8,
              on_progress: Callable[[int, int], None] | None = None) -> tuple[ScanSummary, _Commits, int]:
    """Run the chain over ``sources`` into ``cat``: with ``encode``, read -> encode -> write (plus the videos an
    earlier scan recorded without vectors); without, read -> write rows. Returns the summary, the commits, and
    how many inputs recorded earlier failed to be read again."""
    from echosearch.ingest.discover import count_candidates

    settings, pz = setup.settings, setup.pz
    t0 = time.perf_counter()
    sources = [Path(s) for s in sources]
    side = load_sidecars(sources, reports=reports, labels=labels)
    cat.new_run("scan", {"sources": [str(s) for s in sources], "policy": policy_manifest(setup.policy)})
    summary = ScanSummary()
    known = KnownFiles(cat.encoded_hashes() if encode is not None else cat.known_hashes())
    earlier: list[Path] = []
    earlier_labels: set[str] = set()
    if encode is not None and (unencoded := cat.unencoded_videos()).height:  # recorded by a scan, not encoded
        where = cat.locations(unencoded["video_key"].to_list(), pz)
        earlier, earlier_labels = list(where.values()), set(unencoded["path"].to_list())
    ctx = setup.read_context(side)
    inputs = enumerate(find_inputs(sources + earlier, known))
    reads = ordered_map(read_numbered, inputs, settings.workers, shared=ctx, on_crash=_crash_failure(ctx, setup))
    commits, failed_earlier = _Commits(on_progress), 0

    def fail(f: FailureRecord) -> None:
        nonlocal failed_earlier
        if f.path in earlier_labels:
            failed_earlier += 1
        else:
            summary.failed += 1
            if len(summary.failures) < MAX_LISTED_FAILURES:  # all of them are in ingest_errors
                summary.failures.append({"path": f.path, "stage": f.stage, "reason": f.reason})

    def clips(advance: Callable[[], None]) -> Iterator[ClipRecord]:
        """The read stage's clips; its failures become ingest_errors rows as they come."""
        for got in reads:
            summary.discovered += 1
            advance()
            if isinstance(got, ClipRecord):
                yield got
                continue
            write_failure(cat, got)
            if not got.is_report:
                fail(got)
                continue
            summary.report_objects += 1
            if got.report_text and got.report_study_uid:
                side.reports.append(("study_uid", got.report_study_uid, got.report_text, "dicom-sr"))

    total = count_candidates(sources) + len(earlier) if progress else None
    with _progress(progress, total) as advance, closing(reads):  # closing: the worker processes end with the run
        if encode is None:
            for batch in _batches(clips(advance), record_batch):
                done, refused = write_batch(cat, batch, write_rows)
                _count(summary, done, refused, earlier_labels, fail)
                commits.add(len(done), 0)
        else:
            name = encode.encoder.name

            def write(c: Catalog, b: Sequence[EncodedClip]) -> list[int]:
                return write_encoded(c, b, name)

            for batch in frame_batches(clips(advance), settings.batch_size):
                done_e, refused = write_batch(cat, encode.encode(batch), write)
                _count(summary, done_e, refused, earlier_labels, fail)
                commits.add(len(done_e), sum(c.n_frames for c, _ in done_e))
    summary.skipped_known = known.hits
    sidecars = attach_sidecars(cat, side, pz)
    summary.reports_attached, summary.reports_unmatched = sidecars.reports_attached, sidecars.reports_unmatched
    summary.labels_recorded, summary.labels_unmatched = sidecars.labels_recorded, sidecars.labels_unmatched
    summary.elapsed_s = round(time.perf_counter() - t0, 3)
    summary.counts = cat.counts()
    return summary, commits, failed_earlier


def _count(summary: ScanSummary, done: Sequence[tuple[ClipRecord | EncodedClip, int]], refused: list[FailureRecord],
           earlier: set[str], fail: Callable[[FailureRecord], None]) -> None:
    summary.videos_added += sum(1 for c, _ in done if c.record is not None and c.record.path not in earlier)
    for f in refused:
        fail(f)


def _crash_failure(ctx: ReadContext, setup: RunSetup) -> Callable[[tuple[int, FileRecord | DiscoverFailure]],
                                                                  FailureRecord]:
    def crashed(item: tuple[int, FileRecord | DiscoverFailure]) -> FailureRecord:
        seq, rec = item
        shown, location = stored_location(rec.path, setup.pz, ctx.store_raw)
        return FailureRecord(seq, shown, location, rec.sha256, "decode", "decoder process crashed on this file")

    return crashed


def scan(sources: Sequence[Path], catalog: Catalog, settings: Settings, policy: FramePolicy | None = None,
         reports: Path | None = None, labels: Path | None = None, progress: bool = True,
         record_batch: int = 8) -> ScanSummary:
    """Read ``sources`` into ``catalog`` as rows without vectors (``echosearch scan``); a bad file becomes an
    ``ingest_errors`` row, never an exception. Rows are committed ``record_batch`` at a time: an interrupted
    scan loses at most that batch, which the next run finds again."""
    setup = prepare_run(catalog, settings, policy=policy)
    summary, _, _ = run_chain(sources, catalog, setup, reports=reports, labels=labels, progress=progress,
                              record_batch=record_batch)
    return summary


def index_sources(sources: Sequence[Path], index_dir: Path, settings: Settings, *, encoder: Encoder | None = None,
                  reports: Path | None = None, labels: Path | None = None, progress: bool = True,
                  build_vectors: bool = True, catalog: Catalog | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> IndexSummary:
    """Read, encode and write ``sources`` into ``index_dir`` (only files not finished yet), then pool studies,
    embed reports and build the vector indexes.

    ``catalog``: write through this open catalog (a server's cursor; left open) instead of opening the
    folder. Every batch of clips is its own transaction, so readers of the same database see each one.
    ``on_progress(videos, frames)`` is called after each committed batch."""
    t0 = time.perf_counter()
    enc = encoder or load_run_encoder(settings)
    summary = IndexSummary()
    with nullcontext(catalog) if catalog is not None else Catalog.open(index_dir, create=True) as cat:
        setup = prepare_run(cat, settings, enc)
        encode = setup.encode_stage()
        t_setup = time.perf_counter()
        scanned, commits, summary.encode_failed = run_chain(sources, cat, setup, encode, reports=reports,
                                                            labels=labels, progress=progress, on_progress=on_progress)
        t_encoded = time.perf_counter()
        summary.scan = asdict(scanned)
        summary.videos_encoded, summary.frames_encoded = commits.videos, commits.frames
        summary.model_seconds = round(encode.model_seconds, 3)
        summary.identity_seconds = round(encode.identity_seconds, 3)
        finished = finish_index(cat, lambda: enc, build_vectors=build_vectors)
        summary.studies_pooled, summary.reports_embedded = finished.studies_pooled, finished.reports_embedded
        summary.vector_indexes = finished.vector_indexes
        summary.counts = cat.counts()
    t_end = time.perf_counter()
    summary.elapsed_s = round(t_end - t0, 3)
    summary.stage_seconds = {"setup": round(t_setup - t0, 3), "scan_encode": round(t_encoded - t_setup, 3),
                             "finalize": round(t_end - t_encoded, 3)}
    rate = commits.steady_rate()
    summary.steady_frames_per_s = round(rate, 2) if rate is not None else None
    return summary
