"""Rebuild the shipped ``echosearch-demo`` model: documented cohort, seed and training run.

``python -m echosearch.model.demo_model --out echosearch/data/echosearch-demo`` (``make demo-model``):
1. generates the training cohort (``TRAIN_COHORT``; seeds disjoint from the demo and test cohorts),
2. scans it into a temporary index (reports attached from the cohort's ``reports.csv``),
3. trains the demo architecture from scratch with ``TRAIN_CONFIG`` and writes fp16 weights.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

TRAIN_COHORT: dict[str, Any] = {"patients": 260, "seed": 9001, "visits": (1, 5), "views": ("A4C", "PLAX", "A2C"),
                                "mislabel_rate": 0.0, "size": "small"}
TRAIN_EPOCHS = 23
TRAIN_SEED = 7
CLIP_EPOCHS = 5  # the last epochs train 3-frame clips pooled like the index's video vectors


def build(out: Path, workdir: Path | None = None, epochs: int = TRAIN_EPOCHS, patients: int | None = None) -> Path:
    """Generate, scan and train; returns the model folder."""
    from echosearch.catalog import Catalog
    from echosearch.config import load_settings
    from echosearch.ingest.frame_policy import resolve_frame_policy
    from echosearch.model.models import REGISTRY
    from echosearch.model.train import TrainConfig, train
    from echosearch.run.local import scan
    from echosearch.synth import generate_cohort

    tmp = Path(workdir or tempfile.mkdtemp(prefix="echosearch-demo-model-"))
    cohort = tmp / "cohort"
    kw = dict(TRAIN_COHORT)
    if patients:
        kw["patients"] = patients
    t0 = time.time()
    if not (cohort / "ground_truth.parquet").exists():
        generate_cohort(cohort, **kw)
    print(f"cohort ready in {time.time() - t0:.0f} s")
    # a fixed key: this throwaway index holds synthetic patients only, and re-runs must reuse it
    settings = load_settings(mode="demo", workers=2, secret="demo-model-training-synthetic-only")
    with Catalog.open(tmp / "index", create=True) as cat:
        policy = resolve_frame_policy(REGISTRY["echosearch-demo"], n_frames=8, size=112)  # the demo's own: sector
        summary = scan([cohort], cat, settings, policy=policy, progress=True)
    print(f"scanned {summary.videos_added} videos, {summary.reports_attached} reports in {time.time() - t0:.0f} s")

    def progress(phase: str, i: int, n: int, metrics: dict[str, float]) -> None:
        if phase == "epoch":
            print(f"epoch {i}/{n} " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)

    stage = tmp / "model"
    cfg = TrainConfig(epochs=epochs, seed=TRAIN_SEED, workers=2, clip_epochs=CLIP_EPOCHS)
    train(tmp / "index", stage, cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy2(stage / name, out / name)
    print(f"demo model written to {out} in {time.time() - t0:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--epochs", type=int, default=TRAIN_EPOCHS)
    ap.add_argument("--patients", type=int)
    a = ap.parse_args()
    build(a.out, a.workdir, a.epochs, a.patients)


if __name__ == "__main__":
    main()
