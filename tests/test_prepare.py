"""Prepare stage: frame sampling, sector finding (regions and estimation), model-input policies."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REAL_DICOM
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.errors import PrepareError
from echosearch.ingest.decode import UltrasoundRegion, decode_video, read_meta
from echosearch.ingest.prepare import (
    WORK_MARGIN,
    FramePolicy,
    Sector,
    find_sector,
    policy_manifest,
    prepare_frames,
    reduction_factor,
    region_box,
    sample_indices,
    sector_and_input,
)

REAL = REAL_DICOM


def sector_of(dec, how: str) -> Sector:  # type: ignore[no-untyped-def]
    """The sector as found on the full-resolution frames, or as ``index`` finds it (working resolution)."""
    if how == "full":
        return find_sector(dec.frames, dec.meta.regions)
    return sector_and_input(dec.frames, dec.meta.regions, FramePolicy())[1]


def real(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"real DICOM corpus not found at {REAL}")
    return path


@given(n_total=st.integers(1, 5000), n=st.integers(1, 128))
@settings(max_examples=200, deadline=None)
def test_sample_indices_properties(n_total: int, n: int) -> None:
    idx = sample_indices(n_total, FramePolicy(n_frames=n))
    assert len(idx) == n and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < n_total
    assert np.all(np.diff(idx) >= 0)
    if n_total >= n:
        assert len(np.unique(idx)) == n  # no repeats when the clip is long enough
    else:
        assert set(idx.tolist()) == set(range(n_total))  # every frame used, some repeated


def test_sample_indices_uniform_and_errors() -> None:
    assert sample_indices(65, FramePolicy(n_frames=4)).tolist() == [8, 24, 40, 56]
    assert sample_indices(1, FramePolicy(n_frames=3)).tolist() == [0, 0, 0]
    with pytest.raises(PrepareError):
        sample_indices(0, FramePolicy())
    with pytest.raises(ValueError):
        FramePolicy(name="bogus")  # type: ignore[arg-type]
    manifest = policy_manifest(FramePolicy("echoclip", 16, 224))
    assert manifest["name"] == "echoclip" and manifest["size"] == 224 and json.dumps(manifest)


# ---- synthetic fan: moving speckle, static text, a sweeping ECG trace -------------------------------------
def fan_clip(t: int = 12, h: int = 240, w: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fan = np.zeros((h, w), np.uint8)
    cv2.ellipse(fan, (w // 2, 20), (190, 190), 90, -40, 40, 1, -1)
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        speckle = rng.integers(20, 200, (h, w), dtype=np.uint8)
        frames[i][fan.astype(bool)] = speckle[fan.astype(bool), None]
        cv2.putText(frames[i], "HR 61 bpm  4V1c", (5, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        cv2.putText(frames[i], "18 Jul 08", (250, 230), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (200, 200, 200), 1)
        x = 10 + 15 * i  # ECG sweep below the fan
        cv2.line(frames[i], (10, 225), (x, 225 - (i % 3) * 4), (0, 255, 0), 1)
    return frames, fan.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_estimated_sector_is_the_fan_without_text_or_ecg() -> None:
    frames, fan = fan_clip()
    sector = find_sector(frames)
    assert sector.source == "estimated" and iou(sector.mask, fan) > 0.9
    text = np.zeros(fan.shape, bool)
    text[:18, :150] = True
    text[218:, :] = True  # ECG strip and date
    assert not (sector.mask & text & ~fan).any()
    prepared = prepare_frames(frames, sector, FramePolicy(size=112))
    assert prepared.shape == (12, 112, 112, 3) and prepared.dtype == np.uint8


def test_static_bright_structure_inside_fan_is_kept_but_border_label_is_not() -> None:
    """Metal (a lead, a stent valve) is as constant as text; only labels that cross the fan's edge are
    overlays, not metal that reaches it from inside."""
    frames, fan = fan_clip()
    device = np.zeros(fan.shape, np.uint8)
    cv2.line(device, (150, 110), (175, 140), 1, 4)  # deep inside the fan
    # a stent in the fan's lateral corner: a band from the edge 4 px inwards, wholly inside the fan
    f8 = fan.astype(np.uint8)
    band = f8.astype(bool) & ~cv2.erode(f8, np.ones((9, 9), np.uint8)).astype(bool)
    yy, xx = np.mgrid[:fan.shape[0], :fan.shape[1]]
    device[band & (yy > 100) & (yy < 150) & (xx < 160)] = 1  # (the label is on the right edge)
    label = np.zeros(fan.shape, np.uint8)
    cv2.putText(label, "R", (236, 125), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1, 2)  # orientation marker on the edge
    assert (label.astype(bool) & fan).any()
    for f in frames:
        f[device.astype(bool)] = 250
        f[label.astype(bool)] = 255
    sector = find_sector(frames)
    assert sector.source == "estimated"
    assert sector.mask[device.astype(bool)].all()  # the device stays visible to the model
    assert not (sector.mask & label.astype(bool)).any()


def test_single_frame_intensity_estimate_and_full_fallback() -> None:
    frames, fan = fan_clip(t=1)
    sector = find_sector(frames)
    assert sector.source == "estimated" and iou(sector.mask, fan) > 0.85
    blank = np.zeros((1, 50, 60, 3), np.uint8)
    full = find_sector(blank)
    assert full.source == "full" and full.bbox == (0, 0, 60, 50) and full.mask.all()


def test_regions_box_used_and_inconsistent_regions_ignored() -> None:
    frames, fan = fan_clip()
    regions = [UltrasoundRegion(40, 18, 280, 212, 1, 1), UltrasoundRegion(0, 215, 319, 239, 4, 9)]  # 2D + ECG
    sector = find_sector(frames, regions)
    assert sector.source == "regions"
    x0, y0, x1, y1 = sector.bbox
    assert x0 >= 40 and y0 >= 18 and x1 <= 281 and y1 <= 213
    assert region_box(regions, 240, 320) == (40, 18, 281, 213)
    assert region_box([UltrasoundRegion(84, 31, 595, 414, 1, 1)], 240, 320) is None  # overruns the image
    assert find_sector(frames, [UltrasoundRegion(84, 31, 595, 414, 1, 1)]).source == "estimated"


def test_prepare_blanks_outside_and_keeps_aspect() -> None:
    frames = np.full((2, 40, 80, 3), 200, np.uint8)
    mask = np.zeros((40, 80), bool)
    mask[10:30, 10:70] = True
    mask[10, 10] = False
    out = prepare_frames(frames, Sector(mask, (10, 10, 70, 30), "estimated"), FramePolicy(size=60))
    assert out.shape == (2, 60, 60, 3)
    # a 60x20 box padded to 60x60: rows 20..39 hold content, the rest is padding
    assert out[:, :20].max() == 0 and out[:, 40:].max() == 0 and out[:, 21:39, 1:].min() == 200
    assert out[0, 20, 0].max() == 0  # the blanked corner pixel


def reference_crop_and_scale(img: np.ndarray, size: int, zoom: float = 0.1) -> np.ndarray:
    """EchoCLIP's public example (``crop_and_scale`` with res=(size,size)), written out independently."""
    h, w = img.shape[:2]
    if w / h > 1:
        pad = int(round((w - h) / 2))
        img = img[:, pad:-pad]
    elif w / h < 1:
        pad = int(round((h - w) / 2))
        img = img[pad:-pad]
    pad_x, pad_y = round(int(img.shape[1] * zoom)), round(int(img.shape[0] * zoom))
    img = img[pad_y:-pad_y, pad_x:-pad_x]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("shape", [(456, 576), (600, 430), (224, 224)])
