"""Change between visits: stable patients stay quiet; a pacer implant is flagged once and tracked; a transplant
is a new heart of the same patient while a single foreign study is not; eval scores every baseline on the
scan's own pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from echosearch.catalog import Catalog
from echosearch.change import MIN_PROBABILITY, scan_changes, study_predictions
from echosearch.change.model import ChangeModel, fit_logistic
from echosearch.errors import QueryError
from echosearch.evaluation.change import change_metrics

try:
    from test_identity import Cohort, Study, build_catalog
except ImportError:  # pragma: no cover - when tests are imported as a package
    from tests.test_identity import Cohort, Study, build_catalog


def _noisy_preds(studies: list[Study], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for s in studies:
        for task in ("pacer_lead", "tavr", "mitraclip", "lv_dilated"):
            s.preds[task] = -0.05 + float(rng.normal(0, 0.004))


def _cohort() -> list[Study]:
    """30 patients; P0 gets a new heart at visit 3, P1 a pacer at visit 3 (missed once at visit 5), P2 an EF
    fall with dilation at its last visit, and P3's second study is really another patient's."""
    gen = Cohort(seed=11)
    studies = gen.patients(30, visits=(5, 6))
    _noisy_preds(studies, 1)
    by = {p: [s for s in studies if s.true == p] for p in ("P0", "P1", "P2", "P3", "P4")}
    new_heart = gen.centre() - gen.shared * gen.g  # a donor heart: as unlike this patient's as another patient's
    for s in by["P0"][2:]:
        s.vec = gen.visit(new_heart)
        s.events = []
    by["P0"][2].events = ["transplant"]
    by["P0"][2].preds["ef"] = 25.0 if by["P0"][1].preds["ef"] > 50 else 60.0
    for s in by["P0"][3:]:
        s.preds["ef"] = by["P0"][2].preds["ef"] + float(np.random.default_rng(len(s.uid)).normal(0, 1))
    for k, s in enumerate(by["P1"][2:], start=2):
        s.preds["pacer_lead"] = 0.06 if k != 4 else -0.04  # visit 5: the lead is missed once
    by["P1"][2].events = ["pacer_implant"]
    by["P2"][-1].preds["ef"] = 31.0  # the failing heart also dilates: the clip vectors move and dilation is seen
    by["P2"][-1].preds["lv_dilated"] = 0.05
    by["P2"][-1].vec = gen.visit(0.6 * by["P2"][-2].vec + 0.4 * gen.centre())
    by["P2"][-1].events = ["ef_decline"]
    by["P3"][1].vec = gen.visit(gen.centre() - gen.shared * gen.g)  # filed under P3, really someone else's
    by["P3"][1].true = "P30"
    return studies


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame, list[Study]]:
    studies = _cohort()
    index = build_catalog(tmp_path_factory.mktemp("change"), studies, videos_per_study=2)
    with Catalog.open(index) as cat:
        df = scan_changes(cat)
        stored = cat.con.execute("SELECT count(*), count(DISTINCT run_id), max(run_id) FROM changes").fetchone()
    assert stored is not None and stored[:2] == (df.height, 1)
    flags = pl.read_parquet(index / "changes" / f"run-{stored[2]}.parquet")  # the flags with their evidence
    assert flags.height == df.height and set(flags["flags"].to_list()) == set(df["flags"].to_list())
    return index, df, studies


def _visits(df: pl.DataFrame, patient: str) -> list[dict]:
    return df.filter(pl.col("patient_pseudonym") == patient).sort("visit").to_dicts()


def test_stable_patients_are_not_flagged(scanned: tuple[Path, pl.DataFrame, list[Study]]) -> None:
    _, df, _ = scanned
    stable = df.filter(~pl.col("patient_pseudonym").is_in(["P0", "P1", "P2", "P3"]) & pl.col("prev_study_key").is_not_null())
    assert stable.height > 100
    assert stable["flagged"].mean() <= 0.05  # type: ignore[operator]
    assert _visits(df, "P5") and not any(v["flagged"] for v in _visits(df, "P5"))
    baseline = df.filter(pl.col("visit") == 1)
    assert baseline["prev_study_key"].null_count() == baseline.height
    assert set(baseline["explanation"].to_list()) == {"baseline study"}
    assert (baseline["change_prob"].null_count() == baseline.height)


def test_pacer_implant_flagged_once_and_tracked(scanned: tuple[Path, pl.DataFrame, list[Study]]) -> None:
    _, df, _ = scanned
    p1 = _visits(df, "P1")
    types = [v["flag_types"] for v in p1]
    assert "new_pacer_lead" in types[2], p1[2]["explanation"]
    assert sum(t.count("new_pacer_lead") for t in types) == 1, "a new lead is said once"
    assert not any("removed_pacer_lead" in t for t in types), "missed once between two visits that show it: not removed"
    flag = next(f for f in json.loads(p1[2]["flags"]) if f["type"] == "new_pacer_lead")
    assert "new pacer/ICD lead" in flag["text"] and MIN_PROBABILITY <= flag["probability"] <= 1
    assert flag["evidence"]["before"] and flag["evidence"]["after"], "the clips behind the clause"
    assert flag["evidence"]["values"]["score_after"] == pytest.approx(0.06, abs=1e-4)
    assert p1[2]["change_prob"] >= flag["probability"] - 1e-9
    decline = _visits(df, "P2")[-1]
    assert decline["flagged"] and "EF fall" in decline["reasons"] and "-> 31%" in decline["explanation"]


def test_transplant_is_a_new_heart_and_a_foreign_study_is_not(scanned: tuple[Path, pl.DataFrame, list[Study]]) -> None:
    _, df, _ = scanned
    p0 = _visits(df, "P0")
    assert "new_heart" in p0[2]["flag_types"] and "other_patient" not in p0[2]["flag_types"]
    assert "a new heart of this patient" in p0[2]["explanation"]
    assert not any("new_heart" in v["flag_types"] for v in p0[3:]), "the new heart is stable afterwards"
    p3 = _visits(df, "P3")
    assert p3[1]["flag_types"] == ["other_patient"], p3[1]["explanation"]
    # the next visit is compared with the last study of this patient's own heart, not the foreign one
    assert p3[2]["prev_study_key"] == p3[0]["study_key"] and not p3[2]["flagged"]


def test_single_patient_scan(scanned: tuple[Path, pl.DataFrame, list[Study]]) -> None:
    index, df, _ = scanned
    with Catalog.open(index, read_only=True) as cat:
        one = scan_changes(cat, patient="P0")
        assert set(one["patient_pseudonym"].to_list()) == {"P0"}
        whole = df.filter(pl.col("patient_pseudonym") == "P0").sort("visit")
        assert one["change_prob"].fill_null(-1).to_list() == pytest.approx(whole["change_prob"].fill_null(-1).to_list(),
                                                                           abs=1e-4)
        assert one["flags"].to_list() == whole["flags"].to_list()
        assert one["run_id"].null_count() == one.height
        with pytest.raises(QueryError):
            scan_changes(cat, patient="nobody")


def _truth(cat: Catalog, studies: list[Study]) -> pl.DataFrame:
    rows = []
    for s in studies:
        own = [x for x in studies if x.true == s.true]
        heart = 1 if s.true == "P0" and own.index(s) >= 2 else 0
        rows.append({"study_key": cat.study_key(s.uid), "true_patient_id": s.true, "mislabelled": s.true != s.recorded,
                     "visit_index": own.index(s), "events": s.events, "ef": s.preds["ef"],
                     "pacer_lead": s.preds["pacer_lead"] > 0, "tavr": False, "mitraclip": False,
                     "heart_id": f"{s.true}-H{heart}"})
    return pl.DataFrame(rows)


def test_eval_scores_every_baseline_on_the_scans_pairs(scanned: tuple[Path, pl.DataFrame, list[Study]]) -> None:
    """Since-previous and since-first disagree on P0: its transplant is a positive of one pair there and of every
    later pair since the first visit; each baseline's AUC is recomputed here on the task's own pairs."""
    from echosearch.identity import calibration as cal
    from echosearch.identity import load_studies

    index, df, studies = scanned
    for s in studies:  # P3's foreign study: filed under P3, a visit of nobody's own timeline
        if s.true != s.recorded:
            s.events = []
    with Catalog.open(index, read_only=True) as cat:
        vt = _truth(cat, studies)
        res = change_metrics(cat, vt, n_boot=50, seed=0, scan=df)
        S = load_studies(cat, "content")
    sp, sf = res["since_previous"], res["since_first"]
    assert sp["transplant"]["n_pos"] == 1 and sf["transplant"]["n_pos"] == len(_visits(df, "P0")) - 2
    assert sp["pacer_implant"]["n_pos"] == 1 and sf["pacer_implant"]["n_pos"] > 1
    for task, other in (("since_previous", "prev_study_key"), ("since_first", "baseline_study_key")):
        d = df.filter(pl.col(other).is_not_null() & (pl.col(other) != pl.col("study_key")))
        d = d.filter(~pl.col("study_key").is_in(vt.filter("mislabelled")["study_key"].to_list()))
        d = d.filter(~pl.col(other).is_in(vt.filter("mislabelled")["study_key"].to_list()))
        plain = np.asarray([1 - float(S.vecs[S.row(a)] @ S.vecs[S.row(b)]) for a, b in d.select("study_key", other).iter_rows()])
        ours = d["change_prob" if task == "since_previous" else "change_prob_baseline"].to_numpy()
        own = {k: set(v) for k, v in zip(vt["study_key"], vt["events"], strict=True)}
        visits = {(p, i): set(e) for p, i, e in vt.select("true_patient_id", "visit_index", "events").iter_rows()}
        tp = dict(zip(vt["study_key"], zip(vt["true_patient_id"], vt["visit_index"], strict=True), strict=True))
        ev = []
        for a, b in d.select("study_key", other).iter_rows():
            (p, hi), (_, lo) = tp[a], tp[b]
            ev.append(set().union(*[visits.get((p, k), set()) for k in range(lo + 1, hi + 1)]))
        none = np.asarray([not e for e in ev])
        assert res[task]["n_negatives"] == int(none.sum()) and res[task]["n_pairs"] == d.height
        assert sorted(map(tuple, res[task]["pairs"])) == sorted(d.select("study_key", other).iter_rows())
        assert own
        for e in ("transplant", "pacer_implant"):
            pos = np.asarray([e in x for x in ev])
            assert res[task][e]["plain"]["auc"] == pytest.approx(cal.auc(plain[pos], plain[none]), abs=1e-4)
            assert res[task][e]["echosearch"]["auc"] == pytest.approx(cal.auc(ours[pos], ours[none]), abs=1e-4)
            lo_hi = res[task][e]["echosearch"]["ci95"]
            assert lo_hi[0] <= lo_hi[1]
    cl = res["clauses"]
    assert cl["new_pacer_lead"]["precision"] == 1.0 and cl["events_named"]["transplant"]["named"] == 1.0
    assert cl["other_patient"]["precision"] == 1.0


def test_logistic_fit_and_prior_shift() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 1 / (1 + np.exp(-(2 * X[:, 0] - 3)))
    w = fit_logistic(X, y.astype(float), l2=0.01)
    assert w[0] == pytest.approx(2, abs=0.25) and w[1] == pytest.approx(0, abs=0.2) and w[2] == pytest.approx(-3, abs=0.3)
    from echosearch.change.features import FEATURES
    from echosearch.change.model import FLAG_TYPES

    Xf = np.zeros((4000, len(FEATURES)))
    Xf[:, 0] = X[:, 0]
    model = ChangeModel({t: np.r_[2.0, np.zeros(len(FEATURES) - 1), -3.0] for t in FLAG_TYPES},
                        dict.fromkeys(FLAG_TYPES, float(y.mean())))
    fixed, _ = model.probabilities(Xf, adapt=False)
    assert abs(fixed["ef_fall"].mean() - y.mean()) < 0.02  # calibrated where the rate is the training rate
    rare = Xf[np.r_[np.nonzero(~y)[0], np.nonzero(y)[0][:20]]]  # the same kind of archive, far fewer events
    adapted, rate = model.probabilities(rare)
    assert rate["ef_fall"] < y.mean() / 2 and abs(adapted["ef_fall"].mean() - 20 / len(rare)) < 0.02


def test_study_predictions_from_videos_follow_the_pipeline_rule(tmp_path: Path) -> None:
    """A catalog with only video rows: EF is the mean over views, a finding the strongest view."""
    from echosearch.model.zeroshot import study_predictions as pipeline_rule

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


def test_audit_takes_a_confirmed_new_heart_for_the_same_patient(
        scanned: tuple[Path, pl.DataFrame, list[Study]]) -> None:
    """P0's two hearts are audited apart (heart 0, then 1 from its transplant), so neither is the other's
    mislabel; P3's foreign study is still the audit's first suspect."""
    from echosearch.identity import audit

    index, _, _ = scanned
    with Catalog.open(index, read_only=True) as cat:
        split = audit(cat, store=False).sort("study_date")
        plain = audit(cat, store=False, hearts=False)
    p0 = split.filter(pl.col("recorded_patient") == "P0")
    assert p0["heart"].to_list() == [0, 0] + [1] * (p0.height - 2)
    assert not p0["suspect"].any() and (p0["status"] == "ok").all()
    assert plain["heart"].max() == 0
    top = split.sort("rank").row(0, named=True)
    assert top["recorded_patient"] == "P3" and top["suspect"] and top["study_uid"].endswith("S1")
    # on the whole patient, P0's studies of one heart drag each other's own score down
    own = {h: dict(zip(f["study_key"], f["own_score"], strict=True)) for h, f in (("split", split), ("plain", plain))}
    assert all(own["split"][k] > own["plain"][k] for k in p0["study_key"].to_list()[:2])


@pytest.mark.parametrize("kept", [True, False])
def test_a_kept_step_into_the_post_transplant_state_is_a_new_heart(
        scanned: tuple[Path, pl.DataFrame, list[Study]], monkeypatch: pytest.MonkeyPatch, kept: bool) -> None:
    """P3's second study is unlike the visits around it. Where the reports' post-transplant state steps up there and
    the next visit keeps it, it is a transplant (the identity vectors may carry a donor heart poorly), not another
    patient's study; a state that falls back on the next visit leaves it another patient's study."""
    import echosearch.change.scan as scan

    real = scan.load_timeline

    def with_state(catalog: Catalog, preds: pl.DataFrame) -> scan.Timeline:
        T = real(catalog, preds)
        rows = np.nonzero(T.meta["patient_pseudonym"].to_numpy() == "P3")[0]  # timeline order: by date
        state = np.full(len(T), 0.02)
        state[rows[1]] = 0.97
        state[rows[2:]] = 0.95 if kept else 0.03
        T.pred["transplant_present"] = state
        return T

    monkeypatch.setattr(scan, "load_timeline", with_state)
    index, _, _ = scanned
    with Catalog.open(index, read_only=True) as cat:
        p3 = scan_changes(cat, store=False, patient="P3").sort("visit").to_dicts()
    assert ("other_patient" in p3[1]["flag_types"]) is not kept, p3[1]["explanation"]
    if kept:  # the new heart is the previous visit of the next one
        assert p3[2]["prev_study_key"] == p3[1]["study_key"]


def test_a_new_heart_at_the_last_visit_stays_the_audits_question(tmp_path: Path) -> None:
    """Nothing confirms a new heart at a patient's last visit (no later visit, no report): the audit keeps the
    study with its patient and says that a transplant is possible."""
    from echosearch.identity import audit

    gen = Cohort(seed=21)
    studies = gen.patients(30, visits=(4, 5))
    _noisy_preds(studies, 2)
    last = [s for s in studies if s.true == "P0"][-1]
    last.vec = gen.visit(gen.centre() - gen.shared * gen.g)  # a donor heart, or someone else's study
    index = build_catalog(tmp_path, studies, videos_per_study=2)
    with Catalog.open(index, read_only=True) as cat:
        df = audit(cat, store=False)
    ev = {r["study_uid"]: (r["heart"], r["suspect"], json.loads(r["evidence"])) for r in df.iter_rows(named=True)}
    heart, suspect, evidence = ev[last.uid]
    assert heart == 0 and evidence["new_heart_unconfirmed"]
    assert suspect and any("a transplant is possible" in r for r in evidence["reasons"]), evidence
    assert sum(e["new_heart_unconfirmed"] for _, _, e in ev.values()) == 1
