"""Decode stage: a DICOM, AVI or MP4 file -> RGB uint8 frames (T,H,W,3) and its metadata.

DICOM goes through pydicom 3 (+ pylibjpeg plugins) for every common transfer syntax and photometric
interpretation; JPEG baseline frames take a fast path through OpenCV's libjpeg-turbo (the same codestream,
~20x faster than pydicom's per-frame route, checked against pydicom in the tests). Only the frames asked
for are decoded. A single-frame DICOM is a one-frame video. Non-ultrasound objects are refused with a
reason a person can act on; SR and encapsulated-PDF objects raise :class:`ReportObjectFound`.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGBaseline8Bit,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from echosearch.errors import DecodeError, NotUltrasoundError, ReportObjectFound
from echosearch.ingest.discover import open_regular

VideoKind = Literal["dicom", "avi", "mp4"]

DEFAULT_FPS = 30.0
MAX_SIDE = 16384  # rows/columns beyond this are treated as a corrupt header
MAX_FRAMES = 100_000
MAX_DECODED_BYTES = 8 << 30  # refuse to materialise more than 8 GiB of RGB frames in one call
_CV2_JPEG_PHOTOMETRICS = ("YBR_FULL_422", "YBR_FULL", "MONOCHROME2", "MONOCHROME1")

US_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
}
# Secondary capture is accepted only when Modality says US (echo carts export screen captures this way).
SECONDARY_CAPTURE = {"1.2.840.10008.5.1.4.1.1.7", *(f"1.2.840.10008.5.1.4.1.1.7.{i}" for i in (2, 3, 4))}
REPORT_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.104.")
_DICOM_TEXT_FIELDS = {
    "patient_id": "PatientID", "patient_name": "PatientName", "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID", "sop_uid": "SOPInstanceUID", "accession": "AccessionNumber",
    "manufacturer": "Manufacturer", "manufacturer_model": "ManufacturerModelName", "modality": "Modality",
    "sop_class_uid": "SOPClassUID", "photometric": "PhotometricInterpretation",
}


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of SequenceOfUltrasoundRegions; bounds are inclusive pixel coordinates, as in DICOM."""

    x0: int
    y0: int
    x1: int
    y1: int
    spatial_format: int  # 1 = 2D (tissue/colour flow), 2 = M-mode, 3 = spectral, 4 = waveform
    data_type: int  # 1 = tissue, 2 = colour flow, 3/4 = PW/CW Doppler, 9+ = ECG and other traces


@dataclass
class VideoMeta:
    """What decode learns from a file's header; identifiers are raw here (pseudonymised by ingest)."""

    kind: VideoKind
    n_frames: int
    height: int
    width: int
    fps: float
    fps_default: bool = False  # True when no frame-timing tag/stream rate existed and DEFAULT_FPS was used
    patient_id: str | None = None
    patient_name: str | None = None
    birth_date: date | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    accession: str | None = None
    study_date: date | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None
    bits_allocated: int | None = None
    regions: list[UltrasoundRegion] = field(default_factory=list)


@dataclass
class DecodedVideo:
    """Decoded frames (T,H,W,3) uint8 RGB, the file frame index of each, and the header metadata."""

    frames: np.ndarray
    frame_indices: np.ndarray
    meta: VideoMeta


# ---- public API ---------------------------------------------------------------------------------
def read_meta(path: Path, kind: str) -> VideoMeta:
    """Header metadata without decoding pixels; refuses non-ultrasound DICOM objects."""
    if kind == "dicom":
        return _dicom_meta(read_dicom_header(path))
    if kind in ("avi", "mp4"):
        with _open_container(path) as container:
            return _video_meta(container, path, kind)  # type: ignore[arg-type]
    raise DecodeError(f"unrecognised file format {kind!r}: not a DICOM, AVI or MP4 file")


FramePick = Sequence[int] | np.ndarray | Callable[[VideoMeta], Sequence[int] | np.ndarray] | None


