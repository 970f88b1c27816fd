"""Identity evaluation against ground truth: cross-visit pairs, the audit at both levels, and its projection.

Every identity figure here uses the TRUE patient of the truth table and pairs of *different* studies only
(a study is one visit), so that no same-study pair (two clips of one visit, nearly identical) inflates it.
On one fixed set of study pairs three scorings are compared:

- ``identity_vectors``: cosine of the two studies' identity vectors (the index's ``identity_model``);
- ``content_vectors``: cosine of their content (search) vectors;
- ``echoclip_single_pair``: EchoCLIP's protocol, the cosine of one clip of each study (content vectors;
  one clip per study drawn by seed; the paper's AUC 0.86 also counted same-study pairs).

Where the truth knows which heart each study shows (``heart_id``: a transplant gives a patient a second one),
the same scorings are also reported on the same-heart pairs only (``same_heart``: the pairs across a transplant
left out, every other pair kept) and on the pairs across a transplant alone (``across_transplant``): the
images of a donor heart carry none of the recipient's identity, so those pairs sit near chance for any image
encoder, and the all-pairs figure mixes that fact with how well the encoder tells hearts apart.

Intervals are 95 % percentile bootstraps over patients (patients drawn with replacement; a pair counts as
often as its patients were drawn), paired across the three scorings, so the difference has one too.

The audit is run on identity and on content vectors; its suspicion scores of truly mislabelled and of
correctly labelled studies give the projection to a prevalence the user names (:func:`project_audit`;
``bench/identity_sensitivity.py`` uses the same function on simulated archives).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.identity import StudySet, audit, load_studies, own_scores, patient_scores
from echosearch.identity import calibration as cal

DEFAULT_PREVALENCE = 1 / 1000
TARGET_PRECISION = 0.9
N_BOOT = 300


def _f(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def _codes(values: pl.Series) -> np.ndarray:
    return values.cast(pl.String).cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)


# ---- AUC with a patient bootstrap ------------------------------------------------------------------
def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """AUC of ``scores`` (positives: ``labels``) with per-item weights; ties count one half."""
    w_pos, w_neg = weights * labels, weights * ~labels
    if w_pos.sum() <= 0 or w_neg.sum() <= 0:
        return float("nan")
    uniq, inv = np.unique(scores, return_inverse=True)
    pos_at = np.bincount(inv, weights=w_pos, minlength=uniq.size)
    neg_at = np.bincount(inv, weights=w_neg, minlength=uniq.size)
    below = np.cumsum(neg_at) - neg_at
    return float((pos_at * (below + 0.5 * neg_at)).sum() / (w_pos.sum() * w_neg.sum()))


def bootstrap_aucs(scores: dict[str, np.ndarray], labels: np.ndarray, pa: np.ndarray, pb: np.ndarray,
                   n_patients: int, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, dict[str, Any]]:
    """AUC and 95 % patient-bootstrap interval of each scoring on the same pairs (patients ``pa``, ``pb``
    coded 0..n_patients-1), plus each scoring's difference to the first one."""
    names = list(scores)
    point = {n: weighted_auc(s, labels, np.ones(labels.size)) for n, s in scores.items()}
    rng = np.random.default_rng(seed)
    boots = {n: np.empty(n_boot) for n in names}
    for b in range(n_boot):
        m = np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients).astype(np.float64)
        w = np.where(pa == pb, m[pa], m[pa] * m[pb])
        for n in names:
            boots[n][b] = weighted_auc(scores[n], labels, w)
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        lo, hi = np.nanpercentile(boots[n], [2.5, 97.5])
        out[n] = {"auc": _f(point[n]), "ci95": [_f(lo), _f(hi)]}
        if n != names[0]:
            d = boots[n] - boots[names[0]]
            dlo, dhi = np.nanpercentile(d, [2.5, 97.5])
            out[n][f"minus_{names[0]}"] = {"diff": _f(point[n] - point[names[0]]), "ci95": [_f(dlo), _f(dhi)]}
    return out


