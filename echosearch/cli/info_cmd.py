"""``echosearch info``: what an index holds; ``echosearch locate``: where one of its files is on disk."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from echosearch.catalog import Catalog
from echosearch.cli.common import IndexOpt, JsonOpt, ServerOpt, console, print_json, remote, shown
from echosearch.errors import QueryError


def locate(
    what: Annotated[str, typer.Argument(help="A video key, or a file label (F-...) from search output or errors.")],
    index: IndexOpt,
    json_out: JsonOpt = False,
) -> None:
    """Reveal where a file is on disk (needs the index's secret; the lookup is written to the access log)."""
    import getpass

    with Catalog.open(index) as cat:
        found = cat.locate(what.strip())
        cat.log_access(getpass.getuser(), "locate", {"what": what.strip(), "found": len(found)})
    if not found:
        raise QueryError(f"no video or ingest error {what!r} in {index}")
    if json_out:
        print_json(found)
        return
    for f in found:
        console.print(f"{shown(f['table'])} {f['key']} {shown(f['label'])}: {shown(f['path'])}")


def info(index: IndexOpt, json_out: JsonOpt = False, server: ServerOpt = None) -> None:
    """Show an index's manifest, table counts, vector indexes and ingest error count."""
    client = remote(index, server)
    if client is not None:  # a server holds this index: ask it
        with client:
            data = client.info()
    else:
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
    console.print(f"identity: {shown(data['identity'])}")
    for name, vm in data["vector_indexes"].items():
        console.print(f"vector index [bold]{shown(name)}[/]: {vm.get('index_type')} rows={vm.get('ntotal')} "
                      f"recall@10={vm.get('recall_at_10')}")
    for job in data.get("jobs", []):  # from a running server
        console.print(f"ingest job {job['job_id']} {job['state']}: {job['videos_encoded']} videos encoded"
                      + (f", error: {shown(job['error'])}" if job.get("error") else ""))