def decode_video(path: Path, kind: str, frame_indices: FramePick = None) -> DecodedVideo:
    """Decode the frames at ``frame_indices`` (all when None) to RGB uint8; only those are decoded.

    ``frame_indices`` may be a function of the header's metadata (e.g. sampling spread over the clip's
    length): the header is then read once, not once to count frames and again to decode. A repeated index
    (short clips sampled to a fixed length) is decoded once and copied.
    """
    if kind not in ("dicom", "avi", "mp4"):
        raise DecodeError(f"unrecognised file format {kind!r}: not a DICOM, AVI or MP4 file")
    pick = frame_indices if callable(frame_indices) else (lambda _meta: frame_indices)
    if kind == "dicom":
        out, inverse = _decode_dicom(path, pick)
    else:
        out, inverse = _decode_container(path, kind, pick)  # type: ignore[arg-type]
    if inverse is not None:
        out = DecodedVideo(out.frames[inverse], out.frame_indices[inverse], out.meta)
    return out


def _unique_request(req: Sequence[int] | np.ndarray | None) -> tuple[Sequence[int] | None, np.ndarray | None]:
    """Indices to decode (each once) and how to expand them back to the request (None: as requested)."""
    if req is None:
        return None, None
    arr = np.asarray(req, dtype=np.int64)
    uniq, inverse = np.unique(arr, return_inverse=True)
    if len(uniq) == len(arr) and np.all(uniq == arr):
        return [int(i) for i in arr], None
    return [int(i) for i in uniq], inverse


# ---- DICOM header ---------------------------------------------------------------------------------
def read_dicom_header(path: Path, check: bool = True) -> Dataset:
    """The header (no pixels) of a DICOM file; with ``check`` refuses non-ultrasound/report objects."""
    return _read_header(path, check)[0]


def _read_header(path: Path, check: bool = True) -> tuple[Dataset, int, int]:
    """(header, file offset where Pixel Data starts or the header ended, file size)."""
    try:
        with warnings.catch_warnings(), open_regular(path) as f:
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            pos, size = f.tell(), os.fstat(f.fileno()).st_size
            _parse_all(ds)
    except DecodeError:
        raise
    except FileNotFoundError as exc:
        raise DecodeError("file vanished before it could be read") from exc
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise DecodeError(explain(exc, "unreadable DICOM header")) from exc
    if len(ds) == 0:
        raise DecodeError("unreadable DICOM header: no data elements found")
    if check:
        _check_ultrasound(ds)
    return ds, pos, size


_RELIED_GROUPS = frozenset({0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028})  # meta, identity, image, US


