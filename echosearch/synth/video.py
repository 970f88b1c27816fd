"""One cine loop from rendering to files: overlays and tint as the scanner shows them, then DICOM and/or AVI.

Returns one ground-truth row per written file. AVI at size small is EchoNet-Dynamic style: the square
around the sector, everything outside the fan black, resized to 112x112; at size realistic it is the full
frame with its burned-in annotations, as a PACS AVI export would be.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from echosearch.synth.config import AVI_SIZE, Profile, Size
from echosearch.synth.history import VisitState
from echosearch.synth.overlays import build_overlay, draw_ecg
from echosearch.synth.render import Acquisition, Sector, render_video
from echosearch.synth.writers import DicomIdentity, write_avi, write_dicom


@dataclass(frozen=True)
class VideoJob:
    """Everything needed to render and write one view of one study."""

    visit: VisitState
    acq: Acquisition
    profile: Profile
    ident: DicomIdentity
    true_name: str
    size: Size


def tint(frames: np.ndarray, profile: Profile) -> np.ndarray:
    """Greyscale (T,H,W) to the profile's display colour map: (T,H,W,3) RGB, or unchanged when grey."""
    if profile.tint is None:
        return frames
    ramp = np.arange(256, dtype=np.float64)[:, None] * np.array(profile.tint)[None, :]
    lut = np.clip(np.round(ramp), 0, 255).astype(np.uint8).reshape(256, 1, 3)
    out = np.empty(frames.shape + (3,), np.uint8)
    for i, f in enumerate(frames):
        cv2.LUT(cv2.cvtColor(f, cv2.COLOR_GRAY2RGB), lut, dst=out[i])
    return out


def _overlay_text(job: VideoJob) -> tuple[list[str], list[str]]:
    i, acq = job.ident, job.acq
    name = i.patient_name.replace("^", ", ")
    left = [i.institution, name, f"ID {i.patient_id}", f"DOB {i.birth_date:%d/%m/%Y}",
            f"{i.study_date:%d/%m/%Y} {i.study_time[:2]}:{i.study_time[2:4]}"]
    right = [job.profile.model, f"{acq.view}  {acq.fps} Hz", f"D {acq.depth_mm / 10:.1f} cm",
             f"G {int(round(50 * acq.gain))}%  DR {int(round(acq.dyn_range * 20))}"]
    return left, right


def with_overlays(grey: np.ndarray, job: VideoJob) -> tuple[np.ndarray, str]:
    """Full scanner frames (tint, text, depth scale, moving ECG) and the JSON of the overlay boxes."""
    left, right = _overlay_text(job)
    ov = build_overlay(job.profile, job.acq, left, right)
    frames = tint(grey, job.profile)
    if frames.ndim == 3:
        static = cv2.cvtColor(ov.static, cv2.COLOR_RGB2GRAY)
        ecg_color: tuple[int, int, int] | int = int(np.mean(job.profile.ecg_color))
    else:
        static = ov.static
        ecg_color = job.profile.ecg_color
    for _, (x0, y0, x1, y1) in ov.boxes:  # annotations lie outside the fan: paste them box by box
        np.maximum(frames[:, y0:y1, x0:x1], static[None, y0:y1, x0:x1], out=frames[:, y0:y1, x0:x1])
    draw_ecg(frames, ov, job.acq, ecg_color)
    return frames, ov.boxes_json()


def echonet_crop(frames: np.ndarray, sector: Sector) -> tuple[np.ndarray, Sector]:
    """The square around the sector (outside the fan black), resized to AVI_SIZE, and the fan in it."""
    x0, y0, x1, y1 = sector.bbox
    side = max(x1 - x0, y1 - y0)
    left, top = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    shape = (len(frames), side, side) + frames.shape[3:]
    sq = np.zeros(shape, np.uint8)
    sx0, sy0 = max(0, left), max(0, top)
    sx1, sy1 = min(sector.width, left + side), min(sector.height, top + side)
    sq[:, sy0 - top:sy1 - top, sx0 - left:sx1 - left] = frames[:, sy0:sy1, sx0:sx1]
    out = np.stack([cv2.resize(f, (AVI_SIZE, AVI_SIZE), interpolation=cv2.INTER_AREA) for f in sq])
    return out, sector.transformed(AVI_SIZE / side, -left, -top, AVI_SIZE, AVI_SIZE)


def avi_name(sop_uid: str) -> str:
    """EchoNet-style opaque file name (no extension) derived from the acquisition's SOP UID."""
    return "0X" + hashlib.sha1(sop_uid.encode()).hexdigest()[:16].upper()


def render_and_write(job: VideoJob, out: Path, fmt: str) -> list[dict[str, Any]]:
    """Render ``job`` and write it in the requested format(s); one ground-truth row per file."""
    acq, prof, ident = job.acq, job.profile, job.ident
    grey = render_video(job.visit, acq, with_masks=False).frames
    base: dict[str, Any] = {"sop_uid": ident.sop_uid, "n_frames": int(len(grey)), "fps": float(acq.fps),
                            "heart_rate": round(acq.hr, 1), "depth_mm": round(acq.depth_mm, 1)}
    rows: list[dict[str, Any]] = []
    if fmt in ("dicom", "both"):
        frames, boxes = with_overlays(grey, job)
        rel = f"dicom/{ident.patient_id}/{ident.accession}/{acq.view}.dcm"
        write_dicom(out / rel, frames, prof, acq, ident)
        rows.append({**base, "path": rel, "format": "dicom", "transfer_syntax": str(prof.transfer_syntax),
                     "photometric": prof.photometric, "height": acq.sector.height, "width": acq.sector.width,
                     "has_regions": prof.has_regions, "sector": acq.sector.to_json(), "overlay_boxes": boxes})
    if fmt in ("avi", "both"):
        rel = f"avi/Videos/{avi_name(ident.sop_uid)}.avi"
        if job.size == "small":
            frames, sector = echonet_crop(tint(grey, prof), acq.sector)
            boxes = "[]"
        else:
            frames, boxes = with_overlays(grey, job)
            sector = acq.sector
        write_avi(out / rel, frames, acq.fps)
        rows.append({**base, "path": rel, "format": "avi", "transfer_syntax": None, "photometric": None,
                     "height": int(frames.shape[1]), "width": int(frames.shape[2]), "has_regions": False,
                     "sector": sector.to_json(), "overlay_boxes": boxes})
    return rows
