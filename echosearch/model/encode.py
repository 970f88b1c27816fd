"""The encode stage: one :class:`Encoder` interface over open_clip models.

Frames arrive as prepared uint8 arrays (N, S, S, 3); the encoder applies the model's own normalisation,
runs the image tower in ``eval()`` under ``torch.inference_mode()`` (bf16 autocast on CUDA, fp32 on CPU)
and returns L2-normalised float32 vectors. Text goes through the model's tokenizer (or EchoCLIP-R's
template tokenizer) and the text tower.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from echosearch.errors import ModelLoadError, ModelMismatchError
from echosearch.model.models import ModelSource, resolve_model, weights_sha256

if TYPE_CHECKING:
    from echosearch.catalog import Catalog
    from echosearch.ingest.prepare import FramePolicy

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' requested but no CUDA GPU is available")
        return torch.device("cuda")
    return torch.device("cpu")


def l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit vectors along ``axis`` (zero vectors stay zero)."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def encode_text_bucketed(model: Any, tokens: torch.Tensor, buckets: int = 3) -> torch.Tensor:
    """Normalised text vectors, computed in length buckets trimmed to their longest text.

    The CLIP text tower is causal and pools at the end-of-text token (``argmax``/``eos``) or the first
    one, so padding after the last token never changes a vector: trimming is exact and saves most of the
    text tower's cost for short texts (prompts, queries, training statements: ~10-20 of a 64-77 token
    context). Used by :meth:`Encoder.encode_text` and by training. Other towers and pooling types fall
    back to ``encode_text``.
    """
    need = ("token_embedding", "positional_embedding", "attn_mask", "transformer", "ln_final", "text_projection")
    exact = getattr(model, "text_pool_type", None) in ("argmax", "eos", "first")
    if len(tokens) == 0 or not exact or not all(getattr(model, a, None) is not None for a in need):
        return model.encode_text(tokens, normalize=True)
    from open_clip.transformer import text_global_pool

    cast = model.transformer.get_cast_dtype()
    lengths = (tokens != 0).int().cumsum(1).argmax(1) + 1  # through the last non-pad token (0 may occur inside)
    order = torch.argsort(lengths)
    chunks, vecs = [], []
    for chunk in torch.tensor_split(order, min(buckets, len(order))):
        if chunk.numel() == 0:
            continue
        n = int(lengths[chunk].max())
        text = tokens[chunk, :n]
        x = model.token_embedding(text).to(cast) + model.positional_embedding[:n].to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
        x = text_global_pool(model.ln_final(x), text, model.text_pool_type,
                             eos_token_id=getattr(model, "text_eos_id", None))
        proj = model.text_projection
        chunks.append(chunk)
        vecs.append(proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj)
    out = torch.cat(vecs)[torch.argsort(torch.cat(chunks))]  # back to the input order, on the model's device
    return torch.nn.functional.normalize(out.float(), dim=-1)


class Encoder:
    """An open_clip model behind echosearch's encoder interface."""

    def __init__(self, model: Any, tokenizer: Any, source: ModelSource, device: torch.device,
                 frames_per_video: int = 16, policy: str = "auto", sampling: str = "uniform") -> None:
        from echosearch.ingest.frame_policy import resolve_frame_policy

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.device = device
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pp = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(pp.get("mean", OPENAI_MEAN))
        self.std = tuple(pp.get("std", OPENAI_STD))
        self._mean_t = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        with torch.inference_mode():
            probe = model.encode_text(tokenizer(["probe"]).to(device))
        self.embed_dim = int(probe.shape[-1])
        self.policy: FramePolicy = resolve_frame_policy(source.spec, setting=policy, n_frames=frames_per_video,
                                                        size=self.image_size, sampling=sampling)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def identity(self) -> dict[str, Any]:
        """What an index records and checks: model name, weights hash, dimension, preprocessing."""
        from echosearch.ingest.prepare import policy_manifest

        return {
            "name": self.source.name,
            "weights_sha256": weights_sha256(self.source.weights) if self.source.weights else None,
            "embed_dim": self.embed_dim,
            "preprocessing": {**policy_manifest(self.policy), "mean": list(self.mean), "std": list(self.std)},
            "frame_policy_chosen": self.policy.chosen,  # auto or explicit: recorded, not part of the comparison
            "tokenizer": {"kind": self.source.spec.tokenizer, "sha256": getattr(self.tokenizer, "digest", None) or None},
        }

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def frames_to_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (N,S,S,3) -> normalised float (N,3,S,S) on the model's device."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected frames of shape (N,S,S,3), got {frames.shape}")
        t = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, non_blocking=True)
        t = t.permute(0, 3, 1, 2).float().div_(255.0)
        if t.shape[-1] != self.image_size or t.shape[-2] != self.image_size:
            t = torch.nn.functional.interpolate(t, size=(self.image_size, self.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        t = (t - self._mean_t) / self._std_t
        if self.device.type == "cuda":
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def encode_frames(self, frames: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Prepared frames -> L2-normalised frame vectors (N, d) float32."""
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(frames), batch_size):
                feats = self.model.encode_image(self.frames_to_tensor(frames[i:i + batch_size]))
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> L2-normalised text vectors (n, d) float32."""
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenize(texts[i:i + batch_size]).to(self.device)
                out.append(encode_text_bucketed(self.model, tokens).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32)


def _load_tokenizer(source: ModelSource, tokenizer_dir: Path | None = None) -> Any:
    import open_clip

    if source.spec.tokenizer == "template":
        from echosearch.model.report_tokenizer import check_vocab_size, load_template_tokenizer

        tok = load_template_tokenizer(source.folder, tokenizer_dir)
        cfg = source.folder / "open_clip_config.json" if source.folder else None
        if cfg is not None and cfg.is_file():
            check_vocab_size(tok, json.loads(cfg.read_text()).get("model_cfg", {}))
        return tok
    if source.open_clip_name.startswith("local-dir:"):
        return open_clip.get_tokenizer(source.open_clip_name)
    return open_clip.get_tokenizer(source.spec.arch)


def load_tokenizer(name: str, tokenizer_dir: Path | None = None) -> Any:
    """A model's tokenizer alone (no weights read): open_clip's BPE, or EchoCLIP-R's template tokenizer from
    ``tokenizer_dir``, the ``tokenizer_dir`` setting or the model's folder. A registry model whose weights are
    not downloaded still tokenizes when its tokenizer files are given."""
    from echosearch.model.models import REGISTRY

    try:
        source = resolve_model(name)
    except ModelLoadError:
        spec = REGISTRY.get(name)
        if spec is None:
            raise
        source = ModelSource(name, spec.arch, None, spec)
    return _load_tokenizer(source, tokenizer_dir)


def load_encoder(name: str = "echosearch-demo", device: str = "auto", frames_per_video: int = 16,
                 policy: str | None = "auto", sampling: str = "uniform") -> Encoder:
    """Load a model by registry name, ``local-dir:DIR`` or ``ARCH@WEIGHTS``; never downloads.

    ``policy`` is a frame-policy setting (``auto`` = the model's own; see :mod:`echosearch.ingest.frame_policy`)."""
    import open_clip

    source = resolve_model(name)
    dev = pick_device(device)
    try:
        if source.open_clip_name.startswith("local-dir:"):
            model, _, _ = open_clip.create_model_and_transforms(source.open_clip_name, device=dev)
        else:
            model, _, _ = open_clip.create_model_and_transforms(source.open_clip_name, pretrained=str(source.weights),
                                                                device=dev)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load model {name}: {type(exc).__name__}: {exc}") from exc
    tokenizer = _load_tokenizer(source)
    return Encoder(model, tokenizer, source, dev, frames_per_video=frames_per_video, policy=policy or "auto",
                   sampling=sampling)


def encoder_for_index(catalog: Catalog, device: str = "auto", model: str | None = None) -> Encoder:
    """The encoder an index was built with (its manifest names it); refuse a different one."""
    stored = catalog.get_manifest("model")
    if stored is None:
        raise ModelMismatchError(f"index {catalog.index_dir} has no model yet: run `echosearch index` first")
    pp = stored.get("preprocessing", {})
    source_name = model or catalog.get_manifest("model_source") or stored["name"]
    enc = load_encoder(source_name, device=device, frames_per_video=int(pp.get("n_frames", 16)),
                       policy=pp.get("name", "auto"), sampling=pp.get("sampling", "uniform"))
    ident = enc.identity
    old_tok, new_tok = ((d.get("tokenizer") or {}).get("sha256") for d in (stored, ident))
    if old_tok and new_tok and old_tok != new_tok:
        raise ModelMismatchError(f"index {catalog.index_dir} was built with other EchoCLIP-R tokenizer files "
                                 f"(sha256 {old_tok[:12]}, now {new_tok[:12]}): text queries would not match it")
    if ident["weights_sha256"] != stored.get("weights_sha256") or ident["embed_dim"] != stored.get("embed_dim"):
        raise ModelMismatchError(
            f"index {catalog.index_dir} was built with {stored['name']} (weights {str(stored.get('weights_sha256'))[:12]}); "
            f"the available {source_name} has weights {str(ident['weights_sha256'])[:12]}"
        )
    from echosearch.ingest.frame_policy import preprocessing_mismatch

    why = preprocessing_mismatch(pp, ident["preprocessing"])  # e.g. an echoclip index from before BGR
    if why:
        raise ModelMismatchError(f"index {catalog.index_dir} was {why}")
    return enc
