"""Shared helpers of the CLI modules: JSON output, rich tables of polars frames."""

from __future__ import annotations

import json
import sys
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout (dates and numpy values made serialisable)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_default, sort_keys=False) + "\n")


def _default(o: Any) -> Any:
    import datetime as _dt

    import numpy as np

    if isinstance(o, (_dt.date, _dt.datetime)):
        return o.isoformat()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def frame_table(df: pl.DataFrame, title: str | None = None, float_digits: int = 3) -> Table:
    """A rich table of a polars DataFrame (floats rounded, lists shortened)."""
    table = Table(title=title, show_lines=False)
    for col in df.columns:
        table.add_column(col, overflow="fold")
    for row in df.iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f"{v:.{float_digits}f}")
            elif v is None:
                cells.append("")
            else:
                s = str(v)
                cells.append(s if len(s) <= 80 else s[:77] + "...")
        table.add_row(*cells)
    return table


def frame_records(df: pl.DataFrame) -> list[dict[str, Any]]:
    return df.to_dicts()
