"""The HTTP API (FastAPI): versioned routes under ``/v1``, OpenAPI at ``/docs``.

Thin: each route checks its input, takes a cursor (or the current vector-index snapshot) from the
:class:`~echosearch.serve.state.ServerState` and calls the library (:mod:`echosearch.serve.ops`). Domain
errors become a JSON body ``{"error", "message", "exit_code"}`` with an HTTP status, so a client can raise
the same error the library would have raised.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from echosearch import __version__, errors
from echosearch.filters import Filters
from echosearch.serve import ops
from echosearch.serve.frames import frame_response, wants_arrow
from echosearch.serve.state import ServerState

MAX_UPLOAD_BYTES = 1 << 30
_STATUS = {errors.QueryError: 400, errors.ConfigError: 400, errors.IndexNotFoundError: 404,
           errors.ModelMismatchError: 409, errors.IndexMismatchError: 409, errors.IngestError: 422,
           errors.CatalogError: 503, errors.ModelLoadError: 503}


class FilterBody(BaseModel):
    """Metadata filters (see ``echosearch search --help``); raw ``where`` SQL is refused by the server.
    ``scope``: "in" (echo B-mode clips only) or "out"; ``modes``: "bmode", "doppler"."""

    patients: list[str] = []
    exclude_patients: list[str] = []
    since: date | None = None
    until: date | None = None
    views: list[str] = []
    manufacturers: list[str] = []
    ef_min: float | None = None
    ef_max: float | None = None
    devices: list[str] = []
    study_uids: list[str] = []
    where: str | None = None
    scope: Literal["in", "out"] | None = None
    modes: list[str] = []

    def filters(self) -> Filters:
        return Filters(**self.model_dump())


class SearchBody(BaseModel):
    """Exactly one of ``text``, ``like_video``, ``like_study`` (an uploaded clip: ``POST /v1/search/upload``)."""

    text: str | None = None
    like_video: int | None = None
    like_study: str | None = None
    k: int = Field(10, ge=1, le=10_000)
    level: Literal["video", "study"] = "video"
    collapse: bool = False
    context: float | None = Field(None, ge=0.0, le=1.0)
    filters: FilterBody = FilterBody()


class ReportsBody(BaseModel):
    like_video: int | None = None
    like_study: str | None = None
    k: int = Field(5, ge=1, le=1000)


class AuditBody(BaseModel):
    fpr: float = Field(0.01, ge=1e-6, le=0.5)
    k: int = Field(50, ge=1)
    unverifiable: bool = False


class DecisionBody(BaseModel):
    study_key: int
    decision: Literal["confirmed", "dismissed"]
    note: str | None = None


class ChangesBody(BaseModel):
    """Options of the change scan (``echosearch changes``); unset ones take the library's defaults."""

    patient: str | None = None
    min_probability: float | None = Field(None, ge=0.0, le=1.0)


class MatchBody(BaseModel):
    study: str
    k: int = Field(5, ge=1, le=1000)


class JobBody(BaseModel):
    """Folders, files or manifest CSVs on the server's disk (absolute paths), with optional sidecars."""

    sources: list[str] = Field(..., min_length=1)
    reports: str | None = None
    labels: str | None = None


def _one(**given: Any) -> tuple[str, Any]:
    chosen = [(n, v) for n, v in given.items() if v is not None]
    if len(chosen) != 1:
        raise errors.QueryError(f"give exactly one of {', '.join(given)}")
    return chosen[0]


