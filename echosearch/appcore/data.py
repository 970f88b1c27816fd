"""The index as the app's pages see it: one interface, read locally or through the server.

:class:`AppIndex` is what every page calls. Two implementations:

* :class:`LocalAppIndex` opens the catalog in the app's process (no server runs: ``streamlit run`` on an idle
  index, tests). DuckDB lets one process write a file and refuses a read-only and a read-write connection to
  it inside one process, so the app holds **one read-write connection**: every read runs on its own cursor,
  every write in a transaction under the connection's write lock (:meth:`Catalog.share_writes`). While it
  runs no other process can open the index.
* :class:`~echosearch.appcore.remote.RemoteAppIndex` calls the ``/v1`` routes of the ``echosearch server``
  that owns the catalog (what ``echosearch serve`` sets up), so the app keeps working while ingest jobs write.

:func:`open_app_index` picks one. Both compute page data with the same functions
(:mod:`echosearch.appcore.views`); pages render what they return and hold no logic of their own.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch.appcore import views
from echosearch.appcore.search import SearchRequest
from echosearch.catalog import Catalog
from echosearch.errors import QueryError
from echosearch.ingest.previews import Preview
from echosearch.search.view import SearchOutcome

SERVER_ENV = "ECHOSEARCH_SERVER"  # set by `echosearch serve` for the app: the server to use
ERRORS_SHOWN = 100_000  # ingest errors the status page reads


class AppIndex(ABC):
    """What the pages read and write. ``remote`` says whether a server answers (for the sidebar)."""

    index_dir: Path
    remote: bool = False

    @abstractmethod
    def close(self) -> None: ...

    # ---- audit trail ------------------------------------------------------------------------------------
    @abstractmethod
    def log(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """Append to ``access_log`` (never raw identifiers: pass keys and pseudonyms)."""

    @abstractmethod
    def access_log(self, limit: int = 200) -> pl.DataFrame: ...

    @abstractmethod
    def access_events(self, actions: Sequence[str], since: datetime) -> list[tuple[Any, ...]]:
        """(occurred_at, action, actor, detail) of ``actions`` since ``since`` (UTC), oldest first."""

    # ---- facts ------------------------------------------------------------------------------------------
    @abstractmethod
    def manifest(self) -> dict[str, Any]: ...

    @abstractmethod
    def _form_values(self) -> dict[str, Any]: ...

    def filter_options(self) -> dict[str, Any]:
        """Values the search filters offer: views, manufacturers, date range, patients."""
        return {**self._form_values(), "patients": self.patients()}

    @abstractmethod
    def patients(self) -> pl.DataFrame:
        """Every patient with study count and date span (``patient_id_raw`` only with opt-in)."""

    @abstractmethod
    def study_videos(self, study_keys: list[int]) -> pl.DataFrame:
        """Videos of studies with their study, patient and view (for clips side by side)."""

    @abstractmethod
    def study_info(self, study_keys: list[int]) -> pl.DataFrame: ...

    @abstractmethod
    def reports(self, study_keys: list[int]) -> pl.DataFrame: ...

    @abstractmethod
    def latest_run(self, kind: str) -> int | None: ...

    @abstractmethod
    def patient_timeline(self, patient_key: int) -> pl.DataFrame:
        """A patient's studies in date order with predictions and change scores (:func:`views.patient_timeline`)."""

    # ---- identity audit ---------------------------------------------------------------------------------
    @abstractmethod
    def run_audit(self) -> int | None:
        """Run the identity audit now (stored as a new run); returns its run id."""

    @abstractmethod
    def audit_results(self, suspects_only: bool = True) -> pl.DataFrame:
        """The latest audit run in review order (:meth:`AppQueries.audit_review`)."""

    @abstractmethod
    def audit_run(self) -> dict[str, Any] | None: ...

    @abstractmethod
    def record_decision(self, study_key: int, decision: str, reviewer: str, note: str | None = None) -> None:
        """Store a reviewer decision (append-only history) and log it, in one transaction."""

    @abstractmethod
    def decisions(self, study_key: int | None = None) -> pl.DataFrame: ...

    # ---- index status -----------------------------------------------------------------------------------
    @abstractmethod
    def status(self) -> dict[str, Any]:
        """Manifest, table counts and vector-index manifests (``Catalog.info``)."""

    @abstractmethod
    def ingest_errors(self) -> pl.DataFrame: ...

    @abstractmethod
    def calibrations(self) -> pl.DataFrame: ...

    @abstractmethod
    def score_distributions(self) -> pl.DataFrame: ...

    # ---- clips and search -------------------------------------------------------------------------------
    @abstractmethod
    def clip(self, video_key: int) -> tuple[bytes, str]:
        """A video's cached preview as (bytes, media type), made on demand (QueryError/IngestError)."""

    @abstractmethod
    def _scope_frame(self, video_keys: list[int]) -> pl.DataFrame: ...

    def clip_scopes(self, video_keys: list[int]) -> dict[int, dict[str, Any]]:
        """Stored scope rows of clips by video key (empty for an index without scope)."""
        if not video_keys:
            return {}
        return {int(r["video_key"]): r for r in self._scope_frame(video_keys).iter_rows(named=True)}

    @abstractmethod
    def search(self, req: SearchRequest) -> SearchOutcome:
        """:func:`echosearch.search.view.trusted_search` of a request (scope, confidence, reading)."""

    @abstractmethod
    def matched_sentences(self, text: str | None, query: np.ndarray | None) -> list[tuple[str, bool]]:
        """A report's sentences, each with whether it is the closest to the query vector."""