# ---- cross-visit identity --------------------------------------------------------------------------
def cross_visit_pairs(patient: np.ndarray, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, same patient) over rows that are studies: every (or ``max_pairs`` sampled) pair of different
    studies of one patient, and as many random pairs of studies of different patients."""
    i, j = cal.within_group_pairs(patient, max_pairs=max_pairs, seed=seed)
    ni, nj = cal.between_group_pairs(patient, max(max_pairs, 1), seed=seed + 1)
    y = np.r_[np.ones(i.size, bool), np.zeros(ni.size, bool)]
    return np.r_[i, ni].astype(np.int64), np.r_[j, nj].astype(np.int64), y


def _single_clip(catalog: Catalog, study_keys: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One content video vector per study (drawn by seed), and whether each study has one."""
    ids, vecs = catalog.embeddings("video")
    owner = catalog.video_studies().select("video_key", "study_key")
    owner = owner.filter(pl.col("video_key").is_in(ids.tolist()))
    pick = (owner.with_columns(pl.lit(np.random.default_rng(seed).random(owner.height)).alias("_r"))
            .sort("_r").unique("study_key", keep="first").sort("study_key"))
    by_study = dict(zip(pick["study_key"].to_list(), pick["video_key"].to_list(), strict=True))
    out = np.zeros((study_keys.size, vecs.shape[1]), np.float32)
    has = np.zeros(study_keys.size, bool)
    for r, k in enumerate(study_keys.tolist()):
        v = by_study.get(int(k))
        if v is not None:
            out[r], has[r] = vecs[int(np.searchsorted(ids, v))], True
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out, has


def _patient_auc(T: StudySet, seed: int) -> float | None:
    """Pooled score (study vs its true patient's other studies, top-2 mean) against a random other patient."""
    everyone = np.ones(len(T), dtype=bool)
    own, _, _, n_ref = own_scores(T, everyone)
    q = np.nonzero(n_ref > 0)[0]
    uniq = np.unique(T.patient)
    if uniq.size < 2 or q.size == 0:
        return None
    other = uniq[np.random.default_rng(seed + 2).integers(0, uniq.size, size=q.size)]
    ok = other != T.patient[q]
    neg, _, _ = patient_scores(T, q[ok], other[ok], everyone)
    return _f(cal.auc(own[q], neg))


def _top1(T: StudySet, q_all: np.ndarray, chunk: int = 512) -> float | None:
    """Share of query rows whose best patient is their own: every patient scored by the top-2 mean of the query's
    cosines to that patient's studies (the query itself left out; a one-study patient by its one cosine)."""
    if q_all.size == 0:
        return None
    order, uniq, starts, counts = cal.group_offsets(T.patient)
    hits = 0
    for s in range(0, q_all.size, chunk):
        q = q_all[s:s + chunk]
        C = (T.vecs[q] @ T.vecs.T).astype(np.float64)
        C[np.arange(q.size), q] = -np.inf
        best = np.full((q.size, uniq.size), -np.inf)
        for g in range(uniq.size):
            sub = C[:, order[starts[g]:starts[g] + counts[g]]]
            if sub.shape[1] == 1:
                best[:, g] = sub[:, 0]
                continue
            top = -np.partition(-sub, 1, axis=1)[:, :2]
            best[:, g] = np.where(np.isfinite(top).all(axis=1), top.mean(axis=1), top.max(axis=1))
        hits += int((uniq[np.argmax(best, axis=1)] == T.patient[q]).sum())
    return _f(hits / q_all.size)


