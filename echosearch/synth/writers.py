"""File writers: DICOM Ultrasound Multi-frame objects in several transfer syntaxes, and AVI (MJPEG).

JPEG baseline frames come from OpenCV (pydicom cannot encode JPEG) with 4:2:2 chroma, i.e. YBR_FULL_422
as DICOM requires. RLE Lossless is encoded here (libtiff's PackBits via Pillow, or a vectorised numpy one;
pydicom's own is pure Python, ~30 ms per frame). Nothing written depends on the clock, so the same
arguments give byte-identical files.
"""

from __future__ import annotations

import datetime as dt
import io
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pydicom
from PIL import Image, features
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, JPEGBaseline8Bit, RLELossless

from echosearch.synth.config import Profile
from echosearch.synth.render import Acquisition

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.8.498.1.7.1"  # fixed: output must not depend on pydicom's version
JPEG_QUALITY = 92


# ---- RLE Lossless (DICOM PS3.5 annex G) ------------------------------------------------------------------
def packbits(plane: np.ndarray) -> bytes:
    """PackBits of a (rows, columns) uint8 plane, each row encoded separately, padded to even length."""
    h, w = plane.shape
    x = np.ascontiguousarray(plane).reshape(-1)
    n = x.size
    brk = np.ones(n, bool)
    brk[1:] = x[1:] != x[:-1]
    brk[::w] = True
    starts = np.flatnonzero(brk)
    lens = np.diff(np.append(starts, n))
    rep = lens >= 3
    # replicate packets: runs of >= 3 equal bytes, split into chunks of at most 128
    rs, rl = starts[rep], lens[rep]
    nch = (rl + 127) // 128
    run_of = np.repeat(np.arange(rs.size), nch)
    k = np.arange(run_of.size) - np.repeat(np.cumsum(nch) - nch, nch)
    rep_start, rep_len = rs[run_of] + 128 * k, np.minimum(128, rl[run_of] - 128 * k)
    # literal packets: maximal stretches of other bytes within a row, split into chunks of at most 128
    lp = np.flatnonzero(np.repeat(~rep, lens))
    gbrk = np.ones(lp.size, bool)
    gbrk[1:] = (lp[1:] != lp[:-1] + 1) | (lp[1:] % w == 0)
    gfirst = np.flatnonzero(gbrk)
    pos = np.arange(lp.size) - gfirst[np.cumsum(gbrk) - 1]
    first = np.flatnonzero(gbrk | (pos % 128 == 0))
    lit_start, lit_len = lp[first], np.diff(np.append(first, lp.size))
    p_start = np.concatenate([rep_start, lit_start])
    p_len = np.concatenate([rep_len, lit_len])
    p_rep = np.concatenate([np.ones(rep_start.size, bool), np.zeros(lit_start.size, bool)])
    order = np.argsort(p_start, kind="stable")
    p_start, p_len, p_rep = p_start[order], p_len[order], p_rep[order]
    size = np.where(p_rep, 2, 1 + p_len)
    hdr = np.cumsum(size) - size
    total = int(size.sum())
    out = np.zeros(total + (total & 1), np.uint8)
    out[hdr] = np.where(p_rep, np.where(p_len >= 2, 257 - p_len, 0), p_len - 1).astype(np.uint8)
    out[hdr[p_rep] + 1] = x[p_start[p_rep]]
    lit = ~p_rep
    out[np.repeat(hdr[lit] + 1 - p_start[lit], p_len[lit]) + lp] = x[lp]
    return out.tobytes()


