"""A search as a clinician should see it: scope of the query, confidence of each result, why it matched.

:func:`trusted_search` wraps the query API for the app (and any other front end): an uploaded file is
scoped first (an out-of-scope upload gets a plain warning instead of a cardiac reading, and no matches),
every result is placed against the archive (:mod:`echosearch.search.confidence`), a search whose best result is
below the calibrated floor is "no close match", and the preliminary reading (nearest archive reports) is
labelled as unvalidated model output. :func:`matched_sentences` says which report sentences are closest to
the query; the EF a report states (shown beside the predicted one) is read by
:func:`echosearch.model.report_facts.report_ef`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from echosearch.errors import QueryError
from echosearch.filters import Filters
from echosearch.model.report_facts import split_sentences
from echosearch.model.scope import ClipScope, assess_file
from echosearch.search.confidence import Assessment, Judge

READING_LABEL = ("Preliminary reading: the nearest reports in this archive, chosen by the model. Unvalidated "
                 "model output, not a diagnosis.")
_LOCK = threading.Lock()


@dataclass
class SearchOutcome:
    """What one search returns: hits (with ``confidence`` per row when assessed), nearest reports, how the
    results stand against the archive, the upload's scope, and a warning that replaces results."""

    hits: pl.DataFrame
    reports: pl.DataFrame
    assessment: Assessment | None = None
    scope: ClipScope | None = None
    warning: str | None = None
    query_vector: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def no_match(self) -> bool:
        return bool(self.assessment and self.assessment.no_match)


def judge_of(searcher: Any) -> Judge:
    """The searcher's :class:`~echosearch.search.confidence.Judge` (made once; calibrations are cached in it)."""
    with _LOCK:
        judge = getattr(searcher, "_judge", None)
        if judge is None:
            judge = Judge(searcher)
            searcher._judge = judge
        return judge


def scope_warning(scope: ClipScope) -> str:
    """The plain warning an out-of-scope upload gets instead of a reading."""
    why = "; ".join(r for r in scope.reasons(3) if r)
    if not scope.is_echo:
        head = (f"This file does not look like an echocardiogram ({1 - scope.echo_confidence:.0%} sure). "
                "The model only knows echocardiograms, so no cardiac reading and no matches are shown.")
    else:
        head = ("This is a colour Doppler clip. The model was trained on B-mode (greyscale) echo, so its "
                "reading of Doppler clips is not meaningful: no cardiac reading and no matches are shown.")
    return f"{head} Evidence: {why}." if why else head


def trusted_search(searcher: Any, req: Any, n_reports: int = 3) -> SearchOutcome:
    """Run an app :class:`~echosearch.appcore.search.SearchRequest` with scope, confidence and reading labels.

    Raises QueryError for an empty text, an unknown clip or study, or a bad filter."""
    from echosearch.query import TEXT_CONTEXT

    level, judge = req.level, judge_of(searcher)
    scope: ClipScope | None = None
    context = 0.0
    if req.kind == "text":
        text = (req.text or "").strip()
        if not text:
            raise QueryError("Type what to look for: a finding in report language, e.g. 'severe aortic stenosis'.")
        vec = np.asarray(searcher.encoder().encode_text([text]), np.float32)[0]
        context = TEXT_CONTEXT if req.context is None else float(req.context)
        hits = searcher.by_vector(vec, k=req.k, level=level, filters=req.filters, context=context)
        kind, rq = "text", vec
    elif req.kind in ("file", "vector"):
        if req.kind == "file":
            scope, got = assess_file(req.path, searcher)
            if not scope.in_scope or got is None:
                return SearchOutcome(pl.DataFrame(), pl.DataFrame(), None, scope, scope_warning(scope), got)
            vec = got
        else:
            vec = np.asarray(req.vector, np.float32)
        hits = searcher.by_vector(vec, k=req.k, level=level, filters=req.filters)
        kind, rq = "clip", vec
    elif req.kind == "video":
        vec = searcher._vector("video", int(req.video_key))
        hits = searcher.like_video(int(req.video_key), k=req.k, filters=req.filters, level=level)
        kind, rq = "clip", int(req.video_key)
    elif req.kind == "study":
        vec = searcher._vector("study", searcher._study_key(req.study_uid))
        hits = searcher.like_study(req.study_uid, k=req.k, filters=req.filters, level=level)
        kind, rq = "clip", req.study_uid
    else:
        raise QueryError(f"unknown search kind {req.kind!r}")
    assessment = None
    if hits.height:
        key = "video_key" if level == "video" else "study_key"
        assessment = judge.assess(vec, hits[key].to_list(), hits["score"].to_list(), kind, level, context)
        hits = hits.with_columns(pl.Series("confidence", assessment.labels), pl.Series("z", assessment.z))
    reports = pl.DataFrame()
    if n_reports:  # shown as a reading only when the search found a close match
        try:
            reports = searcher.reports_for(rq, k=n_reports)
        except QueryError:  # an index without report texts
            reports = pl.DataFrame()
    return SearchOutcome(hits, reports, assessment, scope, None, vec,
                         {"kind": kind, "level": level, "context": context})


