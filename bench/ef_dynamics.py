"""EF from how the tower's activations move over the cardiac cycle, against EF from the content vectors (issue 25).

The change scan's EF evidence is a report-trained ridge probe on each clip's content vector (``change/probes.py``),
~8 points of EF off per study with the demo model: a content vector is a frame *mean*, and EF is a ratio of the
largest to the smallest ventricle over the cycle, which a mean hides. This bench fits the same kind of probe (per
view, ridge on PCA of standardised features, labels = the EF each study's *report* states) on one cohort and
measures the study-level error against the true EF on others, for three inputs computed in one decoding pass:

- ``content``: the clip's content vector (mean of its frame vectors, L2-normalised), what the probes use today;
- ``dynamics, channels``: the activations before the tower's last stage, averaged over positions per channel,
  then their mean and standard deviation over the clip's frames (2 x 160 values on the demo tower);
- ``dynamics, 3 x 3``: the same on a 3 x 3 grid of the map (2 x 160 x 9 values).

    python bench/ef_dynamics.py --train c60 --test d5201 d6201 --cache CACHE_DIR

(cohorts: ``echosearch synth`` folders with ``ground_truth.parquet``; the train cohort plays an archive whose
reports label its own studies.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from echosearch.change.probes import CYCLE_COMPONENTS, CYCLE_RIDGE, pca_ridge
from echosearch.model.cycle import cycle_vector
from echosearch.model.report_facts import report_ef

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script or imported by a test
    sys.path.append(str(Path(__file__).resolve().parent))
from identity_features import decode_plan  # noqa: E402  (the same cohort decoding as the identity bench)

KINDS = ("content", "dynamics, channels", "dynamics, 3 x 3")


def cache_features(cohort: Path, cache: Path, workers: int) -> tuple[dict[str, np.ndarray], pl.DataFrame]:
    """Per DICOM video of ``cohort``: each input of ``KINDS`` and its truth row (cached under ``cache``)."""
    out = cache / cohort.name
    if (out / "meta.parquet").exists():
        return {k: np.load(out / f"{i}.npy") for i, k in enumerate(KINDS)}, pl.read_parquet(out / "meta.parquet")
    from echosearch.identity.tower import frozen_forward
    from echosearch.run.read import FailedFile
    from echosearch.run.workers import iter_processed

    gt, records, row_of, enc, split = decode_plan(cohort)
    feats: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
    rows = []
    for item in iter_processed(records, enc.policy, workers):
        if isinstance(item, FailedFile):
            continue
        v = enc.encode_frames(item.frames).mean(0)
        with torch.no_grad():
            h = frozen_forward(enc.model.visual, enc.frames_to_tensor(item.frames), split).float()
        chan = h.mean((2, 3))
        feats["content"].append(v / np.linalg.norm(v))
        feats["dynamics, channels"].append(torch.cat([chan.mean(0), chan.std(0)]).numpy())
        feats["dynamics, 3 x 3"].append(cycle_vector(h))  # what indexing stores (video_cycle)
        rows.append(row_of[str(item.record.path)])
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.stack(v) for k, v in feats.items()}
    for i, k in enumerate(KINDS):
        np.save(out / f"{i}.npy", arrays[k])
    meta = gt[rows].select("study_uid", "true_patient_id", "view", "ef", "report")
    meta.write_parquet(out / "meta.parquet")  # last: its presence marks a complete cache
    return arrays, meta


def ridge(x: np.ndarray, y: np.ndarray, components: int = CYCLE_COMPONENTS, lam: float = CYCLE_RIDGE
          ) -> Callable[[np.ndarray], np.ndarray]:
    """The change scan's cycle probe: ridge on the leading principal components of the standardised features."""
    return pca_ridge(x, y, lam, components)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, nargs="+", required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(max(1, a.workers))
    x_tr, m_tr = cache_features(a.train, a.cache, a.workers)
    stated = np.array([report_ef(t) for t in m_tr["report"].to_list()], dtype=object)
    labelled = np.array([s is not None for s in stated])
    y_tr = np.array([float(s) if s is not None else np.nan for s in stated])
    tests = [cache_features(c, a.cache, a.workers) for c in a.test]
    print(f"train {a.train.name}: {m_tr['true_patient_id'].n_unique()} patients, {int(labelled.sum())} clips with a "
          "report-stated EF; study-level mean absolute error against the true EF (points):")
    print("input | " + " | ".join(c.name for c in a.test))
    for kind in KINDS:
        cells = []
        for x_te, m_te in tests:
            pred = np.full(m_te.height, np.nan)
            for view in m_tr["view"].unique().to_list():
                fit = (m_tr["view"] == view).to_numpy() & labelled
                on = (m_te["view"] == view).to_numpy()
                if fit.sum() >= 10 and on.any():
                    pred[on] = ridge(x_tr[kind][fit], y_tr[fit])(x_te[kind][on])
            study = (m_te.with_columns(pl.Series("pred", pred)).drop_nans("pred")
                     .group_by("study_uid").agg(pl.col("pred").mean(), pl.col("ef").mean()))
            err = np.abs(study["pred"].to_numpy() - study["ef"].to_numpy()).mean()
            cells.append(f"{err:.2f} ({study.height} studies)")
        print(f"{kind} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