def reidentification(T: StudySet, heart: np.ndarray | None = None) -> dict[str, Any]:
    """Re-identification as ``echosearch match`` does it, against the truth: each study whose true patient has two
    or more other studies, ranked against every true patient (``T.patient``: truth codes) by the top-2 mean; top-1
    is the share ranked first. ``heart`` (truth codes per row): also on the studies whose patient has two or more
    other studies of the same heart (a first post-transplant study has none: no image can re-identify it)."""
    cnt = np.bincount(T.patient)
    q = np.nonzero(cnt[T.patient] >= 3)[0]
    out: dict[str, Any] = {"top1": _top1(T, q), "n_queries": int(q.size)}
    if heart is not None:
        same = np.unique(np.c_[T.patient, heart], axis=0, return_inverse=True)[1].ravel()
        qh = np.nonzero(np.bincount(same)[same] >= 3)[0]
        out.update({"same_heart_top1": _top1(T, qh), "n_same_heart_queries": int(qh.size)})
    return out


def identity_metrics(catalog: Catalog, st: pl.DataFrame, max_pairs: int = 20000, seed: int = 0,
                     n_boot: int = N_BOOT) -> dict[str, Any]:
    """Cross-visit study-pair AUCs of identity vectors, content vectors and EchoCLIP's single clip pair on
    the same pairs (with patient-bootstrap intervals), and the audit level's pooled study-vs-patient AUC.

    ``study_pair_auc`` / ``study_patient_auc`` are those of the vectors the audit reads (identity vectors
    when the index has them)."""
    levels: dict[str, StudySet] = {"content_vectors": load_studies(catalog, "content")}
    if catalog.has_identity():
        levels = {"identity_vectors": load_studies(catalog, "identity"), **levels}
    shared = functools.reduce(np.intersect1d, [S.keys for S in levels.values()])
    common = st.filter(pl.col("study_key").is_in(shared.tolist()))
    keys = common["study_key"].to_numpy().astype(np.int64)
    patient = _codes(common["true_patient_id"])
    clip, has_clip = _single_clip(catalog, keys, seed)
    i, j, y = cross_visit_pairs(patient, max_pairs, seed)
    scores: dict[str, np.ndarray] = {}
    studies: dict[str, StudySet] = {}
    for name, S in levels.items():
        T = StudySet(keys, S.vecs[np.searchsorted(S.keys, keys)], patient, common, S.source)
        studies[name] = T
        scores[name] = cal.pair_cosines(T.vecs, i, j)
    if has_clip.all():
        scores["echoclip_single_pair"] = cal.pair_cosines(clip, i, j)
    n_pat = int(patient.max(initial=-1)) + 1
    pairs = bootstrap_aucs(scores, y, patient[i], patient[j], n_pat, n_boot, seed)
    has_heart = "heart_id" in common.columns and common["heart_id"].null_count() < common.height
    heart = _codes(common["heart_id"].fill_null("?")) if has_heart else None
    by_heart = _by_heart(heart, scores, i, j, y, patient, n_pat, n_boot, seed) if heart is not None else {}
    audited = "identity_vectors" if "identity_vectors" in levels else "content_vectors"
    return {
        "vectors": audited.removesuffix("_vectors"),
        "study_pair_auc": pairs[audited]["auc"],
        "study_patient_auc": _patient_auc(studies[audited], seed),
        "content_study_patient_auc": _patient_auc(studies["content_vectors"], seed),
        "reidentification": {name: reidentification(T, heart) for name, T in studies.items()},
        "cross_visit": {"n_same_patient_pairs": int(y.sum()), "n_other_patient_pairs": int((~y).sum()),
                        "n_studies": int(keys.size), "n_patients": int(np.unique(patient).size),
                        "bootstrap": f"{n_boot} patient resamples", **pairs, **by_heart},
    }


