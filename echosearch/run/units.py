"""Units of work: fixed groups of input files, named by their content, so that a retried unit replaces its own shard.

A unit is up to ``unit_files`` consecutive candidate files of **one folder**, in the discovery order of
:func:`echosearch.ingest.discover.discover` (sorted walk; a manifest's rows in order). Grouping by folder keeps the
units of a PACS export (a folder per study) stable when new studies arrive: only the new folders make new
units. A unit's name is the SHA-256 of the run's configuration digest (model, frame policy, identity model,
zero-shot prompts, whether frame vectors are kept) and of each file's path, size and modification time, so
the same files under the same configuration always give the same shard name, and a changed file a new one.
Paths that cannot be listed or followed (a broken link, a missing source) travel in a unit as
:class:`~echosearch.ingest.discover.DiscoverFailure` and become ``ingest_errors`` rows, as in the local runner.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echosearch.ingest.discover import DiscoverFailure, _candidates

DEFAULT_UNIT_FILES = 32
SHARD_DIR = "shards"


@dataclass
class Unit:
    """One unit of work: its position in the run's plan (merge order), its name and its inputs."""

    ordinal: int
    name: str
    items: list[Path | DiscoverFailure] = field(default_factory=list)


def _fingerprint(item: Path | DiscoverFailure) -> list[Any]:
    if isinstance(item, DiscoverFailure):
        return ["!", item.path.as_posix(), item.reason]
    try:
        st = os.stat(item)
        return [item.absolute().as_posix(), st.st_size, st.st_mtime_ns]
    except OSError as exc:  # read stage reports it; the name still depends on the path
        return [item.absolute().as_posix(), None, type(exc).__name__]


def unit_name(items: Sequence[Path | DiscoverFailure], config_digest: str) -> str:
    """The content name of a unit: its shard is ``shards/<name>.parquet``."""
    h = hashlib.sha256(config_digest.encode())
    for item in items:
        h.update(json.dumps(_fingerprint(item), separators=(",", ":")).encode())
    return h.hexdigest()[:32]


def config_digest(config: dict[str, Any]) -> str:
    """A digest of what makes a shard's vectors (so that another configuration never reuses a shard)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _groups(sources: Sequence[Path], unit_files: int) -> Iterator[list[Path | DiscoverFailure]]:
    group: list[Path | DiscoverFailure] = []
    folder: Path | None = None
    for source in sources:
        for item in _candidates(Path(source)):
            parent = item.path.parent if isinstance(item, DiscoverFailure) else item.parent
            if group and (parent != folder or len(group) >= unit_files):
                yield group
                group = []
            folder = parent
            group.append(item)
    if group:
        yield group


def plan_units(sources: Sequence[Path], digest: str, unit_files: int = DEFAULT_UNIT_FILES) -> list[Unit]:
    """Units of ``sources`` in discovery order (a cheap walk: no file is read here)."""
    if unit_files < 1:
        raise ValueError("unit_files must be >= 1")
    return [Unit(i, unit_name(items, digest), items) for i, items in enumerate(_groups(sources, unit_files))]


def shard_path(index_dir: Path, name: str) -> Path:
    return Path(index_dir) / SHARD_DIR / f"{name}.parquet"
