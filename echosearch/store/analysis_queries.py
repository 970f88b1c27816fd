"""Named queries that identity, change, scope, training and evaluation read.

Each method says what it returns; the analysis modules (``identity``, ``identity_model``, ``identity_train``,
``change``, ``eval_*``, ``evaluate``, ``train``, ``confidence``, ``demo``, ``vectorindex``) call these instead of
writing SQL of their own. Rows are ordered by key wherever callers rely on an order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

from echosearch.store.base import QueryBase
from echosearch.store.schema import identity_table_sql


class AnalysisQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""


    # ---- studies and patients ----------------------------------------------------------------------
    def study_patients(self) -> pl.DataFrame:
        """(study_key, study_uid, study_date, patient_key, patient_pseudonym) of every study, by study key."""
        return self.con.sql(
            "SELECT s.study_key, s.study_uid, s.study_date, s.patient_key, p.patient_pseudonym "
            "FROM studies s JOIN patients p USING (patient_key) ORDER BY s.study_key"
        ).pl()

    def study_patient_fingerprint(self) -> tuple[int, int]:
        """(number of studies, order-free hash of their (study, patient) pairs): changes when a study is added
        or relabelled, so that calibrations fitted on the old labels are refitted."""
        row = self.one("SELECT count(*), coalesce(sum(hash(study_key, patient_key)), 0) FROM studies")
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def has_study_key(self, study_key: int) -> bool:
        """Whether a study with this key exists."""
        return self.one("SELECT study_key FROM studies WHERE study_key = ?", [int(study_key)]) is not None

    def study_uids(self) -> dict[int, str]:
        """Study key -> Study Instance UID of every study."""
        return {int(k): uid for k, uid in self.con.sql("SELECT study_key, study_uid FROM studies").fetchall()}

    def report_texts(self) -> list[str]:
        """Every stored report text, by study key."""
        return [r[0] for r in self.con.sql("SELECT text FROM reports ORDER BY study_key").fetchall()]

    # ---- videos ------------------------------------------------------------------------------------
    def video_studies(self) -> pl.DataFrame:
        """(video_key, study_key, sop_uid) of every video, by video key."""
        return self.con.sql("SELECT video_key, study_key, sop_uid FROM videos ORDER BY video_key").pl()

    def study_key_of_videos(self) -> dict[int, int]:
        """Video key -> key of the study it belongs to."""
        return dict(self.con.sql("SELECT video_key, study_key FROM videos").fetchall())

    def video_patient_keys(self) -> dict[int, int]:
        """Video key -> recorded patient key (through the video's study)."""
        return dict(self.con.sql(
            "SELECT v.video_key, s.patient_key FROM videos v JOIN studies s USING (study_key)").fetchall())

    def video_study_views(self) -> pl.DataFrame:
        """(video_key, study_key, view) of every video, by video key; ``'?'`` where the view is unknown."""
        return self.con.sql("SELECT video_key, study_key, coalesce(view, '?') AS view FROM videos "
                            "ORDER BY video_key").pl()

    def video_frame_counts(self) -> dict[int, int]:
        """Video key -> frames its content vector was pooled from."""
        return dict(self.con.sql("SELECT video_key, n_frames_used FROM video_embeddings").fetchall())

    def encoded_video_files(self) -> list[tuple[Any, ...]]:
        """(video_key, sha256, kind, size_bytes, study_key, patient_key) of every encoded video, by video key:
        what training an identity head decodes (files are opened through :meth:`locations`)."""
        return self.con.sql(
            "SELECT v.video_key, v.sha256, v.kind, v.size_bytes, v.study_key, s.patient_key FROM videos v "
            "JOIN studies s USING (study_key) WHERE v.encoded_at IS NOT NULL ORDER BY v.video_key").fetchall()

    def videos_with_reports(self) -> list[tuple[Any, ...]]:
        """(video_key, path, kind, sha256, size_bytes, report text, patient_key, view, study_key) of every video
        whose study has a report, by video key: the (clip, report) pairs of contrastive training."""
        return self.con.sql(
            "SELECT v.video_key, v.path, v.kind, v.sha256, v.size_bytes, r.text, s.patient_key, v.view, s.study_key "
            "FROM videos v "
            "JOIN studies s USING (study_key) JOIN reports r USING (study_key) ORDER BY v.video_key"
        ).fetchall()

    # ---- predictions -------------------------------------------------------------------------------
    def video_prediction_rows(self) -> pl.DataFrame:
        """(video_key, task, value) of every video-level zero-shot prediction."""
        return self.con.sql("SELECT p.key AS video_key, p.task, p.value FROM predictions p "
                            "WHERE p.level = 'video'").pl()

    def study_prediction_rows(self, finding_tasks: Iterable[str]) -> pl.DataFrame:
        """(study_key, task, value), long form: each study's own predictions, and for the (study, task) pairs
        without one, its videos' values combined by the pipeline's rule (maximum over views for
        ``finding_tasks``, the mean otherwise)."""
        return self.con.sql(
            """
            WITH s AS (SELECT key AS study_key, task, value FROM predictions WHERE level = 'study'),
                 v AS (SELECT vi.study_key, p.task,
                              CASE WHEN list_contains(?, p.task) THEN max(p.value) ELSE avg(p.value) END AS value
                       FROM predictions p JOIN videos vi ON p.level = 'video' AND p.key = vi.video_key
                       GROUP BY vi.study_key, p.task)
            SELECT * FROM s
            UNION ALL
            SELECT * FROM v WHERE NOT EXISTS (SELECT 1 FROM s WHERE s.study_key = v.study_key AND s.task = v.task)
            """,
            params=[sorted(finding_tasks)],
        ).pl()

    # ---- scope, identity tables, counts ------------------------------------------------------------
    def scope_counts(self) -> dict[str, int]:
        """``{"out_of_scope": n, "n": total}`` of the stored clip scope; empty without a scope table."""
        if not self.has_scope():
            return {}
        return self.con.sql("SELECT count(*) FILTER (WHERE NOT in_scope) AS out_of_scope, count(*) AS n "
                            "FROM clip_scope").pl().to_dicts()[0]

    def create_identity_tables(self, dim: int) -> None:
        """Create the identity vector tables of width ``dim`` when missing (call inside a transaction to bind
        them with the vectors written there)."""
        self.con.execute(identity_table_sql(int(dim)))

    def row_count(self, table: str) -> int:
        """Rows of ``table`` (one of the catalog's own tables); 0 when it does not exist yet."""
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        if not self.has_table(table):
            return 0
        row = self.one(f"SELECT count(*) FROM {table}")
        return int(row[0]) if row else 0
