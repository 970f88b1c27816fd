"""Metadata filters of a search, resolved to the catalog keys a vector search may return.

Typed filters become SQL with bound parameters only (user values are never pasted into SQL). An operator's
raw ``where`` expression is the one exception: it runs only on a read-only connection with file access
disabled, must be a single expression (no ``;``, no comments, balanced parentheses), and its errors
become :class:`QueryError` with DuckDB's message. Columns it may use are listed in ``WHERE_COLUMNS``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import date
from typing import Any

import duckdb
import numpy as np

from echosearch.errors import QueryError
from echosearch.model.zeroshot import TASKS

DEVICE_TASKS = ("pacer_lead", "tavr", "mitraclip")
PREDICTION_TASKS = TASKS  # every zero-shot task is a filterable column
KEY_COLUMN = {"video": "video_key", "study": "study_key", "report": "study_key"}
WHERE_COLUMNS = (
    "video_key", "study_key", "study_uid", "study_date", "accession_pseudonym", "patient_key", "patient_pseudonym",
    "view", "manufacturer", "manufacturer_model", "path", "kind", "n_frames", "fps", "height", "width",
    "series_uid", "sop_uid", "scanned_at", "encoded_at", *PREDICTION_TASKS, "pred_ef",
    "in_scope", "is_echo", "echo_confidence", "mode", "view_source",  # clip scope (schema 4; echosearch.model.scope)
)
SCOPES = ("in", "out")
MODES = ("bmode", "doppler")


def _tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def parse_date(value: date | str | None, name: str) -> date | None:
    """A date from an ISO string (or a date); QueryError naming the option otherwise."""
    if value is None or isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise QueryError(f"{name} must be a date like 2020-01-31, got {value!r}") from exc


@dataclass(frozen=True)
class Filters:
    """What a search may return. Empty fields do not filter; all given fields must hold (AND).

    ``views`` match case-insensitively; ``manufacturers`` match as case-insensitive substrings; ``ef_min`` /
    ``ef_max`` use the predicted EF (%) of the video, else of its study; ``devices`` require a positive
    prediction of each named task; ``where`` is raw SQL over ``WHERE_COLUMNS`` (operators only).
    """

    patients: tuple[str, ...] = ()
    exclude_patients: tuple[str, ...] = ()
    since: date | None = None
    until: date | None = None
    views: tuple[str, ...] = ()
    manufacturers: tuple[str, ...] = ()
    ef_min: float | None = None
    ef_max: float | None = None
    devices: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    where: str | None = None
    scope: str | None = None  # "in": echo B-mode clips only; "out": only clips marked out of scope
    modes: tuple[str, ...] = ()  # "bmode", "doppler"

    def __post_init__(self) -> None:
        if self.scope is not None and self.scope not in SCOPES:
            raise QueryError(f"scope must be one of {list(SCOPES)}, got {self.scope!r}")
        object.__setattr__(self, "modes", tuple(str(m).lower() for m in _tuple(self.modes)))
        if any(m not in MODES for m in self.modes):
            raise QueryError(f"mode must be among {list(MODES)}, got {list(self.modes)}")
        for name in ("patients", "exclude_patients", "views", "manufacturers", "devices", "study_uids"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        object.__setattr__(self, "since", parse_date(self.since, "since"))
        object.__setattr__(self, "until", parse_date(self.until, "until"))
        for name in ("ef_min", "ef_max"):
            value = getattr(self, name)
            if value is not None:
                if not math.isfinite(float(value)):
                    raise QueryError(f"{name.replace('_', '-')} must be a finite number (EF in %), got {value!r}")
                object.__setattr__(self, name, float(value))
        unknown = [d for d in self.devices if d not in DEVICE_TASKS]
        if unknown:
            raise QueryError(f"unknown device flag(s) {unknown}; choose from {list(DEVICE_TASKS)}")
        if self.where is not None and not self.where.strip():
            object.__setattr__(self, "where", None)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) in (None, ()) for f in fields(self))

    def as_dict(self) -> dict[str, Any]:
        """The non-empty fields (for logs of what was searched and JSON output)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in (None, ())}


