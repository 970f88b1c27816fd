"""Score calibration: rank-based AUC, ROC, thresholds at a false-positive rate, and monotone score -> probability.

Everything is plain numpy (no scikit-learn). The identity calibrations are fitted on the catalog's own
study pairs: same recorded patient (positives) versus different recorded patients (negatives), sampled
reproducibly and in bounded number, and stored in the ``calibrations`` table with the catalog generation
they saw, so that a later run reuses them until the embeddings change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from echosearch.catalog import Catalog

_EPS = 1e-4
MAX_POINTS = 256


def _clean(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return v
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts).astype(np.float64)
    return (upper - (counts - 1) / 2.0)[inverse.ravel()]


def auc(positive: Any, negative: Any) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2); NaN if a side is empty."""
    pos, neg = _clean(positive), _clean(negative)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = average_ranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def auc_from_labels(scores: Any, labels: Any) -> float:
    """AUC of ``scores`` for boolean ``labels`` (NaN scores dropped)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    return auc(s[y], s[~y])


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): the operating points of "score >= threshold", from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.array([], dtype=np.int64)
    tp = np.cumsum(y)[last].astype(np.float64)
    fp = (last + 1 - tp).astype(np.float64)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, s[last]]
    return fpr, tpr, thresholds


def threshold_at_fpr(negative: Any, fpr: float) -> float:
    """Smallest threshold ``t`` among the negatives such that at most ``fpr`` of them score ``> t``."""
    neg = np.sort(_clean(negative))[::-1]
    if neg.size == 0:
        return float("nan")
    allowed = int(np.floor(max(0.0, min(1.0, fpr)) * neg.size))
    return float(neg[min(allowed, neg.size - 1)])


def z_for_fpr(fpr: float, two_sided_tests: int = 1) -> float:
    """One-sided normal quantile for a false-positive rate split over ``two_sided_tests`` tests (Bonferroni)."""
    p = min(max(fpr / max(two_sided_tests, 1), 1e-12), 0.5)
    return float(NormalDist().inv_cdf(1.0 - p))


def robust_center_scale(x: Any, floor: float = 1e-6) -> tuple[float, float]:
    """(median, 1.4826 * MAD) of the finite values; (nan, nan) when there are none."""
    a = _clean(x)
    if a.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(a))
    return med, max(1.4826 * float(np.median(np.abs(a - med))), floor)


def fisher(x: np.ndarray) -> np.ndarray:
    """Fisher transform of cosines (atanh, clipped): bounded, skewed similarities become close to normal."""
    return np.arctanh(np.clip(x, -0.999, 0.999))


def stratified_center_scale(x: np.ndarray, strata: np.ndarray, ref: np.ndarray, k0: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-row robust (centre, scale) of ``x`` within its stratum (number of reference studies), computed
    on the ``ref`` rows and shrunk towards the pooled values when a stratum has few rows."""
    c_all, s_all = robust_center_scale(x[ref])
    centre = np.full(x.size, c_all)
    scale = np.full(x.size, s_all)
    for g in np.unique(strata):
        in_g = strata == g
        vals = x[in_g & ref]
        if vals.size == 0:
            continue
        c, s = robust_center_scale(vals)
        w = vals.size / (vals.size + k0)
        centre[in_g] = w * c + (1 - w) * c_all
        scale[in_g] = np.sqrt(w * s**2 + (1 - w) * s_all**2)
    return centre, scale


