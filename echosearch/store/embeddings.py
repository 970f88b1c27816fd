"""Vectors by level (content and identity; video, study, report, frames): stored, read by key, counted."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from echosearch.errors import CatalogError, ModelMismatchError
from echosearch.store.base import QueryBase, utc_now
from echosearch.store.schema import IDENTITY_LEVELS, LEVEL_TABLES, cycle_table_sql


class EmbeddingQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""

    def _require_embeddings(self) -> int:
        dim = self.embed_dim()
        if dim is None or not self.has_table("video_embeddings"):
            raise CatalogError(f"index {self.index_dir} has no embeddings yet: run `echosearch index` first")
        return dim

    def store_video_embeddings(
        self, keys: list[int], vectors: np.ndarray, n_frames: list[int], frame_vectors: list[np.ndarray] | None = None
    ) -> None:
        """Insert video vectors (and optionally frame vectors) and mark the videos encoded, atomically."""
        dim = self._require_embeddings()
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.shape != (len(keys), dim):
            raise CatalogError(f"expected vectors of shape ({len(keys)}, {dim}), got {vecs.shape}")
        table = pl.DataFrame(
            {"video_key": keys, "embedding": vecs, "n_frames_used": n_frames},
            schema={"video_key": pl.Int64, "embedding": pl.Array(pl.Float32, dim), "n_frames_used": pl.Int32},
        )
        with self.transaction():
            self.insert_frame("video_embeddings", table, replace=True)
            if frame_vectors is not None:
                per_video = [np.asarray(fv, dtype=np.float32).reshape(-1, dim) for fv in frame_vectors]
                if len(per_video) != len(keys):
                    raise CatalogError(f"{len(per_video)} frame-vector sets for {len(keys)} videos")
                counts = [len(fv) for fv in per_video]
                frames = pl.DataFrame(
                    {"video_key": np.repeat(np.asarray(keys, dtype=np.int64), counts),
                     "frame_index": np.concatenate([np.arange(c) for c in counts]) if counts else [],
                     "embedding": np.concatenate(per_video) if per_video else np.zeros((0, dim), np.float32)},
                    schema={"video_key": pl.Int64, "frame_index": pl.Int32, "embedding": pl.Array(pl.Float32, dim)},
                )
                self.insert_frame("frame_embeddings", frames, replace=True)
            self.con.execute(
                "UPDATE videos SET encoded_at = ? WHERE video_key IN (SELECT unnest(?::BIGINT[]))", [utc_now(), keys]
            )
            self.bump_generation()

    def store_identity_embeddings(self, level: str, keys: list[int], vectors: np.ndarray, counts: list[int]) -> None:
        """Insert or replace identity vectors of videos (``video_identity``) or studies (``study_identity``)."""
        if level not in IDENTITY_LEVELS or not self.has_table(level):
            raise CatalogError(f"index {self.index_dir} has no {level} table: no identity model is bound")
        key, count = ("video_key", "n_frames_used") if level == "video_identity" else ("study_key", "n_videos")
        with self.transaction():  # the vectors and the new generation together
            self._replace_vectors(level, key, keys, vectors, {count: (counts, pl.Int32)})
            self.bump_generation()

    def _replace_vectors(self, table: str, key: str, keys: list[int], vectors: np.ndarray,
                         extra: dict[str, tuple[Any, Any]] | None = None) -> None:
        """Insert or replace the rows of ``keys`` in a vector table of this level's width (``extra``: further
        columns, name -> (values, polars type))."""
        dim = self.level_dim(table)
        assert dim is not None
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), dim)
        cols = {key: keys, "embedding": vecs, **{c: v for c, (v, _) in (extra or {}).items()}}
        schema = {key: pl.Int64, "embedding": pl.Array(pl.Float32, dim), **{c: t for c, (_, t) in (extra or {}).items()}}
        with self.transaction():
            self.insert_frame(table, pl.DataFrame(cols, schema=schema), replace=True)

    def bind_cycle(self, info: dict[str, Any] | None, wanted: bool) -> dict[str, Any] | None:
        """Whether this index stores cycle vectors (``echosearch.model.cycle``), as the manifest recorded them:
        an index that has them keeps them (another encoder's are refused); one whose videos were encoded without
        them stays without (they would be missing for those); a new index stores them when ``wanted`` and the
        tower has them (``info``). Returns what is stored (the manifest entry) or None."""
        stored = self.get_manifest("cycle")
        if stored is not None:
            if info is None or any(stored.get(k) != info.get(k) for k in ("format", "split", "grid", "dim")):
                raise ModelMismatchError(f"index {self.index_dir} stores cycle vectors {stored}; this encoder's are "
                                         f"{info}: use a new index folder")
            return dict(stored)
        row = self.one("SELECT count(*) FROM videos WHERE encoded_at IS NOT NULL")
        if info is None or not wanted or (row and row[0]):
            return None
        with self.transaction():
            self.con.execute(cycle_table_sql(int(info["dim"])))
            self.set_manifest("cycle", info)
        return dict(info)

    def has_cycle(self) -> bool:
        """Whether this index stores cycle vectors."""
        return self.get_manifest("cycle") is not None and self.has_table("video_cycle")

    def store_cycle_vectors(self, keys: list[int], vectors: np.ndarray) -> None:
        """Insert or replace cycle vectors of videos (call in the transaction that stores their content vectors)."""
        if not self.has_cycle():
            raise CatalogError(f"index {self.index_dir} stores no cycle vectors")
        self._replace_vectors("video_cycle", "video_key", keys, vectors)

    def store_level_embeddings(self, level: str, keys: list[int], vectors: np.ndarray, counts: list[int] | None = None) -> None:
        """Replace study or report vectors for ``keys`` (study keys)."""
        if level not in ("study", "report"):
            raise ValueError(level)
        dim = self._require_embeddings()
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), dim)
        data: dict[str, Any] = {"study_key": keys, "embedding": vecs}
        schema: dict[str, Any] = {"study_key": pl.Int64, "embedding": pl.Array(pl.Float32, dim)}
        if level == "study":
            data["n_videos"] = counts if counts is not None else [1] * len(keys)
            schema["n_videos"] = pl.Int32
        with self.transaction():
            self.insert_frame(f"{level}_embeddings", pl.DataFrame(data, schema=schema), replace=True)
            self.bump_generation()

    def embeddings(self, level: str, keys: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, vectors float32) of a level (``video``, ``study``, ``report`` or an identity level),
        ordered by id; optionally only ``keys``."""
        dim = self._require_embeddings()
        if level in IDENTITY_LEVELS or level == "video_cycle":
            dim = self.level_dim(level) or dim
            if not self.has_table(level):
                return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        table = LEVEL_TABLES[level]
        sql = f"SELECT {table[1]} AS id, embedding FROM {table[0]}"
        params: list[Any] = []
        if keys is not None:
            sql += f" WHERE {table[1]} IN (SELECT unnest(?::BIGINT[]))"
            params.append([int(k) for k in keys])
        sql += " ORDER BY id"
        arrow = self.con.sql(sql, params=params).to_arrow_table() if params else self.con.sql(sql).to_arrow_table()
        ids = arrow.column("id").to_numpy().astype(np.int64)
        if len(ids) == 0:
            return ids, np.zeros((0, dim), dtype=np.float32)
        flat = arrow.column("embedding").combine_chunks().flatten().to_numpy()
        return ids, np.ascontiguousarray(flat.reshape(len(ids), dim), dtype=np.float32)

    def frame_embeddings(self, keys: list[int]) -> dict[int, np.ndarray]:
        """Stored per-frame vectors (``keep_frame_embeddings``) of the videos ``keys`` that have them:
        video key -> (frames, dim) float32 in frame order."""
        dim = self._require_embeddings()
        if not self.has_table("frame_embeddings"):
            return {}
        arrow = self.con.sql("SELECT video_key, embedding FROM frame_embeddings WHERE video_key IN "
                             "(SELECT unnest(?::BIGINT[])) ORDER BY video_key, frame_index",
                             params=[[int(k) for k in keys]]).to_arrow_table()
        ids = arrow.column("video_key").to_numpy().astype(np.int64)
        if len(ids) == 0:
            return {}
        flat = arrow.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), dim)
        uniq, starts = np.unique(ids, return_index=True)
        parts = np.split(np.ascontiguousarray(flat, dtype=np.float32), starts[1:])
        return {int(k): part for k, part in zip(uniq, parts, strict=True)}

    def unencoded_videos(self) -> pl.DataFrame:
        return self.con.sql(
            "SELECT video_key, path, kind, sha256 FROM videos WHERE encoded_at IS NULL ORDER BY video_key"
        ).pl()
