"""Compare two indexes' catalogs row by row (the Ray runner against the local runner on the same files).

Rows are compared by their keys and every column, except the times a run stamps (``scanned_at``,
``encoded_at``, ``occurred_at``, runs) and sealed locations (AES-GCM with a random nonce: compared unsealed,
as the file paths they open). Vectors and zero-shot values may differ by ``atol`` (batching changes the order
of float sums).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from echosearch.catalog import EMBEDDING_LEVELS, IDENTITY_LEVELS, Catalog

_TABLES = {
    "patients": "SELECT * FROM patients ORDER BY patient_key",
    "studies": "SELECT * FROM studies ORDER BY study_key",
    "videos": "SELECT * EXCLUDE (scanned_at, encoded_at, location) FROM videos ORDER BY video_key",
    "reports": "SELECT * FROM reports ORDER BY study_key",
    "labels": "SELECT * FROM labels ORDER BY level, key, name",
    "ingest_errors": "SELECT path, sha256, stage, reason FROM ingest_errors ORDER BY path, stage",
}


def catalog_differences(a: Path, b: Path, atol: float = 1e-6) -> list[str]:
    """What differs between the catalogs of index folders ``a`` and ``b`` (empty: the same rows and vectors)."""
    out: list[str] = []
    with Catalog.open(a, read_only=True) as ca, Catalog.open(b, read_only=True) as cb:
        for name, sql in _TABLES.items():
            ta, tb = ca.con.sql(sql).pl(), cb.con.sql(sql).pl()
            if ta.shape != tb.shape or not ta.equals(tb):
                out.append(f"{name}: {ta.height} vs {tb.height} rows differ")
        if ca.has_table("clip_scope") or cb.has_table("clip_scope"):
            sql = "SELECT * FROM clip_scope ORDER BY video_key"
            sa, sb = (c.con.sql(sql).pl() if c.has_table("clip_scope") else pl.DataFrame() for c in (ca, cb))
            fl = [n for n, t in sa.schema.items() if t == pl.Float64]
            if sa.drop(fl).equals(sb.drop(fl)) is False or sa.shape != sb.shape:
                out.append("clip_scope rows differ")
            elif fl and (gap := max(float(np.nanmax(np.abs(sa[c].to_numpy() - sb[c].to_numpy()), initial=0.0))
                                    for c in fl)) > atol:
                out.append(f"clip_scope confidences differ by up to {gap:.3g}")
        if ca.locations(None) != cb.locations(None):
            out.append("videos: sealed locations open to different files")
        pa_, pb = (c.con.sql("SELECT level, key, task, model, value FROM predictions ORDER BY level, key, task").pl()
                   for c in (ca, cb))
        if pa_.drop("value").equals(pb.drop("value")) is False or pa_.height != pb.height:
            out.append(f"predictions: {pa_.height} vs {pb.height} rows or keys differ")
        else:
            gap = float(np.max(np.abs(pa_["value"].to_numpy() - pb["value"].to_numpy()), initial=0.0))
            if gap > atol:
                out.append(f"predictions: values differ by up to {gap:.3g}")
        for level in EMBEDDING_LEVELS + IDENTITY_LEVELS:
            if level in IDENTITY_LEVELS and not (ca.has_identity() or cb.has_identity()):
                continue
            (ia, va), (ib, vb) = ca.embeddings(level), cb.embeddings(level)
            if not np.array_equal(ia, ib):
                out.append(f"{level} vectors: keys differ ({len(ia)} vs {len(ib)})")
            elif len(ia) and (gap := float(np.abs(va - vb).max())) > atol:
                out.append(f"{level} vectors: differ by up to {gap:.3g}")
        counts = ("SELECT video_key, n_frames_used FROM video_embeddings ORDER BY video_key",
                  "SELECT study_key, n_videos FROM study_embeddings ORDER BY study_key")
        for sql in counts:
            if not ca.con.sql(sql).pl().equals(cb.con.sql(sql).pl()):
                out.append(f"counts differ: {sql}")
        fa, fb = ca.has_table("frame_embeddings"), cb.has_table("frame_embeddings")
        if fa and fb:
            keys = [int(k) for k in ia] if len(ia := ca.embeddings("video")[0]) else []
            ra, rb = ca.frame_embeddings(keys), cb.frame_embeddings(keys)
            if ra.keys() != rb.keys() or any(ra[k].shape != rb[k].shape or np.abs(ra[k] - rb[k]).max() > atol
                                             for k in ra):
                out.append("frame vectors differ")
    return out

