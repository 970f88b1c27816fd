"""Change quality on fresh synthetic cohorts: fit the change model on tuning seeds, report on other seeds.

Each cohort: 90 patients, 4-6 visits, A4C + PLAX + A2C, 3 % mislabelled, ``--event-rate 3`` (30-100
positives of every event type), indexed through the real pipeline with the shipped demo model. ``--fit`` refits
``echosearch/data/change_model.json`` from the tuning cohorts only; the report runs ``eval``'s change
measurement (every score on the same pairs, bootstrap intervals) on each report cohort. Usage (WORKDIR: any
folder with room for the cohorts, e.g. indexes/change):

    .venv/bin/python bench/change_quality.py --work WORKDIR --fit   # tune on 301-303, report on 401 402
    .venv/bin/python bench/change_quality.py --work WORKDIR --report 401 402 403 404 --without-reports \
        --json out.json   # the shipped figures, with and without the reports

Each cohort takes about 1-2 min to generate and 3-30 min to index, depending on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COHORT: dict[str, Any] = {"patients": 90, "visits": (4, 6), "views": ("A4C", "PLAX", "A2C"), "mislabel_rate": 0.03,
                          "size": "small", "event_rate": 3.0}


def build(work: Path, seed: int) -> Path:
    """The cohort and index of a seed (reused when present)."""
    from echosearch.config import load_settings
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    root = work / f"c{seed}"
    if not (root / "cohort" / "ground_truth.parquet").exists():
        generate_cohort(root / "cohort", seed=seed, workers=1, **COHORT)
    if not (root / "index" / "catalog.duckdb").exists() or not (root / "index" / ".done").exists():
        index_sources([root / "cohort"], root / "index", load_settings(mode="demo", workers=1), progress=False)
        (root / "index" / ".done").write_text("ok")
    return root


def training_pairs(root: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Raw features of every consecutive pair of the cohort without a mislabelled study, the truth of each flag
    type, and the index's encoder identity."""
    import polars as pl

    from echosearch.catalog import Catalog
    from echosearch.change.features import load_timeline, raw_pair_features
    from echosearch.change.model import EF_MARGIN
    from echosearch.change.scan import _pairs, study_predictions
    from echosearch.evaluation.change import _clause_truth, change_truth
    from echosearch.evaluation.core import join_truth, load_truth

    with Catalog.open(root / "index", read_only=True) as cat:
        T = load_timeline(cat, study_predictions(cat))
        st = change_truth(join_truth(cat, load_truth(root / "cohort" / "ground_truth.parquet")))
        model = cat.get_manifest("model") or {}
    encoder = {"name": model.get("name"), "weights_sha256": model.get("weights_sha256"),
               "identity_source": T.identity_source}
    pk = T.meta["patient_key"].to_numpy()
    prev, _ = _pairs(pk, np.zeros(pk.size, bool))
    i = np.nonzero(prev >= 0)[0]
    j = prev[i]
    raw = raw_pair_features(T, i, j)
    a = pl.DataFrame({"study_key": T.keys[i], "other_key": T.keys[j], "row": np.arange(i.size)})
    cols = ["study_key", "mislabelled", "ef", "pacer_lead", "tavr", "mitraclip", "heart_id"]
    d = a.join(st.select(cols).rename({"ef": "ef_true"}), on="study_key").join(
        st.select(cols).rename({c: f"{c}_o" for c in cols if c != "study_key"}).rename({"study_key": "other_key"}),
        on="other_key").filter(~pl.col("mislabelled") & ~pl.col("mislabelled_o")).sort("row")
    d = d.with_columns(pl.lit([]).cast(pl.List(pl.String)).alias("events"))
    rows = d["row"].to_numpy()
    return {k: v[rows] for k, v in raw.items()}, _clause_truth(d, EF_MARGIN), encoder


def fit(work: Path, seeds: list[int], l2: float) -> None:
    from echosearch.change.features import Scales
    from echosearch.change.model import MODEL_FILE, ChangeModel

    parts = [training_pairs(work / f"c{s}") for s in seeds]
    raw = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    labels = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    stable = ~np.any(np.stack(list(labels.values())), axis=0)
    scales = Scales.fit({k: v[stable] for k, v in raw.items()})  # the null: visits with nothing to flag
    X = scales.standardise(raw)
    enc = parts[0][2]
    model = ChangeModel.fit(X, labels, l2=l2, scales=scales, info={
        "fitted_on": {"seeds": seeds, **COHORT, "visits": list(COHORT["visits"]), "views": list(COHORT["views"])},
        "l2": l2, "n_pairs": int(len(X)), "encoder": {k: enc[k] for k in ("name", "weights_sha256")},
        "identity_source": enc["identity_source"]})
    model.save(MODEL_FILE)
    print(f"fitted on {len(X)} pairs of seeds {seeds}; positives: "
          f"{ {k: int(v.sum()) for k, v in labels.items()} } -> {MODEL_FILE}")


def report(work: Path, seeds: list[int], n_boot: int, without_reports: bool = False) -> list[dict[str, Any]]:
    """``eval``'s change measurement on each seed; ``without_reports``: the same index with its reports hidden from
    the change scan (no probe has labels: every flag uses its fallback weights, what an archive without reports
    gets)."""
    import polars as pl
    from rich.console import Console

    from echosearch.catalog import Catalog
    from echosearch.evaluation.change import change_metrics, format_change_table
    from echosearch.evaluation.core import join_truth, load_truth

    out = []
    for s in seeds:
        root = work / f"c{s}"
        with Catalog.open(root / "index", read_only=True) as cat:
            vt = join_truth(cat, load_truth(root / "cohort" / "ground_truth.parquet"))
            if without_reports:
                cat.study_reports = lambda keys: pl.DataFrame(  # type: ignore[method-assign]
                    schema={"study_key": pl.Int64, "text": pl.String})
            res = change_metrics(cat, vt, n_boot=n_boot, seed=s)
        Console(width=220).print(format_change_table(res))
        out.append({"seed": s, "reports": not without_reports, **res})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="Folder for the cohorts and indexes (reused).")
    ap.add_argument("--tune", type=int, nargs="*", default=[301, 302, 303])
    ap.add_argument("--report", type=int, nargs="*", default=[401, 402])
    ap.add_argument("--fit", action="store_true", help="Refit the shipped change model on the tuning seeds.")
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--boot", type=int, default=500)
    ap.add_argument("--json", type=Path, help="Write the report cohorts' figures here.")
    ap.add_argument("--without-reports", action="store_true",
                    help="Also measure with the reports hidden (every flag on its fallback weights).")
    a = ap.parse_args()
    os.environ.setdefault("ECHOSEARCH_SECRET", "synthetic-change-measurement-secret-0123456789")
    for s in (*(a.tune if a.fit else []), *a.report):
        build(a.work, s)
    if a.fit:
        fit(a.work, a.tune, a.l2)
    res = report(a.work, a.report, a.boot)
    if a.without_reports:
        res += report(a.work, a.report, a.boot, without_reports=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
