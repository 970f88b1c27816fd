"""Named queries that the indexing runners, the merge and the query API read (pending work, shards, study
pooling, sidecar matching, search hits, catalog comparisons)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from echosearch.store.base import QueryBase

_HIT_META = {
    "video": """
SELECT v.video_key, v.study_key, s.study_uid, p.patient_pseudonym, s.study_date, v.view, v.manufacturer, v.path,
       coalesce(vp.value, sp.value) AS pred_ef
FROM videos v JOIN studies s ON s.study_key = v.study_key JOIN patients p ON p.patient_key = s.patient_key
LEFT JOIN predictions vp ON vp.level = 'video' AND vp.task = 'ef' AND vp.key = v.video_key
LEFT JOIN predictions sp ON sp.level = 'study' AND sp.task = 'ef' AND sp.key = v.study_key
WHERE v.video_key IN (SELECT unnest(?::BIGINT[]))
""",
    "study": """
SELECT NULL::BIGINT AS video_key, s.study_key, any_value(s.study_uid) AS study_uid,
       any_value(p.patient_pseudonym) AS patient_pseudonym, any_value(s.study_date) AS study_date,
       string_agg(DISTINCT v.view, ',' ORDER BY v.view) AS view, min(v.manufacturer) AS manufacturer,
       NULL::VARCHAR AS path, coalesce(any_value(sp.value), avg(vp.value)) AS pred_ef,
       any_value(r.text) AS report_text
