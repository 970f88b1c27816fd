"""Patient identity from study vectors: same-patient matching, calibrated probabilities, and the identity audit.

A study vector (mean of its video vectors, L2-normalised) carries who the patient is. The score of a
study against a patient is the mean of its top-2 cosines to that patient's *other* studies (robust to one
odd study in the set, less noisy than a single pair). The audit compares, for every study, the score
against its recorded patient (leave-one-out) with the best score against any other patient found by
FAISS kNN, normalised robustly against the whole catalog. See ``docs/longitudinal.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import polars as pl

from echosearch import calibration as cal
from echosearch.catalog import Catalog
from echosearch.errors import QueryError

TOP_M = 2
PAIR_CAL = "identity.study_pair"
PATIENT_CAL = "identity.study_patient"


@dataclass
class StudySet:
    """Study vectors with their recorded patients, rows ordered by study key."""

    keys: np.ndarray
    vecs: np.ndarray
    patient: np.ndarray
    meta: pl.DataFrame

    def __len__(self) -> int:
        return int(self.keys.size)

    def row(self, study_key: int) -> int:
        i = int(np.searchsorted(self.keys, study_key))
        if i >= self.keys.size or self.keys[i] != study_key:
            raise QueryError(f"study {study_key} has no study vector in this index")
        return i


def load_studies(catalog: Catalog) -> StudySet:
    """Every study that has a vector, with recorded patient, date and UID (vectors re-normalised)."""
    ids, vecs = catalog.embeddings("study")
    meta = catalog.con.sql(
        "SELECT s.study_key, s.study_uid, s.study_date, s.patient_key, p.patient_pseudonym "
        "FROM studies s JOIN patients p USING (patient_key) ORDER BY s.study_key"
    ).pl()
    meta = pl.DataFrame({"study_key": ids}, schema={"study_key": pl.Int64}).join(meta, on="study_key", how="inner")
    keep = np.isin(ids, meta["study_key"].to_numpy())
    ids, vecs = ids[keep], vecs[keep]
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = np.ascontiguousarray(vecs / np.maximum(norms, 1e-12), dtype=np.float32)
    return StudySet(ids, vecs, meta["patient_key"].to_numpy().astype(np.int64), meta)


# ---- scoring kernels -------------------------------------------------------------------------------
def group_topm(groups: np.ndarray, values: np.ndarray, partners: np.ndarray, n_groups: int,
               m: int = TOP_M) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group 0..n_groups-1: mean of its top-``m`` values (NaN if none), top partners (-1) and values."""
    agg = np.full(n_groups, np.nan)
    top_p = np.full((n_groups, m), -1, dtype=np.int64)
    top_v = np.full((n_groups, m), np.nan)
    if groups.size == 0:
        return agg, top_p, top_v
    order = np.lexsort((-values, groups))
    g, v, p = groups[order], values[order].astype(np.float64), partners[order]
    first = np.r_[0, np.nonzero(np.diff(g))[0] + 1]
    run = np.repeat(np.arange(first.size), np.diff(np.r_[first, g.size]))
    rank = np.arange(g.size) - first[run]
    sel = rank < m
    sums = np.bincount(g[sel], weights=v[sel], minlength=n_groups)
    cnts = np.bincount(g[sel], minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        agg = np.where(cnts > 0, sums / np.maximum(cnts, 1), np.nan)
    top_p[g[sel], rank[sel]] = p[sel]
    top_v[g[sel], rank[sel]] = v[sel]
    return agg, top_p, top_v


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
    own, top_p, top_v = group_topm(i, c, j, len(S))
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
            typ = _row_topm(G)
            typ[~ok] = np.nan
            with np.errstate(all="ignore"):
                med = np.nanmedian(np.where(np.isfinite(typ), typ, np.nan), axis=1)
            out[idx] = med[:, None]
            continue
        for s in range(n):
            Gs = G.copy()
            Gs[:, :, s] = -np.inf
            typ = _row_topm(Gs)
            typ[:, s] = np.nan
            typ[~ok] = np.nan
            valid = np.isfinite(typ)
            enough = valid.sum(axis=1) >= 2
            with np.errstate(all="ignore"):
                med = np.nanmedian(np.where(valid, typ, np.nan), axis=1)
            out[idx[:, s]] = np.where(enough, med, np.nan)
    return out


def _row_topm(G: np.ndarray, m: int = TOP_M) -> np.ndarray:
    top = -np.sort(-G, axis=-1)[..., :m]
    fin = np.isfinite(top)
    cnt = fin.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(fin, top, 0.0).sum(axis=-1) / np.maximum(cnt, 1), np.nan)


