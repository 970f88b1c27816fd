"""Persistent heart anatomy of a synthetic patient and its patient-specific texture.

Every length is an end-diastolic size in millimetres in the heart's own frame. A patient keeps one
:class:`Anatomy` (and one texture seed) for life, drifting slightly between visits, until a transplant
replaces it with a newly drawn heart. These shapes, orientations, landmarks and the texture are what makes
patient identity learnable from pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import cv2
import numpy as np

# Texture grid in heart coordinates: TEX_N x TEX_N pixels of TEX_MM mm, origin at (TEX_U0, TEX_V0) mm.
TEX_N = 256
TEX_MM = 0.8
TEX_U0 = -TEX_N * TEX_MM / 2
TEX_V0 = -40.0


@dataclass(frozen=True)
class Anatomy:
    """Geometry of one heart (mm, degrees). ``heart_id`` changes only with a transplant."""

    heart_id: int
    texture_seed: int
    lv_len: float  # endocardial apex to mitral annulus
    lv_wid: float  # LV internal diameter (A4C width, PLAX LVIDd)
    wall: float  # lateral / posterior wall
    sept: float  # interventricular septum
    rv_len: float
    rv_wid: float
    la_len: float
    la_wid: float
    la_ap: float  # LA antero-posterior diameter (PLAX)
    ra_len: float
    ra_wid: float
    ao: float  # aortic root diameter
    bulge: float  # basal septal bulge (sigmoid septum)
    mod_band: float  # moderator band position along the RV (fraction of its length)
    mod_thick: float
    pap_pos: float  # papillary muscle position along the LV
    pap_size: float
    mac: float  # mitral annular calcification size (0: none)
    lv_tilt: float  # LV long axis tilt relative to the septum
    rv_tilt: float
    orient_a4c: float  # heart rotation in each view's plane
    orient_plax: float
    orient_a2c: float
    apex_depth: float  # depth of the endocardial apex (A4C/A2C) or of the RV front wall (PLAX)
    lat_off: float  # lateral offset of the heart in the plane
    tex_contrast: float  # strength of the patient texture

    def scaled(self, **factors: float) -> Anatomy:
        """A copy with the named fields multiplied by the given factors."""
        return dataclasses.replace(self, **{k: getattr(self, k) * f for k, f in factors.items()})


# (mean, sd, low, high) of each random field of a heart; sd is multiplied by the cohort's spread.
_FIELDS: dict[str, tuple[float, float, float, float]] = {
    "lv_len": (80.0, 6.0, 62.0, 98.0),
    "lv_wid": (45.0, 3.5, 36.0, 54.0),
    "wall": (9.5, 1.2, 6.5, 13.0),
    "sept": (10.0, 1.4, 7.0, 15.0),
    "rv_len": (0.80, 0.06, 0.62, 0.95),  # fraction of lv_len
    "rv_wid": (33.0, 4.0, 24.0, 44.0),
    "la_len": (50.0, 5.0, 38.0, 64.0),
    "la_wid": (40.0, 4.0, 30.0, 52.0),
    "la_ap": (35.0, 4.0, 26.0, 46.0),
    "ra_len": (45.0, 5.0, 34.0, 58.0),
    "ra_wid": (37.0, 4.0, 28.0, 48.0),
    "ao": (31.0, 3.0, 24.0, 40.0),
    "bulge": (3.0, 3.0, 0.0, 10.0),
    "mod_band": (0.45, 0.10, 0.25, 0.70),
    "mod_thick": (3.0, 1.0, 1.5, 5.5),
    "pap_pos": (0.55, 0.08, 0.40, 0.72),
    "pap_size": (6.0, 1.6, 3.0, 10.0),
    "mac": (2.0, 3.0, 0.0, 7.0),
    "lv_tilt": (0.0, 5.0, -12.0, 12.0),
    "rv_tilt": (0.0, 6.0, -14.0, 14.0),
    "orient_a4c": (0.0, 9.0, -22.0, 22.0),
    "orient_plax": (0.0, 7.0, -18.0, 18.0),
    "orient_a2c": (0.0, 9.0, -22.0, 22.0),
    "apex_depth": (18.0, 4.0, 9.0, 30.0),
    "lat_off": (0.0, 6.0, -14.0, 14.0),
}


def random_anatomy(rng: np.random.Generator, heart_id: int, spread: float, difficulty: float) -> Anatomy:
    """Draw a new heart; ``spread`` scales how different hearts are from each other."""
    vals: dict[str, float] = {}
    for name, (mean, sd, lo, hi) in _FIELDS.items():
        vals[name] = float(np.clip(mean + sd * spread * rng.standard_normal(), lo, hi))
    vals["rv_len"] *= vals["lv_len"]
    if vals["mac"] < 1.5:
        vals["mac"] = 0.0
    contrast = 0.32 * min(1.6, spread) ** 0.5 / (0.6 + 0.4 * difficulty)
    return Anatomy(heart_id=heart_id, texture_seed=int(rng.integers(0, 2**31 - 1)), tex_contrast=contrast,
                   **vals)


def drift(anat: Anatomy, rng: np.random.Generator, difficulty: float) -> Anatomy:
    """Small between-visit change of a heart (ageing, measurement plane): a few percent, a few degrees."""
    s = 0.015 * difficulty
    sizes = ("lv_len", "lv_wid", "wall", "sept", "rv_len", "rv_wid", "la_len", "la_wid", "la_ap",
             "ra_len", "ra_wid", "ao", "pap_size")
    out = anat.scaled(**{k: float(np.exp(s * rng.standard_normal())) for k in sizes})
    angles = {k: getattr(anat, k) + 1.2 * difficulty * float(rng.standard_normal())
              for k in ("orient_a4c", "orient_plax", "orient_a2c", "lv_tilt", "rv_tilt")}
    return dataclasses.replace(out, **angles)


def remodel(anat: Anatomy, dilation: float) -> Anatomy:
    """The visible heart of a visit: LV (and LA) enlarged by ``dilation`` (0 normal .. 0.45 severe)."""
    if dilation <= 0:
        return anat
    return anat.scaled(lv_len=1.0 + 0.45 * dilation, lv_wid=1.0 + dilation, la_len=1.0 + 0.3 * dilation,
                       la_wid=1.0 + 0.3 * dilation, la_ap=1.0 + 0.35 * dilation, wall=1.0 - 0.25 * dilation,
                       sept=1.0 - 0.2 * dilation)


@functools.lru_cache(maxsize=16)
def heart_texture(seed: int, contrast: float) -> np.ndarray:
    """Patient-specific multiplicative texture (TEX_N x TEX_N float32, mean ~1) in heart coordinates.

    Three octaves of smoothed noise plus a few bright fibrous streaks: the pattern moves with the heart,
    so it reads as the same tissue texture under any probe pose, gain or depth.
    """
    rng = np.random.default_rng([seed, 0x7E7])
    field = np.zeros((TEX_N, TEX_N), np.float32)
    for down, weight in ((1, 0.45), (4, 1.0), (10, 0.8)):  # octaves drawn coarse, then enlarged
        side = TEX_N // down
        n = cv2.GaussianBlur(rng.standard_normal((side, side), dtype=np.float32), (0, 0), 1.0)
        if down > 1:
            n = cv2.resize(n, (TEX_N, TEX_N), interpolation=cv2.INTER_CUBIC)
        field += weight * n / (n.std() + 1e-6)
    streaks = np.zeros((TEX_N, TEX_N), np.uint8)
    for _ in range(int(rng.integers(6, 12))):
        p = rng.uniform(20, TEX_N - 20, 2)
        d = rng.uniform(8, 30) * np.array([np.cos(a := rng.uniform(0, np.pi)), np.sin(a)])
        cv2.line(streaks, tuple(int(v) for v in p - d), tuple(int(v) for v in p + d), 255, 2, cv2.LINE_AA)
    field += 1.2 * cv2.GaussianBlur(streaks.astype(np.float32) / 255.0, (0, 0), 1.2)
    field /= field.std() + 1e-6
    tex = np.exp(contrast * field)
    return (tex / tex.mean()).astype(np.float32)
