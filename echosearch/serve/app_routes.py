"""The routes the app's pages read through (``RemoteAppIndex``): patients, studies, audit, status, clips,
and the search as the app shows it (scope, confidence, reading).

Tables answer JSON records, or Arrow IPC when asked (:mod:`echosearch.serve.frames`). The page data is
computed by the same functions the local app index uses (:mod:`echosearch.appcore.views`). Reads are not
logged here when the client logs them itself (the app names its user in ``X-Echosearch-Actor``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from echosearch.appcore import views
from echosearch.errors import QueryError
from echosearch.serve.app import Accept, Actor, Caller, FilterBody, saved_upload
from echosearch.serve.frames import frame_response, wants_arrow
from echosearch.serve.ops import jsonable
from echosearch.serve.state import ServerState

Keys = Annotated[list[int], Query()]


class TrustedBody(BaseModel):
    """An app search (``SearchRequest.body()``): ``kind`` text, video, study or vector (an uploaded clip:
    ``POST /v1/search/trusted/upload``)."""

    kind: Literal["text", "video", "study", "vector", "file"]
    k: int = Field(12, ge=1, le=10_000)
    level: Literal["video", "study"] = "video"
    text: str | None = None
    video_key: int | None = None
    study_uid: str | None = None
    context: float | None = Field(None, ge=0.0, le=1.0)
    vector: list[float] | None = None
    filters: FilterBody | None = None


class SentencesBody(BaseModel):
    text: str
    vector: list[float] | None = None
    n: int = Field(1, ge=1, le=100)


class LogBody(BaseModel):
    """An access-log entry a client writes for its user (keys and pseudonyms only, never raw identifiers)."""

    actor: str = Field(..., min_length=1, max_length=200)
    action: str = Field(..., min_length=1, max_length=100)
    detail: dict[str, Any] = {}


def app_router(state: ServerState, log: Callable[[Caller, str, dict[str, Any]], None]) -> APIRouter:
    """The app's routes over ``state`` (``log``: the API's access logging, skipped for self-logging clients)."""
    r = APIRouter(prefix="/v1")

    @r.get("/filter-options")
    def filter_options(who: Actor) -> dict[str, Any]:
        """Values the search form offers: views, manufacturers, study date range."""
        with state.reader() as cat:
            return dict(jsonable(views.filter_options(cat)))

    @r.get("/patients")
    def patients(who: Actor, accept: Accept = None) -> Any:
        """Every patient with study count and date span (raw IDs only in an index built with them)."""
        with state.reader() as cat:
            return frame_response(accept, cat.patient_list(), "patients")

    @r.get("/studies")
    def studies(who: Actor, study_key: Keys, accept: Accept = None) -> Any:
        """Studies by key with their patient."""
        with state.reader() as cat:
            return frame_response(accept, cat.study_rows(study_key), "studies")

    @r.get("/studies/videos")
    def study_videos(who: Actor, study_key: Keys, accept: Accept = None) -> Any:
        """Videos of studies with their study date, patient and view."""
        with state.reader() as cat:
            return frame_response(accept, cat.study_videos(study_key), "videos")

    @r.get("/studies/reports")
    def study_reports(who: Actor, study_key: Keys, accept: Accept = None) -> Any:
        """Report texts of studies."""
        with state.reader() as cat:
            return frame_response(accept, cat.study_reports(study_key), "reports")

    @r.get("/runs/{kind}/latest")
    def latest_run(kind: str, who: Actor) -> dict[str, Any]:
        """The id of the latest stored run of a kind (``audit``, ``changes``), or null."""
        with state.reader() as cat:
            return {"kind": kind, "run_id": cat.latest_run(kind)}

    @r.get("/audit/run")
    def audit_run(who: Actor) -> dict[str, Any]:
        """The latest audit run: time, vectors it read, false-positive rate, calibration AUC."""
        with state.reader() as cat:
            return {"run": jsonable(views.audit_run(cat))}

    @r.get("/calibrations")
    def calibrations(who: Actor, accept: Accept = None) -> Any:
        """Stored calibrations (AUC, threshold, pair counts, curve parameters)."""
        with state.reader() as cat:
            return frame_response(accept, cat.calibration_rows(), "calibrations")

    @r.get("/calibrations/score-distributions")
    def score_distributions(who: Actor, accept: Accept = None) -> Any:
        """Sampled same-patient and different-patient study-pair cosines."""
        with state.reader() as cat:
            return frame_response(accept, views.score_distributions(cat), "pairs")

    @r.get("/access-log")
    def access_log(who: Actor, limit: int = 200, action: Annotated[list[str], Query()] = [],  # noqa: B006
                   since: datetime | None = None, accept: Accept = None) -> Any:
        """The access log, newest first (optionally some actions only, since a UTC time)."""
        with state.reader() as cat:
            return frame_response(accept, cat.access_log_rows(limit, action, since), "entries")

    @r.post("/access-log", status_code=201)
    def write_log(body: LogBody, who: Actor) -> dict[str, Any]:
        """Append an entry for the client's user (the app's sign-ins, searches and views)."""
        detail = body.detail | ({"via": who.via} if state.auth.required else {})
        state.log(body.actor, body.action, detail)
        return {"actor": body.actor, "action": body.action}

    @r.get("/videos/scope")
    def video_scope(who: Actor, video_key: Keys, accept: Accept = None) -> Any:
        """Stored scope of clips (echo or not, B-mode or Doppler, view, with confidences)."""
        with state.reader() as cat:
            return frame_response(accept, views.clip_scopes(cat, video_key), "scope")

    @r.get("/videos/{video_key}/preview", response_class=Response)
    def preview(video_key: int, who: Actor) -> Response:
        """A clip's preview (sector-masked prepared frames, H.264 MP4 or animated GIF), made on first use."""
        with state.reader() as cat:
            prev = views.video_preview(cat, video_key)
        return Response(prev.path.read_bytes(), media_type=prev.mime)

    def _trusted(who: Caller, body: TrustedBody, accept: str | None, path: Any = None) -> dict[str, Any]:
        from echosearch.appcore.search import SearchRequest, outcome_doc
        from echosearch.search.view import trusted_search

        f = body.filters.filters() if body.filters is not None else None
        if f is not None and f.where is not None:
            raise QueryError("raw where SQL is not accepted by the server: use the typed filters")
        req = SearchRequest(body.kind, k=body.k, level=body.level, filters=None if f is None or f.is_empty() else f,
                            text=body.text, path=path, video_key=body.video_key, study_uid=body.study_uid,
                            context=body.context,
                            vector=None if body.vector is None else np.asarray(body.vector, np.float32))
        snap = state.live.current()
        with snap.lock:
            out = trusted_search(snap.searcher, req)
        log(who, "search", req.log_detail(out.hits.height))
        return outcome_doc(out, wants_arrow(accept))

    @r.post("/search/trusted")
    def search_trusted(body: TrustedBody, who: Actor, accept: Accept = None) -> dict[str, Any]:
        """A search as the app shows it: hits with their confidence against the archive, whether anything
        matched closely, the nearest reports, and the query vector (tables as Arrow when asked)."""
        if body.kind == "file":
            raise QueryError("an uploaded clip goes to /v1/search/trusted/upload")
        return _trusted(who, body, accept)

    @r.post("/search/trusted/upload")
    def search_trusted_upload(who: Actor, file: Annotated[UploadFile, File()],
                              params: Annotated[str, Form(description="TrustedBody as JSON")] = "{}",
                              accept: Accept = None) -> dict[str, Any]:
        """The same for an uploaded clip: scoped first (an out-of-scope clip gets a warning and no matches)."""
        body = TrustedBody.model_validate({**json.loads(params), "kind": "file"})
        with saved_upload(file) as path:
            return _trusted(who, body, accept, path)

    @r.post("/search/sentences")
    def sentences(body: SentencesBody, who: Actor) -> dict[str, Any]:
        """A report's sentences, each with whether it is among the ``n`` closest to the query vector."""
        from echosearch.search.view import matched_sentences

        vec = None if body.vector is None else np.asarray(body.vector, np.float32)
        return {"sentences": matched_sentences(state.live.current().searcher, body.text, vec, body.n)}

    return r
