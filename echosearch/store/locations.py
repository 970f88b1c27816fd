"""Where indexed files are: sealed locations opened with the secret, plain paths of an index that opted in
to raw identifiers, and the sealing of plain paths of an older index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from echosearch.errors import ConfigError
from echosearch.ingest.pseudonym import LABEL_PREFIX
from echosearch.store.base import QueryBase, storable_path, stored_path

if TYPE_CHECKING:
    from echosearch.ingest.pseudonym import Pseudonymizer


class LocationQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""

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
        from echosearch.ingest.pseudonym import Pseudonymizer

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
