"""Change between visits: per patient in date order, how much each study differs from the previous one and
from the patient's baseline, normalised, flagged, and explained by the zero-shot predictions.

Dissimilarity is ``1 - cosine`` of study vectors. For the z-scores it is measured on the Fisher scale
(``-atanh(cosine)``) and compared with the patient's own visit-to-visit spread (leave-this-pair-out,
robust, shrunk towards the cohort when the patient has few visits) and with the cohort's spread of
same-patient consecutive pairs (median / MAD). See ``docs/longitudinal.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from echosearch import calibration as cal
from echosearch.catalog import Catalog
from echosearch.errors import QueryError
from echosearch.identity import fit_identity_calibrations, load_studies
from echosearch.zeroshot import BINARY_TASKS as FINDING_TASKS
from echosearch.zeroshot import TASKS, recorded_thresholds

K0 = 3.0
MIN_SCALE = 0.05  # Fisher units; about 0.013 of cosine near 0.85
DEVICE_NAMES = {"pacer_lead": "pacer/ICD lead", "tavr": "TAVR valve", "mitraclip": "MitraClip"}


def study_predictions(catalog: Catalog) -> pl.DataFrame:
    """Study-level predictions, one column per task.

    Studies without study rows are filled from their videos by the pipeline's rule
    (:func:`echosearch.zeroshot.study_predictions`): the mean for regressions, the maximum over views for
    findings (a device is seen only in the views that show it).
    """
    rows = catalog.con.sql(
        """
        WITH s AS (SELECT key AS study_key, task, value FROM predictions WHERE level = 'study'),
             v AS (SELECT vi.study_key, p.task,
                          CASE WHEN list_contains(?, p.task) THEN max(p.value) ELSE avg(p.value) END AS value
                   FROM predictions p JOIN videos vi ON p.level = 'video' AND p.key = vi.video_key
                   GROUP BY vi.study_key, p.task)
        SELECT * FROM s
        UNION ALL
        SELECT * FROM v WHERE NOT EXISTS (SELECT 1 FROM s WHERE s.study_key = v.study_key AND s.task = v.task)
        """,
        params=[sorted(FINDING_TASKS)],
    ).pl()
    base = pl.DataFrame(schema={"study_key": pl.Int64, **{t: pl.Float64 for t in TASKS}})
    if rows.height == 0:
        return base
    wide = rows.pivot(on="task", index="study_key", values="value", aggregate_function="mean")
    for t in TASKS:
        if t not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(t))
    return wide.select("study_key", *TASKS).with_columns(pl.col("study_key").cast(pl.Int64))


def _delta_threshold(deltas: np.ndarray, floor: float, k: float = 3.0) -> float:
    d = deltas[np.isfinite(deltas)]
    if d.size < 5:
        return floor
    return max(floor, k * cal.robust_center_scale(d)[1])


def _explain(r: dict[str, Any], thr: dict[str, float],
             present: dict[str, float | None] | None = None) -> tuple[list[str], list[str]]:
    """(clinical finding phrases, reasons for flagging) of one study against its previous one. ``present``: the
    index's per-task presence thresholds (default 0); a finding appears when it crosses its threshold by more
    than the cohort's noise, or, where the threshold is unknown (None), when it rises by more than the noise."""
    phrases: list[str] = []
    reasons: list[str] = []
    ef, ef0 = r.get("ef"), r.get("ef_prev")
    if ef is not None and ef0 is not None and np.isfinite(ef) and np.isfinite(ef0):
        d = ef - ef0
        if abs(d) >= 5:
            phrases.append(f"EF {ef0:.0f}% -> {ef:.0f}% ({d:+.0f})")
        if d <= -thr["ef"]:
            reasons.append("EF fall")
    for task in (*DEVICE_NAMES, "lv_dilated"):
        cur, prev = r.get(task), r.get(f"{task}_prev")
        if cur is None or prev is None or not (np.isfinite(cur) and np.isfinite(prev)):
            continue
        name = DEVICE_NAMES.get(task)
        p = 0.0 if present is None else present.get(task, 0.0)
        if (p is None or cur > p >= prev) and cur - prev > thr[task]:
            phrases.append(f"new {name}" if name else "LV newly dilated")
            if task in DEVICE_NAMES:
                reasons.append(f"new {name}")
        elif (p is None or prev > p >= cur) and prev - cur > thr[task]:
            phrases.append(f"{name} no longer seen" if name else "LV no longer dilated")
    return phrases, reasons


