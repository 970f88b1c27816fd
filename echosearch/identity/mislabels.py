"""The identity audit: every study ranked by how likely its recorded patient is wrong.

For every study, the score against its recorded patient (leave-one-out, within the same heart of a transplanted
patient) is compared with the best score against any other patient found by FAISS kNN, normalised robustly
against the whole catalog; suspects are explained away round by round. See ``docs/longitudinal.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.errors import QueryError
from echosearch.identity import calibration as cal
from echosearch.identity.matching import (
    TOP_M,
    StudySet,
    candidate_patients,
    dumps,
    evidence_json,
    fit_identity_calibrations,
    knn,
    load_studies,
    own_scores,
    patient_scores,
    round4,
    study_neighbours,
    typical_scores,
)

if TYPE_CHECKING:
    from echosearch.change import HeartSplit

K0_TYPICAL = 2.0
MAX_CANDIDATES = 3


def _score_pass(S: StudySet, eligible: np.ndarray, nbr_rows: np.ndarray, pad: float,
                group: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Own, typical, best-other and robust z-scores of every study given the eligible reference studies (own and
    typical scores within ``group`` when given; other patients are always other recorded patients)."""
    n = len(S)
    own, own_p, own_v, n_ref = own_scores(S, eligible, group)
    typ = typical_scores(S, eligible, group=group)
    q, pk = candidate_patients(nbr_rows, S.patient, S.patient, eligible, MAX_CANDIDATES)
    sc, tp, tv = patient_scores(S, q, pk, eligible, pad=pad)
    best = np.full(n, np.nan)
    best_pk = np.full(n, -1, dtype=np.int64)
    best_p = np.full((n, TOP_M), -1, dtype=np.int64)
    best_v = np.full((n, TOP_M), np.nan)
    ok = np.isfinite(sc)
    if ok.any():
        q2, sc2, pk2, tp2, tv2 = q[ok], sc[ok], pk[ok], tp[ok], tv[ok]
        order = np.lexsort((-sc2, q2))
        first = order[np.r_[True, q2[order][1:] != q2[order][:-1]]]
        r = q2[first]
        best[r], best_pk[r], best_p[r], best_v[r] = sc2[first], pk2[first], tp2[first], tv2[first]
    margin = own - best
    ref = eligible & np.isfinite(own)
    strata = np.minimum(n_ref, 4)
    # Fisher transform: cosines are bounded by 1, which skews same-patient scores; atanh makes them
    # close to normal so that robust z-scores have near-nominal tails.
    f_own, f_typ, f_best = cal.fisher(own), cal.fisher(typ), cal.fisher(best)
    c0 = cal.stratified_center_scale(f_own, strata, ref)[0]
    m = np.maximum(n_ref - 1, 0).astype(np.float64)
    w = np.where(np.isfinite(typ), m / (m + K0_TYPICAL), 0.0)
    resid = f_own - (w * np.nan_to_num(f_typ) + (1 - w) * c0)
    _, s_own = cal.stratified_center_scale(resid, strata, ref)
    own_z = resid / s_own
    f_margin = f_own - f_best
    mc, ms = cal.stratified_center_scale(f_margin, strata, ref & np.isfinite(f_margin))
    margin_z = (f_margin - mc) / ms
    both = own_z + margin_z
    bc, bs = cal.stratified_center_scale(both, strata, ref & np.isfinite(both))
    suspicion = np.where(np.isfinite(both), -(both - bc) / bs, -own_z)
    return {"own": own, "own_p": own_p, "own_v": own_v, "n_ref": n_ref, "typical": typ, "best": best,
            "best_pk": best_pk, "best_p": best_p, "best_v": best_v, "margin": margin, "own_z": own_z,
            "margin_z": margin_z, "suspicion": suspicion}


