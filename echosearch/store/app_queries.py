"""Named queries that the app and the server read (patients, timelines, audit pages, decisions, status).

The app's pages (:mod:`echosearch.appcore.views`) and the server's routes call these; neither writes SQL of
its own. Some older ones of the same family live on :class:`~echosearch.catalog.Catalog` itself
(``patient_key``, ``patient_studies``, ``record_decision``, ``decisions``, ``ingest_error_rows``,
``access_events``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import polars as pl

from echosearch.store.base import QueryBase, utc_now

_KEYS = "(SELECT unnest(?::BIGINT[]))"


def _ints(keys: Sequence[int]) -> list[int]:
    return [int(k) for k in keys]


class AppQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""

    def _frame(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        return self.con.sql(sql, params=params).pl() if params else self.con.sql(sql).pl()

    # ---- search form ---------------------------------------------------------------------------
    def view_values(self, scoped: bool) -> list[str]:
        """Distinct views of the videos (recorded, else the scope model's when ``scoped``)."""
        sql = ("SELECT DISTINCT coalesce(v.view, c.view) AS view FROM videos v LEFT JOIN clip_scope c "
               "USING (video_key) WHERE coalesce(v.view, c.view) IS NOT NULL ORDER BY 1" if scoped else
               "SELECT DISTINCT view FROM videos WHERE view IS NOT NULL ORDER BY view")
        return [str(r[0]) for r in self.con.execute(sql).fetchall()]

    def manufacturer_values(self) -> list[str]:
        rows = self.con.execute("SELECT DISTINCT manufacturer FROM videos WHERE manufacturer IS NOT NULL "
                                "ORDER BY 1").fetchall()
        return [str(r[0]) for r in rows]

    def study_date_range(self) -> tuple[date | None, date | None]:
        row = self.one("SELECT min(study_date), max(study_date) FROM studies")
        return (row[0], row[1]) if row else (None, None)

    # ---- patients and studies ------------------------------------------------------------------
    def patient_list(self) -> pl.DataFrame:
        """Every patient with study count and date span (``patient_id_raw`` is null unless opted in)."""
        return self._frame(
            "SELECT p.patient_key, p.patient_pseudonym, p.patient_id_raw, count(s.study_key) AS n_studies, "
            "min(s.study_date) AS first_study, max(s.study_date) AS last_study FROM patients p "
            "LEFT JOIN studies s USING (patient_key) GROUP BY ALL ORDER BY n_studies DESC, p.patient_pseudonym")

    def study_videos(self, study_keys: Sequence[int]) -> pl.DataFrame:
        """Videos of studies with their study date, patient and view."""
        return self._frame(
            "SELECT v.video_key, v.study_key, v.view, v.path, v.kind, v.manufacturer, s.study_date, "
            "p.patient_pseudonym FROM videos v JOIN studies s USING (study_key) JOIN patients p USING (patient_key) "
            f"WHERE v.study_key IN {_KEYS} ORDER BY s.study_date, v.view, v.video_key", [_ints(study_keys)])

    def study_rows(self, study_keys: Sequence[int]) -> pl.DataFrame:
        """Studies with their patient (pseudonym; raw ID only when opted in)."""
        return self._frame(
            "SELECT s.study_key, s.study_uid, s.study_date, s.patient_key, p.patient_pseudonym, p.patient_id_raw "
            f"FROM studies s JOIN patients p USING (patient_key) WHERE s.study_key IN {_KEYS} ORDER BY s.study_key",
            [_ints(study_keys)])

    def study_reports(self, study_keys: Sequence[int]) -> pl.DataFrame:
        """Report texts of studies (``study_key``, ``text``)."""
        return self._frame(f"SELECT study_key, text FROM reports WHERE study_key IN {_KEYS} ORDER BY study_key",
                           [_ints(study_keys)])

    # ---- identity audit ------------------------------------------------------------------------
    def audit_review(self, run_id: int, suspects_only: bool = True) -> pl.DataFrame:
        """One audit run in review order, joined with patients and each study's latest reviewer decision.

        ``rank``: suspects first, by the calibrated probability that the recorded patient is right
        (``p_same``, lowest first), then the rest; ``audit_rank``: the audit's own order (by suspicion)."""
        where = "WHERE suspect" if suspects_only else ""
        return self._frame(
            f"""WITH d AS (SELECT study_key, decision, reviewer, occurred_at AS decided_at, note,
                    row_number() OVER (PARTITION BY study_key ORDER BY occurred_at DESC) AS rn FROM audit_decisions),
                r AS (SELECT row_number() OVER (ORDER BY a.suspect DESC, coalesce(a.p_same, 1.0), a.rank)::INTEGER
                             AS rank, a.rank AS audit_rank, a.study_key, s.study_uid, s.study_date,
                       a.recorded_patient_key, rp.patient_pseudonym AS recorded_patient,
                       a.own_score, a.best_other_patient_key, bp.patient_pseudonym AS best_other_patient,
                       a.best_other_score, a.margin, a.p_same, a.suspect, a.evidence,
                       d.decision, d.reviewer, d.decided_at, d.note
                FROM identity_audit a JOIN studies s USING (study_key)
                JOIN patients rp ON rp.patient_key = a.recorded_patient_key
                LEFT JOIN patients bp ON bp.patient_key = a.best_other_patient_key
                LEFT JOIN d ON d.study_key = a.study_key AND d.rn = 1
                WHERE a.run_id = ?)
                SELECT * FROM r {where} ORDER BY rank""", [int(run_id)])

    def run_record(self, run_id: int) -> dict[str, Any] | None:
        """A stored run: ``run_id``, ``kind``, ``started_at`` (UTC) and its ``params`` (decoded)."""
        row = self.one("SELECT run_id, kind, started_at, params FROM runs WHERE run_id = ?", [int(run_id)])
        if row is None:
            return None
        return {"run_id": int(row[0]), "kind": row[1], "started_at": row[2], "params": json.loads(row[3] or "{}")}

    # ---- index status --------------------------------------------------------------------------
    def calibration_rows(self) -> pl.DataFrame:
        """Every stored calibration (name, time, pair counts, AUC, threshold, params JSON)."""
        return self._frame("SELECT name, created_at, n_positive, n_negative, auc, threshold, params FROM calibrations "
                           "ORDER BY name")

    def access_log_rows(self, limit: int = 200, actions: Sequence[str] = (),
                        since: datetime | None = None) -> pl.DataFrame:
        """The access log, newest first; optionally only ``actions`` and entries since ``since`` (UTC)."""
        where: list[str] = []
        params: list[Any] = []
        if actions:
            where.append("action IN (SELECT unnest(?::VARCHAR[]))")
            params.append(list(actions))
        if since is not None:
            where.append("occurred_at >= ?")
            params.append(since)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        return self._frame(f"SELECT * FROM access_log {clause}ORDER BY occurred_at DESC LIMIT ?",
                           [*params, int(limit)])

    def patient_key(self, patient: str | int) -> int | None:
        """The key of a patient given by pseudonym or key."""
        row = self.one("SELECT patient_key FROM patients WHERE patient_pseudonym = ? OR CAST(patient_key AS VARCHAR) = ?",
                       [str(patient), str(patient)])
        return int(row[0]) if row else None

    def patient_studies(self, patient_key: int) -> pl.DataFrame:
        """A patient's studies in date order with their video count and views."""
        return self.con.sql(
            "SELECT s.study_key, s.study_uid, s.study_date, count(v.video_key) AS n_videos, "
            "string_agg(DISTINCT v.view, ', ' ORDER BY v.view) AS views FROM studies s "
            "LEFT JOIN videos v USING (study_key) WHERE s.patient_key = ? GROUP BY ALL "
            "ORDER BY s.study_date NULLS LAST, s.study_key", params=[int(patient_key)]).pl()

    def audit_results(self, run_id: int, suspects_only: bool = True) -> pl.DataFrame:
        """One audit run joined with patients and each study's latest reviewer decision."""
        where = "AND a.suspect" if suspects_only else ""
        return self.con.sql(
            f"""WITH d AS (SELECT study_key, decision, reviewer, occurred_at AS decided_at, note,
                    row_number() OVER (PARTITION BY study_key ORDER BY occurred_at DESC) AS rn FROM audit_decisions)
                SELECT a.rank, a.study_key, s.study_uid, s.study_date, a.recorded_patient_key,
                       rp.patient_pseudonym AS recorded_patient, a.own_score, a.best_other_patient_key,
                       bp.patient_pseudonym AS best_other_patient, a.best_other_score, a.margin, a.p_same, a.suspect,
                       a.evidence, d.decision, d.reviewer, d.decided_at, d.note
                FROM identity_audit a JOIN studies s USING (study_key)
                JOIN patients rp ON rp.patient_key = a.recorded_patient_key
                LEFT JOIN patients bp ON bp.patient_key = a.best_other_patient_key
                LEFT JOIN d ON d.study_key = a.study_key AND d.rn = 1
                WHERE a.run_id = ? {where} ORDER BY a.rank""", params=[int(run_id)]).pl()

    def record_decision(self, study_key: int, decision: str, reviewer: str, note: str | None = None) -> None:
        """Append a reviewer decision on an audited study and log it, in one transaction."""
        with self.transaction():
            self.con.execute("INSERT INTO audit_decisions VALUES (?, ?, ?, ?, ?)",
                             [int(study_key), decision, reviewer, utc_now(), note or None])
            self.log_access(reviewer, "audit_decision", {"study_key": int(study_key), "decision": decision})

    def decisions(self, study_key: int | None = None) -> pl.DataFrame:
        """Reviewer decisions, newest first (all, or one study's)."""
        if study_key is None:
            return self.con.sql("SELECT * FROM audit_decisions ORDER BY occurred_at DESC").pl()
        return self.con.sql("SELECT * FROM audit_decisions WHERE study_key = ? ORDER BY occurred_at DESC",
                            params=[int(study_key)]).pl()

    def ingest_error_rows(self, limit: int = 1000) -> pl.DataFrame:
        """Recorded failures, newest first (file labels, never sealed locations)."""
        return self.con.sql("SELECT error_id, stage, reason, path, occurred_at FROM ingest_errors "
                            "ORDER BY occurred_at DESC, error_id DESC LIMIT ?", params=[int(limit)]).pl()

    def access_events(self, actions: Sequence[str], since: datetime) -> list[tuple[Any, ...]]:
        """(occurred_at, action, actor, detail) of the access log's ``actions`` since ``since``, oldest first."""
        return self.con.execute("SELECT occurred_at, action, actor, detail FROM access_log WHERE action IN "
                                "(SELECT unnest(?::VARCHAR[])) AND occurred_at >= ? ORDER BY occurred_at",
                                [list(actions), since]).fetchall()
