"""Identity evaluation (``echosearch/evaluation/identity.py``): cross-visit pairs only, identity vs content vectors vs
EchoCLIP's single clip pair on the same pairs with patient-bootstrap intervals, the audit on both levels, and
its projection to a prevalence (shared with ``bench/identity_sensitivity.py``).

Archives are built as in tests/test_identity.py; the identity vectors here carry more of the patient than the
content vectors, as a trained identity head should."""

from __future__ import annotations

import json
import sys
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog
from echosearch.evaluation.core import evaluate, join_truth, study_truth
from echosearch.evaluation.identity import (
    audit_metrics,
    bootstrap_aucs,
    cross_visit_pairs,
    identity_metrics,
    project_audit,
    reidentification,
    weighted_auc,
)
from echosearch.identity import StudySet
from echosearch.identity import calibration as cal
from echosearch.store.schema import identity_table_sql

try:
    from test_evaluate import _truth_rows
    from test_identity import DIM, Cohort, build_catalog, mislabel
except ImportError:  # pragma: no cover - when tests are imported as a package
    from tests.test_evaluate import _truth_rows
    from tests.test_identity import DIM, Cohort, build_catalog, mislabel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """40 patients, 2-5 visits, 8 % of studies under another patient's ID; content vectors weakly identifying
    (noisy visits), identity vectors of the same studies strongly identifying."""
    root = tmp_path_factory.mktemp("identity-eval")
    gen = Cohort(seed=7, noise=1.6)
    studies = mislabel(gen.patients(40, visits=(2, 5)), 0.08, seed=3)
    src = root / "source"
    src.mkdir()
    index = build_catalog(root, studies, videos_per_study=2, source=src)
    truth = _truth_rows(studies, src, 2)
    ident = Cohort(seed=8, noise=0.5)
    centre = {p: ident.centre() for p in sorted({s.true for s in studies})}
    with Catalog.open(index) as cat:  # as an index built with an identity model
        cat.con.execute(identity_table_sql(DIM))
        cat.con.execute("INSERT OR REPLACE INTO manifest VALUES ('identity_model', ?)",
                        [json.dumps({"name": "test-identity", "weights_sha256": "y", "embed_dim": DIM, "kind": "head",
                                     "source": "test"})])
        keys = [cat.study_key(s.uid) for s in studies]
        vecs = np.stack([ident.visit(centre[s.true]) for s in studies])
        cat.store_identity_embeddings("study_identity", [int(k) for k in keys if k is not None], vecs, [2] * len(keys))
        assert cat.has_identity()
    return index, truth


def _st(index: Path, truth: pl.DataFrame) -> pl.DataFrame:
    with Catalog.open(index, read_only=True) as cat:
        return study_truth(join_truth(cat, truth))


def test_pairs_are_cross_visit_only(archive: tuple[Path, pl.DataFrame]) -> None:
    index, truth = archive
    st_ = _st(index, truth)
    with Catalog.open(index, read_only=True) as cat:
        res = identity_metrics(cat, st_, n_boot=50)
    cv = res["cross_visit"]
    # every pair of two different studies of one true patient, none from within a study (2 clips each)
    n_studies = st_.group_by("true_patient_id").len()["len"].to_list()
    assert cv["n_same_patient_pairs"] == sum(comb(n, 2) for n in n_studies)
    patient = np.array([0, 0, 0, 1, 1, 2])
    i, j, y = cross_visit_pairs(patient, 100, 0)
    assert np.all(i != j) and int(y.sum()) == 4 and np.array_equal(patient[i] == patient[j], y)


