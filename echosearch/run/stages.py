"""The indexing stages as plain functions and classes that know nothing of each other or of a runner.

* **read** (:func:`read_unit`): a unit's files -> prepared clip records (catalog row, pseudonymised, plus the
  model-input frames) or failure records: discover (hash, sniff) + decode + prepare, with the same rules as
  the local scan (:func:`echosearch.ingest.safe_process`, :func:`echosearch.ingest.video_record`).
* **encode** (:class:`EncodeStage`): prepared clips -> content video vectors, zero-shot values, identity
  vectors when an identity model is configured; the same arithmetic as the local runner's batches.
* **write** (:func:`echosearch.run.shards.write_shard`): vectors and rows -> one Parquet shard.

A runner passes the output of one stage to the next: :mod:`echosearch.run.ray_runner` on a Ray cluster.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from echosearch.catalog import VideoRecord
from echosearch.discover import DiscoverFailure, FileRecord, Sidecars, discover
from echosearch.encode import Encoder, l2_normalise, load_encoder
from echosearch.ingest import FailedFile, safe_process, stored_location, video_record
from echosearch.prepare import FramePolicy
from echosearch.pseudonym import Pseudonymizer

if TYPE_CHECKING:
    from echosearch.config import Settings
    from echosearch.identity_model import IdentityEncoder
    from echosearch.zeroshot import PromptBank

log = logging.getLogger(__name__)
# fault injection (tests): a marker file path; the first encode worker to create it kills itself (SIGKILL) after
# encoding a unit other than the first, before handing it on
FAULT_KILL_ONCE = "ECHOSEARCH_FAULT_KILL_ENCODE_ONCE"


# ---- records passed between stages ---------------------------------------------------------------------
@dataclass
class ClipRecord:
    """A prepared clip: its catalog row (identifiers already pseudonymised) and its model-input frames."""

    seq: int  # position in the unit (merge order)
    record: VideoRecord
    frames: np.ndarray
    scope: dict[str, Any] | None = None  # the clip's cheap scope (a ``clip_scope`` row without its key)


@dataclass
class FailureRecord:
    """An input that yields no clip: an ``ingest_errors`` row (label, sealed location) and, for a DICOM SR
    report object, the report text and its study."""

    seq: int
    path: str
    location: bytes | None
    sha256: str | None
    stage: str
    reason: str
    report_study_uid: str | None = None
    report_text: str | None = None

    @property
    def is_report(self) -> bool:
        from echosearch.ingest import REPORT_STAGE

        return self.stage == REPORT_STAGE


@dataclass
class EncodedClip:
    """A clip's catalog row and its vectors: content video vector, frame vectors (kept only when the index
    keeps them), zero-shot values, identity vector (when an identity model is configured)."""

    seq: int
    record: VideoRecord
    vector: np.ndarray
    n_frames: int
    predictions: dict[str, float]
    frame_vectors: np.ndarray | None = None
    identity: np.ndarray | None = None
    scope: dict[str, Any] | None = None


@dataclass
class UnitResult:
    """What a unit of work produced (read stage: ``clips``; encode stage: ``encoded``)."""

    name: str
    ordinal: int
    clips: list[ClipRecord] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    encoded: list[EncodedClip] = field(default_factory=list)


# ---- read ------------------------------------------------------------------------------------------------
@dataclass
class ReadContext:
    """What the read stage needs besides the files: frame policy, sidecar ground truth (identity of AVI/MP4
    files), the pseudonymisation secret, and the hashes to skip (already in the catalog)."""

    policy: FramePolicy
    sidecars: Sidecars
    secret: bytes
    store_raw: bool = False
    known: Container[str] = frozenset()


class _Known:
    """Known hashes plus those seen earlier in the unit (a file seen twice is read once)."""

    def __init__(self, known: Container[str], seen: set[str]) -> None:
        self.known, self.seen = known, seen

    def __contains__(self, item: object) -> bool:
        return item in self.seen or item in self.known


def read_unit(name: str, ordinal: int, items: Sequence[Path | DiscoverFailure], ctx: ReadContext) -> UnitResult:
    """Read stage: discover + decode + prepare each input of a unit; never raises for a bad file."""
    pz = Pseudonymizer(ctx.secret)
    out = UnitResult(name, ordinal)
    seen: set[str] = set()

    def failure(seq: int, path: Path, sha256: str | None, stage: str, reason: str,
                report: Any = None) -> FailureRecord:
        shown, location = stored_location(path, pz, ctx.store_raw)
        return FailureRecord(seq, shown, location, sha256, stage, reason,
                             getattr(report, "study_uid", None), getattr(report, "text", None))

    for seq, item in enumerate(items):
        found = [item] if isinstance(item, DiscoverFailure) else list(discover([item], _Known(ctx.known, seen)))
        for rec in found:
            if isinstance(rec, DiscoverFailure):
                out.failures.append(failure(seq, rec.path, rec.sha256, rec.stage, rec.reason))
                continue
            assert isinstance(rec, FileRecord)
            if rec.size:
                seen.add(rec.sha256)
            got = safe_process(rec, ctx.policy)
            if isinstance(got, FailedFile):
                out.failures.append(failure(seq, got.path, got.sha256, got.stage, got.reason, got.report))
                continue
            try:
                row = video_record(got, ctx.sidecars, pz, ctx.store_raw)
            except Exception as exc:  # noqa: BLE001 - one bad header value must not end the unit
                out.failures.append(failure(seq, rec.path, rec.sha256, "catalog",
                                            f"could not be recorded in the catalog [{type(exc).__name__}: {exc}]"))
                continue
            out.clips.append(ClipRecord(seq, row, got.frames, clip_scope(got.record.path, got.frames,
                                                                         got.meta.n_frames, got.record.kind)))
    return out


def clip_scope(path: Path, frames: np.ndarray, n_frames: int | None, kind: str) -> dict[str, Any]:
    """The clip's scope from cheap signals (header, frames), as the local runner records it at indexing."""
    from echosearch import scope

    row = scope.cheap_scope(path, frames, n_frames, kind=kind).row(0)
    row.pop("video_key")
    return row


