"""Model quality over several fresh small cohorts: is a recipe better, or was one cohort lucky?

One 14-patient cohort holds one or two patients per finding, so its text->video recall@10 moves by 0.05-0.1
between cohorts and between training seeds (docs/training.md). This evaluates each model on the same N
fresh cohorts shaped like the test's (14 patients, 2-4 visits, A4C + PLAX, 10 % mislabelled), each indexed
through the real pipeline, and prints per-cohort rows and the mean and spread of each figure; with two
models, their paired difference per cohort. Cohort seeds are disjoint from the training, test and demo
seeds; keep validation seeds (for choosing a recipe) and report seeds apart. Usage:

    .venv/bin/python bench/model_quality.py                                  # shipped model, 6 cohorts
    .venv/bin/python bench/model_quality.py --model local-dir:NEW --baseline echosearch-demo --cohorts 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FIGURES = ("mean", "mean_clip_only", "mean_in_view", "ef_mae", "identity_auc")


def evaluate_model(model: str, seeds: list[int], work: Path, patients: int, workers: int) -> list[dict[str, Any]]:
    """One row per cohort: recall@10 per finding and its mean, zero-shot EF MAE, same-patient AUC."""
    from echosearch.config import load_settings
    from echosearch.evaluation.core import evaluate
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    rows = []
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in model)
    for seed in seeds:
        cohort = work / f"cohort-{patients}-{seed}"
        if not (cohort / "ground_truth.parquet").exists():
            generate_cohort(cohort, patients=patients, seed=seed, visits=(2, 4), views=("A4C", "PLAX"),
                            mislabel_rate=0.1, workers=workers)
        idx = work / f"index-{tag}-{patients}-{seed}"
        shutil.rmtree(idx, ignore_errors=True)
        t0 = time.time()
        index_sources([cohort], idx, load_settings(mode="demo", workers=workers, model=model), progress=False)
        r = evaluate(idx, truth=cohort / "ground_truth.parquet")
        tv = r["retrieval"]["text_to_video"]
        row: dict[str, Any] = {"seed": seed, "mean": tv["mean"], "mean_clip_only": tv.get("mean_clip_only"),
                               "mean_in_view": tv.get("mean_in_view"), "ef_mae": r["zero_shot"]["ef_mae"],
                               "identity_auc": r["echosearch"]["identity"]["study_patient_auc"]}
        row |= {name: v["recall_at_10"] for name, v in tv.items() if isinstance(v, dict)}
        rows.append(row)
        print(f"  {model} cohort {seed}: " + " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "seed")
              + f" ({time.time() - t0:.0f} s)", flush=True)
        shutil.rmtree(idx, ignore_errors=True)
    return rows


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and count of every figure over the cohorts where it was measured."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "seed"]
    out = {}
    for k in keys:
        x = np.array([r[k] for r in rows if r.get(k) is not None], dtype=float)
        if x.size:
            out[k] = {"mean": round(float(x.mean()), 4), "sd": round(float(x.std(ddof=1)) if x.size > 1 else 0.0, 4),
                      "n": int(x.size)}
    return out


def paired(rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-cohort differences model - baseline (same cohorts): mean, sd and how many cohorts improved."""
    by_seed = {r["seed"]: r for r in base}
    out = {}
    for k in FIGURES:
        d = np.array([r[k] - by_seed[r["seed"]][k] for r in rows
                      if r.get(k) is not None and by_seed.get(r["seed"], {}).get(k) is not None], dtype=float)
        if d.size:
            better = (d < 0) if k == "ef_mae" else (d > 0)
            out[k] = {"mean_diff": round(float(d.mean()), 4), "sd": round(float(d.std(ddof=1)) if d.size > 1 else 0.0, 4),
                      "cohorts_better": int(better.sum()), "n": int(d.size)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="echosearch-demo")
    ap.add_argument("--baseline", help="a second model evaluated on the same cohorts (paired differences)")
    ap.add_argument("--cohorts", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=70001, help="cohort seeds are first-seed, first-seed+1, ...")
    ap.add_argument("--patients", type=int, default=14)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--work", type=Path, default=Path(".bench-cache/model-quality"))
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    os.environ.setdefault("ECHOSEARCH_SECRET", "model-quality-bench-synthetic-only")
    seeds = list(range(a.first_seed, a.first_seed + a.cohorts))
    a.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"seeds": seeds, "patients": a.patients}
    rows = evaluate_model(a.model, seeds, a.work, a.patients, a.workers)
    result[a.model] = {"cohorts": rows, "summary": summarise(rows)}
    if a.baseline:
        base = evaluate_model(a.baseline, seeds, a.work, a.patients, a.workers)
        result[a.baseline] = {"cohorts": base, "summary": summarise(base)}
        result["paired"] = paired(rows, base)
    for name in [a.model] + ([a.baseline] if a.baseline else []):
        s = result[name]["summary"]
        print(f"{name} over {len(seeds)} cohorts of {a.patients} patients: "
              + ", ".join(f"{k} {s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" for k in FIGURES if k in s))
        print("  recall@10 per finding: " + ", ".join(f"{k} {v['mean']:.2f}" for k, v in s.items() if k not in FIGURES))
    if a.baseline:
        for k, v in result["paired"].items():
            print(f"paired {k}: {a.model} - {a.baseline} = {v['mean_diff']:+.3f} ± {v['sd']:.3f} "
                  f"(better on {v['cohorts_better']} of {v['n']} cohorts)")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