def test_identity_vectors_score_other_visits_above_other_patients(archive: tuple[Path, pl.DataFrame]) -> None:
    index, truth = archive
    with Catalog.open(index, read_only=True) as cat:
        res = identity_metrics(cat, _st(index, truth), n_boot=100)
    cv = res["cross_visit"]
    ident, content, single = cv["identity_vectors"], cv["content_vectors"], cv["echoclip_single_pair"]
    assert res["vectors"] == "identity" and res["study_pair_auc"] == ident["auc"]
    assert ident["auc"] > 0.97 and content["auc"] < 0.9, (ident, content)  # as the archive is built
    for d in (ident, content, single):
        lo, hi = d["ci95"]
        assert lo <= d["auc"] <= hi and hi - lo < 0.3
    lo, hi = content["minus_identity_vectors"]["ci95"]
    assert hi < 0, "content vectors are worse than identity vectors on the same pairs"
    assert single["auc"] <= content["auc"] + 0.05  # one clip of each study carries no more than the study
    reid = res["reidentification"]
    assert reid["identity_vectors"]["n_queries"] == reid["content_vectors"]["n_queries"] > 50
    assert reid["identity_vectors"]["top1"] >= 0.95 > reid["content_vectors"]["top1"], reid


def test_injected_mislabels_found_on_identity_missed_more_on_content(archive: tuple[Path, pl.DataFrame]) -> None:
    index, truth = archive
    with Catalog.open(index, read_only=True) as cat:
        au = audit_metrics(cat, _st(index, truth), prevalence=1e-3)
    ident, content = au["by_vectors"]["identity"], au["by_vectors"]["content"]
    assert au["vectors"] == "identity" and au["recall"] == ident["recall"]
    assert ident["n_mislabelled"] >= 5
    assert ident["recall"] >= 0.8 and ident["recall"] > content["recall"], (ident, content)
    assert ident["average_precision"] > content["average_precision"]
    p = ident["projection"]
    assert p["prevalence"] == 1e-3 and p["n_mislabelled"] == ident["n_mislabelled"] - ident["mislabelled_unverifiable"]
    assert p["precision"] < ident["precision"], "rarer mislabels: more false alarms per true one"


def test_eval_prints_both_levels_and_projects_to_the_given_prevalence(archive: tuple[Path, pl.DataFrame],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.cli import main

    index, _ = archive
    assert main(["eval", "--index", str(index), "--no-text", "--json", "--prevalence", "0.01"]) == 0
    res = json.loads(capsys.readouterr().out)
    au = res["echosearch"]["audit"]["by_vectors"]
    assert au["identity"]["projection"]["prevalence"] == au["content"]["projection"]["prevalence"] == 0.01
    assert set(res["echosearch"]["identity"]["cross_visit"]) >= {"identity_vectors", "content_vectors",
                                                                 "echoclip_single_pair"}
    assert main(["eval", "--index", str(index), "--no-text"]) == 0
    out = capsys.readouterr().out
    words = set(out.split())  # the table wraps its cells to the terminal
    assert {"identity", "content", "projected", "1,000"} <= words, out


def test_evaluate_on_an_index_without_identity_vectors(tmp_path: Path) -> None:
    gen = Cohort(seed=9)
    studies = mislabel(gen.patients(12, visits=(2, 4)), 0.1, seed=2)
    src = tmp_path / "source"
    src.mkdir()
    index = build_catalog(tmp_path, studies, source=src)
    _truth_rows(studies, src, 2)
    res = evaluate(index, text=False)
    ident = res["echosearch"]["identity"]
    assert ident["vectors"] == "content" and "identity_vectors" not in ident["cross_visit"]
    assert ident["study_pair_auc"] == ident["cross_visit"]["content_vectors"]["auc"]
    assert set(res["echosearch"]["audit"]["by_vectors"]) == {"content"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=2, max_size=30),
       st.lists(st.integers(1, 3), min_size=30, max_size=30), st.integers(0, 2**16))
def test_weighted_auc_is_the_auc_of_repeated_items(scores: list[float], reps: list[int], seed: int) -> None:
    s = np.array(scores)
    y = np.random.default_rng(seed).random(s.size) < 0.5
    if y.all() or not y.any():
        y[0] = not y[0]
    w = np.array(reps[:s.size], dtype=float)
    assert weighted_auc(s, y, np.ones(s.size)) == pytest.approx(cal.auc(s[y], s[~y]))
    rep = np.repeat(np.arange(s.size), w.astype(int))
    assert weighted_auc(s, y, w) == pytest.approx(cal.auc(s[rep][y[rep]], s[rep][~y[rep]]))


