"""Encode benchmark: (a) model-only throughput, (b) the full ``index`` pipeline, (c) a per-video loop in the
style of EchoCLIP's example code — same machine, same run, same frames per video. Prints ratios.

Targets: (b) >= 0.9 x (a) for the demo model and the EchoCLIP architecture; (b) >= 2 x (c) for the demo model.

(c) follows the example: the whole file is decoded and *every* frame goes through the PIL/torchvision
transform before the frames to encode are taken (EchoCLIP's example strides the preprocessed stack).
(c-sel) is a kinder loop that transforms only the frames it encodes; both are printed. Each model runs on
two cohorts: ``small`` (192x256-320x240, ~21 frames a clip: the test cohorts) and ``realistic``
(480x640-768x1024 at 30-60 fps, 40-64 frames: what a PACS export holds).

    python bench/encode.py [--patients 12] [--frames 16] [--sizes small,realistic] [--skip-convnext]
    python bench/encode.py --identity   # (b) without and with the demo model's identity head (target <= 1.25x)
    python bench/encode.py --identity --identity-model DIR   # ... with another identity model (e.g. a tower)
    python bench/encode.py --cycle   # (b) without and with cycle vectors (and with identity + cycle vectors)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def model_only(enc, n_frames_total: int, batch: int) -> float:  # type: ignore[no-untyped-def]
    """(a) frames/s of encode_frames on pre-made uint8 tensors."""
    frames = np.random.default_rng(0).integers(0, 255, (batch, enc.image_size, enc.image_size, 3), dtype=np.uint8)
    enc.encode_frames(frames[:2])  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < n_frames_total:
        enc.encode_frames(frames, batch_size=batch)
        done += batch
    return done / (time.perf_counter() - t0)


def full_pipeline(enc, cohort: Path, frames: int, batch: int, workers: int,  # type: ignore[no-untyped-def]
                  identity_model: str | None = None, cycle_vectors: bool = False) -> tuple[float, int, Any]:
    """(b) frames/s of the whole index run (decode + prepare + encode + catalog + vector index), end to end;
    the summary also carries the steady rate (first to last committed batch) and the fixed stage costs."""
    from echosearch.config import load_settings
    from echosearch.run.local import index_sources

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(mode="demo", frames_per_video=frames, batch_size=batch, workers=workers,
                                 identity_model=identity_model, cycle_vectors=cycle_vectors)
        t0 = time.perf_counter()
        s = index_sources([cohort], Path(tmp) / "idx", settings, encoder=enc, progress=False)
        return s.frames_encoded / (time.perf_counter() - t0), s.videos_encoded, s


def per_video_loop(enc, paths: list[Path], frames: int, every_frame: bool = True) -> float:  # type: ignore[no-untyped-def]
    """(c) EchoCLIP-example style: read the whole video, PIL/torchvision per frame (every frame, as the
    example does, or with ``every_frame=False`` only the encoded ones), one video per forward."""
    import pydicom
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(enc.image_size), transforms.CenterCrop(enc.image_size),
                             transforms.ToTensor(), transforms.Normalize(enc.mean, enc.std)])
    done, t0 = 0, time.perf_counter()
    for p in paths:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array
        if ds.PhotometricInterpretation.startswith("YBR"):
            arr = pydicom.pixels.convert_color_space(arr, ds.PhotometricInterpretation, "RGB")
        if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        idx = np.linspace(0, len(arr) - 1, frames).round().astype(int)
        if every_frame:
            x = torch.stack([tf(Image.fromarray(f)) for f in arr])[torch.from_numpy(idx)]
        else:
            x = torch.stack([tf(Image.fromarray(arr[i])) for i in idx])
        with torch.inference_mode():
            enc.model.encode_image(x)
        done += frames
    return done / (time.perf_counter() - t0)


def run_model(enc, label: str, paths: list[Path], cohort: Path, tmp: Path, a: argparse.Namespace) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """(a), (b), (c) and (c-sel) for one model on one cohort; prints one line."""
    slow = label != "echosearch-demo"
    sub = paths[: max(4, len(paths) // 6)] if slow else paths
    sub_cohort = cohort
    if slow:  # keep the slow model's pipeline run short: index a subset folder
        sub_cohort = tmp / "subset"
        sub_cohort.mkdir(exist_ok=True)
        for p in sub:  # copies: discover follows no symlink out of a source tree
            shutil.copy2(p, sub_cohort / f"{p.parent.name}_{p.name}")
    fa = model_only(enc, a.frames * min(len(sub), 24), a.batch)
    fb, nv, summ = full_pipeline(enc, sub_cohort, a.frames, a.batch, a.workers)
    fs = summ.steady_frames_per_s or float("nan")
    fc = per_video_loop(enc, sub, a.frames, every_frame=True)
    fcs = per_video_loop(enc, sub, a.frames, every_frame=False)
    print(f"{label}: (a) model-only {fa:.1f} frames/s | (b) pipeline {fb:.1f} frames/s end to end, "
          f"{fs:.1f} steady ({nv} videos; stage seconds {summ.stage_seconds}) | "
          f"(c) per-video loop {fc:.1f} frames/s, (c-sel) {fcs:.1f} | b/a = {fb / fa:.2f} end to end, "
          f"{fs / fa:.2f} steady (target >= 0.9) | b/c = {fb / fc:.2f} end to end, {fs / fc:.2f} steady "
          f"(target >= 2 for the demo model); against (c-sel) {fb / fcs:.2f}", flush=True)
    return {"model_only_fps": fa, "pipeline_fps": fb, "pipeline_steady_fps": fs, "per_video_loop_fps": fc,
            "per_video_loop_selected_fps": fcs, "pipeline_vs_model": fb / fa, "steady_vs_model": fs / fa,
            "pipeline_vs_loop": fb / fc, "steady_vs_loop": fs / fc, "pipeline_vs_loop_selected": fb / fcs,
            "videos": nv, "stage_seconds": summ.stage_seconds}


def demo_rates(a: argparse.Namespace, runs: dict[str, tuple[str, bool]], repeats: int = 3) -> dict[str, float]:
    """(b) frames/s of the demo model per run (name -> (identity model spec or "none", cycle vectors)) on one
    cohort: the median of ``repeats`` alternating runs, after a warm-up (caches, lazy imports)."""
    from echosearch.model.encode import load_encoder
    from echosearch.synth import generate_cohort

    enc = load_encoder("echosearch-demo", device="auto", frames_per_video=a.frames)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        generate_cohort(cohort, patients=a.patients, seed=77, visits=(1, 2), views=("A4C", "PLAX"))
        full_pipeline(enc, cohort, a.frames, a.batch, a.workers, "none")
        rates: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, (ident, cyc) in runs.items():
                rates[name].append(full_pipeline(enc, cohort, a.frames, a.batch, a.workers, ident, cyc)[0])
    return {k: float(np.median(v)) for k, v in rates.items()}


def identity_overhead(a: argparse.Namespace, repeats: int = 3) -> float:
    """(b) for the demo model with identity vectors from its shipped identity model (or ``--identity-model``)
    against without: time ratio (a head runs on the content frame vectors, an identity tower on the content
    encoder's early-stage activations plus its own last stages)."""
    from echosearch.identity.model import demo_identity_head

    head = Path(a.identity_model) if a.identity_model else demo_identity_head()
    if head is None:
        raise SystemExit("the demo model has no shipped identity model")
    rates = demo_rates(a, {"none": ("none", False), "with": (str(head), False)}, repeats)
    ratio = rates["none"] / rates["with"]
    print(f"(b) demo model: {rates['none']:.1f} frames/s without identity vectors, {rates['with']:.1f} with "
          f"{head.name}: indexing time x{ratio:.3f} (target <= 1.25)", flush=True)
    return ratio


def cycle_overhead(a: argparse.Namespace, repeats: int = 3) -> None:
    """(b) for the demo model without extras, with cycle vectors, and with its identity map + cycle vectors
    (both read the content encoder's split activations from its tap): time ratios against without."""
    from echosearch.identity.model import demo_identity_head

    head = demo_identity_head()
    runs = {"neither": ("none", False), "cycle vectors": ("none", True)}
    if head is not None:
        runs["identity map"] = (str(head), False)
        runs["identity map + cycle vectors"] = (str(head), True)
    rates = demo_rates(a, runs, repeats)
    for name, rate in rates.items():
        print(f"(b) demo model, {name}: {rate:.1f} frames/s, indexing time x{rates['neither'] / rate:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=12)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--skip-convnext", action="store_true")
    ap.add_argument("--sizes", default="small,realistic", help="cohort sizes to run, comma-separated")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--identity", action="store_true",
                    help="only (b) for the demo model without and with its shipped identity head (target: <= 1.25x)")
    ap.add_argument("--identity-model", help="with --identity: this identity model folder instead of the shipped one")
    ap.add_argument("--cycle", action="store_true", help="only (b) for the demo model without and with cycle vectors")
    a = ap.parse_args()
    os.environ.setdefault("ECHOSEARCH_SECRET", "bench-secret-0123456789")
    from echosearch.model.encode import load_encoder
    from echosearch.model.models import write_model_folder
    from echosearch.synth import generate_cohort

    results: dict[str, dict[str, Any]] = {}
    if a.identity:
        identity_overhead(a)
        return
    if a.cycle:
        cycle_overhead(a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        models = {"echosearch-demo": "echosearch-demo"}
        if not a.skip_convnext:
            import open_clip

            cfg = open_clip.get_model_config("convnext_base")
            torch.manual_seed(0)
            folder = write_model_folder(open_clip.CLIP(**cfg), cfg, Path(tmp) / "convnext_base",
                                        hints={"name": "echoclip-arch-random", "frame_policy": "echoclip"})
            models["convnext_base (EchoCLIP arch, random)"] = f"local-dir:{folder}"
        encoders = {label: load_encoder(name, device="auto", frames_per_video=a.frames) for label, name in models.items()}
        for size in a.sizes.split(","):
            cohort = Path(tmp) / f"cohort-{size}"
            truth = generate_cohort(cohort, patients=a.patients, seed=77, visits=(1, 2), views=("A4C", "PLAX"),
                                    size=size)  # type: ignore[arg-type]
            paths = [cohort / p for p in truth["path"]]
            nf, hs, ws = (truth[c].to_list() for c in ("n_frames", "height", "width"))
            print(f"[{size}] {len(paths)} videos, {min(nf)}-{max(nf)} frames of {min(hs)}x{min(ws)}-{max(hs)}x{max(ws)}",
                  flush=True)
            for label, enc in encoders.items():  # loaded once for both cohorts
                results[f"{label} [{size}]"] = run_model(enc, label, paths, cohort, Path(tmp), a)
                shutil.rmtree(Path(tmp) / "subset", ignore_errors=True)
            shutil.rmtree(cohort, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