def test_echoclip_policy_matches_public_example(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    sector = Sector(np.ones(shape, bool), (0, 0, shape[1], shape[0]), "full")
    out = prepare_frames(frames, sector, FramePolicy("echoclip", size=224))
    for f, o in zip(frames, out, strict=True):  # EchoCLIP crops/resizes OpenCV's BGR frames: channels reversed
        np.testing.assert_array_equal(o, reference_crop_and_scale(np.ascontiguousarray(f[..., ::-1]), 224))
        np.testing.assert_array_equal(o, reference_crop_and_scale(f, 224)[..., ::-1])  # per-channel: order-free


@pytest.mark.parametrize("how", ["full", "working"])
def test_acuson_sector_from_regions_excludes_ecg_and_text(how: str) -> None:
    path = real("ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm")
    meta = read_meta(path, "dicom")
    dec = decode_video(path, "dicom", sample_indices(meta.n_frames, FramePolicy()))
    assert reduction_factor(meta.height, meta.width, FramePolicy()) == 2  # 456x576: index works at 228x288
    sector = sector_of(dec, how)
    assert sector.source == "regions"
    x0, y0, x1, y1 = sector.bbox
    assert x0 >= 27 and y0 >= 48 and x1 <= 549 and y1 <= 392  # inside the 2D tissue region
    assert not sector.mask[392:].any()  # ECG trace and the soft-key bar below the region
    assert not sector.mask[:48].any()  # patient/header text above it
    # burned-in acquisition text right of the fan (static bright pixels in the header columns)
    static_bright = (np.ptp(dec.frames, axis=0).max(-1) == 0) & (dec.frames[0].max(-1) > 150)
    text = static_bright.copy()
    text[:, :440] = False
    assert text.sum() > 200 and not (sector.mask & text).any()
    # the fan itself is kept: most moving pixels are inside the mask
    moving = np.ptp(dec.frames, axis=0).max(-1) > 40
    moving[392:] = False
    assert (sector.mask & moving).sum() > 0.9 * moving.sum()


@pytest.mark.parametrize("how", ["full", "working"])
@pytest.mark.parametrize("name", ["SonoSite_echo_A4C_30f_JPEG_small.dcm", "US-PAL-8-10x-echo_JPEGLS.dcm"])
def test_real_estimated_sector_drops_margins(name: str, how: str) -> None:
    path = real(name)
    dec = decode_video(path, "dicom", sample_indices(read_meta(path, "dicom").n_frames, FramePolicy()))
    sector = sector_of(dec, how)
    assert sector.source == "estimated"
    frac = sector.mask.mean()
    assert 0.2 < frac < 0.7  # the fan, not the whole screen with its text and colour bars
    assert not sector.mask[: dec.frames.shape[1] // 20].all(axis=1).any()  # top rows (text) not fully kept


def fan_from_truth(sector_json: str, height: int, width: int) -> np.ndarray:
    """The ground-truth fan of a synthetic file (apex, radius, half-angle about the downward vertical)."""
    sec = json.loads(sector_json)
    fan = np.zeros((height, width), np.uint8)
    apex = (int(round(sec["apex_x"])), int(round(sec["apex_y"])))
    r, half = int(sec["radius"]), float(sec["half_angle_deg"])
    cv2.ellipse(fan, apex, (r, r), 90, -half, half, 1, -1)
    return fan.astype(bool)


@pytest.mark.parametrize("size", ["small", "realistic"])
def test_synthetic_cohort_overlays_blank_and_sector_kept(tmp_path: Path, size: str) -> None:
    synth = pytest.importorskip("echosearch.synth", reason="synthetic cohort generator not available")
    truth = synth.generate_cohort(tmp_path, patients=2, seed=7, fmt="both", visits=(2, 2) if size == "small" else (1, 1),
                                  size=size)
    kinds, factors = set(), set()
    for row in truth.iter_rows(named=True):
        path = tmp_path / row["path"]
        kind = "avi" if row["format"] == "avi" else "dicom"
        meta = read_meta(path, kind)
        dec = decode_video(path, kind, sample_indices(meta.n_frames, FramePolicy()))
        prepared, sector = sector_and_input(dec.frames, dec.meta.regions, FramePolicy())  # what index does
        factors.add(reduction_factor(meta.height, meta.width, FramePolicy()))
        kinds.add((kind, sector.source))
        for ov in json.loads(row["overlay_boxes"] or "[]"):  # burned-in text, ECG, scale bars: all blank
            bx0, by0, bx1, by1 = (int(v) for v in ov["box"])
            assert not sector.mask[by0:by1, bx0:bx1].any(), f"{row['path']}: overlay {ov['kind']} kept"
        fan = fan_from_truth(row["sector"], meta.height, meta.width)
        assert iou(sector.mask, fan) > 0.85, row["path"]  # the imaging sector itself is kept
        assert prepared.shape == (16, 112, 112, 3)
    assert ("avi", "estimated") in kinds and ("dicom", "regions") in kinds
    assert factors == {1} if size == "small" else min(factors) >= 2  # exports of 480x640 and up are shrunk


@given(h=st.integers(8, 3000), w=st.integers(8, 3000), size=st.integers(8, 448))
@settings(max_examples=300, deadline=None)
def test_reduction_factor_keeps_twice_the_model_side(h: int, w: int, size: int) -> None:
    f = reduction_factor(h, w, FramePolicy(size=size))
    assert f >= 1
    if f > 1:
        assert min(h, w) // f >= WORK_MARGIN * size  # the shrunk clip still has >= 2x the model's pixels
    assert min(h, w) // (f + 1) < WORK_MARGIN * size or min(h, w) < WORK_MARGIN * size  # and f is the largest
    assert reduction_factor(h, w, FramePolicy(name="echoclip", size=size)) == 1  # EchoCLIP's recipe as is


def test_working_resolution_matches_full_resolution(tmp_path: Path) -> None:
    """Shrinking a 480x640-768x1024 export before sector finding changes the model input by a few grey
    levels at most, and the sector comes back in the file's own pixel coordinates."""
    synth = pytest.importorskip("echosearch.synth", reason="synthetic cohort generator not available")
    truth = synth.generate_cohort(tmp_path, patients=3, seed=11, visits=(1, 1), size="realistic")
    policy = FramePolicy()
    for row in truth.iter_rows(named=True):
        path = tmp_path / row["path"]
        meta = read_meta(path, "dicom")
        dec = decode_video(path, "dicom", sample_indices(meta.n_frames, policy))
        assert reduction_factor(meta.height, meta.width, policy) >= 2
        full_sector = find_sector(dec.frames, dec.meta.regions)
        full = prepare_frames(dec.frames, full_sector, policy)
        work, sector = sector_and_input(dec.frames, dec.meta.regions, policy)
        assert sector.mask.shape == (meta.height, meta.width) and sector.source == full_sector.source
        ys, xs = np.nonzero(sector.mask)
        assert sector.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert iou(sector.mask, full_sector.mask) > 0.98
        assert np.abs(work.astype(int) - full.astype(int)).mean() < 8, row["path"]  # measured 2-6


@pytest.mark.parametrize("shape", [(771, 1023), (1079, 1919), (481, 643)])
def test_working_resolution_edges_stay_in_the_file(shape: tuple[int, int]) -> None:
    """Odd sizes that f does not divide: a header region is never overrun, "full" is the whole frame."""
    h, w = shape
    policy = FramePolicy()
    f = reduction_factor(h, w, policy)
    assert f >= 2
    rng = np.random.default_rng(0)
    frames = np.zeros((4, h, w, 3), np.uint8)
    x0, y0, x1, y1 = w // 10 + 1, h // 19 + 1, w - w // 13, h - h // 11  # inclusive region bounds
    frames[:, y0:y1 + 1, x0:x1 + 1] = rng.integers(0, 255, (4, y1 - y0 + 1, x1 - x0 + 1, 1), dtype=np.uint8)
    region = UltrasoundRegion(x0, y0, x1, y1, spatial_format=1, data_type=1)
    _, sector = sector_and_input(frames, [region], policy)
    assert sector.source == "regions" and sector.mask.shape == (h, w)
    bx0, by0, bx1, by1 = sector.bbox
    assert bx0 >= x0 and by0 >= y0 and bx1 <= x1 + 1 and by1 <= y1 + 1  # inside the header's region
    assert bx0 - x0 < 2 * f and by0 - y0 < 2 * f and x1 + 1 - bx1 < 2 * f and y1 + 1 - by1 < 2 * f
    ys, xs = np.nonzero(sector.mask)
    assert sector.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    blank = np.zeros((2, h, w, 3), np.uint8)  # nothing to find: the whole frame, to its last row and column
    _, full = sector_and_input(blank, [], policy)
    assert full.source == "full" and full.mask.all() and full.bbox == (0, 0, w, h)
    with pytest.raises(PrepareError):
        sector_and_input(frames[..., :1], [region], policy)
