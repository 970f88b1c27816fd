"""``echosearch search``, ``reports`` and ``reindex``: thin wrappers over :mod:`echosearch.query`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import typer
from rich.table import Table

from echosearch.cli.common import (
    IndexOpt,
    ServerOpt,
    TableJsonOpt,
    console,
    frame_records,
    frame_table,
    print_json,
    remote,
)
from echosearch.errors import QueryError
from echosearch.filters import Filters, parse_date


def _one_query(**given: Any) -> tuple[str, Any]:
    chosen = [(name, value) for name, value in given.items() if value is not None]
    if len(chosen) != 1:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise QueryError(f"give exactly one of {flags}")
    return chosen[0]


def _display(df: pl.DataFrame, level: str) -> pl.DataFrame:
    cols = ["rank", "score", "patient_pseudonym", "study_date", "view"]
    cols += ["path"] if level == "video" else ["study_uid"]
    cols += ["pred_ef"] if "pred_ef" in df.columns and df["pred_ef"].null_count() < df.height else []
    cols.insert(2, "clip_score")  # with a study context: the clip's own cosine beside the fused score
    cols.insert(2, "confidence")  # with --confidence: the result against the archive's own matches
    names = {"patient_pseudonym": "patient", "study_date": "date", "study_uid": "study", "pred_ef": "EF (pred)",
             "clip_score": "clip"}
    return df.select([pl.col(c).alias(names.get(c, c)) for c in cols if c in df.columns])


def search(
    index: IndexOpt,
    text: str | None = typer.Option(None, "--text", help="Find echoes matching this description."),
    video: Path | None = typer.Option(None, "--video", help="Find echoes like this DICOM/AVI/MP4 file."),
    like_video: int | None = typer.Option(None, "--like-video", help="Find echoes like this catalog video key."),
    like_study: str | None = typer.Option(None, "--like-study", help="Find echoes like this study UID."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of results."),
    where: str | None = typer.Option(None, "--where", help="SQL filter expression over the search view "
                                                            "(e.g. \"study_date >= '2020-01-01' AND view = 'A4C'\")."),
    patient: list[str] | None = typer.Option(None, "--patient", help="Only these patient pseudonyms."),
    exclude_patient: list[str] | None = typer.Option(None, "--exclude-patient", help="Leave out these patients."),
    since: str | None = typer.Option(None, "--since", help="Studies on or after this date (YYYY-MM-DD)."),
    until: str | None = typer.Option(None, "--until", help="Studies on or before this date (YYYY-MM-DD)."),
    view: list[str] | None = typer.Option(None, "--view", help="Only these views (A4C, PLAX, ...)."),
    manufacturer: list[str] | None = typer.Option(None, "--manufacturer", help="Manufacturer contains this."),
    ef_min: float | None = typer.Option(None, "--ef-min", help="Predicted EF at least (%)."),
    ef_max: float | None = typer.Option(None, "--ef-max", help="Predicted EF at most (%)."),
    device: list[str] | None = typer.Option(None, "--device", help="Predicted device: pacer_lead, tavr, mitraclip."),
    level: str = typer.Option("video", "--level", help="Search videos or studies: video | study."),
    scope: str = typer.Option("all", "--scope", help="in: echo B-mode clips only; out: only clips marked out of "
                                                     "scope (not echo, or colour Doppler); all (default)."),
    mode: list[str] | None = typer.Option(None, "--mode", help="Imaging mode: bmode, doppler."),
    confidence: bool = typer.Option(False, "--confidence", help="Place each result against this archive's "
                                                                "own matches and say 'no close match' (calibrates "
                                                                "on first use: seconds)."),
    collapse: bool = typer.Option(False, "--collapse", help="Keep only the best clip per study."),
    context: float | None = typer.Option(
        None, "--context", min=0.0, max=1.0,
        help="Weight of each clip's study vector in its score (video level; default 0.5 for --text, "
             "0 otherwise; 0 = the clip alone, e.g. to find the views that show a finding)."),
    json_out: TableJsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Nearest echoes to a text, a clip, or a catalog video/study, with metadata filters."""
    from echosearch.query import Searcher

    if level not in ("video", "study"):
        raise QueryError(f"--level must be video or study, not {level!r}")
    kind, value = _one_query(text=text, video=video, like_video=like_video, like_study=like_study)
    filters = Filters(patients=tuple(patient or ()), exclude_patients=tuple(exclude_patient or ()),
                      since=parse_date(since, "--since"), until=parse_date(until, "--until"),
                      views=tuple(view or ()), manufacturers=tuple(manufacturer or ()), ef_min=ef_min,
                      ef_max=ef_max, devices=tuple(device or ()), where=where,
                      scope=None if scope == "all" else scope, modes=tuple(mode or ()))
    client = remote(index, server)
    if client is not None:  # a server holds this index: ask it
        from echosearch.serve.client import filters_body

        body = {"k": k, "level": level, "collapse": collapse, "context": context, "filters": filters_body(filters)}
        with client:
            payload = (client.search_file(value, body) if kind == "video" else client.search(body | {kind: value}))
        if json_out:
            print_json(payload)
            return
        df, n_available = pl.DataFrame(payload["results"]), payload["n_available"]
        title = f"{df.height} of {n_available} {level}s" + (" (best clip per study)" if collapse else "")
        if payload.get("context"):
            title += f" (scored with study context {payload['context']:g}; 'clip' = the clip alone)"
        console.print(frame_table(_display(df, level), title=title + f" [server {client.url}]"))
        return
    with Searcher(index) as s:
        opts: dict[str, Any] = {"collapse_study": collapse} | ({} if context is None else {"context": context})
        if kind == "text":  # each query's default context is the query API's
            df = s.by_text(value, k, level, filters, **opts)
        elif kind == "video":
            df = s.by_video_file(value, k, level, filters, **opts)
        elif kind == "like_video":
            df = s.like_video(value, k, filters, level=level, **opts)
        else:
            df = s.like_study(value, k, filters, level=level, **opts)
        info = s.last_info
        judged = None
        if confidence:
            from echosearch.search.view import with_confidence

            df, judged = with_confidence(s, df, kind, value, level, info.context if info else 0.0)
    n_available = info.n_available if info else df.height
    if json_out:
        print_json({"query": {kind: str(value)}, "level": level, "k": k, "n_available": n_available,
                    "plan": info.plan if info else None, "context": info.context if info else None,
                    "filters": filters.as_dict(),
                    **({"no_close_match": judged.no_match} if judged else {}),
                    "results": frame_records(df)})
        return
    if judged is not None and judged.no_match:
        console.print(f"[yellow]{judged.headline()}[/yellow]")
    title = f"{df.height} of {n_available} {level}s" + (" (best clip per study)" if collapse else "")
    if info and info.context:
        title += f" (scored with study context {info.context:g}; 'clip' = the clip alone)"
    console.print(frame_table(_display(df, level), title=title))