def test_bootstrap_interval_narrows_with_more_patients() -> None:
    def widths(n: int) -> float:
        rng = np.random.default_rng(0)
        patient = np.repeat(np.arange(n), 3)
        x = rng.normal(size=n)[patient] + rng.normal(size=patient.size)
        i, j, y = cross_visit_pairs(patient, 5000, 0)
        out: dict[str, Any] = bootstrap_aucs({"a": -np.abs(x[i] - x[j])}, y, patient[i], patient[j], n, 200, 0)
        lo, hi = out["a"]["ci95"]
        return float(hi - lo)

    assert widths(200) < widths(20)


def test_projection_follows_bayes_at_the_prevalence() -> None:
    rng = np.random.default_rng(0)
    neg = rng.normal(size=20000)
    pos = np.full(50, 8.0)
    thr = float(cal.z_for_fpr(0.01))
    for prev in (0.1, 0.01, 0.001):
        p = project_audit(pos, neg, prev, thr)
        fpr = p["false_positive_rate"]
        assert p["recall"] == 1.0 and fpr == pytest.approx(0.01, rel=0.15)
        assert p["precision"] == pytest.approx(prev / (prev + (1 - prev) * fpr), rel=1e-3)
        assert p["recall_at_precision_0.9"] == 1.0  # every mislabel lies far beyond every correct study
    assert project_audit(pos[:0], neg, 0.01, thr)["skipped"]


def test_sensitivity_bench_runs_the_real_audit() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import identity_sensitivity as bench
    finally:
        sys.path.pop(0)
    weak = bench.run_cell(0.80, bench.noise_for_auc(0.80, 16), 0.1, 150, 1, 16, 0.01, 0)
    strong = bench.run_cell(0.99, bench.noise_for_auc(0.99, 16), 0.1, 150, 1, 16, 0.01, 0)
    assert abs(weak["measured_auc"] - 0.80) < 0.04 and abs(strong["measured_auc"] - 0.99) < 0.02
    assert strong["recall"] > weak["recall"] and strong["recall_at_precision_0.9"] >= 0.7


def test_pairs_across_a_transplant_are_reported_apart(tmp_path: Path) -> None:
    """A donor heart carries none of the recipient's identity: pairs across a transplant sit near chance and
    are reported on their own, and the same-heart AUC (same negatives) is the all-pairs AUC without them."""
    gen = Cohort(seed=11, noise=1.6)
    studies = gen.patients(30, visits=(3, 5))
    src = tmp_path / "source"
    src.mkdir()
    index = build_catalog(tmp_path, studies, videos_per_study=2, source=src)
    ident = Cohort(seed=12, noise=0.5)
    transplanted = {f"P{p}" for p in range(0, 30, 3)}  # from their second visit on, another heart
    hearts = {(p, h): ident.centre() for p in {s.true for s in studies} for h in "ab"}
    order = {s.uid: k for k, s in enumerate(sorted(studies, key=lambda s: (s.true, s.day)))}
    first = {}
    for s in sorted(studies, key=lambda s: (s.true, s.day)):
        first.setdefault(s.true, order[s.uid])
    heart = {s.uid: "b" if s.true in transplanted and order[s.uid] > first[s.true] else "a" for s in studies}
    truth = _truth_rows(studies, src, 2).with_columns(
        pl.concat_str(pl.col("true_patient_id"), pl.col("study_uid").replace_strict(heart)).alias("heart_id"))
    with Catalog.open(index) as cat:
        cat.con.execute(identity_table_sql(DIM))
        cat.con.execute("INSERT OR REPLACE INTO manifest VALUES ('identity_model', ?)",
                        [json.dumps({"name": "t", "weights_sha256": "y", "embed_dim": DIM, "kind": "head",
                                     "source": "test"})])
        keys = [int(cat.study_key(s.uid)) for s in studies]
        vecs = np.stack([ident.visit(hearts[(s.true, heart[s.uid])]) for s in studies])
        cat.store_identity_embeddings("study_identity", keys, vecs, [2] * len(keys))
    st_ = _st(index, truth)
    with Catalog.open(index, read_only=True) as cat:
        cv = identity_metrics(cat, st_, n_boot=50)["cross_visit"]
    n_after = st_.filter(pl.col("heart_id").str.ends_with("b")).group_by("true_patient_id").len()["len"]
    assert cv["n_pairs_across_transplant"] == int(n_after.sum())  # each post-transplant study x the one before
    same, across = (cv[k]["identity_vectors"]["auc"] for k in ("same_heart", "across_transplant"))
    every = cv["identity_vectors"]["auc"]
    assert across < 0.7 and same > 0.97 and same > every, (same, across, every)
    assert cv["same_heart"]["content_vectors"]["auc"] < 0.9  # every scoring is split, on the same pairs
    with Catalog.open(index, read_only=True) as cat:
        reid = identity_metrics(cat, st_, n_boot=10)["reidentification"]["identity_vectors"]
    assert reid["n_same_heart_queries"] < reid["n_queries"]  # a first post-transplant study has no heart to match
    assert reid["same_heart_top1"] > reid["top1"], reid
    with Catalog.open(index, read_only=True) as cat:  # no heart column: no split
        assert "same_heart" not in identity_metrics(cat, _st(index, truth.drop("heart_id")), n_boot=10)["cross_visit"]


