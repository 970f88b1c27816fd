"""The indexing pipeline: scan + encode + store embeddings + predictions + vector indexes.

Decoding runs ahead in worker processes (``ingest.iter_processed``) while this process runs the model on
fixed-size frame batches shared by several videos. Embeddings are committed batch by batch, so a run that
is killed resumes without redoing committed videos or duplicating rows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch import scope
from echosearch.catalog import Catalog
from echosearch.config import Settings
from echosearch.encode import Encoder, l2_normalise, load_encoder
from echosearch.errors import ConfigError
from echosearch.identity_model import IdentityEncoder, load_identity_encoder
from echosearch.ingest import FailedFile, PreparedVideo, ScanSummary, iter_processed, scan, stored_location
from echosearch.zeroshot import (
    PromptBank,
    load_prompts,
    pooling_tasks,
    predict,
    resolve_method,
    study_predictions,
)

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    """What ``index`` did (scan summary plus encoding figures)."""

    scan: dict[str, Any] = field(default_factory=dict)
    videos_encoded: int = 0
    frames_encoded: int = 0
    encode_failed: int = 0
    studies_pooled: int = 0
    reports_embedded: int = 0
    elapsed_s: float = 0.0
    model_seconds: float = 0.0
    identity_seconds: float = 0.0  # part of model_seconds: the identity encoder (head only when it shares the tower)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # setup / scan_encode / finalize
    steady_frames_per_s: float | None = None  # first to last batch of a phase (>= 3): the pipeline when full
    vector_indexes: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return int(self.scan.get("failed", 0)) + self.encode_failed


class _Batcher:
    """Collects prepared videos until a frame batch is full, then encodes and commits them together."""

    def __init__(self, catalog: Catalog, encoder: Encoder, bank: PromptBank, batch_size: int, keep_frames: bool,
                 on_progress: Callable[[int, int], None] | None = None,
                 identity: IdentityEncoder | None = None) -> None:
        self.catalog, self.encoder, self.bank, self.identity = catalog, encoder, bank, identity
        self.identity_seconds = 0.0
        self.batch_size, self.keep_frames = batch_size, keep_frames
        self.keys: list[int] = []
        self.scopes: list[scope.ClipScope] = []  # cheap scope of each clip (model evidence: scope.finalize)
        self.frames: list[np.ndarray] = []
        self.n_frames = 0
        self.videos = 0
        self.total_frames = 0
        self.model_seconds = 0.0
        self.on_progress = on_progress
        self.flushes = 0
        self.phase_start: tuple[float, int, int] | None = None  # (time, frames, flushes) at this phase's 1st commit
        self.last_commit = 0.0
        self.best_rate: tuple[int, float] | None = None  # (batches, frames/s) of the longest phase so far
        self.kill_after = int(os.environ.get("ECHOSEARCH_FAULT_KILL_AFTER_COMMITS", "0") or 0)

    def add(self, key: int, prepared: PreparedVideo) -> None:
        self.keys.append(key)
        self.scopes.append(scope.cheap_scope(prepared.record.path, prepared.frames, prepared.meta.n_frames,
                                             kind=prepared.record.kind))
        self.frames.append(prepared.frames)
        self.n_frames += len(prepared.frames)
        if self.n_frames >= self.batch_size:
            self.flush()

    def end_phase(self) -> None:
        """Close a run of batches (scan, then videos left by an earlier run): the pause between phases is
        not pipeline throughput. A phase needs 3 commits (2 intervals) to give a rate."""
        if self.phase_start is not None:
            t0, frames0, flushes0 = self.phase_start
            n = self.flushes - flushes0 + 1
            if n >= 3 and self.last_commit > t0 and (self.best_rate is None or n > self.best_rate[0]):
                self.best_rate = (n, (self.total_frames - frames0) / (self.last_commit - t0))
        self.phase_start = None

    def flush(self) -> None:
        if not self.keys:
            return
        t0 = time.perf_counter()
        allf = np.concatenate(self.frames)
        vecs = self.encoder.encode_frames(allf, batch_size=2 * self.batch_size)  # bounded: all-frames clips are long
        video_vecs, frame_vecs, counts, preds = [], [], [], []
        start = 0
        for f in self.frames:
            fv = vecs[start:start + len(f)]
            start += len(f)
            video_vecs.append(l2_normalise(fv.mean(axis=0)))
            frame_vecs.append(fv)
            counts.append(len(f))
        t1 = time.perf_counter()
        ident = self.identity.video_vectors(self.frames, frame_vecs) if self.identity is not None else None
        self.identity_seconds += time.perf_counter() - t1
        self.model_seconds += time.perf_counter() - t0
        # out-of-scope clips (not echo, colour Doppler) get no zero-shot values: they would mean nothing
        preds = [predict(self.bank, fv) if sc.in_scope else {} for fv, sc in zip(frame_vecs, self.scopes, strict=True)]
        with self.catalog.transaction():
            self.catalog.store_scope(pl.DataFrame([sc.row(k) for k, sc in zip(self.keys, self.scopes, strict=True)],
                                                  schema=scope.SCOPE_COLUMNS))
            self.catalog.store_video_embeddings(self.keys, np.stack(video_vecs), counts,
                                                frame_vecs if self.keep_frames else None)
            if ident is not None:
                self.catalog.store_identity_embeddings("video_identity", self.keys, ident, counts)
            store_predictions(self.catalog, "video", self.keys, preds, self.encoder.name)
        self.videos += len(self.keys)
        self.flushes += 1
        if self.kill_after and self.flushes >= self.kill_after:  # fault injection for the resume test
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        self.total_frames += len(allf)
        self.last_commit = time.perf_counter()
        self.phase_start = self.phase_start or (self.last_commit, self.total_frames, self.flushes)
        if self.on_progress:
            self.on_progress(self.videos, self.total_frames)
        self.keys, self.frames, self.n_frames, self.scopes = [], [], 0, []


def store_predictions(catalog: Catalog, level: str, keys: Sequence[int], preds: Sequence[dict[str, float]],
                      model: str) -> None:
    """Upsert zero-shot predictions for ``keys`` (one row per key and task)."""
    rows = [(level, int(k), task, float(v), model) for k, p in zip(keys, preds, strict=True) for task, v in p.items()]
    if not rows:
        return
    frame = pl.DataFrame(rows, schema=[("level", pl.String), ("key", pl.Int64), ("task", pl.String),
                                       ("value", pl.Float64), ("model", pl.String)], orient="row")
    catalog.insert_frame("predictions", frame, replace=True)


def stale_studies(catalog: Catalog) -> list[int]:
    """Studies whose vector is missing or pools a different number of encoded videos than they now have.

    Derived from the catalog rather than from what this run encoded, so a run killed between encoding and
    pooling is completed by the next one."""
    in_scope = ("LEFT JOIN clip_scope c USING (video_key) WHERE c.in_scope IS NOT FALSE "
                if catalog.has_scope() else "")  # study vectors pool in-scope clips only
    rows = catalog.con.sql(
        "SELECT v.study_key FROM videos v JOIN video_embeddings e USING (video_key) "
        "LEFT JOIN study_embeddings s USING (study_key) " + in_scope +
        "GROUP BY v.study_key HAVING count(*) <> coalesce(any_value(s.n_videos), 0) ORDER BY v.study_key"
    ).fetchall()
    return [int(r[0]) for r in rows]


def pool_studies(catalog: Catalog, model_name: str, study_keys: list[int] | None = None) -> int:
    """Study vectors (mean of video vectors, re-normalised) and study predictions for ``study_keys``
    (default: the stale ones); only those studies' videos are read."""
    study_keys = stale_studies(catalog) if study_keys is None else sorted(study_keys)
    if not study_keys:
        return 0
    owner = dict(catalog.con.execute(
        "SELECT video_key, study_key FROM videos WHERE study_key IN (SELECT unnest(?::BIGINT[]))",
        [study_keys]).fetchall())
    out = catalog.out_of_scope_videos()  # identity and change compare in-scope clips only
    ids, vecs = catalog.embeddings("video", [k for k in owner if k not in out])
    by_study: dict[int, list[int]] = {}
    for i, vk in enumerate(ids):
        by_study.setdefault(int(owner[int(vk)]), []).append(i)
    study_keys = sorted(by_study)
    if not study_keys:
        return 0
    study_vecs = np.stack([l2_normalise(vecs[by_study[s]].mean(axis=0)) for s in study_keys])
    counts = [len(by_study[s]) for s in study_keys]
    pred_rows = catalog.con.execute(
        "SELECT key, task, value FROM predictions WHERE level = 'video' AND key IN (SELECT unnest(?::BIGINT[]))",
        [[int(k) for k in ids]]).fetchall()
    vpreds: dict[int, dict[str, float]] = {}
    for k, task, v in pred_rows:
        vpreds.setdefault(int(k), {})[task] = float(v)
    binary, categorical = pooling_tasks(catalog.get_manifest("zeroshot"))
    spreds = [study_predictions([vpreds[int(ids[i])] for i in by_study[s] if int(ids[i]) in vpreds], binary,
                                categorical) for s in study_keys]
    with catalog.transaction():
        catalog.store_level_embeddings("study", study_keys, study_vecs, counts)
        store_predictions(catalog, "study", study_keys, spreds, model_name)
        if catalog.has_identity():
            pool_identity(catalog, {k: s for k, s in owner.items() if k not in out})
    return len(study_keys)


