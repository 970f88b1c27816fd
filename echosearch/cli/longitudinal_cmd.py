"""``echosearch audit``, ``changes``, ``match`` and ``eval``: identity audit, change scan, patient matching and
evaluation against ground truth (rich tables, or JSON with ``--json``)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import typer

from echosearch.catalog import Catalog
from echosearch.cli.common import IndexOpt, JsonOpt, ServerOpt, console, frame_records, frame_table, print_json, remote


def audit(
    index: IndexOpt,
    fpr: float = typer.Option(0.01, "--fpr", min=1e-6, max=0.5, help="Nominal share of correct studies flagged."),
    k: int = typer.Option(50, "-k", "--neighbours", min=1, help="Study neighbours searched per study."),
    unverifiable: bool = typer.Option(False, "--unverifiable", help="Also list single-study patients."),
    limit: int = typer.Option(30, "--limit", help="Rows shown in the table (JSON has all)."),
    json_out: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Identity audit: studies whose recorded patient is probably wrong, with the patient they resemble."""
    from echosearch.identity import audit as run_audit

    client = remote(index, server)
    if client is not None:  # a server holds this index: it runs the audit
        with client:
            payload = client.audit(fpr, k, unverifiable)
        if json_out:
            print_json(payload)
            return
        df = pl.DataFrame([r | {"evidence": json.dumps(r["evidence"])} for r in payload["studies"]])
    else:
        with Catalog.open(index) as cat:
            df = run_audit(cat, fpr=fpr, k=k, report_unverifiable=unverifiable)
    if json_out:
        rows = frame_records(df)
        for r in rows:
            r["evidence"] = json.loads(r["evidence"])
        print_json({"run_id": df["run_id"][0] if df.height else None, "suspects": int(df["suspect"].sum()),
                    "studies": rows})
        return
    reasons = [", ".join(json.loads(e)["reasons"][:2]) for e in df["evidence"]]
    view = df.with_columns(pl.Series("reasons", reasons)).select(
        "rank", "study_uid", "study_date", "recorded_patient", "own_score", "best_other_patient",
        "best_other_score", "margin", "p_same", "status", "reasons").head(limit)
    console.print(frame_table(view, title=f"identity audit of {index}: {int(df['suspect'].sum())} suspect(s) "
                                          f"among {df.height} studies (run {df['run_id'][0] if df.height else '-'})"))


def changes(
    index: IndexOpt,
    patient: str = typer.Option(None, "--patient", "-p", help="Patient pseudonym or key (default: everyone)."),
    min_probability: float = typer.Option(0.8, "--min-probability", min=0.0, max=1.0,
                                          help="Show a flag when its calibrated probability is at least this."),
    show_all: bool = typer.Option(False, "--all", help="Show every study, not only flagged ones."),
    json_out: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Change between visits per patient: change probability, flags (EF fall/rise, new or removed device,
    new heart) with their probability and evidence, and the explanation."""
    from echosearch.change import scan_changes

    client = remote(index, server)
    if client is not None:  # a server holds this index: it runs the scan
        with client:
            payload = client.changes(patient, min_probability=min_probability)
        if json_out:
            print_json(payload)
            return
        df = pl.DataFrame(payload["studies"])
    else:
        with Catalog.open(index) as cat:
            df = scan_changes(cat, patient=patient, min_probability=min_probability)
    if json_out:
        print_json({"run_id": df["run_id"][0] if df.height else None, "flagged": int(df["flagged"].sum()),
                    "studies": frame_records(df)})
        return
    view = df if (show_all or patient is not None) else df.filter(pl.col("flagged"))
    view = view.select("patient_pseudonym", "visit", "study_date", "change_prob", "score_prev",
                       "change_prob_baseline", "flagged", "explanation")
    console.print(frame_table(view, title=f"changes in {index}: {int(df['flagged'].sum())} flagged of "
                                          f"{int(df['prev_study_key'].is_not_null().sum())} follow-up studies"))


def match(
    index: IndexOpt,
    study: str = typer.Option(None, "--study", "-s", help="Study Instance UID (or study key)."),
    video: Path = typer.Option(None, "--video", help="A video file (DICOM, AVI, ...), indexed or not."),
    k: int = typer.Option(5, "-k", help="Candidate patients."),
    json_out: JsonOpt = False,
    server: ServerOpt = None,
) -> None:
    """Which patients does this study (the study itself excluded) or video look like? Identity vectors when
    the index has them; p_same is the calibrated probability of each patient."""
    from echosearch.errors import QueryError
    from echosearch.identity import match_patients

    if (study is None) == (video is None):
        raise QueryError("give one of --study UID or --video FILE")
    client = remote(index, server)
    if client is not None:  # a server holds this index: ask it
        with client:
            payload = client.match_file(video, k) if video is not None else client.match(study, k)
        if json_out:
            print_json(payload)
            return
        console.print(frame_table(pl.DataFrame(payload["candidates"]),
                                  title=f"patients matching {next(iter(payload))} {next(iter(payload.values()))}"))
        return
    with Catalog.open(index, read_only=True) as cat:
        if video is not None:
            from echosearch.model.encode import encoder_for_index
            from echosearch.run.single import match_vector

            df = match_patients(cat, match_vector(cat, video, encoder_for_index(cat)), k_patients=k)
        else:
            df = match_patients(cat, study, k_patients=k)
    what = {"study": study} if video is None else {"video": str(video)}
    if json_out:
        print_json({**what, "candidates": frame_records(df)})
        return
    console.print(frame_table(df, title=f"patients matching {next(iter(what))} {next(iter(what.values()))}"))


def eval_(
    index: IndexOpt,
    truth: Path = typer.Option(None, "--truth", "-t", help="Ground-truth table (default: ground_truth.parquet "
                                                             "next to the indexed source)."),
    k: int = typer.Option(10, "-k", help="k of text -> video recall@k."),
    no_text: bool = typer.Option(False, "--no-text", help="Skip text retrieval (no model load)."),
    json_out: JsonOpt = False,
    prevalence: float = typer.Option(0.001, "--prevalence", min=1e-6, max=0.5,
                                     help="Share of mislabelled studies the audit projection assumes "
                                          "(default 1 in 1,000)."),
) -> None:
    """Evaluate identity, audit, change, zero-shot and retrieval against ground truth."""
    from echosearch.evaluation.core import evaluate, format_table

    result = evaluate(index, truth, k=k, text=not no_text, prevalence=prevalence)
    if json_out:
        print_json(result)
        return
    console.print(format_table(result))
    from echosearch.evaluation.change import format_change_table

    console.print(format_change_table(result.get("change", {})))
    methods = result.get("zero_shot_methods", {})
    if methods.get("rows"):
        df = pl.DataFrame(methods["rows"])
        console.print(frame_table(df.drop("vectors"), title=f"zero-shot by method, same {df['vectors'][0]}"))
    else:
        console.print(f"zero-shot by method: skipped ({methods.get('skipped')})")
