"""A corpus of bad inputs, written by the tests: every way a file handed to ``scan`` can be broken.

:func:`write_corpus` writes each kind (named, see :data:`BadInput.kind`) into a folder, built from real echo
DICOMs (cut or mutated at byte level or with pydicom) and from small synthetic clips, in about a second.
Each kind says what a scan must make of it: ``error`` (one ``ingest_errors`` row), ``report`` (a report
object, also an ``ingest_errors`` row), ``video`` (one ``videos`` row), ``either`` (a damaged file that a
tolerant decoder may still read, e.g. a header that under-counts frames: exactly one row of either table)
or ``skipped`` (no row: hidden files are not inputs, by design).
Every file's content is unique (a scan processes each content hash once).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

Expect = Literal["error", "video", "report", "either", "skipped"]
MONO = "US-MONO2-8-8x-execho.dcm"  # native explicit little endian, 8 frames of 120x128 grey
JPEG = "SonoSite_echo_A4C_30f_JPEG_small.dcm"  # JPEG baseline, 30 frames of 240x320 YBR_FULL_422
RGB = "US-RGB-8-esopecho.dcm"  # native RGB, one frame
CT = "wrong_CT_small.dcm"
J2K = "US1_J2KR.dcm"  # JPEG 2000 lossless, one frame of 480x640
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
ITEM_TAG = b"\xfe\xff\x00\xe0"
SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@dataclass(frozen=True)
class BadInput:
    """One input of the corpus: its kind, its path as discovery reports it, and what a scan must make of it.
    ``hashed`` is False for inputs that have no content to hash (FIFO, link loop, manifest rows)."""

    kind: str
    path: Path
    expect: Expect
    hashed: bool = True


BARE_EXCEPTION = re.compile(r"^\s*([\w.]+\.)?[A-Z]\w*(Error|Exception|Exit|Interrupt|Iteration|Warning)\b|^\s*\[?\w+Error:")


def unreadable(reason: str, private: Sequence[str] = ()) -> str | None:
    """Why a failure reason is not one a person can act on (None when it is): it must be a few words on one
    line, bounded, not led by a bare exception class, with no traceback, no "a bug" (an unforeseen exception
    in the decoder), and none of the ``private`` texts (the inputs' folder: paths may hold identifiers)."""
    checks = [
        (bool(reason) and 10 <= len(reason) <= 600, "empty, too short or too long"),
        (not BARE_EXCEPTION.match(reason), "starts with an exception class"),
        ("Traceback" not in reason and 'File "' not in reason, "holds a traceback"),
        ("a bug" not in reason, "an unforeseen exception (the decoder calls it a bug)"),
        ("\n" not in reason and "\r" not in reason, "more than one line"),
        (re.search(r"[a-z]{2,} [a-z]{2,}", reason) is not None, "no words"),
        (not any(p and p in reason for p in private), "holds a path of the inputs"),
    ]
    return next((why for ok, why in checks if not ok), None)


# ---- small synthetic clips -----------------------------------------------------------------------------
def synthetic_frames(n: int = 12, h: int = 64, w: int = 80, seed: int = 0) -> np.ndarray:
    """(n,h,w,3) uint8: a bright fan-shaped speckle region on black that moves a little every frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    ang = np.arctan2(xx - w / 2, yy + 1)
    fan = (np.abs(ang) < 0.6) & (np.hypot(xx - w / 2, yy) < h * 0.95)
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        speckle = rng.integers(60, 220, (h, w), dtype=np.uint8)
        out[i][fan] = np.repeat(np.roll(speckle, i, axis=1)[fan][:, None], 3, axis=1)
    return out


def write_video(path: Path, frames: np.ndarray, fmt: str = "avi", codec: str = "mjpeg",
                options: dict[str, str] | None = None) -> Path:
    """An AVI (MJPEG) or MP4 (mpeg4) clip of RGB frames, written with PyAV."""
    with av.open(str(path), mode="w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(25, 1))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path, fmt: str, codec: str) -> Path:
    """A container with one audio stream and no video stream."""
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=8000)
        stream.layout = "mono"
        samples = (np.sin(np.arange(8000) / 5.0) * 8000).astype(np.int16)
        fmt_name = "s16" if codec == "pcm_s16le" else "fltp"
        data = samples[None, :] if fmt_name == "s16" else (samples[None, :] / 32768).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(data, format=fmt_name, layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---- DICOM helpers -------------------------------------------------------------------------------------------
@contextmanager
def lenient_pydicom() -> Iterator[None]:
    """Let pydicom write values that do not fit their VR (an IS of "abc")."""
    cfg = pydicom.config.settings
    saved = cfg.writing_validation_mode, cfg.reading_validation_mode
    cfg.writing_validation_mode = cfg.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        cfg.writing_validation_mode, cfg.reading_validation_mode = saved


def mutated(real_dir: Path, source: str, kind: str, change: Callable[[Dataset], None]) -> bytes:
    """A real DICOM read with pydicom, changed, given a new (deterministic) SOP instance UID, and written."""
    ds = pydicom.dcmread(real_dir / source)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[kind])
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    change(ds)
    buf = io.BytesIO()
    with lenient_pydicom():
        ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def meta_end(data: bytes) -> int:
    """File offset just after the file meta group (its group length says where)."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", "needs a group length"
    (length,) = struct.unpack("<I", data[140:144])
    return 144 + length


def element_offset(data: bytes, tag: tuple[int, int], start: int = 0) -> int:
    """File offset of an explicit-VR little-endian element's header."""
    pos = data.find(struct.pack("<HH", *tag), start)
    assert pos >= 0, f"tag {tag} not found"
    return pos


def set_attr(**changes: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    return change


def raw_element(tag: int, vr: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds[tag] = DataElement(tag, vr, value)
    return change


def sr_document(kind: str) -> bytes:
    """A Comprehensive SR with a text item and no pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[kind])
    ds.Modality = "SR"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[kind, "study"])
    ds.PatientID = "BAD-INPUT-SR"
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "Normal left ventricular size and function."
    ds.ContentSequence = [item]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---- AVI header patches -------------------------------------------------------------------------------------
def patch_avi(data: bytes, *, size: tuple[int, int] | None = None, frames: int | None = None) -> bytes:
    """An AVI with its frame size (avih, strh rcFrame, strf) and/or frame count (avih, strh) rewritten."""
    out = bytearray(data)
    avih = data.find(b"avih") + 8
    strh = data.find(b"strh") + 8
    strf = data.find(b"strf") + 8
    if frames is not None:
        struct.pack_into("<I", out, avih + 16, frames)
        struct.pack_into("<I", out, strh + 32, frames)
    if size is not None:
        w, h = size
        struct.pack_into("<II", out, avih + 32, w, h)
        struct.pack_into("<II", out, strf + 4, w, h)
        struct.pack_into("<hhhh", out, strh + 48, 0, 0, w, h)
    return bytes(out)


def resize_jpeg_frame(data: bytes, frame: int, height: int) -> bytes:
    """An MJPEG AVI whose ``frame``-th JPEG says (in its SOF0 header) that it is ``height`` rows high."""
    out, pos = bytearray(data), -1
    for _ in range(frame + 1):
        pos = data.find(b"\xff\xc0\x00\x11\x08", pos + 1)
        assert pos >= 0, "not that many JPEG frames"
    struct.pack_into(">H", out, pos + 5, height)
    return bytes(out)


# ---- the corpus -------------------------------------------------------------------------------------------------
def corpus_bytes(real_dir: Path, work: Path) -> dict[str, tuple[str, bytes, Expect]]:
    """kind -> (file name, content, expectation) for every kind that is a plain file."""
    mono = (real_dir / MONO).read_bytes()
    jpeg = (real_dir / JPEG).read_bytes()
    rng = np.random.default_rng(1234)
    out: dict[str, tuple[str, bytes, Expect]] = {}

    def add(kind: str, data: bytes, expect: Expect, name: str | None = None) -> None:
        out[kind] = (name or f"{kind}.dcm", data, expect)

    # -- DICOM cut at each part (byte level, from real files) --
    jmeta = meta_end(jpeg)
    jpix, mpix = jpeg.rfind(PIXEL_DATA_TAG), mono.rfind(PIXEL_DATA_TAG)
    bot = jpix + 12  # Basic Offset Table item header
    (bot_len,) = struct.unpack("<I", jpeg[bot + 4:bot + 8])
    frag1 = bot + 8 + bot_len
    (frag1_len,) = struct.unpack("<I", jpeg[frag1 + 4:frag1 + 8])
    frag2 = frag1 + 8 + frag1_len
    (frag2_len,) = struct.unpack("<I", jpeg[frag2 + 4:frag2 + 8])
    sop_class = element_offset(jpeg, (0x0008, 0x0016), jmeta)
    add("cut_inside_preamble", jpeg[:60], "error")
    add("cut_after_dicm", jpeg[:132], "error")
    add("cut_inside_file_meta", jpeg[:(132 + jmeta) // 2], "error")
    add("cut_at_end_of_file_meta", jpeg[:jmeta], "error")
    add("cut_inside_element_header", jpeg[:sop_class + 5], "error")
    add("cut_inside_element_value", jpeg[:sop_class + 8 + 7], "error")
    add("cut_inside_pixel_data_header", jpeg[:jpix + 6], "error")
    add("cut_inside_offset_table_item_header", jpeg[:bot + 5], "error")
    add("cut_inside_fragment_header", jpeg[:frag2 + 3], "error")
    add("cut_mid_fragment", jpeg[:frag2 + 8 + frag2_len // 2], "error")
    add("cut_in_last_fragment", jpeg[:len(jpeg) - 8 - 200], "error")
    assert jpeg.endswith(SEQ_DELIMITER)
    add("missing_sequence_delimiter", jpeg[:-8], "either")
    add("native_cut_inside_pixel_header", mono[:mpix + 7], "error")
    add("native_cut_mid_pixels", mono[:mpix + 12 + (len(mono) - mpix) // 2], "error")
    add("native_cut_last_byte", mono[:-1], "error")
    # -- element lengths that lie --
    huge = bytearray(mono)
    struct.pack_into("<I", huge, mpix + 8, 0xFFFFFFF0)  # native Pixel Data says ~4 GiB
    add("native_pixel_length_huge", bytes(huge), "either")
    undefined = bytearray(mono)
    struct.pack_into("<I", undefined, mpix + 8, 0xFFFFFFFF)  # undefined length in a native syntax
    add("native_pixel_length_undefined", bytes(undefined), "either")
    longer = bytearray(jpeg)
    struct.pack_into("<I", longer, frag2 + 4, 0x7FFFFFF0)  # a fragment claims 2 GiB
    add("fragment_length_huge", bytes(longer), "error")
    odd_value = bytearray(jpeg)
    struct.pack_into("<H", odd_value, sop_class + 6, 0xFFFF)  # a UI value claims 64 KiB
    add("element_length_past_end", bytes(odd_value), "error")
    cols = mono.find(b"\x28\x00\x11\x00US")
    add("header_element_unknown_vr", mono[:cols + 4] + b"\x55\x7f" + mono[cols + 6:], "error")
    pixrep = mono.find(b"\x28\x00\x03\x01US\x02\x00")  # Pixel Representation, a 2-byte US ...
    add("header_element_odd_length", mono[:pixrep + 6] + b"\x01\x00" + mono[pixrep + 8:pixrep + 9]
        + mono[pixrep + 10:], "error")  # ... cut to 1 byte
    private_ut = jpeg.find(b"\x19\x00\x50\x10UT\x00\x00")  # SonoSite's private XML (UT, 4-byte length)
    add("header_element_length_2gib", jpeg[:private_ut + 8] + struct.pack("<I", 0x7FFFFFF0)
        + jpeg[private_ut + 12:], "error")
    nested = (b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + ITEM_TAG + b"\xff\xff\xff\xff") * 5000
    add("sequence_nested_5000_deep", mono[:meta_end(mono)] + nested, "error")
    sof = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 240, 320)  # every frame's JPEG frame header (SOF0)
    assert jpeg.count(sof) == 30
    add("jpeg_frame_header_claims_8000x8000", jpeg.replace(sof, sof[:5] + struct.pack(">HH", 8000, 8000)), "error")
    j2k = (real_dir / J2K).read_bytes()
    siz = j2k.find(b"\xff\x4f\xff\x51")  # JPEG 2000 codestream: Ysiz at +12
    add("j2k_size_claims_6000_rows", j2k[:siz + 12] + struct.pack(">I", 6000) + j2k[siz + 16:], "error")
    # -- wrong VRs and values (pydicom, from real files) --
    m = lambda kind, change, expect="error", src=MONO: add(kind, mutated(real_dir, src, kind, change), expect)  # noqa: E731
    m("rows_as_string", raw_element(0x00280010, "LO", "abc"))
    m("columns_as_text_number", raw_element(0x00280011, "LO", "128"), "either")
    m("bits_allocated_0", set_attr(BitsAllocated=0))
    m("bits_allocated_7", set_attr(BitsAllocated=7))
    m("bits_allocated_64", set_attr(BitsAllocated=64))
    m("bits_allocated_16_on_8bit_data", set_attr(BitsAllocated=16, BitsStored=16, HighBit=15))
    m("samples_per_pixel_2", set_attr(SamplesPerPixel=2))
    m("samples_per_pixel_4", set_attr(SamplesPerPixel=4))
    m("samples_per_pixel_3_on_grey", set_attr(SamplesPerPixel=3, PlanarConfiguration=0), "error")
    m("photometric_unknown", set_attr(PhotometricInterpretation="XYZ_UNKNOWN"), "either")
    m("photometric_rgb_with_one_sample", set_attr(PhotometricInterpretation="RGB"), "either")
    m("palette_color_without_lut", set_attr(PhotometricInterpretation="PALETTE COLOR"))
    m("planar_configuration_2", set_attr(PlanarConfiguration=2), "either", RGB)
    m("rows_0", set_attr(Rows=0))
    m("columns_0", set_attr(Columns=0))
    m("rows_65535", set_attr(Rows=65535))
    m("columns_65535", set_attr(Columns=65535))
    m("rows_columns_1x1", set_attr(Rows=1, Columns=1, NumberOfFrames=1, PixelData=b"\x80\x00"), "either")
    m("number_of_frames_0", set_attr(NumberOfFrames=0))
    m("number_of_frames_minus_1", set_attr(NumberOfFrames=-1))
    abc = mutated(real_dir, MONO, "number_of_frames_abc", raw_element(0x00280008, "LO", "abc "))
    add("number_of_frames_abc", abc.replace(b"\x28\x00\x08\x00LO", b"\x28\x00\x08\x00IS", 1), "either")
    m("number_of_frames_huge", set_attr(NumberOfFrames=2**31 - 1))
    m("frames_more_than_data", set_attr(NumberOfFrames=80))
    m("frames_fewer_than_data", set_attr(NumberOfFrames=2), "either")
    m("jpeg_frames_more_than_fragments", set_attr(NumberOfFrames=60), "either", JPEG)
    m("jpeg_frames_fewer_than_fragments", set_attr(NumberOfFrames=5), "either", JPEG)
    m("jpeg_fragments_random", set_attr(PixelData=encapsulate([rng.bytes(500) for _ in range(30)])), "error", JPEG)
    m("jpeg_fragments_empty", set_attr(PixelData=encapsulate([b"\xff\xd8\xff\xd9"] * 30)), "error", JPEG)
    m("missing_pixel_data", set_attr(PixelData=None))
    m("missing_rows", set_attr(Rows=None))
    m("missing_bits_allocated", set_attr(BitsAllocated=None), "either")
    m("regions_absurd", _absurd_regions, "either")
    add("transfer_syntax_unknown", with_transfer_syntax(mono, "1.2.3.4.5.6"), "either")
    add("transfer_syntax_jpeg_on_native_data", with_transfer_syntax(mono, "1.2.840.10008.1.2.4.50"), "error")
    add("transfer_syntax_deflate_on_plain_data", with_transfer_syntax(mono, "1.2.840.10008.1.2.1.99"), "either")
    add("transfer_syntax_big_endian_on_little", with_transfer_syntax(mono, "1.2.840.10008.1.2.2"), "either")
    m("modality_ct_in_us_file", set_attr(Modality="CT"))
    # -- non-ultrasound objects and non-DICOM content --
    add("ct_object", (real_dir / CT).read_bytes(), "error")
    add("sr_without_pixels", sr_document("sr_without_pixels"), "report")
    add("empty_file", b"", "error")
    add("random_bytes", rng.bytes(4096), "error")
    add("dicm_then_random", bytes(128) + b"DICM" + rng.bytes(2000), "error")
    add("headerless_cut", _headerless(real_dir)[: 700], "error")
    add("text_file_named_dcm", b"this is not an image, it is a note\n" * 10, "error")
    # -- video containers --
    frames = synthetic_frames(seed=5)
    avi = write_video(work / "src.avi", frames).read_bytes()
    mp4 = write_video(work / "src.mp4", frames, "mp4", "mpeg4").read_bytes()
    fast = write_video(work / "fast.mp4", synthetic_frames(seed=6), "mp4", "mpeg4",
                       {"movflags": "faststart"}).read_bytes()
    mdat = mp4.find(b"mdat")
    fmdat = fast.find(b"mdat")
    add("avi_zero_length", b"", "error", "zero.avi")  # same content as empty_file: see write_corpus
    add("avi_header_then_garbage", avi[:12] + rng.bytes(3000), "error", "garbage.avi")
    add("avi_header_only", avi[:avi.find(b"movi")], "error", "header_only.avi")
    add("mp4_header_then_garbage", mp4[:32] + rng.bytes(3000), "error", "garbage.mp4")
    add("mp4_cut_mid_mdat", mp4[:mdat + (len(mp4) - mdat) // 2], "error", "cut_mdat.mp4")
    add("mp4_faststart_cut_mid_mdat", fast[:fmdat + (len(fast) - fmdat) // 2], "either", "fast_cut.mp4")
    add("avi_cut_mid_stream", avi[: len(avi) * 2 // 3], "either", "cut_stream.avi")
    add("avi_frame_size_zero", patch_avi(avi, size=(0, 0)), "either", "zero_size.avi")
    add("avi_frame_count_lies_high", patch_avi(avi, frames=5000), "video", "count_high.avi")
    add("avi_frame_count_zero", patch_avi(avi, frames=0), "either", "count_zero.avi")
    add("avi_one_frame_of_another_size", resize_jpeg_frame(avi, 5, 32), "error", "mixed_sizes.avi")
    add("avi_one_frame", write_video(work / "one.avi", synthetic_frames(1, seed=7)).read_bytes(), "video",
        "one_frame.avi")
    add("avi_2x2_frames", write_video(work / "tiny.avi", synthetic_frames(3, 2, 2, seed=8)).read_bytes(),
        "either", "tiny.avi")
    add("mp4_no_video_stream", write_audio_only(work / "audio.mp4", "mp4", "aac").read_bytes(), "error",
        "audio_only.mp4")
    add("avi_no_video_stream", write_audio_only(work / "audio.avi", "avi", "pcm_s16le").read_bytes(), "error",
        "audio_only.avi")
    return out


def _absurd_regions(ds: Dataset) -> None:
    region = Dataset()
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 500, 400
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 3, 2
    region.RegionSpatialFormat, region.RegionDataType = 1, 1
    huge = Dataset()
    huge.RegionLocationMinX0, huge.RegionLocationMinY0 = 0, 0
    huge.RegionLocationMaxX1, huge.RegionLocationMaxY1 = 0xFFFFFFFF, 0xFFFFFFFF
    huge.RegionSpatialFormat, huge.RegionDataType = 1, 1
    ds.SequenceOfUltrasoundRegions = [region, huge]


def with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """The same data set under a file meta group that names another transfer syntax (the bytes lie)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = uid
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return data[:132] + fp.getvalue() + data[meta_end(data):]


def _headerless(real_dir: Path) -> bytes:
    ds = pydicom.dcmread(real_dir / MONO)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["headerless"])
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    data = buf.getvalue()
    assert data[:2] == b"\x08\x00", "a data set without preamble or file meta"
    return data


HOSTILE_NAMES: dict[str, bytes] = {
    "name_not_utf8": b"bad\xff\xfe.dcm",
    "name_rich_markup": b"[bold red]markup[/].dcm",
    "name_markup_close_tag_dir": b"a[/x].dcm",  # a folder "a[" holding "x].dcm"
    "name_ansi_escape": b"\x1b[31mred\x1b[0m.dcm",
    "name_newline": b"line\nbreak.dcm",
    "name_carriage_return_tab": b"cr\rtab\t.dcm",
    "name_250_bytes": b"L" * 246 + b".dcm",
    "name_leading_dash": b"-rf.dcm",
    "name_dot_dot": b"x..dcm",
    "name_dot_dot_slash_like": b"a..\\..\\evil.dcm",
    "name_percent_and_quotes": b"100% 'quoted' \"x\" $(echo).dcm",
    "name_unicode": "\u00e9cho \u5fc3\u810f \U0001f493.dcm".encode(),
}
HOSTILE_GOOD = {"name_not_utf8", "name_newline", "name_250_bytes", "name_leading_dash", "name_dot_dot",
                "name_unicode", "name_markup_close_tag_dir"}


def write_corpus(folder: Path, real_dir: Path, *, with_unreadable: bool | None = None) -> list[BadInput]:
    """Write every kind of bad input into ``folder`` (created); returns them, one :class:`BadInput` each.

    ``with_unreadable`` (default: unless running as root, where permissions do not bind) adds a file
    without read permission."""
    folder.mkdir(parents=True, exist_ok=True)
    work = folder.parent / f".{folder.name}-work"
    work.mkdir(exist_ok=True)
    inputs: list[BadInput] = []
    seen: dict[bytes, str] = {}

    def put(kind: str, rel: bytes, data: bytes, expect: Expect) -> None:
        if kind == "avi_zero_length":
            data = b""  # an empty file; the same content as ``empty_file``, so kept in its own folder
            rel = b"empty_avi/" + rel
        elif data in seen:
            raise AssertionError(f"{kind} has the same content as {seen[data]}")
        seen.setdefault(data, kind)
        path = Path(os.fsdecode(os.fsencode(folder) + b"/" + rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        inputs.append(BadInput(kind, path, expect))

    for kind, (name, data, expect) in corpus_bytes(real_dir, work).items():
        put(kind, name.encode(), data, expect)
    for kind, name in HOSTILE_NAMES.items():
        if kind in HOSTILE_GOOD:
            data = mutated(real_dir, MONO, kind, lambda ds: None)
            put(kind, name, data, "video")
        else:
            put(kind, name, f"not an image: {kind}\n".encode() * 20, "error")
    put("hidden_dot_file", b".hidden.dcm", b"a hidden file is skipped, never read\n" * 10, "skipped")
    # a folder named like a file: walked into, its file is an input like any other
    put("folder_named_like_a_file", b"folder.dcm/inner.dcm", (real_dir / MONO).read_bytes()[:3000], "error")
    # things that are not regular files
    fifo = folder / "pipe.dcm"
    os.mkfifo(fifo)
    inputs.append(BadInput("fifo", fifo, "error", hashed=False))
    loop = folder / "loop.dcm"
    loop.symlink_to("loop.dcm")
    inputs.append(BadInput("symlink_loop", loop, "error", hashed=False))
    pair_a, pair_b = folder / "loop_a.dcm", folder / "loop_b.dcm"
    pair_a.symlink_to("loop_b.dcm")
    pair_b.symlink_to("loop_a.dcm")
    inputs += [BadInput("symlink_loop_pair", pair_a, "error", hashed=False),
               BadInput("symlink_loop_pair", pair_b, "error", hashed=False)]
    dangling = folder / "dangling.dcm"
    dangling.symlink_to("no_such_target.dcm")
    inputs.append(BadInput("symlink_dangling", dangling, "error", hashed=False))
    (folder / "subdir_cycle").mkdir()
    (folder / "subdir_cycle" / "up").symlink_to("..")  # a folder cycle: walked once, no input of its own
    if with_unreadable is None:
        with_unreadable = os.geteuid() != 0
    if with_unreadable:
        locked = folder / "no_read_permission.dcm"
        locked.write_bytes(mutated(real_dir, MONO, "no_read_permission", lambda ds: None))
        locked.chmod(0)
        inputs.append(BadInput("no_read_permission", locked, "error", hashed=False))
    shutil.rmtree(work)
    return inputs


def write_manifest(base: Path) -> tuple[Path, list[BadInput]]:
    """An EchoNet-style manifest whose rows point outside its folder and to missing files (plus one good
    row); the manifest is a source of its own (a CSV inside a scanned folder is a sidecar, not an input)."""
    (base / "Videos").mkdir(parents=True, exist_ok=True)
    good = write_video(base / "Videos" / "present.avi", synthetic_frames(10, seed=21))
    write_video(base.parent / "outside.avi", synthetic_frames(10, seed=22))
    manifest = base / "FileList.csv"
    manifest.write_text("FileName,EF\npresent,60\n../../outside.avi,50\n/etc/passwd,40\nmissing_clip,30\n")
    videos = base / "Videos"
    return manifest, [
        BadInput("manifest_row_good", good, "video"),
        BadInput("manifest_row_outside_folder", videos / "../../outside.avi", "error", hashed=False),
        BadInput("manifest_row_absolute_outside", Path("/etc/passwd.avi"), "error", hashed=False),
        BadInput("manifest_row_missing_file", videos / "missing_clip.avi", "error", hashed=False),
    ]


def write_good_clips(folder: Path, real_dir: Path) -> list[Path]:
    """A few clips that must be indexed: two real echo DICOMs and synthetic AVI and MP4 clips."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "good_mono.dcm", folder / "good_jpeg.dcm"]
    shutil.copy(real_dir / MONO, paths[0])
    shutil.copy(real_dir / JPEG, paths[1])
    paths.append(write_video(folder / "good_clip.avi", synthetic_frames(16, seed=31)))
    paths.append(write_video(folder / "good_clip.mp4", synthetic_frames(16, seed=32), "mp4", "mpeg4"))
    return paths


def kinds(inputs: list[BadInput]) -> list[str]:
    """The distinct kinds of a corpus, in order."""
    return list(dict.fromkeys(i.kind for i in inputs))
