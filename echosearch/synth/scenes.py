"""Per-view drawing of a heart at one instant of the cardiac cycle (A4C, PLAX, A2C).

Shapes are drawn with OpenCV primitives (sub-pixel, anti-aliased) onto a uint8 *reflectivity* canvas
(100 = 1.0) in heart millimetres mapped to image pixels by :class:`Pose`; the LV cavity is drawn into a
separate mask at the same time. Devices are drawn far brighter than tissue (they saturate, as metal
does); the renderer adds what metal does to the beams behind it (shadow, comet-tail reverberation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from echosearch.synth.anatomy import Anatomy
from echosearch.synth.config import es_area_ratio
from echosearch.synth.history import VisitState

SHIFT = 4  # fixed-point bits of OpenCV drawing coordinates
ONE = 1 << SHIFT
CHEST, MYO, PERI, VALVE, BLOOD, SEC, DEVICE, CALC, SUTURE = 16, 60, 120, 80, 3, 6, 250, 130, 115


@dataclass(frozen=True)
class Pose:
    """Affine map from heart millimetres (u lateral, v deeper) to canvas pixels."""

    ox: float  # canvas pixel of heart origin
    oy: float
    theta_deg: float
    px_per_mm: float
    u0: float = 0.0  # heart u that lands on (ox, oy): the LV apex in apical views

    def pt(self, u: float, v: float) -> tuple[float, float]:
        c, s = math.cos(math.radians(self.theta_deg)), math.sin(math.radians(self.theta_deg))
        u = u - self.u0
        return self.ox + self.px_per_mm * (c * u - s * v), self.oy + self.px_per_mm * (s * u + c * v)

    def matrix(self) -> np.ndarray:
        """2x3 matrix of the same map, for warping heart-frame rasters."""
        c, s = math.cos(math.radians(self.theta_deg)), math.sin(math.radians(self.theta_deg))
        k = self.px_per_mm
        return np.array([[k * c, -k * s, self.ox - k * c * self.u0],
                         [k * s, k * c, self.oy - k * s * self.u0]], np.float64)


@dataclass(frozen=True)
class Phase:
    """Instant of the cycle: LV contraction p (0 ED .. 1 ES), mitral and aortic valve opening (0..1)."""

    p: float
    mitral: float
    aortic: float

    @staticmethod
    def at(cycle: float) -> Phase:
        c = cycle % 1.0
        ts, tf = 0.36, 0.30  # systole and rapid-filling fractions of the cycle
        if c < ts:
            p = 0.5 - 0.5 * math.cos(math.pi * c / ts)
            aortic = math.sin(math.pi * c / ts) ** 0.5
        elif c < ts + tf:
            p = 0.5 + 0.5 * math.cos(math.pi * (c - ts) / tf)
            aortic = 0.0
        else:
            p, aortic = 0.0, 0.0
        mitral = max(math.exp(-(((c - ts - 0.1) / 0.07) ** 2)), 0.6 * math.exp(-(((c - 0.9) / 0.04) ** 2)))
        return Phase(p, min(1.0, mitral * 1.3), aortic)


class Canvas:
    """A reflectivity canvas plus (optionally) the LV-cavity mask, with drawing in heart millimetres."""

    def __init__(self, img: np.ndarray, mask: np.ndarray | None, pose: Pose) -> None:
        self.img, self.mask, self.pose = img, mask, pose

    def _c(self, u: float, v: float) -> tuple[int, int]:
        x, y = self.pose.pt(u, v)
        return int(round(x * ONE)), int(round(y * ONE))

    def ellipse(self, u: float, v: float, a: float, b: float, val: int, ang: float = 0.0, thick: float = 0.0,
                arc: tuple[float, float] = (0.0, 360.0), lv: int | None = None) -> None:
        """Filled (thick=0) or outlined ellipse with semi-axes a (along u) and b (along v), in mm."""
        k = self.pose.px_per_mm * ONE
        axes = (max(1, int(a * k)), max(1, int(b * k)))
        t = -1 if thick <= 0 else max(1, int(round(thick * self.pose.px_per_mm)))
        ang = ang + self.pose.theta_deg
        cv2.ellipse(self.img, self._c(u, v), axes, ang, arc[0], arc[1], val, t, cv2.LINE_AA, SHIFT)
        if lv is not None and self.mask is not None:
            cv2.ellipse(self.mask, self._c(u, v), axes, ang, arc[0], arc[1], lv, t, cv2.LINE_8, SHIFT)

    def line(self, pts: list[tuple[float, float]], val: int, thick: float, lv: int | None = None) -> None:
        arr = np.array([self._c(u, v) for u, v in pts], np.int32).reshape(-1, 1, 2)
        t = max(1, int(round(thick * self.pose.px_per_mm)))
        cv2.polylines(self.img, [arr], False, val, t, cv2.LINE_AA, SHIFT)
        if lv is not None and self.mask is not None:
            cv2.polylines(self.mask, [arr], False, lv, t, cv2.LINE_8, SHIFT)

    def poly(self, pts: list[tuple[float, float]], val: int, lv: int | None = None) -> None:
        arr = np.array([self._c(u, v) for u, v in pts], np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.img, [arr], val, cv2.LINE_AA, SHIFT)
        if lv is not None and self.mask is not None:
            cv2.fillPoly(self.mask, [arr], lv, cv2.LINE_8, SHIFT)


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def _lv_dims(a: Anatomy, ef: float, p: float) -> tuple[float, float, float, float]:
    """Half-width, half-length, wall and septum thickness of the LV at contraction p (see es_area_ratio)."""
    r = es_area_ratio(ef)
    f = 1.0 - p * (1.0 - r)
    thick = 1.0 + 1.1 * p * (1.0 - r)
    return a.lv_wid / 2 * f**0.7, a.lv_len / 2 * f**0.3, a.wall * thick, a.sept * thick


def _chest(cv: Canvas, a: Anatomy) -> None:
    """Bright fascial layers of the chest wall between the probe and the heart (heart v < 0)."""
    for frac, val in ((0.3, 48), (0.65, 40)):
        cv.line([(-120, -a.apex_depth * frac), (120, -a.apex_depth * frac)], val, 2.0)


Pt = tuple[float, float]


def _mitral(cv: Canvas, hinge_a: Pt, hinge_p: Pt, open_a: Pt, open_p: Pt, coapt: Pt, opening: float,
            clip: bool) -> None:
    """Two leaflets from their hinges; with a MitraClip their tips stay joined under a bright clip."""
    if clip:
        opening *= 0.3
    ta, tp = _lerp(coapt, open_a, opening), _lerp(coapt, open_p, opening)
    if clip:
        ta = tp = _lerp(coapt, _lerp(open_a, open_p, 0.5), opening)
    cv.line([hinge_a, ta], VALVE, 2.0, lv=0)
    cv.line([hinge_p, tp], VALVE, 2.0, lv=0)
    if clip:
        cv.ellipse(ta[0], ta[1], 4.5, 6.5, DEVICE, lv=0)


def draw_a4c(cv: Canvas, vs: VisitState, ph: Phase) -> None:
    """Apical four-chamber: apex at the top, LV on the right, RV left, atria below."""
    a = vs.anatomy
    hw, hl, wt, st = _lv_dims(a, vs.ef, ph.p)
    cu = a.sept / 2 + a.lv_wid / 2
    base = 2 * hl
    rvl, rvw = a.rv_len * (1 - 0.12 * ph.p), a.rv_wid * (1 - 0.16 * ph.p)
    tv_base = base + 6.0
    u_rv = -a.sept / 2 - a.rv_wid / 2
    fa = 1.0 + 0.08 * ph.p
    la_w, la_l, ra_w, ra_l = a.la_wid / 2 * fa, a.la_len / 2 * fa, a.ra_wid / 2 * fa, a.ra_len / 2 * fa
    u_la, u_ra = max(cu - 1, 1.5 + la_w), min(u_rv + 1, -1.5 - ra_w)
    v_la, v_ra = base + 3 + la_l, tv_base + 3 + ra_l
    _chest(cv, a)
    # myocardium, then cavities, then structures inside them
    cv.ellipse(cu, hl, hw + wt, hl + wt, MYO, ang=a.lv_tilt)
    cv.ellipse(u_rv, tv_base - rvl / 2, rvw / 2 + 3.5, rvl / 2 + 3.5, MYO, ang=a.rv_tilt)
    cv.ellipse(0, base * 0.5, a.sept / 2 + 1.5, base * 0.5, MYO)
    cv.ellipse(u_la, v_la, la_w + 2.5, la_l + 2.5, MYO)
    cv.ellipse(u_ra, v_ra, ra_w + 2.5, ra_l + 2.5, MYO)
    cv.ellipse(cu, hl, hw + wt + 1.5, hl + wt + 1.5, PERI, ang=a.lv_tilt, thick=2.5, arc=(-20, 250))
    cv.ellipse(u_rv, tv_base - rvl / 2, rvw / 2 + 5, rvl / 2 + 5, PERI, ang=a.rv_tilt, thick=2.0,
               arc=(110, 280))
    blood = SEC if vs.ef < 25 else BLOOD
    cv.ellipse(cu, hl, hw, hl, blood, ang=a.lv_tilt, lv=1)
    cv.ellipse(u_rv, tv_base - rvl / 2, rvw / 2, rvl / 2, BLOOD, ang=a.rv_tilt)
    cv.ellipse(u_la, v_la, la_w, la_l, BLOOD)
    cv.ellipse(u_ra, v_ra, ra_w, ra_l, BLOOD)
    # basal septal bulge, papillary muscle, moderator band, annular calcification
    if a.bulge > 0.5:
        cv.ellipse(a.sept / 2, base - 12, a.bulge, 9, MYO, lv=0)
    cv.ellipse(cu + hw * 0.72, 2 * hl * a.pap_pos, a.pap_size * 0.55, a.pap_size, MYO + 10, ang=-20, lv=0)
    v_mb = tv_base - rvl * (1 - a.mod_band)
    cv.line([(-a.sept / 2, v_mb), (u_rv - rvw / 2, v_mb + 6)], MYO, a.mod_thick)
    hinge_a, hinge_p = (a.sept / 2 + 1, base), (cu + hw * 0.95, base)
    if a.mac > 0:
        cv.ellipse(hinge_p[0] + 2, hinge_p[1] + 1, a.mac, a.mac * 0.7, CALC)
    ant, post = a.lv_wid * 0.5, a.lv_wid * 0.32
    _mitral(cv, hinge_a, hinge_p, (hinge_a[0] + 3, base - ant), (hinge_p[0] - 2, base - post),
            (cu - hw * 0.15, base - 6), ph.mitral * (0.55 if vs.ef < 35 else 1.0), vs.mitraclip)
    th_a, th_p = (-a.sept / 2 - 1, tv_base), (u_rv - rvw / 2 * 0.95, tv_base)
    tco = (u_rv + rvw * 0.1, tv_base - 5)
    cv.line([th_a, _lerp(tco, (th_a[0] - 2, tv_base - 20), ph.mitral)], VALVE, 1.8)
    cv.line([th_p, _lerp(tco, (th_p[0] + 3, tv_base - 16), ph.mitral)], VALVE, 1.8)
    if vs.transplanted:
        cv.line([(u_ra - ra_w, v_ra + 2), (u_ra + ra_w, v_ra - 2), (u_la + la_w, v_la + 1)], SUTURE, 2.2)
    if vs.pacer:
        ra_top = (u_ra - ra_w * 0.4, v_ra + ra_l * 0.85)
        cv.line([ra_top, (u_ra + 2, v_ra - 4), (tco[0], tv_base + 2), (u_rv + 4, tv_base - rvl * 0.85)],
                DEVICE, 4.0)


def draw_plax(cv: Canvas, vs: VisitState, ph: Phase) -> None:
    """Parasternal long axis: RV at the top, LV in the middle (apex off to the left), aorta and LA right."""
    a = vs.anatomy
    hw, hl_, wt, st = _lv_dims(a, vs.ef, ph.p)
    hl = hl_ * 1.1
    rvh = a.rv_wid * 0.72
    top = 0.0
    c_v = top + 4 + rvh + a.sept + a.lv_wid / 2
    c_u = 14 - a.lv_len * 0.55
    ed_top, ed_bot = c_v - a.lv_wid / 2, c_v + a.lv_wid / 2
    rv_c = (c_u + 10, top + 4 + rvh / 2)
    v_ao = ed_top - a.sept + a.ao / 2 + 1
    ao_t, ao_b = v_ao - a.ao / 2, v_ao + a.ao / 2
    fa = 1.0 + 0.08 * ph.p
    la_r = a.la_ap / 2 * fa
    la_c = (34.0, ao_b + 3 + la_r)
    _chest(cv, a)
    cv.ellipse(rv_c[0], rv_c[1], 70, rvh / 2 * (1 - 0.1 * ph.p) + 4, MYO)
    cv.ellipse(c_u, c_v, hl + wt, hw + (wt + st) / 2, MYO, ang=3)
    cv.ellipse(la_c[0], la_c[1], la_r * 1.2 + 2.5, la_r + 2.5, MYO)
    cv.ellipse(c_u, c_v, hl + wt + 2, hw + wt + 2.0, PERI, ang=3, thick=3.0, arc=(30, 160))
    cv.ellipse(la_c[0], la_c[1], la_r * 1.2 + 4, la_r + 4, PERI, thick=2.5, arc=(20, 160))
    cv.ellipse(rv_c[0], rv_c[1], 70, rvh / 2 * (1 - 0.1 * ph.p), BLOOD)
    cv.poly([(8, ao_t), (75, ao_t + 2), (75, ao_b - 2), (8, ao_b)], BLOOD)
    cv.ellipse(20, v_ao, 12, a.ao / 2 * 1.08, BLOOD)
    cv.line([(6, ao_t), (20, ao_t - 2), (75, ao_t + 2)], PERI - 25, 2.5)
    cv.line([(6, ao_b), (20, ao_b + 2), (75, ao_b - 2)], PERI - 25, 2.5)
    cv.ellipse(la_c[0], la_c[1], la_r * 1.2, la_r, BLOOD)
    dao = (la_c[0] - la_r * 0.9, la_c[1] + la_r + 7)
    cv.ellipse(dao[0], dao[1], 7, 7, PERI - 30, thick=2.0)
    blood = SEC if vs.ef < 25 else BLOOD
    cv.ellipse(c_u, c_v, hl, hw, blood, ang=3, lv=1)
    inflow = [(c_u + hl * 0.75, c_v - hw * 0.5), (14, ao_b), (22, ao_b + 3), (20, ed_bot - 1),
              (c_u + hl * 0.8, c_v + hw * 0.6)]
    cv.poly(inflow, blood, lv=1)
    if a.bulge > 0.5:
        cv.ellipse(c_u + hl * 0.75, c_v - hw - 1, 9, a.bulge, MYO, lv=0)
    cv.ellipse(c_u + hl * 0.1, c_v + hw * 0.8, a.pap_size, a.pap_size * 0.5, MYO + 10, lv=0)
    if a.mac > 0:
        cv.ellipse(19, ed_bot + 2, a.mac, a.mac * 0.7, CALC)
    hinge_a, hinge_p = (12.0, ao_b), (20.0, ed_bot)
    _mitral(cv, hinge_a, hinge_p, (hinge_a[0] - 20, ao_b + 6), (hinge_p[0] - 12, ed_bot - 4),
            (hinge_a[0] - 6, c_v + hw * 0.35), ph.mitral * (0.55 if vs.ef < 35 else 1.0), vs.mitraclip)
    if vs.tavr:
        u0, u1 = 5.0, 30.0
        cv.line([(u0, ao_t + 1.5), (u1, ao_t + 0.5)], DEVICE, 2.2)
        cv.line([(u0, ao_b - 1.5), (u1, ao_b - 0.5)], DEVICE, 2.2)
        zig = [(u0 + i * (u1 - u0) / 6, ao_t + 1.5 if i % 2 == 0 else ao_b - 1.5) for i in range(7)]
        cv.line(zig, DEVICE, 1.6)
    else:
        hinge_r, hinge_n = (10.0, ao_t + 1), (10.0, ao_b - 1)
        shut = (19.0, v_ao)
        cv.line([hinge_r, _lerp(shut, (26.0, ao_t + 3), ph.aortic)], VALVE, 1.6)
        cv.line([hinge_n, _lerp(shut, (26.0, ao_b - 3), ph.aortic)], VALVE, 1.6)
    if vs.transplanted:
        cv.line([(la_c[0] - la_r * 1.1, la_c[1] + 3), (la_c[0] + la_r * 1.1, la_c[1] - 3)], SUTURE, 2.2)
    if vs.pacer:
        cv.line([(rv_c[0] - 28, rv_c[1] - 1), (rv_c[0] + 6, rv_c[1] + 3)], DEVICE, 4.0)


def draw_a2c(cv: Canvas, vs: VisitState, ph: Phase) -> None:
    """Apical two-chamber: LV in the middle (inferior wall left, anterior right), LA below."""
    a = vs.anatomy
    hw, hl, wt, st = _lv_dims(a, vs.ef, ph.p)
    base = 2 * hl
    fa = 1.0 + 0.08 * ph.p
    la_w, la_l = a.la_wid / 2 * fa, a.la_len / 2 * fa
    v_la = base + 3 + la_l
    _chest(cv, a)
    cv.ellipse(0, hl, hw + wt, hl + wt, MYO, ang=a.lv_tilt)
    cv.ellipse(0, v_la, la_w + 2.5, la_l + 2.5, MYO)
    cv.ellipse(0, hl, hw + wt + 1.5, hl + wt + 1.5, PERI, ang=a.lv_tilt, thick=2.5, arc=(-30, 210))
    blood = SEC if vs.ef < 25 else BLOOD
    cv.ellipse(0, hl, hw, hl, blood, ang=a.lv_tilt, lv=1)
    cv.ellipse(0, v_la, la_w, la_l, BLOOD)
    cv.ellipse(-hw * 0.7, 2 * hl * a.pap_pos, a.pap_size * 0.5, a.pap_size, MYO + 10, ang=20, lv=0)
    cv.ellipse(hw * 0.72, 2 * hl * (a.pap_pos + 0.05), a.pap_size * 0.5, a.pap_size * 0.9, MYO + 10, ang=-20,
               lv=0)
    hinge_a, hinge_p = (hw * 0.95, base), (-hw * 0.95, base)
    if a.mac > 0:
        cv.ellipse(hinge_p[0] - 2, hinge_p[1] + 1, a.mac, a.mac * 0.7, CALC)
    _mitral(cv, hinge_a, hinge_p, (hinge_a[0] - 4, base - a.lv_wid * 0.48),
            (hinge_p[0] + 3, base - a.lv_wid * 0.3),
            (hw * 0.1, base - 6), ph.mitral * (0.55 if vs.ef < 35 else 1.0), vs.mitraclip)
    if vs.transplanted:
        cv.line([(-la_w, v_la + 2), (la_w, v_la - 2)], SUTURE, 2.2)


def origin_u(view: str, a: Anatomy) -> float:
    """Heart u placed under the probe: near the LV apex in apical views, the mitral hinge in PLAX."""
    return 0.55 * (a.sept / 2 + a.lv_wid / 2) if view == "A4C" else 0.0


DRAW = {"A4C": draw_a4c, "PLAX": draw_plax, "A2C": draw_a2c}
