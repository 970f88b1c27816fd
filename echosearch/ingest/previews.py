"""Browser-playable previews of indexed videos: the prepared, sector-masked frames as a small animation.

Browsers cannot play AVI or DICOM, and the raw frames carry burned-in text (names, dates). A preview is
made from what the model sees (the frame policy of the index, so everything outside the imaging sector is
blanked), at a display size, and cached on disk under ``INDEX/previews/<video_key>.<ext>``:

* H.264 MP4 (``.mp4``) through PyAV when its FFmpeg has ``libx264`` (the usual case);
* otherwise a looping animated GIF (``.gif``) through Pillow (Streamlit's ``st.image`` keeps GIFs animated;
  :func:`encode_animation` also writes animated WebP for other consumers).

Files are written atomically (temporary file in the same folder, then ``os.replace``), so concurrent
requests for the same preview are safe. Generated on demand by the app; :func:`make_previews` lets the
indexer (or a script) make them ahead of time.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echosearch.errors import EchosearchError, IngestError, QueryError
from echosearch.ingest.prepare import FramePolicy

if TYPE_CHECKING:
    from echosearch.catalog import Catalog

log = logging.getLogger(__name__)

PREVIEW_DIR = "previews"
PREVIEW_FRAMES = 32
PREVIEW_SIZE = 192
MIN_FPS, MAX_FPS = 4.0, 30.0
EXTENSIONS = (".mp4", ".gif")


@dataclass(frozen=True)
class Preview:
    """A preview file and how to show it (``video`` for MP4, ``image`` for animated WebP/GIF)."""

    path: Path
    media: str

    @property
    def mime(self) -> str:
        return {".mp4": "video/mp4", ".webp": "image/webp", ".gif": "image/gif"}[self.path.suffix]


def has_h264() -> bool:
    """Whether PyAV's FFmpeg can encode H.264 (libx264)."""
    try:
        import av

        return "libx264" in av.codecs_available
    except Exception:  # pragma: no cover - av missing or broken
        return False


def preferred_extension() -> str:
    """``.mp4`` when libx264 is available, else ``.gif``."""
    return ".mp4" if has_h264() else ".gif"


def as_preview(path: Path) -> Preview:
    return Preview(path, "video" if path.suffix == ".mp4" else "image")


def preview_policy(index_policy: dict[str, Any] | None = None, frames: int = PREVIEW_FRAMES,
                   size: int = PREVIEW_SIZE) -> FramePolicy:
    """The index's frame policy (sector masking or EchoCLIP crop) with more frames at a display size
    (the demo model's own policy when there is no index policy)."""
    from echosearch.ingest.frame_policy import resolve_frame_policy

    name = str((index_policy or {}).get("name", "auto"))
    setting = name if name in ("sector", "echoclip") else "auto"
    return resolve_frame_policy("echosearch-demo", setting=setting, n_frames=frames, size=size)


def preview_frames(source: Path, policy: FramePolicy) -> tuple[np.ndarray, float]:
    """Prepared frames (T,S,S,3) uint8 of ``source`` (duplicates of short clips dropped) and a playback rate."""
    from echosearch.ingest.discover import inspect_file
    from echosearch.run.read import process_file

    prepared = process_file(inspect_file(Path(source)), policy)
    _, first = np.unique(prepared.frame_indices, return_index=True)
    frames = prepared.frames[np.sort(first)]
    if policy.channel_order == "bgr":  # the model's channel order (echoclip), shown in true colour
        frames = np.ascontiguousarray(frames[..., ::-1])
    meta = prepared.meta
    duration = meta.n_frames / meta.fps if meta.fps and meta.fps > 0 else len(frames) / 15.0
    fps = len(frames) / duration if duration > 0 else 15.0
    return frames, float(min(MAX_FPS, max(MIN_FPS, fps)))


