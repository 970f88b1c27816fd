"""Patient identity from study vectors: same-patient matching, calibrated probabilities, and the identity audit.

A study vector (mean of its video vectors, L2-normalised) carries who the patient is. The score of a
study against a patient is the mean of its top-2 cosines to that patient's *other* studies (robust to one
odd study in the set, less noisy than a single pair). The audit compares, for every study, the score
against its recorded patient (leave-one-out) with the best score against any other patient found by
FAISS kNN, normalised robustly against the whole catalog. See ``docs/longitudinal.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.errors import EchosearchError, QueryError
from echosearch.identity import calibration as cal

TOP_M = 2
EXACT_KNN_MAX = 50_000
PAIR_CAL = "identity.study_pair"
PATIENT_CAL = "identity.study_patient"


@dataclass
class StudySet:
    """Study vectors with their recorded patients, rows ordered by study key."""

    keys: np.ndarray
    vecs: np.ndarray
    patient: np.ndarray
    meta: pl.DataFrame
    source: str = "content"  # "identity": the index's identity vectors; "content": the content (search) vectors

    def __len__(self) -> int:
        return int(self.keys.size)

    def row(self, study_key: int) -> int:
        i = int(np.searchsorted(self.keys, study_key))
        if i >= self.keys.size or self.keys[i] != study_key:
            raise QueryError(f"study {study_key} has no study vector in this index")
        return i


def study_level(catalog: Catalog, vectors: Literal["auto", "identity", "content"] = "auto") -> str:
    """The catalog level identity reads: ``study_identity`` when the index has identity vectors (``auto``),
    else ``study`` (the content vectors)."""
    if vectors == "content":
        return "study"
    if catalog.has_identity():
        return "study_identity"
    if vectors == "identity":
        raise QueryError("this index has no identity vectors (built without an identity model)")
    return "study"


def load_studies(catalog: Catalog, vectors: Literal["auto", "identity", "content"] = "auto") -> StudySet:
    """Every study that has a vector, with recorded patient, date and UID (vectors re-normalised).

    ``auto``: the identity vectors when the index has them, else the content vectors."""
    level = study_level(catalog, vectors)
    ids, vecs = catalog.embeddings(level)
    meta = catalog.study_patients()
    meta = pl.DataFrame({"study_key": ids}, schema={"study_key": pl.Int64}).join(meta, on="study_key", how="inner")
    keep = np.isin(ids, meta["study_key"].to_numpy())
    ids, vecs = ids[keep], vecs[keep]
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = np.ascontiguousarray(vecs / np.maximum(norms, 1e-12), dtype=np.float32)
    return StudySet(ids, vecs, meta["patient_key"].to_numpy().astype(np.int64), meta,
                    "identity" if level == "study_identity" else "content")


# ---- scoring kernels -------------------------------------------------------------------------------
def expand_to_patients(queries: np.ndarray, patients: np.ndarray, patient_of: np.ndarray,
                       eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (query row, patient key) pair k: rows (pair index, study row) over that patient's eligible studies."""
    rows = np.nonzero(eligible)[0]
    if rows.size == 0 or patients.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order, uniq, starts, counts = cal.group_offsets(patient_of[rows])
    pos = np.clip(np.searchsorted(uniq, patients), 0, uniq.size - 1)
    rep = np.where(uniq[pos] == patients, counts[pos], 0)
    total = int(rep.sum())
    pair = np.repeat(np.arange(queries.size), rep)
    offs = np.arange(total) - np.repeat(np.cumsum(rep) - rep, rep)
    study = rows[order[np.repeat(starts[pos], rep) + offs]]
    return pair, study


