"""``echosearch info``: what an index holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from echosearch.catalog import Catalog
from echosearch.cli.common import console, print_json, shown


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        index: Path = typer.Option(..., "--index", "-i", help="Index folder."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show an index's manifest, table counts, vector indexes and ingest error count."""
        with Catalog.open(index, read_only=True) as cat:
            data = cat.info()
        if json_out:
            print_json(data)
            return
        t = Table(title=f"index {shown(index)}")
        t.add_column("table")
        t.add_column("rows", justify="right")
        for k, v in data["counts"].items():
            t.add_row(k, str(v))
        console.print(t)
        m = Table(title="manifest")
        m.add_column("key")
        m.add_column("value", overflow="fold")
        for k, v in data["manifest"].items():
            m.add_row(shown(k), shown(v))
        console.print(m)
        for name, vm in data["vector_indexes"].items():
            console.print(f"vector index [bold]{shown(name)}[/]: {vm.get('index_type')} rows={vm.get('ntotal')} "
                          f"recall@10={vm.get('recall_at_10')}")