def knn(vecs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN (``faiss.IndexFlatIP``): (similarities, rows) of shape (n_queries, k)."""
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, vecs.shape[0]))


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
                   exclude_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-2 mean of each query row ``q[k]`` against patient ``patients[k]``'s eligible studies."""
    pair, study = expand_to_patients(q, patients, S.patient, eligible)
    if exclude_rows is not None:
        keep = study != exclude_rows[pair]
        pair, study = pair[keep], study[keep]
    c = cal.pair_cosines(S.vecs, q[pair], study)
    return group_topm(pair, c, study, q.size)


# ---- calibration -----------------------------------------------------------------------------------
def fit_identity_calibrations(catalog: Catalog, S: StudySet | None = None, *, fpr: float = 0.01,
                              max_pairs: int = 20000, seed: int = 0,
                              refit: bool = False) -> tuple[cal.Calibration, cal.Calibration]:
    """(study-pair calibration, study-to-patient calibration), reused from the catalog when current.

    Positives: same recorded patient; negatives: different recorded patients (a few mislabels only
    blur the positives slightly). Pairs are sampled with ``seed`` and at most ``max_pairs`` of each kind.
    """
    gen = catalog.generation()
    if not refit:
        a, b = cal.load(catalog, PAIR_CAL, gen), cal.load(catalog, PATIENT_CAL, gen)
        if a is not None and b is not None:
            return a, b
    S = S if S is not None else load_studies(catalog)
    params = {"max_pairs": max_pairs, "seed": seed, "aggregate": f"mean of top-{TOP_M} cosines"}
    i, j = cal.within_group_pairs(S.patient, max_pairs=max_pairs, seed=seed)
    ni, nj = cal.between_group_pairs(S.patient, max_pairs, seed=seed + 1)
    pair = cal.fit_calibration(PAIR_CAL, cal.pair_cosines(S.vecs, i, j), cal.pair_cosines(S.vecs, ni, nj),
                               fpr=fpr, generation=gen, extra=params)
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
    patient = cal.fit_calibration(PATIENT_CAL, pos, neg, fpr=fpr, generation=gen, extra=params)
    cal.save(catalog, pair)
    cal.save(catalog, patient)
    return pair, patient


def same_patient_probability(catalog: Catalog, study_key_a: int, study_key_b: int) -> float:
    """Calibrated probability (at even prior odds) that two studies show the same patient."""
    ids, vecs = catalog.embeddings("study", [study_key_a, study_key_b])
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
        row = catalog.con.execute("SELECT study_key FROM studies WHERE study_key = ?", [int(text)]).fetchone()
        key = int(row[0]) if row else None
    if key is None:
        raise QueryError(f"unknown study {text!r} (give a Study Instance UID or study key)")
    return key


def match_patients(catalog: Catalog, query: np.ndarray | int | str, k_patients: int = 5, *,
                   k_neighbours: int = 50) -> pl.DataFrame:
    """The ``k_patients`` patients whose studies best match a study (key/UID) or a study vector.

    The query study itself is excluded. ``score`` is the mean of the top-2 cosines to the candidate's
    studies; ``p_same`` its calibrated probability of being the same patient (even prior odds)."""
    S = load_studies(catalog)
    if len(S) == 0:
        raise QueryError("this index has no study vectors: run `echosearch index` first")
    self_row, recorded = -1, None
    if isinstance(query, np.ndarray):
        qv = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if qv.shape[1] != S.vecs.shape[1]:
            raise QueryError(f"query vector has {qv.shape[1]} dimensions; the index has {S.vecs.shape[1]}")
        qv = qv / max(float(np.linalg.norm(qv)), 1e-12)
    else:
        self_row = S.row(resolve_study(catalog, query))
        qv, recorded = S.vecs[self_row : self_row + 1], int(S.patient[self_row])
    _, patient_cal = fit_identity_calibrations(catalog, S)
    eligible = np.ones(len(S), dtype=bool)
    if self_row >= 0:
        eligible[self_row] = False
    _, rows = knn(S.vecs, qv, k_neighbours + 1)
    qrow, pk = candidate_patients(rows, S.patient, np.array([np.iinfo(np.int64).min]), eligible, k_patients)
    if recorded is not None and recorded not in set(pk.tolist()):
        pk = np.r_[pk, recorded]
    q = np.zeros(pk.size, dtype=np.int64)
    vecs = S.vecs if self_row >= 0 else np.vstack([S.vecs, qv])
    T = StudySet(S.keys, vecs, S.patient, S.meta)
    if self_row < 0:
        q = np.full(pk.size, len(S), dtype=np.int64)
        T = StudySet(np.r_[S.keys, -1], vecs, np.r_[S.patient, np.iinfo(np.int64).min], S.meta)
        eligible = np.r_[eligible, False]
    else:
        q[:] = self_row
    score, top_p, top_v = patient_scores(T, q, pk, eligible)
    names = dict(zip(S.meta["patient_key"].to_list(), S.meta["patient_pseudonym"].to_list(), strict=True))
    counts = S.meta.group_by("patient_key").len()
    n_studies = dict(zip(counts["patient_key"].to_list(), counts["len"].to_list(), strict=True))
    df = pl.DataFrame({
        "patient_key": pk.astype(np.int64),
        "patient": [names.get(int(p)) for p in pk],
        "score": score,
        "p_same": patient_cal.predict(score),
        "n_studies": [int(n_studies.get(int(p), 0)) for p in pk],
        "supporting_study_keys": [[int(S.keys[r]) for r in row if r >= 0] for row in top_p],
        "supporting_cosines": [[round(float(v), 4) for v in row if np.isfinite(v)] for row in top_v],
        "is_recorded_patient": [recorded is not None and int(p) == recorded for p in pk],
    }, schema_overrides={"score": pl.Float64, "p_same": pl.Float64})
    df = df.filter(pl.col("score").is_not_nan()).sort("score", descending=True)
    return df.filter((pl.int_range(pl.len()) < k_patients) | pl.col("is_recorded_patient")).with_row_index(
        "rank", offset=1)


def evidence_json(keys: np.ndarray, rows: np.ndarray, cos: np.ndarray) -> list[list[Any]]:
    """[[study_key, cosine], ...] of the finite entries (for the audit's evidence)."""
    return [[int(keys[r]), round(float(c), 4)] for r, c in zip(rows, cos, strict=True) if r >= 0 and np.isfinite(c)]


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=float)


