"""What a pair of studies of one patient shows: like-view vector distances, identity, zero-shot values.

Every figure is computed per view first and compared like with like (an A4C with an A4C): a study's views
differ far more from each other than one view differs between visits. Features are then standardised by
the cohort's own consecutive-visit spread (median / MAD, robust to the events among them), so the change
model's weights are in units of "typical visit-to-visit noise" and carry over between encoders.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.identity import calibration as cal
from echosearch.model.zeroshot import BINARY_TASKS, TASKS

DEVICES = ("pacer_lead", "tavr", "mitraclip")
REPORT_ONLY = ("transplant",)  # findings tracked by report-trained probes only (no zero-shot task): a new heart
# the standardised features the change model reads, in this order
FINDINGS = (*DEVICES, "lv_dilated")  # zero-shot findings compared between visits (dilation: evidence of EF change)
FEATURES = ("study_dist", "view_dist", "view_dist_max", "id_dist", "view_id_dist", "id_other", "next_gap", "has_next",
            "ef_fall", "ef_rise", "ef_probe_fall", "ef_probe_rise",
            *(f"{d}_rise" for d in FINDINGS), *(f"{d}_fall" for d in FINDINGS),
            *(f"{d}_probe_rise" for d in DEVICES), *(f"{d}_probe_fall" for d in DEVICES), "transplant_probe_rise",
            "transplant_present_rise", *(f"{d}_present_rise" for d in DEVICES), *(f"{d}_present_fall" for d in DEVICES))
# missing where the reports give no labels: the probes and the presence calibrated on them
PROBE_FEATURES = frozenset(f for f in FEATURES if "_probe_" in f or "_present_" in f)


@dataclass
class Timeline:
    """Every study with a content vector, in (patient, date) order, with what the pair features need."""

    meta: pl.DataFrame  # study_key, study_uid, study_date, patient_key, patient_pseudonym (timeline order)
    content: np.ndarray  # (n, d) study content vectors, unit length
    ident: np.ndarray  # (n, d') study identity vectors (the content vectors when the index has none)
    identity_source: str
    views: list[str]
    view_vec: dict[str, np.ndarray]  # view -> (n, d) mean content vector of the study's videos of that view (NaN: none)
    view_id: dict[str, np.ndarray]  # same for identity video vectors
    view_pred: dict[str, dict[str, np.ndarray]]  # task -> view -> (n,) the view's prediction (NaN: none)
    pred: dict[str, np.ndarray]  # task -> (n,) study prediction (mean EF, strongest view for a finding)
    # both also hold "<task>_probe" (EF, devices): estimates learnt from the archive's own reports (probes.py)
    pred_sd: np.ndarray  # (n,) spread of the EF prediction across the study's clips (NaN: one clip)
    clips: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # study_key -> [(video_key, view)]
    same_heart: Any = None  # the index's calibration of "same patient" on identity cosines (identity.study_pair)
    probe_error: dict[str, float] = field(default_factory=dict)  # "<task>_probe" -> out-of-fold mean abs. error
    ef_probe_input: str = "content"  # what the EF probe reads: "cycle" vectors when the index stores them

    def __len__(self) -> int:
        return self.meta.height

    @property
    def keys(self) -> np.ndarray:
        return self.meta["study_key"].to_numpy()


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _per_view(keys: np.ndarray, vkeys: np.ndarray, vstudy: np.ndarray, vview: np.ndarray, vecs: np.ndarray,
              views: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    pos = np.searchsorted(keys, vstudy)
    pos = np.clip(pos, 0, max(keys.size - 1, 0))
    ok = keys[pos] == vstudy if keys.size else np.zeros(vstudy.size, bool)
    for view in views:
        m = ok & (vview == view)
        acc = np.zeros((keys.size, vecs.shape[1] if vecs.ndim == 2 else 1))
        n = np.zeros(keys.size)
        np.add.at(acc, pos[m], vecs[m])
        np.add.at(n, pos[m], 1)
        arr = np.full_like(acc, np.nan)
        arr[n > 0] = _unit(acc[n > 0])
        out[view] = arr
    return out


def load_timeline(catalog: Catalog, study_preds: pl.DataFrame) -> Timeline:
    """Read vectors, views and predictions of every study with a content vector (sorted by key first, then
    put in timeline order)."""
    from echosearch.identity import load_studies

    S = load_studies(catalog, "content")
    S_id = load_studies(catalog)
    meta = S.meta.sort("patient_key", "study_date", "study_key", nulls_last=True)
    order = np.searchsorted(S.keys, meta["study_key"].to_numpy())
    keys = S.keys[order]
    content = S.vecs[order].astype(np.float64)
    ident = content
    if S_id.source != S.source and len(S_id):
        at = np.clip(np.searchsorted(S_id.keys, keys), 0, len(S_id) - 1)
        ok = S_id.keys[at] == keys
        ident = np.where(ok[:, None], S_id.vecs[at].astype(np.float64), np.nan)
    vids = catalog.video_study_views()
    vk, vv = catalog.embeddings("video")
    vids = vids.filter(pl.col("video_key").is_in(vk.tolist()))
    vrow = np.searchsorted(vk, vids["video_key"].to_numpy())
    vstudy, vview = vids["study_key"].to_numpy(), vids["view"].to_numpy().astype(str)
    views = sorted(set(vview.tolist()))
    by_key = np.argsort(keys)
    skeys = keys[by_key]

    def in_order(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # computed in key order -> timeline order
        inv = np.empty_like(by_key)
        inv[by_key] = np.arange(by_key.size)
        return {k: a[inv] for k, a in d.items()}

    view_vec = in_order(_per_view(skeys, vids["video_key"].to_numpy(), vstudy, vview, vv[vrow], views))
    view_id = view_vec
    if catalog.has_identity() and catalog.has_table("video_identity"):
        ik, iv = catalog.embeddings("video_identity")
        if ik.size:
            r = np.clip(np.searchsorted(ik, vids["video_key"].to_numpy()), 0, ik.size - 1)
            has = ik[r] == vids["video_key"].to_numpy()
            view_id = in_order(_per_view(skeys, vids["video_key"].to_numpy()[has], vstudy[has], vview[has],
                                         iv[r[has]], views))
    # per-view zero-shot values (mean over that view's clips) and the study values (the pipeline's rule)
    vp = catalog.video_prediction_rows()
    vp = vp.join(vids, on="video_key", how="inner")
    view_pred: dict[str, dict[str, np.ndarray]] = {}
    for task in TASKS:
        t = vp.filter(pl.col("task") == task)
        view_pred[task] = {}
        for view in views:
            tv = t.filter(pl.col("view") == view).group_by("study_key").agg(pl.col("value").mean())
            arr = np.full(keys.size, np.nan)
            pos = np.searchsorted(skeys, tv["study_key"].to_numpy())
            pos = np.clip(pos, 0, max(skeys.size - 1, 0))
            ok = skeys[pos] == tv["study_key"].to_numpy() if skeys.size else np.zeros(0, bool)
            arr[by_key[pos[ok]]] = tv["value"].to_numpy()[ok]
            view_pred[task][view] = arr
    sd = vp.filter(pl.col("task") == "ef").group_by("study_key").agg(pl.col("value").std().alias("sd"))
    pred_sd = np.full(keys.size, np.nan)
    pos = np.clip(np.searchsorted(skeys, sd["study_key"].to_numpy()), 0, max(skeys.size - 1, 0))
    ok = skeys[pos] == sd["study_key"].to_numpy() if skeys.size else np.zeros(0, bool)
    pred_sd[by_key[pos[ok]]] = sd["sd"].fill_null(np.nan).to_numpy()[ok]
    sp = pl.DataFrame({"study_key": keys}).join(study_preds, on="study_key", how="left")
    pred = {t: sp[t].cast(pl.Float64).fill_null(np.nan).to_numpy() if t in sp.columns else np.full(keys.size, np.nan)
            for t in TASKS}
    cycle = _cycle_vectors(catalog, vids["video_key"].to_numpy())
    probe_view, probe, probe_mae = _probes(catalog, meta, skeys, by_key, vids, vv[vrow], views, pred, cycle)
    view_pred.update(probe_view)
    pred.update(probe)
    clips: dict[int, list[tuple[int, str]]] = {}
    for k, s, v in vids.select("video_key", "study_key", "view").iter_rows():
        clips.setdefault(int(s), []).append((int(k), str(v)))
    from echosearch.identity import fit_identity_calibrations

    pair_cal = fit_identity_calibrations(catalog, S_id)[0] if len(S_id) > 1 else None
    return Timeline(meta, content, ident, S_id.source, views, view_vec, view_id, view_pred, pred, pred_sd, clips,
                    pair_cal, probe_mae, "cycle" if cycle is not None else "content")


def _cycle_vectors(catalog: Catalog, video_keys: np.ndarray) -> np.ndarray | None:
    """The cycle vectors of ``video_keys`` in that order, or None unless the index stores one for each."""
    if not catalog.has_cycle():
        return None
    ck, cv = catalog.embeddings("video_cycle")
    at = np.clip(np.searchsorted(ck, video_keys), 0, max(ck.size - 1, 0))
    if not ck.size or not (ck[at] == video_keys).all():
        return None
    return cv[at]


def _probes(catalog: Catalog, meta: pl.DataFrame, skeys: np.ndarray, by_key: np.ndarray, vids: pl.DataFrame,
            vecs: np.ndarray, views: list[str], zero_shot: dict[str, np.ndarray], cycle: np.ndarray | None = None
            ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray], dict[str, float]]:
    """Report-trained estimates (``probes.py``) in timeline order: task -> view -> (n,) mean over the study's clips
    of that view, task -> (n,) study value (EF: mean over clips; a device: the strongest view), and each task's
    out-of-fold error. Tasks are named ``<task>_probe``; a task without labels is left out. EF is read from the
    clips' cycle vectors (``cycle``, aligned with ``vids``) when the index stores them. A device with labels
    also gets ``<device>_present``: the probability it is present (zero-shot score and probe, calibrated on the
    reports)."""
    from echosearch.change.probes import cross_fitted, presence, report_targets
    from echosearch.model.zeroshot import load_prompts

    n = meta.height
    rep = catalog.study_reports(meta["study_key"].to_list())
    prompts = load_prompts()
    positives = {d: spec.get("positive") or [] for d, spec in prompts.get("binary", {}).items() if d in DEVICES}
    positives.update({t: list(v) for t, v in (prompts.get("report_findings") or {}).items() if t in REPORT_ONLY})
    targets = report_targets(dict(rep.select("study_key", "text").iter_rows()), positives)
    vstudy = vids["study_key"].to_numpy()
    pos = np.clip(np.searchsorted(skeys, vstudy), 0, max(skeys.size - 1, 0))
    ok = skeys[pos] == vstudy if skeys.size else np.zeros(vstudy.size, bool)
    row = by_key[pos][ok]  # each clip's study's timeline row
    view = vids["view"].to_numpy().astype(str)[ok]
    patients = meta["patient_key"].to_numpy()[row]
    by_view: dict[str, dict[str, np.ndarray]] = {}
    study: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    for task, said in targets.items():
        y = np.asarray([said.get(int(s), np.nan) for s in vstudy[ok]], np.float64)
        fit = cross_fitted(cycle[ok], view, patients, y, kind="cycle") if task == "ef" and cycle is not None \
            else cross_fitted(vecs[ok], view, patients, y)
        if not np.isfinite(fit.values).any():
            continue
        name = f"{task}_probe"
        has = np.isfinite(fit.values)
        by_view[name] = {v: _mean_per_row(row, fit.values, has & (view == v), n) for v in views}
        with _quiet():
            study[name] = _mean_per_row(row, fit.values, has, n) if task == "ef" else \
                np.nanmax(np.stack(list(by_view[name].values())), axis=0)
        errors[name] = fit.mae
        if task in (*DEVICES, *REPORT_ONLY):
            stated = np.asarray([said.get(int(k), np.nan) for k in meta["study_key"]], np.float64)
            scores = np.c_[zero_shot[task], study[name]] if task in zero_shot else study[name]
            study[f"{task}_present"] = presence(scores, meta["patient_key"].to_numpy(), stated)
    return by_view, study, errors


def _mean_per_row(row: np.ndarray, values: np.ndarray, m: np.ndarray, n: int) -> np.ndarray:
    """(n,) mean of ``values[m]`` per timeline row ``row[m]``; NaN where a row has none."""
    tot, cnt = np.bincount(row[m], values[m], n), np.bincount(row[m], minlength=n)
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def _like_view(a: dict[str, np.ndarray], i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, max) over the views both studies have of 1 - cosine; NaN where they share no view."""
    d = np.stack([1.0 - np.einsum("ij,ij->i", v[i], v[j]) for v in a.values()]) if a else np.full((1, i.size), np.nan)
    with np.errstate(all="ignore"), _quiet():
        return np.nanmean(d, axis=0), np.nanmax(d, axis=0)


