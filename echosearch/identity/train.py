"""Train an identity head from an index's own recorded patient IDs (``echosearch train-identity``).

The image tower stays frozen: every video is decoded and prepared once (the index's own frame policy) and
its frame vectors are computed once and held in memory, so training is a small model on cached features
(seconds to minutes on a CPU). A step takes a batch of patients, pools a random subset of each video's
frame vectors (augmentation: a visit never shows the same frames), applies the head, pools each study's
videos as the index pools them, and applies a supervised contrastive (InfoNCE) loss over studies: the
other studies of the same recorded patient are the positives, the other patients' studies the negatives.
Rows are studies, so same-study pairs never occur.

Mislabels: a few percent of studies carry another patient's ID. After a first pass, the identity audit
(:func:`echosearch.identity.score_studies`) runs on the training studies' head vectors; its suspects are
dropped and the head is trained again from the same initial weights on the rest.

Held-out: a fixed fraction of the patients (by seed) is never trained on; per epoch the study-pair AUC
over their studies (every pair of different studies, same recorded patient against different patients) is
reported for the head and, on the same pairs, for the index's content vectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from echosearch.catalog import Catalog
from echosearch.errors import EchosearchError
from echosearch.identity import calibration as cal
from echosearch.identity.model import IdentityHead, save_head

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, dict[str, float]], None]


@dataclass
class IdentityTrainConfig:
    method: str = "map"  # map (closed form, echosearch.identity.map) | head; train_stages > 0: a tower
    components: int = 256  # map: PCA dimensions kept (the identity vector's width)
    reg: float = 0.01  # map: ridge on the within-patient scatter (in whitened units)
    map_stages: int = 1  # map: the map is taken before the tower's last K stages
    epochs: int = 5  # measured: more passes over a cohort of 100-odd patients overfit it (docs/longitudinal.md)
    seed: int = 0
    init: str | None = None  # image tower (model name / local-dir:DIR); None = the index's content model
    out_dim: int = 128
    hidden: int = 256  # 0 = a linear projection
    residual: bool = True  # x + MLP(x), starting from the tower's own vectors (out_dim = the tower's width)
    pool: str = "video"  # "frame": the head maps frame vectors, pooled after it
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    batch_patients: int = 32
    steps_per_epoch: int = 20
    frame_keep: float = 0.5  # share of a video's frames pooled per step (augmentation)
    holdout: float = 0.25  # share of patients (with 2+ studies) held out
    clean: bool = True  # second pass without the studies the audit suspects
    clean_fpr: float = 0.02
    train_stages: int = 0  # > 0: fine-tune a copy of the tower's last K stages too (echosearch.identity.tower_train)
    tail_lr: float = 3e-4  # learning rate of the copied stages
    aug_copies: int = 2  # cached versions of each clip: plain + augmented copies (tower training)
    frames_per_step: int = 4  # frames of each video per training step (tower training)
    workers: int = 1
    device: str = "cpu"


@dataclass
class Features:
    """Frozen tower frame vectors per video, with the video's study and recorded patient."""

    frames: list[np.ndarray]
    video_study: np.ndarray
    study_keys: np.ndarray
    study_patient: np.ndarray
    tower: dict[str, Any]


@dataclass
class IdentityTrainResult:
    out_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    n_train_studies: int = 0
    n_holdout_studies: int = 0
    n_holdout_patients: int = 0
    dropped_study_keys: list[int] = field(default_factory=list)
    content_auc: float | None = None
    identity_auc: float | None = None
    seconds: float = 0.0


def tower_info(source: str, init: str | None, tower: Any) -> dict[str, Any]:
    """What a trained identity model records about the tower it starts from (``init`` or the index's model
    ``source``, a local folder made absolute)."""
    spec = source if init is None else init
    if spec.startswith("local-dir:"):
        spec = f"local-dir:{Path(spec[len('local-dir:'):]).expanduser().resolve()}"
    ident = tower.identity
    return {"model": spec, "name": ident["name"], "weights_sha256": ident["weights_sha256"],
            "embed_dim": int(ident["embed_dim"])}


