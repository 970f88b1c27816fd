"""Write stage and shard format: one Parquet file per unit of work, written atomically.

A shard holds one row per input of its unit: ``kind`` ``clip`` (the catalog row of a video, its vectors,
zero-shot values) or ``failure`` (an ``ingest_errors`` row; SR report text when it was a report object).
Identifiers are pseudonymised and file paths sealed exactly as in the catalog: a shard holds nothing the
catalog would not. The file's key-value metadata ``echosearch`` (JSON) names the unit, its run and plan
position (merge order), and the model, identity model, zero-shot and pseudonym-key identities that the merge
checks against the catalog.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from echosearch.catalog import VideoRecord
from echosearch.errors import CatalogError
from echosearch.run.records import EncodedClip, FailureRecord, UnitResult

SHARD_FORMAT = "echosearch-shard"
SHARD_VERSION = 1
META_KEY = b"echosearch"

_RECORD_TYPES: dict[str, pa.DataType] = {
    "sha256": pa.string(), "path": pa.string(), "size_bytes": pa.int64(), "kind": pa.string(),
    "patient_pseudonym": pa.string(), "study_uid": pa.string(), "accession_pseudonym": pa.string(),
    "study_date": pa.date32(), "series_uid": pa.string(), "sop_uid": pa.string(), "view": pa.string(),
    "n_frames": pa.int64(), "height": pa.int64(), "width": pa.int64(), "fps": pa.float64(),
    "manufacturer": pa.string(), "manufacturer_model": pa.string(), "photometric": pa.string(),
    "transfer_syntax": pa.string(), "sector_bbox": pa.list_(pa.int64()), "sector_source": pa.string(),
    "patient_id_raw": pa.string(), "patient_name": pa.string(), "birth_date": pa.date32(), "location": pa.binary(),
}
_FAILURE_TYPES: dict[str, pa.DataType] = {"stage": pa.string(), "reason": pa.string(),
                                          "report_study_uid": pa.string(), "report_text": pa.string()}


def _vectors(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    """Nullable fixed-size float32 lists of width ``dim``."""
    flat = np.concatenate([r for r in rows if r is not None]).astype(np.float32) if any(
        r is not None for r in rows) else np.zeros(0, np.float32)
    mask = np.array([r is None for r in rows], dtype=bool)
    values = np.zeros(len(rows) * dim, np.float32)
    keep = np.repeat(~mask, dim)
    values[keep] = flat
    return pa.FixedSizeListArray.from_arrays(pa.array(values), dim, mask=pa.array(mask, pa.bool_()))


def _rec(clip: EncodedClip) -> VideoRecord:
    assert clip.record is not None, "a query clip has no catalog row"
    return clip.record


def shard_table(unit: UnitResult, meta: dict[str, Any], dim: int, identity_dim: int | None) -> pa.Table:
    """The Arrow table of an encoded unit, rows in input order (clips and failures interleaved by ``seq``)."""
    rows: list[tuple[int, EncodedClip | FailureRecord]] = sorted(
        [(c.seq, c) for c in unit.encoded] + [(f.seq, f) for f in unit.failures], key=lambda r: r[0])
    clips = [r if isinstance(r, EncodedClip) else None for _, r in rows]
    fails = [r if isinstance(r, FailureRecord) else None for _, r in rows]
    cols: dict[str, pa.Array] = {
        "row_kind": pa.array(["clip" if c is not None else "failure" for c in clips], pa.string()),
        "seq": pa.array([s for s, _ in rows], pa.int32()),
    }
    for name, typ in _RECORD_TYPES.items():
        values: list[Any] = []
        for c, f in zip(clips, fails, strict=True):
            if c is not None:
                values.append(getattr(_rec(c), name))
            else:
                assert f is not None
                values.append(getattr(f, name) if name in ("sha256", "path", "location") else None)
        cols[name] = pa.array(values, typ)
    for name, typ in _FAILURE_TYPES.items():
        cols[name] = pa.array([getattr(f, name) if f is not None else None for f in fails], typ)
    cols["record_extra"] = pa.array([json.dumps(_rec(c).extra, default=str) if c is not None and _rec(c).extra
                                     else None for c in clips], pa.string())
    cols["scope"] = pa.array([json.dumps(c.scope) if c is not None and c.scope is not None else None for c in clips],
                             pa.string())
    cols["n_frames_used"] = pa.array([c.n_frames if c is not None else None for c in clips], pa.int32())
    cols["predictions"] = pa.array([json.dumps(c.predictions) if c is not None else None for c in clips], pa.string())
    cols["vector"] = _vectors([c.vector if c is not None else None for c in clips], dim)
    if identity_dim:
        cols["identity"] = _vectors([c.identity if c is not None else None for c in clips], identity_dim)
    if meta.get("cycle"):
        cols["cycle"] = _vectors([c.cycle if c is not None else None for c in clips], int(meta["cycle"]["dim"]))
    if meta.get("keep_frames"):
        per = [c.frame_vectors if c is not None else None for c in clips]
        flat = np.concatenate([p.reshape(-1) for p in per if p is not None] or [np.zeros(0, np.float32)])
        frames = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32)), dim)
        offsets = np.concatenate([[0], np.cumsum([len(p) if p is not None else 0 for p in per])]).astype(np.int32)
        cols["frame_vectors"] = pa.ListArray.from_arrays(pa.array(offsets), frames,
                                                         mask=pa.array([p is None for p in per], pa.bool_()))
    table = pa.table(cols)
    full = {**meta, "format": SHARD_FORMAT, "version": SHARD_VERSION, "unit": unit.name, "ordinal": unit.ordinal,
            "clips": len(unit.encoded), "failures": sum(not f.is_report for f in unit.failures),
            "report_objects": sum(f.is_report for f in unit.failures)}
    return table.replace_schema_metadata({META_KEY: json.dumps(full, sort_keys=True, default=str).encode()})


def write_shard(path: Path, unit: UnitResult, meta: dict[str, Any], dim: int, identity_dim: int | None) -> Path:
    """Write stage: the unit's shard at ``path``, atomically (temporary file, fsync, rename): a retried unit
    replaces its own shard, and a reader never sees half a shard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(shard_table(unit, meta, dim, identity_dim), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse directory fsync
            pass
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def shard_meta(path: Path) -> dict[str, Any]:
    """A shard's metadata (reads the footer only)."""
    try:
        raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    except (OSError, pa.ArrowException) as exc:
        raise CatalogError(f"unreadable shard {path.name}: {exc}") from exc
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != SHARD_FORMAT:
        raise CatalogError(f"{path.name} is not an echosearch shard")
    if int(meta.get("version", 0)) > SHARD_VERSION:
        raise CatalogError(f"{path.name} has shard version {meta.get('version')}: upgrade echosearch")
    return meta


@dataclasses.dataclass
class ShardRows:
    """A shard read back: clip rows (catalog records, vectors, predictions) and failure rows, in input order."""

    records: list[VideoRecord]
    vectors: np.ndarray
    n_frames: list[int]
    predictions: list[dict[str, float]]
    identity: np.ndarray | None
    frame_vectors: list[np.ndarray] | None
    failures: list[FailureRecord]
    scopes: list[dict[str, Any] | None]
    cycle: np.ndarray | None = None


def _fixed(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    arr = col.combine_chunks()
    return np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), dim), np.float32)


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def shard_rows(table: pa.Table, dim: int, identity_dim: int | None, cycle_dim: int | None = None) -> ShardRows:
    """Decode a shard table (all columns) into catalog records and vectors."""
    kinds = table.column("row_kind").to_pylist()
    clip_idx = [i for i, k in enumerate(kinds) if k == "clip"]
    fail_idx = [i for i, k in enumerate(kinds) if k == "failure"]
    clips, fails = table.take(pa.array(clip_idx, pa.int64())), table.take(pa.array(fail_idx, pa.int64()))
    records = []
    for row in clips.select(list(_RECORD_TYPES) + ["record_extra"]).to_pylist():
        raw_extra = row.pop("record_extra")
        extra = json.loads(raw_extra) if raw_extra else {}
        for k in ("study_date", "birth_date"):
            assert row[k] is None or isinstance(row[k], date)
        records.append(VideoRecord(**row, extra=extra))
    failures = [FailureRecord(int(r["seq"]), r["path"], r["location"], r["sha256"], r["stage"], r["reason"],
                              r["report_study_uid"], r["report_text"])
                for r in fails.select(["seq", "path", "location", "sha256", *_FAILURE_TYPES]).to_pylist()]
    identity = _fixed(clips.column("identity"), identity_dim) if identity_dim and "identity" in clips.column_names \
        else None
    cycle = _fixed(clips.column("cycle"), cycle_dim) if cycle_dim and "cycle" in clips.column_names else None
    frame_vectors = None
    if "frame_vectors" in clips.column_names:
        lists = clips.column("frame_vectors").combine_chunks()
        flat = _fixed(pa.chunked_array([lists.flatten()]), dim) if len(lists) else np.zeros((0, dim), np.float32)
        offsets = lists.offsets.to_numpy()
        frame_vectors = [flat[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]] for i in range(len(lists))]
    return ShardRows(records, _fixed(clips.column("vector"), dim), clips.column("n_frames_used").to_pylist(),
                     [json.loads(p) for p in clips.column("predictions").to_pylist()], identity, frame_vectors,
                     failures, [json.loads(v) if v else None for v in clips.column("scope").to_pylist()], cycle)
