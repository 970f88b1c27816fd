"""Shared helpers of the CLI modules: the options every command spells the same way, JSON output, rich tables
of polars frames."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)

# control characters (ANSI escapes start with ESC or CSI), lone surrogates (undecodable file name bytes),
# line separators and bidirectional overrides: none of them may reach a terminal from a file name
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def safe_text(value: object) -> str:
    """``str(value)`` fit for a terminal: each unsafe character written as a visible ``\\xHH``-style escape."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), str(value))


def shown(value: object) -> str:
    """A path, file name or other data for ``console.print`` / rich tables: :func:`safe_text` with rich
    markup escaped, so that ``a[/x].dcm`` prints as itself."""
    return escape(safe_text(value))


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
    table = Table(title=shown(title) if title is not None else None, show_lines=False)
    for col in df.columns:
        table.add_column(shown(col), overflow="fold")
    for row in df.iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f"{v:.{float_digits}f}")
            elif v is None:
                cells.append("")
            else:
                s = str(v)
                cells.append(shown(s if len(s) <= 80 else s[:77] + "..."))
        table.add_row(*cells)
    return table


def frame_records(df: pl.DataFrame) -> list[dict[str, Any]]:
    return df.to_dicts()


SERVER_HELP = ("URL of a running `echosearch server` to ask (default: the server recorded in the index folder, "
               "if one runs; else the catalog is opened directly).")


# ---- shared options: declared once, used as ``index: IndexOpt`` / ``json_out: JsonOpt = False`` ------------
def index_option(help_text: str = "Index folder.") -> Any:
    """The ``--index DIR`` / ``-i DIR`` option; ``help_text`` for the commands that say more about the folder."""
    return typer.Option("--index", "-i", help=help_text)


def json_option(help_text: str = "Print JSON.") -> Any:
    """The ``--json`` flag (machine-readable output on stdout)."""
    return typer.Option("--json", help=help_text)


IndexOpt = Annotated[Path, index_option()]
"""An existing index folder (required)."""
NewIndexOpt = Annotated[Path, index_option("Index folder (created when missing).")]
"""An index folder that the command creates when missing (required)."""
JsonOpt = Annotated[bool, json_option()]
TableJsonOpt = Annotated[bool, json_option("Print JSON instead of a table.")]
SummaryJsonOpt = Annotated[bool, json_option("Print the summary as JSON.")]
ServerOpt = Annotated[str | None, typer.Option("--server", envvar="ECHOSEARCH_SERVER", help=SERVER_HELP)]
"""``--server URL`` (or ECHOSEARCH_SERVER): default None, the server recorded in the index folder if one runs."""


def remote(index: Any, server: str | None) -> Any:
    """A client of the server that holds ``index`` (or of ``server``), or None to open the catalog directly."""
    from echosearch.serve.client import connect

    return connect(index, server)
