"""Decode stage: real vendor DICOMs, every transfer syntax / photometric we promise, and refusals."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from conftest import REAL_DICOM
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

import echosearch.ingest.decode as decode_mod
from echosearch.errors import DecodeError, NotUltrasoundError, ReportObjectFound
from echosearch.ingest.decode import decode_video, read_meta

REAL = REAL_DICOM

# file -> (frames, rows, cols, lossy JPEG?)  (from the corpus README)
ULTRASOUND = {
    "SonoSite_echo_A4C_30f_JPEG_small.dcm": (30, 240, 320, True),
    "ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm": (65, 456, 576, True),
    "US-PAL-8-10x-echo_JPEGLS.dcm": (10, 430, 600, False),
    "US-MONO2-8-8x-execho.dcm": (8, 120, 128, False),
    "US-RGB-8-esopecho.dcm": (1, 120, 256, False),
    "Philips_EPIQ_echo_PLAX_JPEGLossless.dcm": (1, 768, 1024, False),
    "US1_J2KR.dcm": (1, 480, 640, False),
    "Acuson_thyroid_YBR_FULL_RLE.dcm": (1, 480, 640, False),
    "Philips_iU22_abdomen_JPEGLS.dcm": (1, 768, 1024, False),
}
NOT_ULTRASOUND = {
    "wrong_CT_small.dcm": "modality CT",
    "wrong_MR_multiframe_emri_small.dcm": "modality MR",
    "wrong_XA_cine_96f_JPEG.dcm": "modality XA",
    "wrong_ECG_waveform_no_pixels.dcm": "modality ECG",
}


def real(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"real DICOM corpus not found at {REAL} (needs ../shared/testdata/real-dicom)")
    return path


def pydicom_rgb(path: Path) -> np.ndarray:
    """pydicom's own conversion to (T,H,W,3) RGB: pixel_array (+ palette LUT), grey replicated."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        arr = (arr >> 8).astype(np.uint8) if arr.dtype != np.uint8 else arr
    if frames == 1:
        arr = arr[None]
    if arr.ndim == 3:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr


@pytest.mark.parametrize("name", sorted(ULTRASOUND))
def test_real_ultrasound_decodes_like_pydicom(name: str) -> None:
    path = real(name)
    n, rows, cols, lossy = ULTRASOUND[name]
    dec = decode_video(path, "dicom")
    assert dec.frames.shape == (n, rows, cols, 3) and dec.frames.dtype == np.uint8
    assert dec.meta.n_frames == n and (dec.meta.height, dec.meta.width) == (rows, cols)
    assert list(dec.frame_indices) == list(range(n))
    ref = pydicom_rgb(path)
    diff = np.abs(ref.astype(np.int16) - dec.frames)
    if lossy:  # libjpeg-turbo vs pydicom's JPEG decoder: rounding of the YCbCr->RGB conversion
        assert diff.max() <= 10 and diff.mean() < 0.2
    else:
        assert diff.max() == 0
    assert dec.meta.study_uid and dec.meta.sop_uid


@pytest.mark.parametrize("name", sorted(NOT_ULTRASOUND))
def test_non_ultrasound_refused_with_reason(name: str) -> None:
    path = real(name)
    with pytest.raises(NotUltrasoundError) as info:
        decode_video(path, "dicom")
    assert NOT_ULTRASOUND[name] in info.value.reason and "not an ultrasound object" in info.value.reason
    with pytest.raises(NotUltrasoundError):
        read_meta(path, "dicom")


@pytest.mark.parametrize(
    "name",
    [
        "ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm",
        "SonoSite_echo_A4C_30f_JPEG_small.dcm",
        "US-PAL-8-10x-echo_JPEGLS.dcm",
        "US-MONO2-8-8x-execho.dcm",
    ],
)
def test_sampled_frames_equal_full_decode(name: str) -> None:
    path = real(name)
    full = decode_video(path, "dicom")
    idx = [0, 3, 3, full.meta.n_frames - 1, 1]
    part = decode_video(path, "dicom", idx)
    assert list(part.frame_indices) == idx
    np.testing.assert_array_equal(part.frames, full.frames[idx])


def test_frames_picked_from_the_header_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pick function sees the header's metadata and gets what explicit indices get; ingesting a file reads
    its header once."""
    from echosearch.ingest.discover import inspect_file
    from echosearch.ingest.prepare import FramePolicy
    from echosearch.run.read import process_file

    path = real("SonoSite_echo_A4C_30f_JPEG_small.dcm")
    expected = decode_video(path, "dicom", [29, 0, 0])
    got = decode_video(path, "dicom", lambda meta: [meta.n_frames - 1, 0, 0])
    assert list(got.frame_indices) == [29, 0, 0]
    np.testing.assert_array_equal(got.frames, expected.frames)
    record = inspect_file(path)
    reads = []
    real_read = decode_mod._read_header
    monkeypatch.setattr(decode_mod, "_read_header", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    prepared = process_file(record, FramePolicy("sector", 8, 112))
    assert len(reads) == 1 and prepared.frames.shape == (8, 112, 112, 3)


def test_real_metadata() -> None:
    meta = read_meta(real("SonoSite_echo_A4C_30f_JPEG_small.dcm"), "dicom")
    assert meta.fps == pytest.approx(30.0, rel=1e-3) and not meta.fps_default
    assert meta.manufacturer and meta.manufacturer.startswith("SonoSite")
    assert meta.photometric == "YBR_FULL_422" and meta.transfer_syntax == JPEGBaseline8Bit
    assert meta.study_date is not None and meta.study_date.year == 2016
    acuson = read_meta(real("ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm"), "dicom")
    assert [r.spatial_format for r in acuson.regions] == [0, 1]
    single = read_meta(real("US-RGB-8-esopecho.dcm"), "dicom")
    assert single.n_frames == 1 and single.fps == 30.0 and single.fps_default


# ---- synthetic DICOMs for the syntaxes/photometrics the corpus lacks -------------------------------------
def us_dataset(arr: np.ndarray, pi: str, ts: str = ExplicitVRLittleEndian, planar: int = 0) -> Dataset:
    """A minimal US multi-frame data set holding ``arr`` (T,H,W[,3]) as native pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.Modality, ds.PatientID, ds.FrameTime = "US", "PAT-1", "40"
    t, h, w = arr.shape[:3]
    ds.NumberOfFrames, ds.Rows, ds.Columns = t, h, w
    ds.SamplesPerPixel = 3 if arr.ndim == 4 else 1
    ds.PhotometricInterpretation = pi
    if arr.ndim == 4:
        ds.PlanarConfiguration = planar
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    data = arr.transpose(0, 3, 1, 2) if (arr.ndim == 4 and planar) else arr
    if ts == ExplicitVRBigEndian and bits == 16:
        data = data.byteswap()
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ts = ds.file_meta.TransferSyntaxUID
    ds.save_as(
        path,
        implicit_vr=ts == ImplicitVRLittleEndian,
        little_endian=ts != ExplicitVRBigEndian,
        enforce_file_format=True,
    )
    return path


@pytest.fixture
def rgb_clip() -> np.ndarray:
    rng = np.random.default_rng(1)
    base = cv2.resize(
        rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (48, 32), interpolation=cv2.INTER_LINEAR
    )
    return np.stack([np.roll(base, i, axis=1) for i in range(5)])


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("planar", [0, 1])
def test_native_rgb_both_planar_configs_and_byte_orders(
    tmp_path: Path, rgb_clip: np.ndarray, ts: str, planar: int
) -> None:
    path = save(us_dataset(rgb_clip, "RGB", ts, planar), tmp_path / "x.dcm")
    dec = decode_video(path, "dicom")
    np.testing.assert_array_equal(dec.frames, rgb_clip)
    assert dec.meta.fps == pytest.approx(25.0)


def test_monochrome1_is_inverted(tmp_path: Path, rgb_clip: np.ndarray) -> None:
    grey = rgb_clip[..., 0]
    dec = decode_video(save(us_dataset(grey, "MONOCHROME1"), tmp_path / "m1.dcm"), "dicom")
    np.testing.assert_array_equal(dec.frames[..., 1], 255 - grey)


def test_sixteen_bit_big_endian_is_windowed(tmp_path: Path) -> None:
    arr = np.arange(4 * 16 * 16, dtype=np.uint16).reshape(4, 16, 16) * 4  # 0..4092
    ds = us_dataset(arr, "MONOCHROME2", ExplicitVRBigEndian)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    dec = decode_video(save(ds, tmp_path / "w16.dcm"), "dicom", [0, 3])
    out = dec.frames[..., 0].astype(int)
    assert out.min() <= 1 and out.max() >= 253
    assert np.all(np.diff(out.reshape(-1)) >= 0)  # monotone mapping of a monotone ramp


def test_ybr_full_native_converted_to_rgb(tmp_path: Path, rgb_clip: np.ndarray) -> None:
    ybr = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in rgb_clip])
    dec = decode_video(save(us_dataset(ybr, "YBR_FULL"), tmp_path / "ybr.dcm"), "dicom")
    assert np.abs(dec.frames.astype(int) - rgb_clip).max() <= 2


@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless])
def test_lossless_compressed_grey_and_rgb(tmp_path: Path, rgb_clip: np.ndarray, ts: str) -> None:
    for pi, arr in (("MONOCHROME2", rgb_clip[..., 1]), ("RGB", rgb_clip)):
        ds = us_dataset(arr, pi)
        ds.compress(ts, arr, encoding_plugin="pylibjpeg" if ts == JPEG2000Lossless else "")
        dec = decode_video(save(ds, tmp_path / f"{pi}.dcm"), "dicom", [4, 1])
        expect = arr[[4, 1]] if arr.ndim == 4 else np.repeat(arr[[4, 1], ..., None], 3, -1)
        np.testing.assert_array_equal(dec.frames, expect)


def test_rle_is_decoded_by_the_compiled_plugin() -> None:
    """RLE Lossless is a common ultrasound export; pydicom's own RLE decoder is pure Python (~10x slower,
    measured 2.1 -> 1.4 ms per prepared frame on the synthetic cohort), so the pylibjpeg-rle plugin is a
    dependency and must be what pydicom picks up."""
    from pydicom.pixels.decoders import RLELosslessDecoder

    assert "pylibjpeg" in RLELosslessDecoder.available_plugins, RLELosslessDecoder.available_plugins
    order = list(RLELosslessDecoder._available)  # pydicom (3.x, pinned < 4) tries plugins in this order
    assert order[0] == "pylibjpeg", order


def jpeg_dataset(rgb: np.ndarray) -> Dataset:
    """JPEG baseline YBR_FULL_422 multi-frame, frames encoded with OpenCV (pydicom cannot encode JPEG)."""
    ds = us_dataset(rgb, "YBR_FULL_422", JPEGBaseline8Bit)
    frames = [
        cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        for f in rgb
    ]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    return ds


def test_jpeg_baseline_fast_path_matches_pydicom(tmp_path: Path, rgb_clip: np.ndarray) -> None:
    path = save(jpeg_dataset(rgb_clip), tmp_path / "jpeg.dcm")
    dec = decode_video(path, "dicom", [2, 0])
    ref = pydicom.dcmread(path).pixel_array[[2, 0]]
    diff = np.abs(dec.frames.astype(int) - ref)  # chroma upsampling differs slightly between decoders
    assert diff.max() <= 16 and diff.mean() < 1
    assert np.abs(dec.frames.astype(int) - rgb_clip[[2, 0]]).mean() < 6


def test_report_object_and_other_refusals(tmp_path: Path, rgb_clip: np.ndarray) -> None:
    sr = us_dataset(rgb_clip[..., 0], "MONOCHROME2")
    sr.SOPClassUID, sr.Modality = "1.2.840.10008.5.1.4.1.1.88.11", "SR"
    with pytest.raises(ReportObjectFound):
        read_meta(save(sr, tmp_path / "sr.dcm"), "dicom")
    no_pixels = us_dataset(rgb_clip[..., 0], "MONOCHROME2")
    del no_pixels.PixelData
    with pytest.raises(NotUltrasoundError, match="no pixel data"):
        decode_video(save(no_pixels, tmp_path / "np.dcm"), "dicom")
    zero = us_dataset(rgb_clip[..., 0], "MONOCHROME2")
    zero.NumberOfFrames = 0
    with pytest.raises(DecodeError, match="0 frames"):
        decode_video(save(zero, tmp_path / "zero.dcm"), "dicom")


def test_headerless_dicom(tmp_path: Path, rgb_clip: np.ndarray) -> None:
    """A data set written without preamble or file meta (old archives) still decodes."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = us_dataset(rgb_clip[..., 2], "MONOCHROME2", ImplicitVRLittleEndian)
    ds.file_meta = FileMetaDataset()
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    path = tmp_path / "raw.bin"
    path.write_bytes(buf.getvalue())
    dec = decode_video(path, "dicom", [0])
    np.testing.assert_array_equal(dec.frames[0, ..., 0], rgb_clip[0, ..., 2])


# ---- AVI / MP4 --------------------------------------------------------------------------------------------
def write_video(path: Path, frames: np.ndarray, fourcc: str = "MJPG", fps: float = 50.0) -> Path:
    h, w = frames.shape[1:3]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


@pytest.mark.parametrize(("suffix", "fourcc", "kind"), [(".avi", "MJPG", "avi"), (".mp4", "mp4v", "mp4")])
def test_video_containers(tmp_path: Path, suffix: str, fourcc: str, kind: str) -> None:
    rng = np.random.default_rng(3)
    clip = np.stack(
        [
            cv2.resize(
                rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (64, 48), interpolation=cv2.INTER_LINEAR
            )
            for _ in range(12)
        ]
    )
    path = write_video(tmp_path / f"clip{suffix}", clip, fourcc)
    meta = read_meta(path, kind)
    assert (meta.n_frames, meta.height, meta.width) == (12, 48, 64) and meta.fps == pytest.approx(50.0)
    full = decode_video(path, kind)
    assert full.frames.shape == (12, 48, 64, 3)
    assert np.abs(full.frames.astype(int) - clip).mean() < 12  # lossy codecs
    part = decode_video(path, kind, [1, 5, 5, 11])
    np.testing.assert_array_equal(part.frames, full.frames[[1, 5, 5, 11]])
    picked = decode_video(path, kind, lambda m: [1, 5, 5, m.n_frames - 1])
    np.testing.assert_array_equal(picked.frames, part.frames)


def test_corrupt_video_container(tmp_path: Path) -> None:
    path = tmp_path / "bad.avi"
    path.write_bytes(b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(200))
    with pytest.raises(DecodeError):
        decode_video(path, "avi")


def test_pyav_is_needed_only_for_video_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PyAV a DICOM still decodes and an AVI is refused with one line naming the missing package."""
    import sys

    clip = np.full((6, 48, 64, 3), 90, np.uint8)
    path = write_video(tmp_path / "clip.avi", clip, "MJPG")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(DecodeError, match="needs PyAV"):
        decode_video(path, "avi")
    echo = REAL / "ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm"
    if not echo.exists():
        pytest.skip("real DICOM test data not found")
    assert decode_video(echo, "dicom", [0, 64]).frames.shape == (2, 456, 576, 3)


def ybr_full_422_bytes(rgb: np.ndarray) -> bytes:
    """Native YBR_FULL_422 as the standard packs it: per horizontal pixel pair Y0 Y1 Cb Cr (2 bytes a pixel)."""
    ybr = np.stack([convert_color_space(f, "RGB", "YBR_FULL") for f in rgb]).astype(np.float64)
    y = ybr[..., 0]
    cb = (ybr[..., 0::2, 1] + ybr[..., 1::2, 1]) / 2
    cr = (ybr[..., 0::2, 2] + ybr[..., 1::2, 2]) / 2
    packed = np.stack([y[..., 0::2], y[..., 1::2], cb, cr], axis=-1)
    return np.clip(np.round(packed), 0, 255).astype(np.uint8).tobytes()


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_ybr_full_422_native_is_two_bytes_a_pixel(tmp_path: Path, rgb_clip: np.ndarray, ts: str) -> None:
    # colour shared by each pixel pair (what 4:2:2 keeps), brightness that differs within a pair (adding the
    # same value to R, G and B changes Y only), so that the right decoding gives the clip back exactly
    pairs = np.repeat(np.clip(rgb_clip[:, :, ::2].astype(int), 30, 225), 2, axis=2)
    smooth = (pairs + np.where(np.arange(rgb_clip.shape[2]) % 2, 20, -20)[None, None, :, None]).astype(np.uint8)
    ds = us_dataset(smooth, "YBR_FULL_422", ts)
    ds.PixelData = ybr_full_422_bytes(smooth)
    assert len(ds.PixelData) == smooth[..., 0].size * 2
    path = save(ds, tmp_path / "ybr422.dcm")
    dec = decode_video(path, "dicom", [3, 0])
    err = np.abs(dec.frames.astype(int) - smooth[[3, 0]])
    assert err.max() <= 3 and err.mean() < 1
    full = decode_video(path, "dicom")
    assert full.frames.shape == smooth.shape and np.abs(full.frames.astype(int) - smooth).max() <= 3
    short = pydicom.dcmread(path)
    short.PixelData = short.PixelData[: len(short.PixelData) // 2]
    with pytest.raises(DecodeError, match="truncated"):
        decode_video(save(short, tmp_path / "short422.dcm"), "dicom")


@pytest.mark.parametrize(("drop", "pi", "reason"), [
    ("Rows", "RGB", "Rows/Columns missing"),
    ("Columns", "MONOCHROME2", "Rows/Columns missing"),
    ("PixelData", "RGB", "no pixel data"),
    ("PhotometricInterpretation", "RGB", "missing required DICOM attribute Photometric Interpretation (0028,0004)"),
    ("BitsAllocated", "MONOCHROME2", "missing required DICOM attribute Bits Allocated (0028,0100)"),
    ("SamplesPerPixel", "RGB", "missing required DICOM attribute Samples per Pixel (0028,0002)"),
    ("RedPaletteColorLookupTableDescriptor", "PALETTE COLOR",
     "missing required DICOM attribute Red Palette Color Lookup Table Descriptor (0028,1101)"),
])
def test_missing_attributes_give_reasons_a_person_can_act_on(
    tmp_path: Path, rgb_clip: np.ndarray, drop: str, pi: str, reason: str
) -> None:
    from echosearch.ingest.discover import inspect_file
    from echosearch.ingest.prepare import FramePolicy
    from echosearch.run.read import FailedFile, safe_process

    ds = us_dataset(rgb_clip if pi == "RGB" else rgb_clip[..., 0], pi)
    if pi == "PALETTE COLOR":
        ds.RedPaletteColorLookupTableDescriptor = ds.GreenPaletteColorLookupTableDescriptor = [256, 0, 8]
        ds.BluePaletteColorLookupTableDescriptor = [256, 0, 8]
        ds.RedPaletteColorLookupTableData = ds.GreenPaletteColorLookupTableData = bytes(range(256))
        ds.BluePaletteColorLookupTableData = bytes(range(256))
    del ds[drop]
    if "PixelData" in ds:
        ds["PixelData"].VR = "OB"  # no BitsAllocated to derive it from
    failed = safe_process(inspect_file(save(ds, tmp_path / "x.dcm")), FramePolicy(n_frames=2))
    assert isinstance(failed, FailedFile) and reason in failed.reason, failed.reason
    assert not failed.reason.startswith(("AttributeError", "KeyError", "unexpected", "pixel data could not"))
    if failed.reason.startswith("missing required"):
        assert failed.reason.endswith("]") and "[AttributeError: " in failed.reason  # the detail stays, at the end


def test_unforeseen_exceptions_keep_context_then_detail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import echosearch.run.read as ingest
    from echosearch.ingest.discover import FileRecord
    from echosearch.ingest.prepare import FramePolicy

    rec = FileRecord(tmp_path / "x.dcm", 1, "0" * 64, "dicom")
    monkeypatch.setattr(ingest, "process_file", lambda *_: (_ for _ in ()).throw(
        AttributeError("'FileDataset' object has no attribute 'SeriesInstanceUID'")))
    reason = ingest.safe_process(rec, FramePolicy(n_frames=2)).reason  # type: ignore[union-attr]
    assert reason.startswith("missing required DICOM attribute Series Instance UID (0020,000E)")
    monkeypatch.setattr(ingest, "process_file", lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    reason = ingest.safe_process(rec, FramePolicy(n_frames=2)).reason  # type: ignore[union-attr]
    assert reason == "unexpected error while reading this file (a bug: please report it) [RuntimeError: boom]"