def decoded_videos(rows: list[tuple[Any, ...]], where: dict[int, Any], policy: Any, workers: int,
                   progress: Progress | None) -> Iterator[tuple[Any, tuple[Any, ...]]]:
    """(prepared video, its catalog row) for every row that still decodes (the others are logged, skipped)."""
    from echosearch.ingest.discover import FileRecord
    from echosearch.run.read import FailedFile
    from echosearch.run.workers import iter_processed

    by_sha = {r[1]: r for r in rows}
    records = [FileRecord(path=where[int(r[0])], size=int(r[3]), sha256=r[1], kind=r[2]) for r in rows]
    for i, item in enumerate(iter_processed(records, policy, workers)):
        if progress:
            progress("features", i + 1, len(records), {})
        if isinstance(item, FailedFile):
            log.warning("skipping a video that no longer decodes: %s", item.reason)
            continue
        yield item, by_sha[item.record.sha256]


def by_video(got: dict[int, tuple[Any, int, int]]) -> tuple[np.ndarray, list[Any], np.ndarray, np.ndarray, np.ndarray]:
    """From {video key: (kept value, study key, recorded patient)}: (video keys sorted, their values, each
    video's study row, the study keys sorted, each study's recorded patient)."""
    keys = sorted(got)
    study_keys = np.unique([got[k][1] for k in keys]).astype(np.int64)
    patient_of = {got[k][1]: got[k][2] for k in keys}
    return (np.array(keys, np.int64), [got[k][0] for k in keys],
            np.searchsorted(study_keys, [got[k][1] for k in keys]).astype(np.int64), study_keys,
            np.array([patient_of[int(s)] for s in study_keys], dtype=np.int64))


def tower_features(index_dir: Path, init: str | None = None, *, device: str = "cpu", workers: int = 1,
                   progress: Progress | None = None) -> Features:
    """Decode and prepare every encoded video of the index (its own frame policy) and compute the tower's
    L2-normalised frame vectors once."""
    from echosearch.model.encode import encoder_for_index, load_encoder

    with Catalog.open(index_dir, read_only=True) as cat:
        content = encoder_for_index(cat, device=device)
        source = str(cat.get_manifest("model_source") or content.name)
        rows = cat.encoded_video_files()
        stored = cat.frame_embeddings([int(r[0]) for r in rows]) if init is None else None
        where = cat.locations([int(r[0]) for r in rows]) if not stored or len(stored) < len(rows) else {}
    if not rows:
        raise EchosearchError(f"index {index_dir} has no encoded videos: nothing to train on")
    tower = content if init is None else load_encoder(init, device=device, frames_per_video=content.policy.n_frames)
    info = tower_info(source, init, tower)
    got: dict[int, tuple[np.ndarray, int, int]] = {}
    if stored is not None and len(stored) == len(rows):  # the index kept the content tower's frame vectors
        got = {int(r[0]): (stored[int(r[0])], int(r[4]), int(r[5])) for r in rows}
    else:
        pending: list[tuple[np.ndarray, tuple[Any, ...]]] = []

        def flush() -> None:  # frames of several videos per forward pass
            if pending:
                vecs = tower.encode_frames(np.concatenate([f for f, _ in pending]))
                for (_f, r), v in zip(pending, np.split(vecs, np.cumsum([len(f) for f, _ in pending])[:-1]),
                                     strict=True):
                    got[int(r[0])] = (v, int(r[4]), int(r[5]))
                pending.clear()

        for item, row in decoded_videos(rows, where, content.policy, workers, progress):
            pending.append((item.frames, row))
            if sum(len(f) for f, _ in pending) >= 64:
                flush()
        flush()
    _keys, frames, video_study, study_keys, study_patient = by_video(got)
    return Features(frames=frames, video_study=video_study, study_keys=study_keys, study_patient=study_patient,
                    tower=info)


