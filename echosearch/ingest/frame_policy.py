"""The frame policy, decided in one place: the model's own (``auto``) or an explicit setting.

Everything that needs a :class:`~echosearch.ingest.prepare.FramePolicy` by name (encoder, scan, preview, previews,
training, demo model) asks :func:`resolve_frame_policy`, so a model's policy cannot be silently replaced in
one caller and kept in another. :func:`preprocessing_mismatch` compares an index's stored preprocessing with
the current one and says what to do when a policy's version changed under an index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

from echosearch.errors import ConfigError, ModelLoadError
from echosearch.ingest.prepare import CHANNEL_ORDER, FramePolicy, PolicyName, Sampling
from echosearch.model.models import REGISTRY, ModelSpec, resolve_model

POLICY_SETTINGS = ("auto", "sector", "echoclip")
SAMPLINGS = ("uniform", "all")
DEFAULT_FRAMES = 16
DEFAULT_SIZE = {"sector": 112, "echoclip": 224}  # when neither an encoder nor the model's config says


def model_spec(model: ModelSpec | str) -> ModelSpec:
    """The spec of a model argument without reading weights (a registry model need not be downloaded)."""
    if isinstance(model, ModelSpec):
        return model
    try:
        return resolve_model(model).spec
    except ModelLoadError:
        if model in REGISTRY:
            return REGISTRY[model]
        raise


def spec_image_size(spec: ModelSpec) -> int | None:
    """The image side the model's config declares: its folder's open_clip config, else open_clip's for its arch."""
    cfg: dict[str, Any] | None = None
    if spec.local_dir is not None and (spec.local_dir / "open_clip_config.json").is_file():
        cfg = json.loads((spec.local_dir / "open_clip_config.json").read_text()).get("model_cfg")
    if cfg is None:
        import open_clip

        cfg = open_clip.get_model_config(spec.arch)
    size = ((cfg or {}).get("vision_cfg") or {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def resolve_frame_policy(model: ModelSpec | str | None, *, setting: str = "auto", n_frames: int | None = None,
                         size: int | None = None, sampling: str = "uniform") -> FramePolicy:
    """The frame policy for ``model`` (a spec or a model argument): its own under ``auto``, else ``setting``.

    ``size`` is the encoder's image side when there is an encoder; otherwise the model's config decides
    (224 for EchoCLIP's architecture, 112 for the demo). ``sampling`` is ``uniform`` (``n_frames`` spread
    over the clip) or ``all`` (every frame). The result records whether the name was chosen ``auto``.
    """
    if setting not in POLICY_SETTINGS:
        raise ConfigError(f"unknown frame policy {setting!r}: use auto (the model's own), sector or echoclip")
    if sampling not in SAMPLINGS:
        raise ConfigError(f"unknown frame sampling {sampling!r}: use uniform or all")
    spec: ModelSpec | None = None
    if setting == "auto":
        if model is None:
            raise ConfigError("frame policy 'auto' needs a model: it means the model's own policy")
        spec = model_spec(model)
        name = spec.frame_policy
        if name not in CHANNEL_ORDER:
            raise ConfigError(f"model {spec.name} declares an unknown frame policy {name!r} (sector or echoclip)")
    else:
        name = setting
    if size is None:
        if spec is None and model is not None:
            spec = model_spec(model)
        size = (spec_image_size(spec) if spec is not None else None) or DEFAULT_SIZE[name]
    return FramePolicy(cast(PolicyName, name), DEFAULT_FRAMES if n_frames is None else n_frames, size,
                       cast(Sampling, sampling), chosen="auto" if setting == "auto" else "explicit")


def _normalised(pp: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(pp or {})
    if "name" in out:
        out.setdefault("channel_order", "rgb")  # every policy before channel orders were recorded handed RGB
    return out


def preprocessing_mismatch(stored: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str | None:
    """None when frames prepared under an index's ``stored`` preprocessing and ``current`` are interchangeable;
    else why not, naming both versions when the same policy changed version (or channel order) under the index."""
    a, b = _normalised(stored), _normalised(current)
    if a == b:
        return None
    if a.get("name") == b.get("name") and (a.get("version"), a.get("channel_order")) != (
            b.get("version"), b.get("channel_order")):
        why = ", as EchoCLIP's published inference" if b.get("name") == "echoclip" else ""
        return (f"built with {a.get('name')} preprocessing v{a.get('version')} ({str(a.get('channel_order')).upper()}); "
                f"this echosearch uses v{b.get('version')} ({str(b.get('channel_order')).upper()}{why}): "
                "re-encode into a new index folder")
    return f"built with preprocessing {a}; this one is {b}: use a new index folder"
