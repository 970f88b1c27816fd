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

from echosearch.catalog import Catalog
from echosearch.store.schema import EMBEDDING_LEVELS, IDENTITY_LEVELS

_EXACT = ("patients", "studies", "videos", "reports", "labels", "ingest_errors")


def _gap(a: pl.DataFrame, b: pl.DataFrame, columns: list[str]) -> float:
    """Largest absolute difference between float ``columns`` of two frames of the same shape."""
    return max((float(np.nanmax(np.abs(a[c].to_numpy() - b[c].to_numpy()), initial=0.0)) for c in columns),
               default=0.0)


def catalog_differences(a: Path, b: Path, atol: float = 1e-6) -> list[str]:
    """What differs between the catalogs of index folders ``a`` and ``b`` (empty: the same rows and vectors)."""
    out: list[str] = []
    with Catalog.open(a, read_only=True) as ca, Catalog.open(b, read_only=True) as cb:
        for name in _EXACT:
            ta, tb = ca.compared_rows(name), cb.compared_rows(name)
            if ta.shape != tb.shape or not ta.equals(tb):
                out.append(f"{name}: {ta.height} vs {tb.height} rows differ")
        sa, sb = ca.compared_rows("clip_scope"), cb.compared_rows("clip_scope")
        if sa.width or sb.width:
            fl = [n for n, t in sa.schema.items() if t == pl.Float64]
            if sa.shape != sb.shape or not sa.drop(fl).equals(sb.drop(fl)):
                out.append("clip_scope rows differ")
            elif (gap := _gap(sa, sb, fl)) > atol:
                out.append(f"clip_scope confidences differ by up to {gap:.3g}")
        if ca.locations(None) != cb.locations(None):
            out.append("videos: sealed locations open to different files")
        pa_, pb = ca.compared_rows("predictions"), cb.compared_rows("predictions")
        if pa_.height != pb.height or not pa_.drop("value").equals(pb.drop("value")):
            out.append(f"predictions: {pa_.height} vs {pb.height} rows or keys differ")
        elif (gap := _gap(pa_, pb, ["value"])) > atol:
            out.append(f"predictions: values differ by up to {gap:.3g}")
        for level in (*EMBEDDING_LEVELS, *IDENTITY_LEVELS, "video_cycle"):
            if level in IDENTITY_LEVELS and not (ca.has_identity() or cb.has_identity()):
                continue
            if level == "video_cycle" and not (ca.has_cycle() or cb.has_cycle()):
                continue
            (ia, va), (ib, vb) = ca.embeddings(level), cb.embeddings(level)
            if not np.array_equal(ia, ib):
                out.append(f"{level} vectors: keys differ ({len(ia)} vs {len(ib)})")
            elif len(ia) and (gap := float(np.abs(va - vb).max())) > atol:
                out.append(f"{level} vectors: differ by up to {gap:.3g}")
        for name in ("video_counts", "study_counts"):
            if not ca.compared_rows(name).equals(cb.compared_rows(name)):
                out.append(f"{name} differ")
        fa, fb = ca.has_table("frame_embeddings"), cb.has_table("frame_embeddings")
        if fa and fb:
            keys = [int(k) for k in ca.embeddings("video")[0]]
            ra, rb = ca.frame_embeddings(keys), cb.frame_embeddings(keys)
            if ra.keys() != rb.keys() or any(ra[k].shape != rb[k].shape or np.abs(ra[k] - rb[k]).max() > atol
                                             for k in ra):
                out.append("frame vectors differ")
    return out
