"""Time the synthetic cohort generator: 100 patients x 3 visits x 2 views at size small (DICOM).

Run as ``python bench/synth.py [--patients N] [--workers W] [--format dicom|avi|both]``; prints files,
frames, wall seconds, frames per second and CPU seconds (wall time on a shared machine depends on its
load, which is printed too). The target is under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from echosearch.synth import generate_cohort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--visits", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--format", default="dicom", choices=("dicom", "avi", "both"))
    ap.add_argument("--size", default="small", choices=("small", "realistic"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        df = generate_cohort(tmp, patients=args.patients, seed=0, visits=(args.visits, args.visits),
                             views=("A4C", "PLAX"), fmt=args.format, size=args.size, workers=args.workers)
        dt = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    frames = int(df["n_frames"].sum())
    print(f"synth: {args.patients} patients x {args.visits} visits x 2 views, {args.size} {args.format}: "
          f"{df.height} files, {frames} frames, {size_mb:.0f} MB in {dt:.1f} s "
          f"({frames / dt:.0f} frames/s; {cpu:.1f} CPU-s; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, workers={args.workers or 'auto'})")


if __name__ == "__main__":
    main()
