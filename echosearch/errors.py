"""Domain errors: every expected failure is one of these; the CLI maps them to one line and an exit code."""

from __future__ import annotations


class EchosearchError(Exception):
    """Base class of every expected failure. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(EchosearchError):
    """Settings are missing or unsafe (for example no pseudonymisation secret in production)."""

    exit_code = 2


class IndexNotFoundError(EchosearchError):
    """The index folder or its catalog does not exist."""

    exit_code = 3


class CatalogError(EchosearchError):
    """The catalog is unreadable, of a newer schema, or locked by another writer."""

    exit_code = 4


class ModelMismatchError(EchosearchError):
    """An index built with one model or preprocessing was used with another."""

    exit_code = 5


class ModelLoadError(EchosearchError):
    """A model could not be found or loaded (no download is attempted implicitly)."""

    exit_code = 6


class IngestError(EchosearchError):
    """A file could not be ingested; ``stage`` says where (discover, decode, prepare, encode)."""

    exit_code = 7

    def __init__(self, reason: str, stage: str = "decode") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


class DecodeError(IngestError):
    """Pixel data or container could not be decoded (corrupt, truncated, unsupported codec)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, stage="decode")


class NotUltrasoundError(IngestError):
    """A DICOM object that is not an ultrasound image (CT, MR, XA, waveform, no pixel data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, stage="decode")


class ReportObjectFound(IngestError):
    """A DICOM object that carries a report (SR, encapsulated PDF): recorded, not a failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, stage="decode")


class PrepareError(IngestError):
    """Frames could not be turned into model input (no sector, zero frames)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, stage="prepare")


class SomeInputsFailed(EchosearchError):
    """A batch finished but some inputs were recorded in ``ingest_errors``."""

    exit_code = 10


class QueryError(EchosearchError):
    """A search or filter was invalid (bad SQL filter, unknown id, empty index)."""

    exit_code = 8


class IndexMismatchError(EchosearchError):
    """A vector index file does not match its catalog (count, generation or model): reindex."""

    exit_code = 9
