"""Model registry and loading: where the weights of a named model come from, never downloading implicitly.

Sources, in the order they are tried for a registry name:
- the shipped ``echosearch-demo`` folder inside the package;
- the Hugging Face cache (offline) for ``echo-clip`` / ``echo-clip-r``;
a ``local-dir:DIR`` folder in open_clip's format (``open_clip_config.json`` + weights); or a weights file
(``.bin``/``.pt``/``.pth``/``.safetensors``) with an architecture (``ARCH@PATH``, default EchoCLIP's).
Downloading happens only in :func:`fetch_model` (``echosearch model fetch``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echosearch.errors import ModelLoadError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEMO_MODEL_DIR = DATA_DIR / "echosearch-demo"
WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to find a named model and how it was trained to see frames."""

    name: str
    description: str
    hf_repo: str | None = None
    local_dir: Path | None = None
    arch: str = "convnext_base"
    frame_policy: str = "sector"
    tokenizer: str = "clip"  # "clip" (BPE) or "template" (EchoCLIP-R report-phrase tokenizer)
    extra: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {
    "echosearch-demo": ModelSpec(
        name="echosearch-demo",
        description="Small CLIP trained by this project on its synthetic cohort (ships with the package).",
        local_dir=DEMO_MODEL_DIR,
        arch="echosearch-demo",
        frame_policy="sector",
    ),
    "echo-clip": ModelSpec(
        name="echo-clip",
        description="EchoCLIP (ConvNeXt-Base, 512-d, 224 px); weights under the authors' licence.",
        hf_repo="mkaichristensen/echo-clip",
        frame_policy="echoclip",
    ),
    "echo-clip-r": ModelSpec(
        name="echo-clip-r",
        description="EchoCLIP-R (template tokenizer over report phrases; vocabulary supplied by the user).",
        hf_repo="mkaichristensen/echo-clip-r",
        frame_policy="echoclip",
        tokenizer="template",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the open_clip name to load, the weights file, and the registry spec."""

    name: str
    open_clip_name: str
    weights: Path | None
    spec: ModelSpec
    folder: Path | None = None


def _find_weights(folder: Path) -> Path | None:
    for n in WEIGHT_NAMES:
        if (folder / n).is_file():
            return folder / n
    return None


def _hf_cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of a hub repo, without touching the network."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        return None
    try:
        path = snapshot_download(repo_id=repo, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except Exception:
        return None
    return Path(path)


def resolve_model(name: str) -> ModelSource:
    """Turn a model argument into a loadable source, or raise :class:`ModelLoadError` saying what to do."""
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(f"{folder} is not an open_clip model folder (missing open_clip_config.json)")
        weights = _find_weights(folder)
        if weights is None:
            raise ModelLoadError(f"{folder} has no weights ({', '.join(WEIGHT_NAMES)})")
        spec = _spec_from_folder(folder, default_name=folder.name)
        return ModelSource(spec.name, f"local-dir:{folder}", weights, spec, folder)
    if "@" in name or name.endswith(WEIGHT_SUFFIXES):
        arch, _, path_s = name.rpartition("@") if "@" in name else ("convnext_base", "", name)
        path = Path(path_s).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"weights file {path} not found")
        spec = ModelSpec(name=path.stem, description=f"{arch} weights from {path}", arch=arch,
                         frame_policy="echoclip" if arch == "convnext_base" else "sector")
        return ModelSource(spec.name, arch, path, spec)
    found = REGISTRY.get(name)
    if found is None:
        known = ", ".join(sorted(REGISTRY))
        raise ModelLoadError(f"unknown model {name!r}: use one of {known}, local-dir:DIR, or ARCH@WEIGHTS_FILE")
    spec = found
    if spec.local_dir is not None:
        weights = _find_weights(spec.local_dir)
        if weights is None:
            raise ModelLoadError(f"the shipped model {name} is missing from {spec.local_dir}: reinstall echosearch "
                                 "or rebuild it with `make demo-model`")
        return ModelSource(name, f"local-dir:{spec.local_dir}", weights, spec, spec.local_dir)
    assert spec.hf_repo is not None
    snap = _hf_cached_snapshot(spec.hf_repo)
    if snap is None or _find_weights(snap) is None:
        raise ModelLoadError(
            f"model {name} is not in the Hugging Face cache: run `echosearch model fetch {name}` on a machine with "
            f"network access, or pass local-dir:DIR with its open_clip_config.json and weights"
        )
    return ModelSource(name, f"local-dir:{snap}", _find_weights(snap), spec, snap)


def _spec_from_folder(folder: Path, default_name: str) -> ModelSpec:
    """Read echosearch's own hints (name, frame policy, tokenizer) from an open_clip config, if present."""
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    hints = cfg.get("echosearch", {})
    return ModelSpec(
        name=hints.get("name", default_name),
        description=hints.get("description", f"open_clip model from {folder}"),
        local_dir=folder,
        arch=hints.get("arch", "custom"),
        frame_policy=hints.get("frame_policy", "sector"),
        tokenizer=hints.get("tokenizer", "clip"),
    )


_HASH_CACHE: dict[tuple[str, int, float], str] = {}


def weights_sha256(path: Path) -> str:
    """Content hash of a weights file (cached per path, size and mtime: the big files are hashed once)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def fetch_model(name: str) -> Path:
    """Download a registry model into the Hugging Face cache (the only place echosearch downloads)."""
    spec = REGISTRY.get(name)
    if spec is None or spec.hf_repo is None:
        raise ModelLoadError(f"{name!r} is not a downloadable model (downloadable: echo-clip, echo-clip-r)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError("HF_HUB_OFFLINE=1 is set: unset it to download")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=spec.hf_repo))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not download {spec.hf_repo} ({type(exc).__name__}: {first[:160]}); "
                             "is the Hugging Face hub reachable from this machine?") from exc


def write_model_folder(model: Any, model_cfg: dict[str, Any], folder: Path, *, hints: dict[str, Any] | None = None,
                       preprocess_cfg: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Save an open_clip model in open_clip's folder format (config JSON + safetensors), atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu()
             for k, v in model.state_dict().items()}
    tmp = folder / "open_clip_model.safetensors.tmp"
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / "open_clip_model.safetensors")
    cfg: dict[str, Any] = {"model_cfg": model_cfg}
    if preprocess_cfg:
        cfg["preprocess_cfg"] = preprocess_cfg
    if hints:
        cfg["echosearch"] = hints
    tmpc = folder / "open_clip_config.json.tmp"
    tmpc.write_text(json.dumps(cfg, indent=2))
    os.replace(tmpc, folder / "open_clip_config.json")
    return folder
