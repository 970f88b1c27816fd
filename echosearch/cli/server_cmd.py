"""``echosearch server``: the HTTP API process that owns one index (search while indexing; CLI and app are clients)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from echosearch.cli.common import console, index_option, print_json
from echosearch.errors import IngestError, SomeInputsFailed


def follow_job(client: Any, sources: list[Path], reports: Path | None, labels: Path | None, *, json_out: bool,
               index_dir: Path) -> None:
    """``echosearch index`` through a running server: submit SOURCES as an ingest job, show its progress
    until it ends, print its summary like a local run, and exit as a local run would."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    job = client.submit_job(sources, reports, labels)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=json_out or not console.is_terminal) as bar:
        task = bar.add_task(f"server job {job['job_id']}", total=None)

        def show(state: dict[str, Any]) -> None:
            bar.update(task, completed=state["videos_encoded"], total=state.get("candidates"))

        job = client.wait_job(job["job_id"], show)
    if job["state"] != "done":
        raise IngestError(f"the server's ingest job {job['job_id']} failed: {job.get('error')}")
    summary = job["summary"]
    if json_out:
        print_json(summary | {"job_id": job["job_id"], "server": client.url})
    else:
        console.print(f"indexed {summary['videos_encoded']} videos ({summary['frames_encoded']} frames), "
                      f"{summary['studies_pooled']} studies, {summary['reports_embedded']} reports in "
                      f"{summary['elapsed_s']:.1f} s through the server at {client.url} (job {job['job_id']}); "
                      f"failed inputs: {summary['failed']}")
    if summary["failed"]:
        raise SomeInputsFailed(f"{summary['failed']} input(s) failed: see `echosearch info --index {index_dir}` "
                               "or the ingest_errors table")


def server(
    index: Annotated[Path, index_option("Index folder (created on the first ingest job).")],
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; other than loopback needs "
                                                         "ECHOSEARCH_API_TOKEN or ECHOSEARCH_APP_PASSWORD."),
    port: int = typer.Option(8600, "--port", min=0, max=65535, help="TCP port (0: any free port)."),
    model: str = typer.Option(None, "--model", "-m", help="Model of a new index (default: the model setting)."),
    workers: int = typer.Option(None, "--workers", "-w", min=0, help="Decode processes of ingest jobs."),
    no_resume: bool = typer.Option(False, "--no-resume",
                                   help="Do not finish encoding videos an interrupted ingest left behind."),
    dicom_port: int = typer.Option(None, "--dicom-port", min=0, max=65535,
                                   help="Also receive studies by DICOM C-STORE on this port (0: any free port)."),
    ae_title: str = typer.Option(None, "--ae-title", help="AE title of the DICOM receiver (default ECHOSEARCH)."),
) -> None:
    """Serve an index over HTTP (API under /v1, OpenAPI at /docs) until interrupted."""
    from echosearch.config import load_settings
    from echosearch.serve.run import serve

    settings = load_settings(index=index, model=model, workers=workers)

    def ready(record: dict[str, Any]) -> None:
        url, dicom = record["url"], record.get("dicom")
        typer.echo(f"echosearch server on {url} (index {index.resolve()}, auth: {record['auth']}; API docs "
                   f"{url}/docs)" + (f"; DICOM receiver {dicom['ae_title']} on port {dicom['port']}" if dicom else ""),
                   err=True)
        sys.stderr.flush()

    serve(index, settings, host=host, port=port, on_ready=ready, resume=not no_resume, dicom_port=dicom_port,
          ae_title=ae_title)
