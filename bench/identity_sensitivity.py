"""What the identity audit can do for a lab, by how much identity its study vectors carry (issue 24, item 5).

Simulated archives: each patient has a hidden identity direction; each of its 2-5 studies is that direction
plus noise, L2-normalised (``dim``-d). The noise is set (by bisection, on a separate archive) so that the
cross-visit study-pair AUC is 0.80, 0.86, 0.90, 0.95 or 0.99. A share of the studies (10 %, 1 %, 0.1 %)
is then recorded under another patient's ID, and the real audit scoring (``identity.score_studies`` with
the real study-to-patient calibration, default ``fpr`` 0.01) ranks them. Printed per cell: the audit's
precision and recall, recall at precision 0.9 (ranking by suspicion), and reviews per true mislabel
(flagged studies / true mislabels found), pooled over ``--reps`` archives; and the projection
``eval --prevalence`` makes from the same archives' score distributions (``eval_identity.project_audit``).

    python bench/identity_sensitivity.py [--patients 1500] [--reps 2] [--dim 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import polars as pl

from echosearch.evaluation.identity import project_audit
from echosearch.identity import StudySet, fit_patient_calibration, score_studies
from echosearch.identity import calibration as cal

AUCS = (0.80, 0.86, 0.90, 0.95, 0.99)
RATES = (0.10, 0.01, 0.001)


def archive(n_patients: int, noise: float, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(study vectors, true patient per study): 2-5 studies per patient around its identity direction."""
    rng = np.random.default_rng(seed)
    k = rng.integers(2, 6, n_patients)
    patient = np.repeat(np.arange(n_patients), k)
    centre = rng.standard_normal((n_patients, dim))
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    x = centre[patient] + noise * rng.standard_normal((patient.size, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), patient


def pair_auc(vecs: np.ndarray, patient: np.ndarray, seed: int = 0) -> float:
    i, j = cal.within_group_pairs(patient, max_pairs=20000, seed=seed)
    ni, nj = cal.between_group_pairs(patient, 20000, seed=seed + 1)
    return cal.auc(cal.pair_cosines(vecs, i, j), cal.pair_cosines(vecs, ni, nj))


def noise_for_auc(target: float, dim: int, seed: int = 99) -> float:
    """Noise level whose archives have cross-visit study-pair AUC ``target`` (bisection, 600 patients)."""
    lo, hi = 0.05, 20.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        if pair_auc(*archive(600, mid, dim, seed)) > target:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def mislabel(patient: np.ndarray, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(recorded patient, mislabelled): ``rate`` of the studies moved to a random other patient."""
    y = rng.random(patient.size) < rate
    recorded = patient.copy()
    n = int(patient.max()) + 1
    shift = rng.integers(1, n, y.sum())
    recorded[y] = (patient[y] + shift) % n
    return recorded, y


def run_cell(auc: float, noise: float, rate: float, n_patients: int, reps: int, dim: int, fpr: float,
             seed: int) -> dict[str, Any]:
    flags = hits = n_mis = 0
    suspicion, truth = [], []
    for r in range(reps):
        rng = np.random.default_rng([seed, r, int(rate * 1e6), int(auc * 1000)])
        vecs, patient = archive(n_patients, noise, dim, int(rng.integers(1 << 31)))
        recorded, y = mislabel(patient, rate, rng)
        S = StudySet(np.arange(patient.size), vecs, recorded, pl.DataFrame(), "identity")  # keys: row numbers
        calib = fit_patient_calibration(S, fpr=fpr)
        res = score_studies(S, fpr=fpr, p_same=calib.predict)
        flags += int(res["suspect"].sum())
        hits += int((res["suspect"] & y).sum())
        n_mis += int(y.sum())
        suspicion.append(res["suspicion"])
        truth.append(y)
    s, y = np.concatenate(suspicion), np.concatenate(truth)
    ok = np.isfinite(s)
    rank = np.argsort(-np.where(ok, s, -np.inf), kind="stable")
    tp = np.cumsum(y[rank])
    prec = tp / np.arange(1, y.size + 1)
    rec = tp / max(int(y.sum()), 1)
    proj = project_audit(s[y & ok], s[~y & ok], rate, float(cal.z_for_fpr(fpr)))
    return {"auc": auc, "measured_auc": round(pair_auc(*archive(n_patients, noise, dim, seed + 7)), 3),
            "mislabel_rate": rate, "studies": int(y.size), "mislabelled": n_mis, "flagged": flags,
            "precision": round(hits / flags, 3) if flags else None, "recall": round(hits / n_mis, 3) if n_mis else None,
            "recall_at_precision_0.9": round(float(rec[prec >= 0.9].max()), 3) if (prec >= 0.9).any() else 0.0,
            "reviews_per_true_mislabel": round(flags / hits, 1) if hits else None,
            "projected_precision": proj.get("precision"), "projected_recall": proj.get("recall"),
            "projected_recall_at_precision_0.9": proj.get("recall_at_precision_0.9")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1500, help="patients per simulated archive (3.5 studies each)")
    ap.add_argument("--reps", type=int, default=2, help="archives per cell (more for the 0.1 %% rate)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--fpr", type=float, default=0.01, help="the audit's fpr setting")
    ap.add_argument("--aucs", default=",".join(map(str, AUCS)))
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    for auc in (float(x) for x in a.aucs.split(",")):
        noise = noise_for_auc(auc, a.dim)
        for rate in (float(x) for x in a.rates.split(",")):
            t0 = time.perf_counter()
            reps = a.reps * (4 if rate < 0.005 else 1)  # rare mislabels: more archives for a few dozen positives
            row = run_cell(auc, noise, rate, a.patients, reps, a.dim, a.fpr, a.seed)
            rows.append(row)
            if not a.json:
                print(" ".join(f"{k}={v}" for k, v in row.items()) + f" ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print("\n| pair AUC | mislabelled | precision | recall | recall at precision 0.9 | reviews per true mislabel "
          "| projected precision / recall |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['auc']:.2f} ({r['measured_auc']:.3f}) | {r['mislabel_rate']:.1%} ({r['mislabelled']}) | "
              f"{r['precision']} | {r['recall']} | {r['recall_at_precision_0.9']} | {r['reviews_per_true_mislabel']} | "
              f"{r['projected_precision']} / {r['projected_recall']} |")


if __name__ == "__main__":
    main()
