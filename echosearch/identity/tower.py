"""Identity towers: the content tower's early stages, shared and frozen, plus a fine-tuned copy of its last stages.

A frozen tower discards much of what tells one patient from another (it was trained for findings), and a head
on its output vector cannot put it back. An identity *tower* keeps the content model's early stages (stem and
the first ``split`` stages of its timm trunk: computed once per frame, and when the identity tower is built on
the index's own content model, taken from the content encoder's own forward pass) and fine-tunes a copy of
the remaining ``K`` stages, the pooling head and the projection patient-contrastively
(:mod:`echosearch.identity.tower_train`). Indexing then pays only for the copied stages.

Folder format (``identity_head.json`` with ``format = echosearch-identity-tower``): the base tower (model name
and weights hash), the split, the head's shape, ``identity_tail.safetensors`` (the copied stages) and
``identity_head.safetensors`` (the head on the pooled video vector).
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from echosearch.errors import ModelLoadError

if TYPE_CHECKING:
    from echosearch.model.encode import Encoder

TOWER_FORMAT = "echosearch-identity-tower"
TAIL_WEIGHTS = "identity_tail.safetensors"
TAP_BYTES = 256 * 2**20  # most split activations kept from the content encoder's recent forward passes (beyond: recomputed)


def trunk_of(visual: Any) -> Any:
    """The timm trunk of an open_clip image tower (ConvNeXt-style: ``stem``, ``stages``, ``norm_pre``, ``head``),
    or a clear error for towers that cannot be split (ViT, ResNet)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not all(hasattr(trunk, a) for a in ("stem", "stages", "norm_pre", "head")):
        raise ModelLoadError(f"{type(visual).__name__} is not a staged timm tower (ConvNeXt): an identity tower "
                             "needs one; train a head instead (--train-stages 0)")
    return trunk


def split_point(visual: Any, train_stages: int) -> int:
    """The index of the first stage the identity tower copies (the stages before it stay shared)."""
    n = len(trunk_of(visual).stages)
    if not 1 <= train_stages <= n:
        raise ModelLoadError(f"--train-stages must be 1..{n} for this tower, got {train_stages}")
    return n - train_stages


def frozen_forward(visual: Any, x: torch.Tensor, split: int) -> torch.Tensor:
    """Activations of normalised images ``x`` after the stem and the first ``split`` stages."""
    trunk = trunk_of(visual)
    h = trunk.stem(x)
    for stage in trunk.stages[:split]:
        h = stage(h)
    return h


class TowerTail(torch.nn.Module):
    """A copy of an open_clip timm tower from stage ``split`` on (stages, pooling head, projection): split
    activations -> L2-normalised frame vectors. At creation it computes exactly what the tower computes."""

    def __init__(self, visual: Any, split: int) -> None:
        super().__init__()
        trunk = trunk_of(visual)
        self.split = split
        self.stages = copy.deepcopy(trunk.stages[split:])
        self.norm_pre = copy.deepcopy(trunk.norm_pre)
        self.pool = copy.deepcopy(trunk.head)
        self.proj = copy.deepcopy(visual.head)
        self.out_dim = int(getattr(visual, "output_dim", 0) or self._probe_dim(visual))
        for p in self.parameters():
            p.requires_grad_(True)

    def _probe_dim(self, visual: Any) -> int:
        size = visual.image_size
        s = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.no_grad():
            h = frozen_forward(visual, torch.zeros(1, 3, s, s), self.split)
            return int(self.forward(h).shape[-1])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.norm_pre(self.stages(h)))
        return F.normalize(self.proj(x), dim=-1)


