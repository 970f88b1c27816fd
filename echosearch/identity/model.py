"""Identity encoders: vectors for "same patient?", configured apart from the content encoder (``identity_model``).

Two kinds, both loadable offline:

- **head**: a folder written by ``echosearch train-identity`` with ``identity_head.json`` (the image tower it
  was trained on, by model name and weights hash, and the head's shape) and ``identity_head.safetensors``
  (a linear projection or 2-layer MLP). The head maps the tower's video vector (mean of its L2-normalised
  frame vectors, re-normalised) to an L2-normalised identity vector. When the tower is the content model
  itself, indexing reuses the content encoder's frame vectors and only the head runs.
- **tower**: any model name / ``local-dir:DIR`` (e.g. ``echo-clip-r``): its image tower's video vector is the
  identity vector. It sees the frames the content encoder prepared (resized to its own input size).
- **tower-tail**: a folder written by ``echosearch train-identity --method tower --train-stages K``: the base
  tower's early stages (shared with the content encoder when it is the same model), a fine-tuned copy of its
  last K stages and a head (:mod:`echosearch.identity.tower`).
- **map**: a folder written by ``echosearch train-identity --method map`` (the default): a closed-form
  projection of the frame-mean activation maps of the base tower's early stages (:mod:`echosearch.identity.map`).

A study's identity vector is the mean of its videos', re-normalised, as for the content vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from echosearch.catalog import Catalog
from echosearch.errors import ModelLoadError, ModelMismatchError
from echosearch.model.models import weights_sha256

if TYPE_CHECKING:
    from echosearch.identity.map import MapRunner
    from echosearch.identity.tower import TailRunner
    from echosearch.ingest.prepare import FramePolicy
    from echosearch.model.encode import Encoder

HEAD_CONFIG = "identity_head.json"
HEAD_WEIGHTS = "identity_head.safetensors"
HEAD_FORMAT = "echosearch-identity-head"


class IdentityHead(torch.nn.Module):
    """Linear projection (``hidden=0``) or 2-layer MLP from tower video vectors to unit identity vectors.

    ``residual``: ``x + MLP(x)`` (``out_dim = in_dim``) with the MLP's last layer starting at zero, so that
    training starts from the tower's own vectors and moves only as far as the patient labels pull it.

    ``pool``: ``video`` maps a video's pooled tower vector; ``frame`` maps every frame vector and pools the
    results (a video vector is then the mean of the head's frame vectors, re-normalised)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 256, residual: bool = False,
                 pool: str = "video") -> None:
        super().__init__()
        if pool not in ("video", "frame"):
            raise ValueError(f"pool must be video or frame, got {pool!r}")
        out_dim = in_dim if residual else out_dim
        self.in_dim, self.out_dim, self.hidden, self.residual, self.pool = in_dim, out_dim, hidden, residual, pool
        if hidden > 0:
            self.net: torch.nn.Module = torch.nn.Sequential(
                torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out_dim))
        else:
            self.net = torch.nn.Linear(in_dim, out_dim)
        if residual:
            last = self.net[-1] if isinstance(self.net, torch.nn.Sequential) else self.net
            assert isinstance(last, torch.nn.Linear)
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.net(x) if self.residual else self.net(x), dim=-1)

    def shape(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden, "residual": self.residual,
                "pool": self.pool}


def head_folder(spec: str) -> Path | None:
    """The head folder a setting names (``DIR`` or ``local-dir:DIR`` holding ``identity_head.json``), else None."""
    path = Path(spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec).expanduser()
    return path if (path / HEAD_CONFIG).is_file() else None


def demo_identity_head() -> Path | None:
    """The identity head shipped with the demo model (``identity/`` in its folder), if it is there."""
    from echosearch.model.models import REGISTRY

    spec = REGISTRY.get("echosearch-demo")
    folder = spec.local_dir / "identity" if spec is not None and spec.local_dir is not None else None
    return folder if folder is not None and (folder / HEAD_CONFIG).is_file() else None


