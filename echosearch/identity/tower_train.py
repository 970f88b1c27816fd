"""Fine-tune the last stages of the image tower for identity (``echosearch train-identity --train-stages K``).

The frozen part (stem and early stages) runs once per frame: every encoded video of the index is decoded and
prepared with the index's own frame policy, and its split activations are cached (float16) for ``aug_copies``
versions of the clip: the plain frames and copies under augmentations that keep identity (a probe shifted,
rotated and at another depth by a few pixels / degrees / percent; other gain and gamma), drawn by seed per
video. The copies share the clip's frames (copy ``c`` holds frames ``c, c + A, c + 2A, ...``), so caching costs
one pass of the frozen stages over the clip whatever the number of copies. A step takes a batch of patients, for each of their videos one cached version and a random subset of
its frames, runs the copied stages (:class:`~echosearch.identity.tower.TowerTail`), pools each video's frame
vectors, applies the head, pools each study's videos as the index pools them and applies the same supervised
contrastive loss over studies as the head-only training (positives: the recorded patient's studies from
other visits). Mislabels: a first pass, the identity audit on the training studies' vectors, the suspects
dropped, a second pass from the same initial weights. Held-out patients: cross-visit study-pair AUC every
epoch, beside the content vectors' on the same pairs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from echosearch.catalog import Catalog
from echosearch.errors import EchosearchError
from echosearch.identity.model import IdentityHead
from echosearch.identity.tower import TowerTail, frozen_forward, save_tower, split_point

if TYPE_CHECKING:
    from echosearch.identity.train import IdentityTrainConfig, IdentityTrainResult, Progress
    from echosearch.model.encode import Encoder


@dataclass
class TowerFeatures:
    """Cached split activations per video, (copies, frames / copies, C, H, W) float16, copy 0 plain (or what
    ``reduce`` made of them), in the order of ``video_keys``."""

    acts: list[torch.Tensor]
    video_study: np.ndarray
    study_keys: np.ndarray
    study_patient: np.ndarray
    tower: dict[str, Any]
    split: int
    video_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def augment(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another acquisition of the same heart: probe shifted (<= 6 px), turned (<= 5 deg), depth (+-8 %), gain
    (x0.75-1.3) and gamma (0.8-1.25), the same for every frame of the clip."""
    import cv2

    n, s = frames.shape[0], frames.shape[1]
    angle, scale = rng.uniform(-5, 5), rng.uniform(0.92, 1.08)
    m = np.asarray(cv2.getRotationMatrix2D((s / 2, s / 2), angle, scale), np.float64)
    m[:, 2] += rng.uniform(-6, 6, 2)
    gain, gamma = rng.uniform(0.75, 1.3), rng.uniform(0.8, 1.25)
    lut = np.clip(255.0 * gain * (np.arange(256) / 255.0) ** gamma, 0, 255).astype(np.uint8)
    out = np.empty_like(frames)
    for i in range(n):
        out[i] = cv2.warpAffine(frames[i], m, (s, s), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    return lut[out]


def _split_acts(base: Encoder, frames: np.ndarray, split: int, batch: int = 64) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            out.append(frozen_forward(base.model.visual, base.frames_to_tensor(frames[i:i + batch]), split).cpu())
    return torch.cat(out).to(torch.float16)


def tower_activations(index_dir: Path, cfg: IdentityTrainConfig, progress: Progress | None = None, *,
                      stages: int | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> TowerFeatures:
    """Decode every encoded video of the index once and cache its split activations before the last ``stages``
    stages (default ``cfg.train_stages``), plain + augmented; ``reduce`` (e.g. a frame mean, then no augmented
    copies) maps each video's plain activations (frames, C, H, W) before they are kept."""
    from echosearch.identity.train import by_video, decoded_videos, tower_info
    from echosearch.model.encode import encoder_for_index, load_encoder

    with Catalog.open(index_dir, read_only=True) as cat:
        content = encoder_for_index(cat, device=cfg.device)
        source = str(cat.get_manifest("model_source") or content.name)
        rows = cat.encoded_video_files()
        where = cat.locations([int(r[0]) for r in rows])
    if not rows:
        raise EchosearchError(f"index {index_dir} has no encoded videos: nothing to train on")
    base = content if cfg.init is None else load_encoder(cfg.init, device=cfg.device,
                                                         frames_per_video=content.policy.n_frames)
    info = tower_info(source, cfg.init, base)
    split = split_point(base.model.visual, cfg.train_stages if stages is None else stages)
    got: dict[int, tuple[torch.Tensor, int, int]] = {}
    for item, r in decoded_videos(rows, where, content.policy, cfg.workers, progress):
        key = int(r[0])
        a = 1 if reduce is not None else max(1, min(cfg.aug_copies, len(item.frames)))
        n = len(item.frames) // a
        versions = [item.frames[c::a][:n] if c == 0 else
                    augment(item.frames[c::a][:n], np.random.default_rng([cfg.seed, key, c])) for c in range(a)]
        acts = _split_acts(base, np.concatenate(versions), split)
        kept = reduce(acts) if reduce is not None else acts.reshape(a, n, *acts.shape[1:])
        got[key] = (kept, int(r[4]), int(r[5]))
    video_keys, kept_acts, video_study, study_keys, study_patient = by_video(got)
    return TowerFeatures(acts=kept_acts, video_study=video_study, study_keys=study_keys, study_patient=study_patient,
                         tower=info, split=split, video_keys=video_keys)


class _TowerData:
    """Videos of each study and the cached activations, with study vectors through a tail and a head."""

    def __init__(self, feats: TowerFeatures) -> None:
        self.feats = feats
        self.video_study = torch.from_numpy(feats.video_study)
        self.n_studies = len(feats.study_keys)

    def study_vectors(self, tail: TowerTail, head: IdentityHead, studies: torch.Tensor, frames: int | None = None,
                      gen: torch.Generator | None = None, chunk: int = 512) -> torch.Tensor:
        """Identity vectors of ``studies`` (rows in that order). Training (``gen``): a random cached version and
        ``frames`` random frames per video; evaluation: the plain version, every frame."""
        pos = torch.full((self.n_studies,), -1, dtype=torch.long)
        pos[studies] = torch.arange(len(studies))
        vids = torch.nonzero(pos[self.video_study] >= 0).squeeze(1).tolist()
        xs, owner = [], []
        for j, v in enumerate(vids):
            a = self.feats.acts[v]
            if gen is not None:
                c = int(torch.randint(a.shape[0], (1,), generator=gen))
                idx = torch.randperm(a.shape[1], generator=gen)[:frames or a.shape[1]]
                x = a[c, idx]
            else:
                x = a[0]
            xs.append(x)
            owner.append(torch.full((len(x),), j, dtype=torch.long))
        h = torch.cat(xs)
        fo = torch.cat(owner)
        fv = torch.cat([tail(h[i:i + chunk].float()) for i in range(0, len(h), chunk)])
        vv = torch.nn.functional.normalize(torch.zeros(len(vids), fv.shape[1]).index_add(0, fo, fv), dim=-1)
        z = head(vv)
        out = torch.zeros(len(studies), z.shape[1]).index_add(0, pos[self.video_study[vids]], z)
        return torch.nn.functional.normalize(out, dim=-1)


def _fit(data: _TowerData, tail0: TowerTail, head0: IdentityHead, train_rows: np.ndarray, hold_rows: np.ndarray,
         cfg: IdentityTrainConfig, phase: int, content_auc: float | None, progress: Progress | None,
         history: list[dict[str, float]]) -> tuple[TowerTail, IdentityHead]:
    """One pass from the initial weights (``tail0``, ``head0``) on the studies ``train_rows``."""
    from echosearch.identity.train import contrastive_epoch, epoch_metrics

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    tail, head = copy.deepcopy(tail0), copy.deepcopy(head0)
    opt = torch.optim.AdamW([{"params": tail.parameters(), "lr": cfg.tail_lr},
                             {"params": head.parameters(), "lr": cfg.lr}], weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.tail_lr, cfg.lr], total_steps=max(total, 1),
                                                pct_start=0.1)
    feats = data.feats
    patients = feats.study_patient[train_rows]
    uniq = np.unique(patients)
    rows_of = {int(p): torch.from_numpy(train_rows[patients == p]) for p in uniq}
    labels = torch.from_numpy(feats.study_patient)
    step, t0 = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        tail.train()
        head.train()
        losses, step = contrastive_epoch(
            cfg, uniq, rows_of, gen, labels, opt, sched,
            lambda studies: data.study_vectors(tail, head, studies, cfg.frames_per_step, gen),
            [*tail.parameters(), *head.parameters()], progress, phase, step, total)
        tail.eval()
        head.eval()
        with torch.no_grad():
            zh = data.study_vectors(tail, head, torch.from_numpy(hold_rows)).numpy() if len(hold_rows) else None
        metrics = epoch_metrics(phase, epoch, losses, t0, zh, feats.study_patient[hold_rows], content_auc)
        history.append(metrics)
        if progress:
            progress("epoch", epoch + 1, cfg.epochs, metrics)
    return tail, head


def train_tower(index_dir: Path, out_dir: Path, cfg: IdentityTrainConfig, result: IdentityTrainResult,
                progress: Progress | None = None, features: TowerFeatures | None = None,
                provenance: dict[str, Any] | None = None) -> IdentityTrainResult:
    """Fine-tune the last ``cfg.train_stages`` stages and a head on the index's recorded patients; save an identity
    tower folder to ``out_dir``. ``features``: cached activations (:func:`tower_activations`) to reuse."""
    from echosearch.identity.matching import StudySet
    from echosearch.identity.mislabels import score_studies
    from echosearch.identity.train import holdout_split, training_record
    from echosearch.model.encode import load_encoder

    if cfg.pool != "video":
        raise EchosearchError("an identity tower pools its frame vectors per video before its head (--pool video)")
    t0 = time.perf_counter()
    feats = features or tower_activations(index_dir, cfg, progress)
    held, train_rows, hold_rows, content_auc = holdout_split(index_dir, feats.study_keys, feats.study_patient,
                                                             cfg.holdout, cfg.seed)
    base = load_encoder(str(feats.tower["model"]), device="cpu")
    if base.identity["weights_sha256"] != feats.tower["weights_sha256"]:
        raise EchosearchError(f"the cached activations were computed with other weights than {feats.tower['model']}")
    torch.manual_seed(cfg.seed)
    tail0 = TowerTail(base.model.visual, feats.split)
    head0 = IdentityHead(tail0.out_dim, cfg.out_dim, cfg.hidden, cfg.residual, "video")
    data = _TowerData(feats)
    result.content_auc = content_auc
    result.n_holdout_studies, result.n_holdout_patients = int(hold_rows.size), int(held.size)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        tail, head = _fit(data, tail0, head0, train_rows, hold_rows, cfg, 1, content_auc, progress, result.history)
        if cfg.clean:
            with torch.no_grad():
                z = data.study_vectors(tail, head, torch.from_numpy(train_rows)).numpy()
            S = StudySet(feats.study_keys[train_rows], np.ascontiguousarray(z), feats.study_patient[train_rows],
                         pl.DataFrame(), "identity")
            suspect = score_studies(S, fpr=cfg.clean_fpr)["suspect"]
            result.dropped_study_keys = [int(k) for k in feats.study_keys[train_rows][suspect]]
            if suspect.any():
                train_rows = train_rows[~suspect]
                tail, head = _fit(data, tail0, head0, train_rows, hold_rows, cfg, 2, content_auc, progress,
                                  result.history)
    finally:
        torch.use_deterministic_algorithms(prev)
    result.n_train_studies = int(train_rows.size)
    result.identity_auc = result.history[-1].get("heldout_auc") if result.history else None
    result.seconds = round(time.perf_counter() - t0, 2)
    training = training_record(index_dir, cfg, result, content_auc, provenance)
    save_tower(Path(out_dir), tail.eval(), head.eval(), feats.tower, training)
    return result
