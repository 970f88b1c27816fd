"""The scope of clips (``clip_scope``, schema 4; :mod:`echosearch.model.scope`): stored, read, and what it excludes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from echosearch.store.base import QueryBase
from echosearch.store.schema import LEVEL_TABLES


class ScopeQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""

    def has_scope(self) -> bool:
        """Whether this catalog records clip scope (schema 4; an older catalog opened read-only does not)."""
        return self.has_table("clip_scope")

    def store_scope(self, rows: pl.DataFrame) -> None:
        """Insert or replace ``clip_scope`` rows (columns of :data:`echosearch.model.scope.SCOPE_COLUMNS`)."""
        if rows.height:
            self.insert_frame("clip_scope", rows, replace=True)

    def scope_rows(self, keys: Sequence[int] | None = None) -> pl.DataFrame:
        """Stored scope of ``keys`` (None: every clip); empty when the catalog has no scope table."""
        if not self.has_scope():
            return pl.DataFrame(schema={"video_key": pl.Int64, "in_scope": pl.Boolean})
        if keys is None:
            return self.con.sql("SELECT * FROM clip_scope ORDER BY video_key").pl()
        return self.con.sql("SELECT * FROM clip_scope WHERE video_key IN (SELECT unnest(?::BIGINT[])) "
                            "ORDER BY video_key", params=[[int(k) for k in keys]]).pl()

    def scope_to_check(self) -> np.ndarray:
        """Encoded clips whose scope has no model evidence yet (or no scope row at all)."""
        if not self.has_scope() or not self.has_table("video_embeddings"):
            return np.zeros(0, np.int64)
        rows = self.con.sql("SELECT e.video_key FROM video_embeddings e LEFT JOIN clip_scope c USING (video_key) "
                            "WHERE c.model_checked IS NOT TRUE ORDER BY 1").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def out_of_scope_videos(self) -> set[int]:
        """Video keys marked out of scope (not echo, or colour Doppler): zero-shot values, identity and change
        leave them out by default. Clips without a scope row (older indexes) count as in scope."""
        if not self.has_scope():
            return set()
        return {int(r[0]) for r in self.con.sql("SELECT video_key FROM clip_scope WHERE NOT in_scope").fetchall()}

    def video_views(self) -> pl.DataFrame:
        """(video_key, view, source) of the clips whose view is labelled: ``label`` (manifest or sidecar) or
        ``dicom header`` (named in the file's descriptions)."""
        header = ("UNION ALL SELECT video_key, view, 'dicom header' FROM clip_scope WHERE view_source = 'dicom header' "
                  "AND video_key NOT IN (SELECT video_key FROM videos WHERE view IS NOT NULL)" if self.has_scope() else "")
        return self.con.sql(f"SELECT video_key, view, 'label' AS source FROM videos WHERE view IS NOT NULL {header} "
                            "ORDER BY 1").pl()

    def best_views(self) -> dict[int, str]:
        """Each clip's view as best known: labelled (:meth:`video_views`), else the scope's (zero-shot)."""
        scoped: dict[int, str] = {}
        if self.has_scope():
            scoped = {int(k): str(v) for k, v in self.con.sql(
                "SELECT video_key, view FROM clip_scope WHERE view IS NOT NULL").fetchall()}
        return {**scoped, **{int(k): str(v) for k, v in self.video_views().select("video_key", "view").iter_rows()}}

    def embedding_keys(self, level: str) -> np.ndarray:
        """Sorted keys that have a vector at ``level`` (without reading the vectors: to sample them first)."""
        table, key = LEVEL_TABLES[level]
        if not self.has_table(table):
            return np.zeros(0, np.int64)
        return np.asarray([r[0] for r in self.con.sql(f"SELECT {key} FROM {table} ORDER BY 1").fetchall()], np.int64)

    def drop_predictions(self, level: str, keys: Sequence[int]) -> None:
        """Forget the zero-shot predictions of ``keys`` at ``level`` (e.g. clips found out of scope)."""
        if keys:
            self.con.execute("DELETE FROM predictions WHERE level = ? AND key IN (SELECT unnest(?::BIGINT[]))",
                             [level, [int(k) for k in keys]])
