"""Findings from the images, learnt from the archive's own reports (linear probes, cross-fitted by patient).

The content encoder's zero-shot readings are weak where the change scan needs them most: the demo model's
zero-shot EF is ~9 points off per study, and a device's zero-shot score ranks studies well but its presence
threshold does not carry over between encoders (MitraClip "seen" on 4 in 5 studies of a cohort where 1 in 4
has one). Most of an archive's studies carry a report, and what a report states is a free label: the EF it
gives, and whether it contains a device's own sentence (the task's positive prompts). Per view, a ridge
regression maps each clip's content vector to its study's stated value. EF, where the index stores cycle vectors
(:mod:`echosearch.model.cycle`: how the clip's features move over its frames), is read from those instead
(``kind="cycle"``: standardised, principal components, ridge): a content vector is a frame mean, and EF is a
ratio over the cycle that a mean hides (~3x smaller error, ``bench/ef_dynamics.py``).

**Cross-fitted by patient**: a labelled patient's clips are estimated by a probe fitted on the other patients'
studies only (patients in ``FOLDS`` groups by key), so no report informs the estimate of its own study or of
its patient's other visits; a change between two visits is read from the images, never from their reports.
Unlabelled studies get the probe fitted on every labelled patient. Too few labelled patients for a view (or a
device no report ever names): no estimate, and the change model has no such evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

FOLDS = 5
MIN_PATIENTS = 20  # labelled patients a view needs before its probe is fitted
RIDGE = 3.0  # L2 penalty on unit-length clip vectors (chosen on the tuning cohort, seed 301)
CYCLE_COMPONENTS = 256  # most principal components of a cycle probe (at most half its training clips)
CYCLE_RIDGE = 0.01  # L2 penalty per training clip on the components (bench/ef_dynamics.py, fitted on seed 7201)


@dataclass(frozen=True)
class ProbeFit:
    """Per clip: the cross-fitted estimate (NaN where its view had too few labelled patients); the
    out-of-fold mean absolute error over labelled clips (NaN when nothing was fitted)."""

    values: np.ndarray
    mae: float
    n_labelled_patients: int


def report_targets(texts: Mapping[int, str | None], positives: Mapping[str, Sequence[str]]) -> dict[str, dict[int, float]]:
    """Per study key, what its report states: ``ef`` (the stated EF) and, per device task, 1.0 when the report
    contains one of the task's positive sentences and 0.0 when it does not. A device no report names gives no
    labels at all (its absence from every report says nothing about the images)."""
    from echosearch.model.report_facts import report_ef

    out: dict[str, dict[int, float]] = {"ef": {}}
    for k, t in texts.items():
        ef = report_ef(t)
        if ef is not None:
            out["ef"][int(k)] = float(ef)
    upper = {int(k): (t or "").upper() for k, t in texts.items() if t}
    for task, sentences in positives.items():
        keys = [s.upper().strip().rstrip(".") for s in sentences if s.strip()]
        said = {k: float(any(s in t for s in keys)) for k, t in upper.items()}
        if any(said.values()):
            out[task] = said
    return out


def _ridge(X: np.ndarray, y: np.ndarray, lam: float) -> Callable[[np.ndarray], np.ndarray]:
    """Ridge on the raw (unit-length) vectors."""
    mu, ym = X.mean(axis=0), float(y.mean())
    A = X - mu
    w = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ (y - ym))
    return lambda q: (q - mu) @ w + ym


def _leading_directions(Z: np.ndarray, k: int) -> np.ndarray:
    """(features, k): the ``k`` leading right singular vectors of ``Z``, from the eigenvectors of the smaller of
    its two Gram matrices (a few hundred clips x thousands of features: ~15x faster than a full SVD; the spanned
    subspace, all a ridge on it depends on, is the same)."""
    if len(Z) < Z.shape[1]:
        ev, U = np.linalg.eigh(Z @ Z.T)
        top = np.argsort(ev)[::-1][:k]
        return (Z.T @ U[:, top]) / np.sqrt(np.maximum(ev[top], 1e-12))
    ev, V = np.linalg.eigh(Z.T @ Z)
    return V[:, np.argsort(ev)[::-1][:k]]


def pca_ridge(X: np.ndarray, y: np.ndarray, lam: float = CYCLE_RIDGE, components: int = CYCLE_COMPONENTS
              ) -> Callable[[np.ndarray], np.ndarray]:
    """Ridge on the leading principal components (at most half the rows) of the standardised features, penalty
    ``lam`` per row (cycle vectors: thousands of features of very different scales, a few hundred clips)."""
    mu, sd, ym = X.mean(axis=0), X.std(axis=0) + 1e-3, float(y.mean())
    Z = (X - mu) / sd
    w = _leading_directions(Z, max(1, min(components, len(X) // 2)))
    z = Z @ w
    b = np.linalg.solve(z.T @ z + lam * len(z) * np.eye(w.shape[1]), z.T @ (y - ym))
    return lambda q: (q - mu) / sd @ (w @ b) + ym


def cross_fitted(vecs: np.ndarray, views: np.ndarray, patients: np.ndarray, target: np.ndarray,
                 lam: float | None = None, folds: int = FOLDS, kind: str = "content") -> ProbeFit:
    """The probe's estimate per clip (see the module doc). ``target``: the clip's study's stated value (NaN:
    none stated); ``patients``: the recorded patient key of each clip (the fold it falls in); ``kind``:
    ``content`` (unit-length vectors, plain ridge) or ``cycle`` (cycle vectors, ridge on principal components)."""
    fit = {"content": _ridge, "cycle": pca_ridge}[kind]
    lam = lam if lam is not None else (RIDGE if kind == "content" else CYCLE_RIDGE)
    vecs = np.asarray(vecs, dtype=np.float64)
    out = np.full(len(vecs), np.nan)
    labelled = np.isfinite(target)
    fold = np.asarray(patients, dtype=np.int64) % folds
    for view in np.unique(views):
        m = views == view
        if np.unique(patients[m & labelled]).size < MIN_PATIENTS:
            continue
        for q in range(folds):
            tr, te = m & labelled & (fold != q), m & labelled & (fold == q)
            if te.any() and tr.sum() > 1:
                out[te] = fit(vecs[tr], target[tr], lam)(vecs[te])
        rest = m & ~labelled
        if rest.any():
            out[rest] = fit(vecs[m & labelled], target[m & labelled], lam)(vecs[rest])
    err = np.abs(out - target)[labelled & np.isfinite(out)]
    return ProbeFit(out, float(err.mean()) if err.size else float("nan"),
                    int(np.unique(patients[labelled]).size))


def presence(scores: np.ndarray, patients: np.ndarray, stated: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Per study, the probability that a device is present, from its scores (columns: e.g. the zero-shot score
    and the probe's estimate), by a logistic fitted on the studies whose report says yes or no (``stated``:
    1 / 0 / NaN) - cross-fitted by patient like the probes. A zero-shot threshold chosen for one encoder does
    not carry over to another; the archive's own reports set it. NaN where no score or too few labels."""
    from echosearch.change.model import fit_logistic

    X = np.asarray(scores, dtype=np.float64).reshape(len(stated), -1)
    have = np.asarray(np.isfinite(X).all(axis=1), dtype=bool)
    lab = have & np.isfinite(stated)
    out = np.full(len(stated), np.nan)
    if np.unique(patients[lab]).size < MIN_PATIENTS or np.unique(stated[lab]).size < 2:
        return out
    mu, sd = X[lab].mean(axis=0), X[lab].std(axis=0) + 1e-9
    Z = np.c_[(np.where(have[:, None], X, 0.0) - mu) / sd, np.ones(len(X))]
    fold = np.asarray(patients, dtype=np.int64) % folds
    for q in (*range(folds), -1):  # each fold from the others; -1: the unlabelled studies, from all
        tr = lab & (fold != q)
        te = (lab & (fold == q)) if q >= 0 else (have & ~lab)
        if te.any() and np.unique(stated[tr]).size == 2:
            w = fit_logistic(Z[tr, :-1], stated[tr], l2=1e-3)
            out[te] = 1.0 / (1.0 + np.exp(-np.clip(Z[te] @ w, -40, 40)))
    return out


__all__ = ["CYCLE_COMPONENTS", "CYCLE_RIDGE", "FOLDS", "MIN_PATIENTS", "RIDGE", "ProbeFit", "cross_fitted", "presence",
           "pca_ridge", "report_targets"]