def _parse_all(ds: Dataset, depth: int = 0) -> None:
    """Parse every element of a header now: pydicom converts raw elements lazily, on first access, and a
    damaged one (an unknown VR, a length that does not fit its VR) would raise an exception of any type
    wherever the header is next read. A damaged top-level element of the groups this reader relies on
    (identity, image pixel module, ultrasound) becomes one :class:`DecodeError` that names it; any other
    (private, overlay, a stray item, inside a sequence) is dropped: nothing here reads it."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.value is not None and raw.length != 0xFFFFFFFF \
                and len(raw.value) < raw.length:  # the file ended inside this value
            name = keyword_for_tag(tag) or "private or unknown element"
            raise DecodeError(f"the DICOM header ends early: element ({tag.group:04X},{tag.element:04X}) {name} "
                              f"claims {raw.length} bytes, the file holds {len(raw.value)} (a truncated file or "
                              "a damaged length)")
        try:
            elem = ds[tag]
        except Exception as exc:  # pydicom raises NotImplementedError, BytesLengthException, ValueError, ...
            if depth == 0 and tag.group in _RELIED_GROUPS:
                name = keyword_for_tag(tag) or "unknown element"
                raise DecodeError(f"damaged DICOM header: element ({tag.group:04X},{tag.element:04X}) {name} "
                                  f"cannot be parsed ({_short(exc, 120)})") from exc
            del ds[tag]
            continue
        if elem.VR == "SQ" and depth < 16:
            for item in elem.value or []:
                _parse_all(item, depth + 1)


def _check_ultrasound(ds: Dataset) -> None:
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper()
    sop_name = US_SOP_CLASSES.get(sop) or (_shown(_uid(sop).name) if sop else "no SOP class")
    if sop.startswith(REPORT_SOP_PREFIXES) or modality in ("SR", "DOC"):
        raise ReportObjectFound(f"{sop_name}: a report object (text, not video); recorded as a report")
    if modality and modality != "US":
        raise NotUltrasoundError(f"modality {_shown(modality)} ({sop_name}): not an ultrasound object")
    if not sop and not modality:
        raise NotUltrasoundError("neither SOP class nor modality in the header: not an ultrasound image (a "
                                 "damaged or truncated header, or not an image object)")
    if sop not in US_SOP_CLASSES and not (modality == "US" and sop in SECONDARY_CAPTURE):
        raise NotUltrasoundError(f"SOP class {sop_name} ({_shown(sop) or '-'}): not an ultrasound image class")
    if "Rows" not in ds or "Columns" not in ds:
        raise NotUltrasoundError(
            "no image pixel module (Rows/Columns missing): an ultrasound object without pixel data"
        )


def _dicom_meta(ds: Dataset) -> VideoMeta:
    rows, cols = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
    n_frames = _header_int(ds, "NumberOfFrames", 1)
    bits = _header_int(ds, "BitsAllocated", 8)
    spp = _header_int(ds, "SamplesPerPixel", 1)
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE):
        raise DecodeError(f"absurd image size {rows}x{cols} in the header (Rows x Columns): corrupt file")
    if n_frames <= 0:
        raise DecodeError(f"header says {n_frames} frames: nothing to decode")
    if n_frames > MAX_FRAMES:
        raise DecodeError(f"absurd frame count {n_frames} in the header: corrupt file")
    if bits not in (8, 16) or spp not in (1, 3):
        raise DecodeError(f"unsupported pixel layout: {bits} bits allocated, {spp} samples per pixel")
    fps, default = _dicom_fps(ds)
    texts = {field: _s(ds, keyword) for field, keyword in _DICOM_TEXT_FIELDS.items()}
    return VideoMeta(kind="dicom", n_frames=n_frames, height=rows, width=cols, fps=fps, fps_default=default,
                     birth_date=_date(ds.get("PatientBirthDate")), study_date=_date(ds.get("StudyDate")),
                     transfer_syntax=str(_transfer_syntax(ds)), bits_allocated=bits, regions=_regions(ds),
                     **texts)


_INT_VRS = {"NumberOfFrames": ("IS", "US", "UL", "SL", "SS", "UN")}


def _header_int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer of the image pixel module (``default`` when absent or empty); a :class:`DecodeError` that
    names the attribute when it is stored as text where DICOM wants a number, or is not a number at all
    (pydicom's pixel handlers would fail later with a bare ``ValueError``/``TypeError``)."""
    elem = ds.data_element(keyword) if keyword in ds else None
    if elem is None or elem.value is None or elem.value == "":
        return default
    tag = f"({elem.tag.group:04X},{elem.tag.element:04X})"
    allowed = _INT_VRS.get(keyword, ("US", "SS", "UL", "SL", "UN"))
    if elem.VR not in allowed:
        raise DecodeError(f"{elem.name} {tag} is stored as {_shown(elem.VR, 8)} ({_shown(elem.value)}) instead of "
                          f"{allowed[0]}: corrupt header")
    try:
        return int(elem.value)
    except (TypeError, ValueError):
        raise DecodeError(f"{elem.name} {tag} is {_shown(elem.value)}, not a whole number: corrupt header") from None


def _dicom_fps(ds: Dataset) -> tuple[float, bool]:
    try:
        ft = float(ds.get("FrameTime") or 0)
        if ft > 0:
            return 1000.0 / ft, False
        vec = ds.get("FrameTimeVector")
        if vec and len(vec) > 1:
            mean = float(np.mean([float(v) for v in list(vec)[1:]]))
            if mean > 0:
                return 1000.0 / mean, False
        for tag in ("CineRate", "RecommendedDisplayFrameRate"):
            val = float(ds.get(tag) or 0)
            if val > 0:
                return val, False
    except (TypeError, ValueError):
        pass
    return DEFAULT_FPS, True


