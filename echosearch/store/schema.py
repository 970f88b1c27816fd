"""The catalog's schema: its file name, levels, the versioned migrations and the DDL of the tables whose width
is a model's (created when a model is bound). ``docs/catalog.md`` documents every table (a test checks it)."""

from __future__ import annotations

CATALOG_FILE = "catalog.duckdb"
EMBEDDING_LEVELS = ("video", "study", "report")
IDENTITY_LEVELS = ("video_identity", "study_identity")
# versions a reader copes without (tables created on demand): a read-only open of an older catalog is allowed
READ_COMPATIBLE = {3, 4}  # 4: without clip_scope every clip counts as in scope
LEVEL_TABLES = {"video": ("video_embeddings", "video_key"), "study": ("study_embeddings", "study_key"),
                 "report": ("report_embeddings", "study_key"), "video_identity": ("video_identity", "video_key"),
                 "study_identity": ("study_identity", "study_key"), "video_cycle": ("video_cycle", "video_key")}

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
        "scope of each clip: echo or not, B-mode or colour Doppler, view, each with a confidence (echosearch.model.scope)",
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


def cycle_table_sql(dim: int) -> str:
    """DDL of the cycle vector table (``echosearch.model.cycle``; created when an index first stores them,
    ``dim`` = the encoder's cycle width)."""
    return f"""
    CREATE TABLE IF NOT EXISTS video_cycle (video_key BIGINT PRIMARY KEY, embedding FLOAT[{dim}] NOT NULL);
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
