"""``echosearch merge`` and the Ray side of ``echosearch index --executor ray`` (docs/scale.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from echosearch.cli.common import JsonOpt, console, index_option, print_json, shown
from echosearch.config import Settings
from echosearch.errors import ConfigError, SomeInputsFailed


def index_on_ray(executor: str, sources: Sequence[Path], index_dir: Path, settings: Settings, *,
                 address: str | None, unit_files: int | None, reports: Path | None, labels: Path | None,
                 json_out: bool) -> None:
    """``index --executor ray``: run the units on Ray, merge the shards, print what happened."""
    if executor != "ray":
        raise ConfigError(f"unknown executor {executor!r}: use local or ray")
    from echosearch.run.ray_runner import index_with_ray
    from echosearch.run.units import DEFAULT_UNIT_FILES

    summary = index_with_ray(sources, index_dir, settings, address=address, reports=reports, labels=labels,
                             unit_files=unit_files or DEFAULT_UNIT_FILES, progress=not json_out)
    if json_out:
        print_json(asdict(summary))
    else:
        m = summary.merge
        console.print(f"{summary.units} units of work: {summary.units_done} done before, {summary.units_run} run on "
                      f"Ray ({summary.actors} encode actor(s)); {summary.clips_encoded} clips encoded, "
                      f"{summary.report_objects} report objects; merged {m.get('videos_added', 0)} videos, "
                      f"{m.get('studies_pooled', 0)} studies in {summary.elapsed_s:.1f} s; failed inputs: "
                      f"{summary.failed}")
    if summary.failed:
        raise SomeInputsFailed(f"{summary.failed} input(s) failed: see `echosearch info --index {index_dir}` "
                               "or the ingest_errors table")


def merge(
    index_dir: Annotated[Path, index_option("Index folder whose shards/ to load.")],
    chunk_rows: int = typer.Option(65_536, "--chunk-rows", min=1,
                                   help="Vectors read at a time while building the vector indexes."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (report text vectors)."),
    json_out: JsonOpt = False,
) -> None:
    """Load the Parquet shards of `index --executor ray` into the catalog (idempotent: a second run changes
    nothing) and build the vector indexes chunk by chunk."""
    from echosearch.config import load_settings
    from echosearch.run.merge import merge_shards

    settings = load_settings(device=device)
    summary = merge_shards(index_dir, settings, chunk_rows=chunk_rows)
    if json_out:
        print_json(asdict(summary))
        return
    console.print(f"{summary.shards} shards in {shown(index_dir)}: {summary.shards_merged} merged, "
                  f"{summary.videos_added} videos added ({summary.videos_known} already there), "
                  f"{summary.failures_recorded} failures recorded, {summary.studies_pooled} studies pooled; "
                  f"vector indexes {'rebuilt' if summary.vector_indexes_built else 'current'}; "
                  f"{summary.elapsed_s:.1f} s")
