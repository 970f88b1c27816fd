"""Data access for the Streamlit front end (``app/``): shared catalog access, page data, audit trail, safety.

One :class:`AppIndex` per app process and index folder, shared by every browser session:

* DuckDB lets one process write a database file, and refuses a read-only and a read-write connection to
  the same file inside one process. The app therefore holds **one read-write connection** for its
  lifetime; every read runs on its own cursor (``con.cursor()``: a connection of its own to the same
  database, safe to use from the session's thread), and every write (access log, reviewer decisions,
  audit runs) runs on a cursor under a process-wide lock, in one transaction.
* While the app runs, other processes cannot open the index (DuckDB's file lock): stop the app to re-index.

Pages render what these functions return and hold no logic of their own.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.errors import ConfigError, QueryError
from echosearch.filters import Filters
from echosearch.login_guard import Limits, LoginGuard
from echosearch.previews import Preview, ensure_preview
from echosearch.search_view import (  # noqa: F401  (re-exported for the app: scope, confidence, reasons)
    READING_LABEL,
    SearchOutcome,
    describe_filters,
    matched_sentences,
    report_ef,
    trusted_search,
)

INDEX_ENV = "ECHOSEARCH_INDEX"
PASSWORD_ENV = "ECHOSEARCH_APP_PASSWORD"
USER_ENV = "ECHOSEARCH_APP_USER"
REPLAY_S = 24 * 3600  # how far back sign-ins are replayed into the throttle on start
DECISIONS = ("confirmed", "dismissed")
TASK_LABELS = {"ef": "EF (%)", "pacer_lead": "pacemaker lead", "tavr": "TAVR valve", "mitraclip": "MitraClip",
               "lv_dilated": "dilated LV"}
EF_BANDS: dict[str, tuple[float, float]] = {"any": (0, 100), "severely reduced (<30%)": (0, 30),
                                            "reduced (30-40%)": (30, 40), "mildly reduced (40-50%)": (40, 50),
                                            "normal (>=50%)": (50, 100)}


# ---- locating things ------------------------------------------------------------------------------
def app_script() -> Path:
    """``ECHOSEARCH_APP_DIR/main.py``, else ``app/main.py`` of this checkout (beside the package), else the copy
    a wheel ships inside the package (``echosearch/app``, see setup.py)."""
    override = os.environ.get("ECHOSEARCH_APP_DIR")
    candidates = [Path(override)] if override else []
    candidates += [Path(__file__).resolve().parents[1] / "app", Path(__file__).resolve().parent / "app"]
    for folder in candidates:
        if (folder / "main.py").is_file():
            return folder / "main.py"
    raise ConfigError("the Streamlit app (app/main.py) was not found beside the echosearch package; run from a "
                      "source checkout or set ECHOSEARCH_APP_DIR")


def index_from_argv(argv: list[str]) -> Path | None:
    """``--index DIR`` from the script arguments (``streamlit run app/main.py -- --index DIR``)."""
    for i, arg in enumerate(argv):
        if arg == "--index" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--index="):
            return Path(arg.split("=", 1)[1])
    return None


def resolve_index(argv: list[str]) -> Path:
    """Index folder: script argument, else ``ECHOSEARCH_INDEX``, else the configured default."""
    from_args = index_from_argv(argv)
    if from_args is not None:
        return from_args
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV])
    from echosearch.config import load_settings

    return load_settings().index


# ---- safety -------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; everything else exposes the app to a network."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secrets_files(app_dir: Path | None = None) -> list[Path]:
    """Where Streamlit reads ``secrets.toml``: global, project (cwd) and beside the app script."""
    files = [Path.home() / ".streamlit" / "secrets.toml", Path.cwd() / ".streamlit" / "secrets.toml"]
    if app_dir is not None:
        files.append(app_dir / ".streamlit" / "secrets.toml")
    return files


def oidc_configured(app_dir: Path | None = None) -> bool:
    """Whether a ``secrets.toml`` Streamlit will read has an ``[auth]`` section (OIDC ``st.login``)."""
    for f in secrets_files(app_dir):
        try:
            text = f.read_text()
        except OSError:
            continue
        if re.search(r"^\s*\[\s*auth\s*[\].]", text, flags=re.MULTILINE):
            return True
    return False


def auth_mode(app_dir: Path | None = None) -> str:
    """``oidc``, ``password`` (``ECHOSEARCH_APP_PASSWORD``) or ``none``."""
    if oidc_configured(app_dir):
        return "oidc"
    if os.environ.get(PASSWORD_ENV):
        return "password"
    return "none"


def check_serve_safety(host: str, app_dir: Path | None = None) -> str:
    """Refuse a non-loopback address without authentication; returns the auth mode."""
    mode = auth_mode(app_dir)
    if not is_loopback(host) and mode == "none":
        raise ConfigError(f"refusing to listen on {host} without authentication: configure OIDC (an [auth] "
                          f"section in .streamlit/secrets.toml) or set {PASSWORD_ENV} (see docs/app.md)")
    if mode == "oidc":
        try:
            import authlib  # noqa: F401
        except ImportError as exc:
            raise ConfigError("OIDC login needs Authlib: pip install 'Authlib>=1.3.2'") from exc
    return mode


def check_password(given: str, expected: str | None = None) -> bool:
    """Constant-time comparison with ``ECHOSEARCH_APP_PASSWORD`` (False when none is set)."""
    want = expected if expected is not None else os.environ.get(PASSWORD_ENV, "")
    if not want:
        return False
    a = hashlib.sha256(given.encode()).digest()
    b = hashlib.sha256(want.encode()).digest()
    return hmac.compare_digest(a, b)


def local_actor() -> str:
    """Who uses a loopback app without login: ``ECHOSEARCH_APP_USER`` or the OS account of the server."""
    name = os.environ.get(USER_ENV)
    if name:
        return name
    try:
        return f"local:{getpass.getuser()}"
    except (OSError, KeyError):
        return "local"


# ---- shared index access ----------------------------------------------------------------------------
class AppIndex:
    """One index opened once per process: a read-write DuckDB connection, a cursor per use, locked writes."""

    def __init__(self, index_dir: Path | str) -> None:
        self.index_dir = Path(index_dir)
        self._root = Catalog.open(self.index_dir)
        self._write_lock = threading.Lock()

    @property
    def catalog(self) -> Catalog:
        """The process-wide catalog (for library calls that need one; prefer :meth:`reader`)."""
        return self._root

    def close(self) -> None:
        self._root.close()

    def dedicated_reader(self) -> Catalog:
        """A long-lived read-only-flagged catalog on its own cursor (for one object that serialises its calls)."""
        return Catalog(self.index_dir, self._root.con.cursor(), read_only=True)

    @contextmanager
    def reader(self) -> Iterator[Catalog]:
        """A catalog on a fresh cursor: safe to use from the calling thread while others read or write."""
        cur = self._root.con.cursor()
        try:
            yield Catalog(self.index_dir, cur, read_only=True)
        finally:
            cur.close()

    @contextmanager
    def writer(self) -> Iterator[Catalog]:
        """A writable catalog on a fresh cursor, one writer at a time in this process, in a transaction."""
        with self._write_lock:
            cur = self._root.con.cursor()
            cat = Catalog(self.index_dir, cur, read_only=False)
            try:
                with cat.transaction():
                    yield cat
            finally:
                cur.close()

    def sql(self, query: str, params: list[Any] | None = None) -> pl.DataFrame:
        with self.reader() as cat:
            return cat.con.sql(query, params=params or []).pl() if params else cat.con.sql(query).pl()

    # ---- audit trail ------------------------------------------------------------------------------
    def log(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """Append to ``access_log`` (never raw identifiers: pass keys and pseudonyms)."""
        with self.writer() as cat:
            cat.log_access(actor, action, detail)

    def access_log(self, limit: int = 200) -> pl.DataFrame:
        return self.sql("SELECT * FROM access_log ORDER BY occurred_at DESC LIMIT ?", [limit])

    # ---- facts --------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        with self.reader() as cat:
            return cat.manifest()

    def raw_identifiers(self) -> bool:
        """Whether the index was built with raw identifiers (opt-in): only then are they shown."""
        row = self.sql("SELECT count(*) AS n FROM patients WHERE patient_id_raw IS NOT NULL")
        return bool(row["n"][0])

    def filter_options(self) -> dict[str, Any]:
        """Values the search filters offer: views, manufacturers, date range, patients."""
        with self.reader() as cat:
            scoped = cat.has_scope()
        views = self.sql("SELECT DISTINCT coalesce(v.view, c.view) AS view FROM videos v LEFT JOIN clip_scope c "
                         "USING (video_key) WHERE coalesce(v.view, c.view) IS NOT NULL ORDER BY 1" if scoped else
                         "SELECT DISTINCT view FROM videos WHERE view IS NOT NULL ORDER BY view")["view"].to_list()
        makers = self.sql("SELECT DISTINCT manufacturer FROM videos WHERE manufacturer IS NOT NULL ORDER BY 1")
        dates = self.sql("SELECT min(study_date) AS lo, max(study_date) AS hi FROM studies")
        return {"views": views, "manufacturers": makers["manufacturer"].to_list(),
                "date_min": dates["lo"][0], "date_max": dates["hi"][0], "patients": self.patients()}

    def patients(self) -> pl.DataFrame:
        """Every patient with study count and date span (``patient_id_raw`` only with opt-in)."""
        return self.sql(
            "SELECT p.patient_key, p.patient_pseudonym, p.patient_id_raw, count(s.study_key) AS n_studies, "
            "min(s.study_date) AS first_study, max(s.study_date) AS last_study FROM patients p "
            "LEFT JOIN studies s USING (patient_key) GROUP BY ALL ORDER BY n_studies DESC, p.patient_pseudonym")

    def study_videos(self, study_keys: list[int]) -> pl.DataFrame:
        """Videos of studies with their study, patient and view (for clips side by side)."""
        return self.sql(
            "SELECT v.video_key, v.study_key, v.view, v.path, v.kind, v.manufacturer, s.study_date, "
            "p.patient_pseudonym FROM videos v JOIN studies s USING (study_key) JOIN patients p USING (patient_key) "
            "WHERE v.study_key IN (SELECT unnest(?::BIGINT[])) ORDER BY s.study_date, v.view, v.video_key",
            [[int(k) for k in study_keys]])

    def study_info(self, study_keys: list[int]) -> pl.DataFrame:
        return self.sql(
            "SELECT s.study_key, s.study_uid, s.study_date, s.patient_key, p.patient_pseudonym, p.patient_id_raw "
            "FROM studies s JOIN patients p USING (patient_key) WHERE s.study_key IN (SELECT unnest(?::BIGINT[]))",
            [[int(k) for k in study_keys]])

    def reports(self, study_keys: list[int]) -> pl.DataFrame:
        return self.sql("SELECT study_key, text FROM reports WHERE study_key IN (SELECT unnest(?::BIGINT[]))",
                        [[int(k) for k in study_keys]])

    # ---- patient timeline -------------------------------------------------------------------------
    def latest_run(self, kind: str) -> int | None:
        with self.reader() as cat:
            return cat.latest_run(kind)

    def patient_timeline(self, patient_key: int) -> pl.DataFrame:
        """A patient's studies in date order: views, zero-shot predictions and change scores with flags.

        Change scores come from :func:`echosearch.change.scan_changes` for this patient, computed now
        (not stored), so the page always reflects the current catalog."""
        from echosearch.change import scan_changes, study_predictions

        studies = self.sql(
            "SELECT s.study_key, s.study_date, count(v.video_key) AS n_videos, "
            "string_agg(DISTINCT v.view, ', ' ORDER BY v.view) AS views FROM studies s "
            "LEFT JOIN videos v USING (study_key) WHERE s.patient_key = ? GROUP BY ALL "
            "ORDER BY s.study_date NULLS LAST, s.study_key", [int(patient_key)])
        if studies.height == 0:
            return studies
        with self.reader() as cat:
            preds = study_predictions(cat)
            try:
                ch = scan_changes(cat, patient=int(patient_key), store=False)
            except QueryError:
                ch = pl.DataFrame()
        keep = [c for c in preds.columns if c == "study_key" or c in TASK_LABELS]
        studies = studies.join(preds.select(keep), on="study_key", how="left")
        if ch.height:
            cols = ["study_key", "prev_study_key", "score_prev", "score_baseline", "change_prob",
                    "change_prob_baseline", "p_same_prev", "p_ef_fall", "p_ef_rise", "ef_prev", "flagged", "reasons", "flag_types",
                    "explanation", "flags"]
            studies = studies.join(ch.select([c for c in cols if c in ch.columns]), on="study_key", how="left")
        return studies.with_row_index("visit", offset=1)

    # ---- identity audit -----------------------------------------------------------------------------
    def run_audit(self) -> int | None:
        """Run the identity audit now (stored as a new run); returns its run id."""
        from echosearch.identity import audit

        with self._write_lock:
            cur = self._root.con.cursor()
            try:
                df = audit(Catalog(self.index_dir, cur, read_only=False))
            finally:
                cur.close()
        return int(df["run_id"][0]) if df.height and df["run_id"][0] is not None else self.latest_run("audit")

    def audit_results(self, suspects_only: bool = True) -> pl.DataFrame:
        """The latest audit run joined with patients and each study's latest reviewer decision.

        ``rank`` is the review order: suspects first, by the calibrated probability that the recorded patient
        is right (``p_same``, lowest first: the figure the page shows), then the rest; ``audit_rank`` is the
        audit's own order (by suspicion)."""
        run = self.latest_run("audit")
        if run is None:
            return pl.DataFrame()
        where = "WHERE suspect" if suspects_only else ""
        return self.sql(
            f"""WITH d AS (SELECT study_key, decision, reviewer, occurred_at AS decided_at, note,
                    row_number() OVER (PARTITION BY study_key ORDER BY occurred_at DESC) AS rn FROM audit_decisions),
                r AS (SELECT row_number() OVER (ORDER BY a.suspect DESC, coalesce(a.p_same, 1.0), a.rank)::INTEGER
                             AS rank, a.rank AS audit_rank, a.study_key, s.study_date, a.recorded_patient_key,
                       rp.patient_pseudonym AS recorded_patient,
                       a.own_score, a.best_other_patient_key, bp.patient_pseudonym AS best_other_patient,
                       a.best_other_score, a.margin, a.p_same, a.suspect, a.evidence,
                       d.decision, d.reviewer, d.decided_at, d.note
                FROM identity_audit a JOIN studies s USING (study_key)
                JOIN patients rp ON rp.patient_key = a.recorded_patient_key
                LEFT JOIN patients bp ON bp.patient_key = a.best_other_patient_key
                LEFT JOIN d ON d.study_key = a.study_key AND d.rn = 1
                WHERE a.run_id = ?)
                SELECT * FROM r {where} ORDER BY rank""", [run])

    def audit_run(self) -> dict[str, Any] | None:
        """The latest audit run: id, start time (UTC), settings, which vectors it read and the AUC of its
        study-to-patient calibration (recorded patients; runs before it was stored: the current calibration's)."""
        run = self.latest_run("audit")
        if run is None:
            return None
        row = self.sql("SELECT started_at, params FROM runs WHERE run_id = ?", [run]).row(0, named=True)
        params = json.loads(row["params"] or "{}")
        auc = params.get("calibration_auc")
        if auc is None:
            from echosearch.identity import PATIENT_CAL

            cal = self.sql("SELECT auc FROM calibrations WHERE name = ?", [PATIENT_CAL])
            auc = cal["auc"][0] if cal.height else None
        return {"run_id": run, "started_at": row["started_at"], "vectors": params.get("vectors"),
                "calibration_auc": auc, "fpr": params.get("fpr")}

    def record_decision(self, study_key: int, decision: str, reviewer: str, note: str | None = None) -> None:
        """Store a reviewer decision (append-only history) and log it, in one transaction."""
        if decision not in DECISIONS:
            raise QueryError(f"decision must be one of {DECISIONS}, got {decision!r}")
        if not reviewer.strip():
            raise QueryError("a decision needs a reviewer name")
        with self.writer() as cat:
            now = datetime.now(timezone.utc).replace(tzinfo=None)  # UTC, like every catalog timestamp
            cat.con.execute("INSERT INTO audit_decisions VALUES (?, ?, ?, ?, ?)",
                            [int(study_key), decision, reviewer, now, note or None])
            cat.log_access(reviewer, "audit_decision", {"study_key": int(study_key), "decision": decision})

    def decisions(self, study_key: int | None = None) -> pl.DataFrame:
        if study_key is None:
            return self.sql("SELECT * FROM audit_decisions ORDER BY occurred_at DESC")
        return self.sql("SELECT * FROM audit_decisions WHERE study_key = ? ORDER BY occurred_at DESC", [int(study_key)])

    # ---- index status -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Manifest, table counts and vector-index manifests (``Catalog.info``)."""
        with self.reader() as cat:
            return cat.info()

    def ingest_errors(self) -> pl.DataFrame:
        return self.sql("SELECT stage, reason, path, occurred_at FROM ingest_errors ORDER BY occurred_at DESC")

    def calibrations(self) -> pl.DataFrame:
        return self.sql("SELECT name, created_at, n_positive, n_negative, auc, threshold, params FROM calibrations "
                        "ORDER BY name")

    def score_distributions(self) -> pl.DataFrame:
        """Same/different-patient study-pair cosines (see :func:`pair_score_distributions`)."""
        with self.reader() as cat:
            return pair_score_distributions(cat)

    # ---- previews -------------------------------------------------------------------------------------
    def preview(self, video_key: int) -> Preview:
        """The cached preview of a video, made on demand (QueryError/IngestError when impossible)."""
        with self.reader() as cat:
            where = cat.locations([int(video_key)])
        if int(video_key) not in where:
            raise QueryError(f"unknown video {video_key}")
        policy = (self.manifest().get("model") or {}).get("preprocessing") or {}
        return ensure_preview(self.index_dir, int(video_key), where[int(video_key)], policy)


