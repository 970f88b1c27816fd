"""Change detection between visits: stable patients stay quiet, a transplant and clinical events are flagged
and explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from echosearch.catalog import Catalog
from echosearch.change import scan_changes, study_predictions
from echosearch.errors import QueryError

try:
    from test_identity import Cohort, Study, build_catalog
except ImportError:  # pragma: no cover - when tests are imported as a package
    from tests.test_identity import Cohort, Study, build_catalog


def _noisy_preds(studies: list[Study], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for s in studies:
        for task in ("pacer_lead", "tavr", "mitraclip", "lv_dilated"):
            s.preds[task] = -0.05 + float(rng.normal(0, 0.004))


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    gen = Cohort(seed=11)
    studies = gen.patients(30, visits=(3, 6))
    _noisy_preds(studies, 1)
    transplant = [s for s in studies if s.true == "P0"]
    new_heart = gen.centre()
    for s in transplant[2:]:
        s.vec = gen.visit(new_heart)
    transplant[2].preds["ef"] = 25.0 if transplant[1].preds["ef"] > 50 else 60.0
    pacer = [s for s in studies if s.true == "P1"]
    for s in pacer[2:]:
        s.preds["pacer_lead"] = 0.06
    decline = [s for s in studies if s.true == "P2"]
    decline[-1].preds["ef"] = 31.0
    index = build_catalog(tmp_path_factory.mktemp("change"), studies, videos_per_study=1)
    with Catalog.open(index) as cat:
        df = scan_changes(cat)
        stored = cat.con.execute("SELECT count(*), count(DISTINCT run_id) FROM changes").fetchone()
    assert stored == (df.height, 1)
    return index, df


def test_transplant_flagged_and_explained(scanned: tuple[Path, pl.DataFrame]) -> None:
    _, df = scanned
    p0 = df.filter(pl.col("patient_pseudonym") == "P0").sort("visit")
    event = p0.row(2, named=True)
    assert event["flagged"] and event["z_prev"] > 3
    assert "large change since previous study" in event["explanation"]
    assert "different patient" in event["explanation"]
    assert "EF" in event["explanation"]
    # after the transplant the new heart is stable again
    assert not p0.row(3, named=True)["flagged"]


def test_stable_patients_not_flagged(scanned: tuple[Path, pl.DataFrame]) -> None:
    _, df = scanned
    stable = df.filter(~pl.col("patient_pseudonym").is_in(["P0", "P1", "P2"]))
    assert stable.filter(pl.col("flagged")).height <= 1
    assert stable.filter(pl.col("patient_pseudonym") == "P5")["flagged"].sum() == 0
    baseline = df.filter(pl.col("visit") == 1)
    assert baseline["prev_study_key"].null_count() == baseline.height
    assert set(baseline["explanation"].to_list()) == {"baseline study"}


def test_new_device_and_ef_fall_explained(scanned: tuple[Path, pl.DataFrame]) -> None:
    _, df = scanned
    pacer = df.filter(pl.col("patient_pseudonym") == "P1").sort("visit").row(2, named=True)
    assert pacer["flagged"] and "new pacer/ICD lead" in pacer["explanation"]
    decline = df.filter(pl.col("patient_pseudonym") == "P2").sort("visit").tail(1).row(0, named=True)
    assert decline["flagged"] and "-> 31%" in decline["explanation"] and "EF fall" in decline["reasons"]


def test_single_patient_scan(scanned: tuple[Path, pl.DataFrame]) -> None:
    index, df = scanned
    with Catalog.open(index, read_only=True) as cat:
        one = scan_changes(cat, patient="P0")
        assert set(one["patient_pseudonym"].to_list()) == {"P0"}
        assert one["z_prev"].to_list() == df.filter(pl.col("patient_pseudonym") == "P0").sort("visit")["z_prev"].to_list()
        assert one["run_id"].null_count() == one.height
        with pytest.raises(QueryError):
            scan_changes(cat, patient="nobody")


def test_study_predictions_from_videos_follow_the_pipeline_rule(tmp_path: Path) -> None:
    """A catalog with only video rows: EF is the mean over views, a finding the strongest view."""
    from echosearch.zeroshot import study_predictions as pipeline_rule

    gen = Cohort(seed=3)
    studies = gen.patients(2, visits=(1, 1))
    index = build_catalog(tmp_path, studies, videos_per_study=3)
    video_preds = {0: {"ef": 30.0, "pacer_lead": -0.2}, 1: {"ef": 50.0, "pacer_lead": 0.3}, 2: {"ef": 40.0}}
    with Catalog.open(index) as cat:
        cat.con.execute("DELETE FROM predictions")  # a hand-made catalog: video rows only
        keys = cat.con.execute("SELECT video_key, study_key FROM videos ORDER BY video_key").fetchall()
        rows = [("video", vk, task, val, "test") for i, (vk, _) in enumerate(keys)
                for task, val in video_preds[i % 3].items()]
        cat.insert_frame("predictions", pl.DataFrame(rows, schema=["level", "key", "task", "value", "model"],
                                                     orient="row"))
        got = study_predictions(cat)
    expected = pipeline_rule(list(video_preds.values()))
    assert got.height == 2
    for row in got.iter_rows(named=True):
        assert row["ef"] == pytest.approx(expected["ef"]) and row["pacer_lead"] == pytest.approx(0.3)
        assert row["tavr"] is None