def score_studies(S: StudySet, *, fpr: float = 0.01, k: int = 50, max_iter: int = 3,
                  p_same: Callable[[np.ndarray], np.ndarray] | None = None, max_p_same: float = 0.5,
                  neighbours: np.ndarray | None = None, heart: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Audit scores of every study (arrays by row), with iterative explain-away of suspects.

    A study is a suspect when its suspicion exceeds the normal quantile of ``fpr``, unless (given a
    calibration ``p_same``) the recorded patient is still plausible: calibrated probability at least
    ``max_p_same``, and not (suspicion 2 above the threshold and another patient more probable).

    Each round takes, per patient, the most suspicious suspect out of the reference sets (its scores
    are frozen as they were) and re-scores the rest, so that a mislabelled study stops dragging down its
    recorded patient's other studies or lending its look to the wrong patient.

    ``heart`` (per row: which heart of its recorded patient the study shows, 0 before a transplant, 1 after, ...):
    a study is compared with its own heart's studies only, so a transplanted patient's hearts are not each
    other's mislabels; a study alone with its heart has no own evidence (unverifiable)."""
    n = len(S)
    group = None if heart is None else np.unique(np.c_[S.patient, heart], axis=0, return_inverse=True)[1].ravel()
    z_thr = cal.z_for_fpr(fpr)
    nbr_rows = neighbours if neighbours is not None else knn(S.vecs, S.vecs, k + 1)[1]
    ni, nj = cal.between_group_pairs(S.patient, 5000, seed=1)
    pad = float(np.median(cal.pair_cosines(S.vecs, ni, nj))) if ni.size else 0.0

    def run(eligible: np.ndarray) -> dict[str, np.ndarray]:
        res = _score_pass(S, eligible, nbr_rows, pad, group)
        res["p_same"] = p_same(res["own"]) if p_same else np.full(n, np.nan)
        res["p_best_other"] = p_same(res["best"]) if p_same else np.full(n, np.nan)
        with np.errstate(invalid="ignore"):
            flag = np.nan_to_num(res["suspicion"], nan=-np.inf) > z_thr
            strong = np.nan_to_num(res["suspicion"], nan=-np.inf) > z_thr + 2
            plausible = (res["p_same"] >= max_p_same) & ~(strong & (res["p_best_other"] > res["p_same"]))
            res["suspect"] = flag & ~plausible
        return res

    eligible = np.ones(n, dtype=bool)
    res = run(eligible)
    final = {key: val.copy() for key, val in res.items()}
    frozen = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        rows = np.nonzero(eligible & res["suspect"])[0]
        if rows.size == 0:
            break
        order = np.lexsort((-res["suspicion"][rows], S.patient[rows]))
        pick = rows[order[np.r_[True, S.patient[rows][order][1:] != S.patient[rows][order][:-1]]]]
        for key, val in res.items():
            final[key][pick] = val[pick]
        frozen[pick] = True
        eligible[pick] = False
        res = run(eligible)
        for key, val in res.items():
            final[key][~frozen] = val[~frozen]
    final["z_threshold"] = np.array(z_thr)
    return final


UNCONFIRMED_HEART = ("the change scan sees a different heart from this visit on, and no later visit or report "
                     "confirms it yet: a transplant is possible as well as another patient's study")


def _reasons(r: dict[str, Any]) -> list[str]:
    """Why a study is a suspect, in words a reviewer reads (similarities as the page shows them)."""
    out = []
    own = "n/a" if r["own_score"] is None else f"{r['own_score']:.3f}"
    if r["margin_z"] is not None and r["margin_z"] < -2 and r["best_other_score"] is not None:
        word = "more closely than" if (r["margin"] or 0) < 0 else "almost as closely as"
        out.append(f"patient {r['best_other_patient']} resembles this study {word} the recorded patient "
                   f"(similarity {r['best_other_score']:.3f} against {own})")
    if r["own_z"] is not None and r["own_z"] < -2:
        out.append(f"its similarity to the recorded patient's other studies ({own}) is unusually low for "
                   "this archive")
    if r["p_same"] is not None:
        out.append(f"probability that the recorded patient is right: {r['p_same']:.2f}")
    return out


def audit(catalog: Catalog, *, fpr: float = 0.01, k: int = 50, report_unverifiable: bool = False,
          store: bool = True, max_iter: int = 3,
          vectors: Literal["auto", "identity", "content"] = "auto", hearts: bool | HeartSplit = True) -> pl.DataFrame:
    """Rank every study by how likely its recorded patient is wrong; store the result under a new run.

    ``fpr`` is the nominal share of correctly labelled studies flagged (robust normal model of the
    catalog's own scores). Patients with a single study carry no own-patient evidence: their studies are
    left out unless ``report_unverifiable`` (then listed, last, with status ``unverifiable``). ``vectors``:
    which study vectors (``auto``: identity vectors when the index has them; ``eval`` compares both). ``hearts``:
    a transplanted patient's hearts are audited apart (the change scan's confirmed new hearts, column ``heart``),
    so the studies of a new heart are not taken for another patient's; a :class:`~echosearch.change.HeartSplit`
    already computed (``change.heart_segments``, the same for every ``vectors``) is used as it is."""
    S = load_studies(catalog, vectors)
    if len(S) == 0:
        raise QueryError("this index has no study vectors: run `echosearch index` first")
    _, patient_cal = fit_identity_calibrations(catalog, S, fpr=fpr)
    heart = np.zeros(len(S), np.int64)
    lone = np.zeros(len(S), bool)  # a new heart the change scan sees here that no later visit confirms yet
    if hearts:
        from echosearch.change import heart_segments  # the change scan reads identity; imported here, not above

        split = heart_segments(catalog) if hearts is True else hearts
        heart = np.asarray([split.segment.get(int(k), 0) for k in S.keys], np.int64)
        lone = np.isin(S.keys, np.fromiter(split.unconfirmed, np.int64, len(split.unconfirmed)))
    res = score_studies(S, fpr=fpr, k=k, max_iter=max_iter, p_same=patient_cal.predict,
                        neighbours=study_neighbours(catalog, S, k + 1), heart=heart if heart.any() else None)
    z_thr = float(res["z_threshold"])
    names = dict(zip(S.meta["patient_key"].to_list(), S.meta["patient_pseudonym"].to_list(), strict=True))
    verifiable = np.isfinite(res["own"])
    status = np.where(res["suspect"], "suspect", np.where(verifiable, "ok", "unverifiable"))

    def col(x: np.ndarray) -> pl.Series:
        return pl.Series(np.asarray(x, dtype=np.float64)).fill_nan(None)

    df = pl.DataFrame({
        "study_key": S.keys, "study_uid": S.meta["study_uid"], "study_date": S.meta["study_date"],
        "recorded_patient_key": S.patient, "recorded_patient": S.meta["patient_pseudonym"], "heart": heart,
        "n_refs": res["n_ref"].astype(np.int64), "own_score": col(res["own"]), "typical_score": col(res["typical"]),
        "own_z": col(res["own_z"]),
        "best_other_patient_key": pl.Series([int(p) if p >= 0 else None for p in res["best_pk"]], dtype=pl.Int64),
        "best_other_patient": [names.get(int(p)) if p >= 0 else None for p in res["best_pk"]],
        "best_other_score": col(res["best"]), "margin": col(res["margin"]), "margin_z": col(res["margin_z"]),
        "p_same": col(res["p_same"]), "p_best_other": col(res["p_best_other"]),
        "suspicion": col(res["suspicion"]), "suspect": res["suspect"], "status": status,
    })
    evidence = []
    for i, r in enumerate(df.select("margin", "margin_z", "own_z", "best_other_patient", "p_same", "own_score",
                                          "best_other_score").iter_rows(named=True)):
        evidence.append(dumps({
            "own_patient_studies": evidence_json(S.keys, res["own_p"][i], res["own_v"][i]),
            "best_other_studies": evidence_json(S.keys, res["best_p"][i], res["best_v"][i]),
            "typical": None if not np.isfinite(res["typical"][i]) else round(float(res["typical"][i]), 4),
            "heart": int(heart[i]),  # 0: the patient's first heart; 1, 2: after a confirmed new heart (transplant)
            "reasons": (_reasons(r) + ([UNCONFIRMED_HEART] if lone[i] else [])) if res["suspect"][i] else [],
            "new_heart_unconfirmed": bool(lone[i]),
        }))
    group = np.where(res["suspect"], 0, np.where(verifiable, 1, 2))
    key2 = np.where(group == 2, -np.nan_to_num(res["best"], nan=-9.0), -np.nan_to_num(res["suspicion"], nan=-9e9))
    order = np.lexsort((S.keys, key2, group))
    df = df.with_columns(pl.Series("evidence", evidence))[order]
    if not report_unverifiable:
        df = df.filter(pl.col("status") != "unverifiable")
    df = df.with_row_index("rank", offset=1).with_columns(pl.col("rank").cast(pl.Int32))
    run_id = None
    if store and not catalog.read_only:
        run_id = catalog.new_run("audit", {"fpr": fpr, "k": k, "report_unverifiable": report_unverifiable,
                                           "z_threshold": z_thr, "max_iter": max_iter, "vectors": S.source,
                                           "hearts": bool(hearts), "studies_after_a_new_heart": int((heart > 0).sum()),
                                           "calibration_auc": round4(patient_cal.auc)})
        cols = ["run_id", "study_key", "recorded_patient_key", "own_score", "best_other_patient_key",
                "best_other_score", "margin", "p_same", "suspect", "rank", "evidence"]
        catalog.insert_frame("identity_audit", df.with_columns(pl.lit(run_id, pl.Int64).alias("run_id")), cols)
    return df.with_columns(pl.lit(run_id, pl.Int64).alias("run_id"))