def login_guard(app: AppIndex, limits: Limits | None = None, clock: Callable[[], float] = time.time) -> LoginGuard:
    """The sign-in throttle of this server process, with the recent sign-ins of the access log replayed, so
    a restart does not reset it."""
    guard = LoginGuard(limits, clock)
    # a count in a row can be older than one window; a day back covers any realistic one
    since = datetime.fromtimestamp(clock() - REPLAY_S, timezone.utc).replace(tzinfo=None)
    rows = app.sql("SELECT occurred_at, action, actor, detail FROM access_log WHERE action IN ('login', "
                   "'login_failed') AND occurred_at >= ? ORDER BY occurred_at", [since])
    guard.replay((at.replace(tzinfo=timezone.utc).timestamp(), action, actor, json.loads(detail or "{}").get("client"))
                 for at, action, actor, detail in rows.iter_rows())
    return guard


def password_login(app: AppIndex, guard: LoginGuard, name: str, password: str,
                   client: str | None = None) -> tuple[bool, str]:
    """Check a password sign-in through ``guard`` and log it (``login``, ``login_failed``, or ``login_locked``
    when refused unchecked); returns (signed in, message for the user)."""
    who = name.strip()
    detail: dict[str, Any] = {"method": "password", **({"client": client} if client else {})}
    decision = guard.attempt(who, client, lambda: bool(who) and check_password(password))
    if decision.ok:
        app.log(who, "login", detail)
        return True, ""
    wait = math.ceil(decision.retry_after_s)
    retry = (f"Too many failed sign-ins: try again in {wait} s (after "
             f"{datetime.fromtimestamp(guard.clock() + wait, timezone.utc):%H:%M:%S} UTC).")
    if decision.locked:
        app.log(who or "?", "login_locked", {**detail, "retry_after_s": wait})
        return False, retry
    app.log(who or "?", "login_failed", detail)
    return False, "Wrong name or password." + (f" {retry}" if wait > 0 else "")


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
    """:func:`clip_html` of a cached preview file."""
    return clip_html(prev.path.read_bytes(), prev.mime)