def scan_changes(catalog: Catalog, *, patient: str | int | None = None, z_threshold: float = 3.0,
                 store: bool = True) -> pl.DataFrame:
    """One row per study with a previous study of the same patient (plus the baseline rows), flagged and
    explained; stored in ``changes`` under a new run (kind ``changes``) unless ``store`` is False.

    A study is flagged when its change since the previous study has z > ``z_threshold``, when it first
    drifts past ``z_threshold`` from the baseline, when the predicted EF falls by more than
    max(10 points, 3 robust SDs of the cohort's visit-to-visit EF changes), or when a device (pacer/ICD
    lead, TAVR, MitraClip) newly appears by more than the cohort's visit-to-visit noise."""
    S = load_studies(catalog, "content")  # change is in the content vectors; "different heart" in identity's
    if len(S) == 0:
        raise QueryError("this index has no study vectors: run `echosearch index` first")
    meta = S.meta.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    who = (pl.col("patient_pseudonym") == str(patient)) | (pl.col("patient_key").cast(pl.String) == str(patient))
    if patient is not None and meta.filter(who).height == 0:
        raise QueryError(f"unknown patient {patient!r} (or no study vectors for that patient)")
    preds = study_predictions(catalog)
    meta = meta.join(preds, on="study_key", how="left").sort(
        "patient_key", "study_date", "study_key", nulls_last=True)
    rows = meta["row"].to_numpy()
    pk = meta["patient_key"].to_numpy()
    same_prev = np.r_[False, pk[1:] == pk[:-1]]
    first = np.nonzero(~same_prev)[0]
    base_pos = first[np.cumsum(~same_prev) - 1]
    prev_pos = np.where(same_prev, np.arange(pk.size) - 1, -1)
    v = S.vecs[rows].astype(np.float64)
    prev0 = np.maximum(prev_pos, 0)
    cos_prev = np.where(same_prev, np.einsum("ij,ij->i", v, v[prev0]), np.nan)
    cos_base = np.where(same_prev, np.einsum("ij,ij->i", v, v[base_pos]), np.nan)
    u_prev, u_base = -cal.fisher(cos_prev), -cal.fisher(cos_base)
    c_med, c_s = cal.robust_center_scale(u_prev[same_prev])
    # small cohorts estimate the spread poorly: never narrower than MIN_SCALE, widened for few pairs
    c_s = max(c_s, MIN_SCALE) * float(np.sqrt(1 + 10 / max(int(same_prev.sum()), 1)))
    z_prev = np.full(pk.size, np.nan)
    z_base = np.full(pk.size, np.nan)
    for start, end in zip(first, np.r_[first[1:], pk.size], strict=True):
        pairs = list(range(start + 1, end))
        for i in pairs:
            others = [float(u_prev[j]) for j in pairs if j != i]
            m = len(others)
            med, s = cal.robust_center_scale(others, floor=0.0) if m else (c_med, c_s)
            ms = m if m >= 2 else 0
            centre = (m * med + K0 * c_med) / (m + K0)
            scale = max(np.sqrt((ms * s**2 + K0 * c_s**2) / (ms + K0)), 0.5 * c_s, 1e-6)
            z_prev[i] = (u_prev[i] - centre) / scale
            z_base[i] = (u_base[i] - centre) / scale
    S_id = load_studies(catalog)
    cos_id = cos_prev
    if S_id.source != S.source:  # the identity vectors of the same (study, previous study) pairs
        keys = meta["study_key"].to_numpy()
        at = np.clip(np.searchsorted(S_id.keys, keys), 0, max(len(S_id) - 1, 0))
        ok = (S_id.keys[at] == keys) if len(S_id) else np.zeros(keys.size, bool)
        ok_pair = ok & ok[prev0] & same_prev
        cos_id = np.where(ok_pair, np.einsum("ij,ij->i", S_id.vecs[at], S_id.vecs[at[prev0]]), np.nan)
    pair_cal, _ = fit_identity_calibrations(catalog, S_id)
    p_same_prev = pair_cal.predict(cos_id)
    pred = {t: meta[t].to_numpy().astype(np.float64) for t in TASKS}
    before = {t: np.where(same_prev, pred[t][prev0], np.nan) for t in TASKS}
    thr = {t: _delta_threshold(pred[t] - before[t], 10.0 if t == "ef" else 0.01) for t in TASKS}
    present = recorded_thresholds(catalog.get_manifest("zeroshot"))  # no record: an older index, contrast (0)
    prev_cols = [pl.Series(f"{t}_prev", before[t]).fill_nan(None) for t in TASKS]
    keys = meta["study_key"].to_numpy()
    out = meta.with_columns(
        *prev_cols,
        pl.Series("visit", (np.arange(pk.size) - base_pos + 1).astype(np.int32)),
        pl.Series("prev_study_key", [int(keys[p]) if p >= 0 else None for p in prev_pos], dtype=pl.Int64),
        pl.Series("baseline_study_key", keys[base_pos].astype(np.int64)),
        pl.Series("score_prev", 1 - cos_prev).fill_nan(None),
        pl.Series("score_baseline", 1 - cos_base).fill_nan(None),
        pl.Series("z_prev", z_prev).fill_nan(None),
        pl.Series("z_baseline", z_base).fill_nan(None),
        pl.Series("p_same_prev", p_same_prev).fill_nan(None),
    )
    if patient is not None:
        out = out.filter(who)
    flagged: list[bool] = []
    reasons_col: list[list[str]] = []
    explanations: list[str] = []
    prev_drift = False
    for r in out.iter_rows(named=True):
        if r["prev_study_key"] is None:
            flagged.append(False)
            reasons_col.append([])
            explanations.append("baseline study")
            prev_drift = False
            continue
        phrases, reasons = _explain(r, thr, present)
        zp, zb = r["z_prev"], r["z_baseline"]
        drift = zb is not None and zb > z_threshold
        if zp is not None and zp > z_threshold:
            reasons.insert(0, "large change since previous study")
            phrases.append(f"large change since previous study (z {zp:.1f})")
        elif drift and not prev_drift:
            reasons.insert(0, "drift from baseline")
            phrases.append(f"drifted from baseline (z {zb:.1f})")
        prev_drift = drift
        if r["p_same_prev"] is not None and r["p_same_prev"] < 0.5:
            phrases.append("heart looks like a different patient's (transplant, or a study of another patient?)")
        flagged.append(bool(reasons))
        reasons_col.append(reasons)
        explanations.append("; ".join(phrases) if phrases else "no notable change")
    out = out.with_columns(pl.Series("flagged", flagged, dtype=pl.Boolean),
                           pl.Series("reasons", reasons_col, dtype=pl.List(pl.String)),
                           pl.Series("explanation", explanations, dtype=pl.String))
    out = out.select(
        "patient_key", "patient_pseudonym", "study_key", "study_uid", "study_date",
        "visit", "prev_study_key", "baseline_study_key", "score_prev", "score_baseline", "z_prev", "z_baseline",
        "p_same_prev", pl.col("ef"), pl.col("ef_prev"), "flagged", "reasons", "explanation")
    run_id = None
    if store and not catalog.read_only:
        run_id = catalog.new_run("changes", {"patient": patient, "z_threshold": z_threshold,
                                             "thresholds": thr, "cohort_median": c_med, "cohort_scale": c_s})
        cols = ["run_id", "patient_key", "study_key", "prev_study_key", "baseline_study_key", "score_prev",
                "score_baseline", "z_prev", "z_baseline", "flagged", "explanation"]
        catalog.insert_frame("changes", out.with_columns(pl.lit(run_id, pl.Int64).alias("run_id")), cols)
    return out.with_columns(pl.lit(run_id, pl.Int64).alias("run_id"))
