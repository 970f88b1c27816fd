"""``echosearch scan`` (fill an index's catalog from folders, files, manifests) and ``echosearch preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from echosearch.cli.common import SummaryJsonOpt, console, err_console, index_option, print_json, shown
from echosearch.errors import SomeInputsFailed


def scan(
    sources: list[Path] = typer.Argument(
        ..., help="Folders, files, or an EchoNet FileList.csv manifest."
    ),
    index: Annotated[Path | None, index_option("Index folder (created when missing).")] = None,
    reports: Path | None = typer.Option(
        None, "--reports", help="CSV/Parquet: study_uid, accession_number or file name -> report text."
    ),
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV/Parquet of labels (e.g. FileList.csv EF)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-w", min=0, help="Decode processes (0 = inline)."
    ),
    json_out: SummaryJsonOpt = False,
) -> None:
    """Discover, decode and catalog every echo video under SOURCE; bad files are recorded, not fatal.

    Exit status 0 when all inputs were ingested (or were report objects), 10 when some failed.

    Failures are listed in the ingest_errors table; a re-run skips files already in the catalog.
    """
    from dataclasses import asdict

    from echosearch.catalog import Catalog
    from echosearch.config import load_settings
    from echosearch.run.local import scan as run_scan

    settings = load_settings(index=index, workers=workers)
    with Catalog.open(settings.index, create=True) as cat:
        summary = run_scan(
            sources,
            cat,
            settings,
            reports=reports,
            labels=labels,
            progress=not json_out and err_console.is_terminal,
        )
    if json_out:
        print_json(asdict(summary))
    else:
        t = Table(title=f"scan into {shown(settings.index)}")
        t.add_column("")
        t.add_column("count", justify="right")
        for name, value in (
            ("files discovered", summary.discovered),
            ("already indexed (skipped)", summary.skipped_known),
            ("videos added", summary.videos_added),
            ("report objects (SR/PDF)", summary.report_objects),
            ("failed", summary.failed),
            ("reports attached", summary.reports_attached),
            ("reports without a matching study", summary.reports_unmatched),
            ("labels recorded", summary.labels_recorded),
            ("labels without a matching video", summary.labels_unmatched),
        ):
            t.add_row(name, str(value))
        console.print(t)
        if summary.failures:
            f = Table(title="failed inputs (also in the ingest_errors table)")
            for col in ("file", "stage", "reason"):
                f.add_column(col, overflow="fold")
            for row in summary.failures[:50]:
                f.add_row(shown(Path(row["path"]).name), shown(row["stage"]), shown(row["reason"]))
            console.print(f)
            if len(summary.failures) > 50:
                console.print(f"... and {len(summary.failures) - 50} more")
        console.print(
            f"catalog now: {summary.counts.get('videos', 0)} videos, "
            f"{summary.counts.get('studies', 0)} studies, {summary.counts.get('patients', 0)} "
            f"patients ({summary.elapsed_s:.1f} s)"
        )
    if summary.failed:
        raise SomeInputsFailed(
            f"{summary.failed} of {summary.discovered} inputs failed; see ingest_errors "
            f"in {settings.index}"
        )


def preview(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A DICOM, AVI or MP4 file."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG to write."),
    policy: str = typer.Option("auto", "--policy", help="Frame policy: auto (the model's own), sector or echoclip."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model whose policy and size apply "
                                     "(default: the model setting)."),
    size: int | None = typer.Option(None, "--size", help="Model input size (default: the model's)."),
) -> None:
    """Write a PNG showing the original frame, the detected sector, and what the model is given."""
    from echosearch.config import load_settings
    from echosearch.ingest.frame_policy import resolve_frame_policy
    from echosearch.ingest.preview import render_preview

    fp = resolve_frame_policy(load_settings(model=model).model, setting=policy, size=size)
    info = render_preview(file, out, fp)
    console.print(
        f"{info.out_png}: {info.width}x{info.height}, {info.n_frames} frames, sector "
        f"{info.sector_bbox} ({info.sector_source}), policy {info.policy}"
    )
