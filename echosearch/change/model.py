"""The change model: one logistic per flag type over the standardised pair features, its calibration carried
to each archive's own event rates by prior shift (Saerens, Latinne & Decaestecker 2002).

The weights ship in ``echosearch/data/change_model.json``; ``bench/change_quality.py --fit`` refits them
from synthetic cohorts of tuning seeds (never the seeds the figures in docs/longitudinal.md come from).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from echosearch.change.features import DEVICES, FEATURES, PROBE_FEATURES, Scales

FLAG_TYPES = ("ef_fall", "ef_rise", *(f"new_{d}" for d in DEVICES), *(f"removed_{d}" for d in DEVICES), "new_heart")
ANY = "any_change"  # a model of its own for the visit's change score: anything on the flag list happened
MODEL_FILE = Path(__file__).resolve().parents[1] / "data" / "change_model.json"
EF_MARGIN = 10.0  # EF points: a fall or rise beyond this is a flag (ordinary visit-to-visit drift stays within 7)


_GENERAL = ("study_dist", "view_dist", "view_dist_max", "next_gap", "has_next")


def evidence(flag: str) -> tuple[str, ...]:
    """The features a flag type is judged on: how much changed and whether it lasts, plus its own evidence
    (EF and dilation for EF, the device's own zero-shot score, probe and report-calibrated presence, for a new heart
    identity, the post-transplant state,
    and the normal function and lost devices of a heart that replaced a failing one). Keeping each flag to
    its own evidence keeps it from being inferred from the absence of other changes, which does not carry over
    between archives."""
    if flag in ("ef_fall", "ef_rise"):
        return (*_GENERAL, "ef_fall", "ef_rise", "ef_probe_fall", "ef_probe_rise", "lv_dilated_rise", "lv_dilated_fall")
    for d in DEVICES:
        if flag in (f"new_{d}", f"removed_{d}"):
            return (*_GENERAL, f"{d}_rise", f"{d}_fall", f"{d}_probe_rise", f"{d}_probe_fall", f"{d}_present_rise",
                    f"{d}_present_fall")
    if flag == "new_heart":  # a transplant replaces a failing heart: its function is normal, the old devices go with it
        return (*_GENERAL, "id_dist", "view_id_dist", "id_other", "transplant_probe_rise", "transplant_present_rise",
                "ef_probe_rise", *(f"{d}_probe_fall" for d in DEVICES))
    return FEATURES


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """L2-penalised logistic regression by Newton's method; returns (weights..., intercept). The change model
    drops features whose weight comes out negative and refits (non-negative evidence weights)."""
    A = np.c_[X, np.ones(len(X))]
    w = np.zeros(A.shape[1])
    w[-1] = _logit(float(np.clip(y.mean(), 1e-3, 1 - 1e-3)))
    pen = np.full(A.shape[1], l2)
    pen[-1] = 0.0

    def loss(w: np.ndarray) -> float:  # penalised negative log-likelihood (logaddexp: no overflow)
        z = A @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(pen * w * w))

    cur = loss(w)
    for _ in range(iters):
        p = _sigmoid(A @ w)
        g = A.T @ (p - y) + pen * w
        H = (A * (p * (1 - p))[:, None]).T @ A + np.diag(pen + 1e-9)
        step = np.linalg.solve(H, g)
        t = 1.0  # backtracking: a full Newton step overshoots on (nearly) separable labels
        while t > 1e-6 and loss(w - t * step) > cur:
            t /= 2
        w -= t * step
        cur = loss(w)
        if np.abs(t * step).max() < 1e-8:
            break
    return w


@dataclass
class ChangeModel:
    """Weights per flag type (features of :data:`FEATURES`, then an intercept) and the event rate each was
    fitted at; ``info`` records the cohorts it was fitted on."""

    weights: dict[str, np.ndarray]
    prevalence: dict[str, float]
    ef_margin: float = EF_MARGIN
    info: dict[str, Any] = field(default_factory=dict)
    scales: Scales | None = None  # the null of the encoder it was fitted for (``info["encoder"]``)
    # per flag type, weights fitted without the report-trained probes: an archive whose reports give a probe no
    # labels scores that flag with these (its probe features are missing, not "no change")
    fallback: dict[str, np.ndarray] = field(default_factory=dict)

    def scales_for(self, encoder: dict[str, Any] | None, identity_source: str) -> Scales | None:
        """The stored null when the index was built with the encoder the model was fitted for; None: estimate
        it from the index's own visits."""
        mine = self.info.get("encoder") or {}
        if self.scales is None or not encoder or not mine:
            return None
        same = mine.get("weights_sha256") == encoder.get("weights_sha256") and mine.get("name") == encoder.get("name")
        return self.scales if same else None

    def same_identity(self, identity_source: str) -> bool:
        """Whether the identity features mean what they meant when the model was fitted."""
        return self.info.get("identity_source", identity_source) == identity_source

    def logits(self, X: np.ndarray, missing: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """Per flag type, the logit of each pair; a type whose probe features are ``missing`` in this archive
        uses its fallback weights (fitted without probes)."""
        A = np.c_[X, np.ones(len(X))]
        idx = {f: k for k, f in enumerate(FEATURES)}
        out = {}
        for t, w in self.weights.items():
            gone = any(w[idx[f]] != 0 for f in missing if f in idx)
            out[t] = A @ (self.fallback[t] if gone and t in self.fallback else w)
        return out

    def probabilities(self, X: np.ndarray, adapt: bool = True, iters: int = 30,
                      rates: dict[str, float] | None = None,
                      missing: frozenset[str] = frozenset()) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """(probability per flag type, the event rate it assumes). ``adapt``: the rate is re-estimated on these
        pairs by EM (prior shift), so the probabilities are calibrated to this archive's own frequency of each
        event rather than the tuning cohorts'; without ``adapt`` the tuning rate is kept; ``rates``: given.
        ``missing``: features this archive cannot compute (a probe without labels)."""
        out: dict[str, np.ndarray] = {}
        got: dict[str, float] = {}
        for t, z in self.logits(X, missing).items():
            pi0 = self.prevalence[t]
            pi = pi0 if rates is None else rates[t]
            p = _sigmoid(z + _logit(pi) - _logit(pi0))
            if rates is None and adapt and len(X) >= 20:
                lo, hi = pi0 / 5, min(0.95, 5 * pi0)  # bounded: EM on a poorly separated type can run to 0
                for _ in range(iters):
                    p = _sigmoid(z + _logit(pi) - _logit(pi0))
                    new = float(np.clip(p.mean(), lo, hi))
                    if abs(new - pi) < 1e-6:
                        break
                    pi = new
                p = _sigmoid(z + _logit(pi) - _logit(pi0))
            out[t], got[t] = p, pi
        return out, got

    def to_json(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "ef_margin": self.ef_margin, "info": self.info,
                "scales": self.scales.to_json() if self.scales is not None else None,
                "prevalence": self.prevalence, "weights": {t: [round(float(x), 6) for x in w]
                                                           for t, w in self.weights.items()},
                "fallback": {t: [round(float(x), 6) for x in w] for t, w in self.fallback.items()}}

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path | None = None) -> ChangeModel:
        data = json.loads((path or MODEL_FILE).read_text())
        if list(data["features"]) != list(FEATURES):
            raise ValueError(f"{path or MODEL_FILE} was fitted on other features; refit it (bench/change_quality.py --fit)")
        return cls({t: np.asarray(w, dtype=np.float64) for t, w in data["weights"].items()},
                   {t: float(v) for t, v in data["prevalence"].items()}, float(data.get("ef_margin", EF_MARGIN)),
                   dict(data.get("info", {})), Scales.from_json(data["scales"]) if data.get("scales") else None,
                   {t: np.asarray(w, dtype=np.float64) for t, w in (data.get("fallback") or {}).items()})

    @classmethod
    def fit(cls, X: np.ndarray, labels: dict[str, np.ndarray], l2: float = 1.0,
            info: dict[str, Any] | None = None, ef_margin: float = EF_MARGIN,
            scales: Scales | None = None) -> ChangeModel:
        labels = {**labels, ANY: np.any(np.stack([labels[t] for t in FLAG_TYPES]), axis=0)}
        free = np.asarray([f == "has_next" for f in FEATURES])
        probe = np.asarray([f in PROBE_FEATURES for f in FEATURES])

        def fit(t: str, use: np.ndarray) -> np.ndarray:
            for _ in range(len(FEATURES)):  # monotone: more evidence never lowers a probability
                w = fit_logistic(X * use, labels[t].astype(np.float64), l2)  # unused features keep weight 0
                neg = use & ~free & (w[:-1] < 0)
                if not neg.any():
                    break
                use = use & ~neg
            return w

        w, back = {}, {}
        for t in (*FLAG_TYPES, ANY):
            use = np.asarray([f in evidence(t) for f in FEATURES])
            w[t] = fit(t, use)
            if (use & probe).any():
                back[t] = fit(t, use & ~probe)
        prev = {t: float(np.clip(labels[t].mean(), 1e-4, 0.95)) for t in (*FLAG_TYPES, ANY)}
        return cls(w, prev, ef_margin, dict(info or {}), scales, back)


def default_model() -> ChangeModel:
    """The shipped model; a neutral one (each flag from its own feature alone) if the file is missing."""
    if MODEL_FILE.is_file():
        return ChangeModel.load()
    idx = {f: k for k, f in enumerate(FEATURES)}
    own = {"ef_fall": "ef_fall", "ef_rise": "ef_rise", "new_heart": "view_id_dist",
           **{f"new_{d}": f"{d}_rise" for d in DEVICES}, **{f"removed_{d}": f"{d}_fall" for d in DEVICES}}
    w: dict[str, np.ndarray] = {}
    for t, f in own.items():
        v = np.zeros(len(FEATURES) + 1)
        v[idx[f]], v[-1] = 1.5, -6.0
        w[t] = v
    w[ANY] = np.r_[np.zeros(len(FEATURES)), -6.0]
    w[ANY][idx["view_dist"]] = 1.5
    return ChangeModel(w, {**dict.fromkeys(FLAG_TYPES, 0.05), ANY: 0.2}, info={"fitted": False})
