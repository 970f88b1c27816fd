"""How far echosearch's CUDA numerics sit from EchoCLIP's published inference, on the same frames.

EchoCLIP's examples load the model with ``precision="bf16"`` (every weight cast to bf16); echosearch runs the
fp32 weights under bf16 autocast on CUDA and in fp32 on CPU. On the EchoCLIP architecture (ConvNeXt-Base,
224 px; random weights: the published ones cannot be downloaded here) and real echo frames, this prints the
cosine between the frame vectors of the three ways. A device check: needs CUDA (prints a note on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import open_clip

    from echosearch.ingest.decode import decode_video
    from echosearch.ingest.frame_policy import resolve_frame_policy
    from echosearch.ingest.prepare import sample_indices, sector_and_input

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(".devdata"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check compares CUDA numerics (bf16); nothing to measure here")
        return
    policy = resolve_frame_policy("echo-clip", setting="auto", n_frames=16)
    frames = []
    for f in sorted(a.data.glob("*.dcm")):
        try:
            d = decode_video(f, "dicom", lambda m: sample_indices(m.n_frames, policy))
            frames.append(sector_and_input(d.frames, d.meta.regions, policy)[0])
        except Exception as exc:  # noqa: BLE001 - a file this check cannot use is skipped
            print(f"skip {f.name}: {exc}")
    x = torch.from_numpy(np.concatenate(frames)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    x = ((x - mean) / std).cuda()
    torch.manual_seed(0)
    model = open_clip.create_model("convnext_base").cuda().eval()
    out = {}
    with torch.inference_mode():
        fp32 = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        pure = model.to(torch.bfloat16)
        bf16 = torch.nn.functional.normalize(pure.encode_image(x.to(torch.bfloat16)).float(), dim=-1)
    for name, (p, q) in {"autocast_vs_fp32": (auto, fp32), "pure_bf16_vs_fp32": (bf16, fp32),
                         "autocast_vs_pure_bf16": (auto, bf16)}.items():
        cos = (p * q).sum(-1).cpu().numpy()
        out[name] = {"frames": int(cos.size), "mean_cos": float(cos.mean()), "min_cos": float(cos.min())}
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