def split_patients(study_patient: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """Held-out patient keys: a ``holdout`` share (by seed) of the patients with two or more studies."""
    uniq, counts = np.unique(study_patient, return_counts=True)
    multi = uniq[counts >= 2]
    if multi.size < 4 or holdout <= 0:
        return np.zeros(0, np.int64)
    n = max(2, int(round(holdout * multi.size)))
    return np.sort(np.random.default_rng(seed).permutation(multi)[:n])


def pair_auc(vecs: np.ndarray, patient: np.ndarray) -> float | None:
    """Study-pair AUC: every pair of different studies, same recorded patient against different patients."""
    if len(vecs) < 3:
        return None
    i, j = np.triu_indices(len(vecs), k=1)
    c = np.einsum("ij,ij->i", vecs[i], vecs[j])
    same = patient[i] == patient[j]
    if not same.any() or same.all():
        return None
    return float(cal.auc(c[same], c[~same]))


class _Data:
    """Padded frame vectors (videos, frames, d) with masks, and the study of each video, as tensors."""

    def __init__(self, feats: Features) -> None:
        n_max = max(len(f) for f in feats.frames)
        d = feats.frames[0].shape[1]
        x = np.zeros((len(feats.frames), n_max, d), np.float32)
        m = np.zeros((len(feats.frames), n_max), bool)
        for i, f in enumerate(feats.frames):
            x[i, :len(f)], m[i, :len(f)] = f, True
        self.x, self.mask = torch.from_numpy(x), torch.from_numpy(m)
        self.video_study = torch.from_numpy(feats.video_study)
        self.n_studies = len(feats.study_keys)

    def study_vectors(self, head: IdentityHead, studies: torch.Tensor, keep: float | None = None,
                      gen: torch.Generator | None = None) -> torch.Tensor:
        """Identity vectors of ``studies`` (rows in that order): frame subsets pooled (``keep``: random share,
        None: all), head applied per video, videos pooled per study, L2-normalised at each level."""
        pos = torch.full((self.n_studies,), -1, dtype=torch.long)
        pos[studies] = torch.arange(len(studies))
        vid = torch.nonzero(pos[self.video_study] >= 0).squeeze(1)
        mask = self.mask[vid]
        if keep is not None:
            pick = (torch.rand(mask.shape, generator=gen) < keep) & mask
            mask = torch.where(pick.any(1, keepdim=True), pick, mask)
        w = mask.float().unsqueeze(-1)
        if head.pool == "frame":  # the head maps every frame; its outputs are pooled per video
            x = self.x[vid]
            zf = head(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)
            z = torch.nn.functional.normalize((zf * w).sum(1) / w.sum(1), dim=-1)
        else:
            z = head(torch.nn.functional.normalize((self.x[vid] * w).sum(1) / w.sum(1), dim=-1))
        out = torch.zeros(len(studies), z.shape[1]).index_add(0, pos[self.video_study[vid]], z)
        return torch.nn.functional.normalize(out, dim=-1)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss: each study against the batch, its patient's other studies positives."""
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(1)
    if not bool(has.any()):
        return z.sum() * 0.0
    logp = torch.log_softmax(logits, dim=1)
    return -(torch.where(pos, logp, 0.0).sum(1)[has] / pos.sum(1)[has]).mean()


def contrastive_epoch(cfg: IdentityTrainConfig, uniq: np.ndarray, rows_of: dict[int, torch.Tensor],
                      gen: torch.Generator, labels: torch.Tensor, opt: torch.optim.Optimizer, sched: Any,
                      study_vectors: Callable[[torch.Tensor], torch.Tensor], clip: list[torch.nn.Parameter] | None,
                      progress: Progress | None, phase: int, step: int, total: int) -> tuple[list[float], int]:
    """One epoch of supervised-contrastive steps (``cfg.batch_patients`` patients drawn by ``gen``, all their
    training studies ``rows_of``, embedded by ``study_vectors``), shared by the head and tower trainers;
    gradients clipped to norm 1 over ``clip`` when given. Returns (the step losses, the running step count)."""
    losses: list[float] = []
    for _ in range(cfg.steps_per_epoch):
        chosen = torch.randperm(len(uniq), generator=gen)[:cfg.batch_patients].tolist()
        studies = torch.cat([rows_of[int(uniq[i])] for i in chosen])
        loss = supcon_loss(study_vectors(studies), labels[studies], cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.item()))
        step += 1
        if progress:
            progress(f"pass {phase}", step, total, {"loss": losses[-1]})
    return losses, step