def _by_heart(heart: np.ndarray, scores: dict[str, np.ndarray], i: np.ndarray, j: np.ndarray, y: np.ndarray,
              patient: np.ndarray, n_pat: int, n_boot: int, seed: int) -> dict[str, Any]:
    """The cross-visit AUCs on same-heart pairs (pairs across a transplant left out) and across a transplant
    alone, same negatives (``heart``: the truth's heart of each study, as codes); nothing when no pair crosses a
    transplant."""
    across = y & (heart[i] != heart[j])
    if not across.any():
        return {}
    out: dict[str, Any] = {"n_pairs_across_transplant": int(across.sum())}
    for name, keep in (("same_heart", ~across), ("across_transplant", ~y | across)):
        out[name] = bootstrap_aucs({k: v[keep] for k, v in scores.items()}, y[keep], patient[i][keep],
                                   patient[j][keep], n_pat, n_boot, seed)
    return out


def video_pairs(catalog: Catalog, vt: pl.DataFrame, max_pairs: int, seed: int) -> dict[str, Any]:
    """EchoCLIP's protocol over all clip pairs: content vectors of single clips, same true patient from
    different studies against different patients (``same_view_pair_auc``: both clips of one view)."""
    ids, vecs = catalog.embeddings("video", vt["video_key"].to_list())
    t = vt.filter(pl.col("video_key").is_in(ids.tolist())).sort("video_key")
    v = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    pid = _codes(t["true_patient_id"])
    study = t["study_key"].to_numpy()
    i, j = cal.within_group_pairs(pid)
    keep = study[i] != study[j]
    i, j = i[keep], j[keep]
    if i.size > max_pairs:
        pick = np.random.default_rng(seed).choice(i.size, max_pairs, replace=False)
        i, j = i[pick], j[pick]
    ni, nj = cal.between_group_pairs(pid, max_pairs, seed=seed + 1)
    pos, neg = cal.pair_cosines(v, i, j), cal.pair_cosines(v, ni, nj)
    out = {"video_pair_identity_auc": _f(cal.auc(pos, neg)), "n_pairs": int(i.size)}
    if "view" in t.columns:
        view = t["view"].cast(pl.String).fill_null("").to_numpy()
        out["same_view_pair_auc"] = _f(cal.auc(pos[view[i] == view[j]], neg[view[ni] == view[nj]]))
    return out


# ---- the audit -------------------------------------------------------------------------------------
def _normal_sf(z: np.ndarray) -> np.ndarray:
    return np.array([0.5 * math.erfc(float(v) / math.sqrt(2)) for v in np.ravel(z)]).reshape(np.shape(z))