def _regions(ds: Dataset) -> list[UltrasoundRegion]:
    out = []
    keys = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")
    for item in ds.get("SequenceOfUltrasoundRegions", []) or []:
        try:
            x0, y0, x1, y1 = (int(item.get(k)) for k in keys)
            fmt, dtype = int(item.get("RegionSpatialFormat", 0) or 0), int(item.get("RegionDataType", 0) or 0)
        except (TypeError, ValueError):
            continue  # an incomplete region item is ignored; the sector is then estimated
        out.append(UltrasoundRegion(x0, y0, x1, y1, fmt, dtype))
    return out


def _transfer_syntax(ds: Dataset) -> UID:
    ts = getattr(ds, "file_meta", None) and ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return _uid(str(ts))
    implicit, little = ds.original_encoding  # headerless DICOM: what the reader detected
    return ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


# ---- DICOM pixels -------------------------------------------------------------------------------------
def _decode_dicom(path: Path, pick: Callable[[VideoMeta], Any]) -> tuple[DecodedVideo, np.ndarray | None]:
    header, pixel_pos, size = _read_header(path)
    meta = _dicom_meta(header)
    frame_indices, inverse = _unique_request(pick(meta))
    idx = _check_indices(frame_indices, meta)
    ts = _uid(meta.transfer_syntax or "")
    if not ts.is_transfer_syntax:
        raise DecodeError(f"the file meta names {_shown(ts) or 'no UID'} as transfer syntax, which is not one: "
                          "corrupt file meta (or a private encoding this reader does not know)")
    if pixel_pos + 8 > size:
        raise NotUltrasoundError("no pixel data in this ultrasound object: nothing to decode")
    if not ts.is_encapsulated:
        spp = _int(header.get("SamplesPerPixel", 1), 1)
        expected = meta.n_frames * meta.height * meta.width * spp * (meta.bits_allocated or 8) // 8
        if meta.photometric == "YBR_FULL_422" and spp == 3:  # chroma shared by pixel pairs: 2 samples a pixel
            expected = expected * 2 // 3
        held = size - pixel_pos - (8 if ts == ImplicitVRLittleEndian else 12)
        if held < expected:
            raise DecodeError(f"pixel data truncated: the file holds {max(held, 0)} of the {expected} bytes "
                              f"that {meta.n_frames} frames of {meta.height}x{meta.width} need")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            file_meta = getattr(header, "file_meta", None)
            has_file_meta = bool(file_meta and file_meta.get("TransferSyntaxUID"))
            if _native_ybr422(ts, meta):
                raw_frames = _ybr422_frames(path, pixel_pos + (8 if ts == ImplicitVRLittleEndian else 12), meta, idx)
            elif ts.is_encapsulated or not has_file_meta:
                ds = pydicom.dcmread(path, force=True)
                if "PixelData" not in ds:
                    raise DecodeError("pixel data truncated or corrupt: the Pixel Data element could not be "
                                      "read (the file ends early?)")
                ds.file_meta.TransferSyntaxUID = ts
                raw_frames = _dicom_frames_from_dataset(ds, meta, idx)
            else:
                raw_frames = iter_pixels(path, indices=[int(i) for i in idx])
            convert = _rgb8_converter(header, meta)
            out = np.empty((len(idx), meta.height, meta.width, 3), np.uint8)
            n_done = 0
            for a in raw_frames:
                frame = convert(np.asarray(a))
                if frame.shape != out.shape[1:]:
                    raise DecodeError(f"decoded frame is {frame.shape[0]}x{frame.shape[1]}, header says "
                                      f"{meta.height}x{meta.width}: corrupt file")
                out[n_done] = frame
                n_done += 1
    except (DecodeError, NotUltrasoundError):
        raise
    except FileNotFoundError as exc:
        raise DecodeError("file vanished before it could be decoded") from exc
    except Exception as exc:  # codec plugins raise ValueError/RuntimeError/... on damaged data
        raise DecodeError(explain(exc, f"pixel data could not be decoded ({ts.name or 'unknown transfer syntax'})")
                          ) from exc
    if n_done != len(idx):
        raise DecodeError(f"pixel data truncated: {n_done} of {len(idx)} requested frames decoded")
    return DecodedVideo(out, idx, meta), inverse


