"""The shipped demo model on a fresh synthetic cohort (seed unseen in training): retrieval and zero-shot EF.

Targets from the encode issue: text->video recall@10 >= 0.8 for finding phrases and EF MAE <= 10 points.
"""

from __future__ import annotations


import pytest

from conftest import demo_model_available

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="shipped demo model missing: run `make demo-model`")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from echosearch.config import load_settings
    from echosearch.evaluate import evaluate
    from echosearch.pipeline import index_sources
    from echosearch.synth import generate_cohort

    root = tmp_path_factory.mktemp("demo-model")
    generate_cohort(root / "cohort", patients=14, seed=31337, visits=(2, 4), views=("A4C", "PLAX"), mislabel_rate=0.1,
                    workers=1)
    index_sources([root / "cohort"], root / "index", load_settings(mode="demo", workers=1), progress=False)
    return evaluate(root / "index", truth=root / "cohort" / "ground_truth.parquet")


def test_zero_shot_ef_within_target(evaluated: dict) -> None:
    assert evaluated["zero_shot"]["ef_mae"] <= 10.0, evaluated["zero_shot"]


def test_text_to_video_retrieval_of_findings(evaluated: dict) -> None:
    ret = evaluated["retrieval"]["text_to_video"]
    scores = {k: v["recall_at_10"] for k, v in ret.items() if isinstance(v, dict) and "recall_at_10" in v}
    assert scores, ret
    mean = sum(scores.values()) / len(scores)
    assert mean >= 0.8, scores


def test_true_report_ranks_near_the_top(evaluated: dict) -> None:
    rr = evaluated["retrieval"]["study_to_report"]
    assert rr["mean_rank"] <= rr["n_reports"] / 4, rr


def test_identity_beats_single_pair_protocol(evaluated: dict) -> None:
    single = evaluated["echoclip_protocol"]["video_pair_identity_auc"]
    pooled = evaluated["echosearch"]["identity"]["study_patient_auc"]
    assert pooled >= single - 0.02, (pooled, single)
