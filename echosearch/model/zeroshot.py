"""Zero-shot predictions from frame vectors, by one of two named methods (see :func:`resolve_method`).

``contrast`` (echosearch's own rule; the default for the shipped demo model):
- binary: mean cosine to a positive prompt set minus mean cosine to a negative set (> 0: present);
- regression: prompt vectors averaged across templates; each frame ranks the values lo..hi; the prediction is
  ``np.median`` of the values in the top ``round(top_fraction * n)`` of every frame's ranking.
``echoclip`` (EchoCLIP's published rule, for ``echo-clip`` / ``echo-clip-r``):
- binary: mean over frames and positive prompts of the cosine; not centred at 0 (EchoCLIP's pacemaker
  threshold, 0.298, is on this scale); negative prompts are not used;
- regression: every template x value prompt is a candidate; each frame ranks all candidates; the ranked values
  are averaged over frames rank by rank; the prediction is the lower median of the first ``int(0.2 * C)``.
Both: categorical = the class whose prompts have the highest mean cosine over frames (echosearch's rule, not
checked against EchoCLIP's code). Prompts come from ``echosearch/data/prompts.json`` or from a file in
EchoCLIP's prompt format (:func:`load_prompts` tells them apart); text vectors are computed once per encoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echosearch.errors import ConfigError
from echosearch.model.models import REGISTRY, ModelSpec

if TYPE_CHECKING:
    from echosearch.model.encode import Encoder

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "prompts.json"
BINARY_TASKS = ("pacer_lead", "tavr", "mitraclip", "lv_dilated")
TASKS = ("ef", *BINARY_TASKS)
METHODS = ("echoclip", "contrast")
ECHOCLIP_MODELS = ("echo-clip", "echo-clip-r")
ECHOCLIP_TOP_FRACTION = 0.2
ECHOCLIP_SLOT = "<#>"
ECHOCLIP_THRESHOLDS = {"pacemaker": 0.298, "pacer_lead": 0.298}  # published, on the echoclip binary scale
ECHOCLIP_ALIASES = {"ejection_fraction": "ef", "pacemaker": "pacer_lead", "tavr": "tavr", "mitraclip": "mitraclip"}


def resolve_method(setting: str, model: ModelSpec | str) -> str:
    """The zero-shot method in force: an explicit ``echoclip``/``contrast`` wins; ``auto`` gives ``echoclip`` for
    EchoCLIP models (registry ``echo-clip``/``echo-clip-r`` or any spec with frame policy ``echoclip``), else
    ``contrast``. Resolved here only, so indexing and evaluation agree."""
    if setting in METHODS:
        return setting
    if setting != "auto":
        raise ConfigError(f"unknown zero-shot method {setting!r}: use auto, echoclip or contrast")
    spec = REGISTRY.get(model) if isinstance(model, str) else model
    name = model if isinstance(model, str) else model.name
    return "echoclip" if name in ECHOCLIP_MODELS or (spec is not None and spec.frame_policy == "echoclip") \
        else "contrast"


def decision_threshold(task: str, method: str, threshold: float | None = None) -> float | None:
    """The value above which a binary finding counts as present: 0 under ``contrast`` (centred by its negative
    prompts); under ``echoclip`` the prompt file's threshold, else EchoCLIP's published one (pacemaker), else
    None (unknown: callers fall back to change-only rules)."""
    if method == "contrast":
        return 0.0
    return float(threshold) if threshold is not None else ECHOCLIP_THRESHOLDS.get(task)


def recorded_thresholds(entry: dict[str, Any] | None) -> dict[str, float | None]:
    """Per binary task, the presence threshold an index recorded (manifest ``zeroshot``). An index without
    the record predates the choice of method: ``contrast``, threshold 0."""
    if not entry:
        return dict.fromkeys(BINARY_TASKS, 0.0)
    default = 0.0 if entry.get("method", "contrast") == "contrast" else None
    rec = entry.get("thresholds") or {}
    return {t: rec.get(t, default) for t in (*BINARY_TASKS, *rec)}


def _is_echoclip_format(data: dict[str, Any]) -> bool:
    tasks = [v for k, v in data.items() if not k.startswith("_")]
    return bool(tasks) and all(isinstance(v, dict) and "mode" in v for v in tasks)


def _class_prompts(name: str, spec: dict[str, Any]) -> tuple[list[Any], list[list[str]]]:
    """Classes and their prompts of an EchoCLIP categorical task. ``value_mapping`` may map a class value to its
    word(s) for the slot, or words to class values; without one the class value itself fills the slot."""
    mapping = spec.get("value_mapping") or {}
    classes = list(spec.get("values") or dict.fromkeys(mapping.values()))
    if not classes:
        raise ConfigError(f"categorical task {name!r} has no values")
    prompts = []
    for c in classes:
        fwd = mapping.get(str(c))
        words = [fwd] if isinstance(fwd, str) else [str(w) for w in fwd] if isinstance(fwd, list) else \
            [k for k, v in mapping.items() if v == c] or [str(c)]
        prompts.append(list(dict.fromkeys(t.replace(ECHOCLIP_SLOT, w) for t in spec["label_sources"] for w in words)))
    return classes, prompts


def _from_echoclip(data: dict[str, Any], aliases: dict[str, str] | None, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {"_source": source, "_format": "echoclip", "regression": {}, "binary": {},
                           "categorical": {}}
    for name, spec in data.items():
        if name.startswith("_"):
            continue
        task, mode = (aliases or {}).get(name, name), spec["mode"]
        if not spec.get("label_sources"):
            raise ConfigError(f"{source}: task {name!r} has no label_sources")
        if any(task in out[m] for m in ("regression", "binary", "categorical")):
            raise ConfigError(f"{source}: two tasks map to {task!r}")
        if mode == "regression":
            lo, hi = spec["range"]
            out["regression"][task] = {"templates": list(spec["label_sources"]), "values": [int(lo), int(hi)],
                                       "slot": ECHOCLIP_SLOT}
        elif mode == "binary":  # "testers" (if any) are not used
            out["binary"][task] = {"positive": list(spec["label_sources"]), "negative": [],
                                   **({"threshold": float(spec["threshold"])} if "threshold" in spec else {})}
        elif mode == "categorical":
            classes, prompts = _class_prompts(name, spec)
            out["categorical"][task] = {"classes": classes, "prompts": prompts}
        else:
            raise ConfigError(f"{source}: task {name!r} has unknown mode {mode!r}")
    return out


def prompts_from_echoclip_file(path: Path | str, aliases: dict[str, str] | None = ECHOCLIP_ALIASES) -> dict[str, Any]:
    """A prompt file in EchoCLIP's format ({task: {mode, label_sources, range | values + value_mapping}}) in
    echosearch's form; ``aliases`` renames its tasks to echosearch's (None keeps the file's names)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not _is_echoclip_format(data):
        raise ConfigError(f"{path} is not an EchoCLIP prompt file ({{task: {{\"mode\": ..., \"label_sources\": ...}}}})")
    return _from_echoclip(data, aliases, Path(path).name)


@lru_cache(maxsize=4)
def load_prompts(path: str = str(PROMPTS_FILE)) -> dict[str, Any]:
    """Prompts from echosearch's format (``regression``/``binary`` sections) or EchoCLIP's (detected by structure)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and _is_echoclip_format(data):
        return _from_echoclip(data, ECHOCLIP_ALIASES, Path(path).name)
    if not isinstance(data, dict) or not ({"regression", "binary"} & set(data)):
        raise ConfigError(f"{path}: neither echosearch's prompt format nor EchoCLIP's")
    source = "echosearch" if Path(path).resolve() == PROMPTS_FILE.resolve() else Path(path).name
    return {**data, "_source": source}


def _render(template: str, value: float, slot: str) -> str:
    return template.format(int(value)) if slot == "{}" else template.replace(slot, str(int(value)))


@dataclass
class PromptBank:
    """Text vectors of every prompt for one encoder, laid out for one method (``contrast`` or ``echoclip``)."""

    regression: dict[str, tuple[np.ndarray, np.ndarray, float]]  # task -> (values (C,), vectors (C,d), top_fraction)
    binary: dict[str, tuple[np.ndarray, np.ndarray]]  # task -> (positive (P,d), negative (N,d); N = 0 for echoclip)
    method: str = "contrast"
    categorical: dict[str, tuple[list[Any], list[np.ndarray]]] = field(default_factory=dict)  # classes, vectors
    thresholds: dict[str, float | None] = field(default_factory=dict)  # binary task -> presence threshold
    source: str = "echosearch"

    @classmethod
    def build(cls, encoder: Encoder, prompts: dict[str, Any] | None = None, method: str = "contrast") -> PromptBank:
        """``contrast``: one vector per value (templates averaged), positive and negative sets. ``echoclip``: one
        candidate per template x value, positive prompts only. A contrast binary task needs negatives."""
        if method not in METHODS:
            raise ConfigError(f"unknown zero-shot method {method!r}: use echoclip or contrast")
        p = prompts or load_prompts()
        reg = {}
        for task, spec in p.get("regression", {}).items():
            lo, hi = spec["values"]
            values = np.arange(lo, hi + 1, dtype=np.float32)
            slot = spec.get("slot", "{}")
            per_template = [encoder.encode_text([_render(t, v, slot) for v in values]) for t in spec["templates"]]
            if method == "echoclip":
                cand = np.tile(values, len(per_template))
                if int(len(cand) * ECHOCLIP_TOP_FRACTION) == 0:
                    raise ConfigError(f"regression task {task!r} has {len(cand)} prompts: EchoCLIP's rule needs >= 5")
                reg[task] = (cand, np.concatenate(per_template).astype(np.float32), ECHOCLIP_TOP_FRACTION)
                continue
            vecs = np.mean(per_template, axis=0)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            reg[task] = (values, vecs.astype(np.float32), float(spec.get("top_fraction", 0.2)))
        binary, thresholds = {}, {}
        for task, spec in p.get("binary", {}).items():
            if not spec.get("positive"):
                raise ConfigError(f"binary task {task!r} has no positive prompts")
            if method == "contrast" and not spec.get("negative"):
                raise ConfigError(f"binary task {task!r} has no negative prompts, which the contrast method needs "
                                  "(EchoCLIP's prompt files have none): set zeroshot_method = \"echoclip\"")
            pos = encoder.encode_text(spec["positive"])
            neg = encoder.encode_text(spec["negative"]) if method == "contrast" else pos[:0]
            binary[task] = (pos, neg)
            thresholds[task] = decision_threshold(task, method, spec.get("threshold"))
        cat = {task: (list(spec["classes"]), [encoder.encode_text(ps) for ps in spec["prompts"]])
               for task, spec in p.get("categorical", {}).items()}
        source = p.get("_source", "echosearch" if prompts is None else "custom")
        return cls(reg, binary, method, cat, thresholds, source)

    def manifest(self) -> dict[str, Any]:
        """What an index records (manifest ``zeroshot``): method, presence thresholds, prompt source, classes."""
        out: dict[str, Any] = {"method": self.method, "thresholds": dict(self.thresholds), "prompts": self.source}
        if self.categorical:
            out["classes"] = {t: [str(c) for c in classes] for t, (classes, _) in self.categorical.items()}
        return out


def regression(frame_vecs: np.ndarray, values: np.ndarray, prompt_vecs: np.ndarray, top_fraction: float) -> float:
    """``contrast``: median of the values in the top fraction of every frame's prompt ranking."""
    sims = frame_vecs @ prompt_vecs.T  # (F, V)
    k = max(1, int(round(top_fraction * len(values))))
    top = np.argsort(-sims, axis=1)[:, :k]
    return float(np.median(values[top]))


def binary(frame_vecs: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """``contrast``: mean cosine to the positive prompts minus mean cosine to the negative prompts."""
    return float((frame_vecs @ positive.T).mean() - (frame_vecs @ negative.T).mean())


def _check(frame_vectors: np.ndarray, prompt_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fv, pv = np.asarray(frame_vectors, np.float64), np.asarray(prompt_vectors, np.float64)
    if fv.ndim != 3 or pv.ndim != 2 or fv.shape[2] != pv.shape[1] or fv.shape[1] == 0 or pv.shape[0] == 0:
        raise ValueError(f"need frame vectors (videos, frames >= 1, d) and prompts (candidates >= 1, d); got "
                         f"{fv.shape} and {pv.shape}")
    return fv, pv


def echoclip_binary(frame_vectors: np.ndarray, prompt_vectors: np.ndarray) -> np.ndarray:
    """EchoCLIP's binary score per video: similarities (V,F,C) averaged over candidates, then over frames."""
    fv, pv = _check(frame_vectors, prompt_vectors)
    return (fv @ pv.T).mean(axis=2).mean(axis=1)


def echoclip_regression(frame_vectors: np.ndarray, prompt_vectors: np.ndarray, values: np.ndarray) -> np.ndarray:
    """EchoCLIP's regression per video: each frame ranks the C candidates (descending similarity) and maps ranks
    to the candidates' values; ranked values are averaged over frames rank by rank; the prediction is the lower
    median (``sorted[(k - 1) // 2]``, as torch.median) of the first ``k = int(C * 0.2)``."""
    fv, pv = _check(frame_vectors, prompt_vectors)
    vals = np.asarray(values, np.float64)
    if vals.shape != (pv.shape[0],):
        raise ValueError(f"{vals.shape[0] if vals.ndim else 0} values for {pv.shape[0]} candidate prompts")
    c = pv.shape[0]
    k = int(c * ECHOCLIP_TOP_FRACTION)
    if k == 0:
        raise ValueError(f"{c} candidate prompts leave int({c} * 0.2) = 0 values to take the median of: "
                         "EchoCLIP's regression needs at least 5 candidates")
    order = np.argsort(-(fv @ pv.T), axis=2, kind="stable")  # (V, F, C): candidates by descending similarity
    ranked = vals[order].mean(axis=1)  # (V, C)
    return np.sort(ranked[:, :k], axis=1)[:, (k - 1) // 2]


def categorical(frame_vecs: np.ndarray, class_vecs: list[np.ndarray]) -> int:
    """Index of the class whose prompts have the highest mean cosine over frames and prompts."""
    return int(np.argmax([float((frame_vecs @ v.T).mean()) for v in class_vecs]))


def predict(bank: PromptBank, frame_vecs: np.ndarray) -> dict[str, float]:
    """All zero-shot tasks for one video's frame vectors, by the bank's method. A categorical task's value is
    its class value when numeric, else the class's position in the prompt file's list."""
    out: dict[str, float] = {}
    echo = bank.method == "echoclip"
    for task, (values, vecs, frac) in bank.regression.items():
        out[task] = float(echoclip_regression(frame_vecs[None], vecs, values)[0]) if echo else \
            regression(frame_vecs, values, vecs, frac)
    for task, (pos, neg) in bank.binary.items():
        out[task] = float(echoclip_binary(frame_vecs[None], pos)[0]) if echo else binary(frame_vecs, pos, neg)
    for task, (classes, class_vecs) in bank.categorical.items():
        i = categorical(frame_vecs, class_vecs)
        numeric = isinstance(classes[i], (int, float)) and not isinstance(classes[i], bool)
        out[task] = float(classes[i]) if numeric else float(i)
    return out


def study_predictions(video_preds: list[dict[str, float]], binary: Iterable[str] = BINARY_TASKS,
                      categorical: Iterable[str] = ()) -> dict[str, float]:
    """A study's predictions from its videos: the mean of a regression, the strongest evidence for a finding,
    the most frequent class of a categorical task (ties: the smaller value).

    A device is seen in the views where it is visible, so binary tasks take the maximum over views.
    """
    if not video_preds:
        return {}
    binary, categorical = set(binary), set(categorical)
    out: dict[str, float] = {}
    for task in video_preds[0]:
        vals = [p[task] for p in video_preds if task in p]
        if task in binary:
            out[task] = float(np.max(vals))
        elif task in categorical:
            uniq, counts = np.unique(vals, return_counts=True)
            out[task] = float(uniq[np.argmax(counts)])
        else:
            out[task] = float(np.mean(vals))
    return out


def pooling_tasks(entry: dict[str, Any] | None) -> tuple[set[str], set[str]]:
    """(binary, categorical) task names of an index's zero-shot record (manifest ``zeroshot``), for pooling."""
    entry = entry or {}
    return set(BINARY_TASKS) | set(entry.get("thresholds") or {}), set(entry.get("classes") or {})
