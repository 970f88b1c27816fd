"""What every group of named queries relies on: the catalog's connection and its two helpers."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb


class QueryBase:
    """Attributes and helpers that :class:`echosearch.catalog.Catalog` defines (declared for type checking)."""

    index_dir: Path
    con: duckdb.DuckDBPyConnection
    read_only: bool

    if TYPE_CHECKING:
        def one(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None: ...

        def transaction(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]: ...

        def get_manifest(self, key: str, default: Any = None) -> Any: ...

