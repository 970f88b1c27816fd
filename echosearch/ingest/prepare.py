"""Prepare stage (pure numpy/OpenCV, no I/O): find the imaging sector, sample frames, make model input.

Two frame policies:

* ``sector`` (default): blank everything outside the imaging sector (burned-in text, ECG strip, scale
  bars), crop to the sector's box, pad to a square (aspect kept) and resize with INTER_AREA. A clip far
  larger than the model input is first shrunk by a whole factor (``reduction_factor``: its short side
  stays >= ``WORK_MARGIN`` x the model's side), so the sector is found and cropped on ~1/f^2 of the pixels;
  ``sector_and_input`` does both and gives the sector back in the clip's own pixel coordinates.
* ``echoclip``: EchoCLIP's published example preprocessing (``crop_and_scale``): square centre crop,
  trim 10 % on every side, resize with INTER_CUBIC; no masking; channels reversed to BGR, because
  EchoCLIP's published inference reads videos with OpenCV (BGR) and hands those arrays on as if RGB.
  Use it to reproduce EchoCLIP numbers.

Frames are sampled ``uniform`` (N spread over the clip) or ``all`` (every frame, as EchoCLIP's embedding
example averages). Output is uint8 (N,S,S,3) in the policy's ``channel_order``; the encoder normalises.
Which policy applies is decided in one place, :func:`echosearch.ingest.frame_policy.resolve_frame_policy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import cv2
import numpy as np

from echosearch.errors import PrepareError
from echosearch.ingest.decode import UltrasoundRegion

SectorSource = Literal["regions", "estimated", "full"]
PolicyName = Literal["sector", "echoclip"]
Sampling = Literal["uniform", "all"]
VARIATION_THRESHOLD = 8  # blurred temporal range (grey levels) that counts as "moving" (above JPEG noise)
STATIC_RANGE = 4  # a pixel this constant over >= 4 frames is not tissue (speckle always moves)
OVERLAY_BRIGHTNESS = 100  # ... and if it is also this bright and crosses the fan's edge, an overlay
INTENSITY_THRESHOLD = 8  # blurred brightness that counts as "not background" in a single frame
MIN_SECTOR_FRACTION = 0.04  # an estimate smaller than this share of the image is not trusted
WORK_MARGIN = 2  # a shrunk clip keeps >= 2x the model's side, so the final INTER_AREA still averages pixels
# per-policy identity version: sector 2 = large clips shrunk by a whole factor before sector finding;
# echoclip 3 = frames handed to the model in BGR, as EchoCLIP's published (OpenCV-reading) inference does
POLICY_VERSION = {"sector": 2, "echoclip": 3}
CHANNEL_ORDER = {"sector": "rgb", "echoclip": "bgr"}


@dataclass
class Sector:
    """Imaging sector: boolean mask (H,W), its box (x0,y0,x1,y1) (x1/y1 exclusive), and how it was found."""

    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    source: SectorSource

    @property
    def bbox_list(self) -> list[int]:
        return [int(v) for v in self.bbox]


@dataclass(frozen=True)
class FramePolicy:
    """How frames become model input; stored in the index manifest (the encoder sets ``size``)."""

    name: PolicyName = "sector"
    n_frames: int = 16
    size: int = 112
    sampling: Sampling = "uniform"
    # how the name was chosen (the model's own, or a setting); recorded beside the identity, not in it
    chosen: Literal["auto", "explicit"] = field(default="explicit", compare=False)

    def __post_init__(self) -> None:
        if self.name not in ("sector", "echoclip"):
            raise ValueError(f"unknown frame policy {self.name!r} (sector or echoclip)")
        if self.n_frames < 1 or self.size < 8:
            raise ValueError("n_frames must be >= 1 and size >= 8")
        if self.sampling not in ("uniform", "all"):
            raise ValueError(f"unknown sampling {self.sampling!r} (uniform or all)")

    @property
    def channel_order(self) -> str:
        """Channel order of the model input: ``bgr`` for echoclip (EchoCLIP's OpenCV-read frames), else ``rgb``."""
        return CHANNEL_ORDER[self.name]


def policy_manifest(policy: FramePolicy) -> dict[str, object]:
    """The policy as a JSON-able dict for the index manifest (a different policy means a different index)."""
    out: dict[str, object] = dict(asdict(policy))
    del out["chosen"]  # two indexes prepared alike are compatible however the policy was picked
    out["interpolation"] = "area" if policy.name == "sector" else "cubic"
    out["masking"] = policy.name == "sector"
    out["channel_order"] = policy.channel_order
    out["version"] = POLICY_VERSION[policy.name]
    return out


def sample_indices(n_total: int, policy: FramePolicy) -> np.ndarray:
    """Sorted frame indices: every frame (``all``), or ``policy.n_frames`` spread uniformly over the clip
    (centres of equal segments).

    A clip shorter than ``n_frames`` repeats frames (so every video gives the same number of model inputs).
    """
    if n_total < 1:
        raise PrepareError("video has zero frames")
    if policy.sampling == "all":
        return np.arange(n_total, dtype=np.int64)
    n = policy.n_frames
    idx = np.floor((np.arange(n) + 0.5) * n_total / n).astype(np.int64)
    return np.clip(idx, 0, n_total - 1)


# ---- sector ---------------------------------------------------------------------------------------
def find_sector(frames: np.ndarray, regions: Sequence[UltrasoundRegion] = ()) -> Sector:
    """The imaging sector of a clip (T,H,W,3): the 2D region box when the header has one, else estimated.

    Within a region box the fan itself is still estimated so that the box corners (often holding depth
    scales or labels) are blanked; an estimate that looks wrong falls back to the whole box.
    """
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise PrepareError(f"expected frames (T,H,W,3), got shape {frames.shape}")
    h, w = frames.shape[1:3]
    box = region_box(regions, h, w)
    if box is not None:
        x0, y0, x1, y1 = box
        est = _estimate_mask(frames[:, y0:y1, x0:x1])
        mask = np.zeros((h, w), bool)
        box_area = (x1 - x0) * (y1 - y0)
        if est is not None and est.sum() >= 0.3 * box_area:
            mask[y0:y1, x0:x1] = est
        else:
            mask[y0:y1, x0:x1] = True
        return Sector(mask, _bbox(mask), "regions")
    est = _estimate_mask(frames)
    if est is not None:
        return Sector(est, _bbox(est), "estimated")
    return Sector(np.ones((h, w), bool), (0, 0, w, h), "full")


def region_box(
    regions: Sequence[UltrasoundRegion], height: int, width: int
) -> tuple[int, int, int, int] | None:
    """Union box (exclusive end) of the 2D (tissue/colour-flow) regions, or None when absent or inconsistent.

    Regions that overrun the image (e.g. a file downscaled without updating its header) are not trusted.
    """
    two_d = [r for r in regions if r.spatial_format == 1]
    if not two_d:
        return None
    x0, y0 = min(r.x0 for r in two_d), min(r.y0 for r in two_d)
    x1, y1 = max(r.x1 for r in two_d) + 1, max(r.y1 for r in two_d) + 1
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return None
    if (x1 - x0) * (y1 - y0) < MIN_SECTOR_FRACTION * height * width:
        return None
    return x0, y0, x1, y1


def _estimate_mask(frames: np.ndarray) -> np.ndarray | None:
    """Fan-shaped mask from what varies over time (multi-frame) or what is not black (single frame).

    The evidence map is box-blurred (~1 % of the image) so speckle and dark blood pools read as one
    region, opened with a larger kernel so burned-in text, thin ECG/trace lines and scale ticks vanish,
    closed, and reduced to its largest connected component, whose convex hull is the sector.
    """
    h, w = frames.shape[1:3]
    k = max(3, int(round(min(h, w) / 80)) | 1)
    hi, lo = _running_max_min(frames)
    if frames.shape[0] > 1:
        # temporal range, max over channels (colour Doppler moves in chroma too)
        rng = _channel_max(cv2.absdiff(hi, lo))
        hull = _hull_of_largest(cv2.blur(rng, (k, k)) > VARIATION_THRESHOLD, k)
        if hull is not None:
            if frames.shape[0] >= 4:
                hull &= ~_border_overlays(hull, (rng <= STATIC_RANGE) & (_channel_max(hi) >= OVERLAY_BRIGHTNESS))
            return hull
    grey = _channel_max(frames[0])
    return _hull_of_largest(cv2.blur(grey, (k, k)) > INTENSITY_THRESHOLD, k)


def _border_overlays(hull: np.ndarray, static: np.ndarray) -> np.ndarray:
    """Static bright blobs that cross the hull's edge: burned-in labels and markers the hull took in.

    Static bright structures wholly inside the fan are kept: metal (leads, stent valves, clips),
    calcification and slow-moving tissue can be as constant as text, and erasing them hides findings.
    """
    if not static.any():
        return static
    blobs = cv2.dilate(static.astype(np.uint8), np.ones((5, 5), np.uint8))
    _, labels = cv2.connectedComponents(blobs, connectivity=8)
    # a blob continues beyond the edge, not merely comes within the dilation's reach of it: a stent valve
    # or clip in the fan's far corner, whose shadow (static, dark) pulls the edge onto it, stays
    reach = np.unique(labels[static & ~hull])
    return np.isin(labels, reach[reach > 0])


def _channel_max(img: np.ndarray) -> np.ndarray:
    """Max over the colour channels of an (H,W,3) image, as (H,W) uint8."""
    c0, c1, c2 = cv2.split(np.ascontiguousarray(img))
    return cv2.max(cv2.max(c0, c1), c2)


def _running_max_min(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over time (OpenCV's SIMD kernels; numpy reductions over axis 0 are slow)."""
    hi, lo = frames[0].copy(), frames[0].copy()
    for f in frames[1:]:
        cv2.max(hi, f, dst=hi)
        cv2.min(lo, f, dst=lo)
    return hi, lo


def _hull_of_largest(seed: np.ndarray, k: int) -> np.ndarray | None:
    h, w = seed.shape
    m: np.ndarray = seed.astype(np.uint8)
    ko = 2 * k + 1
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ko, ko)))
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < MIN_SECTOR_FRACTION * h * w:
        return None
    contours, _ = cv2.findContours(
        (labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    hull = cv2.convexHull(np.concatenate(contours))
    out = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(out, hull, 1)
    return out.astype(bool)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise PrepareError("empty imaging sector")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---- working resolution -------------------------------------------------------------------------------
def reduction_factor(height: int, width: int, policy: FramePolicy) -> int:
    """Whole factor by which a clip can shrink before sector finding and cropping without the model input
    losing detail (its short side stays >= ``WORK_MARGIN`` x the model's side); 1 for ``echoclip``, whose
    published preprocessing is reproduced as it is. A 768x1024 export for a 112-px model: 3 (1/9 the pixels).
    """
    if policy.name != "sector":
        return 1
    return max(1, min(height, width) // (WORK_MARGIN * policy.size))


def shrink_frames(frames: np.ndarray, factor: int) -> np.ndarray:
    """(N,H,W,3) -> (N,H//f,W//f,3): the rounded mean of each f x f block (OpenCV's integer-scale area path)."""
    if factor == 1:
        return frames
    n, h, w = frames.shape[:3]
    hh, ww = h // factor, w // factor
    out = np.empty((n, hh, ww, 3), np.uint8)
    for i in range(n):
        out[i] = cv2.resize(frames[i, : hh * factor, : ww * factor], (ww, hh), interpolation=cv2.INTER_AREA)
    return out


def _shrunk_region(box: tuple[int, int, int, int], factor: int, height: int, width: int) -> UltrasoundRegion:
    """The header's 2D region box (validated at full resolution, exclusive end) as one 2D region of the
    clip shrunk by ``factor``: the blocks it touches (rounded outwards; :func:`_grow_sector` clips back)."""
    x0, y0, x1, y1 = box
    return UltrasoundRegion(x0 // factor, y0 // factor, min((x1 - 1) // factor, width // factor - 1),
                            min((y1 - 1) // factor, height // factor - 1), spatial_format=1, data_type=1)


def _grow_sector(sector: Sector, factor: int, height: int, width: int,
                 box: tuple[int, int, int, int] | None) -> Sector:
    """A sector found on a clip shrunk by ``factor``, in the full clip's pixel coordinates: blocks of f x f,
    kept inside the header's region ``box`` (the shrunk box rounds outwards); "full" is the whole frame."""
    if factor == 1:
        return sector
    if sector.source == "full":
        return Sector(np.ones((height, width), bool), (0, 0, width, height), "full")
    hh, ww = sector.mask.shape
    mask = np.zeros((height, width), bool)
    mask[: hh * factor, : ww * factor] = np.repeat(np.repeat(sector.mask, factor, 0), factor, 1)
    if box is not None and sector.source == "regions":
        x0, y0, x1, y1 = box
        mask[:y0], mask[y1:], mask[:, :x0], mask[:, x1:] = False, False, False, False
    return Sector(mask, _bbox(mask), sector.source)


def sector_and_input(frames: np.ndarray, regions: Sequence[UltrasoundRegion], policy: FramePolicy,
                     sector_frames: np.ndarray | None = None) -> tuple[np.ndarray, Sector]:
    """Model input (N,S,S,3) of decoded frames (N,H,W,3) and their sector in the clip's own coordinates.

    ``sector_frames`` selects the frames the sector is estimated from (default all; repeats add nothing).
    Large clips are worked on shrunk by ``reduction_factor``.
    """
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise PrepareError(f"expected frames (N,H,W,3) with N > 0, got shape {frames.shape}")
    h, w = frames.shape[1:3]
    f = reduction_factor(h, w, policy)
    work = shrink_frames(frames, f)
    box = region_box(regions, h, w) if f > 1 else None  # the header's regions judged once, in its own pixels
    regs = regions if f == 1 else [] if box is None else [_shrunk_region(box, f, h, w)]
    sector = find_sector(work if sector_frames is None else work[sector_frames], regs)
    return prepare_frames(work, sector, policy), _grow_sector(sector, f, h, w, box)


# ---- model input ------------------------------------------------------------------------------------
def prepare_frames(frames: np.ndarray, sector: Sector, policy: FramePolicy) -> np.ndarray:
    """Frames (N,H,W,3) uint8 -> model input (N,S,S,3) uint8 according to ``policy``."""
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise PrepareError(f"expected frames (N,H,W,3) with N > 0, got shape {frames.shape}")
    s = policy.size
    if policy.name == "echoclip":  # crop/resize work per channel, so reversing after them changes no pixel
        return np.ascontiguousarray(np.stack([echoclip_crop_and_scale(f, s) for f in frames])[..., ::-1])
    if sector.mask.shape != frames.shape[1:3]:
        raise PrepareError(f"sector mask {sector.mask.shape} does not match frames {frames.shape[1:3]}")
    x0, y0, x1, y1 = sector.bbox
    mask = np.ascontiguousarray(sector.mask[y0:y1, x0:x1]).astype(np.uint8)
    ch, cw = y1 - y0, x1 - x0
    side = max(ch, cw)
    top, left = (side - ch) // 2, (side - cw) // 2
    out = np.empty((frames.shape[0], s, s, 3), np.uint8)
    for i, frame in enumerate(frames):
        crop = np.ascontiguousarray(frame[y0:y1, x0:x1])
        crop = cv2.bitwise_and(crop, crop, mask=mask)
        square = cv2.copyMakeBorder(
            crop, top, side - ch - top, left, side - cw - left, cv2.BORDER_CONSTANT, value=0
        )
        out[i] = square if side == s else cv2.resize(square, (s, s), interpolation=cv2.INTER_AREA)
    return out


def echoclip_crop_and_scale(img: np.ndarray, size: int, zoom: float = 0.1) -> np.ndarray:
    """EchoCLIP's ``crop_and_scale`` for a square output: centre square crop, trim ``zoom`` a side, cubic."""
    h, w = img.shape[:2]
    if w > h:
        pad = int(round((w - h) / 2))
        img = img[:, pad : w - pad]
    elif h > w:
        pad = int(round((h - w) / 2))
        img = img[pad : h - pad]
    if zoom:
        py, px = int(img.shape[0] * zoom), int(img.shape[1] * zoom)
        img = img[py : img.shape[0] - py, px : img.shape[1] - px]
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=cv2.INTER_CUBIC)