def pool_adjacent_violators(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted isotonic (non-decreasing) fit of ``y`` in the given order: (block means, weights, sizes)."""
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist(), strict=True):
        means.append(yi)
        weights.append(wi)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            wt = weights[-2] + weights[-1]
            m = (means[-2] * weights[-2] + means[-1] * weights[-1]) / wt if wt > 0 else (means[-2] + means[-1]) / 2
            means[-2:] = [m]
            weights[-2:] = [wt]
            sizes[-2:] = [sizes[-2] + sizes[-1]]
    return np.asarray(means), np.asarray(weights), np.asarray(sizes)


@dataclass(frozen=True)
class IsotonicCalibration:
    """Monotone map from a score to a probability: linear interpolation between non-decreasing knots."""

    x: np.ndarray
    y: np.ndarray

    def predict(self, scores: Any) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        out = np.interp(s, self.x, self.y) if self.x.size else np.full(s.shape, 0.5)
        return np.where(np.isfinite(s), out, np.nan)

    def to_params(self) -> dict[str, Any]:
        return {"method": "isotonic", "x": [round(float(v), 6) for v in self.x],
                "y": [round(float(v), 6) for v in self.y]}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> IsotonicCalibration:
        y = np.maximum.accumulate(np.asarray(params["y"], dtype=np.float64)) if params["y"] else np.zeros(0)
        return cls(np.asarray(params["x"], dtype=np.float64), y)


def fit_isotonic(positive: Any, negative: Any, prior: float = 0.5) -> IsotonicCalibration:
    """Isotonic regression (pool-adjacent-violators) of P(positive | score).

    The two classes are re-weighted to the prior probability ``prior`` of a positive (0.5: even odds),
    so the output does not depend on how many pairs of each kind were sampled. Probabilities are clipped
    to [1e-4, 1 - 1e-4]; at most 256 knots are kept (a subset of monotone knots stays monotone).
    """
    pos, neg = _clean(positive), _clean(negative)
    if pos.size == 0 or neg.size == 0:
        return IsotonicCalibration(np.zeros(0), np.zeros(0))
    s = np.concatenate([pos, neg])
    lab = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    w = np.concatenate([np.full(pos.size, prior / pos.size), np.full(neg.size, (1 - prior) / neg.size)])
    _, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.ravel()
    wsum = np.bincount(inverse, weights=w)
    ysum = np.bincount(inverse, weights=w * lab)
    ymean = ysum / wsum
    means, _, sizes = pool_adjacent_violators(ymean, wsum)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    wx = np.bincount(inverse, weights=w * s)
    cw = np.r_[0.0, np.cumsum(wsum)]
    cx = np.r_[0.0, np.cumsum(wx)]
    centres = (cx[ends] - cx[starts]) / (cw[ends] - cw[starts])
    y = np.clip(means, _EPS, 1 - _EPS)
    if centres.size > MAX_POINTS:
        keep = np.unique(np.linspace(0, centres.size - 1, MAX_POINTS).round().astype(np.int64))
        centres, y = centres[keep], y[keep]
    return IsotonicCalibration(centres, np.maximum.accumulate(y))


@dataclass(frozen=True)
class Calibration:
    """A fitted score calibration with its summary (what the ``calibrations`` table stores)."""

    name: str
    model: IsotonicCalibration
    n_pos: int
    n_neg: int
    auc: float
    threshold: float
    fpr: float
    generation: int
    extra: dict[str, Any]

    def predict(self, scores: Any) -> np.ndarray:
        return self.model.predict(scores)

    def params(self) -> dict[str, Any]:
        return {**self.model.to_params(), "fpr": self.fpr, "generation": self.generation, **self.extra}


def fit_calibration(name: str, positive: Any, negative: Any, *, fpr: float = 0.01, generation: int = 0,
                    extra: dict[str, Any] | None = None) -> Calibration:
    """AUC, threshold at ``fpr`` (on the negatives) and an isotonic map, in one object."""
    pos, neg = _clean(positive), _clean(negative)
    extra = dict(extra or {})
    if pos.size and neg.size:
        extra.setdefault("pos_median", float(np.median(pos)))
        extra.setdefault("neg_median", float(np.median(neg)))
    return Calibration(name, fit_isotonic(pos, neg), int(pos.size), int(neg.size), auc(pos, neg),
                       threshold_at_fpr(neg, fpr), fpr, generation, extra)


def save(catalog: Catalog, cal: Calibration) -> None:
    """Store ``cal`` in the catalog's ``calibrations`` table (no-op on a read-only catalog)."""
    if catalog.read_only:
        return
    auc_v = None if not np.isfinite(cal.auc) else float(cal.auc)
    thr = None if not np.isfinite(cal.threshold) else float(cal.threshold)
    catalog.save_calibration(cal.name, cal.n_pos, cal.n_neg, auc_v, thr, cal.params())


def load(catalog: Catalog, name: str, generation: int | None = None) -> Calibration | None:
    """A stored calibration, or None when absent or fitted on another catalog generation."""
    row = catalog.load_calibration(name)
    if row is None:
        return None
    p = row["params"]
    if generation is not None and int(p.get("generation", -1)) != generation:
        return None
    extra = {k: v for k, v in p.items() if k not in ("method", "x", "y", "fpr", "generation")}
    return Calibration(name, IsotonicCalibration.from_params(p), int(row["n_positive"]), int(row["n_negative"]),
                       float("nan") if row["auc"] is None else float(row["auc"]),
                       float("nan") if row["threshold"] is None else float(row["threshold"]),
                       float(p.get("fpr", 0.01)), int(p.get("generation", -1)), extra)


# ---- pair sampling ---------------------------------------------------------------------------------
def group_offsets(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(order, group ids, starts, counts): ``order`` sorts items by group; each group is a contiguous run."""
    order = np.argsort(groups, kind="mergesort")
    uniq, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    return order, uniq, starts, counts


def within_group_pairs(groups: np.ndarray, max_pairs: int | None = None, seed: int = 0,
                       ordered: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j, of items sharing a group (i < j unless ``ordered``); optionally subsampled."""
    g = np.asarray(groups)
    order, _, starts, counts = group_offsets(g)
    per_item = np.repeat(counts, counts)
    item_start = np.repeat(starts, counts)
    total = int(per_item.sum())
    pos_in_sorted = np.repeat(np.arange(g.size), per_item)
    offs = np.arange(total) - np.repeat(np.cumsum(per_item) - per_item, per_item)
    partner = np.repeat(item_start, per_item) + offs
    keep = partner != pos_in_sorted if ordered else partner > pos_in_sorted
    i, j = order[pos_in_sorted[keep]], order[partner[keep]]
    if max_pairs is not None and i.size > max_pairs:
        pick = np.sort(np.random.default_rng(seed).choice(i.size, size=max_pairs, replace=False))
        i, j = i[pick], j[pick]
    return i, j


def between_group_pairs(groups: np.ndarray, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` random index pairs whose items belong to different groups (fewer if impossible)."""
    g = np.asarray(groups)
    if g.size < 2 or np.unique(g).size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    out_i: list[np.ndarray] = []
    out_j: list[np.ndarray] = []
    have = 0
    for _ in range(20):
        i = rng.integers(0, g.size, size=2 * n_pairs + 16)
        j = rng.integers(0, g.size, size=2 * n_pairs + 16)
        ok = g[i] != g[j]
        out_i.append(i[ok])
        out_j.append(j[ok])
        have += int(ok.sum())
        if have >= n_pairs:
            break
    return np.concatenate(out_i)[:n_pairs], np.concatenate(out_j)[:n_pairs]


def pair_cosines(vecs: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Row-wise dot products ``vecs[i] . vecs[j]`` (cosines for unit vectors), chunked to bound memory."""
    out = np.empty(i.size, dtype=np.float32)
    for a in range(0, i.size, chunk):
        b = a + chunk
        out[a:b] = np.einsum("ij,ij->i", vecs[i[a:b]], vecs[j[a:b]])
    return out


def group_topm(groups: np.ndarray, values: np.ndarray, partners: np.ndarray, n_groups: int,
               m: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def nanmedian_rows(a: np.ndarray) -> np.ndarray:
    """Row medians of the finite entries (NaN for rows without any), without warnings."""
    a = np.where(np.isfinite(a), a, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(a, axis=1)


def row_topm_mean(G: np.ndarray, m: int = 2) -> np.ndarray:
    """Mean of the ``m`` largest finite entries of each row (last axis); NaN where a row has none."""
    top = -np.sort(-G, axis=-1)[..., :m]
    fin = np.isfinite(top)
    cnt = fin.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(fin, top, 0.0).sum(axis=-1) / np.maximum(cnt, 1), np.nan)