class SplitTap:
    """Keeps the split activations of an encoder's recent image forward passes (with a checksum of each input
    frame), so that identity vectors reuse the content encoder's early stages instead of running them again.

    Bounded (:data:`TAP_BYTES`, the latest pass always kept); :meth:`take` hands out the activations only when
    the checksums of the last ``n`` frames seen match the frames asked about, else None (then they are computed).
    The activations last handed out are kept until the next pass, so that two readers of one batch (the identity
    map and the cycle vectors) share one forward pass."""

    def __init__(self, visual: Any, split: int) -> None:
        trunk = trunk_of(visual)
        self.split = split
        self.sums: list[torch.Tensor] = []
        self.acts: list[torch.Tensor] = []
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (checksums, activations) last handed out
        self.hits = self.misses = 0  # frames served from the tap / computed again
        ref = weakref.ref(self)  # the hooks must not keep a dropped tap alive

        def on_input(_m: Any, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
            tap = ref()
            if tap is not None and not torch.is_grad_enabled():  # inference only (never training)
                tap.last = None
                tap.sums.append(inp[0].detach().float().sum(dim=(1, 2, 3)).cpu())

        def on_split(_m: Any, _inp: Any, out: torch.Tensor) -> None:
            tap = ref()
            if tap is not None and not torch.is_grad_enabled():
                tap.acts.append(out.detach())
                tap._trim()

        trunk.stem.register_forward_hook(on_input)
        (trunk.stages[split - 1] if split > 0 else trunk.stem).register_forward_hook(on_split)

    def _trim(self) -> None:
        while len(self.acts) > 1 and sum(a.numel() * a.element_size() for a in self.acts) > TAP_BYTES:
            self.acts.pop(0)
            self.sums.pop(0)

    def take(self, checksums: torch.Tensor) -> torch.Tensor | None:
        """The activations of the last ``len(checksums)`` frames seen, if they are those frames (the stream is
        cleared; what is handed out stays readable until the next pass)."""
        n = len(checksums)
        last = self.last
        if last is not None and len(last[0]) == n and torch.allclose(last[0], checksums, rtol=1e-4, atol=1e-2):
            return last[1]
        if len(self.sums) != len(self.acts) or sum(len(s) for s in self.sums) < n or n == 0:
            return None
        seen = torch.cat(self.sums)[-n:]
        if not torch.allclose(seen, checksums, rtol=1e-4, atol=1e-2):
            return None
        out = torch.cat([a.float() for a in self.acts])[-n:]
        self.sums.clear()
        self.acts.clear()
        self.last = (checksums, out)
        return out


def tap_for(encoder: Encoder, split: int) -> SplitTap:
    """The encoder's tap at ``split`` (one per encoder and split, created on first use)."""
    taps: dict[int, SplitTap] = encoder.__dict__.setdefault("_identity_taps", {})
    if split not in taps:
        taps[split] = SplitTap(encoder.model.visual, split)
    return taps[split]


class SplitActivations:
    """Split activations of a base encoder's frames: reused from the content encoder's own forward pass through
    its tap when the base is the content model (``shared``), else computed here."""

    def __init__(self, base: Encoder, split: int, shared: bool) -> None:
        self.base, self.split, self.shared = base, split, shared
        self.tap = tap_for(base, split) if shared else None

    def split_activations(self, frames: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """Split activations of prepared uint8 frames (N,S,S,3), from the tap when possible."""
        with torch.inference_mode():
            sums = None
            if self.tap is not None:
                sums = self.base.frames_to_tensor(frames).float().sum(dim=(1, 2, 3)).cpu()
                got = self.tap.take(sums)
                if got is not None:
                    self.tap.hits += len(got)
                    return got.cpu()
                self.tap.misses += len(frames)
            out = []
            with self.base._autocast():
                for i in range(0, len(frames), batch_size):
                    x = self.base.frames_to_tensor(frames[i:i + batch_size])
                    out.append(frozen_forward(self.base.model.visual, x, self.split).float().cpu())
            acts = torch.cat(out)
            if self.tap is not None and sums is not None:  # what this computed is not in the tap's stream
                self.tap.sums.clear()
                self.tap.acts.clear()
                self.tap.last = (sums, acts)  # but the batch's next reader may share it
            return acts

    def per_clip(self, frames: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Each clip's split activations (its frames, C, H, W), from one pass over the frames of all of them."""
        return list(torch.split(self.split_activations(np.concatenate(list(frames))), [len(f) for f in frames]))


class TailRunner(SplitActivations):
    """Frame vectors of the identity tower: the base encoder's early stages (reused from its forward pass when
    the tap has them) and the fine-tuned tail."""

    def __init__(self, base: Encoder, tail: TowerTail, shared: bool) -> None:
        super().__init__(base, tail.split, shared)
        self.tail = tail.eval().to(base.device)

    def frame_vectors(self, frames: Sequence[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
        """The tail's L2-normalised frame vectors of each video."""
        allf = np.concatenate(list(frames))
        h = self.split_activations(allf).to(self.base.device)
        out = []
        with torch.inference_mode(), self.base._autocast():
            for i in range(0, len(h), batch_size):
                out.append(self.tail(h[i:i + batch_size]).float().cpu().numpy())
        vecs = np.concatenate(out).astype(np.float32)
        return list(np.split(vecs, np.cumsum([len(f) for f in frames])[:-1]))


def save_tail(folder: Path, tail: TowerTail) -> Path:
    """Write the tail's weights (``identity_tail.safetensors``)."""
    import os

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (TAIL_WEIGHTS + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tail.state_dict().items()}, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / TAIL_WEIGHTS)
    return folder / TAIL_WEIGHTS


def load_tail(folder: Path, base: Encoder, split: int) -> TowerTail:
    """The tail of a tower folder, built on ``base``'s architecture."""
    from safetensors.torch import load_file

    tail = TowerTail(base.model.visual, split)
    try:
        tail.load_state_dict(load_file(str(folder / TAIL_WEIGHTS)))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load the identity tower in {folder}: {type(exc).__name__}: {exc}") from exc
    return tail.eval()


def load_tower_encoder(folder: Path, cfg: dict[str, Any], head: Any, content: Encoder, device: str = "auto") -> Any:
    """The :class:`~echosearch.identity.model.IdentityEncoder` of a tower folder: its base tower (the content
    encoder itself when the weights are the same, so that the early stages run once), tail and head."""
    from echosearch.identity.model import HEAD_WEIGHTS, IdentityEncoder, base_tower
    from echosearch.model.models import weights_sha256

    tower_info = dict(cfg.get("tower") or {})
    base, shared = base_tower(tower_info, content, device, f"the identity tower {folder} was trained on")
    tail_cfg = cfg["tail"]
    tail = load_tail(folder, base, int(tail_cfg["split"]))
    if head.in_dim != tail.out_dim:
        raise ModelLoadError(f"the identity head in {folder} expects {head.in_dim}-d vectors, the tower gives "
                             f"{tail.out_dim}")
    digest = weights_sha256(folder / HEAD_WEIGHTS) + weights_sha256(folder / TAIL_WEIGHTS)
    return IdentityEncoder(str(cfg.get("name") or folder.name), str(folder.resolve()), "tower-tail", head, None,
                           {**tower_info, "train_stages": int(tail_cfg["stages"]), "split": int(tail_cfg["split"])},
                           hashlib.sha256(digest.encode()).hexdigest(), head.out_dim,
                           tail=TailRunner(base, tail, shared), policy=content.policy)


def save_tower(folder: Path, tail: TowerTail, head: Any, tower: dict[str, Any], training: dict[str, Any]) -> Path:
    """Write an identity tower folder: config JSON (format, base tower, split, head shape, training), the tail's
    and the head's weights. Written into a temporary folder beside ``folder`` and swapped in."""
    import json
    import shutil

    from safetensors.torch import save_file

    from echosearch.identity.model import HEAD_CONFIG, HEAD_WEIGHTS

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp-identity")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tail(tmp, tail)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp / HEAD_WEIGHTS))
    (tmp / HEAD_WEIGHTS).chmod(0o644)
    n_stages = len(tail.stages) + tail.split
    cfg = {"format": TOWER_FORMAT, "version": 1, "name": folder.name, "tower": tower, "head": head.shape(),
           "tail": {"split": tail.split, "stages": len(tail.stages), "of_stages": n_stages,
                    "out_dim": tail.out_dim, "params": sum(p.numel() for p in tail.parameters())},
           "training": training}
    (tmp / HEAD_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    if folder.exists():
        old = folder.with_name(folder.name + ".old-identity")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder
