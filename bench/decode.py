"""Decode benchmark: model-ready frames per second, echosearch ingest vs the naive pydicom route.

Naive route: ``pydicom.dcmread(f).pixel_array`` (every frame, pydicom's own colour conversion), then a
per-frame ``cv2.resize`` of the frames the policy uses. echosearch route: ``ingest.process_file`` (header,
sampled-frame decode, sector detection, masking, crop, resize). Both in the same run, median of repeats.

    python bench/decode.py [--repeats 3] [--synthetic N]

Files: the multi-frame real DICOMs in ../shared/testdata/real-dicom and (when ``echosearch.synth`` is
available) a few synthetic-cohort files.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom

from echosearch.ingest.discover import inspect_file
from echosearch.ingest.frame_policy import resolve_frame_policy
from echosearch.ingest.prepare import FramePolicy, sample_indices
from echosearch.run.read import process_file

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "testdata" / "real-dicom"
REAL_FILES = [
    "ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm",
    "SonoSite_echo_A4C_30f_JPEG_small.dcm",
    "US-PAL-8-10x-echo_JPEGLS.dcm",
    "US-MONO2-8-8x-execho.dcm",
]


def naive(path: Path, policy: FramePolicy) -> np.ndarray:
    """The baseline: full pixel_array, then resize each used frame to the model size."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        arr = arr[None]
    if arr.ndim == 3:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    idx = sample_indices(arr.shape[0], policy)
    return np.stack(
        [cv2.resize(arr[i], (policy.size, policy.size), interpolation=cv2.INTER_AREA) for i in idx]
    )


def timed_pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, interleaved so that load changes on a shared machine hit both."""
    a(), b()  # warm-up (imports, file cache)
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def bench_file(path: Path, n_frames_policy: int | None, repeats: int) -> tuple[str, int, float, float] | None:
    rec = inspect_file(path)
    if rec.kind != "dicom":
        return None
    header = pydicom.dcmread(path, stop_before_pixels=True)
    n_total = int(header.get("NumberOfFrames", 1) or 1)
    ts = {"1.2.840.10008.1.2.1": "native", "1.2.840.10008.1.2.4.50": "JPEG", "1.2.840.10008.1.2.5": "RLE",
          "1.2.840.10008.1.2.4.80": "JPEG-LS"}.get(str(header.file_meta.TransferSyntaxUID), "other")
    n = n_frames_policy or n_total
    policy = resolve_frame_policy(None, setting="sector", n_frames=n, size=112)
    t_naive, t_ours = timed_pair(lambda: naive(path, policy), lambda: process_file(rec, policy), repeats)
    return f"{path.name[:32]} ({n_total}f, {ts})", n, n / t_naive, n / t_ours


def synthetic_files(tmp: Path, patients: int) -> list[Path]:
    try:
        from echosearch.synth import generate_cohort
    except ImportError:
        print("(echosearch.synth not available: synthetic files skipped)")
        return []
    generate_cohort(tmp, patients=patients, seed=0)
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and inspect_file(p).kind == "dicom")
    return files[:6]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--synthetic", type=int, default=2, help="synthetic patients to generate (0 = none)")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    files = [REAL / f for f in REAL_FILES if (REAL / f).is_file()]
    if not files:
        print(f"real DICOM corpus not found at {REAL}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            files += synthetic_files(Path(tmp), args.synthetic)
        print(f"{'file':<48} {'policy':>7} {'pydicom f/s':>12} {'echosearch f/s':>15} {'ratio':>7}")
        for policy_frames, label in ((16, "16"), (None, "all")):
            for f in files:
                row = bench_file(f, policy_frames, args.repeats)
                if row is None:
                    continue
                name, n, fps_naive, fps_ours = row
                print(
                    f"{name:<48} {label:>7} {fps_naive:>12.1f} {fps_ours:>15.1f} "
                    f"{fps_ours / fps_naive:>6.1f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
