"""The shipped demo model on a fresh synthetic cohort (seed unseen in training).

The encode issue's targets: zero-shot EF MAE <= 10 (the shipped model gives ~9.6 on this cohort) and
text->video recall@10 >= 0.8 for finding phrases, ranked as the query API ranks a text search (clips scored
with their study's vector, `query.TEXT_CONTEXT`): 0.80 here (0.75 by the clip vectors alone; this cohort's
one MitraClip patient, 6 videos, also has a pacer lead and is missed either way); over twenty fresh cohorts
of this shape 0.84 / 0.85 (seeds 70001-70010 / 80001-80010; clip vectors alone 0.77 / 0.80): `make
bench-model`. Unmet targets are kept as non-strict expected failures so that a better model turns them
green, next to guards on what it does reach.
"""

from __future__ import annotations

import math

import pytest
from conftest import demo_model_available

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="shipped demo model missing: run `make demo-model`")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from echosearch.config import load_settings
    from echosearch.evaluation.core import evaluate
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    root = tmp_path_factory.mktemp("demo-model")
    generate_cohort(root / "cohort", patients=14, seed=31337, visits=(2, 4), views=("A4C", "PLAX"), mislabel_rate=0.1,
                    workers=1)
    index_sources([root / "cohort"], root / "index", load_settings(mode="demo", workers=1), progress=False)
    return evaluate(root / "index", truth=root / "cohort" / "ground_truth.parquet")


def test_demo_model_identity_and_predictions_are_sane(evaluated: dict) -> None:
    from echosearch.model.models import resolve_model

    src = resolve_model("echosearch-demo")
    assert src.weights is not None and src.weights.stat().st_size < 40 * 2**20  # ships under 40 MB
    zs = evaluated["zero_shot"]
    assert zs["n_studies"] == evaluated["n"]["studies"]
    assert math.isfinite(zs["ef_mae"])
    assert zs["pacer_lead_auc"] >= 0.85 and zs["lv_dilated_auc"] >= 0.85, zs  # ~1.0 / 0.94 with the shipped model
    tv = evaluated["retrieval"]["text_to_video"]
    assert tv["mean"] >= 0.6 and tv["pacer lead"]["recall_at_10"] >= 0.8, tv  # guard: ~0.80 and 1.0 now
    # TAVR is drawn in PLAX only: 8 of its 16 relevant videos here can show it (0.8 now, all that is reachable)
    assert tv["TAVR"]["recall_at_10"] >= 0.6 and zs["tavr_auc"] >= 0.85, (tv, zs)  # ~1.0 AUC now
    assert evaluated["echosearch"]["identity"]["study_patient_auc"] >= 0.7  # ~0.88 now
    rr = evaluated["retrieval"]["study_to_report"]
    assert rr["n_queries"] == evaluated["n"]["studies"]


def test_in_view_recall_counts_only_videos_that_can_show_the_finding(evaluated: dict) -> None:
    import polars as pl

    truth = pl.read_parquet(evaluated["truth"])
    tv = evaluated["retrieval"]["text_to_video"]
    tavr = truth.filter(pl.col("tavr"))
    assert tv["TAVR"]["n_relevant"] == tavr.height
    assert tv["TAVR"]["n_relevant_in_view"] == tavr.filter(pl.col("view") == "PLAX").height < tavr.height
    for name in ("normal EF", "MitraClip", "transplant"):  # seen in every view: the two figures agree
        assert tv[name]["recall_at_10_in_view"] == tv[name]["recall_at_10"]
        assert tv[name]["n_relevant_in_view"] == tv[name]["n_relevant"]
    assert 0.0 <= tv["mean_in_view"] <= 1.0
    r = tv["TAVR"]
    hits, hits_in_view = r["recall_at_10"] * min(10, r["n_relevant"]), r["recall_at_10_in_view"] * min(10, r["n_relevant_in_view"])
    assert hits_in_view <= hits + 1e-6  # the in-view hits are a subset of the same top 10


def test_zero_shot_ef_within_target(evaluated: dict) -> None:
    assert evaluated["zero_shot"]["ef_mae"] <= 10.0, evaluated["zero_shot"]


def test_text_to_video_retrieval_of_findings(evaluated: dict) -> None:
    tv = evaluated["retrieval"]["text_to_video"]
    # 0.80 with the study context: exactly at the target, but no finding's 10th and 11th clips lie closer than
    # 0.0016 in score (float noise is ~1e-6), so the figure is a property of the model, not of the machine
    assert tv["mean"] >= 0.8, tv
    assert tv["mean"] > tv["mean_clip_only"] >= 0.7, tv  # the context helps here (0.75 without it)
    assert tv["mean_in_view"] >= tv["mean_in_view_clip_only"], tv  # not by trading away the clips that show it


@pytest.mark.xfail(reason="issue 24's target, cross-visit study-pair AUC >= 0.95 on identity vectors: the shipped "
                          "identity map on the demo model's frozen tower reaches ~0.90-0.92 on fresh cohorts "
                          "(docs/longitudinal.md)", strict=False)
def test_identity_target(evaluated: dict) -> None:
    ident = evaluated["echosearch"]["identity"]
    assert ident["vectors"] == "identity", "demo mode indexes with the shipped identity head"
    assert ident["study_pair_auc"] >= 0.95, ident["cross_visit"]