FROM studies s JOIN patients p ON p.patient_key = s.patient_key
LEFT JOIN videos v ON v.study_key = s.study_key
LEFT JOIN reports r ON r.study_key = s.study_key
LEFT JOIN predictions sp ON sp.level = 'study' AND sp.task = 'ef' AND sp.key = s.study_key
LEFT JOIN predictions vp ON vp.level = 'video' AND vp.task = 'ef' AND vp.key = v.video_key
WHERE s.study_key IN (SELECT unnest(?::BIGINT[]))
GROUP BY s.study_key
""",
}

_COMPARED = {  # what two runners must agree on, row for row (times and sealed locations aside)
    "patients": "SELECT * FROM patients ORDER BY patient_key",
    "studies": "SELECT * FROM studies ORDER BY study_key",
    "videos": "SELECT * EXCLUDE (scanned_at, encoded_at, location) FROM videos ORDER BY video_key",
    "reports": "SELECT * FROM reports ORDER BY study_key",
    "labels": "SELECT * FROM labels ORDER BY level, key, name",
    "ingest_errors": "SELECT path, sha256, stage, reason FROM ingest_errors ORDER BY path, stage",
    "clip_scope": "SELECT * FROM clip_scope ORDER BY video_key",
    "predictions": "SELECT level, key, task, model, value FROM predictions ORDER BY level, key, task",
    "video_counts": "SELECT video_key, n_frames_used FROM video_embeddings ORDER BY video_key",
    "study_counts": "SELECT study_key, n_videos FROM study_embeddings ORDER BY study_key",
}
COMPARED_TABLES = tuple(_COMPARED)


class RunQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""

    # ---- what is done: the read stage skips finished files, the merge skips merged rows ---------------------
    def encoded_hashes(self) -> set[str]:
        """Content hashes of every video with a content vector (finished: an index run skips them)."""
        if not self.has_table("video_embeddings"):
            return set()
        rows = self.con.sql("SELECT v.sha256 FROM videos v JOIN video_embeddings e USING (video_key)").fetchall()
        return {str(r[0]) for r in rows}

    def encoded_among(self, hashes: Sequence[str]) -> set[str]:
        """Which of ``hashes`` the catalog holds as videos with a content vector."""
        if not hashes or not self.has_table("video_embeddings"):
            return set()
        rows = self.con.execute("SELECT v.sha256 FROM videos v JOIN video_embeddings e USING (video_key) "
                                "WHERE v.sha256 IN (SELECT unnest(?::VARCHAR[]))", [list(hashes)]).fetchall()
        return {str(r[0]) for r in rows}

    def recorded_errors(self, paths: Sequence[str]) -> set[tuple[str, str, str]]:
        """(path, sha256 or '', stage) of the ``ingest_errors`` rows of ``paths``."""
        if not paths:
            return set()
        rows = self.con.execute("SELECT path, coalesce(sha256, ''), stage FROM ingest_errors "
                                "WHERE path IN (SELECT unnest(?::VARCHAR[]))", [list(paths)]).fetchall()
        return {(str(p), str(s), str(st)) for p, s, st in rows}

    # ---- study pooling and report vectors (after the write stage) ---------------------------------------
    def stale_studies(self) -> list[int]:
        """Studies whose vector is missing or pools a different number of encoded in-scope videos than they
        now have (derived from the catalog, so a run killed between encoding and pooling is completed)."""
        in_scope = ("LEFT JOIN clip_scope c USING (video_key) WHERE c.in_scope IS NOT FALSE "
                    if self.has_table("clip_scope") else "")
        rows = self.con.sql(
            "SELECT v.study_key FROM videos v JOIN video_embeddings e USING (video_key) "
            "LEFT JOIN study_embeddings s USING (study_key) " + in_scope +
            "GROUP BY v.study_key HAVING count(*) <> coalesce(any_value(s.n_videos), 0) ORDER BY v.study_key"
        ).fetchall()
        return [int(r[0]) for r in rows]

    def videos_of_studies(self, study_keys: Sequence[int]) -> dict[int, int]:
        """Video key -> study key for the videos of ``study_keys``."""
        rows = self.con.execute("SELECT video_key, study_key FROM videos WHERE study_key IN "
                                "(SELECT unnest(?::BIGINT[]))", [[int(k) for k in study_keys]]).fetchall()
        return {int(v): int(s) for v, s in rows}

    def video_predictions(self, video_keys: Sequence[int]) -> dict[int, dict[str, float]]:
        """Zero-shot values of ``video_keys``: key -> {task: value}."""
        rows = self.con.execute("SELECT key, task, value FROM predictions WHERE level = 'video' AND key IN "
                                "(SELECT unnest(?::BIGINT[]))", [[int(k) for k in video_keys]]).fetchall()
        out: dict[int, dict[str, float]] = {}
        for k, task, v in rows:
            out.setdefault(int(k), {})[str(task)] = float(v)
        return out

    def reports_to_embed(self) -> list[tuple[int, str]]:
        """(study key, text) of the reports without a text vector, by study key."""
        if not self.has_table("report_embeddings"):
            return []
        rows = self.con.sql("SELECT r.study_key, r.text FROM reports r LEFT JOIN report_embeddings e USING "
                            "(study_key) WHERE e.study_key IS NULL ORDER BY r.study_key").fetchall()
        return [(int(k), str(t)) for k, t in rows]

    def reports_without_vectors(self) -> int:
        if not self.has_table("report_embeddings"):
            return 0
        row = self.one("SELECT count(*) FROM reports r LEFT JOIN report_embeddings e USING (study_key) "
                       "WHERE e.study_key IS NULL")
        return int(row[0]) if row else 0

    # ---- sidecars: reports and labels matched to what the catalog holds -------------------------------
    def sidecar_targets(self) -> list[tuple[int, str | None, str, str | None, int]]:
        """(video key, SOP UID, study UID, accession pseudonym, study key) of every video."""
        rows = self.con.sql("SELECT v.video_key, v.sop_uid, s.study_uid, s.accession_pseudonym, s.study_key "
                            "FROM videos v JOIN studies s USING (study_key)").fetchall()
        return [(int(k), sop, str(uid), acc, int(sk)) for k, sop, uid, acc, sk in rows]

    # ---- the query API -----------------------------------------------------------------------------
    def hit_rows(self, level: str, keys: Sequence[int]) -> pl.DataFrame:
        """Catalog metadata of search hits: videos (``level`` video) or studies (study and report levels)."""
        sql = _HIT_META["video" if level == "video" else "study"]
        meta = self.con.sql(sql, params=[[int(k) for k in keys]]).pl()
        return meta.with_columns(pl.col("video_key").cast(pl.Int64), pl.col("study_key").cast(pl.Int64))

    def video_study_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(video keys ascending, the study key of each) as int64 arrays."""
        t = self.con.sql("SELECT video_key, study_key FROM videos ORDER BY video_key").to_arrow_table()
        return t.column(0).to_numpy().astype(np.int64), t.column(1).to_numpy().astype(np.int64)

    # ---- comparing two catalogs (the Ray runner against the local runner) ----------------------------------
    def compared_rows(self, name: str) -> pl.DataFrame:
        """One of :data:`COMPARED_TABLES` in key order (empty when this catalog lacks the table)."""
        table = {"video_counts": "video_embeddings", "study_counts": "study_embeddings"}.get(name, name)
        if not self.has_table(table):
            return pl.DataFrame()
        return self.con.sql(_COMPARED[name]).pl()

