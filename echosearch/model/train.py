"""CLIP-style contrastive training on an index's (video, report) pairs (``echosearch train``).

Frames are decoded and prepared once (the same ingest path as indexing), held in memory as uint8, and
paired with their study's report. A clip is one random frame, or in the last ``clip_epochs`` epochs
``clip_frames`` frames spread over the cycle whose vectors are mean-pooled as the index pools a video (EF
is read from the change between frames, which no single frame shows). A clip is paired with the sentences
of its study's report that its view can show (``visible_report``: no TAVR in an A4C clip). Reports are
augmented by sentence sampling and each batch also carries single-statement texts (the shape of queries
and zero-shot prompts). With ``soft_targets`` every text is scored against every clip of the batch from
the reports' facts (``report_facts``), so that two reports of the same finding are not pushed apart;
auxiliary heads (dropped on export) predict the reports' facts from image vectors. A held-out split by
patient gives retrieval metrics per epoch. The result is an open_clip folder (``local-dir:`` loadable).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from echosearch.catalog import Catalog
from echosearch.errors import EchosearchError
from echosearch.model.encode import OPENAI_MEAN, OPENAI_STD, encode_text_bucketed, load_encoder
from echosearch.model.models import write_model_folder
from echosearch.model.report_facts import (
    Facts,
    PromptSampler,
    ReportLabels,
    augment_report,
    fact_sentence,
    quantity_grid,
    relevance,
    report_facts,
    statements,
    value_target,
    visible_report,
)

__all__ = ["DEMO_MODEL_CFG", "TrainConfig", "TrainResult", "clip_frame_indices", "fact_anchor_loss",
           "fact_listwise_loss", "fact_pos_weight", "pool_clips", "soft_clip_loss", "train"]

log = logging.getLogger(__name__)

DEMO_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 256,
    "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False, "timm_pool": "max",
                   "timm_proj": "linear", "image_size": 112},
    "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4},
}


@dataclass
class TrainConfig:
    epochs: int = 24
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    frames_per_video: int = 8
    holdout: float = 0.1
    seed: int = 0
    workers: int = 1
    max_steps: int | None = None
    init: str | None = None  # None = demo architecture from scratch; else a model name to fine-tune
    soft_targets: bool = True  # score every text against every clip from the reports' facts
    extra_texts: int = 16  # single-statement texts added to each batch
    aux_weight: float = 1.0  # auxiliary fact/quantity heads on the image vectors (0 = off)
    balance_facts: bool = True  # weight each fact's positives by its rarity in the auxiliary loss
    clip_frames: int = 3  # frames per training clip, spread over the cycle and mean-pooled as at index time
    clip_epochs: int | None = 5  # the last N epochs' steps use clip_frames (else one frame); 0 = never, None = all
    frame_loss_weight: float = 0.5  # weight of the same loss on one frame of each clip (zero-shot is per frame)
    view_visibility: bool = True  # pair each clip with the report sentences its view can show
    anchor_weight: float = 1.0  # per-fact sigmoid loss of each fact's own sentence against every clip (0 = off)
    listwise_weight: float = 0.0  # each fact sentence's ranking of the batch's clips (softmax; 0 = off)
    # sentences per reported quantity (EF, LVIDd, ...) per step at values across its range, scored by the
    # anchor and listwise terms above (so nothing when both are off); 0 = off
    quantity_anchors: int = 0
    # export a moving average of the parameters (decay per step; buffers stay the last step's); 0 = off
    ema: float = 0.0
    zoom: float = 0.0  # training frames zoomed by up to +-zoom (imaging depth)
    lowres_p: float = 0.0  # share of training clips seen through a 0.4-0.8 resolution source
    gamma: float = 0.0  # grey-map jitter: gamma in [1/(1+gamma), 1+gamma]
    # same-patient term: each batch holds patient_pairs clips with a partner (same patient and view, another
    # study, same transplant status by the reports; with patient_stable, the same findings too) and an InfoNCE
    # loss pulls each towards its partner among the batch's other patients' clips (identity, the audit);
    # 0 = off (the batches are then those of a run without)
    patient_weight: float = 0.0
    patient_pairs: int = 8
    patient_stable: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    epochs_run: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    n_train: int = 0
    n_holdout: int = 0


def _load_pairs(cat: Catalog, frames_per_video: int, size: int, workers: int,
                progress: Callable[[int, int], None] | None
                ) -> tuple[list[np.ndarray], list[str], list[int], list[str | None], list[int]]:
    from echosearch.ingest.discover import FileRecord
    from echosearch.ingest.frame_policy import resolve_frame_policy
    from echosearch.run.read import FailedFile
    from echosearch.run.workers import iter_processed

    rows = cat.videos_with_reports()
    if not rows:
        raise EchosearchError(f"index {cat.index_dir} has no videos with reports: nothing to train on")
    # the policy the trained model's hints declare ("sector", written with the weights below)
    policy = resolve_frame_policy(None, setting="sector", n_frames=frames_per_video, size=size)
    where = cat.locations([int(r[0]) for r in rows])
    records = [FileRecord(path=where[int(r[0])], size=int(r[4]), sha256=r[3], kind=r[2]) for r in rows]
    frames: list[np.ndarray] = []
    texts: list[str] = []
    patients: list[int] = []
    views: list[str | None] = []
    studies: list[int] = []
    by_sha = {r[3]: r for r in rows}
    for i, item in enumerate(iter_processed(records, policy, workers=workers)):
        if progress:
            progress(i + 1, len(records))
        if isinstance(item, FailedFile):
            log.warning("skipping video %s: %s", by_sha[item.sha256][0] if item.sha256 in by_sha else "?",
                        item.reason)
            continue
        row = by_sha[item.record.sha256]
        frames.append(item.frames)
        texts.append(row[5])
        patients.append(int(row[6]))
        views.append(row[7])
        studies.append(int(row[8]))
    return frames, texts, patients, views, studies


def stable_between(a: Facts, b: Facts, rel_tol: float = 0.1, abs_tol: float = 5.0) -> bool:
    """Whether two reports state the same findings: the same template sentences, and every quantity both state
    within max(abs_tol, rel_tol x value) (an EF of 55 and 58 is one state, 55 and 35 a change)."""
    sa = {k for k, v in a.items() if v is None and not k.startswith("VIEW:")}
    sb = {k for k, v in b.items() if v is None and not k.startswith("VIEW:")}
    if sa != sb:
        return False
    for k, v in a.items():
        w = b.get(k)
        if v is not None and w is not None and abs(v - w) > max(abs_tol, rel_tol * abs(v)):
            return False
    return True


def patient_partners(patients: list[int], studies: list[int], views: list[str | None], texts: list[str],
                     pool: list[int], facts: Sequence[Facts] | None = None) -> dict[int, list[int]]:
    """For each clip of ``pool``: the clips of ``pool`` with the same patient and view from another study whose
    report agrees on a heart transplant (a new heart is another heart: the audit should see it so) and, with
    ``facts``, states the same findings (:func:`stable_between`): visits across a change are not pulled together,
    so the change it shows stays in the vectors."""
    groups: dict[tuple[int, str | None, bool], list[int]] = {}
    for i in pool:
        groups.setdefault((patients[i], views[i], "TRANSPLANT" in texts[i].upper()), []).append(i)
    out: dict[int, list[int]] = {}
    for g in groups.values():
        for i in g:
            got = [j for j in g if studies[j] != studies[i] and (facts is None or stable_between(facts[i], facts[j]))]
            if got:
                out[i] = got
    return out


def with_partners(batch: list[int], partners: dict[int, list[int]], n_pairs: int, rng: random.Random
                  ) -> tuple[list[int], list[tuple[int, int]]]:
    """``batch`` with its last places given to partners of its first clips that have one: (clips, pairs of
    batch positions). A clip appears once; fewer pairs when too few clips have a partner."""
    keep = len(batch) - n_pairs
    out: list[int] = list(batch[:keep])
    pairs: list[tuple[int, int]] = []
    for pos, i in enumerate(batch[:keep]):
        if len(pairs) == n_pairs:
            break
        options = [j for j in partners.get(i, ()) if j not in out]
        if options:
            out.append(rng.choice(options))
            pairs.append((pos, len(out) - 1))
    out += [j for j in batch[keep:] if j not in out][: len(batch) - len(out)]
    return out, pairs


def patient_loss(img: torch.Tensor, pairs: list[tuple[int, int]], patient_ids: torch.Tensor,
                 scale: float = 10.0) -> torch.Tensor:
    """InfoNCE over a batch's clip vectors: each paired clip's partner against the clips of other patients."""
    if not pairs:
        return img.sum() * 0.0
    sim = scale * img @ img.T
    other = patient_ids[:, None] != patient_ids[None, :]
    rows = torch.tensor([a for a, b in pairs] + [b for a, b in pairs])
    cols = torch.tensor([b for a, b in pairs] + [a for a, b in pairs])
    allowed = other[rows].clone()
    allowed[torch.arange(len(rows)), cols] = True  # the partner is the one same-patient clip in the row
    logits = sim[rows].masked_fill(~allowed, float("-inf"))
    return F.cross_entropy(logits, cols)


def _augment_frame(frame: np.ndarray, rng: np.random.Generator, zoom: float = 0.0, lowres_p: float = 0.0,
                   gamma: float = 0.0) -> np.ndarray:
    """Jitter one acquisition: gain/contrast and a small shift, and optionally what else differs between
    scanners and studies: a zoom of ``±zoom`` (imaging depth sets the heart's size in the sector), with
    probability ``lowres_p`` a source of 0.4-0.8 of the model's resolution (small exports, where a clip or
    lead is a few blurred pixels), and a gamma in ``[1/(1+gamma), 1+gamma]`` (vendor grey maps).

    ``frame`` is (..., H, W, C); every frame of a stack gets the same jitter (one acquisition).
    """
    f = frame.astype(np.float32)
    f = (f - 128.0) * rng.uniform(0.85, 1.15) + 128.0 + rng.uniform(-12, 12)
    dx, dy = rng.integers(-4, 5, size=2)
    f = np.roll(f, (int(dy), int(dx)), axis=(-3, -2))
    out = np.clip(f, 0, 255).astype(np.uint8)
    if gamma > 0:  # a look-up table: the power of 256 values, not of every pixel
        g = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(gamma)))
        out = np.round(255.0 * (np.arange(256) / 255.0) ** g).astype(np.uint8)[out]
    if zoom > 0 or lowres_p > 0:
        r = _resample(out.astype(np.float32), 1.0 + rng.uniform(-zoom, zoom) if zoom > 0 else 1.0,
                      float(rng.uniform(0.4, 0.8)) if rng.random() < lowres_p else 1.0)
        out = np.clip(np.round(r), 0, 255).astype(np.uint8)
    return out


def _resample(f: np.ndarray, scale: float, res: float) -> np.ndarray:
    """Zoom (..., H, W, C) frames by ``scale`` about the centre (black outside), then pass them through a
    ``res`` fraction of their resolution and back (bilinear both ways)."""
    shape = f.shape
    t = torch.from_numpy(np.ascontiguousarray(f.reshape(-1, *shape[-3:]))).permute(0, 3, 1, 2)
    if scale != 1.0:
        theta = torch.tensor([[1.0 / scale, 0.0, 0.0], [0.0, 1.0 / scale, 0.0]]).expand(t.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(t.shape), align_corners=False)
        t = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if res < 1.0:
        h, w = t.shape[-2:]
        t = F.interpolate(t, size=(max(2, round(h * res)), max(2, round(w * res))), mode="bilinear", antialias=True)
        t = F.interpolate(t, size=(h, w), mode="bilinear")
    return t.permute(0, 2, 3, 1).reshape(shape).numpy()


def clip_frame_indices(n: int, k: int, offset: int) -> np.ndarray:
    """``k`` of a video's ``n`` prepared frames, evenly spaced from ``offset`` and wrapping around.

    The prepared frames cover the clip (about one cardiac cycle), so the chosen frames sample the whole
    cycle: end-diastole and end-systole both near one of them, which is what EF is read from. The first
    index is ``offset`` (a random phase when the offset is random, also where clips start at the ECG
    trigger).
    """
    k = max(1, min(k, n))
    return (offset + np.round(np.arange(k) * n / k).astype(int)) % n


def pool_clips(frame_vecs: torch.Tensor, k: int) -> torch.Tensor:
    """(B*k, d) frame vectors, k consecutive per clip -> (B, d) clip vectors: mean then re-normalise, as
    the index makes a video vector."""
    return F.normalize(frame_vecs.view(-1, k, frame_vecs.shape[-1]).mean(1), dim=-1)


def fact_pos_weight(present: np.ndarray, cap: float = 8.0) -> np.ndarray:
    """Per-fact weight of positives, negatives/positives capped at ``cap`` (balanced BCE): rare findings
    such as devices otherwise contribute a sliver of the auxiliary loss next to views and EF bands."""
    pos = present.sum(0)
    w = (present.shape[0] - pos) / np.maximum(pos, 1.0)
    return np.clip(w, 1.0, cap).astype(np.float32)


def fact_anchor_loss(img: torch.Tensor, fact_txt: torch.Tensor, present: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor, pos_weight: torch.Tensor | None = None,
                     known: torch.Tensor | None = None) -> torch.Tensor:
    """Per-fact sigmoid loss of each fact's own sentence (``fact_txt``, one row per fact) against every clip.

    A search for a finding types its sentence, and what it needs is that sentence's vector above the clips
    that show the finding and below all others. The softmax of the contrastive loss sees a rare finding's
    sentence in some batches, against the 1-2 clips of it there; here every fact's sentence is scored
    against every clip at every step, and with ``pos_weight`` (:func:`fact_pos_weight`) a device present
    in 5 % of clips weighs as much as its absence. Unlike the free linear fact heads, the classifier *is*
    the text vector, so what this trains is the retrieval score itself. ``present`` may be soft (a value
    sentence's :func:`~echosearch.model.report_facts.value_target`); with ``known`` (clips, facts), pairs whose
    report does not state the fact are left out of the mean.
    """
    logits = scale * img @ fact_txt.T + bias
    if known is None:
        return F.binary_cross_entropy_with_logits(logits, present, pos_weight=pos_weight)
    bce = F.binary_cross_entropy_with_logits(logits, present, weight=known, pos_weight=pos_weight, reduction="sum")
    return bce / known.sum().clamp(min=1)


def fact_listwise_loss(img: torch.Tensor, fact_txt: torch.Tensor, present: torch.Tensor,
                       scale: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Each fact's sentence against the batch's clips as one ranking: softmax over clips, target spread over
    the clips that show the fact (facts no clip of the batch shows are skipped).

    A search reads the top of one sentence's ranking over all videos. The per-fact BCE of
    :func:`fact_anchor_loss` scores each (sentence, clip) pair on its own, so a pacer clip just below the
    margin costs little even when it outranks every MitraClip video; this term is the contrastive loss's
    text->image direction for the fact sentences, where the hardest negatives dominate the gradient.
    ``present`` may be soft (a value sentence's :func:`~echosearch.model.report_facts.value_target`); with
    ``known``, clips whose report does not state the fact are left out of its ranking.
    """
    has = present.sum(0) > 0
    if not bool(has.any()):
        return img.new_zeros(())
    target = present.T[has]
    logits = scale * fact_txt[has] @ img.T
    if known is not None:  # (clips, facts) 0 where a clip's report does not say: not a negative, left out
        logits = logits.masked_fill(known.T[has] == 0, float("-inf"))
    logp = logits.log_softmax(-1)
    return -(torch.where(target > 0, target * logp, 0.0).sum(-1) / target.sum(-1)).mean()


def soft_clip_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of image->text and text->image softmaxes against normalised target weights.

    ``logits`` and ``targets`` are (images, texts); with an identity target this is open_clip's ClipLoss.
    Text columns that describe no image of the batch take part only as negatives.
    """
    li = -(F.log_softmax(logits, 1) * (targets / targets.sum(1, keepdim=True).clamp(min=1e-12))).sum(1).mean()
    cols = targets.sum(0) > 0
    tc = targets[:, cols].T
    lt = -(F.log_softmax(logits[:, cols].T, 1) * (tc / tc.sum(1, keepdim=True))).sum(1).mean()
    return (li + lt) / 2


def _retrieval_metrics(model: Any, tokenizer: Any, frames: list[np.ndarray], texts: list[str],
                       to_tensor: Callable[[np.ndarray], torch.Tensor]) -> dict[str, float]:
    """Video -> report recall@1/@5 over the held-out set (video vector = mean of frame vectors)."""
    if not frames:
        return {}
    model.eval()
    with torch.inference_mode():
        v = torch.cat([pool_clips(model.encode_image(to_tensor(f), normalize=True), len(f)) for f in frames])
        uniq = sorted(set(texts))
        idx = torch.tensor([uniq.index(t) for t in texts])
        tv = encode_text_bucketed(model, tokenizer(uniq))
        sims = v @ tv.T
        ranks = (sims > sims[torch.arange(len(idx)), idx].unsqueeze(1)).sum(1)
    model.train()
    return {"v2t_r1": float((ranks < 1).float().mean()), "v2t_r5": float((ranks < 5).float().mean()),
            "v2t_mean_rank": float(ranks.float().mean() + 1), "n_reports": float(len(uniq))}


def train(index_dir: Path, out_dir: Path, config: TrainConfig | None = None,
          progress: Callable[[str, int, int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train (or fine-tune) a CLIP model on the index's video-report pairs and save it to ``out_dir``."""
    import open_clip

    cfg = config or TrainConfig()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    nrng = np.random.default_rng(cfg.seed)

    if cfg.init:
        enc = load_encoder(cfg.init, device="cpu")
        model, tokenizer = enc.model, enc.tokenizer
        cfg_json = json.loads((enc.source.folder / "open_clip_config.json").read_text()) if enc.source.folder else {}
        model_cfg = cfg_json.get("model_cfg", {})
        size, mean, std, embed_dim = enc.image_size, enc.mean, enc.std, enc.embed_dim
    else:
        model_cfg = DEMO_MODEL_CFG
        model = open_clip.CLIP(**model_cfg)
        tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
        size = int(model_cfg["vision_cfg"]["image_size"])
        mean, std, embed_dim = OPENAI_MEAN, OPENAI_STD, int(model_cfg["embed_dim"])
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def to_tensor(frames: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
        return (t - mean_t) / std_t

    with Catalog.open(index_dir, read_only=True) as cat:
        frames, texts, patients, views, studies = _load_pairs(cat, cfg.frames_per_video, size, cfg.workers,
                                              (lambda i, n: progress("decode", i, n, {})) if progress else None)
    if cfg.view_visibility:  # a study's TAVR sentence does not describe its A4C clip
        texts = [visible_report(t, v) for t, v in zip(texts, views, strict=True)]
    uniq_patients = sorted(set(patients))
    prng = random.Random(cfg.seed)
    prng.shuffle(uniq_patients)
    n_hold = max(1, int(round(cfg.holdout * len(uniq_patients)))) if len(uniq_patients) > 4 else 0
    held = set(uniq_patients[:n_hold])
    train_idx = [i for i, p in enumerate(patients) if p not in held]
    hold_idx = [i for i, p in enumerate(patients) if p in held]
    if not train_idx:
        raise EchosearchError("no training pairs after the held-out split")

    facts = [report_facts(t, v) for t, v in zip(texts, views, strict=True)]
    partners = (patient_partners(patients, studies, views, texts, train_idx, facts if cfg.patient_stable else None)
                if cfg.patient_weight > 0 else {})
    prng_pairs = random.Random(cfg.seed + 2)  # its own stream, like the quantity sentences'
    prompts = PromptSampler.from_reports([texts[i] for i in train_idx], [views[i] for i in train_idx])
    labels = ReportLabels.build(facts)
    heads = torch.nn.ModuleDict({"facts": torch.nn.Linear(embed_dim, max(1, len(labels.keys))),
                                 "quantities": torch.nn.Linear(embed_dim, max(1, len(labels.quantities)))})
    # anchored: the facts the training clips show (a finding only held-out patients have would leak their
    # reports into training) that have a sentence (a view without a standard phrase has none)
    seen = labels.present[train_idx].sum(0) > 0
    anchored = {j: sent for j, k in enumerate(labels.keys) if seen[j] and (sent := fact_sentence(k)) is not None}
    anchoring = cfg.anchor_weight > 0 or cfg.listwise_weight > 0
    anchor_tokens = tokenizer(list(anchored.values())) if anchoring and anchored else None
    # numbers anchored too: each quantity's sentences at values across its range, soft targets by distance
    qrng = random.Random(cfg.seed + 1)  # its own stream: the batches and texts stay those of a run without it
    q_cols = {q: j for j, q in enumerate(labels.quantities)}
    q_anchoring = anchoring and cfg.quantity_anchors > 0 and bool(prompts.numeric)
    anchor_cols = torch.tensor(list(anchored), dtype=torch.long)
    prior = labels.present[train_idx][:, list(anchored)].mean(0).clip(1e-3, 1 - 1e-3)
    anchor = torch.nn.ParameterDict({"scale": torch.nn.Parameter(torch.tensor(10.0)),
                                     "bias": torch.nn.Parameter(torch.from_numpy(np.log(prior / (1 - prior))).float()),
                                     "qbias": torch.nn.Parameter(torch.tensor(-1.5))})  # ~ mean value target 0.2
    model.train()
    model.visual.to(memory_format=torch.channels_last)  # ~25 % faster convolutions on CPU
    params = list(model.parameters()) + (list(heads.parameters()) if cfg.aux_weight > 0 else [])
    groups: list[dict[str, Any]] = [{"params": params}]
    if anchor_tokens is not None or q_anchoring:  # a temperature and per-fact biases: not decayed towards 0
        groups.append({"params": list(anchor.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.1)
    result = TrainResult(out_dir=Path(out_dir), epochs_run=0, steps=0, n_train=len(train_idx), n_holdout=len(hold_idx))
    ckpt_dir = Path(out_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    present, values, stated = (torch.from_numpy(x) for x in (labels.present, labels.values, labels.stated))
    pos_weight = torch.from_numpy(fact_pos_weight(labels.present[train_idx])) if cfg.balance_facts else None
    anchor_pos_weight = None if pos_weight is None else pos_weight[anchor_cols]
    # prepare gives every video frames_per_video frames (short clips repeat frames), so k is one number
    k_clip = max(1, min(cfg.clip_frames, cfg.frames_per_video))
    if k_clip < cfg.clip_frames:
        log.warning("clip_frames %d > frames_per_video %d: clips use %d frames", cfg.clip_frames,
                    cfg.frames_per_video, k_clip)
    # a moving average of the weights (the exported model when on); checkpoints keep the raw weights
    ema = {n: p.detach().clone() for n, p in model.named_parameters()} if cfg.ema > 0 else None
    step = 0
    t0 = time.time()
    for epoch in range(cfg.epochs):
        order = train_idx[:]
        rng.shuffle(order)
        losses = []
        for b in range(steps_per_epoch):
            if step >= total:
                break
            batch = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            pairs: list[tuple[int, int]] = []
            if partners:
                batch, pairs = with_partners(batch, partners, cfg.patient_pairs, prng_pairs)
            multi = cfg.clip_epochs is None or step >= total - cfg.clip_epochs * steps_per_epoch
            k = k_clip if multi else 1
            imgs = np.concatenate([_augment_frame(frames[i][clip_frame_indices(len(frames[i]), k,
                                                                               int(nrng.integers(len(frames[i]))))], nrng,
                                                  cfg.zoom, cfg.lowres_p, cfg.gamma)
                                   for i in batch])
            txts = [augment_report(texts[i], rng, views[i]) for i in batch]
            txts += [prompts.sample(rng) for _ in range(cfg.extra_texts)]
            frame_f = model.encode_image(to_tensor(imgs).contiguous(memory_format=torch.channels_last), normalize=True)
            img_f = pool_clips(frame_f, k)  # the video vector, as the index pools it
            tokens = tokenizer(txts)
            n_fact = 0 if anchor_tokens is None else len(anchor_tokens)
            if anchor_tokens is not None:  # one text-tower pass for the batch's texts and the fact sentences
                tokens = torch.cat([tokens, anchor_tokens])
            qs = quantity_grid(prompts.numeric, cfg.quantity_anchors, qrng) if q_anchoring else []
            if qs:
                tokens = torch.cat([tokens, tokenizer([s for _, s, _ in qs])])
            txt_all = encode_text_bucketed(model, tokens)
            txt_f = txt_all[:len(txts)]
            scale = model.logit_scale.exp()
            logits = scale * img_f @ txt_f.T
            if cfg.soft_targets:
                parsed = [statements(t) for t in txts]
                target = torch.tensor([[relevance(facts[i], st) for st in parsed] for i in batch], dtype=torch.float32)
            else:
                target = torch.zeros(logits.shape)
            target[torch.arange(len(batch)), torch.arange(len(batch))] = 1.0  # each clip's own report
            loss = soft_clip_loss(logits, target)
            if k > 1 and cfg.frame_loss_weight > 0:
                # each clip's first frame is its random-offset one: per-frame zero-shot stays trained at every phase
                loss = loss + cfg.frame_loss_weight * soft_clip_loss(scale * frame_f[::k] @ txt_f.T, target)
            ii = torch.tensor(batch)
            if cfg.patient_weight > 0:
                pid = torch.tensor([patients[i] for i in batch])
                loss = loss + cfg.patient_weight * patient_loss(img_f, pairs, pid)
            if cfg.aux_weight > 0:
                z = img_f * 8.0  # unit vectors scaled to a useful logit range (pooled clips in clip epochs)
                aux = F.binary_cross_entropy_with_logits(heads["facts"](z), present[ii], pos_weight=pos_weight)
                err = ((heads["quantities"](z) - values[ii]) ** 2) * stated[ii]
                loss = loss + cfg.aux_weight * (aux + err.sum() / stated[ii].sum().clamp(min=1))
            if anchor_tokens is not None:  # each fact's own sentence (what a search types) against every clip
                fact_txt, fact_present = txt_all[len(txts):len(txts) + n_fact], present[ii][:, anchor_cols]
                if cfg.anchor_weight > 0:
                    loss = loss + cfg.anchor_weight * fact_anchor_loss(
                        img_f, fact_txt, fact_present, anchor["scale"], anchor["bias"], anchor_pos_weight)
                if cfg.listwise_weight > 0:
                    loss = loss + cfg.listwise_weight * fact_listwise_loss(img_f, fact_txt, fact_present, scale)
            if qs:  # each value's sentence against every clip that states the quantity, target by distance
                q_txt = txt_all[len(txts) + n_fact:]
                known = labels.known[batch][:, [q_cols[q] for q, _, _ in qs]]
                q_target = torch.from_numpy(value_target(known, np.array([v for _, _, v in qs], np.float32)))
                q_mask = torch.from_numpy(~np.isnan(known)).float()
                if cfg.anchor_weight > 0:
                    loss = loss + cfg.anchor_weight * fact_anchor_loss(
                        img_f, q_txt, q_target, anchor["scale"], anchor["qbias"], known=q_mask)
                if cfg.listwise_weight > 0:
                    loss = loss + cfg.listwise_weight * fact_listwise_loss(img_f, q_txt, q_target, scale, q_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
                if ema is not None:  # early steps average over the steps so far
                    decay = min(cfg.ema, (1 + step) / (10 + step))
                    for n, p in model.named_parameters():
                        ema[n].mul_(decay).add_(p.detach(), alpha=1 - decay)
            losses.append(loss.item())
            step += 1
            if progress:
                progress("train", step, total, {"loss": losses[-1], "epoch": epoch + 1})
        metrics = {"epoch": float(epoch + 1), "loss": float(np.mean(losses)) if losses else float("nan"),
                   "seconds": time.time() - t0}
        metrics.update(_retrieval_metrics(model, tokenizer, [frames[i] for i in hold_idx], [texts[i] for i in hold_idx],
                                          to_tensor))
        result.history.append(metrics)
        result.epochs_run = epoch + 1
        torch.save({"model": model.state_dict(), "epoch": epoch + 1, "metrics": metrics}, ckpt_dir / "last.pt.tmp")
        (ckpt_dir / "last.pt.tmp").replace(ckpt_dir / "last.pt")
        if progress:
            progress("epoch", epoch + 1, cfg.epochs, metrics)
        if step >= total:
            break
    result.steps = step
    if ema is not None and result.history:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(ema[n])
        ema_metrics = {f"ema_{k}": v for k, v in _retrieval_metrics(
            model, tokenizer, [frames[i] for i in hold_idx], [texts[i] for i in hold_idx], to_tensor).items()}
        result.history[-1].update(ema_metrics)
        if progress:
            progress("epoch", result.epochs_run, cfg.epochs, ema_metrics)
    model.eval()
    hints = {"name": Path(out_dir).name, "frame_policy": "sector", "arch": "echosearch-demo" if not cfg.init else cfg.init,
             "description": f"trained by `echosearch train` on an index named {Path(index_dir).name!r} (seed {cfg.seed}, {result.epochs_run} epochs)",
             "tokenizer": "clip", "history": result.history}
    write_model_folder(model, model_cfg, Path(out_dir), hints=hints,
                       preprocess_cfg={"mean": list(mean), "std": list(std), "size": size}, half=True)
    return result
