"""``echosearch merge``: load shards into the catalog idempotently, then pool studies and build the vector indexes.

Shards are merged in plan order (run, then the unit's position in it, then the input's position in the
unit), which is the local runner's discovery order, so the catalog keys come out as the local runner's. A
file is identified by its content hash: a clip whose hash the catalog already holds with a vector is
skipped, and an ``ingest_errors`` row already present is not written again, so a merge that is run twice,
or interrupted and run again, changes nothing the second time. Each shard is one transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from echosearch.catalog import Catalog
from echosearch.config import Settings
from echosearch.errors import ConfigError
from echosearch.ingest.discover import Sidecars
from echosearch.ingest.pseudonym import Pseudonymizer
from echosearch.run.finish import finish_index
from echosearch.run.records import EncodedClip, FailureRecord
from echosearch.run.shards import read_shard, shard_meta, shard_rows
from echosearch.run.units import SHARD_DIR
from echosearch.run.write import attach_sidecars, write_encoded, write_failure

SIDECAR_PREFIX = "sidecars-"
DEFAULT_CHUNK_ROWS = 65_536


@dataclass
class MergeSummary:
    """What a merge did."""

    shards: int = 0
    shards_merged: int = 0
    videos_added: int = 0
    videos_known: int = 0
    failures_recorded: int = 0
    studies_pooled: int = 0
    reports_embedded: int = 0
    reports_attached: int = 0
    labels_recorded: int = 0
    vector_indexes_built: bool = False
    elapsed_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def shard_files(index_dir: Path) -> list[tuple[dict[str, Any], Path]]:
    """The index folder's shards with their metadata, in merge order (run, plan position, name)."""
    folder = Path(index_dir) / SHARD_DIR
    found = [(shard_meta(p), p) for p in sorted(folder.glob("*.parquet")) if not p.name.startswith(SIDECAR_PREFIX)]
    return sorted(found, key=lambda mp: (str(mp[0].get("run", "")), int(mp[0].get("ordinal", 0)), mp[1].name))


def bind_from_shard(cat: Catalog, meta: dict[str, Any]) -> None:
    """Record (or check) the shard's model, identity model, zero-shot method and pseudonym key in the catalog."""
    cat.check_pseudonym_key(str(meta["secret_fingerprint"]))
    cat.bind_model(meta["model"])
    if cat.get_manifest("model_source") is None:
        cat.set_manifest("model_source", meta["model_source"])
    if meta.get("identity_model"):
        cat.bind_identity(meta["identity_model"])
    elif cat.get_manifest("identity_model") is not None:
        raise ConfigError(f"{cat.index_dir} has identity vectors; shard {meta.get('unit')} has none: index its "
                          "files with the same identity model")
    if meta.get("cycle"):
        if cat.bind_cycle(meta["cycle"], True) is None:  # refuses other cycle vectors too
            raise ConfigError(f"{cat.index_dir} holds videos without cycle vectors; shard {meta.get('unit')} has "
                              "them: index its files with the same cycle_vectors setting")
    elif cat.has_cycle():
        raise ConfigError(f"{cat.index_dir} stores cycle vectors; shard {meta.get('unit')} has none: index its "
                          "files with the same cycle_vectors setting")
    zs, done = meta["zeroshot"], cat.get_manifest("zeroshot")
    if done is None:
        cat.set_manifest("zeroshot", zs)
    elif (done.get("method"), done.get("prompts")) != (zs.get("method"), zs.get("prompts")):
        raise ConfigError(f"{cat.index_dir} holds zero-shot predictions by method {done.get('method')} with prompts "
                          f"{done.get('prompts')}; shard {meta.get('unit')} has {zs.get('method')} with "
                          f"{zs.get('prompts')}")


def write_sidecars(index_dir: Path, side: Sidecars, run: str) -> Path | None:
    """The reports and labels that came with the sources, as ``shards/sidecars-<content hash>.parquet`` (the
    merge attaches them to the catalog's studies and videos, as the local scan does)."""
    import hashlib

    rows: list[tuple[str, str, str, str | None, str | None, float | None, str]] = [
        ("report", k, key, None, text, None, src) for k, key, text, src in side.reports]
    rows += [("label", k, key, name, None if isinstance(v, float) else str(v), v if isinstance(v, float) else None,
              src) for k, key, name, v, src in side.labels]
    if not rows:
        return None
    names = ("what", "key_kind", "key", "name", "text", "number", "source")
    types = (pa.string(),) * 5 + (pa.float64(), pa.string())
    table = pa.table({n: pa.array([r[i] for r in rows], t) for i, (n, t) in enumerate(zip(names, types, strict=True))})
    digest = hashlib.sha256(json.dumps(rows, default=str).encode()).hexdigest()[:32]
    path = Path(index_dir) / SHARD_DIR / f"{SIDECAR_PREFIX}{digest}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table.replace_schema_metadata({b"echosearch": json.dumps({"run": run}).encode()}), tmp)
        tmp.replace(path)
    return path


def load_sidecar_files(index_dir: Path) -> Sidecars:
    side = Sidecars()
    files = sorted((Path(index_dir) / SHARD_DIR).glob(f"{SIDECAR_PREFIX}*.parquet"),
                   key=lambda p: (json.loads((pq.read_schema(p).metadata or {}).get(b"echosearch", b"{}")).get("run", ""),
                                  p.name))
    for path in files:
        for r in pq.read_table(path).to_pylist():
            if r["what"] == "report":
                side.reports.append((r["key_kind"], r["key"], r["text"], r["source"]))
            else:
                value = r["number"] if r["number"] is not None else r["text"]
                side.labels.append((r["key_kind"], r["key"], r["name"], value, r["source"]))
    return side


