"""Ingest jobs of the server: folders and files already on the server's disk, indexed one job at a time.

A job runs :func:`echosearch.run.local.index_sources` in a worker thread on its own cursor of the server's
connection. The local runner commits each encoded batch (its rows and vectors together) in one short
transaction, so searches (other cursors) see each batch as it lands, and a job killed with the server loses
at most the batch in flight: submitting the job again indexes the rest (files already in the catalog are
skipped); videos recorded by ``scan`` without vectors are encoded when the server starts.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from echosearch.catalog import Catalog
from echosearch.config import Settings
from echosearch.errors import EchosearchError, QueryError

log = logging.getLogger(__name__)
INLINE_DECODE_MAX = 12  # jobs of up to this many files (a received study) decode in the job's own thread


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Job:
    """One ingest job and its progress (what ``GET /v1/jobs/{id}`` returns)."""

    job_id: str
    sources: list[str]
    reports: str | None = None
    labels: str | None = None
    state: str = "queued"  # queued | running | done | failed
    submitted_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    candidates: int | None = None  # files found under the sources (None until counted)
    videos_encoded: int = 0
    frames_encoded: int = 0
    failed: int = 0
    error: str | None = None
    summary: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobCancelled(EchosearchError):
    """Raised inside a job's progress callback when the server stops."""


class JobRunner:
    """A queue of ingest jobs run one after another by one worker thread."""

    def __init__(self, root: Catalog, settings: Settings, encoder: Callable[[], Any | None],
                 on_commit: Callable[[], None]) -> None:
        self.root, self.settings = root, settings
        self.encoder = encoder
        self.on_commit = on_commit
        self._jobs: dict[str, Job] = {}
        self._queue: list[Job] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="echosearch-ingest", daemon=True)
        self._thread.start()

    def submit(self, sources: list[str], reports: str | None = None, labels: str | None = None) -> Job:
        """Queue a job over paths on this machine (checked to exist now)."""
        for s in [*sources, *(x for x in (reports, labels) if x)]:
            if not Path(s).exists():
                raise QueryError(f"no such file or folder on the server: {s}")
        job = Job(uuid.uuid4().hex[:12], [str(Path(s).resolve()) for s in sources], reports, labels)
        with self._cv:
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._cv.notify()
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise QueryError(f"no job {job_id!r}")
        return job

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.submitted_at)

    def busy(self) -> bool:
        return any(j.state in ("queued", "running") for j in self._jobs.values())

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.busy()

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until a job is done or failed (or ``timeout`` seconds pass); returns it."""
        job = self.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while job.state in ("queued", "running") and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)
        return job

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job stops after its next committed batch (waited for up to
        ``timeout`` seconds) and is marked failed; submitting it again indexes what it had not committed."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._queue.pop(0)
            self._execute(job)

    def _execute(self, job: Job) -> None:
        from echosearch.ingest.discover import count_candidates
        from echosearch.run.local import index_sources

        job.state, job.started_at = "running", _now()
        cur = self.root.cursor()
        try:
            job.candidates = count_candidates([Path(s) for s in job.sources]) if job.sources else 0

            def progress(videos: int, frames: int) -> None:
                job.videos_encoded, job.frames_encoded = videos, frames
                self.on_commit()
                if self._stop:  # the server is stopping: end after this committed batch
                    raise JobCancelled("the server stopped during this job; submit it again to index the rest")

            settings = self.settings
            if len(job.sources) <= INLINE_DECODE_MAX and all(Path(s).is_file() for s in job.sources):
                settings = settings.model_copy(update={"workers": 0})  # a study: spawning decoders costs more
            summary = index_sources([Path(s) for s in job.sources], self.root.index_dir, settings,
                                    encoder=self.encoder(), reports=Path(job.reports) if job.reports else None,
                                    labels=Path(job.labels) if job.labels else None, progress=False,
                                    catalog=cur, on_progress=progress)
            job.summary = {**asdict(summary), "failed": summary.failed}
            job.videos_encoded, job.frames_encoded, job.failed = (summary.videos_encoded, summary.frames_encoded,
                                                                  summary.failed)
            job.state = "done"
        except EchosearchError as exc:
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a job must never take the server down
            log.error("ingest job %s failed:\n%s", job.job_id, traceback.format_exc())
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            cur.close()
            job.finished_at = _now()
            self.on_commit()