def _native_ybr422(ts: UID, meta: VideoMeta) -> bool:
    """Native 8-bit YBR_FULL_422, which pydicom 3.0 mis-sizes when reading frames from a file: decoded here."""
    return not ts.is_encapsulated and meta.photometric == "YBR_FULL_422" and (meta.bits_allocated or 8) == 8


def _ybr422_frames(path: Path, data_pos: int, meta: VideoMeta, idx: np.ndarray) -> Iterator[np.ndarray]:
    """RGB frames of native YBR_FULL_422: each horizontal pixel pair is stored as Y0 Y1 Cb Cr (2 bytes a pixel)."""
    h, w = meta.height, meta.width
    if w % 2:
        raise DecodeError(f"YBR_FULL_422 needs an even number of columns, the header says {w}: corrupt file")
    frame_bytes = h * w * 2
    with open_regular(path) as f:
        for i in idx:
            f.seek(data_pos + int(i) * frame_bytes)
            data = f.read(frame_bytes)
            if len(data) != frame_bytes:
                raise DecodeError(f"pixel data truncated: frame {int(i)} of {meta.n_frames} is incomplete")
            quad = np.frombuffer(data, np.uint8).reshape(h, w // 2, 4)
            ycrcb = np.empty((h, w, 3), np.uint8)
            ycrcb[..., 0] = quad[..., :2].reshape(h, w)
            ycrcb[..., 1] = np.repeat(quad[..., 3], 2, axis=1)  # OpenCV's order is Y Cr Cb (full range, as YBR_FULL)
            ycrcb[..., 2] = np.repeat(quad[..., 2], 2, axis=1)
            yield cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)


def _check_indices(frame_indices: Sequence[int] | None, meta: VideoMeta) -> np.ndarray:
    idx = np.arange(meta.n_frames) if frame_indices is None else np.asarray(frame_indices, dtype=np.int64)
    if idx.size == 0:
        raise ValueError("no frames requested")
    if idx.min() < 0 or idx.max() >= meta.n_frames:
        raise ValueError(f"frame indices out of range 0..{meta.n_frames - 1}")
    if idx.size * meta.height * meta.width * 3 > MAX_DECODED_BYTES:
        raise DecodeError(f"{idx.size} frames of {meta.height}x{meta.width} exceed the decode memory limit")
    return idx


def _dicom_frames_from_dataset(ds: Dataset, meta: VideoMeta, idx: np.ndarray) -> Iterator[np.ndarray]:
    ts = _uid(meta.transfer_syntax or "")
    fast = ts == JPEGBaseline8Bit and meta.bits_allocated == 8 and meta.photometric in _CV2_JPEG_PHOTOMETRICS
    sized = ts in _SIZED_CODESTREAMS  # JPEG / JPEG-LS / JPEG 2000: each frame's own header gives its size
    if not fast and not sized:
        yield from iter_pixels(ds, indices=[int(i) for i in idx])
        return
    wanted = {int(i) for i in idx}
    encoded: dict[int, bytes] = {}
    for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=meta.n_frames)):
        if i in wanted:
            encoded[i] = frame
        if len(encoded) == len(wanted):
            break
    for i in idx:
        data = encoded.get(int(i))
        if data is None:
            raise DecodeError(f"pixel data truncated: frame {int(i)} of {meta.n_frames} is missing")
        size = _codestream_size(data)
        if size is not None and size != (meta.height, meta.width):  # checked before a codec allocates it
            raise DecodeError(f"frame {int(i)} is compressed as {size[0]}x{size[1]}, the header says "
                              f"{meta.height}x{meta.width}: corrupt pixel data")
    if not fast:
        yield from iter_pixels(ds, indices=[int(i) for i in idx])
        return
    grey = meta.photometric in ("MONOCHROME2", "MONOCHROME1")
    for i in idx:
        data = encoded[int(i)]
        flag = cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR_RGB
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        complete = data.rstrip(b"\0").endswith(b"\xff\xd9")  # libjpeg grey-fills a cut-off frame silently
        if not complete or img is None or img.shape[:2] != (meta.height, meta.width):
            img = next(iter_pixels(ds, indices=[int(i)]))  # let pydicom decode (or explain) this frame
        yield img