@contextmanager
def saved_upload(upload: UploadFile) -> Iterator[Path]:
    """An uploaded clip in a private temporary file (its suffix kept: the decoder goes by it), removed after."""
    suffix = Path(upload.filename or "clip").suffix[:16]
    with tempfile.TemporaryDirectory(prefix="echosearch-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        with path.open("wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise errors.QueryError(f"uploaded file is larger than {MAX_UPLOAD_BYTES >> 20} MiB")
        yield path


ACTOR_HEADER = "X-Echosearch-Actor"


@dataclass(frozen=True)
class Caller:
    """Who a request is for. ``name`` is the actor recorded (a decision's reviewer, the access log's actor);
    ``via`` the credential's name. A client that keeps its own access log (the app) names the person it acts
    for in the ``X-Echosearch-Actor`` header: then ``logs_itself`` and the routes leave logging to it."""

    name: str
    via: str
    logs_itself: bool = False


def _actor(request: Request) -> Caller:
    """The caller, after its credentials are checked (401/429 otherwise)."""
    state: ServerState = request.app.state.echosearch
    verdict = state.auth.check(request.headers.get("authorization"), request.client.host if request.client else None)
    if verdict.actor is None:
        headers = {"WWW-Authenticate": 'Bearer, Basic realm="echosearch"'}
        if verdict.retry_after_s:
            headers["Retry-After"] = str(int(verdict.retry_after_s) + 1)
        raise HTTPException(verdict.status, verdict.reason, headers=headers)
    forwarded = (request.headers.get(ACTOR_HEADER) or "").strip()[:200]
    if forwarded:
        return Caller(forwarded, verdict.actor, logs_itself=True)
    return Caller(verdict.actor, verdict.actor)


Actor = Annotated[Caller, Depends(_actor)]
Accept = Annotated[str | None, Header(include_in_schema=False)]


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state``."""
    app = FastAPI(title="echosearch", version=__version__, docs_url="/docs",
                  description="Embedding search and longitudinal patient tracking for echocardiography. "
                              "See docs/server.md.")
    app.state.echosearch = state

    @app.exception_handler(errors.EchosearchError)
    async def domain_error(_request: Request, exc: errors.EchosearchError) -> JSONResponse:
        status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
        return JSONResponse({"error": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code},
                            status_code=status)

    def log(who: Caller, action: str, detail: dict[str, Any]) -> None:
        if not who.logs_itself:
            state.log(who.name, action, detail)

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        """Liveness, which index (a hash of its folder) and which process: clients detect stale address files."""
        return {"status": "ok", "index_id": state.id, "pid": os.getpid(), "version": __version__,
                "auth_required": state.auth.required}

    v1 = APIRouter(prefix="/v1")

    @v1.get("/info")
    def info(who: Actor) -> dict[str, Any]:
        """Manifest, table counts, vector indexes (``echosearch info --json``), plus the server's jobs."""
        with state.reader() as cat:
            data = cat.info()
        data["generation"] = data["manifest"].get("generation")
        data["jobs"] = [j.as_dict() for j in state.jobs.all()]
        return ops.jsonable(data)

    def _search(who: Caller, kind: str, value: Any, body: SearchBody, vector: np.ndarray | None) -> dict[str, Any]:
        filters = body.filters.filters()
        out = ops.search(state.live.current(), kind, value, k=body.k, level=body.level, filters=filters,
                         collapse=body.collapse, context=body.context, vector=vector)
        detail = {"kind": kind, "k": body.k, "level": body.level, "n_results": len(out["results"]),
                  "filters": out["filters"], **({"text": str(value)[:500]} if kind == "text" else {})}
        if kind in ("like_video", "like_study"):
            detail[kind] = value
        log(who, "search", detail)
        return out

    @v1.post("/search")
    def search(body: SearchBody, who: Actor) -> dict[str, Any]:
        """Nearest videos or studies to a text or a catalog video/study, with filters."""
        kind, value = _one(text=body.text, like_video=body.like_video, like_study=body.like_study)
        vector = None
        if kind == "text":
            if not str(value).strip():
                raise errors.QueryError("empty text query")
            vector = np.asarray(state.encoder().encode_text([value]))[0]
        return _search(who, kind, value, body, vector)

    @v1.post("/search/upload")
    def search_upload(who: Actor, file: Annotated[UploadFile, File()],
                      params: Annotated[str, Form(description="SearchBody as JSON (query fields ignored)")] = "{}",
                      ) -> dict[str, Any]:
        """Nearest videos or studies to an uploaded DICOM/AVI/MP4 clip (not added to the index)."""
        body = SearchBody.model_validate_json(params)
        with saved_upload(file) as path:
            vector = _embed(path)
            from echosearch.ingest.discover import hash_file

            sha = hash_file(path)[0]
        return _search(who, "video", file.filename or "upload", body, vector) | {"file_sha256": sha}

    def _embed(path: Path) -> np.ndarray:
        from echosearch.run.single import embed_file

        vec, _frames = embed_file(path, state.encoder())
        return np.asarray(vec, dtype=np.float32)

    @v1.post("/reports")
    def reports(body: ReportsBody, who: Actor) -> dict[str, Any]:
        """Nearest report texts of other studies to a catalog video or study."""
        kind, value = _one(like_video=body.like_video, like_study=body.like_study)
        out = ops.reports(state.live.current(), kind, value, k=body.k)
        log(who, "reports", {kind: value, "k": body.k})
        return out

    @v1.post("/reports/upload")
    def reports_upload(who: Actor, file: Annotated[UploadFile, File()], k: Annotated[int, Form(ge=1)] = 5,
                       ) -> dict[str, Any]:
        """Nearest report texts to an uploaded clip."""
        with saved_upload(file) as path:
            vector = _embed(path)
        out = ops.reports(state.live.current(), "video", file.filename or "upload", k=k, vector=vector)
        log(who, "reports", {"kind": "video", "k": k})
        return out

    @v1.get("/patients/{patient}/timeline")
    def timeline(patient: str, who: Actor, accept: Accept = None) -> Any:
        """A patient's studies in date order with predictions and change scores (pseudonym or key); an Arrow
        table of the studies when asked for one (``Accept: application/vnd.apache.arrow.stream``)."""
        with state.reader() as cat:
            key, studies = ops.timeline_frame(cat, patient)
        log(who, "view_patient", {"patient_key": key})
        out = frame_response(accept, studies, "studies")
        return out | {"patient_key": key} if isinstance(out, dict) else out

    @v1.post("/audit")
    def run_audit(body: AuditBody, who: Actor) -> dict[str, Any]:
        """Run the identity audit now (stored as a new run)."""
        with state.writer() as cat:
            out = ops.audit(cat, fpr=body.fpr, k=body.k, unverifiable=body.unverifiable)
        log(who, "audit", {"run_id": out["run_id"]})
        return out

    @v1.get("/audit")
    def audit_results(who: Actor, suspects_only: bool = True, accept: Accept = None) -> Any:
        """The latest audit run in review order with each study's latest reviewer decision (Arrow when asked)."""
        with state.reader() as cat:
            if wants_arrow(accept):
                from echosearch.appcore.views import audit_review

                return frame_response(accept, audit_review(cat, suspects_only))
            return ops.audit_results(cat, suspects_only)

    @v1.post("/audit/decisions")
    def decide(body: DecisionBody, who: Actor) -> dict[str, Any]:
        """Record a reviewer decision (the signed-in actor is the reviewer)."""
        with state.writer() as cat:
            cat.record_decision(body.study_key, body.decision, who.name, body.note)
        return {"study_key": body.study_key, "decision": body.decision, "reviewer": who.name}

    @v1.get("/audit/decisions")
    def decisions(who: Actor, study_key: int | None = None, accept: Accept = None) -> Any:
        """Reviewer decisions, newest first (all, or one study's)."""
        with state.reader() as cat:
            return frame_response(accept, cat.decisions(study_key), "decisions")

    @v1.post("/changes")
    def changes(body: ChangesBody, who: Actor) -> dict[str, Any]:
        """Change between visits (stored as a new run)."""
        with state.writer() as cat:
            out = ops.changes(cat, patient=body.patient, options=body.model_dump(exclude={"patient"}))
        log(who, "changes", {"run_id": out["run_id"], "patient": body.patient is not None})
        return out

    @v1.post("/match")
    def match(body: MatchBody, who: Actor) -> dict[str, Any]:
        """Which patients does this study (itself excluded) look like?"""
        with state.reader() as cat:
            out = ops.match(cat, study=body.study, vector=None, k=body.k, what={"study": body.study})
        log(who, "match", {"study": body.study})
        return out

    @v1.post("/match/upload")
    def match_upload(who: Actor, file: Annotated[UploadFile, File()], k: Annotated[int, Form(ge=1)] = 5,
                     ) -> dict[str, Any]:
        """Which patients does an uploaded clip look like (identity vectors when the index has them)?"""
        from echosearch.run.single import match_vector

        with saved_upload(file) as path, state.reader() as cat:
            vector = match_vector(cat, path, state.encoder())
            out = ops.match(cat, study=None, vector=vector, k=k, what={"video": file.filename or "upload"})
        log(who, "match", {"kind": "video"})
        return out

    @v1.get("/errors")
    def ingest_errors(who: Actor, limit: int = 1000, accept: Accept = None) -> Any:
        """Recorded ingest failures, newest first (file labels; `echosearch locate` opens them)."""
        with state.reader() as cat:
            return frame_response(accept, cat.ingest_error_rows(limit), "errors")

    @v1.post("/jobs", status_code=202)
    def submit_job(body: JobBody, who: Actor) -> dict[str, Any]:
        """Queue an ingest job over folders/files already on the server's disk."""
        job = state.jobs.submit(body.sources, body.reports, body.labels)
        log(who, "ingest_job", {"job_id": job.job_id, "sources": len(body.sources)})
        return job.as_dict()

    @v1.get("/jobs")
    def jobs(who: Actor) -> dict[str, Any]:
        return {"jobs": [ops.jsonable(j.as_dict()) for j in state.jobs.all()]}

    @v1.get("/jobs/{job_id}")
    def job(job_id: str, who: Actor) -> dict[str, Any]:
        """A job's state and progress (videos and frames encoded, failures, summary when done)."""
        return ops.jsonable(state.jobs.get(job_id).as_dict())

    from echosearch.serve.app_routes import app_router

    app.include_router(v1)
    app.include_router(app_router(state, log))
    return app
