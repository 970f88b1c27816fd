"""Patient identity from study vectors: same-patient matching, calibrated probabilities, and the scoring kernels
the identity audit (``mislabels.py``) is built on.

A study vector (mean of its video vectors, L2-normalised) carries who the patient is. The score of a
study against a patient is the mean of its top-2 cosines to that patient's *other* studies (robust to one
odd study in the set, less noisy than a single pair). The audit compares, for every study, the score
against its recorded patient (leave-one-out) with the best score against any other patient found by
FAISS kNN, normalised robustly against the whole catalog. See ``docs/longitudinal.md``.
"""

from __future__ import annotations

import json
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


def own_scores(S: StudySet, eligible: np.ndarray, group: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Leave-one-out score of every study against its recorded patient's eligible other studies (``group``: the
    reference sets instead of the recorded patients, e.g. one per heart of a transplanted patient).

    Returns (own score, top partner rows (N, 2), their cosines, number of reference studies)."""
    i, j = cal.within_group_pairs(S.patient if group is None else group, ordered=True)
    keep = eligible[j]
    i, j = i[keep], j[keep]
    c = cal.pair_cosines(S.vecs, i, j)
    own, top_p, top_v = cal.group_topm(i, c, j, len(S))
    n_ref = np.bincount(i, minlength=len(S))
    return own, top_p, top_v, n_ref


def typical_scores(S: StudySet, eligible: np.ndarray, full_above: int = 40,
                   group: np.ndarray | None = None) -> np.ndarray:
    """Per study s: the median, over the other reference studies o of its patient (or ``group``), of o's own
    score computed without s (the patient's typical within-patient similarity, leave-s-out); NaN if < 2 refs."""
    out = np.full(len(S), np.nan)
    order, _, starts, counts = cal.group_offsets(S.patient if group is None else group)
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


def round4(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=float)
