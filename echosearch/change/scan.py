"""The change scan: per patient in date order, what changed since the previous visit, as flags with a
calibrated probability and the evidence behind each (clips, values), and a change score per visit.

A study is compared with the patient's previous study (and, for the drift score, with the first one), like
views with like views. Device and valve states are tracked along the timeline: a new device is said once,
a device missed on one visit between two that show it is not "removed", and a removal needs the next visit
to agree. A heart unlike the previous visit's is a new heart of the same patient when the next visit
continues it, and a possible study of another patient when the next visit returns to the old heart (unless the
post-transplant state calibrated on the reports steps up there and the next visit keeps it); such a study is then
skipped as the "previous visit" of the next one. See ``docs/longitudinal.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.change.features import (
    DEVICES,
    PROBE_FEATURES,
    Scales,
    Timeline,
    load_timeline,
    raw_pair_features,
)
from echosearch.change.model import ANY, FLAG_TYPES, ChangeModel, default_model
from echosearch.errors import QueryError
from echosearch.model.zeroshot import BINARY_TASKS as FINDING_TASKS
from echosearch.model.zeroshot import TASKS, recorded_thresholds

DEVICE_NAMES = {"pacer_lead": "pacer/ICD lead", "tavr": "TAVR valve", "mitraclip": "MitraClip"}
CLAUSE_TYPES = (*FLAG_TYPES, "other_patient")
MIN_PROBABILITY = 0.8  # a flag is shown from this calibrated probability: about 9 in 10 shown flags are true
# "another patient's study" needs two things: a heart unlike the previous visit's (this probability) and a next
# visit that returns to the previous heart; it points to the identity audit rather than asserting a mislabel
SUSPECT_PROBABILITY = MIN_PROBABILITY
PRESENT_AT = 0.5  # a state calibrated on the reports (a device, the post-transplant appearance) is present above this
LABELS = {"ef_fall": "EF fall", "ef_rise": "EF rise", "new_heart": "new heart",
          "other_patient": "possibly another patient's study",
          **{f"new_{d}": f"new {n}" for d, n in DEVICE_NAMES.items()},
          **{f"removed_{d}": f"{n} removed" for d, n in DEVICE_NAMES.items()}}


def study_predictions(catalog: Catalog) -> pl.DataFrame:
    """Study-level predictions, one column per task.

    Studies without study rows are filled from their videos by the pipeline's rule
    (:func:`echosearch.model.zeroshot.study_predictions`): the mean for regressions, the maximum over views for
    findings (a device is seen only in the views that show it).
    """
    rows = catalog.study_prediction_rows(FINDING_TASKS)
    base = pl.DataFrame(schema={"study_key": pl.Int64, **{t: pl.Float64 for t in TASKS}})
    if rows.height == 0:
        return base
    wide = rows.pivot(on="task", index="study_key", values="value", aggregate_function="mean")
    for t in TASKS:
        if t not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(t))
    return wide.select("study_key", *TASKS).with_columns(pl.col("study_key").cast(pl.Int64))


@dataclass
class PairScores:
    """Scores of the pairs (study ``i``, earlier study ``j``), rows aligned with ``i``."""

    i: np.ndarray
    j: np.ndarray
    raw: dict[str, np.ndarray]
    X: np.ndarray
    prob: dict[str, np.ndarray]

    @property
    def any_event(self) -> np.ndarray:
        """Probability that something on the flag list happened (the visit's change score): the change model's
        own estimate, never below the probability of a flag shown on the visit."""
        flags = np.max(np.stack([self.prob[t] for t in FLAG_TYPES]), axis=0)
        return np.maximum(self.prob[ANY], flags) if ANY in self.prob else flags


@dataclass
class ScanContext:
    """Everything the scan computed for the whole cohort (before a patient filter): the timeline, the previous
    and first study of each row (-1: none), and the pair scores of both."""

    T: Timeline
    prev: np.ndarray
    first: np.ndarray
    scales: Scales
    model: ChangeModel
    rates: dict[str, float]
    since_prev: PairScores
    since_first: PairScores
    suspect: np.ndarray  # rows that look like another patient's study (skipped as a previous visit)
    present: dict[str, float | None] = field(default_factory=dict)  # presence threshold per finding (None: unknown)


def steps_up(before: float | None, after: float | None) -> bool:
    """A step into a state calibrated on the reports: absent on the earlier study, present on the later one
    (False when either is unknown)."""
    return before is not None and after is not None and bool(before <= PRESENT_AT < after)


def _pairs(pk: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(previous row, first row) per timeline row within its patient, skipping rows marked ``skip``."""
    prev = np.full(pk.size, -1)
    first = np.full(pk.size, -1)
    last, start = -1, -1
    for r in range(pk.size):
        if r == 0 or pk[r] != pk[r - 1]:
            last, start = -1, -1
        prev[r], first[r] = last, start
        if not skip[r]:
            last = r
            start = r if start < 0 else start
    return prev, first


def _score(T: Timeline, i: np.ndarray, j: np.ndarray, scales: Scales, model: ChangeModel,
           rates: dict[str, float] | None) -> tuple[PairScores, dict[str, float]]:
    raw = raw_pair_features(T, i, j)
    X = scales.standardise(raw)
    missing = frozenset(f for f in PROBE_FEATURES if f.rsplit("_", 1)[0] not in T.pred)  # probes without labels
    prob, rates = model.probabilities(X, rates=rates, missing=missing)
    # a heart is also "other" when the archive's own same-patient calibration says these two studies are
    # unlike any patient's pair of visits (identity cosines against its recorded IDs; identity.study_pair)
    other = 1.0 / (1.0 + np.exp(-raw["id_other"]))
    prob["new_heart"] = np.fmax(prob["new_heart"], other)
    return PairScores(i, j, raw, X, prob), rates


def _id_cos(T: Timeline, a: int, b: int) -> float:
    return float(T.ident[a] @ T.ident[b])


def score_cohort(catalog: Catalog, model: ChangeModel | None = None) -> ScanContext:
    """Pair scores of every study against its previous and first study, for the whole index, and the presence
    thresholds the index recorded for its zero-shot findings."""
    model = model or default_model()
    T = load_timeline(catalog, study_predictions(catalog))
    if len(T) == 0:
        raise QueryError("this index has no study vectors: run `echosearch index` first")
    pk = T.meta["patient_key"].to_numpy()
    none = np.zeros(pk.size, bool)
    prev, first = _pairs(pk, none)
    have = prev >= 0
    stored = model.scales_for(catalog.get_manifest("model"), T.identity_source)
    own = Scales.fit(raw_pair_features(T, np.nonzero(have)[0], prev[have]))
    scales = own if stored is None else stored
    if stored is not None and not model.same_identity(T.identity_source):
        # identity vectors of another source than the model's: its identity features in this index's own units
        ids = ("id_dist", "view_id_dist")
        scales = Scales({**stored.centre, **{k: own.centre[k] for k in ids}},
                        {**stored.scale, **{k: own.scale[k] for k in ids}})
    sp, rates = _score(T, np.nonzero(have)[0], prev[have], scales, model, None)
    # a heart unlike the previous one that the next visit does not continue: another patient's study
    p_heart = np.zeros(pk.size)
    p_heart[sp.i] = sp.prob["new_heart"]
    suspect = np.zeros(pk.size, bool)
    state = T.pred.get("transplant_present")  # post-transplant appearance calibrated on the reports (None: no labels)
    for r in np.nonzero(p_heart >= SUSPECT_PROBABILITY)[0]:
        nxt = r + 1
        if nxt < pk.size and pk[nxt] == pk[r] and prev[r] >= 0 and \
                _id_cos(T, int(nxt), int(prev[r])) > _id_cos(T, int(nxt), int(r)):
            # a step into the post-transplant state that the next visit keeps is a transplant, however weakly the
            # identity vectors carry the new heart on; another patient's study is followed by a return to the old state
            kept = state is not None and steps_up(state[prev[r]], min(state[r], state[nxt]))
            suspect[r] = not kept
    if suspect.any():
        prev, first = _pairs(pk, suspect)
        have = prev >= 0
        sp, _ = _score(T, np.nonzero(have)[0], prev[have], scales, model, rates)
    hf = first >= 0
    sf, _ = _score(T, np.nonzero(hf)[0], first[hf], scales, model, rates)
    return ScanContext(T, prev, first, scales, model, rates, sp, sf, suspect,
                       recorded_thresholds(catalog.get_manifest("zeroshot")))


def _at(ps: PairScores, n: int, values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[ps.i] = values
    return out


def _clips(T: Timeline, row: int, views: list[str] | None = None) -> list[int]:
    keys = T.clips.get(int(T.keys[row]), [])
    return [k for k, v in keys if views is None or v in views]


def _fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _before_after(T: Timeline, key: str, a: int, b: int) -> tuple[float, float] | None:
    """A study value of the earlier (``b``) and later (``a``) visit; None unless both are known."""
    v = T.pred.get(key)
    if v is None or not (np.isfinite(v[a]) and np.isfinite(v[b])):
        return None
    return float(v[b]), float(v[a])


def _ef_clause(T: Timeline, a: int, b: int, kind: str, p: float, margin: float) -> dict[str, Any]:
    """An EF clause, led by the EF learnt from the archive's reports where there is one (cycle vectors: ~3 points
    off per study on the demo model, against ~9 for zero-shot), the zero-shot EF beside it; per view, like views."""
    probe = _before_after(T, "ef_probe", a, b)
    source = "ef_probe" if probe else "ef"

    def per_view(key: str) -> dict[str, tuple[float, float]]:
        return {v: (round(float(arr[b]), 1), round(float(arr[a]), 1)) for v, arr in T.view_pred.get(key, {}).items()
                if np.isfinite(arr[a]) and np.isfinite(arr[b])}

    lead, zero = per_view(source), per_view("ef")
    ef0, ef1 = probe if probe else (float(T.pred["ef"][b]), float(T.pred["ef"][a]))
    views = ", ".join(f"{v} {x:.0f}->{y:.0f}" for v, (x, y) in lead.items())
    word = "fall" if kind == "ef_fall" else "rise"
    values: dict[str, Any] = {"ef_before": round(float(T.pred["ef"][b]), 1),
                              "ef_after": round(float(T.pred["ef"][a]), 1),
                              "per_view": {v: list(x) for v, x in zero.items()}, "source": source}
    if probe:
        values["ef_probe_before"], values["ef_probe_after"] = round(probe[0], 1), round(probe[1], 1)
        values["probe_per_view"] = {v: list(x) for v, x in lead.items()}
        how = (f"EF learnt from this archive's reports {ef0:.0f}% -> {ef1:.0f}% ({ef1 - ef0:+.0f}; "
               f"{views or 'study means'}); zero-shot {T.pred['ef'][b]:.0f}% -> {T.pred['ef'][a]:.0f}%")
    else:
        how = f"predicted EF {ef0:.0f}% -> {ef1:.0f}% ({ef1 - ef0:+.0f}; {views or 'study means'})"
    text = f"EF {word} of more than {margin:g} points: {how}, probability {p:.2f}"
    return {"type": kind, "label": LABELS[kind], "probability": round(p, 3), "text": text,
            "evidence": {"before": _clips(T, b, list(lead) or None), "after": _clips(T, a, list(lead) or None),
                         "values": values}}


def _device_clause(T: Timeline, a: int, b: int, kind: str, dev: str, p: float, confirmed: str) -> dict[str, Any]:
    per_view = {v: (round(float(arr[b]), 3), round(float(arr[a]), 3)) for v, arr in T.view_pred[dev].items()
                if np.isfinite(arr[a]) and np.isfinite(arr[b])}
    if kind.startswith("new_"):
        best = max(per_view, key=lambda v: per_view[v][1] - per_view[v][0]) if per_view else None
        head = f"new {DEVICE_NAMES[dev]}"
    else:
        best = max(per_view, key=lambda v: per_view[v][0] - per_view[v][1]) if per_view else None
        head = f"{DEVICE_NAMES[dev]} no longer seen"
    where = f"zero-shot score {per_view[best][0]:.3f} -> {per_view[best][1]:.3f} in {best}" if best else \
        f"zero-shot score {T.pred[dev][b]:.3f} -> {T.pred[dev][a]:.3f}"
    values: dict[str, Any] = {"score_before": round(float(T.pred[dev][b]), 4),
                              "score_after": round(float(T.pred[dev][a]), 4),
                              "per_view": {v: list(x) for v, x in per_view.items()}}
    if seen := _before_after(T, f"{dev}_present", a, b):  # calibrated on the archive's reports
        values["present_before"], values["present_after"] = round(seen[0], 3), round(seen[1], 3)
        where += f"; present {seen[0]:.0%} -> {seen[1]:.0%} by this archive's reports"
    text = f"{head} ({where}{confirmed}), probability {p:.2f}"
    views = [best] if best else None
    return {"type": kind, "label": LABELS[kind], "probability": round(p, 3), "text": text,
            "evidence": {"before": _clips(T, b, views), "after": _clips(T, a, views), "values": values}}


def _heart_clause(T: Timeline, a: int, b: int, nxt: int, kind: str, p: float, typical: float) -> dict[str, Any]:
    c_prev = _id_cos(T, a, b)
    values: dict[str, Any] = {"identity_similarity_to_previous": round(c_prev, 3),
                              "typical_same_patient_similarity": round(typical, 3)}
    if nxt >= 0:
        values["next_visit_similarity_to_this"] = round(_id_cos(T, nxt, a), 3)
        values["next_visit_similarity_to_previous"] = round(_id_cos(T, nxt, b), 3)
    seen = ""
    if status := _before_after(T, "transplant_present", a, b):  # calibrated on the archive's reports
        values["post_transplant_before"], values["post_transplant_after"] = round(status[0], 3), round(status[1], 3)
        seen = f"; post-transplant appearance {status[0]:.0%} -> {status[1]:.0%} by this archive's reports"
    if kind == "new_heart":
        tail = (f"; the next visit continues it ({values['next_visit_similarity_to_this']:.2f}): a new heart of "
                f"this patient (transplant)") if nxt >= 0 else "; no later visit yet to confirm it (transplant, or "\
                "a study of another patient?)"
        text = (f"different heart: identity similarity to the previous visit {c_prev:.2f} (same-patient visits "
                f"typically {typical:.2f}){seen}{tail}, probability {p:.2f}")
    else:
        text = (f"heart unlike the previous visit's ({c_prev:.2f}) while the next visit matches the previous one "
                f"({values['next_visit_similarity_to_previous']:.2f}): possibly a study of another patient filed "
                f"under this ID (see the identity audit), probability {p:.2f}")
    return {"type": kind, "label": LABELS[kind], "probability": round(p, 3), "text": text,
            "evidence": {"before": _clips(T, b), "after": _clips(T, a), "values": values}}


def clauses(ctx: ScanContext, min_probability: float = MIN_PROBABILITY) -> dict[int, list[dict[str, Any]]]:
    """Per timeline row, the flags shown on it (each with type, label, probability, text and evidence),
    device and valve states tracked along each patient's timeline."""
    T, n = ctx.T, len(ctx.T)
    pk = T.meta["patient_key"].to_numpy()
    prob = {t: _at(ctx.since_prev, n, p) for t, p in ctx.since_prev.prob.items()}
    present_thr = ctx.present or recorded_thresholds(None)
    same = [_id_cos(T, int(a), int(b)) for a, b in zip(ctx.since_prev.i, ctx.since_prev.j, strict=True)]
    typical = float(np.median(same)) if same else float("nan")
    out: dict[int, list[dict[str, Any]]] = {}
    state = dict.fromkeys(DEVICES, False)
    for r in range(n):
        b = int(ctx.prev[r])
        start = r == 0 or pk[r] != pk[r - 1]
        nxt = r + 1  # this patient's next visit that is not another patient's study, or -1
        while nxt < n and pk[nxt] == pk[r] and ctx.suspect[nxt]:
            nxt += 1
        nxt = nxt if nxt < n and pk[nxt] == pk[r] else -1
        seen = {d: _seen(T, r, d, present_thr.get(d)) for d in DEVICES}
        if start or b < 0:
            state = {d: bool(seen[d]) for d in DEVICES}
            out[r] = []
            continue
        got: list[dict[str, Any]] = []
        if ctx.suspect[r]:
            out[r] = [_heart_clause(T, r, b, nxt, "other_patient", float(prob["new_heart"][r]), typical)]
            continue
        new_heart = prob["new_heart"][r] >= min_probability
        if new_heart:
            got.append(_heart_clause(T, r, b, nxt, "new_heart", float(prob["new_heart"][r]), typical))
        for kind in ("ef_fall", "ef_rise"):
            if prob[kind][r] >= min_probability:
                got.append(_ef_clause(T, r, b, kind, float(prob[kind][r]), ctx.model.ef_margin))
        for d in DEVICES:
            p_new, p_gone = float(prob[f"new_{d}"][r]), float(prob[f"removed_{d}"][r])
            if not state[d] and p_new >= min_probability and seen[d] is not False:
                got.append(_device_clause(T, r, b, f"new_{d}", d, p_new, ""))
                state[d] = True
            elif state[d] and p_gone >= min_probability and seen[d] is not True:
                later = nxt >= 0 and _seen(T, nxt, d, present_thr.get(d)) is True
                if not later and (nxt >= 0 or new_heart):
                    why = "; not seen on the next visit either" if nxt >= 0 else "; with a new heart"
                    got.append(_device_clause(T, r, b, f"removed_{d}", d, p_gone, why))
                    state[d] = False
            elif not state[d] and seen[d] is True and _seen(T, b, d, present_thr.get(d)) is True:
                state[d] = True  # seen on two visits in a row without a clear step: present all along
        if new_heart and not any(c["type"].startswith("removed_") for c in got):
            state = {d: bool(seen[d]) and state[d] for d in DEVICES}
        out[r] = got
    return out


def _seen(T: Timeline, row: int, dev: str, thr: float | None) -> bool | None:
    """Whether the study shows the device: its presence probability calibrated on the archive's reports when
    there is one (``probes.presence``), else its zero-shot score against the recorded threshold (None: neither)."""
    p = T.pred.get(f"{dev}_present")
    if p is not None and np.isfinite(p[row]):
        return bool(p[row] > PRESENT_AT)
    v = T.pred[dev][row]
    if thr is None or not np.isfinite(v):
        return None
    return bool(v > thr)


def _store_flags(catalog: Catalog, run_id: int, out: pl.DataFrame) -> None:
    """The run's flags with their evidence, as ``changes/run-<id>.parquet`` in the index folder (atomic)."""
    folder = catalog.index_dir / "changes"
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".parquet.tmp")
    os.close(fd)
    out.select("study_key", "prev_study_key", "change_prob", "change_prob_baseline", "flagged", "flags") \
        .write_parquet(tmp)
    os.replace(tmp, folder / f"run-{run_id}.parquet")


def scan_changes(catalog: Catalog, *, patient: str | int | None = None, min_probability: float = MIN_PROBABILITY,
                 store: bool = True, model: ChangeModel | None = None) -> pl.DataFrame:
    """One row per study (baselines included): change scores since the previous and the first study, the flags
    shown on the visit (``flags``: JSON list of type, label, probability, text, evidence clips and values),
    ``reasons`` (their labels) and ``explanation`` (their texts). Stored as a run (kind ``changes``; the flags
    with their evidence in ``changes/run-<id>.parquet``) unless ``store`` is False.

    ``change_prob``: the probability that something on the flag list happened since the previous visit (the
    visit's change score); a flag is shown when its own probability is at least ``min_probability``."""
    ctx = score_cohort(catalog, model)
    T = ctx.T
    meta = T.meta
    who = (pl.col("patient_pseudonym") == str(patient)) | (pl.col("patient_key").cast(pl.String) == str(patient))
    if patient is not None and meta.filter(who).height == 0:
        raise QueryError(f"unknown patient {patient!r} (or no study vectors for that patient)")
    n = len(T)
    found = clauses(ctx, min_probability)
    keys = T.keys
    pk = meta["patient_key"].to_numpy()
    visit = np.ones(n, np.int32)
    for r in range(1, n):
        visit[r] = visit[r - 1] + 1 if pk[r] == pk[r - 1] else 1
    sp, sf = ctx.since_prev, ctx.since_first
    cos_prev = _at(sp, n, 1 - sp.raw["study_dist"])
    cos_first = _at(sf, n, 1 - sf.raw["study_dist"])
    id_prev = _at(sp, n, 1 - sp.raw["id_dist"])
    from echosearch.identity import fit_identity_calibrations, load_studies

    pair_cal, _ = fit_identity_calibrations(catalog, load_studies(catalog))
    learnt = T.pred.get("ef_probe", np.full(n, np.nan))  # the EF probe's estimate (NaN: no reports to learn from)
    cols: dict[str, Any] = {
        "visit": visit,
        "prev_study_key": [int(keys[p]) if p >= 0 else None for p in ctx.prev],
        "baseline_study_key": [int(keys[f]) if f >= 0 else int(keys[r]) for r, f in enumerate(ctx.first)],
        "score_prev": 1 - cos_prev, "score_baseline": 1 - cos_first,
        "z_prev": _at(sp, n, sp.X[:, 0]), "z_baseline": _at(sf, n, sf.X[:, 0]),
        "change_prob": _at(sp, n, sp.any_event), "change_prob_baseline": _at(sf, n, sf.any_event),
        "p_same_prev": pair_cal.predict(id_prev),
        "ef": T.pred["ef"], "ef_prev": np.where(ctx.prev >= 0, T.pred["ef"][np.maximum(ctx.prev, 0)], np.nan),
        "ef_learnt": learnt, "ef_learnt_prev": np.where(ctx.prev >= 0, learnt[np.maximum(ctx.prev, 0)], np.nan),
        **{f"p_{t}": _at(sp, n, sp.prob[t]) for t in FLAG_TYPES},
    }
    out = meta.with_columns(*[pl.Series(k, v).fill_nan(None) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                              else pl.Series(k, v) for k, v in cols.items()])
    out = out.with_columns(pl.col("prev_study_key").cast(pl.Int64), pl.col("baseline_study_key").cast(pl.Int64))
    flags = [found.get(r, []) for r in range(n)]
    expl = ["baseline study" if ctx.prev[r] < 0 else "; ".join(c["text"] for c in f) or "no notable change"
            for r, f in enumerate(flags)]
    out = out.with_columns(
        pl.Series("flagged", [bool(f) for f in flags], dtype=pl.Boolean),
        pl.Series("reasons", [[c["label"] for c in f] for f in flags], dtype=pl.List(pl.String)),
        pl.Series("flag_types", [[c["type"] for c in f] for f in flags], dtype=pl.List(pl.String)),
        pl.Series("explanation", expl, dtype=pl.String),
        pl.Series("flags", [json.dumps(f) for f in flags], dtype=pl.String))
    if patient is not None:
        out = out.filter(who)
    out = out.select(
        "patient_key", "patient_pseudonym", "study_key", "study_uid", "study_date", "visit", "prev_study_key",
        "baseline_study_key", "score_prev", "score_baseline", "z_prev", "z_baseline", "change_prob",
        "change_prob_baseline", "p_same_prev", *[f"p_{t}" for t in FLAG_TYPES], "ef", "ef_prev", "ef_learnt",
        "ef_learnt_prev", "flagged",
        "reasons", "flag_types", "explanation", "flags")
    run_id = None
    if store and not catalog.read_only:
        run_id = catalog.new_run("changes", {"patient": patient, "min_probability": min_probability,
                                             "event_rates": ctx.rates, "model": ctx.model.info,
                                             "identity": T.identity_source,
                                             "probes_mean_abs_error": {k: round(v, 4) for k, v in
                                                                       T.probe_error.items()},
                                             "ef_probe_input": T.ef_probe_input})
        cols_db = ["run_id", "patient_key", "study_key", "prev_study_key", "baseline_study_key", "score_prev",
                   "score_baseline", "z_prev", "z_baseline", "flagged", "explanation"]
        with_run = out.with_columns(pl.lit(run_id, pl.Int64).alias("run_id"))
        catalog.insert_frame("changes", with_run, cols_db)
        _store_flags(catalog, run_id, out)
    return out.with_columns(pl.lit(run_id, pl.Int64).alias("run_id"))