def pool_identity(catalog: Catalog, owner: dict[int, int]) -> None:
    """Study identity vectors (mean of the studies' video identity vectors, re-normalised) for the videos of
    ``owner`` (video key -> study key)."""
    ids, vecs = catalog.embeddings("video_identity", list(owner))
    by_study: dict[int, list[int]] = {}
    for i, vk in enumerate(ids):
        by_study.setdefault(int(owner[int(vk)]), []).append(i)
    keys = sorted(by_study)
    if keys:
        catalog.store_identity_embeddings("study_identity", keys,
                                          np.stack([l2_normalise(vecs[by_study[s]].mean(axis=0)) for s in keys]),
                                          [len(by_study[s]) for s in keys])


def embed_reports(catalog: Catalog, encoder: Encoder) -> int:
    """Text vectors of reports that have none yet (report-level search, preliminary interpretation)."""
    rows = catalog.con.sql(
        "SELECT r.study_key, r.text FROM reports r LEFT JOIN report_embeddings e USING (study_key) "
        "WHERE e.study_key IS NULL ORDER BY r.study_key"
    ).fetchall()
    if not rows:
        return 0
    vecs = encoder.encode_text([t for _, t in rows])
    catalog.store_level_embeddings("report", [int(k) for k, _ in rows], vecs)
    return len(rows)


