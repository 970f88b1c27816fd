"""The identity audit with and without its per-heart split, on the same index, against the truth's mislabels.

For each index: ``audit(..., hearts=False)`` (every study against its whole recorded patient) and the default
(a transplanted patient's hearts audited apart, ``change.heart_segments``), each scored with ``eval``'s
``audit_scores`` (precision / recall of the flags, suspicion AUC, recall at precision 0.9, average precision),
plus the false alarms on studies of a heart after a true transplant. Usage (the figures in docs/longitudinal.md,
"Auditing per heart, measured"; a cohort folder holds ``cohort/ground_truth.parquet`` and ``index/``, as
``bench/change_quality.py`` builds them):

    ECHOSEARCH_SECRET=<the indexes' secret> .venv/bin/python bench/audit_hearts.py WORKDIR/c401 WORKDIR/c402 [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(root: Path) -> dict[str, Any]:
    """Both audits of one cohort folder (``index/`` and ``cohort/ground_truth.parquet``)."""

    from echosearch.catalog import Catalog
    from echosearch.evaluation.change import change_truth
    from echosearch.evaluation.core import join_truth, load_truth
    from echosearch.evaluation.identity import audit_scores
    from echosearch.identity import audit

    out: dict[str, Any] = {"cohort": root.name}
    with Catalog.open(root / "index", read_only=True) as cat:
        st = change_truth(join_truth(cat, load_truth(root / "cohort" / "ground_truth.parquet")))
        for name, hearts in (("whole_patient", False), ("per_heart", True)):
            a = audit(cat, store=False, report_unverifiable=True, hearts=hearts)
            d = a.join(st.select("study_key", "mislabelled", "heart_id"), on="study_key", how="inner")
            y = d["mislabelled"].to_numpy().astype(bool)
            false = d["suspect"].to_numpy().astype(bool) & ~y
            later_heart = ~d["heart_id"].str.ends_with("-H0").to_numpy() if "heart_id" in d.columns else \
                np.zeros(d.height, bool)
            out[name] = {**audit_scores(d, y), "false_alarms": int(false.sum()),
                         "false_alarms_on_a_later_heart": int((false & later_heart).sum()),
                         "studies_after_a_new_heart": int((d["heart"] > 0).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cohorts", type=Path, nargs="+", help="Cohort folders (index/ and cohort/ground_truth.parquet).")
    ap.add_argument("--json", type=Path, help="Write the figures here.")
    args = ap.parse_args()
    rows = []
    keys = ("n_mislabelled", "suspicion_auc", "average_precision", "recall_at_precision_0.9", "precision", "recall",
            "false_alarms")
    print("| cohort | audit | " + " | ".join(keys) + " |")
    for root in args.cohorts:
        res = measure(root)
        rows.append(res)
        for name in ("whole_patient", "per_heart"):
            print(f"| {res['cohort']} | {name} | " + " | ".join(str(res[name][k]) for k in keys) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