class LocalAppIndex(AppIndex):
    """The catalog opened in this process: one read-write connection, a cursor per use, serialised writes."""

    def __init__(self, index_dir: Path | str) -> None:
        self.index_dir = Path(index_dir)
        self._root = Catalog.open(self.index_dir).share_writes()
        self._searcher: Any = None
        self._searcher_lock = threading.Lock()

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.catalog.close()
        self._root.close()

    @contextmanager
    def reader(self) -> Iterator[Catalog]:
        """A catalog on a fresh cursor: safe to use from the calling thread while others read or write."""
        with self._root.cursor_block(read_only=True) as cur:
            yield cur

    @contextmanager
    def writer(self) -> Iterator[Catalog]:
        """A writable catalog on a fresh cursor (its transactions take the connection's write lock)."""
        with self._root.cursor_block() as cur:
            yield cur

    def searcher(self) -> Any:
        """A :class:`~echosearch.query.Searcher` reading through a cursor of this connection (made once):
        ``Searcher(index_dir)`` would open a read-only connection, which DuckDB refuses in this process."""
        with self._searcher_lock:
            if self._searcher is None:
                from echosearch.query import Searcher

                self._searcher = Searcher(self.index_dir, catalog=self._root.cursor(read_only=True))
            return self._searcher

    def log(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        with self.writer() as cat:
            cat.log_access(actor, action, detail)

    def access_log(self, limit: int = 200) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.access_log_rows(limit)

    def access_events(self, actions: Sequence[str], since: datetime) -> list[tuple[Any, ...]]:
        with self.reader() as cat:
            return cat.access_events(actions, since)

    def manifest(self) -> dict[str, Any]:
        with self.reader() as cat:
            return cat.manifest()

    def _form_values(self) -> dict[str, Any]:
        with self.reader() as cat:
            return views.filter_options(cat)

    def patients(self) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.patient_list()

    def study_videos(self, study_keys: list[int]) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.study_videos(study_keys)

    def study_info(self, study_keys: list[int]) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.study_rows(study_keys)

    def reports(self, study_keys: list[int]) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.study_reports(study_keys)

    def latest_run(self, kind: str) -> int | None:
        with self.reader() as cat:
            return cat.latest_run(kind)

    def patient_timeline(self, patient_key: int) -> pl.DataFrame:
        with self.reader() as cat:
            return views.patient_timeline(cat, patient_key)

    def run_audit(self) -> int | None:
        from echosearch.identity import audit

        with self.writer() as cat:
            df = audit(cat)
        return int(df["run_id"][0]) if df.height and df["run_id"][0] is not None else self.latest_run("audit")

    def audit_results(self, suspects_only: bool = True) -> pl.DataFrame:
        with self.reader() as cat:
            return views.audit_review(cat, suspects_only)

    def audit_run(self) -> dict[str, Any] | None:
        with self.reader() as cat:
            return views.audit_run(cat)

    def record_decision(self, study_key: int, decision: str, reviewer: str, note: str | None = None) -> None:
        views.check_decision(decision, reviewer)
        with self.writer() as cat:
            cat.record_decision(int(study_key), decision, reviewer, note)

    def decisions(self, study_key: int | None = None) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.decisions(study_key)

    def status(self) -> dict[str, Any]:
        with self.reader() as cat:
            return cat.info()

    def ingest_errors(self) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.ingest_error_rows(ERRORS_SHOWN)

    def calibrations(self) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.calibration_rows()

    def score_distributions(self) -> pl.DataFrame:
        with self.reader() as cat:
            return views.score_distributions(cat)

    def clip(self, video_key: int) -> tuple[bytes, str]:
        with self.reader() as cat:
            prev = views.video_preview(cat, video_key)
        return prev.path.read_bytes(), prev.mime

    def _scope_frame(self, video_keys: list[int]) -> pl.DataFrame:
        with self.reader() as cat:
            return views.clip_scopes(cat, video_keys)

    def search(self, req: SearchRequest) -> SearchOutcome:
        from echosearch.search.view import trusted_search

        return trusted_search(self.searcher(), req)

    def matched_sentences(self, text: str | None, query: np.ndarray | None) -> list[tuple[str, bool]]:
        from echosearch.search.view import matched_sentences

        return matched_sentences(self.searcher(), text, query)


def open_app_index(index_dir: Path | str) -> AppIndex:
    """The app's index: through the server named by ``ECHOSEARCH_SERVER`` (set by ``echosearch serve``) or
    recorded as running for ``index_dir``; else the catalog opened in this process."""
    from echosearch.serve.client import recorded_server

    url = os.environ.get(SERVER_ENV)
    if not url:
        record = recorded_server(index_dir)
        url = record["url"] if record else None
    if url:
        from echosearch.appcore.remote import RemoteAppIndex

        return RemoteAppIndex(url, index_dir)
    return LocalAppIndex(index_dir)


# ---- clips in the page --------------------------------------------------------------------------------------
def clip_html(data: bytes, mime: str) -> str:
    """A looping, muted ``<video>`` (``video/*``) or ``<img>`` with the clip inline as a base64 ``data:`` URI.

    Shown with ``st.html``, the bytes reach the browser only inside the signed-in page: ``st.video`` and
    ``st.image`` would register them with Streamlit's media endpoint (``/media/<hash>``), which answers
    anyone who has the URL, without a session."""
    if not re.fullmatch(r"(video|image)/[a-z0-9.+-]+", mime):
        raise QueryError(f"not a clip media type: {mime!r}")
    src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    style = 'style="width:100%;height:auto;display:block"'
    if mime.startswith("video/"):
        return f'<video src="{src}" autoplay loop muted playsinline {style}></video>'
    return f'<img src="{src}" alt="clip" {style}>'


def preview_html(prev: Preview) -> str:
    """:func:`clip_html` of a preview file (an uploaded query clip rendered in the app's process)."""
    return clip_html(prev.path.read_bytes(), prev.mime)