def own_scores(S: StudySet, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out score of every study against its recorded patient's eligible other studies.

    Returns (own score, top partner rows (N, 2), their cosines, number of reference studies)."""
    i, j = cal.within_group_pairs(S.patient, ordered=True)
    keep = eligible[j]
    i, j = i[keep], j[keep]
    c = cal.pair_cosines(S.vecs, i, j)
    own, top_p, top_v = cal.group_topm(i, c, j, len(S))
    n_ref = np.bincount(i, minlength=len(S))
    return own, top_p, top_v, n_ref


def typical_scores(S: StudySet, eligible: np.ndarray, full_above: int = 40) -> np.ndarray:
    """Per study s: the median, over the other reference studies o of its patient, of o's own score
    computed without s (the patient's typical within-patient similarity, leave-s-out); NaN if < 2 refs."""
    out = np.full(len(S), np.nan)
    order, _, starts, counts = cal.group_offsets(S.patient)
    for n in np.unique(counts):
        if n < 3:
            continue
        sel = np.nonzero(counts == n)[0]
        idx = order[starts[sel][:, None] + np.arange(n)[None, :]]
        ok = eligible[idx]
        v = S.vecs[idx]
        G = np.einsum("pid,pjd->pij", v, v).astype(np.float64)
        G[:, np.arange(n), np.arange(n)] = -np.inf
        G[~np.broadcast_to(ok[:, None, :], G.shape)] = -np.inf
        if n > full_above:
            typ = cal.row_topm_mean(G)
            typ[~ok] = np.nan
            out[idx] = cal.nanmedian_rows(typ)[:, None]
            continue
        for s in range(n):
            Gs = G.copy()
            Gs[:, :, s] = -np.inf
            typ = cal.row_topm_mean(Gs)
            typ[:, s] = np.nan
            typ[~ok] = np.nan
            valid = np.isfinite(typ)
            enough = valid.sum(axis=1) >= 2
            out[idx[:, s]] = np.where(enough, cal.nanmedian_rows(typ), np.nan)
    return out


def knn(vecs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN (``faiss.IndexFlatIP``): (similarities, rows) of shape (n_queries, k)."""
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, vecs.shape[0]))


def study_neighbours(catalog: Catalog, S: StudySet, k: int) -> np.ndarray:
    """Rows of the ``k`` nearest studies of every study (-1 where none).

    Exact FAISS search up to ``EXACT_KNN_MAX`` studies; above, the index's own study-level vector index
    (``echosearch.store.vectorindex``, tuned to a recall target, on the GPU when there is one) when it is
    current, else exact search. Candidates are re-scored exactly against all their studies anyway."""
    if len(S) > EXACT_KNN_MAX:
        try:
            from echosearch.store.vectorindex import load_index

            level = "study_identity" if S.source == "identity" else "study"
            _, ids = load_index(catalog.index_dir, level, catalog).search(S.vecs, k)
            rows = np.clip(np.searchsorted(S.keys, ids), 0, len(S) - 1)
            return np.where(S.keys[rows] == ids, rows, -1)
        except (ImportError, EchosearchError):
            pass
    return knn(S.vecs, S.vecs, k)[1]


def candidate_patients(nbr_rows: np.ndarray, patient_of: np.ndarray, exclude_patient: np.ndarray,
                       eligible: np.ndarray, max_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """(query row, patient key) of the first ``max_candidates`` distinct other patients in each neighbour list."""
    valid = nbr_rows >= 0
    safe = np.where(valid, nbr_rows, 0)
    pk = patient_of[safe]
    valid &= eligible[safe] & (pk != exclude_patient[:, None])
    pk = np.where(valid, pk, np.iinfo(np.int64).min)
    order = np.argsort(pk, axis=1, kind="stable")
    sp = np.take_along_axis(pk, order, axis=1)
    first_sorted = np.ones_like(sp, dtype=bool)
    first_sorted[:, 1:] = sp[:, 1:] != sp[:, :-1]
    is_first = np.empty_like(first_sorted)
    np.put_along_axis(is_first, order, first_sorted, axis=1)
    is_first &= valid
    take = is_first & (np.cumsum(is_first, axis=1) <= max_candidates)
    q, col = np.nonzero(take)
    return q, pk[q, col]


def patient_scores(S: StudySet, q: np.ndarray, patients: np.ndarray, eligible: np.ndarray,
                   pad: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-2 mean of each query row ``q[k]`` against patient ``patients[k]``'s eligible studies.

    With ``pad``, a patient with fewer than 2 studies has the missing cosines counted as ``pad`` (a
    typical different-patient cosine): one look-alike study is weaker evidence than two."""
    pair, study = expand_to_patients(q, patients, S.patient, eligible)
    c = cal.pair_cosines(S.vecs, q[pair], study)
    agg, top_p, top_v = cal.group_topm(pair, c, study, q.size)
    if pad is not None:
        have = np.isfinite(top_v).sum(axis=1)
        short = (have > 0) & (have < TOP_M)
        agg[short] = (agg[short] * have[short] + pad * (TOP_M - have[short])) / TOP_M
    return agg, top_p, top_v


# ---- calibration -----------------------------------------------------------------------------------
def fit_identity_calibrations(catalog: Catalog, S: StudySet | None = None, *, fpr: float = 0.01,
                              max_pairs: int = 20000, seed: int = 0,
                              refit: bool = False) -> tuple[cal.Calibration, cal.Calibration]:
    """(study-pair calibration, study-to-patient calibration), reused from the catalog when current.

    Positives: same recorded patient; negatives: different recorded patients (a few mislabels only
    blur the positives slightly). Pairs are sampled with ``seed`` and at most ``max_pairs`` of each kind.
    """
    gen = catalog.generation()
    n_studies, pair_hash = catalog.study_patient_fingerprint()
    source = S.source if S is not None else ("identity" if study_level(catalog) == "study_identity" else "content")
    # patients can be relabelled without new vectors; identity and content vectors calibrate apart
    fingerprint = f"{n_studies}:{pair_hash}" + ("" if source == "content" else f":{source}")
    if not refit:
        a, b = cal.load(catalog, PAIR_CAL, gen), cal.load(catalog, PATIENT_CAL, gen)
        if a is not None and b is not None and a.extra.get("fingerprint") == b.extra.get("fingerprint") == fingerprint:
            return a, b
    S = S if S is not None else load_studies(catalog)
    params = {"max_pairs": max_pairs, "seed": seed, "aggregate": f"mean of top-{TOP_M} cosines",
              "fingerprint": fingerprint}
    i, j = cal.within_group_pairs(S.patient, max_pairs=max_pairs, seed=seed)
    ni, nj = cal.between_group_pairs(S.patient, max_pairs, seed=seed + 1)
    pair = cal.fit_calibration(PAIR_CAL, cal.pair_cosines(S.vecs, i, j), cal.pair_cosines(S.vecs, ni, nj),
                               fpr=fpr, generation=gen, extra=params)
    patient = fit_patient_calibration(S, fpr=fpr, max_pairs=max_pairs, seed=seed, generation=gen, extra=params)
    cal.save(catalog, pair)
    cal.save(catalog, patient)
    return pair, patient


def fit_patient_calibration(S: StudySet, *, fpr: float = 0.01, max_pairs: int = 20000, seed: int = 0,
                            generation: int = 0, extra: dict[str, Any] | None = None) -> cal.Calibration:
    """Study-to-patient calibration of a study set: a study's top-2 score against its recorded patient's
    other studies (positives) against its score for a random other patient (negatives)."""
    everyone = np.ones(len(S), dtype=bool)
    own, _, _, n_ref = own_scores(S, everyone)
    pos = own[n_ref > 0]
    if pos.size > max_pairs:
        pos = np.random.default_rng(seed).choice(pos, max_pairs, replace=False)
    rng = np.random.default_rng(seed + 2)
    uniq = np.unique(S.patient)
    neg = np.zeros(0)
    if uniq.size > 1 and len(S):
        q = rng.integers(0, len(S), size=min(max_pairs, 4 * len(S)))
        other = uniq[rng.integers(0, uniq.size, size=q.size)]
        ok = other != S.patient[q]
        neg, _, _ = patient_scores(S, q[ok], other[ok], everyone)
    return cal.fit_calibration(PATIENT_CAL, pos, neg, fpr=fpr, generation=generation, extra=extra)


def same_patient_probability(catalog: Catalog, study_key_a: int, study_key_b: int) -> float:
    """Calibrated probability (at even prior odds) that two studies show the same patient."""
    ids, vecs = catalog.embeddings(study_level(catalog), [study_key_a, study_key_b])
    if ids.size < 2:
        missing = {study_key_a, study_key_b} - set(ids.tolist())
        raise QueryError(f"no study vector for study key(s) {sorted(missing)}")
    v = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    pair, _ = fit_identity_calibrations(catalog)
    return float(pair.predict(float(v[0] @ v[1])))


def resolve_study(catalog: Catalog, study: int | str) -> int:
    """A study key from a key or a Study Instance UID."""
    if isinstance(study, (int, np.integer)):
        return int(study)
    text = str(study)
    key = catalog.study_key(text)
    if key is None and text.isdigit():
        key = int(text) if catalog.has_study_key(int(text)) else None
    if key is None:
        raise QueryError(f"unknown study {text!r} (give a Study Instance UID or study key)")
    return key


def match_patients(catalog: Catalog, query: np.ndarray | int | str, k_patients: int = 5, *,
                   k_neighbours: int = 50) -> pl.DataFrame:
    """The ``k_patients`` patients whose studies best match a study (key or UID) or a study vector.

    The query study itself is excluded; a study's recorded patient is always listed (flagged). ``score``
    is the mean of the top-2 cosines to the candidate's studies, ``p_same`` its calibrated probability."""
    S = load_studies(catalog)
    if len(S) == 0:
        raise QueryError("this index has no study vectors: run `echosearch index` first")
    eligible = np.ones(len(S), dtype=bool)
    recorded = None
    if isinstance(query, np.ndarray):
        qv = np.asarray(query, dtype=np.float32).ravel()
        if qv.size != S.vecs.shape[1]:
            raise QueryError(f"query vector has {qv.size} dimensions; the index has {S.vecs.shape[1]}")
        qv = qv / max(float(np.linalg.norm(qv)), 1e-12)
    else:
        row = S.row(resolve_study(catalog, query))
        qv, recorded, eligible[row] = S.vecs[row], int(S.patient[row]), False
    _, patient_cal = fit_identity_calibrations(catalog, S)
    _, nbr = knn(S.vecs, qv[None, :], k_neighbours + 1)
    _, pk = candidate_patients(nbr, S.patient, np.array([np.iinfo(np.int64).min]), eligible, k_patients)
    cands = [int(p) for p in pk] + ([recorded] if recorded is not None and recorded not in set(pk.tolist()) else [])
    names = dict(zip(S.meta["patient_key"].to_list(), S.meta["patient_pseudonym"].to_list(), strict=True))
    records = []
    for p in cands:
        rows = np.nonzero((S.patient == p) & eligible)[0]
        if rows.size == 0:
            continue
        c = S.vecs[rows] @ qv
        top = np.argsort(-c, kind="stable")[:TOP_M]
        score = float(c[top].mean())
        records.append({"patient_key": p, "patient_pseudonym": names.get(p), "score": score,
                        "p_same": float(patient_cal.predict(score)), "n_studies": int((S.patient == p).sum()),
                        "supporting_study_keys": [int(S.keys[rows[t]]) for t in top],
                        "supporting_cosines": [round(float(c[t]), 4) for t in top],
                        "is_recorded_patient": p == recorded})
    schema: dict[str, Any] = {"patient_key": pl.Int64, "patient_pseudonym": pl.String, "score": pl.Float64, "p_same": pl.Float64,
              "n_studies": pl.Int64, "supporting_study_keys": pl.List(pl.Int64),
              "supporting_cosines": pl.List(pl.Float64), "is_recorded_patient": pl.Boolean}
    df = pl.DataFrame(records, schema=schema).sort("score", descending=True)
    keep = (pl.int_range(pl.len()) < k_patients) | pl.col("is_recorded_patient")
    return df.filter(keep).with_row_index("rank", offset=1)


def evidence_json(keys: np.ndarray, rows: np.ndarray, cos: np.ndarray) -> list[list[Any]]:
    """[[study_key, cosine], ...] of the finite entries (for the audit's evidence)."""
    return [[int(keys[r]), round(float(c), 4)] for r, c in zip(rows, cos, strict=True) if r >= 0 and np.isfinite(c)]


def _f4(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=float)


# ---- the audit -------------------------------------------------------------------------------------
K0_TYPICAL = 2.0
MAX_CANDIDATES = 3


def _score_pass(S: StudySet, eligible: np.ndarray, nbr_rows: np.ndarray, pad: float) -> dict[str, np.ndarray]:
    """Own, typical, best-other and robust z-scores of every study given the eligible reference studies."""
    n = len(S)
    own, own_p, own_v, n_ref = own_scores(S, eligible)
    typ = typical_scores(S, eligible)
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
                  neighbours: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Audit scores of every study (arrays by row), with iterative explain-away of suspects.

    A study is a suspect when its suspicion exceeds the normal quantile of ``fpr``, unless (given a
    calibration ``p_same``) the recorded patient is still plausible: calibrated probability at least
    ``max_p_same``, and not (suspicion 2 above the threshold and another patient more probable).

    Each round takes, per patient, the most suspicious suspect out of the reference sets (its scores
    are frozen as they were) and re-scores the rest, so that a mislabelled study stops dragging down its
    recorded patient's other studies or lending its look to the wrong patient."""
    n = len(S)
    z_thr = cal.z_for_fpr(fpr)
    nbr_rows = neighbours if neighbours is not None else knn(S.vecs, S.vecs, k + 1)[1]
    ni, nj = cal.between_group_pairs(S.patient, 5000, seed=1)
    pad = float(np.median(cal.pair_cosines(S.vecs, ni, nj))) if ni.size else 0.0

    def run(eligible: np.ndarray) -> dict[str, np.ndarray]:
        res = _score_pass(S, eligible, nbr_rows, pad)
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
          vectors: Literal["auto", "identity", "content"] = "auto") -> pl.DataFrame:
    """Rank every study by how likely its recorded patient is wrong; store the result under a new run.

    ``fpr`` is the nominal share of correctly labelled studies flagged (robust normal model of the
    catalog's own scores). Patients with a single study carry no own-patient evidence: their studies are
    left out unless ``report_unverifiable`` (then listed, last, with status ``unverifiable``). ``vectors``:
    which study vectors (``auto``: identity vectors when the index has them; ``eval`` compares both)."""
    S = load_studies(catalog, vectors)
    if len(S) == 0:
        raise QueryError("this index has no study vectors: run `echosearch index` first")
    _, patient_cal = fit_identity_calibrations(catalog, S, fpr=fpr)
    res = score_studies(S, fpr=fpr, k=k, max_iter=max_iter, p_same=patient_cal.predict,
                        neighbours=study_neighbours(catalog, S, k + 1))
    z_thr = float(res["z_threshold"])
    names = dict(zip(S.meta["patient_key"].to_list(), S.meta["patient_pseudonym"].to_list(), strict=True))
    verifiable = np.isfinite(res["own"])
    status = np.where(res["suspect"], "suspect", np.where(verifiable, "ok", "unverifiable"))

    def col(x: np.ndarray) -> pl.Series:
        return pl.Series(np.asarray(x, dtype=np.float64)).fill_nan(None)

    df = pl.DataFrame({
        "study_key": S.keys, "study_uid": S.meta["study_uid"], "study_date": S.meta["study_date"],
        "recorded_patient_key": S.patient, "recorded_patient": S.meta["patient_pseudonym"],
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
            "reasons": _reasons(r) if res["suspect"][i] else [],
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
                                           "calibration_auc": _f4(patient_cal.auc)})
        cols = ["run_id", "study_key", "recorded_patient_key", "own_score", "best_other_patient_key",
                "best_other_score", "margin", "p_same", "suspect", "rank", "evidence"]
        catalog.insert_frame("identity_audit", df.with_columns(pl.lit(run_id, pl.Int64).alias("run_id")), cols)
    return df.with_columns(pl.lit(run_id, pl.Int64).alias("run_id"))
