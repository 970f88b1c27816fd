"""Preview of what the model sees: original frame | detected sector outline | model input, side by side.

For checking the sector detection and frame policy on a file before indexing an archive with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from echosearch.errors import DecodeError
from echosearch.ingest.decode import decode_video
from echosearch.ingest.discover import inspect_file
from echosearch.ingest.frame_policy import resolve_frame_policy
from echosearch.ingest.prepare import FramePolicy, sample_indices, sector_and_input

PANEL_HEIGHT = 360


@dataclass
class PreviewInfo:
    """What the preview shows, for the CLI to print."""

    out_png: Path
    n_frames: int
    height: int
    width: int
    sector_bbox: list[int]
    sector_source: str
    policy: str


def render_preview(path: Path, out_png: Path, policy: FramePolicy | None = None,
                   model: str = "echosearch-demo") -> PreviewInfo:
    """Write a PNG with the first sampled frame, the sector outline on it, and the model input
    (``policy`` defaults to ``model``'s own)."""
    policy = policy or resolve_frame_policy(model)
    kind = inspect_file(Path(path)).kind
    if kind == "unknown":
        raise DecodeError(f"{path}: unrecognised file format (not DICOM, AVI or MP4)")
    decoded = decode_video(Path(path), kind, lambda meta: sample_indices(meta.n_frames, policy))
    model_inputs, sector = sector_and_input(decoded.frames, decoded.meta.regions, policy)
    model_input = model_inputs[0] if policy.channel_order == "rgb" else model_inputs[0][..., ::-1]  # true colour
    original = decoded.frames[0]
    outlined = original.copy()
    contours, _ = cv2.findContours(sector.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(original.shape[:2]) / 300))
    cv2.drawContours(outlined, contours, -1, (255, 64, 64), thickness)
    x0, y0, x1, y1 = sector.bbox
    cv2.rectangle(outlined, (x0, y0), (x1 - 1, y1 - 1), (64, 255, 64), thickness)
    panels = [_fit(original), _fit(outlined), _fit(model_input, nearest=True)]
    sheet = np.concatenate(
        [
            _label(p, t)
            for p, t in zip(
                panels,
                ("original", f"sector ({sector.source})",
                 f"model input {policy.size}px ({policy.name}, fed {policy.channel_order.upper()})"),
                strict=True,
            )
        ],
        1,
    )
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out_png}")
    meta = decoded.meta
    return PreviewInfo(out_png, meta.n_frames, meta.height, meta.width, sector.bbox_list, sector.source, policy.name)


def _fit(img: np.ndarray, nearest: bool = False) -> np.ndarray:
    h, w = img.shape[:2]
    scale = PANEL_HEIGHT / h
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return cv2.resize(img, (max(1, round(w * scale)), PANEL_HEIGHT), interpolation=interp)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """A caption bar above the panel and a thin separator on its right."""
    bar = np.full((24, img.shape[1], 3), 32, np.uint8)
    cv2.putText(bar, text, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (230, 230, 230), 1, cv2.LINE_AA)
    panel = np.concatenate([bar, img], 0)
    return np.concatenate([panel, np.full((panel.shape[0], 4, 3), 255, np.uint8)], 1)