def project_audit(pos: np.ndarray, neg: np.ndarray, prevalence: float, threshold: float,
                  target_precision: float = TARGET_PRECISION) -> dict[str, Any]:
    """What the audit would do at ``prevalence`` mislabels, from suspicion scores of mislabelled (``pos``)
    and correctly labelled (``neg``) studies.

    Recall at a threshold is the share of ``pos`` above it. The false-positive rate is the larger of the
    empirical one and a normal tail fitted robustly to ``neg`` (suspicion is a robust z-score), because a
    few hundred correct studies cannot measure the 1e-4 rates a rare mislabel needs; the projection is no
    better than that tail model. Precision follows from Bayes at the prevalence."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    out: dict[str, Any] = {"prevalence": prevalence, "n_mislabelled": int(pos.size), "n_correct": int(neg.size)}
    if pos.size == 0 or neg.size < 10:
        return {**out, "skipped": "too few scored studies"}
    c, s = cal.robust_center_scale(neg)

    def rates(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tpr = (pos[None, :] > t[:, None]).mean(1)
        fpr = np.maximum((neg[None, :] > t[:, None]).mean(1), _normal_sf((t - c) / s))
        return tpr, fpr

    def precision(tpr: np.ndarray, fpr: np.ndarray) -> np.ndarray:
        tp, fp = prevalence * tpr, (1 - prevalence) * fpr
        return np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 1.0)

    tpr0, fpr0 = rates(np.array([threshold]))
    p0 = float(precision(tpr0, fpr0)[0])
    cand = np.unique(np.r_[pos - 1e-9, threshold])
    tpr, fpr = rates(cand)
    prec = precision(tpr, fpr)
    ok = prec >= target_precision
    best = int(np.argmax(np.where(ok, tpr, -1))) if ok.any() else None
    return {**out, "threshold": _f(threshold), "precision": _f(p0), "recall": _f(float(tpr0[0])),
            "false_positive_rate": float(fpr0[0]),
            "reviews_per_true_mislabel": _f(1 / p0) if p0 > 0 and tpr0[0] > 0 else None,
            f"recall_at_precision_{target_precision}": _f(float(tpr[best])) if best is not None else 0.0,
            f"reviews_per_true_mislabel_at_precision_{target_precision}":
                _f(1 / float(prec[best])) if best is not None and tpr[best] > 0 else None,
            "flags_per_1000_studies": _f(1000 * (prevalence * tpr0[0] + (1 - prevalence) * fpr0[0]))}


def audit_scores(a: pl.DataFrame, y: np.ndarray) -> dict[str, Any]:
    """Measured precision / recall of an audit frame against truth ``y`` (rows aligned)."""
    flag = a["suspect"].to_numpy().astype(bool)
    s = a["suspicion"].fill_null(-np.inf).to_numpy()
    order = np.argsort(-s, kind="stable")
    hits = y[order]
    prec = np.cumsum(hits) / np.arange(1, hits.size + 1)
    rec = np.cumsum(hits) / max(int(y.sum()), 1)
    tp = int((flag & y).sum())
    unver = (a["status"] == "unverifiable").to_numpy()
    return {"n_studies": int(y.size), "n_mislabelled": int(y.sum()), "n_flagged": int(flag.sum()),
            "precision": _f(tp / flag.sum()) if flag.sum() else None,
            "recall": _f(tp / y.sum()) if y.sum() else None,
            "suspicion_auc": _f(cal.auc(s[y & np.isfinite(s)], s[~y & np.isfinite(s)])),
            "recall_at_precision_0.9": _f(float(rec[prec >= 0.9].max())) if (prec >= 0.9).any() else 0.0,
            "average_precision": _f(float((prec * hits).sum() / max(int(y.sum()), 1))),
            "mislabelled_unverifiable": int((y & unver).sum())}


def audit_metrics(catalog: Catalog, st: pl.DataFrame, prevalence: float = DEFAULT_PREVALENCE,
                  fpr: float = 0.01) -> dict[str, Any]:
    """The audit against the truth's ``mislabelled`` studies, on the vectors it reads by default (top-level
    keys) and on each level separately (``by_vectors``), each with its projection to ``prevalence``."""
    if "mislabelled" not in st.columns:
        return {"skipped": "truth has no mislabelled column"}
    from echosearch.change import heart_segments

    kinds: list[Literal["identity", "content"]] = ["identity", "content"] if catalog.has_identity() else ["content"]
    hearts = heart_segments(catalog)  # one change scan for both levels
    by: dict[str, Any] = {}
    for kind in kinds:
        a = audit(catalog, store=False, report_unverifiable=True, vectors=kind, fpr=fpr, hearts=hearts).join(
            st.select("study_key", "mislabelled"), on="study_key", how="inner")
        y = a["mislabelled"].fill_null(False).to_numpy().astype(bool)
        s = a["suspicion"].fill_null(np.nan).to_numpy()
        by[kind] = {**audit_scores(a, y),
                    "projection": project_audit(s[y], s[~y], prevalence, float(cal.z_for_fpr(fpr)))}
    return {**by[kinds[0]], "vectors": kinds[0], "by_vectors": by}


# ---- presentation ----------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _auc_ci(d: dict[str, Any] | None) -> str:
    if not d or d.get("auc") is None:
        return ""
    lo, hi = d.get("ci95") or [None, None]
    return f"{_fmt(d['auc'])} [{_fmt(lo)}-{_fmt(hi)}]"


def identity_rows(es: dict[str, Any], ec: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (measure, echosearch, EchoCLIP protocol on the same vectors, paper) for ``format_table``."""
    ident, rows = es["identity"], []
    cv = ident.get("cross_visit", {})
    label = {"identity_vectors": "identity vectors", "content_vectors": "content vectors"}
    single = _auc_ci(cv.get("echoclip_single_pair"))
    for name, text in label.items():
        if name in cv:
            rows.append((f"cross-visit study-pair AUC, {text} [95% CI]", _auc_ci(cv[name]),
                         f"{single} (one clip each)" if single else "", "0.86 (incl. same-study pairs)"))
            single = ""
            for part, what in (("same_heart", "same heart"), ("across_transplant", "across a transplant")):
                if name in cv.get(part, {}):
                    note = (f"{cv['n_pairs_across_transplant']} same-patient pairs (donor heart)"
                            if part == "across_transplant" else "")
                    rows.append((f"  {what} only, {text}", _auc_ci(cv[part][name]), note, ""))
    for name, r in (ident.get("reidentification") or {}).items():
        same = f"{_fmt(r.get('same_heart_top1'))} on {r['n_same_heart_queries']} same-heart" \
            if "same_heart_top1" in r else ""
        rows.append((f"re-identification top-1, {label.get(name, name)}", _fmt(r["top1"]),
                     f"{r['n_queries']} studies; {same}".rstrip("; "), ""))
    rows.append(("same patient AUC (study vs patient's other studies)", _fmt(ident.get("study_patient_auc")),
                 f"{_fmt(ec.get('video_pair_identity_auc'))} (all clip pairs)", ""))
    au = es["audit"]
    if "skipped" not in au:
        for kind, a in au.get("by_vectors", {kind: au for kind in [au.get("vectors", "")]}).items():
            rows.append((f"audit on {kind} vectors: precision / recall", f"{_fmt(a['precision'])} / "
                         f"{_fmt(a['recall'])}", f"{a['n_flagged']} flagged, {a['n_mislabelled']} mislabelled", ""))
            rows.append((f"audit on {kind} vectors: recall at precision 0.9", _fmt(a["recall_at_precision_0.9"]),
                         "", ""))
            pr = a.get("projection", {})
            if "precision" in pr:
                rows.append((f"  projected at 1 in {round(1 / pr['prevalence']):,} mislabelled: precision / "
                             "recall", f"{_fmt(pr['precision'])} / {_fmt(pr['recall'])}",
                             f"{_fmt(pr['reviews_per_true_mislabel'])} reviews per true mislabel", ""))
    return rows