def embed_file(path: Path, encoder: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """One file -> (video vector, frame vectors) with the encoder's own policy (query by upload)."""
    from echosearch.discover import inspect_file
    from echosearch.ingest import process_file

    prepared = process_file(inspect_file(Path(path)), encoder.policy)
    fv = encoder.encode_frames(prepared.frames)
    return l2_normalise(fv.mean(axis=0)), fv


def identity_encoder(catalog: Catalog, content: Encoder, settings: Settings) -> IdentityEncoder | None:
    """The identity encoder of an indexing run (``identity_model``, else the one the index recorded), bound to
    the catalog; None when identity uses the content vectors."""
    stored = catalog.get_manifest("identity_model")
    spec = settings.identity_model or (stored or {}).get("source")
    if not spec:
        return None
    enc = load_identity_encoder(spec, content, device=settings.device)
    catalog.bind_identity(enc.manifest)
    return enc


def match_vector(catalog: Catalog, path: Path, encoder: Encoder) -> np.ndarray:
    """A file's vector for patient matching: its identity vector when the index has identity vectors (the
    identity encoder the index recorded), else its content video vector."""
    from echosearch.discover import inspect_file
    from echosearch.ingest import process_file

    prepared = process_file(inspect_file(Path(path)), encoder.policy)
    fv = encoder.encode_frames(prepared.frames)
    stored = catalog.get_manifest("identity_model")
    if not catalog.has_identity():
        return l2_normalise(fv.mean(axis=0))
    ident = load_identity_encoder(str(stored["source"]), encoder)
    if ident.weights != stored.get("weights_sha256"):
        raise ConfigError(f"the identity model {stored.get('name')} at {stored.get('source')} has changed since "
                          "this index was built: its vectors would not match the index's")
    return ident.video_vectors([prepared.frames], [fv])[0]


def index_sources(sources: Sequence[Path], index_dir: Path, settings: Settings, *, encoder: Encoder | None = None,
                  reports: Path | None = None, labels: Path | None = None, progress: bool = True,
                  build_vectors: bool = True, catalog: Catalog | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> IndexSummary:
    """Scan, encode and index ``sources`` into ``index_dir``; only new files are processed.

    ``catalog``: write through this open catalog (a server's cursor; left open) instead of opening the
    folder. Every batch of videos is its own transaction, so readers of the same database see each one.
    ``on_progress(videos, frames)`` is called after each committed batch."""
    t0 = time.perf_counter()
    enc = encoder or load_encoder(settings.model, device=settings.device, frames_per_video=settings.frames_per_video,
                                  policy=settings.frame_policy, sampling=settings.frame_sampling)
    summary = IndexSummary()
    with nullcontext(catalog) if catalog is not None else Catalog.open(index_dir, create=True) as cat:
        ident = enc.identity
        cat.bind_model(ident)
        if cat.get_manifest("model_source") is None:
            cat.set_manifest("model_source", settings.model)
        id_enc = identity_encoder(cat, enc, settings)
        method = resolve_method(settings.zeroshot_method, enc.source.spec)
        prompts = load_prompts(str(settings.zeroshot_prompts)) if settings.zeroshot_prompts else None
        bank = PromptBank.build(enc, prompts, method=method)
        done = cat.get_manifest("zeroshot") or ({"method": "contrast", "prompts": "echosearch"}
                                                if cat.counts()["predictions"] else None)
        if done and (done.get("method"), done.get("prompts")) != (bank.method, bank.source):
            raise ConfigError(f"{index_dir} holds zero-shot predictions by method {done.get('method')} with prompts "
                              f"{done.get('prompts')}; this run would use {bank.method} with {bank.source}: set "
                              "zeroshot_method/zeroshot_prompts to match, or index into a new folder")
        cat.set_manifest("zeroshot", bank.manifest())
        batcher = _Batcher(cat, enc, bank, settings.batch_size, settings.keep_frame_embeddings, identity=id_enc,
                           on_progress=on_progress)
        t_setup = time.perf_counter()
        scan_summary: ScanSummary = scan(list(sources), cat, settings, policy=enc.policy, reports=reports,
                                         labels=labels, progress=progress, on_video=batcher.add)
        batcher.flush()
        batcher.end_phase()
        # videos scanned earlier (or by an interrupted run) but not yet encoded
        pending = cat.unencoded_videos()
        if pending.height:
            from echosearch.discover import FileRecord
            from echosearch.pseudonym import Pseudonymizer

            pz = Pseudonymizer(settings.require_secret())
            where = cat.locations(pending["video_key"].to_list(), pz)
            records = [FileRecord(path=where[int(r["video_key"])], size=0, sha256=r["sha256"], kind=r["kind"])
                       for r in pending.iter_rows(named=True)]
            key_of = {r["sha256"]: int(r["video_key"]) for r in pending.iter_rows(named=True)}
            for item in iter_processed(records, enc.policy, settings.workers):
                if isinstance(item, FailedFile):
                    shown, location = stored_location(item.path, pz, settings.store_raw_identifiers)
                    cat.record_error(shown, item.sha256, item.stage, item.reason, location)
                    summary.encode_failed += 1
                    continue
                batcher.add(key_of[item.record.sha256], item)
            batcher.flush()
            batcher.end_phase()
        t_encoded = time.perf_counter()
        summary.scan = asdict(scan_summary)
        summary.videos_encoded = batcher.videos
        summary.frames_encoded = batcher.total_frames
        summary.model_seconds = round(batcher.model_seconds, 3)
        summary.identity_seconds = round(batcher.identity_seconds, 3)
        scope.finalize(cat, enc)  # model evidence and views; before pooling, which leaves out-of-scope clips out
        summary.studies_pooled = pool_studies(cat, enc.name)
        summary.reports_embedded = embed_reports(cat, enc)
        if build_vectors:
            from echosearch.vectorindex import build_all

            built = build_all(cat)
            summary.vector_indexes = {lvl: vi.manifest for lvl, vi in built.items()}
        summary.counts = cat.counts()
    t_end = time.perf_counter()
    summary.elapsed_s = round(t_end - t0, 3)
    summary.stage_seconds = {"setup": round(t_setup - t0, 3), "scan_encode": round(t_encoded - t_setup, 3),
                             "finalize": round(t_end - t_encoded, 3)}
    if batcher.best_rate:
        summary.steady_frames_per_s = round(batcher.best_rate[1], 2)
    return summary
