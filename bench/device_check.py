"""GPU check for a lent device machine: bf16 encode throughput and the pipeline's decode -> encode core.

The device image has torch, timm and OpenCV but not duckdb, polars, faiss or PyAV, and a call carries at most
64 MiB, so this measures what the encode issue asks of a GPU without the catalog: (a) model-only frames/s of
the demo model and of the EchoCLIP architecture (ConvNeXt-Base 224 px, random weights; bf16 autocast on
CUDA), (b-core) ``ingest.iter_processed`` (decode + prepare in W worker processes, as ``index`` runs them) feeding
fixed-size batches to the model, and the decode workers alone (which of the two bounds the pipeline).
Input: the echo DICOMs of ``--data`` (the real files of shared/testdata), each copied ``--copies`` times.
Runs on CPU too (for a dry run here). One call, a few minutes (docs/encode.md, "GPU check")::

    make device-prep     # here: wheels into .whl/, echo DICOMs into .devdata/ (both git-ignored)
    # device run, carry [".whl", ".devdata"], the command printed by `make device-prep`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encode import model_only  # noqa: E402  (bench/encode.py's (a): vectors come back to the host)

from echosearch.ingest.discover import FileRecord  # noqa: E402
from echosearch.ingest.prepare import FramePolicy  # noqa: E402
from echosearch.model.encode import Encoder, load_encoder  # noqa: E402
from echosearch.model.models import write_model_folder  # noqa: E402
from echosearch.run.read import PreparedVideo  # noqa: E402
from echosearch.run.workers import iter_processed

ECHO_FILES = ("ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm", "SonoSite_echo_A4C_30f_JPEG_small.dcm",
              "Philips_EPIQ_echo_PLAX_JPEGLossless.dcm", "US-MONO2-8-8x-execho.dcm", "US-PAL-8-10x-echo_JPEGLS.dcm",
              "US-RGB-8-esopecho.dcm", "US1_J2KR.dcm")


def records(data: Path, copies: int, work: Path) -> list[FileRecord]:
    """Copies of the echo DICOMs as distinct inputs (explicit names and keys: discover would dedupe them)."""
    out = []
    for name in ECHO_FILES:
        src = data / name
        if not src.exists():
            continue
        for i in range(copies):
            dst = work / f"{i:04d}_{name}"
            shutil.copyfile(src, dst)
            out.append(FileRecord(dst, dst.stat().st_size, f"{name}-{i}", "dicom"))
    return out


def pipeline_core(enc: Encoder | None, policy: FramePolicy, recs: list[FileRecord], workers: int,
                  batch: int) -> dict[str, float]:
    """(b-core): decode + prepare in ``workers`` processes, frames of several videos per fixed-size batch
    (``enc`` None: the workers alone)."""
    pending: list[np.ndarray] = []
    n_frames = n_videos = n_failed = 0
    t0 = time.perf_counter()
    t_first, at_first = 0.0, 0  # after the first video: worker start-up excluded
    for item in iter_processed(recs, policy, workers, prefetch=4 * workers):
        if not t_first:
            t_first, at_first = time.perf_counter(), n_frames
        if not isinstance(item, PreparedVideo):
            n_failed += 1
            continue
        n_videos += 1
        pending.append(item.frames)
        if enc is not None and sum(len(p) for p in pending) >= batch:
            x = np.concatenate(pending)
            enc.encode_frames(x, batch_size=batch)
            n_frames += len(x)
            pending = []
        elif enc is None:
            n_frames += len(item.frames)
            pending = []
    if enc is not None and pending:
        x = np.concatenate(pending)
        enc.encode_frames(x, batch_size=batch)
        n_frames += len(x)
    t1 = time.perf_counter()
    steady = (n_frames - at_first) / (t1 - t_first) if t_first and t1 > t_first else float("nan")
    return {"frames_per_s": n_frames / (t1 - t0), "frames_per_s_after_first": steady, "videos": n_videos,
            "failed": n_failed, "seconds": t1 - t0}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(".devdata"))
    ap.add_argument("--copies", type=int, default=24)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20, help="batches in each model-only measurement")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": cuda, "cpus": os.cpu_count(), "workers": a.workers,
                            "gpu": torch.cuda.get_device_name(0) if cuda else None}
    try:
        import faiss

        info["faiss"] = f"{faiss.__version__}, GPUs {faiss.get_num_gpus()}"
    except ImportError:
        info["faiss"] = "not installed"
    print(json.dumps(info), flush=True)
    import open_clip

    results: dict[str, Any] = {"info": info}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = open_clip.get_model_config("convnext_base")
        torch.manual_seed(0)
        folder = write_model_folder(open_clip.CLIP(**cfg), cfg, Path(tmp) / "convnext_base",
                                    hints={"name": "echoclip-arch-random", "frame_policy": "echoclip"})
        encoders = {label: load_encoder(name, device="auto", frames_per_video=a.frames) for label, name in
                    (("echosearch-demo", "echosearch-demo"), ("convnext_base", f"local-dir:{folder}"))}
        work = Path(tmp) / "data"
        work.mkdir()
        recs = records(a.data, a.copies, work)
        print(f"{len(recs)} input files from {a.data}", flush=True)
        decode = pipeline_core(None, encoders["echosearch-demo"].policy, recs, a.workers, a.batch) if recs else {}
        print(f"decode + prepare alone ({a.workers} workers, demo policy): {decode}", flush=True)
        results["decode_only"] = decode
        for label, enc in encoders.items():
            row: dict[str, Any] = {}
            for b in sorted({64, a.batch}):
                row[f"model_only_fps_batch{b}"] = model_only(enc, b * a.rounds, b)
            if recs:
                row["pipeline_core"] = pipeline_core(enc, enc.policy, recs, a.workers, a.batch)
                row["core_vs_model"] = row["pipeline_core"]["frames_per_s"] / row[f"model_only_fps_batch{a.batch}"]
            results[label] = row
            print(f"{label} ({enc.device}, {'bf16 autocast' if enc.device.type == 'cuda' else 'fp32'}): "
                  + json.dumps(row, default=lambda v: round(v, 3) if isinstance(v, float) else v), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