def save_head(folder: Path, head: IdentityHead, tower: dict[str, Any], training: dict[str, Any]) -> Path:
    """Write a head folder (config JSON + safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in head.state_dict().items()}, str(folder / HEAD_WEIGHTS))
    os.chmod(folder / HEAD_WEIGHTS, 0o644)  # a model file others may read, like write_model_folder's
    cfg = {"format": HEAD_FORMAT, "version": 1, "name": folder.name, "tower": tower, "head": head.shape(),
           "training": training}
    (folder / HEAD_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / HEAD_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not read {folder / HEAD_CONFIG}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{folder / HEAD_CONFIG} is not an echosearch identity model")
    return cfg


def load_head(folder: Path) -> tuple[IdentityHead, dict[str, Any]]:
    """(head in eval mode, its config) from a head folder (or the head of an identity tower folder)."""
    from safetensors.torch import load_file

    from echosearch.identity.tower import TOWER_FORMAT

    try:
        cfg = json.loads((folder / HEAD_CONFIG).read_text())
        if cfg.get("format") not in (HEAD_FORMAT, TOWER_FORMAT):
            raise ModelLoadError(f"{folder / HEAD_CONFIG} is not an echosearch identity head")
        head = IdentityHead(**cfg["head"])
        head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    except (OSError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not load the identity head in {folder}: {type(exc).__name__}: {exc}") from exc
    return head.eval(), cfg


class IdentityEncoder:
    """Identity vectors of videos from their prepared frames (or the content encoder's frame vectors)."""

    def __init__(self, name: str, source: str, kind: str, head: IdentityHead | None, tower: Encoder | None,
                 tower_info: dict[str, Any], weights: str | None, embed_dim: int, tail: TailRunner | None = None,
                 policy: FramePolicy | None = None, maps: MapRunner | None = None) -> None:
        self.name, self.source, self.kind = name, source, kind
        self.head, self.tower, self.tower_info = head, tower, tower_info
        self.weights, self.embed_dim = weights, embed_dim
        self.tail = tail  # tower-tail: frame vectors from shared early stages + fine-tuned last stages
        self.policy = policy  # the content encoder's frame policy (what backfilling decodes with)
        self.maps = maps  # map: frame-mean split activation maps -> closed-form projection

    @property
    def shares_content_tower(self) -> bool:
        """The identity vectors are a function of the content encoder's frame vectors alone."""
        return self.tower is None and self.tail is None and self.maps is None

    @property
    def manifest(self) -> dict[str, Any]:
        """What the index records beside the content model (``identity_model``)."""
        return {"name": self.name, "source": self.source, "kind": self.kind, "weights_sha256": self.weights,
                "embed_dim": self.embed_dim, "tower": self.tower_info,
                "shares_content_tower": self.shares_content_tower,
                **({"shared_stages": self.tail.split, "shares_early_stages": self.tail.shared}
                   if self.tail is not None else {}),
                **({"shared_stages": self.maps.acts.split, "shares_early_stages": self.maps.acts.shared}
                   if self.maps is not None else {})}

    def tower_video_vectors(self, frames: Sequence[np.ndarray], content_frame_vecs: Sequence[np.ndarray]
                            ) -> np.ndarray:
        """(n_videos, tower dim) video vectors of the tower: mean of frame vectors, L2-normalised."""
        from echosearch.model.encode import l2_normalise

        if self.tail is not None:
            per_video = self.tail.frame_vectors(frames)
        elif self.tower is None:
            per_video = list(content_frame_vecs)
        else:
            allv = self.tower.encode_frames(np.concatenate(list(frames)))
            per_video = np.split(allv, np.cumsum([len(f) for f in frames])[:-1])
        return np.stack([l2_normalise(v.mean(axis=0)) for v in per_video]).astype(np.float32)

    def apply_head(self, tower_vecs: np.ndarray) -> np.ndarray:
        if self.head is None:
            return np.ascontiguousarray(tower_vecs, dtype=np.float32)
        with torch.inference_mode():
            return self.head(torch.from_numpy(np.array(tower_vecs, dtype=np.float32))).numpy()

    def video_vectors(self, frames: Sequence[np.ndarray], content_frame_vecs: Sequence[np.ndarray]) -> np.ndarray:
        """Identity vectors of videos (L2-normalised), one row per video."""
        if not len(frames):
            return np.zeros((0, self.embed_dim), np.float32)
        if self.maps is not None:
            return self.maps.video_vectors(frames)
        if self.head is not None and self.head.pool == "frame":
            return np.stack([self.apply_frames(f) for f in self.tower_frame_vectors(frames, content_frame_vecs)])
        return self.apply_head(self.tower_video_vectors(frames, content_frame_vecs))

    def tower_frame_vectors(self, frames: Sequence[np.ndarray], content_frame_vecs: Sequence[np.ndarray]
                            ) -> list[np.ndarray]:
        """The tower's frame vectors of each video (the content encoder's when the tower is shared)."""
        if self.tail is not None:
            return self.tail.frame_vectors(frames)
        if self.tower is None:
            return [np.asarray(v, np.float32) for v in content_frame_vecs]
        allv = self.tower.encode_frames(np.concatenate(list(frames)))
        return list(np.split(allv, np.cumsum([len(f) for f in frames])[:-1]))

    def apply_frames(self, frame_vecs: np.ndarray) -> np.ndarray:
        """A frame-pooling head on one video's frame vectors: mean of the mapped frames, re-normalised."""
        from echosearch.model.encode import l2_normalise

        return l2_normalise(self.apply_head(frame_vecs).mean(axis=0)).astype(np.float32)


def base_tower(tower_info: dict[str, Any], content: Encoder, device: str, made: str) -> tuple[Encoder, bool]:
    """(the image tower an identity model was made on, whether it is the content encoder itself): the content
    encoder when the weights are the same, so that the tower runs once per frame; else the recorded model, which
    must have the recorded weights (``made``: "the identity ... was trained on", for the error)."""
    from echosearch.model.encode import load_encoder

    if tower_info.get("weights_sha256") == content.identity["weights_sha256"]:
        return content, True
    base = load_encoder(str(tower_info.get("model")), device=device, frames_per_video=content.policy.n_frames,
                        policy="auto")
    if base.identity["weights_sha256"] != tower_info.get("weights_sha256"):
        raise ModelMismatchError(
            f"{made} {tower_info.get('name')} (weights {str(tower_info.get('weights_sha256'))[:12]}); "
            f"{tower_info.get('model')} has weights {str(base.identity['weights_sha256'])[:12]}")
    return base, False


def load_identity_encoder(spec: str, content: Encoder, device: str = "auto") -> IdentityEncoder:
    """The identity encoder a setting names, sharing the content encoder's tower when the weights are the same."""
    from echosearch.model.encode import load_encoder

    content_sha = content.identity["weights_sha256"]
    folder = head_folder(spec)
    if folder is not None:
        from echosearch.identity.map import MAP_FORMAT, load_map_encoder

        raw = _read_config(folder)
        if raw.get("format") == MAP_FORMAT:
            return load_map_encoder(folder, raw, content, device)
        head, cfg = load_head(folder)
        if "tail" in cfg:
            from echosearch.identity.tower import load_tower_encoder

            return load_tower_encoder(folder, cfg, head, content, device)
        tower_info = dict(cfg.get("tower") or {})
        base, shared = base_tower(tower_info, content, device, f"the identity head {folder} was trained on")
        tower = None if shared else base
        if head.in_dim != int(tower_info.get("embed_dim", head.in_dim)):
            raise ModelLoadError(f"the identity head {folder} expects {head.in_dim}-d tower vectors")
        return IdentityEncoder(str(cfg.get("name") or folder.name), str(folder.resolve()), "head", head, tower,
                               tower_info, weights_sha256(folder / HEAD_WEIGHTS), head.out_dim, policy=content.policy)
    enc = load_encoder(spec, device=device, frames_per_video=content.policy.n_frames, policy="auto")
    ident = enc.identity
    info = {"model": spec, "name": ident["name"], "weights_sha256": ident["weights_sha256"],
            "embed_dim": ident["embed_dim"]}
    shared = ident["weights_sha256"] == content_sha
    return IdentityEncoder(ident["name"], spec, "tower", None, None if shared else enc, info,
                           ident["weights_sha256"], int(ident["embed_dim"]), policy=content.policy)


def backfill_identity(catalog: Catalog, enc: IdentityEncoder, workers: int = 1) -> int:
    """Identity vectors for an index whose videos were encoded without them. A head on the index's own content
    tower needs no decoding: it maps the stored content vectors (a ``frame`` head needs the index's frame
    vectors, ``keep_frame_embeddings``); any other identity encoder (an identity tower, another model) decodes
    the videos again with the index's frame policy (``workers`` processes). Binds the identity model, stores
    video and study identity vectors and builds their vector indexes. Returns the number of videos."""
    from echosearch.errors import ConfigError
    from echosearch.model.encode import l2_normalise
    from echosearch.run.finish import pool_identity
    from echosearch.store.vectorindex import IDENTITY_LEVELS, build_index

    stored = catalog.get_manifest("identity_model")
    if stored is not None:
        catalog.bind_identity(enc.manifest)  # the same model: nothing to do; another: refused
        return 0
    if enc.head is None and enc.shares_content_tower:
        raise ConfigError(f"{enc.name} is the content model itself: identity already uses the content vectors")
    ids, vecs = catalog.embeddings("video")
    if enc.head is None or not enc.shares_content_tower:
        from echosearch.ingest.frame_policy import preprocessing_mismatch
        from echosearch.ingest.prepare import policy_manifest

        stored_pp = {k: v for k, v in ((catalog.get_manifest("model") or {}).get("preprocessing") or {}).items()
                     if k not in ("mean", "std")}
        if enc.policy is None or preprocessing_mismatch(stored_pp, policy_manifest(enc.policy)):
            raise ConfigError(f"{enc.name} was not loaded with this index's frame policy: load it on "
                              "encoder_for_index(catalog) to fill its vectors in")
        ids, z = _decoded_identity(catalog, enc, [int(k) for k in ids], workers)
    elif enc.head.pool == "frame":
        frames = catalog.frame_embeddings([int(k) for k in ids])
        if len(frames) < len(ids):
            raise ConfigError("a frame-pooling identity head needs the index's frame vectors (keep_frame_embeddings)")
        z = np.stack([enc.apply_frames(frames[int(k)]) for k in ids]) if len(ids) else np.zeros((0, enc.embed_dim))
    else:
        z = enc.apply_head(l2_normalise(vecs)) if len(ids) else np.zeros((0, enc.embed_dim), np.float32)
    owner = catalog.study_key_of_videos()
    counts = catalog.video_frame_counts()
    with catalog.transaction():
        catalog.create_identity_tables(enc.embed_dim)
        catalog.set_manifest("identity_model", enc.manifest)
        catalog.store_identity_embeddings("video_identity", [int(k) for k in ids], np.asarray(z, np.float32),
                                          [int(counts.get(int(k)) or 0) for k in ids])
        pool_identity(catalog, {int(k): int(owner[int(k)]) for k in ids})
    for level in IDENTITY_LEVELS:
        build_index(catalog, level)
    return int(len(ids))


def _decoded_identity(catalog: Catalog, enc: IdentityEncoder, keys: list[int], workers: int = 1
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(video keys, identity vectors) of ``keys`` decoded again from their files (videos that no longer decode
    are left out, with a warning), a few videos per forward pass as indexing batches them."""
    import logging

    from echosearch.ingest.discover import FileRecord
    from echosearch.run.read import FailedFile
    from echosearch.run.workers import iter_processed

    assert enc.policy is not None
    rows = {int(r[0]): r for r in catalog.encoded_video_files() if int(r[0]) in set(keys)}
    where = catalog.locations(sorted(rows))
    by_sha = {r[1]: k for k, r in rows.items()}
    records = [FileRecord(path=where[k], size=int(r[3]), sha256=r[1], kind=r[2]) for k, r in sorted(rows.items())]
    got: dict[int, np.ndarray] = {}
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if pending:
            vecs = enc.video_vectors([f for _, f in pending], [np.zeros((len(f), 0), np.float32) for _, f in pending])
            got.update({k: v for (k, _), v in zip(pending, vecs, strict=True)})
            pending.clear()

    for item in iter_processed(records, enc.policy, workers):
        if isinstance(item, FailedFile):
            logging.getLogger(__name__).warning("skipping a video that no longer decodes: %s", item.reason)
            continue
        pending.append((by_sha[item.record.sha256], item.frames))
        if sum(len(f) for _, f in pending) >= 64:
            flush()
    flush()
    ids = np.array(sorted(got), np.int64)
    return ids, (np.stack([got[int(k)] for k in ids]) if len(ids) else np.zeros((0, enc.embed_dim), np.float32))
