"""Burned-in annotations outside the sector, as scanners draw them: text, a depth scale and an ECG trace.

Every element is placed, measured and checked against the sector mask (grown by a margin), so each
recorded box lies strictly outside the imaging fan; a text line that would touch it is shortened or
dropped. Boxes are half-open pixel boxes [x0, y0, x1, y1) in frame coordinates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from echosearch.synth.config import Profile
from echosearch.synth.render import Acquisition, Sector

FONT = cv2.FONT_HERSHEY_SIMPLEX
_MARGIN = 2  # pixels kept free between any overlay box and the sector
Box = tuple[int, int, int, int]


@dataclass
class Overlay:
    """The static annotation layer (H, W, 3) plus where the moving ECG goes, and every element's box."""

    static: np.ndarray
    boxes: list[tuple[str, Box]] = field(default_factory=list)  # (kind: text|scale|ecg, box)
    ecg_box: Box | None = None

    def boxes_json(self) -> str:
        """``[{"kind": ..., "box": [x0, y0, x1, y1]}, ...]``, as stored in the ground truth."""
        return json.dumps([{"kind": k, "box": list(b)} for k, b in self.boxes], separators=(",", ":"))


def _free(mask: np.ndarray, box: Box) -> bool:
    x0, y0, x1, y1 = box
    h, w = mask.shape
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h or x1 <= x0 or y1 <= y0:
        return False
    return not mask[y0:y1, x0:x1].any()


def _text_block(img: np.ndarray, mask: np.ndarray, lines: Sequence[str], right: bool, y: int, scale: float,
                thick: int, color: tuple[int, int, int], boxes: list[tuple[str, Box]]) -> int:
    """Write lines from the top-left (or top-right) corner down; returns the y below the block."""
    h, w = mask.shape
    for text in lines:
        while text:
            (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
            x = w - 3 - tw if right else 3
            box = (x - 1, y - 1, x + tw + 2, y + th + base + 1)
            if _free(mask, box):
                cv2.putText(img, text, (x, y + th), FONT, scale, color, thick, cv2.LINE_AA)
                boxes.append(("text", box))
                break
            text = text[:-1]
        (_, th), base = cv2.getTextSize("Ag", FONT, scale, thick)
        y += th + base + 2
    return y


def _depth_scale(img: np.ndarray, mask: np.ndarray, sector: Sector, depth_mm: float, y_start: int,
                 scale: float, thick: int, color: tuple[int, int, int], boxes: list[tuple[str, Box]]) -> None:
    """A vertical ruler right of the fan: a tick per centimetre, a longer labelled one every 5 cm."""
    h, w = mask.shape
    x = sector.bbox[2] + _MARGIN + 2
    px_per_cm = sector.radius / (depth_mm / 10.0)
    tick = max(2, round(w / 110))
    ys = [sector.apex_y + k * px_per_cm for k in range(int(depth_mm // 10) + 1)]
    ys = [y for y in ys if y_start <= y <= sector.apex_y + sector.radius]
    if len(ys) < 2:
        return
    y0, y1 = int(math.floor(ys[0])) - 1, int(math.ceil(ys[-1])) + 2
    label_w = cv2.getTextSize("20", FONT, scale, thick)[0][0]
    box = (x - 1, y0 - 6, min(w, x + 2 * tick + label_w + 4), min(h, y1 + 6))
    if not _free(mask, box):
        return
    cv2.line(img, (x, y0 + 1), (x, y1 - 2), color, 1)
    for k, y in enumerate(ys):
        depth_cm = round((y - sector.apex_y) / px_per_cm)
        long = depth_cm % 5 == 0
        cv2.line(img, (x, round(y)), (x + (2 * tick if long else tick), round(y)), color, 1)
        if long and depth_cm > 0 and k > 0:
            cv2.putText(img, str(depth_cm), (x + 2 * tick + 2, round(y) + 3), FONT, scale * 0.9, color, 1,
                        cv2.LINE_AA)
    boxes.append(("scale", box))


def build_overlay(profile: Profile, acq: Acquisition, left: Sequence[str], right: Sequence[str]) -> Overlay:
    """Lay out the text blocks, depth scale and ECG strip of one cine loop around its sector."""
    s = acq.sector
    h, w = s.height, s.width
    mask = cv2.dilate(s.mask().astype(np.uint8), np.ones((2 * _MARGIN + 1, 2 * _MARGIN + 1), np.uint8)) > 0
    img = np.zeros((h, w, 3), np.uint8)
    scale = h / 720.0
    thick = 1 if h < 500 else 2
    boxes: list[tuple[str, Box]] = []
    _text_block(img, mask, left, False, 3, scale, thick, profile.text_color, boxes)
    y_right = _text_block(img, mask, right, True, 3, scale, thick, profile.text_color, boxes)
    _depth_scale(img, mask, s, acq.depth_mm, y_right + 2, scale, thick, profile.text_color, boxes)
    ecg = (round(0.08 * w), int(math.ceil(s.apex_y + s.radius)) + _MARGIN + 3, round(0.92 * w), h - 2)
    ecg_box: Box | None = None
    if ecg[3] - ecg[1] >= 8 and _free(mask, ecg):
        ecg_box = ecg
        boxes.append(("ecg", ecg))
    return Overlay(img, boxes, ecg_box)


def _ecg_table(n: int = 2048) -> np.ndarray:
    """ECG of one beat sampled at n phases (R wave at phase 0), in units of the R amplitude."""
    c = np.arange(n) / n

    def g(mu: float, sd: float) -> np.ndarray:
        d = (c - mu + 0.5) % 1.0 - 0.5
        return np.exp(-0.5 * (d / sd) ** 2)

    return 0.12 * g(0.86, 0.025) - 0.12 * g(0.985, 0.006) + g(0.0, 0.008) - 0.22 * g(0.018, 0.007) \
        + 0.28 * g(0.3, 0.05)


_ECG = _ecg_table()


def draw_ecg(frames: np.ndarray, ov: Overlay, acq: Acquisition, color: tuple[int, int, int] | int) -> None:
    """Draw the sweeping ECG (synchronous with the rendered cycle) into each frame, in place."""
    if ov.ecg_box is None:
        return
    x0, y0, x1, y1 = ov.ecg_box
    bw, bh = x1 - x0 - 2, y1 - y0 - 2
    px_per_s = bw / 3.0
    gap = max(3, bw // 30)
    xs = np.arange(bw)
    base, amp = y0 + 1 + bh * 0.72, bh * 0.65
    thick = 1 if acq.sector.height < 500 else 2
    for f in range(len(frames)):
        t = f / acq.fps + 1.7
        sweep = (t * px_per_s) % bw
        lag = (sweep - xs) % bw
        tx = t - lag / px_per_s
        ys = base - amp * _ECG[((acq.phase0 + tx * acq.hr / 60.0) % 1.0 * len(_ECG)).astype(np.int64)]
        keep = lag < bw - gap
        pts = np.stack([x0 + 1 + xs, ys], 1)
        cut = int(math.floor(sweep)) + 1
        for part in (pts[:cut][keep[:cut]], pts[cut:][keep[cut:]]):
            if len(part) > 1:
                arr = np.round(part * 16).astype(np.int32).reshape(-1, 1, 2)
                cv2.polylines(frames[f], [arr], False, color, thick, cv2.LINE_AA, 4)
        cx, cy = x0 + 1 + min(bw - 1, cut - 1), int(round(pts[min(bw - 1, cut - 1), 1]))
        cv2.circle(frames[f], (cx, cy), thick + 1, color, -1)