def _fit(data: _Data, feats: Features, train_rows: np.ndarray, hold_rows: np.ndarray, cfg: IdentityTrainConfig,
         phase: int, content_auc: float | None, progress: Progress | None,
         history: list[dict[str, float]]) -> IdentityHead:
    """One training pass from the seed's initial weights on the studies ``train_rows``."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    head = IdentityHead(feats.frames[0].shape[1], cfg.out_dim, cfg.hidden, cfg.residual, cfg.pool)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.1)
    patients = feats.study_patient[train_rows]
    uniq = np.unique(patients)
    rows_of = {int(p): torch.from_numpy(train_rows[patients == p]) for p in uniq}
    hold_t = torch.from_numpy(hold_rows)
    step = 0
    t0 = time.perf_counter()
    labels = torch.from_numpy(feats.study_patient)
    for epoch in range(cfg.epochs):
        head.train()
        losses, step = contrastive_epoch(cfg, uniq, rows_of, gen, labels, opt, sched,
                                         lambda studies: data.study_vectors(head, studies, cfg.frame_keep, gen),
                                         None, progress, phase, step, total)
        head.eval()
        with torch.no_grad():
            zh = data.study_vectors(head, hold_t).numpy() if len(hold_rows) else None
        metrics = epoch_metrics(phase, epoch, losses, t0, zh, feats.study_patient[hold_rows], content_auc)
        history.append(metrics)
        if progress:
            progress("epoch", epoch + 1, cfg.epochs, metrics)
    return head


def epoch_metrics(phase: int, epoch: int, losses: list[float], t0: float, held: np.ndarray | None,
                  held_patients: np.ndarray, content_auc: float | None) -> dict[str, float]:
    """One epoch's line of the training history: loss, time and, with held-out study vectors, their
    cross-visit AUC beside the content vectors' on the same studies."""
    metrics: dict[str, float] = {"pass": float(phase), "epoch": float(epoch + 1), "loss": float(np.mean(losses)),
                                 "seconds": round(time.perf_counter() - t0, 2)}
    if held is not None:
        auc = pair_auc(held, held_patients)
        if auc is not None:
            metrics["heldout_auc"] = auc
        if content_auc is not None:
            metrics["content_auc"] = content_auc
    return metrics


def holdout_split(index_dir: Path, study_keys: np.ndarray, study_patient: np.ndarray, holdout: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float | None]:
    """(held-out patients, training study rows, held-out study rows, the content vectors' AUC on the held-out
    studies): the split every identity trainer uses; fails when no training patient has two studies."""
    held = split_patients(study_patient, holdout, seed)
    is_held = np.isin(study_patient, held)
    train_rows, hold_rows = np.nonzero(~is_held)[0], np.nonzero(is_held)[0]
    if train_rows.size == 0 or np.unique(study_patient[train_rows], return_counts=True)[1].max() < 2:
        raise EchosearchError("no patient with two or more studies to train on")
    return held, train_rows, hold_rows, heldout_content_auc(index_dir, study_keys, study_patient, hold_rows)


def heldout_content_auc(index_dir: Path, study_keys: np.ndarray, study_patient: np.ndarray, hold_rows: np.ndarray
                        ) -> float | None:
    """Study-pair AUC of the index's content vectors on the held-out studies (the baseline on the same pairs)."""
    if not hold_rows.size:
        return None
    with Catalog.open(index_dir, read_only=True) as cat:
        ids, vecs = cat.embeddings("study", study_keys[hold_rows].tolist())
    if not np.array_equal(ids, study_keys[hold_rows]):
        return None
    return pair_auc(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), study_patient[hold_rows])


