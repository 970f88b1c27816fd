"""The catalog (``catalog.duckdb``): single source of truth for files, studies, patients and embeddings.

Written by one process at a time, in transactions. The schema is a versioned list of migrations; the
embedding tables are created when a model is bound to the index, because their width (``FLOAT[d]``)
is the model's embedding dimension. ``docs/catalog.md`` documents every table (a test checks it).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import polars as pl

from echosearch.errors import CatalogError, ConfigError, IndexNotFoundError, ModelMismatchError
from echosearch.pseudonym import LABEL_PREFIX
from echosearch.store.analysis_queries import AnalysisQueries
from echosearch.store.app_queries import AppQueries
from echosearch.store.run_queries import RunQueries

if TYPE_CHECKING:
    from echosearch.pseudonym import Pseudonymizer

CATALOG_FILE = "catalog.duckdb"
EMBEDDING_LEVELS = ("video", "study", "report")
IDENTITY_LEVELS = ("video_identity", "study_identity")
# versions a reader copes without (tables created on demand): a read-only open of an older catalog is allowed
READ_COMPATIBLE = {3, 4}  # 4: without clip_scope every clip counts as in scope
_LEVEL_TABLES = {"video": ("video_embeddings", "video_key"), "study": ("study_embeddings", "study_key"),
                 "report": ("report_embeddings", "study_key"), "video_identity": ("video_identity", "video_key"),
                 "study_identity": ("study_identity", "study_key")}

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "core tables",
        """
        CREATE SEQUENCE IF NOT EXISTS patient_key_seq START 1;
        CREATE SEQUENCE IF NOT EXISTS study_key_seq START 1;
        CREATE SEQUENCE IF NOT EXISTS video_key_seq START 1;
        CREATE SEQUENCE IF NOT EXISTS error_id_seq START 1;
        CREATE SEQUENCE IF NOT EXISTS run_id_seq START 1;
        CREATE TABLE manifest (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
        CREATE TABLE patients (
            patient_key BIGINT PRIMARY KEY DEFAULT nextval('patient_key_seq'),
            patient_pseudonym VARCHAR NOT NULL UNIQUE,
            patient_id_raw VARCHAR,
            patient_name VARCHAR,
            birth_date DATE
        );
        CREATE TABLE studies (
            study_key BIGINT PRIMARY KEY DEFAULT nextval('study_key_seq'),
            study_uid VARCHAR NOT NULL UNIQUE,
            patient_key BIGINT NOT NULL,
            accession_pseudonym VARCHAR,
            study_date DATE
        );
        CREATE TABLE videos (
            video_key BIGINT PRIMARY KEY DEFAULT nextval('video_key_seq'),
            sha256 VARCHAR NOT NULL UNIQUE,
            path VARCHAR NOT NULL,
            size_bytes BIGINT NOT NULL,
            kind VARCHAR NOT NULL,
            study_key BIGINT NOT NULL,
            series_uid VARCHAR,
            sop_uid VARCHAR,
            view VARCHAR,
            n_frames INTEGER,
            height INTEGER,
            width INTEGER,
            fps DOUBLE,
            manufacturer VARCHAR,
            manufacturer_model VARCHAR,
            photometric VARCHAR,
            transfer_syntax VARCHAR,
            sector_bbox INTEGER[],
            sector_source VARCHAR,
            scanned_at TIMESTAMP NOT NULL,
            encoded_at TIMESTAMP
        );
        CREATE TABLE reports (
            study_key BIGINT PRIMARY KEY,
            text VARCHAR NOT NULL,
            source VARCHAR NOT NULL
        );
        CREATE TABLE labels (
            level VARCHAR NOT NULL,
            key BIGINT NOT NULL,
            name VARCHAR NOT NULL,
            value DOUBLE,
            text_value VARCHAR,
            source VARCHAR NOT NULL,
            PRIMARY KEY (level, key, name)
        );
        CREATE TABLE predictions (
            level VARCHAR NOT NULL,
            key BIGINT NOT NULL,
            task VARCHAR NOT NULL,
            value DOUBLE NOT NULL,
            model VARCHAR NOT NULL,
            PRIMARY KEY (level, key, task)
        );
        CREATE TABLE ingest_errors (
            error_id BIGINT PRIMARY KEY DEFAULT nextval('error_id_seq'),
            path VARCHAR NOT NULL,
            sha256 VARCHAR,
            stage VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            occurred_at TIMESTAMP NOT NULL
        );
        CREATE TABLE runs (
            run_id BIGINT PRIMARY KEY,
            kind VARCHAR NOT NULL,
            started_at TIMESTAMP NOT NULL,
            params VARCHAR NOT NULL
        );
        CREATE TABLE calibrations (
            name VARCHAR PRIMARY KEY,
            created_at TIMESTAMP NOT NULL,
            n_positive BIGINT NOT NULL,
            n_negative BIGINT NOT NULL,
            auc DOUBLE,
            threshold DOUBLE,
            params VARCHAR NOT NULL
        );
        CREATE TABLE identity_audit (
            run_id BIGINT NOT NULL,
            study_key BIGINT NOT NULL,
            recorded_patient_key BIGINT NOT NULL,
            own_score DOUBLE,
            best_other_patient_key BIGINT,
            best_other_score DOUBLE,
            margin DOUBLE,
            p_same DOUBLE,
            suspect BOOLEAN NOT NULL,
            rank INTEGER,
            evidence VARCHAR NOT NULL,
            PRIMARY KEY (run_id, study_key)
        );
        CREATE TABLE audit_decisions (
            study_key BIGINT NOT NULL,
            decision VARCHAR NOT NULL,
            reviewer VARCHAR NOT NULL,
            occurred_at TIMESTAMP NOT NULL,
            note VARCHAR
        );
        CREATE TABLE changes (
            run_id BIGINT NOT NULL,
            patient_key BIGINT NOT NULL,
            study_key BIGINT NOT NULL,
            prev_study_key BIGINT,
            baseline_study_key BIGINT,
            score_prev DOUBLE,
            score_baseline DOUBLE,
            z_prev DOUBLE,
            z_baseline DOUBLE,
            flagged BOOLEAN NOT NULL,
            explanation VARCHAR NOT NULL,
            PRIMARY KEY (run_id, study_key)
        );
        CREATE TABLE access_log (
            occurred_at TIMESTAMP NOT NULL,
            actor VARCHAR NOT NULL,
            action VARCHAR NOT NULL,
            detail VARCHAR NOT NULL
        );
        """,
    ),
    (
        2,
        "sealed file locations: path holds a keyed label, location the AES-GCM sealed path",
        """
        ALTER TABLE videos ADD COLUMN location BLOB;
        ALTER TABLE ingest_errors ADD COLUMN location BLOB;
        """,
    ),
    (
        3,
        "identity vectors: video_identity and study_identity, created when an identity model is bound "
        "(their width is the identity encoder's)",
        "",
    ),
    # v4 (scope of each clip) and v5 (PACS intake) are appended below this line by their issues
    (
        4,
        "scope of each clip: echo or not, B-mode or colour Doppler, view, each with a confidence (echosearch.scope)",
        """
        CREATE TABLE IF NOT EXISTS clip_scope (
            video_key BIGINT PRIMARY KEY,
            is_echo BOOLEAN NOT NULL,
            echo_confidence DOUBLE NOT NULL,
            mode VARCHAR NOT NULL,
            mode_confidence DOUBLE NOT NULL,
            view VARCHAR,
            view_confidence DOUBLE,
            view_source VARCHAR,
            in_scope BOOLEAN NOT NULL,
            evidence VARCHAR NOT NULL,
            signals VARCHAR NOT NULL,
            model_checked BOOLEAN NOT NULL
        );
        """,
    ),
]
SCHEMA_VERSION = max(v for v, _, _ in MIGRATIONS)


def embedding_table_sql(dim: int) -> str:
    """DDL of the embedding tables for a model of width ``dim`` (created when a model is bound)."""
    return f"""
    CREATE TABLE IF NOT EXISTS video_embeddings (
        video_key BIGINT PRIMARY KEY, embedding FLOAT[{dim}] NOT NULL, n_frames_used INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS study_embeddings (
        study_key BIGINT PRIMARY KEY, embedding FLOAT[{dim}] NOT NULL, n_videos INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS report_embeddings (
        study_key BIGINT PRIMARY KEY, embedding FLOAT[{dim}] NOT NULL
    );
    CREATE TABLE IF NOT EXISTS frame_embeddings (
        video_key BIGINT NOT NULL, frame_index INTEGER NOT NULL, embedding FLOAT[{dim}] NOT NULL,
        PRIMARY KEY (video_key, frame_index)
    );
    """


def identity_table_sql(dim: int) -> str:
    """DDL of the identity vector tables (same layout as the embedding tables; created when an identity model
    is bound, ``dim`` = its width)."""
    return f"""
    CREATE TABLE IF NOT EXISTS video_identity (
        video_key BIGINT PRIMARY KEY, embedding FLOAT[{dim}] NOT NULL, n_frames_used INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS study_identity (
        study_key BIGINT PRIMARY KEY, embedding FLOAT[{dim}] NOT NULL, n_videos INTEGER NOT NULL
    );
    """


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


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def storable_path(path: str | os.PathLike[str]) -> str:
    """A file path as the catalog stores it: unchanged when its bytes are valid UTF-8 (every ordinary name);
    otherwise each byte that is not UTF-8 is written as ``\\xHH`` (DuckDB holds UTF-8 only), which keeps
    the name displayable. :func:`stored_path` reverses it."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def stored_path(value: str) -> Path:
    """The file system path of a stored ``path`` (inverse of :func:`storable_path`): the value itself when
    such a file exists or it holds no ``\\xHH`` escape, else the name with those escapes turned back into bytes."""
    path = Path(value)
    if "\\x" not in value or path.exists():
        return path
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), value.encode("utf-8"))
    return Path(os.fsdecode(raw))


class Catalog(AppQueries, RunQueries, AnalysisQueries):
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
                self.con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, description, _now()])
            self._set_manifest_raw("schema_version", str(SCHEMA_VERSION))
            if self.get_manifest("generation") is None:
                self._set_manifest_raw("generation", "0")
                self._set_manifest_raw("created_at", _now().isoformat(timespec="seconds"))

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
            from echosearch.frame_policy import preprocessing_mismatch

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
            now = _now()
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
                [path, sha256, stage, reason, _now(), location],
            )

    # ---- file locations ---------------------------------------------------------------------------
    def locations(self, keys: Sequence[int] | None, pz: Pseudonymizer | None = None) -> dict[int, Path]:
        """Where the files of ``keys`` (video keys; None: all) are: sealed locations opened with ``pz`` (default:
        the configured secret), plain stored paths (an index that opted in to raw identifiers) as they are."""
        sql = "SELECT video_key, path, location FROM videos"
        rows = (self.con.sql(sql + " ORDER BY video_key").fetchall() if keys is None else self.con.execute(
            sql + " WHERE video_key IN (SELECT unnest(?::BIGINT[])) ORDER BY video_key",
            [[int(k) for k in keys]]).fetchall())
        return self._open_locations(rows, pz)

    def error_locations(self, pz: Pseudonymizer | None = None) -> dict[int, Path]:
        """Where the inputs of the ``ingest_errors`` rows are (error id -> path), like :meth:`locations`."""
        rows = self.con.sql("SELECT error_id, path, location FROM ingest_errors ORDER BY error_id").fetchall()
        return self._open_locations(rows, pz)

    def _open_locations(self, rows: Sequence[tuple[Any, ...]], pz: Pseudonymizer | None) -> dict[int, Path]:
        """(key, path, location) rows -> key -> file path; the secret is asked for only when a row is sealed."""
        if pz is None and any(r[2] is not None for r in rows):
            pz = self.pseudonymizer()
        return {int(k): Path(pz.unseal(loc)) if loc is not None and pz is not None else stored_path(p)
                for k, p, loc in rows}

    def pseudonymizer(self) -> Pseudonymizer:
        """The configured secret's pseudonymizer, refused when it is not the secret this index was built with."""
        from echosearch.config import load_settings
        from echosearch.pseudonym import Pseudonymizer

        pz = Pseudonymizer(load_settings().require_secret())
        stored = self.get_manifest("secret_fingerprint")
        if stored is not None and stored != pz.fingerprint():
            raise ConfigError("this index was built with another pseudonymisation secret; set the same "
                              "ECHOSEARCH_SECRET to open its file locations")
        return pz

    def locate(self, what: str, pz: Pseudonymizer | None = None) -> list[dict[str, Any]]:
        """The files behind a video key or a stored label (videos and ingest errors), with their real paths."""
        out: list[dict[str, Any]] = []
        for table, key in (("videos", "video_key"), ("ingest_errors", "error_id")):
            cond = "path = ?" if not what.isdigit() or table == "ingest_errors" else "video_key = ?"
            value: Any = what if cond.startswith("path") else int(what)
            for k, label, loc in self.con.execute(f"SELECT {key}, path, location FROM {table} WHERE {cond}",
                                                  [value]).fetchall():
                if loc is not None:
                    pz = pz or self.pseudonymizer()
                path = pz.unseal(loc) if loc is not None and pz is not None else str(stored_path(label))
                out.append({"table": table, "key": int(k), "label": label, "path": path})
        return out

    def seal_plain_paths(self, pz: Pseudonymizer) -> int:
        """Replace file paths stored in the clear (indexes from before sealing) by their labels and sealed
        locations, in videos and ingest_errors; returns how many rows changed."""
        n = 0
        for table, key in (("videos", "video_key"), ("ingest_errors", "error_id")):
            rows = self.con.execute(f"SELECT {key}, path FROM {table} WHERE location IS NULL AND NOT "
                                    f"starts_with(path, '{LABEL_PREFIX}')").fetchall()
            if not rows:
                continue
            paths = {int(k): stored_path(p) for k, p in rows}
            frame = pl.DataFrame({"k": list(paths), "label": [pz.file_label(p) for p in paths.values()],
                                  "location": [pz.seal(p) for p in paths.values()]},
                                 schema={"k": pl.Int64, "label": pl.String, "location": pl.Binary})
            with self.transaction() as con:
                con.register("_sealed", frame.to_arrow())
                try:
                    con.execute(f"UPDATE {table} SET path = _sealed.label, location = _sealed.location "
                                f"FROM _sealed WHERE {table}.{key} = _sealed.k")
                finally:
                    con.unregister("_sealed")
            n += len(rows)
        return n

    def clear_errors(self, paths: Sequence[str]) -> None:
        """Forget earlier failures of ``paths`` once they have been ingested successfully (one statement)."""
        if paths:
            self.con.execute("DELETE FROM ingest_errors WHERE path IN (SELECT unnest(?::VARCHAR[])) "
                             "AND stage <> 'report-object'", [[storable_path(p) for p in paths]])

    def study_key(self, study_uid: str) -> int | None:
        row = self.one("SELECT study_key FROM studies WHERE study_uid = ?", [study_uid])
        return int(row[0]) if row else None

    def record_report(self, study_uid: str, text: str, source: str) -> bool:
        """Attach report text to a known study; returns False when the study is not in the catalog."""
        key = self.study_key(study_uid)
        if key is None:
            return False
        with self.transaction():
            self.con.execute(
                "INSERT INTO reports VALUES (?, ?, ?) ON CONFLICT (study_key) DO UPDATE SET text = excluded.text, "
                "source = excluded.source",
                [key, text, source],
            )
        return True

    def record_label(self, level: str, key: int, name: str, value: float | str, source: str) -> None:
        """A ground-truth or user label (kept apart from model predictions)."""
        num = float(value) if isinstance(value, (int, float, np.floating, np.integer)) else None
        txt = None if num is not None else str(value)
        with self.transaction():
            self.con.execute(
                "INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (level, key, name) DO UPDATE SET "
                "value = excluded.value, text_value = excluded.text_value, source = excluded.source",
                [level, key, name, num, txt, source],
            )

    # ---- embeddings ------------------------------------------------------------------------------
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
                "UPDATE videos SET encoded_at = ? WHERE video_key IN (SELECT unnest(?::BIGINT[]))", [_now(), keys]
            )
            self.bump_generation()

    def store_identity_embeddings(self, level: str, keys: list[int], vectors: np.ndarray, counts: list[int]) -> None:
        """Insert or replace identity vectors of videos (``video_identity``) or studies (``study_identity``)."""
        if level not in IDENTITY_LEVELS or not self.has_table(level):
            raise CatalogError(f"index {self.index_dir} has no {level} table: no identity model is bound")
        dim = self.level_dim(level)
        assert dim is not None
        key, count = ("video_key", "n_frames_used") if level == "video_identity" else ("study_key", "n_videos")
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(keys), dim)
        frame = pl.DataFrame({key: keys, "embedding": vecs, count: counts},
                             schema={key: pl.Int64, "embedding": pl.Array(pl.Float32, dim), count: pl.Int32})
        with self.transaction():
            self.insert_frame(level, frame, replace=True)
            self.bump_generation()

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
        if level in IDENTITY_LEVELS:
            dim = self.level_dim(level) or dim
            if not self.has_table(level):
                return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        table = _LEVEL_TABLES[level]
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

    # ---- scope of clips (echosearch.scope) -------------------------------------------------------
    def has_scope(self) -> bool:
        """Whether this catalog records clip scope (schema 4; an older catalog opened read-only does not)."""
        return self.has_table("clip_scope")

    def store_scope(self, rows: pl.DataFrame) -> None:
        """Insert or replace ``clip_scope`` rows (columns of :data:`echosearch.scope.SCOPE_COLUMNS`)."""
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

    def embedding_keys(self, level: str) -> np.ndarray:
        """Sorted keys that have a vector at ``level`` (without reading the vectors: to sample them first)."""
        table, key = _LEVEL_TABLES[level]
        if not self.has_table(table):
            return np.zeros(0, np.int64)
        return np.asarray([r[0] for r in self.con.sql(f"SELECT {key} FROM {table} ORDER BY 1").fetchall()], np.int64)

    def drop_predictions(self, level: str, keys: Sequence[int]) -> None:
        """Forget the zero-shot predictions of ``keys`` at ``level`` (e.g. clips found out of scope)."""
        if keys:
            self.con.execute("DELETE FROM predictions WHERE level = ? AND key IN (SELECT unnest(?::BIGINT[]))",
                             [level, [int(k) for k in keys]])

    # ---- runs and results ----------------------------------------------------------------------
    def new_run(self, kind: str, params: dict[str, Any]) -> int:
        with self.transaction():
            row = self.one("SELECT nextval('run_id_seq')")
            assert row is not None
            run_id = int(row[0])
            self.con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?)", [run_id, kind, _now(), json.dumps(params, default=str)]
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
                [name, _now(), n_pos, n_neg, auc, threshold, json.dumps(params, default=str)],
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
                             [_now(), actor, action, json.dumps(detail, default=str)])

    # ---- summaries -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Row counts of the main tables (embedding tables count 0 before a model is bound)."""
        tables = ["patients", "studies", "videos", "reports", "labels", "predictions", "ingest_errors",
                  "identity_audit", "changes"] + [f"{lvl}_embeddings" for lvl in EMBEDDING_LEVELS] + list(IDENTITY_LEVELS)
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

    # ---- what the server's routes read and write (named here so that SQL stays in the catalog layer) ----
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
                             [int(study_key), decision, reviewer, _now(), note or None])
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


def as_dict(rec: VideoRecord) -> dict[str, Any]:
    return asdict(rec)