def open_searcher(app: AppIndex, encoder: Any = None) -> Any:
    """A :class:`~echosearch.query.Searcher` that reads through ``app``'s connection.

    ``Searcher(index_dir)`` would open its own read-only connection, which DuckDB refuses in a process that
    already holds the same file read-write; the app's Searcher gets a dedicated cursor of the shared one."""
    from echosearch.query import Searcher

    return Searcher(app.index_dir, catalog=app.dedicated_reader(), encoder=encoder)


@dataclass
class SearchRequest:
    """One search from the app: ``kind`` text, file, video (more like this clip), study or vector."""

    kind: str
    k: int = 12
    level: str = "video"
    filters: Filters | None = None
    text: str | None = None
    path: Path | None = None
    video_key: int | None = None
    study_uid: str | None = None
    label: str = ""
    context: float | None = None  # study-context weight of a text search (None: query.TEXT_CONTEXT)
    vector: Any = None  # kind "vector": an uploaded clip's vector, to re-run its search under new filters

    def log_detail(self, n_results: int) -> dict[str, Any]:
        """What the access log records (keys and pseudonyms only; an uploaded file by its hash)."""
        detail: dict[str, Any] = {"kind": self.kind, "k": self.k, "level": self.level, "n_results": n_results,
                                  "filters": self.filters.as_dict() if self.filters else {}}
        if self.text is not None:
            detail["text"] = self.text[:500]
        if self.path is not None:
            from echosearch.discover import hash_file

            detail["file_sha256"] = hash_file(self.path)[0]
        if self.video_key is not None:
            detail["video_key"] = self.video_key
        if self.study_uid is not None:
            detail["study_uid"] = self.study_uid
        if self.context is not None:
            detail["context"] = self.context
        return detail