def train_identity(index_dir: Path, out_dir: Path, config: IdentityTrainConfig | None = None,
                   progress: Progress | None = None, features: Any = None,
                   provenance: dict[str, Any] | None = None) -> IdentityTrainResult:
    """Train an identity head on the index's recorded patients and save it to ``out_dir`` (a folder the
    ``identity_model`` setting accepts). ``features`` skips the decoding (e.g. a second run on the same index);
    ``provenance`` (e.g. the command and the data it was trained on) is recorded in the head's metadata."""
    from echosearch.identity.matching import StudySet
    from echosearch.identity.mislabels import score_studies

    cfg = config or IdentityTrainConfig()
    if cfg.method not in ("map", "head"):
        raise EchosearchError(f"unknown identity training method {cfg.method!r} (map or head)")
    if cfg.method == "map" and cfg.train_stages == 0:
        from echosearch.identity.map import train_map

        if features is not None:
            raise EchosearchError("an identity map computes its own activation maps (no cached features)")
        return train_map(index_dir, Path(out_dir), cfg, IdentityTrainResult(out_dir=Path(out_dir)), progress,
                         provenance)
    if cfg.train_stages > 0:
        from echosearch.identity.tower_train import TowerFeatures, train_tower

        if features is not None and not isinstance(features, TowerFeatures):
            raise EchosearchError("tower training needs cached split activations (tower_activations)")
        return train_tower(index_dir, Path(out_dir), cfg, IdentityTrainResult(out_dir=Path(out_dir)), progress,
                           features, provenance)
    t0 = time.perf_counter()
    feats = features or tower_features(index_dir, cfg.init, device=cfg.device, workers=cfg.workers,
                                       progress=progress)
    held, train_rows, hold_rows, content_auc = holdout_split(index_dir, feats.study_keys, feats.study_patient,
                                                             cfg.holdout, cfg.seed)
    data = _Data(feats)
    result = IdentityTrainResult(out_dir=Path(out_dir), content_auc=content_auc,
                                 n_holdout_studies=int(hold_rows.size), n_holdout_patients=int(held.size))
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        head = _fit(data, feats, train_rows, hold_rows, cfg, 1, content_auc, progress, result.history)
        if cfg.clean:
            with torch.no_grad():
                z = data.study_vectors(head, torch.from_numpy(train_rows)).numpy()
            S = StudySet(feats.study_keys[train_rows], np.ascontiguousarray(z), feats.study_patient[train_rows],
                         pl.DataFrame(), "identity")  # the audit's scores need no metadata
            suspect = score_studies(S, fpr=cfg.clean_fpr)["suspect"]
            result.dropped_study_keys = [int(k) for k in feats.study_keys[train_rows][suspect]]
            if suspect.any():
                train_rows = train_rows[~suspect]
                head = _fit(data, feats, train_rows, hold_rows, cfg, 2, content_auc, progress, result.history)
    finally:
        torch.use_deterministic_algorithms(prev)
    result.n_train_studies = int(train_rows.size)
    result.identity_auc = result.history[-1].get("heldout_auc") if result.history else None
    result.seconds = round(time.perf_counter() - t0, 2)
    training = training_record(index_dir, cfg, result, content_auc, provenance)
    save_head(Path(out_dir), head.eval(), feats.tower, training)
    return result


def training_record(index_dir: Path | str, cfg: IdentityTrainConfig, result: IdentityTrainResult,
                    content_auc: float | None, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """What an identity folder records of its training (seed, config, split sizes, held-out AUCs, history)."""
    return {"index": Path(index_dir).name, "seed": cfg.seed, "epochs": cfg.epochs,
            "config": {k: v for k, v in vars(cfg).items() if k not in ("workers", "device")},
            "n_train_studies": result.n_train_studies, "n_holdout_studies": result.n_holdout_studies,
            "n_holdout_patients": result.n_holdout_patients, "dropped_studies": len(result.dropped_study_keys),
            "heldout_auc": result.identity_auc, "content_auc": content_auc, "seconds": result.seconds,
            "history": result.history, **(provenance or {})}