def _packbits_frames(planes: np.ndarray) -> list[bytes]:
    """PackBits of each (H, W) plane of a (T, H, W) stack: libtiff through Pillow when it has it (about 5x
    faster: each TIFF strip is one frame, rows encoded separately), else :func:`packbits`."""
    t, h, w = planes.shape
    if not features.check("libtiff"):
        return [packbits(p) for p in planes]
    out: list[bytes] = []
    step = max(1, 16_000_000 // (h * w))
    for i in range(0, t, step):
        chunk = np.ascontiguousarray(planes[i:i + step])
        buf = io.BytesIO()
        Image.fromarray(chunk.reshape(-1, w)).save(buf, format="TIFF", compression="packbits",
                                                   tiffinfo={278: h})
        with Image.open(buf) as im:
            tags = im.tag_v2  # type: ignore[attr-defined]
            offsets, counts = tags[273], tags[279]
        data = buf.getbuffer()
        for o, c in zip(offsets, counts, strict=True):
            seg = bytes(data[o:o + c])
            out.append(seg + b"\x00" * (len(seg) & 1))
    return out


def rle_frames(frames: np.ndarray) -> list[bytes]:
    """RLE Lossless frames: a 64-byte header, then one segment per sample (grey, or R, G, B)."""
    planes = [frames] if frames.ndim == 3 else [frames[..., c] for c in range(frames.shape[3])]
    segs = [_packbits_frames(p) for p in planes]
    out = []
    for f in range(len(frames)):
        parts = [s[f] for s in segs]
        offsets = np.cumsum([64] + [len(p) for p in parts[:-1]]).tolist()
        header = struct.pack("<16I", len(parts), *offsets, *([0] * (15 - len(parts))))
        out.append(header + b"".join(parts))
    return out


def jpeg_frame(rgb: np.ndarray) -> bytes:
    """Baseline JPEG (YCbCr 4:2:2) of one RGB frame."""
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY,
                                                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG frame")
    return bytes(buf)


# ---- DICOM ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DicomIdentity:
    """Identifiers and dates written into one DICOM object (recorded values, mislabelled or not)."""

    patient_id: str
    patient_name: str
    birth_date: dt.date
    sex: str
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    study_date: dt.date
    study_time: str  # HHMMSS
    institution: str
    view: str
    series_number: int


def _region(acq: Acquisition) -> Dataset:
    s = acq.sector
    x0, y0, x1, y1 = s.bbox
    r = Dataset()
    r.RegionSpatialFormat = 1
    r.RegionDataType = 1
    r.RegionFlags = 0
    r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1 - 1, y1 - 1
    r.ReferencePixelX0 = int(round(s.apex_x - x0))
    r.ReferencePixelY0 = int(round(s.apex_y - y0))
    r.PhysicalUnitsXDirection = 3  # cm
    r.PhysicalUnitsYDirection = 3
    r.ReferencePixelPhysicalValueX = 0.0
    r.ReferencePixelPhysicalValueY = 0.0
    r.PhysicalDeltaX = round(acq.mm_per_px / 10.0, 6)
    r.PhysicalDeltaY = round(acq.mm_per_px / 10.0, 6)
    r.TransducerFrequency = 2500
    return r


def write_dicom(path: Path, frames: np.ndarray, profile: Profile, acq: Acquisition,
                ident: DicomIdentity) -> None:
    """Write frames ((T,H,W) grey or (T,H,W,3) RGB uint8) as one Ultrasound Multi-frame Image object."""
    ts = profile.transfer_syntax
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(US_MULTIFRAME)
    meta.MediaStorageSOPInstanceUID = UID(ident.sop_uid)
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = "ECHOSEARCH_SYN"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "CARDIAC", "0001"]
    ds.SOPClassUID = US_MULTIFRAME
    ds.SOPInstanceUID = ident.sop_uid
    date = ident.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = ident.study_time
    ds.AcquisitionDateTime = date + ident.study_time
    ds.AccessionNumber = ident.accession
    ds.Modality = "US"
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.InstitutionName = ident.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "ECHO TTE COMPLETE"
    ds.SeriesDescription = ident.view
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date.strftime("%Y%m%d")
    ds.PatientSex = ident.sex
    ds.BodyPartExamined = "HEART"
    ds.StudyInstanceUID = ident.study_uid
    ds.SeriesInstanceUID = ident.series_uid
    ds.StudyID = ident.accession[-6:]
    ds.SeriesNumber = ident.series_number
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.HeartRate = int(round(acq.hr))
    ds.NumberOfFrames = len(frames)
    ds.FrameTime = f"{1000.0 / acq.fps:.4f}"
    ds.FrameIncrementPointer = 0x00181063
    ds.CineRate = acq.fps
    ds.RecommendedDisplayFrameRate = acq.fps
    ds.UltrasoundColorDataPresent = 0
    if profile.has_regions:
        ds.SequenceOfUltrasoundRegions = DicomSequence([_region(acq)])
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.SamplesPerPixel = 1 if frames.ndim == 3 else 3
    ds.PhotometricInterpretation = profile.photometric
    if frames.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if ts == JPEGBaseline8Bit:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([jpeg_frame(f) for f in frames])
        ds["PixelData"].VR = "OB"
    elif ts == RLELossless:
        ds.PixelData = encapsulate(rle_frames(frames))
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
        ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


# ---- AVI -----------------------------------------------------------------------------------------------
def write_avi(path: Path, frames: np.ndarray, fps: int) -> None:
    """MJPEG AVI (high quality, 4:2:0) of RGB or grey frames; muxed without any timestamp metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = frames if frames.ndim == 4 else np.repeat(frames[..., None], 3, axis=3)
    with av.open(str(path), mode="w", format="avi") as container:
        container.metadata.clear()
        stream = container.add_stream("mjpeg", rate=Fraction(int(fps), 1))
        stream.width, stream.height = int(rgb.shape[2]), int(rgb.shape[1])
        stream.pix_fmt = "yuvj420p"
        stream.codec_context.qscale = True  # fixed quantiser: near-lossless at 112 px
        stream.codec_context.global_quality = 2 * 118  # q 2 (FF_QP2LAMBDA = 118)
        for f in rgb:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
