"""Which tower features carry a patient's identity: identity-map variants fitted on one synthetic cohort and
measured on others, without building an index (issue 24).

Each cohort (``echosearch synth`` folder with its ``ground_truth.parquet``) is decoded once with the demo model;
per video the activations before the tower's last stage are cached (``--cache``): the frame-mean map (160 x 7 x
7 on the demo tower, what ``train-identity --method map`` projects) and the frame-mean *centred Gram matrix* of
the same activations (channel x channel covariance over positions: a texture descriptor that does not move when
the heart sits elsewhere in the sector). Variants are fitted in closed form (``identity.map.fit_projection``,
classes = recorded patient x view) on the training cohort and scored on each test cohort by true patient:

- ``all``: cross-visit study-pair AUC over every pair of two studies (what ``eval`` reports first);
- ``same heart``: the same negatives, positives across a transplant left out (a donor heart's images carry
  none of the recipient's identity: those pairs sit near chance whatever the encoder);
- ``top-1``: re-identification of studies whose true patient has 2+ other studies (mean of the two best);
- study vectors as the index pools them (mean of the videos' vectors) and view-slotted (each view centred on
  its training mean, one slot per view, so that only like views are compared).

    python bench/identity_features.py --train c600 --test d5201 d6201 --cache CACHE_DIR [--components 256 512]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from echosearch.identity import calibration as cal
from echosearch.identity.map import fit_projection


def decode_plan(cohort: Path) -> tuple[pl.DataFrame, list[Any], dict[str, int], Any, int]:
    """(truth rows of the cohort's DICOM videos, their file records, truth row by path, the demo encoder, the
    split before its last stage): what a bench needs to decode a synthetic cohort without an index."""
    from echosearch.identity.tower import split_point
    from echosearch.ingest.discover import FileRecord, sniff_kind
    from echosearch.model.encode import load_encoder

    gt = pl.read_parquet(cohort / "ground_truth.parquet").filter(pl.col("format") == "dicom")
    enc = load_encoder("echosearch-demo", device="cpu")
    records = []
    for p in gt["path"]:
        f = cohort / p
        with f.open("rb") as fh:
            records.append(FileRecord(path=f, size=f.stat().st_size, sha256=str(f), kind=sniff_kind(fh.read(200))))
    row_of = {str(cohort / p): i for i, p in enumerate(gt["path"])}
    return gt, records, row_of, enc, split_point(enc.model.visual, 1)


def cache_features(cohort: Path, cache: Path, workers: int) -> dict[str, Any]:
    """Frame-mean maps, centred Gram features and truth of every DICOM video of ``cohort`` (cached)."""
    out = cache / cohort.name
    if (out / "meta.parquet").exists():
        return {"map": np.load(out / "map.npy"), "gram": np.load(out / "gram.npy"),
                "meta": pl.read_parquet(out / "meta.parquet")}
    from echosearch.identity.tower import frozen_forward
    from echosearch.run.read import FailedFile
    from echosearch.run.workers import iter_processed

    gt, records, row_of, enc, split = decode_plan(cohort)
    maps, grams, rows = [], [], []
    iu = None
    t0 = time.perf_counter()
    for n, item in enumerate(iter_processed(records, enc.policy, workers), 1):
        if isinstance(item, FailedFile):
            continue
        with torch.no_grad():
            x = enc.frames_to_tensor(item.frames)
            h = frozen_forward(enc.model.visual, x, split).float()  # (frames, C, H, W)
        f = h.flatten(2)
        c = f - f.mean(2, keepdim=True)
        g = (c @ c.transpose(1, 2)).mean(0) / f.shape[2]
        iu = iu if iu is not None else torch.triu_indices(g.shape[0], g.shape[0])
        maps.append(h.mean(0).flatten().numpy())
        grams.append(g[iu[0], iu[1]].numpy())
        rows.append(row_of[str(item.record.path)])
        if n % 500 == 0:
            print(f"  {cohort.name}: {n}/{len(records)} videos, {time.perf_counter() - t0:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    got = {"map": np.stack(maps), "gram": np.stack(grams),
           "meta": gt[rows].select("study_uid", "true_patient_id", "recorded_patient_id", "heart_id", "view")}
    np.save(out / "map.npy", got["map"])
    np.save(out / "gram.npy", got["gram"])
    got["meta"].write_parquet(out / "meta.parquet")  # last: its presence marks a complete cache
    return got


def study_vectors(z: np.ndarray, meta: pl.DataFrame, view_mean: dict[str, np.ndarray] | None) -> tuple[np.ndarray, pl.DataFrame]:
    """Study vectors (rows: studies sorted by UID) from video vectors ``z``: the mean, or view slots."""
    studies, row = np.unique(meta["study_uid"].to_numpy(), return_inverse=True)
    views = meta["view"].to_numpy()
    if view_mean is None:
        out = np.zeros((studies.size, z.shape[1]))
        np.add.at(out, row, z)
    else:
        names = sorted(view_mean)
        out = np.zeros((studies.size, len(names) * z.shape[1]))
        for k, v in enumerate(names):
            r = views == v
            c = z[r] - view_mean[v]
            np.add.at(out[:, k * z.shape[1]:(k + 1) * z.shape[1]], row[r], c / np.linalg.norm(c, axis=1, keepdims=True))
    first = meta.with_columns(pl.Series("_row", row)).unique("_row", keep="first").sort("_row")
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12), first


def scores(S: np.ndarray, st: pl.DataFrame) -> tuple[float, float, float]:
    """(all-pairs AUC, same-heart AUC, re-identification top-1) by true patient."""
    pid = st["true_patient_id"].to_numpy()
    heart = st["heart_id"].cast(pl.String).to_numpy()
    i, j = np.triu_indices(len(S), 1)
    c = np.einsum("ij,ij->i", S[i], S[j])
    same, same_heart = pid[i] == pid[j], heart[i] == heart[j]
    sims = S @ S.T
    np.fill_diagonal(sims, -np.inf)
    patients = np.unique(pid)
    hits = n = 0
    for q in range(len(S)):
        if (pid == pid[q]).sum() < 3:
            continue
        best = [np.sort(sims[q, pid == p])[::-1][:2] for p in patients]
        score = [b[np.isfinite(b)].mean() if np.isfinite(b).any() else -np.inf for b in best]
        n += 1
        hits += patients[int(np.argmax(score))] == pid[q]
    return (cal.auc(c[same], c[~same]), cal.auc(c[same & same_heart], c[~same]), hits / max(n, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--test", type=Path, nargs="+", required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--components", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(max(1, a.workers))
    tr = cache_features(a.train, a.cache, a.workers)
    tests = [cache_features(c, a.cache, a.workers) for c in a.test]
    classes = (tr["meta"]["recorded_patient_id"] + "|" + tr["meta"]["view"]).to_numpy()
    variants = {"map": lambda d: d["map"], "map + gram": lambda d: np.concatenate([d["map"], d["gram"]], 1)}
    print("variant | components | study vector | " + " | ".join(f"{c.name}: all / same heart / top-1" for c in a.test))
    for name, feat in variants.items():
        for k in a.components:
            proj = fit_projection(feat(tr), classes, k, 0.01)
            z_tr = proj(feat(tr))
            view_mean = {v: z_tr[(tr["meta"]["view"] == v).to_numpy()].mean(0) for v in tr["meta"]["view"].unique()}
            for pooling, vm in (("mean", None), ("view slots", view_mean)):
                cells = []
                for d in tests:
                    S, st = study_vectors(proj(feat(d)), d["meta"], vm)
                    every, same, top1 = scores(S, st)
                    cells.append(f"{every:.3f} / {same:.3f} / {top1:.2f}")
                print(f"{name} | {k} | {pooling} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
