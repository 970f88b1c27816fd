"""A search as the app asks for it: the form's filters, one request type, and its outcome on the wire.

The local index runs :func:`echosearch.search.view.trusted_search` itself; the remote one sends the request
to the server (``POST /v1/search/trusted``), which runs the same function and returns the outcome as a JSON
document (:func:`outcome_doc`), turned back into a :class:`~echosearch.search.view.SearchOutcome` by
:func:`outcome_from_doc`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from echosearch.filters import Filters
from echosearch.model.scope import ClipScope, Evidence
from echosearch.search.confidence import Assessment
from echosearch.search.view import SearchOutcome
from echosearch.serve.frames import decode_frame, encode_frame

EF_BANDS: dict[str, tuple[float, float]] = {"any": (0, 100), "severely reduced (<30%)": (0, 30),
                                            "reduced (30-40%)": (30, 40), "mildly reduced (40-50%)": (40, 50),
                                            "normal (>=50%)": (50, 100)}


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
            from echosearch.ingest.discover import hash_file

            detail["file_sha256"] = hash_file(self.path)[0]
        if self.video_key is not None:
            detail["video_key"] = self.video_key
        if self.study_uid is not None:
            detail["study_uid"] = self.study_uid
        if self.context is not None:
            detail["context"] = self.context
        return detail

    def body(self) -> dict[str, Any]:
        """The request as the server's ``TrustedBody`` (an uploaded file travels beside it)."""
        vec = None if self.vector is None else np.asarray(self.vector, np.float32).tolist()
        return {"kind": self.kind, "k": self.k, "level": self.level, "text": self.text, "video_key": self.video_key,
                "study_uid": self.study_uid, "context": self.context, "vector": vec,
                "filters": filters_doc(self.filters)}


def filters_doc(f: Filters | None) -> dict[str, Any] | None:
    """Filters as JSON (tuples as lists, dates as ISO strings); None stays None."""
    if f is None:
        return None
    out: dict[str, Any] = {}
    for fld in fields(f):
        value = getattr(f, fld.name)
        out[fld.name] = list(value) if isinstance(value, tuple) else (
            value.isoformat() if isinstance(value, date) else value)
    return out


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


def sentences(text: str | None, n: int = 3) -> list[str]:
    """The first ``n`` sentences of a report text."""
    if not text:
        return []
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()]
    return parts[:n]


# ---- the outcome on the wire ------------------------------------------------------------------------------
def outcome_doc(out: SearchOutcome, arrow: bool) -> dict[str, Any]:
    """A :class:`SearchOutcome` as a JSON document (tables as Arrow when ``arrow``, else records)."""
    from echosearch.serve.ops import jsonable

    return {"hits": encode_frame(out.hits, arrow), "reports": encode_frame(out.reports, arrow),
            "assessment": jsonable(asdict(out.assessment)) if out.assessment is not None else None,
            "scope": jsonable(asdict(out.scope)) if out.scope is not None else None, "warning": out.warning,
            "query_vector": None if out.query_vector is None else np.asarray(out.query_vector, np.float32).tolist(),
            "meta": jsonable(out.meta)}


def outcome_from_doc(doc: dict[str, Any]) -> SearchOutcome:
    """The inverse of :func:`outcome_doc`."""
    scope = None
    if doc.get("scope") is not None:
        s = dict(doc["scope"])
        s["evidence"] = [Evidence(**e) for e in s.get("evidence") or []]
        scope = ClipScope(**s)
    a = doc.get("assessment")
    vec = doc.get("query_vector")
    return SearchOutcome(decode_frame(doc["hits"]), decode_frame(doc["reports"]),
                         Assessment(**a) if a is not None else None, scope, doc.get("warning"),
                         None if vec is None else np.asarray(vec, np.float32), dict(doc.get("meta") or {}))
