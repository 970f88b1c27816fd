"""``echosearch receive`` (a DICOM C-STORE receiver) and ``echosearch pull`` (DICOMweb): studies from PACS."""

from __future__ import annotations

import logging
import os
import signal
import threading
from datetime import date, datetime
from typing import Annotated

import typer

from echosearch.cli.common import NewIndexOpt, SummaryJsonOpt, console, err_console, print_json, shown


def _log_to_stderr() -> None:
    """Log lines of echosearch (counts, labels, AE titles: no identifiers) on stderr; pynetdicom's own stay at
    WARNING, since its debug output dumps dataset contents."""
    level = os.environ.get("ECHOSEARCH_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("echosearch").setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _parse_date(value: str | None) -> date | None:
    if value is None:
        return None
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    raise typer.BadParameter("use YYYY-MM-DD (or YYYYMMDD)", param_hint="--since")


def receive(
    index: NewIndexOpt,
    port: int = typer.Option(11112, "--port", "-p", min=0, max=65535, help="DICOM port (0: any free port)."),
    ae_title: str = typer.Option("ECHOSEARCH", "--ae-title", help="This receiver's AE title (called AET)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
) -> None:
    """Receive ultrasound instances by DICOM C-STORE and index them, until stopped (Ctrl-C or SIGTERM).

    Each instance is acknowledged only once it is on disk under INDEX/received and journaled; indexing
    follows in the background. Instances left unindexed by an earlier run are indexed first.
    """
    from echosearch.config import load_settings
    from echosearch.intake import start_receiver

    _log_to_stderr()
    settings = load_settings(index=index)
    handle = start_receiver(settings.index, settings, ae_title=ae_title, host=host, port=port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    err_console.print(f"receiving as {shown(handle.ae_title)} on {handle.host}:{handle.port} into "
                      f"{shown(settings.index)} (Ctrl-C to stop)")
    try:
        while not done.wait(1.0):
            pass
    finally:
        handle.stop()
        s = handle.stats
        err_console.print(f"stopped: {s.stored} stored, {s.duplicates} duplicate(s), {s.failed} failed; "
                          f"{len(handle.store.pending())} left to index at the next start")


def pull(
    dicomweb: Annotated[str, typer.Option("--dicomweb", help="DICOMweb base URL, e.g. http://pacs:8042/dicom-web.")],
    index: NewIndexOpt,
    since: str | None = typer.Option(None, "--since", help="Study date to start from, YYYY-MM-DD "
                                     "(default: the stored watermark; first run: every date)."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Runs an instance may fail before it "
                                     "is recorded as an ingest error."),
    json_out: SummaryJsonOpt = False,
) -> None:
    """Fetch new ultrasound studies (QIDO-RS, WADO-RS) and index them; safe to run from cron.

    A run resumes from the stored watermark, fetches only instances not yet stored, and exits with
    status 12 when another pull on this index is still running.
    """
    from echosearch.config import load_settings
    from echosearch.intake.pull import pull as run_pull
    from echosearch.intake.pull import summary_dict

    settings = load_settings(index=index)
    summary = run_pull(dicomweb, settings.index, settings, since=_parse_date(since), max_attempts=max_attempts,
                       progress=not json_out and err_console.is_terminal)
    if json_out:
        print_json(summary_dict(summary))
        return
    console.print(
        f"{shown(summary.source)}: {summary.studies} stud(ies) from {summary.watermark_before or 'the start'}, "
        f"{summary.fetched} instance(s) fetched, {summary.already_stored} already stored, "
        f"{summary.not_ultrasound} not ultrasound, {summary.failed} to retry, {summary.given_up} recorded as "
        f"errors; {summary.indexed} indexed; watermark now {summary.watermark_after or 'unset'} "
        f"({summary.elapsed_s:.1f} s)")
