"""Encode stage: batches of prepared clips -> content video vectors, zero-shot values, identity and cycle vectors.

Frames of consecutive clips are concatenated until ``batch_size`` frames are reached (:func:`frame_batches`)
and encoded together; a clip's video vector is the re-normalised mean of its frame vectors. Out-of-scope
clips (not echo, colour Doppler) get no zero-shot values. The local runner feeds it the run's clips as they are
read; a Ray encode actor feeds it one unit at a time (:meth:`EncodeStage.encode_unit`).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from echosearch.run.records import ClipRecord, EncodedClip, UnitResult

if TYPE_CHECKING:
    from echosearch.config import Settings
    from echosearch.identity.model import IdentityEncoder
    from echosearch.model.cycle import CycleRunner
    from echosearch.model.encode import Encoder
    from echosearch.model.zeroshot import PromptBank

# fault injection (tests): a marker file path; the first encode worker to create it kills itself (SIGKILL) after
# encoding a unit other than the first, before handing it on
FAULT_KILL_ONCE = "ECHOSEARCH_FAULT_KILL_ENCODE_ONCE"


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
    cycle: dict[str, Any] | None = None  # the cycle vectors the index stores (its manifest entry); None: none

    @classmethod
    def from_settings(cls, settings: Settings, identity_model: str | None, device: str | None = None,
                      cycle: dict[str, Any] | None = None) -> EncodeSpec:
        return cls(settings.model, device or settings.device, settings.frames_per_video, settings.frame_policy,
                   settings.frame_sampling, settings.batch_size, settings.keep_frame_embeddings,
                   settings.zeroshot_method, str(settings.zeroshot_prompts) if settings.zeroshot_prompts else None,
                   identity_model, cycle)

    def load_encoder(self) -> Encoder:
        from echosearch.model.encode import load_encoder

        return load_encoder(self.model, device=self.device, frames_per_video=self.frames_per_video,
                            policy=self.frame_policy, sampling=self.frame_sampling)


def frame_batches(clips: Iterable[ClipRecord], batch_size: int) -> Iterator[list[ClipRecord]]:
    """Consecutive clips grouped until a group holds at least ``batch_size`` frames (the last may hold fewer)."""
    batch: list[ClipRecord] = []
    n = 0
    for clip in clips:
        batch.append(clip)
        n += len(clip.frames)
        if n >= batch_size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


class EncodeStage:
    """Prepared clips -> :class:`EncodedClip` (one model batch per :meth:`encode` call).

    ``bank``: zero-shot prompts (None: no zero-shot values, e.g. a query clip); ``identity``: the identity
    encoder (None: identity uses the content vectors); ``cycle``: cycle vectors (None: none stored)."""

    def __init__(self, encoder: Encoder, *, bank: PromptBank | None = None, identity: IdentityEncoder | None = None,
                 batch_size: int = 64, keep_frames: bool = False, cycle: CycleRunner | None = None) -> None:
        self.encoder, self.bank, self.identity, self.cycle = encoder, bank, identity, cycle
        self.batch_size, self.keep_frames = batch_size, keep_frames
        self.model_seconds = 0.0  # time in the models (content and identity)
        self.identity_seconds = 0.0  # part of model_seconds: the identity encoder (head only when it shares the tower)

    @classmethod
    def from_spec(cls, spec: EncodeSpec) -> EncodeStage:
        """Load the models a spec names (an encode worker on another machine)."""
        from echosearch.model.zeroshot import PromptBank, load_prompts, resolve_method

        encoder = spec.load_encoder()
        method = resolve_method(spec.zeroshot_method, encoder.source.spec)
        prompts = load_prompts(spec.zeroshot_prompts) if spec.zeroshot_prompts else None
        bank = PromptBank.build(encoder, prompts, method=method)
        identity = None
        if spec.identity_model:
            from echosearch.identity.model import load_identity_encoder

            identity = load_identity_encoder(spec.identity_model, encoder, device=spec.device)
        cycle = None
        if spec.cycle:
            from echosearch.model.cycle import CycleRunner

            cycle = CycleRunner(encoder, spec.cycle)
        return cls(encoder, bank=bank, identity=identity, batch_size=spec.batch_size, keep_frames=spec.keep_frames,
                   cycle=cycle)

    def encode(self, batch: Sequence[ClipRecord]) -> list[EncodedClip]:
        """One model batch: the frames of every clip of ``batch`` encoded together."""
        from echosearch.model.encode import l2_normalise
        from echosearch.model.zeroshot import predict

        t0 = time.perf_counter()
        frames = [c.frames for c in batch]
        allv = self.encoder.encode_frames(np.concatenate(frames), batch_size=2 * self.batch_size)  # bounded: long clips
        per_clip = np.split(allv, np.cumsum([len(f) for f in frames])[:-1])
        t1 = time.perf_counter()
        ident = self.identity.video_vectors(frames, per_clip) if self.identity is not None else None
        self.identity_seconds += time.perf_counter() - t1
        cyc = self.cycle.video_vectors(frames) if self.cycle is not None else None  # the same tap as the identity map
        self.model_seconds += time.perf_counter() - t0
        return [EncodedClip(c.seq, c.record, l2_normalise(fv.mean(axis=0)), len(fv),
                            predict(self.bank, fv) if self.bank is not None and (c.scope is None or c.scope["in_scope"])
                            else {},
                            fv if self.keep_frames else None, None if ident is None else ident[i], c.scope,
                            None if cyc is None else cyc[i])
                for i, (c, fv) in enumerate(zip(batch, per_clip, strict=True))]

    def __call__(self, clips: Sequence[ClipRecord]) -> list[EncodedClip]:
        """Every clip of ``clips``, in model batches of :func:`frame_batches`."""
        return [e for batch in frame_batches(clips, self.batch_size) for e in self.encode(batch)]

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