def make_filters(*, since: date | None = None, until: date | None = None, views: list[str] | None = None,
                 patient: str | None = None, ef_band: str = "any", devices: list[str] | None = None,
                 manufacturers: list[str] | None = None, scope: str | None = None,
                 modes: list[str] | None = None) -> Filters | None:
    """Filters from the search form (``None`` when nothing restricts the search); ``scope`` "in" keeps echo
    B-mode clips only (the form's default), "out" only clips marked out of scope."""
    lo, hi = EF_BANDS.get(ef_band, EF_BANDS["any"])
    f = Filters(patients=(patient,) if patient else (), since=since, until=until, views=tuple(views or ()),
                manufacturers=tuple(manufacturers or ()), ef_min=lo if lo > 0 else None,
                ef_max=hi if hi < 100 else None, devices=tuple(devices or ()), scope=scope,
                modes=tuple(modes or ()))
    return None if f.is_empty() else f


def run_search(searcher: Any, req: SearchRequest, n_reports: int = 3) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(hits, nearest reports to the query) for a request; raises QueryError/IngestError on bad input."""
    if req.kind == "text":
        from echosearch.query import TEXT_CONTEXT

        vec = np.asarray(searcher.encoder().encode_text([req.text or ""]))[0]
        if not (req.text or "").strip():
            raise QueryError("type what to look for")
        hits = searcher.by_vector(vec, k=req.k, level=req.level, filters=req.filters,
                                  context=TEXT_CONTEXT if req.context is None else req.context)
        rq: Any = vec
    elif req.kind == "file":
        assert req.path is not None
        vec = searcher.embed_file(req.path)
        hits = searcher.by_vector(vec, k=req.k, level=req.level, filters=req.filters)
        rq = vec
    elif req.kind == "video":
        assert req.video_key is not None
        hits = searcher.like_video(int(req.video_key), k=req.k, filters=req.filters, level=req.level)
        rq = int(req.video_key)
    elif req.kind == "study":
        assert req.study_uid is not None
        hits = searcher.like_study(req.study_uid, k=req.k, filters=req.filters, level=req.level)
        rq = req.study_uid
    else:
        raise QueryError(f"unknown search kind {req.kind!r}")
    try:
        reports = searcher.reports_for(rq, k=n_reports) if n_reports else pl.DataFrame()
    except QueryError:  # an index without report texts
        reports = pl.DataFrame()
    return hits, reports


def clip_scopes(app: AppIndex, video_keys: list[int]) -> dict[int, dict[str, Any]]:
    """Stored scope rows of clips by video key (empty for an index without scope)."""
    with app.reader() as cat:
        return {int(r["video_key"]): r for r in cat.scope_rows(video_keys).iter_rows(named=True)}


def sentences(text: str | None, n: int = 3) -> list[str]:
    """The first ``n`` sentences of a report text."""
    if not text:
        return []
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()]
    return parts[:n]


def pair_score_distributions(catalog: Catalog, max_pairs: int = 5000, seed: int = 0) -> pl.DataFrame:
    """Cosines of same-patient and different-patient study pairs (recorded patients), sampled the way the
    identity calibration samples them: rows (score, group)."""
    from echosearch import calibration as cal
    from echosearch.identity import load_studies

    S = load_studies(catalog)
    if len(S) < 2:
        return pl.DataFrame(schema={"score": pl.Float64, "group": pl.String})
    i, j = cal.within_group_pairs(S.patient, max_pairs=max_pairs, seed=seed)
    ni, nj = cal.between_group_pairs(S.patient, max_pairs, seed=seed + 1)
    same, diff = cal.pair_cosines(S.vecs, i, j), cal.pair_cosines(S.vecs, ni, nj)
    return pl.DataFrame({"score": [*same.tolist(), *diff.tolist()],
                         "group": ["same patient"] * same.size + ["different patients"] * diff.size},
                        schema={"score": pl.Float64, "group": pl.String})