def encode_mp4(frames: np.ndarray, out: Path, fps: float) -> None:
    """H.264 MP4 (yuv420p, faststart) of RGB frames; sides rounded down to even numbers."""
    import av

    h, w = (frames.shape[1] // 2) * 2, (frames.shape[2] // 2) * 2
    with av.open(str(out), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(round(fps * 100), 100))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def encode_animation(frames: np.ndarray, out: Path, fps: float) -> None:
    """Looping animated WebP or GIF (by the suffix of ``out``) through Pillow."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    fmt = "WEBP" if out.suffix == ".webp" else "GIF"
    extra: dict[str, Any] = {"quality": 70} if fmt == "WEBP" else {"optimize": False}
    images[0].save(out, format=fmt, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)),
                   loop=0, **extra)


def write_preview(frames: np.ndarray, out: Path, fps: float) -> Path:
    """Write ``frames`` to ``out`` atomically in the format its suffix names; returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if out.suffix == ".mp4":
            encode_mp4(frames, tmp, fps)
        else:
            encode_animation(frames, tmp, fps)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def render_preview(source: Path, out: Path, policy: FramePolicy | None = None) -> Preview:
    """Decode, prepare and encode one file to ``out`` (uncached; used for uploaded query clips)."""
    frames, fps = preview_frames(source, policy or preview_policy())
    return as_preview(write_preview(frames, out, fps))


def cached_preview(index_dir: Path | str, video_key: int) -> Preview | None:
    """The cached preview of a video, if one exists."""
    folder = Path(index_dir) / PREVIEW_DIR
    for ext in EXTENSIONS:
        p = folder / f"{int(video_key)}{ext}"
        if p.is_file() and p.stat().st_size > 0:
            return as_preview(p)
    return None


def ensure_preview(index_dir: Path | str, video_key: int, source: Path | str,
                   index_policy: dict[str, Any] | None = None) -> Preview:
    """The cached preview of ``video_key``, made from ``source`` first when missing.

    Raises :class:`~echosearch.errors.QueryError` when the source file is gone and IngestError when it
    can no longer be decoded."""
    hit = cached_preview(index_dir, video_key)
    if hit is not None:
        return hit
    src = Path(source)
    if not src.is_file():
        raise QueryError(f"the source file of video {video_key} is no longer at its indexed location")
    out = Path(index_dir) / PREVIEW_DIR / f"{int(video_key)}{preferred_extension()}"
    return render_preview(src, out, preview_policy(index_policy))


def _index_policy(catalog: Catalog) -> dict[str, Any]:
    model = catalog.get_manifest("model") or {}
    return dict(model.get("preprocessing") or {})


def make_previews(index_dir: Path | str, keys: Iterable[int] | None = None, *, catalog: Catalog | None = None,
                  overwrite: bool = False) -> dict[str, int]:
    """Make missing previews for ``keys`` (default: every video); failures are logged, never raised.

    Pass ``catalog`` when the caller already holds the index open (DuckDB allows one configuration per
    file and process); otherwise the catalog is opened read-only. Returns counts made/cached/failed."""
    from echosearch.catalog import Catalog

    own = catalog is None
    cat = catalog if catalog is not None else Catalog.open(index_dir, read_only=True)
    try:
        policy = _index_policy(cat)
        rows: Sequence[tuple[Any, ...]] = sorted(cat.locations(None if keys is None else list(keys)).items())
    finally:
        if own:
            cat.close()
    counts = {"made": 0, "cached": 0, "failed": 0}
    for key, path in rows:
        if overwrite:
            for ext in EXTENSIONS:
                (Path(index_dir) / PREVIEW_DIR / f"{int(key)}{ext}").unlink(missing_ok=True)
        elif cached_preview(index_dir, key) is not None:
            counts["cached"] += 1
            continue
        try:
            ensure_preview(index_dir, int(key), path, policy)
            counts["made"] += 1
        except (EchosearchError, IngestError, OSError) as exc:
            log.warning("no preview for video %s: %s", key, exc)
            counts["failed"] += 1
    return counts
