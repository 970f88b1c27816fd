"""Write stage into a catalog: records (+ vectors) -> catalog rows, one transaction per batch.

The local runner writes each encoded batch here as it comes; the merge writes each shard's rows here. A
batch is atomic: its videos, patients, studies, scope rows, vectors, identity vectors and zero-shot values
land together or not at all, so a run that is killed loses at most the batch in flight and a re-run finds
those files again. A row the catalog refuses costs only its own file (an ``ingest_errors`` row, stage
``catalog``). Reports and labels from sidecar files are attached after the clips (:func:`attach_sidecars`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl

from echosearch.catalog import Catalog, VideoRecord
from echosearch.errors import CatalogError
from echosearch.ingest.discover import Sidecars
from echosearch.ingest.pseudonym import Pseudonymizer
from echosearch.run.records import ClipRecord, EncodedClip, FailureRecord

log = logging.getLogger(__name__)
C = TypeVar("C", ClipRecord, EncodedClip)


def write_failure(cat: Catalog, f: FailureRecord) -> bool:
    """One ``ingest_errors`` row (replacing the file's earlier row of the same stage); False when even that
    cannot be recorded (logged: one unrecordable row must not end the run)."""
    try:
        cat.record_error(f.path, f.sha256, f.stage, f.reason, f.location)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record an ingest_errors row (%s): %s", f.stage, exc)
        return False
    return True


def store_predictions(catalog: Catalog, level: str, keys: Sequence[int], preds: Sequence[dict[str, float]],
                      model: str) -> None:
    """Upsert zero-shot predictions for ``keys`` (one row per key and task)."""
    rows = [(level, int(k), task, float(v), model) for k, p in zip(keys, preds, strict=True) for task, v in p.items()]
    if not rows:
        return
    frame = pl.DataFrame(rows, schema=[("level", pl.String), ("key", pl.Int64), ("task", pl.String),
                                       ("value", pl.Float64), ("model", pl.String)], orient="row")
    catalog.insert_frame("predictions", frame, replace=True)


def _record(clip: ClipRecord | EncodedClip) -> VideoRecord:
    assert clip.record is not None, "a query clip has no catalog row"
    return clip.record


def write_rows(cat: Catalog, clips: Sequence[ClipRecord]) -> list[int]:
    """Catalog rows of read clips without vectors (``scan``), one transaction; returns their video keys."""
    recs = [_record(c) for c in clips]
    with cat.transaction():
        keys = cat.record_videos(recs)
        cat.clear_errors([r.path for r in recs])
    return [keys[r.sha256] for r in recs]


def write_encoded(cat: Catalog, clips: Sequence[EncodedClip], model_name: str) -> list[int]:
    """Rows, scope, content vectors (+ frame vectors), identity and cycle vectors and zero-shot values of encoded clips,
    in one transaction; returns their video keys (a file already in the catalog keeps its key)."""
    first: dict[str, EncodedClip] = {}
    for c in clips:
        first.setdefault(_record(c).sha256, c)  # one file, one row (the read stage already drops copies)
    todo = list(first.values())
    if not todo:
        return []
    recs = [_record(c) for c in todo]
    with cat.transaction():
        keys_of = cat.record_videos(recs)
        cat.clear_errors([r.path for r in recs])
        keys = [keys_of[r.sha256] for r in recs]
        scopes = [{"video_key": k, **c.scope} for k, c in zip(keys, todo, strict=True) if c.scope is not None]
        if scopes and cat.has_scope():
            from echosearch.model.scope import SCOPE_COLUMNS

            cat.store_scope(pl.DataFrame(scopes, schema=SCOPE_COLUMNS))
        counts = [c.n_frames for c in todo]
        frames = [c.frame_vectors for c in todo]
        kept = None if any(f is None for f in frames) else [f for f in frames if f is not None]
        cat.store_video_embeddings(keys, np.stack([c.vector for c in todo]), counts, kept)
        idents = [c.identity for c in todo]
        if all(v is not None for v in idents):
            cat.store_identity_embeddings("video_identity", keys, np.stack(idents), counts)  # type: ignore[arg-type]
        if cat.has_cycle():  # every clip of such an index has one (a missing one would hide the rest from the probe)
            cycles = [c.cycle for c in todo if c.cycle is not None]
            if len(cycles) != len(todo):
                raise CatalogError(f"{len(todo) - len(cycles)} of {len(todo)} clips have no cycle vector; this index "
                                   "stores them")
            cat.store_cycle_vectors(keys, np.stack(cycles))
        store_predictions(cat, "video", keys, [c.predictions for c in todo], model_name)
    return keys


def write_batch(cat: Catalog, batch: Sequence[C], write: Callable[[Catalog, Sequence[C]], list[int]],
                ) -> tuple[list[tuple[C, int]], list[FailureRecord]]:
    """``write`` the batch in one transaction; when the catalog refuses it, each clip on its own, so that a
    refused row costs only its file (returned as a ``catalog`` failure, already recorded)."""
    try:
        return list(zip(batch, write(cat, batch), strict=True)), []
    except Exception:  # noqa: BLE001 - find the row at fault
        pass
    done: list[tuple[C, int]] = []
    refused: list[FailureRecord] = []
    for clip in batch:
        try:
            done.append((clip, write(cat, [clip])[0]))
        except Exception as exc:  # noqa: BLE001
            rec = _record(clip)
            fail = FailureRecord(clip.seq, rec.path, rec.location, rec.sha256, "catalog",
                                 f"could not be recorded in the catalog [{type(exc).__name__}: {exc}]")
            write_failure(cat, fail)
            refused.append(fail)
    return done, refused


@dataclass
class SidecarCounts:
    reports_attached: int = 0
    reports_unmatched: int = 0
    labels_recorded: int = 0
    labels_unmatched: int = 0


def attach_sidecars(catalog: Catalog, side: Sidecars, pz: Pseudonymizer) -> SidecarCounts:
    """Attach reports and labels to what the catalog holds (this run's and earlier runs' videos)."""
    out = SidecarCounts()
    if not side.reports and not side.labels:
        return out
    rows = catalog.sidecar_targets()
    where = catalog.locations(None, pz)  # the files' own names (the catalog shows labels)
    by_file: dict[str, tuple[int, str]] = {}
    for vkey, _, suid, _, _ in rows:
        by_file.setdefault(where[vkey].name, (vkey, suid))
        by_file.setdefault(where[vkey].stem, (vkey, suid))
    by_sop = {sop: vkey for vkey, sop, *_ in rows if sop}
    by_acc = {acc: suid for _, _, suid, acc, _ in rows if acc}
    study_keys = {suid: skey for _, _, suid, _, skey in rows}

    def file_hit(key: str) -> tuple[int, str] | None:
        return by_file.get(key) or by_file.get(Path(key).name)

    for kind, key, text, source in side.reports:
        hit = file_hit(key)
        study = {"study_uid": key if key in study_keys else None, "file": hit[1] if hit else None,
                 "accession": by_acc.get(pz.accession(key) or "")}[kind]
        attached = study is not None and catalog.record_report(study, text, source)
        out.reports_attached += attached
        out.reports_unmatched += not attached
    for kind, key, name, value, source in side.labels:
        target: tuple[str, int] | None = None
        if kind == "file" and (hit := file_hit(key)):
            target = ("video", hit[0])
        elif kind == "sop_uid" and key in by_sop:
            target = ("video", by_sop[key])
        elif kind == "study_uid" and key in study_keys:
            target = ("study", study_keys[key])
        if target is None:
            out.labels_unmatched += 1
            continue
        catalog.record_label(target[0], target[1], name, value, source)
        out.labels_recorded += 1
    return out
