"""Zero-shot predictions from frame vectors, following EchoCLIP's prompt methods (our own prompts).

- binary: mean cosine to a positive prompt set minus mean cosine to a negative set (> 0: present);
- regression: each frame ranks the prompts for values lo..hi; the prediction is the median of the values
  in the top ``top_fraction`` of every frame's ranking;
- categorical: the class whose prompt set has the highest mean cosine.
Prompts live in ``echosearch/data/prompts.json``; their text vectors are computed once per encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from echosearch.encode import Encoder

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.json"
BINARY_TASKS = ("pacer_lead", "tavr", "mitraclip", "lv_dilated")
TASKS = ("ef", *BINARY_TASKS)


@lru_cache(maxsize=4)
def load_prompts(path: str = str(PROMPTS_FILE)) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


@dataclass
class PromptBank:
    """Text vectors of every prompt, computed once for one encoder."""

    regression: dict[str, tuple[np.ndarray, np.ndarray, float]]  # task -> (values, vectors (V,d), top_fraction)
    binary: dict[str, tuple[np.ndarray, np.ndarray]]  # task -> (positive (P,d), negative (N,d))

    @classmethod
    def build(cls, encoder: Encoder, prompts: dict[str, Any] | None = None) -> PromptBank:
        p = prompts or load_prompts()
        reg = {}
        for task, spec in p["regression"].items():
            lo, hi = spec["values"]
            values = np.arange(lo, hi + 1, dtype=np.float32)
            per_template = [encoder.encode_text([t.format(int(v)) for v in values]) for t in spec["templates"]]
            vecs = np.mean(per_template, axis=0)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            reg[task] = (values, vecs.astype(np.float32), float(spec.get("top_fraction", 0.2)))
        binary = {task: (encoder.encode_text(spec["positive"]), encoder.encode_text(spec["negative"]))
                  for task, spec in p["binary"].items()}
        return cls(reg, binary)


def regression(frame_vecs: np.ndarray, values: np.ndarray, prompt_vecs: np.ndarray, top_fraction: float) -> float:
    """Median of the values in the top fraction of every frame's prompt ranking."""
    sims = frame_vecs @ prompt_vecs.T  # (F, V)
    k = max(1, int(round(top_fraction * len(values))))
    top = np.argsort(-sims, axis=1)[:, :k]
    return float(np.median(values[top]))


def binary(frame_vecs: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """Mean cosine to the positive prompts minus mean cosine to the negative prompts."""
    return float((frame_vecs @ positive.T).mean() - (frame_vecs @ negative.T).mean())


def predict(bank: PromptBank, frame_vecs: np.ndarray) -> dict[str, float]:
    """All zero-shot tasks for one video's frame vectors."""
    out: dict[str, float] = {}
    for task, (values, vecs, frac) in bank.regression.items():
        out[task] = regression(frame_vecs, values, vecs, frac)
    for task, (pos, neg) in bank.binary.items():
        out[task] = binary(frame_vecs, pos, neg)
    return out


def study_predictions(video_preds: list[dict[str, float]]) -> dict[str, float]:
    """A study's predictions from its videos: mean EF, and the strongest evidence for each finding.

    A device is seen in the views where it is visible, so binary tasks take the maximum over views.
    """
    if not video_preds:
        return {}
    out: dict[str, float] = {}
    for task in video_preds[0]:
        vals = [p[task] for p in video_preds if task in p]
        out[task] = float(np.mean(vals)) if task not in BINARY_TASKS else float(np.max(vals))
    return out