_SIZED_CODESTREAMS = frozenset({*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes})
_JPEG_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG / JPEG-LS frame header (SOFn) or a JPEG 2000 codestream's SIZ segment;
    None when it cannot be found (the codec then decides). A corrupt size would make the codec allocate
    whatever it says (a flipped bit can claim 60 megapixels) before failing."""
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 24:  # J2K: SOC, SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24])
        return ysiz - yo, xsiz - xo
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    for _ in range(64):  # markers before the frame header: APPn, DQT, DHT, DRI, COM, LSE
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 9 > len(data) or data[pos] != 0xFF:
            return None
        marker, (length,) = data[pos + 1], struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF:
            rows, cols = struct.unpack(">HH", data[pos + 5:pos + 9])
            return rows, cols
        pos += 2 + length
    return None


def _rgb8_converter(ds: Dataset, meta: VideoMeta) -> Callable[[np.ndarray], np.ndarray]:
    """A per-file function: one decoded frame (any photometric, 8/16 bit) -> (H,W,3) uint8 RGB.

    The palette LUT is built once per file (pydicom's ``apply_color_lut`` re-parses it on every call).
    """
    pi = meta.photometric or "MONOCHROME2"
    if pi == "PALETTE COLOR":
        n_entries, first, lut_bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        n_entries = n_entries or 65536
        entries = np.arange(first, first + n_entries, dtype=np.uint16 if n_entries > 256 else np.uint8)
        lut = apply_color_lut(entries.reshape(1, -1), ds)[0]
        if lut.dtype != np.uint8:
            lut = ((lut >> 8) if lut_bits > 8 else lut).astype(np.uint8)
        if first == 0 and len(lut) == 256:  # 8-bit indices: OpenCV's table lookup, one pass per frame
            lut3 = np.ascontiguousarray(lut.reshape(256, 1, 3))
            return lambda arr: cv2.LUT(cv2.merge([arr.astype(np.uint8, copy=False)] * 3), lut3)
        return lambda arr: lut[np.clip(arr.astype(np.int64) - first, 0, len(lut) - 1)]

    def convert(arr: np.ndarray) -> np.ndarray:
        if arr.dtype != np.uint8:
            arr = _scale_to_uint8(arr, ds)
        if arr.ndim == 2:
            if pi == "MONOCHROME1":
                arr = 255 - arr
            return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
        if arr.ndim == 3 and arr.shape[2] == 3:
            return arr  # pydicom already converted YBR_* to RGB
        raise DecodeError(f"unexpected decoded frame shape {arr.shape} for {_shown(pi)}")

    return convert


def _scale_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """16 -> 8 bit with a per-file (not per-frame) mapping: window, else pixel range tags, else BitsStored."""
    a = arr.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    a = a * slope + intercept
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    if wc is not None and ww is not None:
        c = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
        w = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
        lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    elif "SmallestImagePixelValue" in ds and "LargestImagePixelValue" in ds:
        lo = float(ds.SmallestImagePixelValue) * slope + intercept
        hi = float(ds.LargestImagePixelValue) * slope + intercept
    else:
        stored = _int(ds.get("BitsStored", 16), 16)
        signed = _int(ds.get("PixelRepresentation", 0), 0) == 1
        lo = -(2 ** (stored - 1)) if signed else 0.0
        hi = (2 ** (stored - 1) - 1) if signed else float(2**stored - 1)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    if hi <= lo:
        hi = lo + 1
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


# ---- AVI / MP4 ------------------------------------------------------------------------------------
def _open_container(path: Path) -> Any:
    try:  # PyAV only where AVI/MP4 is read: a DICOM-only install (or a GPU box without it) imports this module
        import av
    except ImportError as exc:
        raise DecodeError("reading AVI/MP4 needs PyAV: pip install av") from exc
    try:
        container = av.open(str(path))
    except FileNotFoundError as exc:
        raise DecodeError("file vanished before it could be read") from exc
    except Exception as exc:
        raise DecodeError(explain(exc, "not a readable video container")) from exc
    if not container.streams.video:
        container.close()
        raise DecodeError("container has no video stream")
    return container


def _video_meta(container: Any, path: Path, kind: VideoKind) -> VideoMeta:
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise DecodeError("the video stream's codec is unknown or its parameters are unreadable: a damaged or "
                          "unsupported container")
    height, width = int(stream.codec_context.height or 0), int(stream.codec_context.width or 0)
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise DecodeError(f"absurd or missing frame size {height}x{width} in the container: corrupt file")
    n = int(stream.frames or 0)
    if n <= 0:  # no count in the header: count packets (demux only, no decoding)
        try:
            n = sum(1 for p in container.demux(stream) if p.size)
        except Exception as exc:  # PyAV raises its own OSError subclasses on damaged containers
            raise DecodeError(explain(exc, "damaged video container: its packets cannot be read")) from exc
    if n <= 0:
        raise DecodeError("video has zero frames")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    return VideoMeta(kind=kind, n_frames=n, height=height, width=width, fps=fps if fps > 0 else DEFAULT_FPS,
                     fps_default=fps <= 0, photometric="RGB", bits_allocated=8,
                     transfer_syntax=f"{kind}:{stream.codec_context.name}")


def _decode_container(path: Path, kind: VideoKind, pick: Callable[[VideoMeta], Any]
                      ) -> tuple[DecodedVideo, np.ndarray | None]:
    """Sequential decode that converts only the wanted frames and stops after the last one.

    Timestamp seeking is inexact in AVI (and costs a keyframe decode anyway for echo-length clips), so
    frames are counted while decoding; a header that over-counts is tolerated (``meta.n_frames`` is then
    corrected): frames are picked again over the frames that exist, or clamped to the last decodable one.
    """
    with _open_container(path) as container:
        meta = _video_meta(container, path, kind)
        _rewind(container)
        frame_indices, inverse = _unique_request(pick(meta))
        idx = _check_indices(frame_indices, meta)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        got, n_seen, complete = _decode_stream(container, stream, idx, meta)
        if complete and len(got) < len(set(int(i) for i in idx)) and 0 < n_seen < meta.n_frames:
            # the header over-counted and the stream ended cleanly: pick again over the frames that exist
            # (else a clip whose header claims 10x its length yields none of the frames sampled from it)
            meta.n_frames = n_seen
            frame_indices, inverse = _unique_request(pick(meta))
            idx = _check_indices(frame_indices, meta)
            _rewind(container)
            got, n_seen, complete = _decode_stream(container, stream, idx, meta)
    wanted = set(int(i) for i in idx)
    if not got:
        raise DecodeError("video has zero decodable frames")
    if len(got) < len(wanted):  # header over-counted: clamp to what exists
        meta.n_frames = n_seen
        last = max(got)
        idx = np.minimum(idx, last)
        for i in idx:
            got.setdefault(int(i), got[last])
    frames = np.stack([got[int(i)] for i in idx])
    if frames.shape[1:3] != (meta.height, meta.width):
        raise DecodeError(f"decoded frames are {frames.shape[1]}x{frames.shape[2]}, container says "
                          f"{meta.height}x{meta.width}")
    return DecodedVideo(frames, idx, meta), inverse


def _rewind(container: Any) -> None:
    try:
        container.seek(0)
    except Exception as exc:  # a damaged index: PyAV raises PermissionError, InvalidDataError, ...
        raise DecodeError(explain(exc, "damaged video container: cannot go back to its first frame")) from exc


def _decode_stream(container: Any, stream: Any, idx: np.ndarray, meta: VideoMeta
                   ) -> tuple[dict[int, np.ndarray], int, bool]:
    """(wanted frames decoded, frames seen, whether the stream ended without a decoding error)."""
    wanted = set(int(i) for i in idx)
    last_wanted = int(idx.max())
    got: dict[int, np.ndarray] = {}
    n_seen = 0
    try:
        for i, frame in enumerate(container.decode(stream)):
            n_seen = i + 1
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
                if got[i].shape[:2] != (meta.height, meta.width):  # a damaged frame header: not stackable
                    raise DecodeError(f"frame {i} decodes to {got[i].shape[0]}x{got[i].shape[1]}, the container "
                                      f"says {meta.height}x{meta.width}: corrupt video stream")
            if i >= last_wanted:
                break
    except DecodeError:
        raise
    except Exception as exc:
        if not got:
            raise DecodeError(explain(exc, "video stream could not be decoded")) from exc
        return got, n_seen, False
    return got, n_seen, True


# ---- small helpers ----------------------------------------------------------------------------------
def _uid(value: str) -> UID:
    """A UID from a header value, not validated again: pydicom would warn (and log) the whole value of a
    damaged header, which can be the rest of the file; a bad UID is refused with a short reason instead."""
    return UID(value, validation_mode=pydicom.config.IGNORE)



def _s(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip().strip("\x00").strip()
    return text or None


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _date(value: Any) -> date | None:
    digits = re.sub(r"\D", "", str(value or ""))
    if len(digits) < 8:
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        return None


_MISSING_ELEMENT = re.compile(r"Missing required element: \(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\) '([^']+)'")
_NO_ATTRIBUTE = re.compile(r"has no attribute '(\w+)'")


def explain(exc: BaseException, context: str) -> str:
    """A failure reason a person can act on, with the technical detail at the end in brackets:
    ``missing required DICOM attribute Bits Allocated (0028,0100): ... [AttributeError: ...]``; ``context``
    (what was being done) leads when the exception is not one of the common, recognised ones."""
    text = _short(exc)
    return f"{_hint(exc, text) or context} [{type(exc).__name__}: {text}]"


def _hint(exc: BaseException, text: str) -> str | None:
    from pydicom.datadict import dictionary_description, tag_for_keyword

    if m := _MISSING_ELEMENT.search(text):
        return (f"missing required DICOM attribute {m[3]} ({m[1].upper()},{m[2].upper()}): the file is incomplete "
                "or not an image object")
    if isinstance(exc, (AttributeError, KeyError)) and (m := _NO_ATTRIBUTE.search(text)):
        tag = tag_for_keyword(m[1])
        if tag is not None:  # a DICOM keyword: the data set lacks an attribute the decoder needs
            return (f"missing required DICOM attribute {dictionary_description(tag)} "
                    f"({tag >> 16:04X},{tag & 0xFFFF:04X}): the file is incomplete or not an image object")
    if "insufficient pixel data" in text or "cannot reshape array" in text:
        return ("pixel data size does not match the header (Rows, Columns, frames, samples per pixel): the file "
                "is truncated or its header is wrong")
    if isinstance(exc, (EOFError,)) or "unexpected end" in text.lower():
        return "the file ends early (truncated or still being copied)"
    if isinstance(exc, RecursionError):
        return "sequences nested too deeply to read: a damaged or hostile header"
    if "exceptions were raised by all available plugins" in text:  # pydicom: every decoder tried and failed
        return "compressed pixel data is corrupt: every installed decoder failed on it (a damaged or truncated file)"
    if isinstance(exc, NotImplementedError) or "no pixel data handler" in text.lower() or "plugin" in text.lower():
        return "no installed decoder supports this compression: convert the file or install the missing plugin"
    return None


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    filename = getattr(exc, "filename", None)  # OSError, PyAV: the path is the row's own, not repeated here
    if isinstance(filename, (str, bytes, os.PathLike)) and (name := os.fsdecode(filename)):
        text = text.replace(f": {name!r}", "").replace(name, "the file")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any, limit: int = 64) -> str:
    """A header value as quoted in a failure reason: control characters escaped, at most ``limit`` characters
    (a damaged header can make one text element swallow the rest of the file)."""
    text = str(value).strip().strip("\x00").strip()
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