# ---- the audit -------------------------------------------------------------------------------------
K0_TYPICAL = 2.0
MAX_CANDIDATES = 3


def _score_pass(S: StudySet, eligible: np.ndarray, nbr_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Own, typical, best-other and robust z-scores of every study given the eligible reference studies."""
    n = len(S)
    own, own_p, own_v, n_ref = own_scores(S, eligible)
    typ = typical_scores(S, eligible)
    q, pk = candidate_patients(nbr_rows, S.patient, S.patient, eligible, MAX_CANDIDATES)
    sc, tp, tv = patient_scores(S, q, pk, eligible)
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
    c0 = float(np.nanmedian(own[ref])) if ref.any() else float("nan")
    m = np.maximum(n_ref - 1, 0).astype(np.float64)
    w = np.where(np.isfinite(typ), m / (m + K0_TYPICAL), 0.0)
    centre = w * np.nan_to_num(typ) + (1 - w) * c0
    resid = own - centre
    _, s_own = cal.robust_center_scale(resid[ref])
    m_ref = ref & np.isfinite(margin)
    mc, ms = cal.robust_center_scale(margin[m_ref])
    own_z = resid / s_own
    margin_z = (margin - mc) / ms
    with np.errstate(invalid="ignore"):
        suspicion = -np.fmin(own_z, margin_z)
    return {"own": own, "own_p": own_p, "own_v": own_v, "n_ref": n_ref, "typical": typ, "best": best,
            "best_pk": best_pk, "best_p": best_p, "best_v": best_v, "margin": margin, "own_z": own_z,
            "margin_z": margin_z, "suspicion": suspicion}


def score_studies(S: StudySet, *, fpr: float = 0.01, k: int = 50, max_iter: int = 3) -> dict[str, np.ndarray]:
    """Audit scores of every study (arrays by row), with iterative explain-away of suspects.

    Each round takes, per patient, the most suspicious flagged study out of the reference sets (its own
    scores are frozen as they were) and re-scores the rest, so that a mislabelled study stops dragging
    down its recorded patient's other studies or lending its true patient's look to the wrong patient."""
    n = len(S)
    z_thr = cal.z_for_fpr(fpr, 2)
    _, nbr_rows = knn(S.vecs, S.vecs, k + 1)
    eligible = np.ones(n, dtype=bool)
    res = _score_pass(S, eligible, nbr_rows)
    final = {key: val.copy() for key, val in res.items()}
    frozen = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        with np.errstate(invalid="ignore"):
            cand = eligible & (res["suspicion"] > z_thr)
        if not cand.any():
            break
        rows = np.nonzero(cand)[0]
        order = np.lexsort((-res["suspicion"][rows], S.patient[rows]))
        pick = rows[order[np.r_[True, S.patient[rows][order][1:] != S.patient[rows][order][:-1]]]]
        for key, val in res.items():
            final[key][pick] = val[pick]
        frozen[pick] = True
        eligible[pick] = False
        res = _score_pass(S, eligible, nbr_rows)
        for key, val in res.items():
            final[key][~frozen] = val[~frozen]
    with np.errstate(invalid="ignore"):
        final["suspect"] = np.nan_to_num(final["suspicion"], nan=-np.inf) > z_thr
    final["z_threshold"] = np.array(z_thr)
    return final


def _reasons(r: dict[str, Any], z_thr: float) -> list[str]:
    out = []
    if r["margin_z"] is not None and r["margin_z"] < -z_thr:
        word = "fits better than" if (r["margin"] or 0) < 0 else "fits almost as well as"
        out.append(f"patient {r['best_other_patient']} {word} the recorded patient "
                   f"(margin {r['margin']:+.3f}, z {r['margin_z']:.1f})")
    if r["own_z"] is not None and r["own_z"] < -z_thr:
        out.append(f"similarity to the recorded patient's other studies is unusually low (z {r['own_z']:.1f})")
    return out


def audit(catalog: Catalog, *, fpr: float = 0.01, k: int = 50, report_unverifiable: bool = False,
          store: bool = True, max_iter: int = 3) -> pl.DataFrame:
    """Rank every study by how likely its recorded patient is wrong; store the result under a new run.

    ``fpr`` is the nominal share of correctly labelled studies flagged (robust normal model of the
    catalog's own scores). Patients with a single study carry no own-patient evidence: their studies are
    left out unless ``report_unverifiable`` (then listed, last, with status ``unverifiable``)."""
    S = load_studies(catalog)
    if len(S) == 0:
        raise QueryError("this index has no study vectors: run `echosearch index` first")
    _, patient_cal = fit_identity_calibrations(catalog, S, fpr=fpr)
    res = score_studies(S, fpr=fpr, k=k, max_iter=max_iter)
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
        "p_same": col(patient_cal.predict(res["own"])), "p_best_other": col(patient_cal.predict(res["best"])),
        "suspicion": col(res["suspicion"]), "suspect": res["suspect"], "status": status,
    })
    evidence = []
    for i, r in enumerate(df.select("margin", "margin_z", "own_z", "best_other_patient").iter_rows(named=True)):
        evidence.append(dumps({
            "own_patient_studies": evidence_json(S.keys, res["own_p"][i], res["own_v"][i]),
            "best_other_studies": evidence_json(S.keys, res["best_p"][i], res["best_v"][i]),
            "typical": None if not np.isfinite(res["typical"][i]) else round(float(res["typical"][i]), 4),
            "reasons": _reasons(r, z_thr) if res["suspect"][i] else [],
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
                                           "z_threshold": z_thr, "max_iter": max_iter})
        table = df.select(
            pl.lit(run_id, pl.Int64).alias("run_id"), "study_key", pl.col("recorded_patient_key"),
            "own_score", "best_other_patient_key", "best_other_score", "margin", "p_same", "suspect", "rank",
            "evidence").to_arrow()
        with catalog.transaction() as con:
            con.register("_audit_rows", table)
            con.execute("INSERT INTO identity_audit SELECT * FROM _audit_rows")
            con.unregister("_audit_rows")
    return df.with_columns(pl.lit(run_id, pl.Int64).alias("run_id"))
