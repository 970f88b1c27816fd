"""``evaluate()`` on a small catalog with a made-up truth table: expected keys, near-perfect scores where the
data is built so, and the truth table found next to the indexed source by default."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from rich.console import Console

from echosearch.catalog import Catalog
from echosearch.errors import QueryError
from echosearch.evaluation.core import _text_retrieval, evaluate, find_truth, format_table, join_truth

try:
    from test_identity import Cohort, Study, build_catalog, unit
except ImportError:  # pragma: no cover - when tests are imported as a package
    from tests.test_identity import Cohort, Study, build_catalog, unit


def _truth_rows(studies: list[Study], src: Path, views: int) -> pl.DataFrame:
    rows: list[dict[str, Any]] = []
    visit: dict[str, int] = {}
    for s in sorted(studies, key=lambda s: (s.true, s.day)):
        visit[s.true] = visit.get(s.true, -1) + 1
        state = {"ef": s.preds["ef"], **{t: s.preds[t] > 0 for t in ("pacer_lead", "tavr", "mitraclip", "lv_dilated")}}
        for v in range(views):
            view = ("A4C", "PLAX", "A2C")[v]
            rows.append({"path": f"{s.true}/{s.uid}/{view}.dcm", "sop_uid": f"{s.uid}.{v}", "true_patient_id": s.true,
                         "recorded_patient_id": s.recorded, "mislabelled": s.recorded != s.true,
                         "study_uid": s.uid, "study_date": s.day, "visit_index": visit[s.true], "view": view,
                         **state, "transplanted": "transplant" in s.events, "events": s.events,
                         "report": f"report of {s.uid}"})
    df = pl.DataFrame(rows)
    df.write_parquet(src / "ground_truth.parquet")
    return df


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("evaluate")
    gen = Cohort(seed=21)
    studies = gen.patients(20, visits=(3, 5))
    rng = np.random.default_rng(0)
    for s in studies:
        s.preds.update({t: -0.05 + float(rng.normal(0, 0.003)) for t in ("pacer_lead", "tavr", "mitraclip", "lv_dilated")})
    by = {p: [s for s in studies if s.true == p] for p in {s.true for s in studies}}
    new_heart = gen.centre()
    for s in by["P0"][2:]:
        s.vec = gen.visit(new_heart)
        s.preds["ef"] = 62.0
    by["P0"][2].events = ["transplant"]
    for p in ("P1", "P2"):
        by[p][2].events = ["pacer_implant"]
        for s in by[p][2:]:
            s.preds["pacer_lead"] = 0.07
    for p, to in (("P5", "P9"), ("P6", "P10"), ("P7", "P11")):
        by[p][1].recorded = to
    src = root / "source"
    src.mkdir()
    index = build_catalog(root, studies, videos_per_study=2, source=src)
    _truth_rows(studies, src, 2)
    with Catalog.open(index) as cat:
        keys = cat.con.execute("SELECT study_key FROM studies ORDER BY study_key").fetchall()
        ids, vecs = cat.embeddings("study", [k[0] for k in keys])
        cat.store_level_embeddings("report", ids.tolist(), unit(vecs + 0.1 * rng.normal(size=vecs.shape) / 6))
    return index, evaluate(index, text=False)


def test_expected_keys(evaluated: tuple[Path, dict[str, Any]]) -> None:
    _, res = evaluated
    assert set(res) >= {"truth", "n", "echoclip_protocol", "echosearch", "zero_shot", "retrieval",
                        "anchors_echoclip_paper"}
    assert res["n"]["patients"] == 20 and res["n"]["mislabelled_studies"] == 3
    assert res["truth"].endswith("ground_truth.parquet")
    assert set(res["echosearch"]) == {"identity", "audit", "change_auc"}
    assert "skipped" in res["retrieval"]["text_to_video"]
    Console(file=open("/dev/null", "w")).print(format_table(res))  # noqa: SIM115


def test_near_perfect_scores(evaluated: tuple[Path, dict[str, Any]]) -> None:
    _, res = evaluated
    es, ec = res["echosearch"], res["echoclip_protocol"]
    assert es["identity"]["study_patient_auc"] > 0.98
    assert es["identity"]["study_pair_auc"] > 0.95
    assert ec["video_pair_identity_auc"] > 0.9
    assert es["audit"]["recall"] == 1.0 and es["audit"]["precision"] >= 0.75
    assert es["change_auc"]["transplant"]["auc"] > 0.95
    assert ec["baseline_event_auc"]["transplant"]["auc"] > 0.95
    assert es["change_auc"]["transplant"]["flag_recall"] == 1.0
    zs = res["zero_shot"]
    assert zs["ef_mae"] == pytest.approx(0.0, abs=1e-6)
    assert zs["pacer_lead_auc"] == 1.0
    rr = res["retrieval"]["study_to_report"]
    assert rr["recall_at_1"] > 0.9 and rr["mean_rank"] < 1.5


def test_text_retrieval_skipped_without_encoder(evaluated: tuple[Path, dict[str, Any]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    index, _ = evaluated
    monkeypatch.setitem(sys.modules, "echosearch.model.encode", None)  # import fails as if the module were absent
    with Catalog.open(index, read_only=True) as cat:
        vt = join_truth(cat, pl.read_parquet(find_truth(cat)))
        out = _text_retrieval(cat, vt, 10)
    assert "skipped" in out and "echosearch.model.encode" in out["skipped"]


def test_truth_by_sop_and_missing_truth(evaluated: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    index, res = evaluated
    truth = pl.read_parquet(Path(res["truth"])).drop("path")
    truth.write_parquet(tmp_path / "by_sop.parquet")
    again = evaluate(index, tmp_path / "by_sop.parquet", text=False)
    assert again["n"]["videos"] == res["n"]["videos"]
    assert again["echosearch"]["identity"] == res["echosearch"]["identity"]
    csv = pl.read_parquet(Path(res["truth"])).with_columns(pl.col("events").list.join(";"))
    csv.write_csv(tmp_path / "truth.csv")
    from_csv = evaluate(index, tmp_path / "truth.csv", text=False)
    assert from_csv["echosearch"]["change_auc"]["transplant"] == res["echosearch"]["change_auc"]["transplant"]
    with pytest.raises(QueryError):
        evaluate(index, tmp_path / "missing.parquet", text=False)


def _demo_model_present() -> bool:
    try:
        from echosearch.model.models import DEMO_MODEL_DIR, WEIGHT_NAMES
    except ImportError:
        return False
    return any((DEMO_MODEL_DIR / n).is_file() for n in WEIGHT_NAMES)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ECHOSEARCH_SLOW_TESTS"), reason="set ECHOSEARCH_SLOW_TESTS=1 to run")
@pytest.mark.skipif(not _demo_model_present(), reason="the shipped demo model is not built yet")
def test_end_to_end_synthetic_cohort(tmp_path: Path) -> None:
    """Synthetic cohort -> index with the demo model -> audit, changes and evaluation (minutes on 2 cores)."""
    from echosearch.config import load_settings
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    generate_cohort(tmp_path / "cohort", patients=24, seed=7, visits=(2, 4), mislabel_rate=0.08)
    index_sources([tmp_path / "cohort"], tmp_path / "index", load_settings(mode="demo", workers=0), progress=False)
    res = evaluate(tmp_path / "index")
    assert res["n"]["patients"] == 24
    assert res["echosearch"]["identity"]["study_patient_auc"] > 0.8
    assert res["zero_shot"]["ef_mae"] is not None


def test_cli_commands(evaluated: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.cli import main

    index, _ = evaluated
    assert main(["audit", "--index", str(index), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suspects"] >= 3 and out["studies"][0]["evidence"]["reasons"]
    assert main(["changes", "--index", str(index), "--patient", "P0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flagged"] >= 1
    assert main(["match", "--index", str(index), "--study", "P5.S1", "-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["candidates"][0]["patient_pseudonym"] == "P5"
    assert main(["eval", "--index", str(index), "--no-text", "--json"]) == 0
    assert "echosearch" in json.loads(capsys.readouterr().out)
    assert main(["match", "--index", str(index), "--study", "nope"]) == 8
    assert main(["changes", "--index", str(index)]) == 0
    assert "flagged" in capsys.readouterr().out