def check_where(expr: str) -> str:
    """Refuse anything but one SQL expression: no ``;``, no comments, balanced quotes and parentheses.

    Only plain ``'...'`` strings and ``"..."`` names are allowed: quoting this checker does not parse (dollar
    quotes ``$$...$$`` / ``$tag$...$tag$``, escape strings ``E'...'``) could hide a parenthesis and widen the
    expression past the other filters, so it is refused, as is ``$`` outside quotes (parameters)."""
    text = expr.strip()
    if ";" in text:
        raise QueryError("--where must be a single SQL expression (';' is not allowed)")
    depth, quote, i = 0, "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch == "$":
            raise QueryError("--where must not use '$' outside quotes (dollar-quoted strings and parameters are "
                             "not supported; write strings in single quotes)")
        elif ch == "'" and i > 0 and text[i - 1] in "eE" and (i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_")):
            raise QueryError("--where must not use escape strings (E'...'); write strings in single quotes")
        elif ch in "'\"":
            quote = ch
        elif text.startswith("--", i) or text.startswith("/*", i):
            raise QueryError("--where must not contain SQL comments")
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            if depth < 0:
                raise QueryError("--where has unbalanced parentheses")
        i += 1
    if quote or depth:
        raise QueryError("--where has an unclosed quote or parenthesis")
    return text


def search_view_sql(level: str, predictions: bool, scope: bool = False) -> str:
    """One row per video with study and patient columns (and predictions at ``level``): what filters see.

    With ``scope`` (a catalog with ``clip_scope``) ``view`` is the label, else the scope's view (header or
    model), and the scope columns are added; a clip without a scope row counts as in scope."""
    view = "coalesce(v.view, sc.view) AS view" if scope else "v.view"
    cols = ("v.video_key, v.study_key, s.study_uid, s.study_date, s.accession_pseudonym, p.patient_key, "
            f"p.patient_pseudonym, {view}, v.manufacturer, v.manufacturer_model, v.path, v.kind, v.n_frames, v.fps, "
            "v.height, v.width, v.series_uid, v.sop_uid, v.scanned_at, v.encoded_at")
    joins = "FROM videos v JOIN studies s ON s.study_key = v.study_key JOIN patients p ON p.patient_key = s.patient_key"
    if scope:
        cols += (", coalesce(sc.in_scope, true) AS in_scope, coalesce(sc.is_echo, true) AS is_echo, "
                 "sc.echo_confidence, coalesce(sc.mode, 'bmode') AS mode, sc.view_source")
        joins += " LEFT JOIN clip_scope sc ON sc.video_key = v.video_key"
    if not predictions:
        return f"SELECT {cols} {joins}"
    pivot = ", ".join(f"max(value) FILTER (WHERE task = '{t}') AS {t}" for t in PREDICTION_TASKS)
    agg = ", ".join(f"{'avg' if t == 'ef' else 'max'}(pv.{t}) AS {t}" for t in PREDICTION_TASKS)
    # video level: the video's prediction, else its study's; study level: the study's, else its videos' (mean EF)
    first, second = ("vp", "sp") if level == "video" else ("sp", "va")
    pred_cols = ", ".join(f"coalesce({first}.{t}, {second}.{t}) AS {t}" for t in PREDICTION_TASKS)
    pred_cols += f", coalesce({first}.ef, {second}.ef) AS pred_ef"
    return (
        f"WITH pv AS (SELECT level, key, {pivot} FROM predictions GROUP BY level, key), "
        f"va AS (SELECT v.study_key, {agg} FROM videos v JOIN pv ON pv.level = 'video' AND pv.key = v.video_key "
        f"GROUP BY v.study_key) "
        f"SELECT {cols}, {pred_cols} {joins} "
        f"LEFT JOIN pv vp ON vp.level = 'video' AND vp.key = v.video_key "
        f"LEFT JOIN pv sp ON sp.level = 'study' AND sp.key = v.study_key "
        f"LEFT JOIN va ON va.study_key = v.study_key"
    )


def _typed_clauses(f: Filters) -> tuple[list[str], list[Any]]:
    """SQL conditions with ``?`` placeholders and their values, in order."""
    clauses: list[str] = []
    params: list[Any] = []

    def add(sql: str, *values: Any) -> None:
        clauses.append(sql)
        params.extend(values)

    if f.patients:
        add("list_contains(?::VARCHAR[], patient_pseudonym)", list(f.patients))
    if f.exclude_patients:
        add("NOT list_contains(?::VARCHAR[], patient_pseudonym)", list(f.exclude_patients))
    if f.study_uids:
        add("list_contains(?::VARCHAR[], study_uid)", list(f.study_uids))
    if f.since is not None:
        add("study_date >= ?", f.since)
    if f.until is not None:
        add("study_date <= ?", f.until)
    if f.views:
        add("list_contains(?::VARCHAR[], upper(view))", [v.upper() for v in f.views])
    if f.manufacturers:
        add("(" + " OR ".join(["contains(lower(manufacturer), ?)"] * len(f.manufacturers)) + ")",
            *[m.lower() for m in f.manufacturers])
    if f.ef_min is not None:
        add("ef >= ?", f.ef_min)
    if f.ef_max is not None:
        add("ef <= ?", f.ef_max)
    for device in f.devices:  # validated against DEVICE_TASKS: a column name, not user text
        add(f"{device} > ?", 0.0)
    if f.scope is not None:
        add("in_scope = ?", f.scope == "in")
    if f.modes:
        add("list_contains(?::VARCHAR[], mode)", list(f.modes))
    return clauses, params


def _read_only(con: duckdb.DuckDBPyConnection) -> bool:
    rows = con.execute("SELECT current_setting('access_mode')").fetchall()  # fetchall: no dangling result
    return bool(rows and str(rows[0][0]).lower() == "read_only")


def resolve_ids(catalog_con: duckdb.DuckDBPyConnection, level: str, filters: Filters | None) -> np.ndarray | None:
    """Sorted catalog keys of ``level`` (video keys, or study keys for study/report) that pass ``filters``.

    ``None`` means no filter (every key may be returned); an empty array means nothing matches.
    """
    if filters is None or filters.is_empty():
        return None
    if level not in KEY_COLUMN:
        raise QueryError(f"unknown level {level!r}; choose one of {list(KEY_COLUMN)}")
    clauses, params = _typed_clauses(filters)
    rows = catalog_con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'clip_scope'"
                               ).fetchall()
    has_scope = bool(rows and rows[0][0])
    if not has_scope and (filters.scope is not None or filters.modes):  # an older index: every clip in scope
        clauses = [c.replace("in_scope", "true").replace("mode)", "'bmode')") for c in clauses]
    where = filters.where
    if where is not None:
        if not _read_only(catalog_con):
            raise QueryError("--where SQL runs only on a read-only catalog connection (open it with read_only=True)")
        catalog_con.execute("SET enable_external_access = false")  # no file reads from operator SQL
        clauses.insert(0, f"({check_where(where)})")
    words = set(re.findall(r"[a-z_]+", (where or "").lower()))
    needs_predictions = bool(filters.ef_min is not None or filters.ef_max is not None or filters.devices
                             or words & {*PREDICTION_TASKS, "pred_ef"})
    key = KEY_COLUMN[level]
    sql = (f"SELECT DISTINCT {key} FROM ({search_view_sql(level, needs_predictions, has_scope)}) AS search_view "
           f"WHERE {' AND '.join(clauses)} ORDER BY 1")
    try:
        table = catalog_con.sql(sql, params=params).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"invalid filter: {exc}") from exc
    return table.column(0).to_numpy().astype(np.int64)
