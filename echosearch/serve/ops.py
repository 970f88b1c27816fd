"""What the server's routes compute: library calls on a cursor, results as JSON-ready dicts.

Each function returns the same document the CLI prints with ``--json`` for the matching command, so a
client can print it as it is or render it with the CLI's own tables.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.errors import QueryError
from echosearch.filters import Filters
from echosearch.serve.live import Snapshot


def jsonable(obj: Any) -> Any:
    """``obj`` with dates as ISO strings, numpy values as Python ones and NaN/inf as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (date, datetime)):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def records(df: pl.DataFrame) -> list[dict[str, Any]]:
    return [jsonable(r) for r in df.to_dicts()]


def search(snap: Snapshot, kind: str, value: Any, *, k: int, level: str, filters: Filters,
           collapse: bool, context: float | None, vector: np.ndarray | None = None) -> dict[str, Any]:
    """A search (``kind`` text, video, like_video or like_study); ``vector``: the query's already-computed
    vector (text or uploaded clip), so that the model runs outside the snapshot's lock."""
    from echosearch.query import TEXT_CONTEXT

    if level not in ("video", "study"):
        raise QueryError(f"level must be video or study, not {level!r}")
    if filters.where is not None:
        raise QueryError("raw --where SQL is not accepted by the server: use the typed filters, or stop the "
                         "server and search the index directly")
    s = snap.searcher
    opts: dict[str, Any] = {"collapse_study": collapse}
    with snap.lock:
        if kind in ("text", "video"):
            assert vector is not None
            ctx = (TEXT_CONTEXT if kind == "text" else 0.0) if context is None else context
            df = s.by_vector(vector, k, level, filters, context=ctx, **opts)
        elif kind == "like_video":
            df = s.like_video(int(value), k, filters, level=level, **opts | _ctx(context))
        elif kind == "like_study":
            df = s.like_study(str(value), k, filters, level=level, **opts | _ctx(context))
        else:
            raise QueryError(f"unknown search kind {kind!r}")
        info = s.last_info
    return {"query": {kind: str(value)}, "level": level, "k": k,
            "n_available": info.n_available if info else df.height, "plan": info.plan if info else None,
            "context": info.context if info else None, "filters": jsonable(filters.as_dict()),
            "generation": snap.generation, "results": records(df)}


def _ctx(context: float | None) -> dict[str, Any]:
    return {} if context is None else {"context": context}


def reports(snap: Snapshot, kind: str, value: Any, *, k: int, vector: np.ndarray | None = None) -> dict[str, Any]:
    """Nearest report texts to an uploaded clip (``vector``), a catalog video key or a study UID."""
    with snap.lock:
        if kind == "video":
            assert vector is not None
            df = snap.searcher.reports_for(np.asarray(vector, dtype=np.float32), k)
        elif kind == "like_video":
            df = snap.searcher.reports_for(int(value), k)
        elif kind == "like_study":
            df = snap.searcher.reports_for(str(value), k)
        else:
            raise QueryError(f"unknown reports query {kind!r}")
        info = snap.searcher.last_info
    return {"query": {kind: str(value)}, "k": k, "n_available": info.n_available if info else df.height,
            "results": records(df)}


def audit(cat: Catalog, *, fpr: float, k: int, unverifiable: bool) -> dict[str, Any]:
    """Run the identity audit (stored as a new run), as ``echosearch audit --json``."""
    from echosearch.identity import audit as run_audit

    df = run_audit(cat, fpr=fpr, k=k, report_unverifiable=unverifiable)
    rows = records(df)
    for r in rows:
        r["evidence"] = json.loads(r["evidence"])
    return {"run_id": df["run_id"][0] if df.height else None, "suspects": int(df["suspect"].sum()),
            "studies": rows}


def audit_results(cat: Catalog, suspects_only: bool) -> dict[str, Any]:
    """The latest stored audit run in review order with each study's latest reviewer decision."""
    from echosearch.appcore.views import audit_review

    run = cat.latest_run("audit")
    if run is None:
        return {"run_id": None, "studies": []}
    rows = records(audit_review(cat, suspects_only))
    for r in rows:
        r["evidence"] = json.loads(r["evidence"])
    return {"run_id": run, "studies": rows}


def changes(cat: Catalog, *, patient: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """Change scan (stored as a new run), as ``echosearch changes --json``; ``options`` are the keyword
    arguments of :func:`echosearch.change.scan_changes` the caller set (others are refused)."""
    import inspect

    from echosearch.change import scan_changes

    accepted = set(inspect.signature(scan_changes).parameters) - {"catalog", "patient", "store"}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if unknown:
        raise QueryError(f"unknown change-scan option(s) {unknown}; this server accepts {sorted(accepted)}")
    df = scan_changes(cat, patient=patient, **{k: v for k, v in options.items() if v is not None})
    return {"run_id": df["run_id"][0] if df.height else None, "flagged": int(df["flagged"].sum()),
            "studies": records(df)}


def match(cat: Catalog, *, study: str | None, vector: np.ndarray | None, k: int, what: dict[str, str]) -> dict[str, Any]:
    """Candidate patients of a catalog study or of a clip's identity vector, as ``echosearch match --json``."""
    from echosearch.identity import match_patients

    df = match_patients(cat, vector if vector is not None else str(study), k_patients=k)
    return {**what, "candidates": records(df)}


def timeline_frame(cat: Catalog, patient: str) -> tuple[int, pl.DataFrame]:
    """(patient key, the patient's studies in date order with zero-shot predictions and change scores computed
    now) of a patient given by pseudonym or key."""
    from echosearch.appcore.views import patient_timeline

    key = cat.patient_key(patient)
    if key is None:
        raise QueryError(f"unknown patient {patient!r}")
    return key, patient_timeline(cat, key)