# ---- encode ----------------------------------------------------------------------------------------------
@dataclass
class EncodeSpec:
    """Everything an encode worker needs to load the same models as the driver (picklable, no weights)."""

    model: str
    device: str
    frames_per_video: int
    frame_policy: str
    frame_sampling: str
    batch_size: int
    keep_frames: bool
    zeroshot_method: str
    zeroshot_prompts: str | None
    identity_model: str | None  # resolved spec (setting, else the one the index recorded); None: no identity

    @classmethod
    def from_settings(cls, settings: Settings, identity_model: str | None, device: str | None = None) -> EncodeSpec:
        return cls(settings.model, device or settings.device, settings.frames_per_video, settings.frame_policy,
                   settings.frame_sampling, settings.batch_size, settings.keep_frame_embeddings,
                   settings.zeroshot_method, str(settings.zeroshot_prompts) if settings.zeroshot_prompts else None,
                   identity_model)

    def load_encoder(self) -> Encoder:
        return load_encoder(self.model, device=self.device, frames_per_video=self.frames_per_video,
                            policy=self.frame_policy, sampling=self.frame_sampling)


class EncodeStage:
    """Encode stage: prepared clips -> vectors and zero-shot values, batched across clips by frames.

    Frames of consecutive clips are concatenated until ``batch_size`` frames are reached and encoded together
    (as in the local runner); a clip's video vector is the re-normalised mean of its frame vectors."""

    def __init__(self, spec: EncodeSpec, encoder: Encoder | None = None, bank: PromptBank | None = None,
                 identity: IdentityEncoder | None = None) -> None:
        from echosearch.zeroshot import PromptBank, load_prompts, resolve_method

        self.spec = spec
        self.encoder = encoder or spec.load_encoder()
        if bank is None:
            method = resolve_method(spec.zeroshot_method, self.encoder.source.spec)
            prompts = load_prompts(spec.zeroshot_prompts) if spec.zeroshot_prompts else None
            bank = PromptBank.build(self.encoder, prompts, method=method)
        self.bank = bank
        if identity is None and spec.identity_model:
            from echosearch.identity_model import load_identity_encoder

            identity = load_identity_encoder(spec.identity_model, self.encoder, device=spec.device)
        self.identity = identity

    def __call__(self, clips: Sequence[ClipRecord]) -> list[EncodedClip]:
        out: list[EncodedClip] = []
        batch: list[ClipRecord] = []
        n = 0
        for clip in clips:
            batch.append(clip)
            n += len(clip.frames)
            if n >= self.spec.batch_size:
                out.extend(self._encode(batch))
                batch, n = [], 0
        if batch:
            out.extend(self._encode(batch))
        return out

    def _encode(self, batch: list[ClipRecord]) -> list[EncodedClip]:
        from echosearch.zeroshot import predict

        frames = [c.frames for c in batch]
        allv = self.encoder.encode_frames(np.concatenate(frames), batch_size=2 * self.spec.batch_size)
        per_clip = np.split(allv, np.cumsum([len(f) for f in frames])[:-1])
        ident = self.identity.video_vectors(frames, per_clip) if self.identity is not None else None
        # out-of-scope clips (not echo, colour Doppler) get no zero-shot values, as in the local runner
        return [EncodedClip(c.seq, c.record, l2_normalise(fv.mean(axis=0)), len(fv),
                            predict(self.bank, fv) if c.scope is None or c.scope["in_scope"] else {},
                            fv if self.spec.keep_frames else None, None if ident is None else ident[i], c.scope)
                for i, (c, fv) in enumerate(zip(batch, per_clip, strict=True))]

    def encode_unit(self, unit: UnitResult) -> UnitResult:
        """The unit with its clips encoded (frames dropped: the write stage needs only vectors and rows)."""
        encoded = self(unit.clips)
        if unit.ordinal > 0:  # mid-run: the first unit's shard may already be written
            _maybe_fault()
        return UnitResult(unit.name, unit.ordinal, [], unit.failures, encoded)


def _maybe_fault() -> None:
    """Fault injection for the worker-kill test: SIGKILL this process once per marker file."""
    marker = os.environ.get(FAULT_KILL_ONCE)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