def matched_sentences(searcher: Any, text: str | None, query: np.ndarray | None, n: int = 1) -> list[tuple[str, bool]]:
    """A report's sentences in order, each with whether it is among the ``n`` closest to the query vector
    (cosine through the model's text tower; sentence vectors cached on the searcher)."""
    sents = split_sentences(text) if text else []
    if not sents or query is None:
        return [(s, False) for s in sents]
    with _LOCK:
        cache: dict[str, np.ndarray] = getattr(searcher, "_sentence_vectors", None) or {}
        searcher._sentence_vectors = cache
    new = [s for s in dict.fromkeys(sents) if s not in cache]
    if new:
        vecs = np.asarray(searcher.encoder().encode_text(new), np.float32)
        for s, v in zip(new, vecs, strict=True):
            cache[s] = v / max(float(np.linalg.norm(v)), 1e-12)
    q = np.asarray(query, np.float32)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    sims = np.array([float(cache[s] @ q) for s in sents])
    best = set(np.argsort(-sims)[:n].tolist())
    return [(s, i in best) for i, s in enumerate(sents)]


def describe_filters(f: Filters | None) -> str:
    """The active filters in words, for the results heading ("" when none)."""
    if f is None or f.is_empty():
        return ""
    parts: list[str] = []
    if f.scope == "in":
        parts.append("echo B-mode clips only")
    elif f.scope == "out":
        parts.append("out-of-scope clips only")
    if f.modes:
        parts.append(" or ".join({"bmode": "B-mode", "doppler": "colour Doppler"}[m] for m in f.modes))
    if f.views:
        parts.append("view " + " or ".join(f.views))
    if f.patients:
        parts.append("patient " + ", ".join(f.patients))
    if f.since and f.until:
        parts.append(f"studies {f.since.isoformat()} to {f.until.isoformat()}")
    elif f.since:
        parts.append(f"studies from {f.since.isoformat()}")
    elif f.until:
        parts.append(f"studies until {f.until.isoformat()}")
    if f.ef_min is not None or f.ef_max is not None:
        lo, hi = f.ef_min or 0, f.ef_max or 100
        parts.append(f"predicted EF {lo:.0f}-{hi:.0f} %")
    if f.devices:
        parts.append("predicted " + ", ".join(d.replace("_", " ") for d in f.devices))
    if f.manufacturers:
        parts.append("made by " + " or ".join(f.manufacturers))
    if f.exclude_patients:
        parts.append("excluding " + ", ".join(f.exclude_patients))
    return " · ".join(parts)


def with_confidence(searcher: Any, hits: pl.DataFrame, kind: str, query: Any, level: str,
                    context: float) -> tuple[pl.DataFrame, Assessment | None]:
    """``hits`` of a query API call with a ``confidence`` column, and their :class:`Assessment` (CLI, API).

    ``kind``: text (``query`` the text), video (a file path), like_video (a video key) or like_study (a UID)."""
    if not hits.height:
        return hits, None
    if kind == "text":
        vec, how = np.asarray(searcher.encoder().encode_text([str(query)]), np.float32)[0], "text"
    elif kind == "video":
        vec, how = searcher.embed_file(query), "clip"
    elif kind == "like_video":
        vec, how = searcher._vector("video", int(query)), "clip"
    else:
        vec, how = searcher._vector("study", searcher._study_key(str(query))), "clip"
    key = "video_key" if level == "video" else "study_key"
    a = judge_of(searcher).assess(vec, hits[key].to_list(), hits["score"].to_list(), how, level,
                                  context if how == "text" else 0.0)
    return hits.with_columns(pl.Series("confidence", a.labels)), a