def levels_frame(ident: dict[str, Any], aud: dict[str, Any]) -> pl.DataFrame:
    """One row per level (identity vectors, content vectors): cross-visit AUC with its interval and the
    audit's precision, recall and recall at precision 0.9 (what ``make demo`` prints)."""
    cv = ident.get("cross_visit", {})
    rows = []
    for kind in ("identity", "content"):
        pair, a = cv.get(f"{kind}_vectors"), (aud.get("by_vectors") or {}).get(kind)
        if pair is None and a is None:
            continue
        lo, hi = (pair or {}).get("ci95") or [None, None]
        same = (cv.get("same_heart") or {}).get(f"{kind}_vectors") or {}
        rows.append({"vectors": kind, "pair AUC": (pair or {}).get("auc"),
                     "95% CI": f"{_fmt(lo)}-{_fmt(hi)}" if lo is not None else "",
                     **({"same-heart AUC": same.get("auc")} if "same_heart" in cv else {}),
                     "re-id top-1": ((ident.get("reidentification") or {}).get(f"{kind}_vectors") or {}).get("top1"),
                     "precision": (a or {}).get("precision"), "recall": (a or {}).get("recall"),
                     "recall@P0.9": (a or {}).get("recall_at_precision_0.9"),
                     "flagged": (a or {}).get("n_flagged"), "mislabelled": (a or {}).get("n_mislabelled")})
    return pl.DataFrame(rows)
