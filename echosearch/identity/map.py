"""Identity maps: a closed-form projection of the image tower's activation maps (``train-identity --method map``).

The tower's output vector max-pools away *where* things are, and where a heart sits in the sector (its
orientation, apex depth, chamber proportions) is much of what tells one patient from another. An identity map
keeps it: a video's map is the frame-mean of the tower's activations before its last ``map_stages`` stages
(C x H x W, flattened; 160 x 7 x 7 on the demo model), and its identity vector is a linear projection of that
map, fitted in closed form on the archive's own recorded patients:

1. standardise each feature, then PCA-whiten to ``components`` dimensions (training videos);
2. whiten the within-class scatter: classes are (recorded patient, view), so what varies between visits of one
   patient's view (drift, dilation, probe placement) is shrunk and what differs between patients kept
   (Fisher's linear discriminant with every direction kept, ridge ``reg`` on the scatter).

The vector is L2-normalised; a study's is the mean of its videos', as for every level. Deterministic, no
learning rate, seconds to fit; the cost at indexing is one matrix product per video on activations the content
encoder computed anyway (a shared tap). Mislabels: fitted once, the audit runs on the training studies, its
suspects are dropped and the projection is fitted again. Held-out patients are never fitted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from echosearch.errors import EchosearchError, ModelLoadError

if TYPE_CHECKING:
    from echosearch.identity.model import IdentityEncoder
    from echosearch.identity.train import IdentityTrainConfig, IdentityTrainResult, Progress
    from echosearch.model.encode import Encoder

MAP_FORMAT = "echosearch-identity-map"
MAP_WEIGHTS = "identity_map.safetensors"


@dataclass
class MapProjection:
    """x (flattened map) -> L2-normalised ``(x - mean) / scale @ proj``."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    proj: np.ndarray  # (D, out)

    @property
    def out_dim(self) -> int:
        return int(self.proj.shape[1])

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        x = (np.asarray(maps, np.float32).reshape(len(maps), -1) - self.mean) / self.scale
        z = x @ self.proj
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def fit_projection(maps: np.ndarray, classes: np.ndarray, components: int = 256, reg: float = 0.01) -> MapProjection:
    """Standardise, PCA-whiten to ``components`` and whiten the within-class scatter of ``classes`` (labels of
    the rows of ``maps``; classes with one row add nothing to the scatter)."""
    x = np.asarray(maps, np.float64).reshape(len(maps), -1)
    mean = x.mean(0)
    scale = x.std(0) + 1e-3
    z = (x - mean) / scale
    k = int(min(components, len(z) - 1, z.shape[1]))
    if k < 2:
        raise EchosearchError(f"too few videos ({len(z)}) to fit an identity map")
    _u, s, vt = np.linalg.svd(z, full_matrices=False)
    pca = vt[:k].T / np.maximum(s[:k] / np.sqrt(len(z)), 1e-9)
    w = z @ pca
    scatter = np.zeros((k, k))
    n = 0
    for c in np.unique(classes):
        rows = w[classes == c]
        if len(rows) >= 2:
            d = rows - rows.mean(0)
            scatter += d.T @ d
            n += len(rows) - 1
    if n == 0:
        raise EchosearchError("no patient has two or more studies of one view: nothing to fit an identity map on")
    scatter = scatter / n + reg * np.eye(k)
    whiten = np.linalg.inv(np.linalg.cholesky(scatter)).T
    return MapProjection(mean.astype(np.float32), scale.astype(np.float32), (pca @ whiten).astype(np.float32))


def frame_mean_map(acts: torch.Tensor) -> torch.Tensor:
    """A video's map: the mean of its frames' activations (frames, C, H, W) -> (1, 1, C, H, W) float16."""
    return acts.float().mean(0, keepdim=True).unsqueeze(0).to(torch.float16)


