"""The catalog (``catalog.duckdb``): single source of truth for files, studies, patients and embeddings.

Written by one process at a time, in transactions. This module is the catalog's core (opening, migrating,
the manifest, model binding, the indexing path's writes, runs); the schema and its versioned migrations are in
:mod:`echosearch.store.schema`, and the named queries of each part of echosearch in the groups of
:mod:`echosearch.store` that :class:`Catalog` combines. ``docs/catalog.md`` documents every table (a test
checks it).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from echosearch.errors import CatalogError, ConfigError, IndexNotFoundError, ModelMismatchError
from echosearch.store.analysis_queries import AnalysisQueries
from echosearch.store.app_queries import AppQueries
from echosearch.store.base import storable_path, utc_now
from echosearch.store.embeddings import EmbeddingQueries
from echosearch.store.locations import LocationQueries
from echosearch.store.run_queries import RunQueries
from echosearch.store.schema import (
    CATALOG_FILE,
    EMBEDDING_LEVELS,
    IDENTITY_LEVELS,
    MIGRATIONS,
    READ_COMPATIBLE,
    SCHEMA_VERSION,
    embedding_table_sql,
    identity_table_sql,
)
from echosearch.store.scope_queries import ScopeQueries

if TYPE_CHECKING:
    pass

@dataclass
class VideoRecord:
    """Everything ``scan`` learns about one readable video file (identifiers already pseudonymised)."""

    sha256: str
    path: str
    size_bytes: int
    kind: str
    patient_pseudonym: str
    study_uid: str
    accession_pseudonym: str | None = None
    study_date: date | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    view: str | None = None
    n_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None
    sector_bbox: list[int] | None = None
    sector_source: str | None = None
    patient_id_raw: str | None = None
    patient_name: str | None = None
    birth_date: date | None = None
    location: bytes | None = None  # the sealed absolute path when ``path`` is its label
    extra: dict[str, Any] = field(default_factory=dict)


# the videos columns a VideoRecord fills as they are (keys and scan time are added by record_videos)
_VIDEO_COLUMNS: dict[str, Any] = {
    "sha256": pl.String, "path": pl.String, "size_bytes": pl.Int64, "kind": pl.String, "series_uid": pl.String,
    "sop_uid": pl.String, "view": pl.String, "n_frames": pl.Int32, "height": pl.Int32, "width": pl.Int32,
    "fps": pl.Float64, "manufacturer": pl.String, "manufacturer_model": pl.String, "photometric": pl.String,
    "transfer_syntax": pl.String, "sector_bbox": pl.List(pl.Int32), "sector_source": pl.String,
    "location": pl.Binary,
}

_VIDEO_SCHEMA: dict[str, Any] = {"video_key": pl.Int64, "study_key": pl.Int64, "scanned_at": pl.Datetime("us"),
                                 **_VIDEO_COLUMNS}
_STUDY_SCHEMA: dict[str, Any] = {"study_key": pl.Int64, "study_uid": pl.String, "patient_key": pl.Int64,
                                 "accession_pseudonym": pl.String, "study_date": pl.Date}
_PATIENT_SCHEMA: dict[str, Any] = {"patient_key": pl.Int64, "patient_pseudonym": pl.String,
                                   "patient_id_raw": pl.String, "patient_name": pl.String, "birth_date": pl.Date}


class Catalog(EmbeddingQueries, LocationQueries, ScopeQueries, AppQueries, RunQueries, AnalysisQueries):
    """A connection to one index's catalog. Use :meth:`open`; close it (or use ``with``).

    Its core (here) opens, migrates and writes the indexing path's rows; the named queries of the app,
    the runners and the analyses live in :mod:`echosearch.store`."""

    def __init__(self, index_dir: Path, con: duckdb.DuckDBPyConnection, read_only: bool,
                 write_lock: threading.RLock | None = None) -> None:
        self.index_dir = index_dir
        self.con = con
        self.read_only = read_only
        self._in_tx = False
        # shared by every cursor of one server process: one write transaction at a time, reads never wait
        self.write_lock = write_lock

    def cursor(self, read_only: bool = False) -> Catalog:
        """A catalog on a new cursor of this connection (its own transactions; for one thread at a time).

        A reader sees every transaction committed before each of its statements; writers share this
        catalog's write lock (see :meth:`share_writes`). Close it when done."""
        return Catalog(self.index_dir, self.con.cursor(), read_only or self.read_only, self.write_lock)

    @contextmanager
    def cursor_block(self, read_only: bool = False) -> Iterator[Catalog]:
        """:meth:`cursor` for one ``with`` block (closed at its end): how a server thread reads or writes."""
        cur = self.cursor(read_only)
        try:
            yield cur
        finally:
            cur.close()

    def share_writes(self) -> Catalog:
        """Serialise the write transactions of this catalog and of every cursor made from it from now on
        (a server's ingest jobs and requests): DuckDB would abort one of two concurrent writers of a row."""
        if self.write_lock is None:
            self.write_lock = threading.RLock()
        return self

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: Path | str, create: bool = False, read_only: bool = False) -> Catalog:
        """Open (or with ``create`` make) the catalog of ``index_dir``; migrate it when writable."""
        index_dir = Path(index_dir)
        path = index_dir / CATALOG_FILE
        if not path.exists():
            if not create or read_only:
                raise IndexNotFoundError(f"no index at {index_dir} (missing {CATALOG_FILE}); run `echosearch scan` or `index` first")
            index_dir.mkdir(parents=True, exist_ok=True)
            (index_dir / "vectors").mkdir(exist_ok=True)
        try:
            con = duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            raise CatalogError(f"cannot open {path}: {exc} (is another process writing this index?)") from exc
        except duckdb.Error as exc:
            raise CatalogError(f"cannot open {path}: {exc}") from exc
        cat = cls(index_dir, con, read_only)
        version = cat.schema_version()
        if version > SCHEMA_VERSION:
            con.close()
            raise CatalogError(f"{path} has schema version {version}; this echosearch supports {SCHEMA_VERSION}: upgrade echosearch")
        if version < SCHEMA_VERSION:
            if read_only and all(v in READ_COMPATIBLE for v, _, _ in MIGRATIONS if v > version):
                return cat
            if read_only:
                con.close()
                raise CatalogError(f"{path} has schema version {version}; open it read-write once to migrate")
            cat._migrate(version)
        return cat

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def one(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
        """First row of a query, with the result fully consumed (DuckDB 2.0 forbids dangling results)."""
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0] if rows else None

    def schema_version(self) -> int:
        exists = self.one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
        )
        if not exists or exists[0] == 0:
            return 0
        row = self.one("SELECT max(version) FROM schema_migrations")
        return int(row[0]) if row and row[0] is not None else 0

    def _migrate(self, current: int) -> None:
        with self.transaction():
            self.con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, description VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
            )
            for version, description, sql in MIGRATIONS:
                if version <= current:
                    continue
                if sql.strip():
                    self.con.execute(sql)
                self.con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, description, utc_now()])
            self._set_manifest_raw("schema_version", str(SCHEMA_VERSION))
            if self.get_manifest("generation") is None:
                self._set_manifest_raw("generation", "0")
                self._set_manifest_raw("created_at", utc_now().isoformat(timespec="seconds"))

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One atomic unit of work; nested use joins the outer transaction."""
        if self._in_tx:
            yield self.con
            return
        with self.write_lock if self.write_lock is not None else nullcontext():
            self.con.execute("BEGIN TRANSACTION")
            self._in_tx = True
            try:
                yield self.con
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            else:
                self.con.execute("COMMIT")
            finally:
                self._in_tx = False

    # ---- manifest ------------------------------------------------------------------------------
    def _set_manifest_raw(self, key: str, value: str) -> None:
        self.con.execute(
            "INSERT INTO manifest VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, value]
        )

    def set_manifest(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key``."""
        with self.transaction():
            self._set_manifest_raw(key, json.dumps(value, sort_keys=True, default=str))

    def get_manifest(self, key: str, default: Any = None) -> Any:
        row = self.one("SELECT value FROM manifest WHERE key = ?", [key])
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:
            return row[0]

    def manifest(self) -> dict[str, Any]:
        rows = self.con.sql("SELECT key, value FROM manifest ORDER BY key").fetchall()
        out: dict[str, Any] = {}
        for key, value in rows:
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
        return out

    def generation(self) -> int:
        """Monotone counter bumped whenever embeddings change; vector indexes record the one they saw."""
        return int(self.get_manifest("generation", 0))

    def bump_generation(self) -> int:
        with self.transaction():
            gen = self.generation() + 1
            self._set_manifest_raw("generation", str(gen))
        return gen

    def check_pseudonym_key(self, fingerprint: str) -> None:
        """Refuse to mix pseudonyms made with different secrets in one catalog."""
        stored = self.get_manifest("secret_fingerprint")
        if stored is None:
            self.set_manifest("secret_fingerprint", fingerprint)
        elif stored != fingerprint:
            raise ConfigError(
                "this index was built with another pseudonymisation secret; set the same ECHOSEARCH_SECRET"
            )

    # ---- model binding -------------------------------------------------------------------------
    def bind_model(self, identity: dict[str, Any]) -> None:
        """Record the model/preprocessing identity, or refuse when the index was built with another."""
        stored = self.get_manifest("model")
        if stored is not None:
            from echosearch.ingest.frame_policy import preprocessing_mismatch

            keys = ("name", "weights_sha256", "embed_dim")
            why = preprocessing_mismatch(stored.get("preprocessing"), identity.get("preprocessing"))
            if why and all(stored.get(k) == identity.get(k) for k in keys):
                raise ModelMismatchError(f"index {self.index_dir} was {why}")
            if why or any(stored.get(k) != identity.get(k) for k in keys):
                raise ModelMismatchError(
                    f"index {self.index_dir} was built with model {stored.get('name')} "
                    f"(weights {str(stored.get('weights_sha256'))[:12]}, preprocessing {stored.get('preprocessing')}); "
                    f"refusing {identity.get('name')} (weights {str(identity.get('weights_sha256'))[:12]}, "
                    f"preprocessing {identity.get('preprocessing')}): use a new index folder"
                )
            old_tok, new_tok = ((d.get("tokenizer") or {}).get("sha256") for d in (stored, identity))
            if old_tok and new_tok and old_tok != new_tok:
                raise ModelMismatchError(
                    f"index {self.index_dir} was built with other EchoCLIP-R tokenizer files (sha256 {old_tok[:12]}, "
                    f"now {new_tok[:12]}): its report vectors would not match; use the same files or a new index folder")
            return
        with self.transaction():
            self.con.execute(embedding_table_sql(int(identity["embed_dim"])))
            self._set_manifest_raw("model", json.dumps(identity, sort_keys=True, default=str))
            self._set_manifest_raw("embed_dim", str(int(identity["embed_dim"])))
            self._set_manifest_raw("metric", json.dumps("inner_product_on_l2_normalised"))

    def bind_identity(self, identity: dict[str, Any]) -> None:
        """Record the identity encoder (create its vector tables), or refuse another one; an index whose videos
        were encoded without identity vectors is refused too (they would have none)."""
        stored = self.get_manifest("identity_model")
        if stored is not None:
            keys = ("name", "weights_sha256", "embed_dim")
            if any(stored.get(k) != identity.get(k) for k in keys):
                raise ModelMismatchError(
                    f"index {self.index_dir} has identity vectors from {stored.get('name')} (weights "
                    f"{str(stored.get('weights_sha256'))[:12]}); refusing {identity.get('name')} (weights "
                    f"{str(identity.get('weights_sha256'))[:12]}): use a new index folder")
            return
        row = self.one("SELECT count(*) FROM videos WHERE encoded_at IS NOT NULL")
        if row and row[0]:
            raise ConfigError(f"index {self.index_dir} already holds {row[0]} videos encoded without identity "
                              "vectors: index into a new folder to use an identity model")
        with self.transaction():
            self.con.execute(identity_table_sql(int(identity["embed_dim"])))
            self._set_manifest_raw("identity_model", json.dumps(identity, sort_keys=True, default=str))

    def has_identity(self) -> bool:
        """Whether this index stores identity vectors of their own (else identity uses the content vectors)."""
        return self.get_manifest("identity_model") is not None and self.has_table("study_identity")

    def identity_description(self) -> str:
        """What identity is computed from, for ``info``."""
        ident = self.get_manifest("identity_model")
        if ident is None or not self.has_table("study_identity"):
            return "content vectors (no identity model)"
        return f"{ident.get('name')} ({ident.get('kind')}, {ident.get('embed_dim')}-d)"

    def level_dim(self, level: str) -> int | None:
        """Vector width of a level (identity levels: the identity encoder's)."""
        if level in IDENTITY_LEVELS:
            ident = self.get_manifest("identity_model")
            return int(ident["embed_dim"]) if ident else None
        if level == "video_cycle":
            cycle = self.get_manifest("cycle")
            return int(cycle["dim"]) if cycle else None
        return self.embed_dim()

    def embed_dim(self) -> int | None:
        dim = self.get_manifest("embed_dim")
        return int(dim) if dim is not None else None

    def has_table(self, name: str) -> bool:
        row = self.one(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
        )
        return bool(row and row[0])

    # ---- ingest ----------------------------------------------------------------------------------
    def known_hashes(self) -> set[str]:
        """Content hashes already in the catalog (videos and recorded failures/report objects)."""
        rows = self.con.sql("SELECT sha256 FROM videos").fetchall()
        return {r[0] for r in rows}

    def _existing(self, table: str, column: str, key: str, values: list[str]) -> dict[str, int]:
        rows = self.con.execute(f"SELECT {column}, {key} FROM {table} WHERE {column} IN (SELECT unnest(?::VARCHAR[]))",
                                [values]).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def _add_rows(self, table: str, key: str, fresh: dict[str, VideoRecord],
                  row: Callable[[VideoRecord], dict[str, Any]], schema: dict[str, Any]) -> dict[str, int]:
        """Insert one row per ``fresh`` record under new keys of ``{key}_seq``, ascending in ``fresh``'s order;
        returns natural value -> key."""
        if not fresh:
            return {}
        got = self.con.execute(f"SELECT nextval('{key}_seq') FROM range(?)", [len(fresh)]).fetchall()
        keys = dict(zip(fresh, sorted(int(r[0]) for r in got), strict=True))
        rows = [{key: keys[k]} | row(r) for k, r in fresh.items()]
        self.insert_frame(table, pl.DataFrame(rows, schema=schema))
        return keys

    def record_videos(self, recs: Sequence[VideoRecord]) -> dict[str, int]:
        """Upsert videos with their patients and studies in one transaction; returns sha256 -> video key
        (= FAISS id) for every record. A known file keeps its key; a new patient or study takes the
        values of its first record; new keys follow the order of ``recs`` (a re-run numbers alike).
        A constant number of statements per call: per-video statements cost ~1 ms each, which is as much
        as a GPU spends encoding the video."""
        if not recs:
            return {}
        with self.transaction():
            keys = self._existing("videos", "sha256", "video_key", list({r.sha256 for r in recs}))
            new: dict[str, VideoRecord] = {}
            for r in recs:
                if r.sha256 not in keys:
                    new.setdefault(r.sha256, r)
            if not new:
                return keys
            first_of_patient: dict[str, VideoRecord] = {}
            first_of_study: dict[str, VideoRecord] = {}
            for r in new.values():
                first_of_patient.setdefault(r.patient_pseudonym, r)
                first_of_study.setdefault(r.study_uid, r)
            patients = self._existing("patients", "patient_pseudonym", "patient_key", list(first_of_patient))
            patients |= self._add_rows(
                "patients", "patient_key", {p: r for p, r in first_of_patient.items() if p not in patients},
                lambda r: {"patient_pseudonym": r.patient_pseudonym, "patient_id_raw": r.patient_id_raw,
                           "patient_name": r.patient_name, "birth_date": r.birth_date}, _PATIENT_SCHEMA)
            studies = self._existing("studies", "study_uid", "study_key", list(first_of_study))
            studies |= self._add_rows(
                "studies", "study_key", {u: r for u, r in first_of_study.items() if u not in studies},
                lambda r: {"study_uid": r.study_uid, "patient_key": patients[r.patient_pseudonym],
                           "accession_pseudonym": r.accession_pseudonym, "study_date": r.study_date}, _STUDY_SCHEMA)
            now = utc_now()
            keys |= self._add_rows(
                "videos", "video_key", new,
                lambda r: {"study_key": studies[r.study_uid], "scanned_at": now} | {c: getattr(r, c) for c in _VIDEO_COLUMNS}
                | {"path": storable_path(r.path)},
                _VIDEO_SCHEMA)
        return keys

    def record_video(self, rec: VideoRecord) -> int:
        """Upsert one video (see :meth:`record_videos`); returns its key (= FAISS id)."""
        return self.record_videos([rec])[rec.sha256]

    def record_error(self, path: str, sha256: str | None, stage: str, reason: str,
                     location: bytes | None = None) -> None:
        """One row per failed input; never raises for a duplicate (a re-run records it again with a new time).
        ``path`` is the file's label when ``location`` holds its sealed path."""
        path = storable_path(path)
        with self.transaction():
            self.con.execute(
                "DELETE FROM ingest_errors WHERE path = ? AND coalesce(sha256, '') = coalesce(?, '') AND stage = ?",
                [path, sha256, stage],
            )
            self.con.execute(
                "INSERT INTO ingest_errors (path, sha256, stage, reason, occurred_at, location) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [path, sha256, stage, reason, utc_now(), location],
            )

    # ---- runs and results ----------------------------------------------------------------------
    def new_run(self, kind: str, params: dict[str, Any]) -> int:
        with self.transaction():
            row = self.one("SELECT nextval('run_id_seq')")
            assert row is not None
            run_id = int(row[0])
            self.con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?)", [run_id, kind, utc_now(), json.dumps(params, default=str)]
            )
        return run_id

    def insert_frame(self, table: str, df: pl.DataFrame, columns: list[str] | None = None, *,
                     replace: bool = False) -> None:
        """Append (or with ``replace`` insert-or-replace by primary key) a polars frame's ``columns`` to
        ``table`` through one Arrow scan, in one transaction; columns are matched by name."""
        cols = list(columns or df.columns)
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        with self.transaction() as con:
            con.register("_frame_rows", df.select(cols).to_arrow())
            try:
                con.execute(f"{verb} INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _frame_rows")
            finally:
                con.unregister("_frame_rows")

    def latest_run(self, kind: str) -> int | None:
        row = self.one("SELECT max(run_id) FROM runs WHERE kind = ?", [kind])
        return int(row[0]) if row and row[0] is not None else None

    def save_calibration(self, name: str, n_pos: int, n_neg: int, auc: float | None, threshold: float | None,
                         params: dict[str, Any]) -> None:
        with self.transaction():
            self.con.execute(
                "INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?)",
                [name, utc_now(), n_pos, n_neg, auc, threshold, json.dumps(params, default=str)],
            )

    def load_calibration(self, name: str) -> dict[str, Any] | None:
        row = self.one("SELECT * FROM calibrations WHERE name = ?", [name])
        if row is None:
            return None
        return {"name": row[0], "created_at": row[1], "n_positive": row[2], "n_negative": row[3], "auc": row[4],
                "threshold": row[5], "params": json.loads(row[6])}

    def log_access(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """Append to the access log (who searched or viewed what); never raw identifiers."""
        with self.transaction():
            self.con.execute("INSERT INTO access_log VALUES (?, ?, ?, ?)",
                             [utc_now(), actor, action, json.dumps(detail, default=str)])

    # ---- summaries -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Row counts of the main tables (embedding tables count 0 before a model is bound)."""
        tables = ["patients", "studies", "videos", "reports", "labels", "predictions", "ingest_errors",
                  "identity_audit", "changes", *(f"{lvl}_embeddings" for lvl in EMBEDDING_LEVELS), *IDENTITY_LEVELS,
                  "video_cycle"]
        out: dict[str, int] = {}
        for t in tables:
            if self.has_table(t):
                row = self.one(f"SELECT count(*) FROM {t}")
                out[t] = int(row[0]) if row else 0
            else:
                out[t] = 0
        return out

    def info(self) -> dict[str, Any]:
        """Manifest, counts and vector-index manifests: what ``echosearch info`` prints."""
        vec_dir = self.index_dir / "vectors"
        vector_indexes = {}
        if vec_dir.is_dir():
            for f in sorted(vec_dir.glob("*.json")):
                try:
                    vector_indexes[f.stem] = json.loads(f.read_text())
                except (OSError, json.JSONDecodeError):
                    vector_indexes[f.stem] = {"error": "unreadable manifest"}
        return {"index": str(self.index_dir), "manifest": self.manifest(), "counts": self.counts(),
                "vector_indexes": vector_indexes, "identity": self.identity_description()}



def as_dict(rec: VideoRecord) -> dict[str, Any]:
    return asdict(rec)