def test_feature_bench_scores_hearts_and_view_slots() -> None:
    """bench/identity_features.py: study vectors pooled by UID (mean or view slots) and its three figures."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import identity_features as bench
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    rows, vecs = [], []
    for p in range(12):
        hearts = {h: rng.normal(size=16) for h in "ab"}
        for v in range(4):
            heart = "b" if p < 3 and v >= 2 else "a"  # three patients get a donor heart at their third visit
            for view in ("A4C", "PLAX"):
                rows.append({"study_uid": f"{p:02d}.{v}", "true_patient_id": f"P{p}", "heart_id": f"P{p}{heart}",
                             "view": view})
                vecs.append(hearts[heart] + 0.3 * rng.normal(size=16) + (5.0 if view == "PLAX" else 0.0))
    meta, z = pl.DataFrame(rows), np.stack(vecs)
    S, st_ = bench.study_vectors(z, meta, None)
    assert S.shape == (48, 16) and st_["study_uid"].to_list() == sorted(set(meta["study_uid"]))
    every, same, top1 = bench.scores(S, st_)
    assert same > every and same > 0.95 and top1 > 0.5
    centre = {v: z[(meta["view"] == v).to_numpy()].mean(0) for v in ("A4C", "PLAX")}
    slots, _ = bench.study_vectors(z, meta, centre)
    assert slots.shape == (48, 32) and np.allclose(np.linalg.norm(slots, axis=1), 1)
    assert bench.scores(slots, st_)[1] >= same - 0.02  # view offsets removed: no worse on the same pairs


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.integers(4, 30))
def test_reidentification_top1_matches_a_plain_loop(seed: int, n_pat: int, n: int) -> None:
    """Each query against every patient by the top-2 mean of its cosines (itself left out; one cosine for a
    one-study patient), counted as a plain double loop would."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, n_pat, n)
    vecs = rng.normal(size=(n, 5))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    S = StudySet(np.arange(n), vecs.astype(np.float32), patient, pl.DataFrame({"k": np.arange(n)}))
    got = reidentification(S)
    hits, asked = 0, 0
    for q in range(n):
        if (patient == patient[q]).sum() < 3:
            continue
        asked += 1
        best, who = -np.inf, -1
        for p in sorted(set(patient.tolist())):
            c = sorted((float(S.vecs[q] @ S.vecs[o]) for o in range(n) if o != q and patient[o] == p), reverse=True)
            score = float(np.mean(c[:2])) if c else -np.inf
            if score > best:
                best, who = score, p
        hits += who == patient[q]
    assert got["n_queries"] == asked
    assert got["top1"] == (pytest.approx(hits / asked, abs=1e-4) if asked else None)
