"""What every group of named queries relies on: the catalog's connection and helpers, and how paths and times
are stored."""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:
    import polars as pl


class QueryBase:
    """Attributes and helpers that :class:`echosearch.catalog.Catalog` defines (declared for type checking)."""

    index_dir: Path
    con: duckdb.DuckDBPyConnection
    read_only: bool

    if TYPE_CHECKING:
        def one(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None: ...

        def transaction(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]: ...

        def get_manifest(self, key: str, default: Any = None) -> Any: ...

        def set_manifest(self, key: str, value: Any) -> None: ...

        def has_table(self, name: str) -> bool: ...

        def has_scope(self) -> bool: ...

        def embed_dim(self) -> int | None: ...

        def level_dim(self, level: str) -> int | None: ...

        def bump_generation(self) -> int: ...

        def insert_frame(self, table: str, df: pl.DataFrame, columns: list[str] | None = None, *,
                         replace: bool = False) -> None: ...

        def log_access(self, actor: str, action: str, detail: dict[str, Any]) -> None: ...


def utc_now() -> datetime:
    """Now in UTC without a zone (how the catalog's TIMESTAMP columns hold time)."""
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