def reports(
    index: IndexOpt,
    video: Path | None = typer.Option(None, "--video", help="Reports nearest to this DICOM/AVI/MP4 file."),
    like_video: int | None = typer.Option(None, "--like-video", help="Reports nearest to this catalog video."),
    like_study: str | None = typer.Option(None, "--like-study", help="Reports nearest to this study UID."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="Number of reports."),
    json_out: TableJsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Nearest report texts (other studies' reports) to a clip or a catalog video/study."""
    from echosearch.query import Searcher

    kind, value = _one_query(video=video, like_video=like_video, like_study=like_study)
    client = remote(index, server)
    if client is not None:  # a server holds this index: ask it
        with client:
            payload = client.reports_file(value, k) if kind == "video" else client.reports({kind: value, "k": k})
        if json_out:
            print_json(payload)
            return
        df = pl.DataFrame(payload["results"])
        info = None
    else:
        with Searcher(index) as s:
            df = s.reports_for(Path(value) if kind == "video" else value, k)
            info = s.last_info
    if df.height == 0:
        df = pl.DataFrame(schema={c: pl.String for c in ("rank", "score", "patient_pseudonym", "study_date",
                                                        "report_text")})
    if json_out:
        print_json({"query": {kind: str(value)}, "k": k, "n_available": info.n_available if info else df.height,
                    "results": frame_records(df)})
        return
    console.print(frame_table(df.select("rank", "score", pl.col("patient_pseudonym").alias("patient"),
                                        pl.col("study_date").alias("date"), pl.col("report_text").alias("report")),
                              title=f"{df.height} nearest reports"))


def reindex(index: IndexOpt, json_out: TableJsonOpt = False) -> None:
    """Rebuild the vector indexes (video, study, report) from the catalog alone."""
    from echosearch.query import reindex as rebuild

    manifests = rebuild(index)
    if json_out:
        print_json(manifests)
        return
    t = Table(title=f"vector indexes of {index}")
    for col in ("level", "type", "vectors", "params", "recall@10", "p50 ms", "build s"):
        t.add_column(col)
    for level, m in manifests.items():
        t.add_row(level, m["index_type"], str(m["ntotal"]), str(m.get("params") or "-"),
                  str(m.get("recall_at_10")), str(m.get("latency_p50_ms")), str(m.get("build_seconds")))
    console.print(t)
