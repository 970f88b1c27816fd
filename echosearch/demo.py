"""``make demo``: the whole product on the embedded default, printed as a report.

synthetic cohort (with mislabels and events) -> index with the shipped demo model -> text and video
search -> identity audit -> change scan -> evaluation against the cohort's ground truth, with EchoCLIP's
published figures as anchors. Re-running reuses what is already built.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.panel import Panel

from echosearch.cli.common import frame_table

DEMO_COHORT: dict[str, Any] = {"patients": 80, "seed": 2024, "visits": (2, 5), "views": ("A4C", "PLAX", "A2C"),
                               "mislabel_rate": 0.06, "size": "small"}
REAL_DICOM = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "real-dicom"
console = Console()


def _secret(out: Path) -> str:
    """The demo's pseudonymisation key: generated once, kept beside the demo index (synthetic data only)."""
    f = out / "demo-secret.txt"
    if not f.exists():
        out.mkdir(parents=True, exist_ok=True)
        f.write_text(secrets.token_hex(24))
        console.print(f"[yellow]demo mode: generated a pseudonymisation secret in {f} (never do this with real data)[/]")
    return f.read_text().strip()


def run(out: Path, patients: int | None = None) -> dict[str, Any]:
    from echosearch.catalog import Catalog
    from echosearch.change import scan_changes
    from echosearch.config import load_settings
    from echosearch.errors import ConfigError, ModelMismatchError
    from echosearch.evaluation.core import evaluate, format_table, join_truth, study_truth
    from echosearch.evaluation.identity import audit_metrics, identity_metrics, levels_frame
    from echosearch.identity import audit
    from echosearch.query import Searcher
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    t0 = time.time()
    out = Path(out)
    os.environ["ECHOSEARCH_SECRET"] = _secret(out)
    cohort, index_dir = out / "cohort", out / "index"
    kw = dict(DEMO_COHORT)
    if patients:
        kw["patients"] = patients
    console.rule("[bold]1. synthetic cohort")
    if not (cohort / "ground_truth.parquet").exists():
        truth = generate_cohort(cohort, **kw)
    else:
        truth = pl.read_parquet(cohort / "ground_truth.parquet")
    console.print(f"{truth['true_patient_id'].n_unique()} patients, {truth['study_uid'].n_unique()} studies, "
                  f"{truth.height} videos; {truth.filter(pl.col('mislabelled'))['study_uid'].n_unique()} studies "
                  f"carry another patient's ID; events: "
                  f"{truth.explode('events').drop_nulls('events')['events'].value_counts().sort('events').rows()}")

    console.rule("[bold]2. index (scan + encode + vector indexes)")
    settings = load_settings(mode="demo")
    try:
        summary = index_sources([cohort], index_dir, settings, progress=True)
    except ConfigError as exc:  # built before the demo model had an identity head: fill its vectors in
        if "without identity" not in str(exc) or not settings.identity_model:
            raise
        from echosearch.identity.model import backfill_identity, load_identity_encoder
        from echosearch.model.encode import encoder_for_index

        with Catalog.open(index_dir) as cat:
            n = backfill_identity(cat, load_identity_encoder(settings.identity_model, encoder_for_index(cat)))
        console.print(f"[yellow]the demo index had no identity vectors: filled in for {n} videos with the shipped "
                      "identity model")
        summary = index_sources([cohort], index_dir, settings, progress=True)
    except ModelMismatchError as exc:  # derived data: rebuild it for the models shipped now
        console.print(f"[yellow]the demo index was built with another model ({exc}); rebuilding it")
        shutil.rmtree(index_dir)
        summary = index_sources([cohort], index_dir, settings, progress=True)
    console.print(f"encoded {summary.videos_encoded} new videos ({summary.frames_encoded} frames) in "
                  f"{summary.elapsed_s:.1f} s; failed inputs: {summary.failed}")

    # one read-write connection for the rest: DuckDB refuses mixing read-only and read-write in a process
    with Catalog.open(index_dir) as cat:
        console.rule("[bold]3. search")
        searcher = Searcher(index_dir, catalog=cat)
        text = "SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION."
        hits = searcher.by_text(text, k=8, level="study")
        t_study = truth.group_by("study_uid").agg(pl.col("ef").first().round(0).alias("true_ef"))
        shown = hits.join(t_study, on="study_uid", how="left")
        console.print(frame_table(shown.select([c for c in ("score", "patient_pseudonym", "study_date", "true_ef",
                                                            "pred_ef") if c in shown.columns]),
                                  title=f"text search: {text}"))
        clip = next(iter(sorted(REAL_DICOM.glob("ACUSON*.dcm"))), None) if REAL_DICOM.is_dir() else None
        if clip is None:
            clip = cohort / truth.filter(pl.col("view") == "A4C")["path"][0]
        vhits = searcher.by_video_file(clip, k=5)
        console.print(frame_table(vhits.select([c for c in ("score", "patient_pseudonym", "study_date", "view", "path")
                                                if c in vhits.columns]),
                                  title=f"video search: {clip.name} (a real scanner file; the demo model knows only "
                                        "synthetic echoes)" if clip.parent == REAL_DICOM else f"video search: {clip.name}"))

        console.rule("[bold]4. identity audit")
        console.print(f"identity: {cat.info()['identity']}")
        suspects = audit(cat)  # identity vectors when the index has them (demo mode: the shipped identity model)
        flagged = suspects.filter(pl.col("suspect"))
        true_mis = set(truth.filter(pl.col("mislabelled"))["study_uid"].to_list())
        uid_of = cat.study_uids()
        cols = [c for c in ("rank", "study_key", "own_score", "best_other_score", "p_same") if c in flagged.columns]
        table = flagged.select(cols).with_columns(
            pl.col("study_key").map_elements(lambda k: "yes" if uid_of.get(k) in true_mis else "no",
                                             return_dtype=pl.String).alias("truly mislabelled"))
        console.print(frame_table(table.head(12), title=f"{flagged.height} suspect studies (top 12; truth column from "
                                                        "the synthetic ground truth)"))
        st = study_truth(join_truth(cat, truth))
        levels = levels_frame(identity_metrics(cat, st, n_boot=200), audit_metrics(cat, st))
        console.print(frame_table(levels, title="identity vs content vectors, same studies: cross-visit pair AUC "
                                                "(true patients) and the audit against the truth"))
        console.rule("[bold]5. change scan")
        changes = scan_changes(cat)
        fl = changes.filter(pl.col("flagged")).sort("change_prob", descending=True)
        shown = fl.select("patient_pseudonym", "study_date", pl.col("change_prob").round(2),
                          pl.col("reasons").list.join(", ").alias("flags"), "explanation")
        console.print(frame_table(shown.head(12), title=f"{fl.height} of {changes['prev_study_key'].is_not_null().sum()} "
                                                        "follow-up visits flagged (top 12 by change probability)"))

        console.rule("[bold]6. evaluation against ground truth (EchoCLIP's published figures as anchors)")
        result = evaluate(cat, truth=cohort / "ground_truth.parquet")
        console.print(format_table(result))
        from echosearch.evaluation.change import format_change_table

        console.print(format_change_table(result.get("change", {})))
    console.print(Panel(f"done in {time.time() - t0:.0f} s; index at {index_dir}; open the app with `make app`",
                        title="echosearch demo"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("indexes/demo"))
    ap.add_argument("--patients", type=int)
    a = ap.parse_args()
    from echosearch.errors import EchosearchError

    try:
        run(a.out, a.patients)
    except EchosearchError as exc:
        console.print(f"[red]error: {exc}[/]")
        raise SystemExit(exc.exit_code) from exc


if __name__ == "__main__":
    main()

