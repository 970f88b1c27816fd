"""What the app's pages show, computed from a catalog: one function per page need.

The local :class:`~echosearch.appcore.data.LocalAppIndex` calls these on a cursor of its own connection; the
server (:mod:`echosearch.serve.app_routes`) calls the same functions on a cursor of its connection and sends
the result over HTTP, so a page shows the same thing whichever way it reads. SQL stays in the catalog layer
(:mod:`echosearch.store.app_queries`).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from echosearch.catalog import Catalog
from echosearch.errors import QueryError
from echosearch.ingest.previews import Preview, ensure_preview

DECISIONS = ("confirmed", "dismissed")
TASK_LABELS = {"ef": "EF (%)", "pacer_lead": "pacemaker lead", "tavr": "TAVR valve", "mitraclip": "MitraClip",
               "lv_dilated": "dilated LV"}


def filter_options(cat: Catalog) -> dict[str, Any]:
    """Values the search filters offer: views, manufacturers and the study date range (patients apart)."""
    lo, hi = cat.study_date_range()
    return {"views": cat.view_values(cat.has_scope()), "manufacturers": cat.manufacturer_values(),
            "date_min": lo, "date_max": hi}


def patient_timeline(cat: Catalog, patient_key: int) -> pl.DataFrame:
    """A patient's studies in date order: views, zero-shot predictions and change scores with flags, numbered
    by ``visit``. Change scores come from :func:`echosearch.change.scan_changes` for this patient, computed
    now (not stored), so the page always reflects the current catalog."""
    from echosearch.change import scan_changes, study_predictions

    studies = cat.patient_studies(int(patient_key))
    if studies.height == 0:
        return studies
    studies = studies.join(study_predictions(cat), on="study_key", how="left")
    try:
        ch = scan_changes(cat, patient=int(patient_key), store=False)
    except QueryError:  # no study vectors yet
        ch = pl.DataFrame()
    if ch.height:
        keep = [c for c in ch.columns if c == "study_key" or c not in (*studies.columns, "visit")]
        studies = studies.join(ch.select(keep), on="study_key", how="left")
    return studies.with_row_index("visit", offset=1)


def audit_review(cat: Catalog, suspects_only: bool = True) -> pl.DataFrame:
    """The latest audit run in review order with each study's latest decision (empty before any audit)."""
    run = cat.latest_run("audit")
    return pl.DataFrame() if run is None else cat.audit_review(run, suspects_only)


def audit_run(cat: Catalog) -> dict[str, Any] | None:
    """The latest audit run: id, start time (UTC), which vectors it read, its false-positive rate and the AUC
    of its study-to-patient calibration (runs stored before it was recorded: the current calibration's)."""
    run = cat.latest_run("audit")
    rec = cat.run_record(run) if run is not None else None
    if rec is None:
        return None
    params = rec["params"]
    auc = params.get("calibration_auc")
    if auc is None:
        from echosearch.identity import PATIENT_CAL

        cal = cat.load_calibration(PATIENT_CAL)
        auc = cal["auc"] if cal else None
    return {"run_id": rec["run_id"], "started_at": rec["started_at"], "vectors": params.get("vectors"),
            "calibration_auc": auc, "fpr": params.get("fpr")}


def check_decision(decision: str, reviewer: str) -> None:
    """Refuse a decision other than confirmed/dismissed, or one without a reviewer."""
    if decision not in DECISIONS:
        raise QueryError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if not reviewer.strip():
        raise QueryError("a decision needs a reviewer name")


def clip_scopes(cat: Catalog, video_keys: list[int]) -> pl.DataFrame:
    """Stored scope rows of clips (empty for an index without scope)."""
    return cat.scope_rows([int(k) for k in video_keys])


def score_distributions(cat: Catalog, max_pairs: int = 5000, seed: int = 0) -> pl.DataFrame:
    """Cosines of same-patient and different-patient study pairs (recorded patients), sampled the way the
    identity calibration samples them: rows (score, group)."""
    from echosearch.identity import calibration as cal
    from echosearch.identity import load_studies

    S = load_studies(cat)
    if len(S) < 2:
        return pl.DataFrame(schema={"score": pl.Float64, "group": pl.String})
    i, j = cal.within_group_pairs(S.patient, max_pairs=max_pairs, seed=seed)
    ni, nj = cal.between_group_pairs(S.patient, max_pairs, seed=seed + 1)
    same, diff = cal.pair_cosines(S.vecs, i, j), cal.pair_cosines(S.vecs, ni, nj)
    return pl.DataFrame({"score": [*same.tolist(), *diff.tolist()],
                         "group": ["same patient"] * same.size + ["different patients"] * diff.size},
                        schema={"score": pl.Float64, "group": pl.String})


def video_preview(cat: Catalog, video_key: int) -> Preview:
    """The cached preview of a video, made on demand (QueryError/IngestError when impossible)."""
    where = cat.locations([int(video_key)])
    if int(video_key) not in where:
        raise QueryError(f"unknown video {video_key}")
    policy = (cat.manifest().get("model") or {}).get("preprocessing") or {}
    return ensure_preview(cat.index_dir, int(video_key), where[int(video_key)], policy)
