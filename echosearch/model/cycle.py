"""Cycle vectors: how a clip's image features move over its frames (evidence of EF for the change scan).

A content vector is the mean of a clip's frame vectors, and EF is a ratio of the largest to the smallest
ventricle over the cardiac cycle, which a mean hides: a report-trained EF probe on content vectors is ~9
points of EF off per study with the demo model. A clip's *cycle vector* keeps the motion: the activations of
the image tower before its last stage (the identity map's tap, so no second forward pass), average-pooled on a
``GRID`` x ``GRID`` grid of the map, then their mean and their standard deviation over the clip's frames
(2 x C x 9 values; 2,880 on the demo tower, stored as ``video_cycle``). The same probe on them is ~3x more
accurate (``bench/ef_dynamics.py``; ``docs/longitudinal.md``). A tower that cannot be split (ViT, ResNet) has
no cycle vectors; the probes then read the content vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from echosearch.errors import ModelLoadError

if TYPE_CHECKING:
    from echosearch.model.encode import Encoder

GRID = 3  # positions pooled per side of the map
CYCLE_FORMAT = "echosearch-cycle-v1"  # what a stored cycle vector is (the manifest's ``format``)


def cycle_info(encoder: Encoder) -> dict[str, Any] | None:
    """What the encoder's cycle vectors are (``format``, ``split``, ``grid``, ``channels``, ``dim``), or None
    when its tower cannot be split."""
    from echosearch.identity.tower import frozen_forward, split_point, trunk_of

    visual = encoder.model.visual
    try:
        split = split_point(visual, 1)
    except ModelLoadError:
        return None
    size = visual.image_size
    s = int(size[0] if isinstance(size, (tuple, list)) else size)
    with torch.inference_mode():
        dev = next(trunk_of(visual).parameters()).device
        channels = int(frozen_forward(visual, torch.zeros(1, 3, s, s, device=dev), split).shape[1])
    return {"format": CYCLE_FORMAT, "split": split, "grid": GRID, "channels": channels,
            "dim": 2 * channels * GRID * GRID}


def cycle_vector(acts: torch.Tensor) -> np.ndarray:
    """One clip's cycle vector from its split activations (frames, C, H, W): per grid cell and channel, the
    mean over frames, then the standard deviation over frames (0 for a single frame)."""
    grid = torch.nn.functional.adaptive_avg_pool2d(acts.float(), GRID).flatten(1)
    return torch.cat([grid.mean(0), grid.std(0, correction=0)]).numpy().astype(np.float32)


class CycleRunner:
    """Cycle vectors of clips, from the content encoder's own forward pass (its split tap) when possible."""

    def __init__(self, encoder: Encoder, info: dict[str, Any]) -> None:
        from echosearch.identity.tower import SplitActivations

        self.info = info
        self.acts = SplitActivations(encoder, int(info["split"]), shared=True)

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def video_vectors(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """(clips, dim) float32: one cycle vector per clip of ``frames`` (each (n, S, S, 3) uint8)."""
        if not len(frames):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([cycle_vector(h) for h in self.acts.per_clip(frames)])


__all__ = ["CYCLE_FORMAT", "GRID", "CycleRunner", "cycle_info", "cycle_vector"]