def merge_shards(index_dir: Path, settings: Settings, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 on_shard: Callable[[int, int], None] | None = None, encoder: Any = None) -> MergeSummary:
    """Load every shard of ``index_dir`` into its catalog (idempotent), attach reports and labels, pool study
    vectors and predictions, embed new reports, and build the vector indexes chunk by chunk when stale.

    ``encoder``: the index's encoder when the caller has it loaded (else it is loaded when needed: scope
    model evidence and report text vectors)."""
    t0 = time.perf_counter()
    summary = MergeSummary()
    shards = shard_files(index_dir)
    summary.shards = len(shards)
    pz = Pseudonymizer(settings.require_secret())
    sr_reports: list[tuple[str, str, str, str]] = []
    bound: set[str] = set()
    with Catalog.open(index_dir, create=True) as cat:
        cat.check_pseudonym_key(pz.fingerprint())
        for i, (meta, path) in enumerate(shards):
            ident = json.dumps({k: meta.get(k) for k in ("model", "identity_model", "zeroshot", "secret_fingerprint",
                                                         "model_source")}, sort_keys=True, default=str)
            if ident not in bound:
                bind_from_shard(cat, meta)
                bound.add(ident)
            if _merge_one(cat, meta, path, summary, sr_reports):
                summary.shards_merged += 1
            if on_shard:
                on_shard(i + 1, len(shards))
        side = load_sidecar_files(index_dir)
        side.reports.extend(sr_reports)
        attached = attach_sidecars(cat, side, pz)
        summary.reports_attached, summary.labels_recorded = attached.reports_attached, attached.labels_recorded
        lazy = _LazyEncoder(cat, settings.device, encoder)
        finished = finish_index(cat, lazy.get, build_vectors=lambda: not _vectors_current(cat), chunk_rows=chunk_rows)
        summary.studies_pooled, summary.reports_embedded = finished.studies_pooled, finished.reports_embedded
        summary.vector_indexes_built = bool(finished.vector_indexes)
        if summary.shards_merged:
            cat.new_run("merge", {"shards": summary.shards, "merged": summary.shards_merged,
                                  "videos_added": summary.videos_added})
        summary.counts = cat.counts()
    summary.elapsed_s = round(time.perf_counter() - t0, 3)
    return summary


def _merge_one(cat: Catalog, meta: dict[str, Any], path: Path, summary: MergeSummary,
               sr_reports: list[tuple[str, str, str, str]]) -> bool:
    """Merge one shard in one transaction (the write stage of the local runner); False when the catalog
    already holds all of it."""
    cheap = read_shard(path, ["row_kind", "seq", "sha256", "path", "stage", "report_study_uid", "report_text"])
    rows = cheap.to_pylist()
    for r in rows:
        if r["row_kind"] == "failure" and r["report_text"] and r["report_study_uid"]:
            sr_reports.append(("study_uid", r["report_study_uid"], r["report_text"], "dicom-sr"))
    clip_hashes = [r["sha256"] for r in rows if r["row_kind"] == "clip"]
    done = cat.encoded_among(clip_hashes)
    errors = cat.recorded_errors([r["path"] for r in rows if r["row_kind"] == "failure"])
    new_fail = {(r["path"], r["sha256"] or "", r["stage"]) for r in rows if r["row_kind"] == "failure"} - errors
    summary.videos_known += len(done)
    if len(done) == len(clip_hashes) and not new_fail:
        return False
    dim = int(meta["model"]["embed_dim"])
    idim = int(meta["identity_model"]["embed_dim"]) if meta.get("identity_model") else None
    data = shard_rows(read_shard(path), dim, idim, int(meta["cycle"]["dim"]) if meta.get("cycle") else None)
    fails: list[FailureRecord] = [f for f in data.failures if (f.path, f.sha256 or "", f.stage) in new_fail]
    clips = [EncodedClip(i, rec, data.vectors[i], data.n_frames[i], data.predictions[i],
                         data.frame_vectors[i] if data.frame_vectors is not None else None,
                         data.identity[i] if data.identity is not None else None, data.scopes[i],
                         data.cycle[i] if data.cycle is not None else None)
             for i, rec in enumerate(data.records) if rec.sha256 not in done]
    with cat.transaction():
        for f in fails:
            summary.failures_recorded += write_failure(cat, f)
        if clips:
            write_encoded(cat, clips, str(meta["model"]["name"]))
            summary.videos_added += len(clips)
    return True


class _LazyEncoder:
    """The index's own encoder, loaded on first use (a merge with nothing new loads no model)."""

    def __init__(self, cat: Catalog, device: str, encoder: Any = None) -> None:
        self.cat, self.device = cat, device
        self.encoder: Any = encoder

    def get(self) -> Any:
        if self.encoder is None:
            from echosearch.model.encode import encoder_for_index

            self.encoder = encoder_for_index(self.cat, device=self.device)
        return self.encoder


def _vectors_current(cat: Catalog) -> bool:
    """Whether every level's vector index exists and matches the catalog (then a merge leaves it alone)."""
    from echosearch.errors import IndexMismatchError
    from echosearch.store.vectorindex import IDENTITY_LEVELS, LEVELS, check_manifest, read_manifest

    for level in LEVELS + (IDENTITY_LEVELS if cat.has_identity() else ()):
        manifest = read_manifest(cat.index_dir, level)
        if manifest is None or not (cat.index_dir / "vectors" / f"{level}.faiss").exists():
            return False
        try:
            check_manifest(manifest, cat, level)
        except IndexMismatchError:
            return False
    return True