@contextmanager
def _quiet() -> Iterator[None]:
    """nan-aware reductions over rows without any value warn; here such a row is simply missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def raw_pair_features(T: Timeline, i: np.ndarray, j: np.ndarray) -> dict[str, np.ndarray]:
    """Unstandardised features of the pairs (study i, earlier study j): distances grow with change;
    ``*_rise`` / ``*_fall`` are the later value minus the earlier one (and its negative), like views first."""
    out: dict[str, np.ndarray] = {}
    out["study_dist"] = 1.0 - np.einsum("ij,ij->i", T.content[i], T.content[j])
    out["view_dist"], out["view_dist_max"] = _like_view(T.view_vec, i, j)
    out["id_dist"] = 1.0 - np.einsum("ij,ij->i", T.ident[i], T.ident[j])
    out["view_id_dist"], _ = _like_view(T.view_id, i, j)
    # the archive's own calibration of "same patient" (its recorded IDs), as log-odds of another heart
    p_same = T.same_heart.predict(1.0 - out["id_dist"]) if T.same_heart is not None else np.full(i.size, np.nan)
    p_other = np.clip(1.0 - p_same, 1e-3, 1 - 1e-3)
    out["id_other"] = np.log(p_other / (1 - p_other))
    # does the change last? the patient's next visit, if any, is nearer this study than the earlier one when it
    # does (a device stays, a new heart stays); a noisy acquisition is followed by a return to the old state
    pk = T.meta["patient_key"].to_numpy()
    nxt = np.minimum(i + 1, len(T) - 1)
    has = (i + 1 < len(T)) & (pk[nxt] == pk[i])
    gap = np.einsum("ij,ij->i", T.content[nxt], T.content[i]) - np.einsum("ij,ij->i", T.content[nxt], T.content[j])
    out["next_gap"] = np.where(has, gap, np.nan)
    out["has_next"] = has.astype(np.float64)
    for task in ("ef", "ef_probe", *FINDINGS, *(f"{d}_probe" for d in (*DEVICES, *REPORT_ONLY))):
        if task not in T.pred:  # a probe without labels in this archive: no evidence
            out[f"{task}_rise"] = out[f"{task}_fall"] = np.full(i.size, np.nan)
            continue
        per_view = np.stack([v[i] - v[j] for v in T.view_pred[task].values()]) if T.view_pred[task] else None
        study = T.pred[task][i] - T.pred[task][j]
        with _quiet():
            if task in ("ef", "ef_probe"):  # like views averaged; the study means where no view is shared
                d = np.nanmean(per_view, axis=0) if per_view is not None else study
            else:  # a device shows in some views only: the strongest like-view rise (or fall)
                d = np.nanmax(per_view, axis=0) if per_view is not None else study
                dn = np.nanmin(per_view, axis=0) if per_view is not None else study
        d = np.where(np.isfinite(d), d, study)
        out[f"{task}_rise"] = d
        out[f"{task}_fall"] = -(np.where(np.isfinite(dn), dn, study) if task not in ("ef", "ef_probe") else d)
    # the post-transplant state and each device's presence calibrated on the reports (a step from "not transplanted"
    # to "transplanted" is a new heart, whatever the identity vectors say; from "no clip" to "clip" a new clip), as a
    # change in log-odds: the probe's raw estimate is noisy
    for task in ("transplant", *DEVICES):
        pres = T.pred.get(f"{task}_present")
        if pres is None:
            step = np.full(i.size, np.nan)
        else:
            p = np.clip(pres, 1e-3, 1 - 1e-3)
            lo = np.log(p / (1 - p))
            step = lo[i] - lo[j]
        out[f"{task}_present_rise"] = step
        if task != "transplant":
            out[f"{task}_present_fall"] = -step
    return out


@dataclass(frozen=True)
class Scales:
    """Centre and spread of each raw feature over consecutive visits without an event (median, 1.4826 MAD):
    the null the change model's weights are in units of. The shipped model carries the null measured on its
    tuning cohorts for its encoder; an index built with another encoder estimates it from its own consecutive
    visits (most of an archive's visits are stable, so the median and MAD are close to the null's)."""

    centre: dict[str, float]
    scale: dict[str, float]

    def to_json(self) -> dict[str, dict[str, float]]:
        return {"centre": {k: round(v, 8) for k, v in self.centre.items()},
                "scale": {k: round(v, 8) for k, v in self.scale.items()}}

    @classmethod
    def from_json(cls, data: dict[str, dict[str, float]]) -> Scales:
        return cls({k: float(v) for k, v in data["centre"].items()}, {k: float(v) for k, v in data["scale"].items()})

    @classmethod
    def fit(cls, raw: dict[str, np.ndarray]) -> Scales:
        c, s = {}, {}
        for k, v in raw.items():
            med, sc = cal.robust_center_scale(v)
            floor = 1.0 if k.startswith("ef_") else 1e-3  # EF in points; vectors and scores in their units
            c[k], s[k] = (0.0 if not np.isfinite(med) else med), max(sc if np.isfinite(sc) else floor, floor)
        return cls(c, s)

    def standardise(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """(n, len(FEATURES)) z-values; a missing feature (no shared view, no prediction) is 0: no evidence.
        Distances are centred on the cohort's median; rises and falls are one-sided (max(0, change) / spread)."""
        cols = []
        for k in FEATURES:
            if k in ("has_next", "id_other"):  # already in units of their own
                z = raw[k]
            elif k.endswith(("_rise", "_fall")):  # one-sided: a rise is no evidence of a fall (and a sum of both
                z = np.maximum(raw[k], 0.0) / self.scale[k]  # says "changed either way")
            else:
                z = (raw[k] - self.centre[k]) / self.scale[k]
            cols.append(np.where(np.isfinite(z), np.clip(z, -30, 30), 0.0))
        return np.stack(cols, axis=1)


__all__ = ["BINARY_TASKS", "DEVICES", "FEATURES", "PROBE_FEATURES", "REPORT_ONLY", "Scales", "Timeline",
           "load_timeline", "raw_pair_features"]