class MapRunner:
    """Identity vectors of videos from the base tower's split activations (the content encoder's, through its
    tap, when the base is the content model)."""

    def __init__(self, base: Encoder, split: int, projection: MapProjection, shared: bool) -> None:
        from echosearch.identity.tower import SplitActivations

        self.acts = SplitActivations(base, split, shared)
        self.projection = projection

    def video_vectors(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        return self.projection(np.stack([h.mean(0).flatten().numpy() for h in self.acts.per_clip(frames)]))


def save_map(folder: Path, projection: MapProjection, tower: dict[str, Any], split: int, map_stages: int,
             map_shape: Sequence[int], training: dict[str, Any]) -> Path:
    """Write an identity map folder (``identity_head.json`` + ``identity_map.safetensors``), swapped in whole."""
    from safetensors.numpy import save_file

    from echosearch.identity.model import HEAD_CONFIG

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp-identity")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({"mean": projection.mean, "scale": projection.scale, "proj": projection.proj}, str(tmp / MAP_WEIGHTS))
    os.chmod(tmp / MAP_WEIGHTS, 0o644)
    cfg = {"format": MAP_FORMAT, "version": 1, "name": folder.name, "tower": tower,
           "map": {"split": split, "stages": map_stages, "shape": list(map_shape), "out_dim": projection.out_dim},
           "training": training}
    (tmp / HEAD_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    old = folder.with_name(folder.name + ".old-identity")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_projection(folder: Path) -> MapProjection:
    from safetensors.numpy import load_file

    try:
        w = load_file(str(folder / MAP_WEIGHTS))
        return MapProjection(w["mean"], w["scale"], w["proj"])
    except (OSError, KeyError) as exc:
        raise ModelLoadError(f"could not load the identity map in {folder}: {type(exc).__name__}: {exc}") from exc


def load_map_encoder(folder: Path, cfg: dict[str, Any], content: Encoder, device: str = "auto") -> IdentityEncoder:
    """The identity encoder of a map folder on its base tower (the content encoder itself when the weights are
    the same, so that the tower runs once per frame)."""
    from echosearch.identity.model import IdentityEncoder, base_tower
    from echosearch.model.models import weights_sha256

    tower_info = dict(cfg.get("tower") or {})
    base, shared = base_tower(tower_info, content, device, f"the identity map {folder} was fitted on")
    try:
        spec = cfg["map"]
        split, shape = int(spec["split"]), [int(v) for v in spec["shape"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{folder} has no valid identity map settings: {exc}") from exc
    projection = load_projection(folder)
    if projection.proj.shape[0] != int(np.prod(shape)):
        raise ModelLoadError(f"the identity map in {folder} expects {shape} maps, its weights another size")
    digest = hashlib.sha256(weights_sha256(folder / MAP_WEIGHTS).encode()).hexdigest()
    return IdentityEncoder(str(cfg.get("name") or folder.name), str(folder.resolve()), "map", None, None,
                           {**tower_info, "split": split, "map_stages": int(spec.get("stages", 1))}, digest,
                           projection.out_dim, policy=content.policy,
                           maps=MapRunner(base, split, projection, shared))


def _video_classes(index_dir: Path, video_keys: np.ndarray, video_patient: np.ndarray) -> np.ndarray:
    """(recorded patient, view) of each video: the view labelled in the catalog, else the scope's, else '?'."""
    from echosearch.catalog import Catalog

    with Catalog.open(index_dir, read_only=True) as cat:
        views = cat.best_views()
    return np.array([f"{int(p)}|{views.get(int(k)) or '?'}" for k, p in zip(video_keys, video_patient, strict=True)])


def train_map(index_dir: Path, out_dir: Path, cfg: IdentityTrainConfig, result: IdentityTrainResult,
              progress: Progress | None = None, provenance: dict[str, Any] | None = None) -> IdentityTrainResult:
    """Fit an identity map on the index's recorded patients (held-out patients never fitted on; a cleaning pass
    without the studies the audit suspects) and save it to ``out_dir``."""
    import polars as pl

    from echosearch.identity.matching import StudySet
    from echosearch.identity.mislabels import score_studies
    from echosearch.identity.tower_train import tower_activations
    from echosearch.identity.train import holdout_split, pair_auc, training_record

    t0 = time.perf_counter()
    feats = tower_activations(index_dir, cfg, progress, stages=cfg.map_stages, reduce=frame_mean_map)
    maps = np.stack([a[0, 0].float().flatten().numpy() for a in feats.acts])
    shape = tuple(feats.acts[0].shape[2:])
    video_patient = feats.study_patient[feats.video_study]
    classes = _video_classes(index_dir, feats.video_keys, video_patient)
    held, train_rows, hold_rows, content_auc = holdout_split(index_dir, feats.study_keys, feats.study_patient,
                                                             cfg.holdout, cfg.seed)
    result.content_auc = content_auc
    result.n_holdout_studies, result.n_holdout_patients = int(hold_rows.size), int(held.size)

    def study_vectors(proj: MapProjection, rows: np.ndarray) -> np.ndarray:
        vids = np.nonzero(np.isin(feats.video_study, rows))[0]
        z = proj(maps[vids])
        pos = np.searchsorted(rows, feats.video_study[vids])
        out = np.zeros((len(rows), z.shape[1]), np.float64)
        np.add.at(out, pos, z)
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def fit(rows: np.ndarray, phase: int) -> MapProjection:
        t = time.perf_counter()
        vids = np.isin(feats.video_study, rows)
        proj = fit_projection(maps[vids], classes[vids], cfg.components, cfg.reg)
        metrics: dict[str, float] = {"pass": float(phase), "epoch": 1.0, "loss": 0.0,
                                     "seconds": round(time.perf_counter() - t, 2)}
        auc = pair_auc(study_vectors(proj, hold_rows), feats.study_patient[hold_rows]) if hold_rows.size else None
        if auc is not None:
            metrics["heldout_auc"] = auc
        if content_auc is not None:
            metrics["content_auc"] = content_auc
        result.history.append(metrics)
        if progress:
            progress("epoch", 1, 1, metrics)
        return proj

    proj = fit(train_rows, 1)
    if cfg.clean:
        z = study_vectors(proj, train_rows)
        S = StudySet(feats.study_keys[train_rows], z, feats.study_patient[train_rows], pl.DataFrame(), "identity")
        suspect = score_studies(S, fpr=cfg.clean_fpr)["suspect"]
        result.dropped_study_keys = [int(k) for k in feats.study_keys[train_rows][suspect]]
        if suspect.any():
            train_rows = train_rows[~suspect]
            proj = fit(train_rows, 2)
    result.n_train_studies = int(train_rows.size)
    result.identity_auc = result.history[-1].get("heldout_auc") if result.history else None
    result.seconds = round(time.perf_counter() - t0, 2)
    training = training_record(index_dir, cfg, result, content_auc, provenance)
    save_map(Path(out_dir), proj, feats.tower, feats.split, cfg.map_stages, shape, training)
    return result
