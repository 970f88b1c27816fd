"""The records the indexing stages hand each other (through a runner): plain data, no behaviour.

read -> :class:`ClipRecord` or :class:`FailureRecord`; encode -> :class:`EncodedClip`; a unit of work (the Ray
runner) carries them together as a :class:`UnitResult`. They pickle (worker processes, Ray object store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from echosearch.catalog import VideoRecord

REPORT_STAGE = "report-object"  # the ingest_errors stage of a DICOM SR / PDF object: recorded, not a failure


@dataclass
class ClipRecord:
    """A prepared clip: its catalog row (identifiers already pseudonymised; None for a query clip, which is
    not catalogued), its model-input frames (N,S,S,3 uint8) and its cheap scope (a ``clip_scope`` row
    without its key)."""

    seq: int  # position among the run's (or unit's) inputs: the order keys are given in
    record: VideoRecord | None
    frames: np.ndarray
    scope: dict[str, Any] | None = None


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
        return self.stage == REPORT_STAGE


@dataclass
class EncodedClip:
    """A clip's catalog row and its vectors: content video vector, frame vectors (kept only when the index
    keeps them), zero-shot values, identity vector (when an identity model is configured), cycle vector (when
    the index stores them, :mod:`echosearch.model.cycle`)."""

    seq: int
    record: VideoRecord | None
    vector: np.ndarray
    n_frames: int
    predictions: dict[str, float]
    frame_vectors: np.ndarray | None = None
    identity: np.ndarray | None = None
    scope: dict[str, Any] | None = None
    cycle: np.ndarray | None = None


@dataclass
class UnitResult:
    """What a unit of work produced (read stage: ``clips``; encode stage: ``encoded``)."""

    name: str
    ordinal: int
    clips: list[ClipRecord] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    encoded: list[EncodedClip] = field(default_factory=list)
