"""Report-trained probes for the change scan: a study's estimate never depends on its own patient's reports,
the probe recovers a signal the vectors carry, and an archive without labels falls back to the model fitted
without probes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.change.features import FEATURES, PROBE_FEATURES
from echosearch.change.model import ChangeModel
from echosearch.change.probes import MIN_PATIENTS, cross_fitted, presence, report_targets


def _archive(seed: int, patients: int = 60, visits: int = 3, dim: int = 16) -> dict[str, np.ndarray]:
    """Clips of two views per study; the EF is a linear function of the clip vector plus noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    pk = np.repeat(np.arange(patients) * 7 + 3, visits * 2)  # keys need not be consecutive
    views = np.tile(np.array(["A4C", "PLAX"]), patients * visits)
    vecs = rng.normal(size=(pk.size, dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ef = 50 + 40 * (vecs @ w) / np.linalg.norm(w) + rng.normal(0, 1, pk.size)
    return {"pk": pk, "views": views, "vecs": vecs, "ef": ef}


@pytest.mark.parametrize(("seed", "kind"), [(0, "content"), (1, "content"), (2, "content"), (0, "cycle")])
def test_a_patients_estimates_ignore_its_own_reports(seed: int, kind: str) -> None:
    a = _archive(seed)
    base = cross_fitted(a["vecs"], a["views"], a["pk"], a["ef"], kind=kind)
    rng = np.random.default_rng(seed + 10)
    for p in rng.choice(np.unique(a["pk"]), 3, replace=False):
        changed = a["ef"].copy()
        mine = a["pk"] == p
        changed[mine] = rng.uniform(5, 95, mine.sum())  # this patient's reports say something else entirely
        again = cross_fitted(a["vecs"], a["views"], a["pk"], changed, kind=kind)
        np.testing.assert_allclose(again.values[mine], base.values[mine])
        assert not np.allclose(again.values[~mine], base.values[~mine])  # the others did learn from them


def test_probe_recovers_what_the_vectors_carry() -> None:
    a = _archive(3)
    fit = cross_fitted(a["vecs"], a["views"], a["pk"], a["ef"])
    assert np.isfinite(fit.values).all()
    assert np.corrcoef(fit.values, a["ef"])[0, 1] > 0.9
    assert fit.mae < 5 and fit.n_labelled_patients == 60
    unlabelled = a["ef"].copy()
    unlabelled[:12] = np.nan  # studies without a stated EF still get an estimate, from every labelled patient
    fit2 = cross_fitted(a["vecs"], a["views"], a["pk"], unlabelled)
    assert np.isfinite(fit2.values[:12]).all() and np.abs(fit2.values[:12] - a["ef"][:12]).mean() < 5


@pytest.mark.parametrize("seed", [0, 1])
def test_cycle_probe_reads_a_small_scale_signal_among_large_features(seed: int) -> None:
    """Cycle vectors mix features of very different scales (a frame-mean and its spread over the cycle, per
    channel): EF carried by a few small-scale features is found by the standardised cycle probe, while a plain
    ridge on the raw values (the content probe) is swamped by the large ones."""
    rng = np.random.default_rng(seed)
    n = 360
    pk = np.repeat(np.arange(n // 6), 6)
    views = np.tile(np.array(["A4C", "PLAX"]), n // 2)
    signal = rng.normal(size=(n, 8))
    x = np.c_[rng.normal(size=(n, 40)) * 5.0, signal * 0.01]
    ef = 50 + 5 * signal.sum(axis=1) / np.sqrt(8) + rng.normal(0, 1, n)
    cyc = cross_fitted(x, views, pk, ef, kind="cycle")
    raw = cross_fitted(x, views, pk, ef)
    assert np.corrcoef(cyc.values, ef)[0, 1] > 0.9 and cyc.mae < 2.0
    assert np.corrcoef(raw.values, ef)[0, 1] < 0.5 and raw.mae > cyc.mae + 1.0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 120), d=st.integers(2, 300), seed=st.integers(0, 10_000))
def test_cycle_probe_components_are_the_svds(n: int, d: int, seed: int) -> None:
    """The cycle probe takes its principal components from the smaller Gram matrix (fast on a few hundred clips x
    thousands of features): its predictions are those of a ridge on the SVD's leading components."""
    from echosearch.change.probes import CYCLE_RIDGE, pca_ridge

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.01, 5, d)
    y = X[:, 0] + rng.normal(size=n)
    Q = rng.normal(size=(7, d))
    mu, sd = X.mean(axis=0), X.std(axis=0) + 1e-3
    vt = np.linalg.svd((X - mu) / sd, full_matrices=False)[2]
    w = vt[: max(1, min(256, n // 2))].T
    z = (X - mu) / sd @ w
    b = np.linalg.solve(z.T @ z + CYCLE_RIDGE * n * np.eye(w.shape[1]), z.T @ (y - y.mean()))
    want = (Q - mu) / sd @ w @ b + y.mean()
    np.testing.assert_allclose(pca_ridge(X, y)(Q), want, rtol=1e-6, atol=1e-6 * (1 + np.abs(want).max()))


def test_too_few_labelled_patients_give_no_estimate() -> None:
    a = _archive(4, patients=MIN_PATIENTS - 1)
    assert np.isnan(cross_fitted(a["vecs"], a["views"], a["pk"], a["ef"]).values).all()
    stated = (a["ef"] > 50).astype(float)
    assert np.isnan(presence(a["ef"], a["pk"], stated)).all()


def test_presence_is_calibrated_on_the_reports() -> None:
    rng = np.random.default_rng(5)
    pk = np.repeat(np.arange(80), 4)
    present = rng.random(pk.size) < 0.3
    score = np.where(present, 0.2, 0.1) + rng.normal(0, 0.03, pk.size)  # zero-shot scores well above 0 for all
    p = presence(score, pk, present.astype(float))
    assert np.isfinite(p).all()
    assert np.mean((p > 0.5) == present) > 0.9  # a threshold of 0 would call every study "present"
    mine = pk == 7
    flipped = present.astype(float)
    flipped[mine] = 1 - flipped[mine]
    np.testing.assert_allclose(presence(score, pk, flipped)[mine], p[mine])  # cross-fitted too


def test_report_targets() -> None:
    texts = {1: "LV EJECTION FRACTION IS 35%. MITRACLIP IN PLACE.", 2: "NORMAL STUDY.",
             3: "LEFT VENTRICULAR EJECTION FRACTION ESTIMATED AT 60%.", 4: None}
    got = report_targets(texts, {"mitraclip": ["MITRACLIP IN PLACE."], "tavr": ["A STENT-VALVE IS PRESENT."]})
    assert got["ef"] == {1: 35.0, 3: 60.0}
    assert got["mitraclip"] == {1: 1.0, 2: 0.0, 3: 0.0}  # no report: no label
    assert "tavr" not in got  # a device no report names gives no labels (its absence says nothing)


def test_missing_probes_use_the_fallback_weights() -> None:
    n = len(FEATURES) + 1
    idx = {f: k for k, f in enumerate(FEATURES)}
    w = np.zeros(n)
    w[idx["tavr_probe_rise"]], w[-1] = 2.0, -3.0
    back = np.zeros(n)
    back[idx["tavr_rise"]], back[-1] = 1.0, -2.0
    model = ChangeModel({"new_tavr": w}, {"new_tavr": 0.1}, fallback={"new_tavr": back})
    X = np.zeros((3, len(FEATURES)))
    X[:, idx["tavr_rise"]] = [0.0, 1.0, 2.0]
    X[:, idx["tavr_probe_rise"]] = [1.0, 1.0, 1.0]
    np.testing.assert_allclose(model.logits(X)["new_tavr"], [-1.0, -1.0, -1.0])
    np.testing.assert_allclose(model.logits(X, frozenset(PROBE_FEATURES))["new_tavr"], [-2.0, -1.0, 0.0])


def test_logistic_fit_stays_finite_on_separable_labels() -> None:
    """A full Newton step overshoots when features separate the labels: on these pairs (the standardised
    evidence of "pacer lead removed" on tuning seed 301, probe features included) the undamped fit ran to
    weights of 1e10 and made every change probability 1.0. The fit must end at the penalised optimum."""
    from echosearch.change.model import fit_logistic

    data = np.load(Path(__file__).parent / "data" / "separable_logistic.npz")
    X, y = data["X"].astype(np.float64), data["y"].astype(np.float64)
    w = fit_logistic(X, y, l2=1.0)
    assert np.isfinite(w).all() and np.abs(w).max() < 50
    z = np.c_[X, np.ones(len(X))] @ w
    assert (z[y == 1] > 0).mean() > 0.9 and (z[y == 0] < 0).mean() > 0.95


def test_reports_set_device_presence_along_the_timeline(tmp_path: Path) -> None:
    """A zero-shot score above the recorded threshold on every study (as MitraClip's was with the demo model)
    makes a device "present" from baseline, so its implant is never new; the archive's reports set presence
    instead, and the implant is flagged on the visit it appears."""
    import polars as pl

    from echosearch.catalog import Catalog
    from echosearch.change import scan_changes
    from echosearch.change.features import load_timeline
    from echosearch.change.scan import study_predictions

    try:
        from test_identity import Cohort, build_catalog
    except ImportError:  # pragma: no cover - when tests are imported as a package
        from tests.test_identity import Cohort, build_catalog

    gen = Cohort(seed=21)
    studies = gen.patients(40, visits=(5, 5))
    rng = np.random.default_rng(2)
    clip_dir = rng.normal(size=studies[0].vec.size)
    clip_dir /= np.linalg.norm(clip_dir)
    implanted = {f"P{k}" for k in range(12)}
    clip_in: dict[str, bool] = {}
    for s in studies:
        visit = sum(o.true == s.true and o.day < s.day for o in studies) + 1
        has = clip_in[s.uid] = s.true in implanted and visit >= 3
        s.preds = {t: -0.05 + float(rng.normal(0, 0.004)) for t in ("pacer_lead", "tavr", "lv_dilated")}
        s.preds["mitraclip"] = (0.10 if has else 0.02) + float(rng.normal(0, 0.004))  # above 0 on every study
        s.preds["ef"] = 55.0 + float(rng.normal(0, 2))
        s.vec = s.vec + (0.3 * clip_dir if has else 0.0)
        s.events = ["mitraclip_implant"] if has and visit == 3 else []
    index = build_catalog(tmp_path, studies, videos_per_study=3)
    with Catalog.open(index) as cat:
        for s in studies:
            said = " MITRACLIP IN PLACE." if clip_in[s.uid] else ""
            cat.record_report(s.uid, f"LV EJECTION FRACTION IS {s.preds['ef']:.0f}%.{said}", "test")
        T = load_timeline(cat, study_predictions(cat))
        truth = np.asarray([clip_in[u] for u in T.meta["study_uid"].to_list()])
        assert np.mean((T.pred["mitraclip_present"] > 0.5) == truth) > 0.95
        # a low display threshold: what is asserted is the device state along the timeline, not calibration
        with_reports = scan_changes(cat, store=False, min_probability=0.01)
        cat.study_reports = lambda keys: pl.DataFrame(schema={"study_key": pl.Int64, "text": pl.String})  # type: ignore[method-assign]
        without = scan_changes(cat, store=False, min_probability=0.01)

    def new_clip_on_implant_visits(df: pl.DataFrame) -> float:
        visits = df.filter(pl.col("patient_pseudonym").is_in(sorted(implanted)) & (pl.col("visit") == 3))
        return float(np.mean(["new_mitraclip" in (t or []) for t in visits["flag_types"].to_list()]))

    assert new_clip_on_implant_visits(with_reports) >= 0.9
    assert new_clip_on_implant_visits(without) <= 0.1  # "present" from baseline by the zero-shot threshold


def test_ef_dynamics_bench_features_and_probe(tmp_path: Path) -> None:
    """bench/ef_dynamics.py: one decoding pass gives every input per clip (the dynamics carry the frames'
    spread, which a frame mean cannot), and its ridge recovers a linear target from standardised features."""
    import sys

    from echosearch.synth import generate_cohort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import ef_dynamics as bench
    finally:
        sys.path.pop(0)
    cohort = tmp_path / "c"
    generate_cohort(cohort, patients=3, seed=5, visits=(2, 2), views=("A4C",), workers=1)
    feats, meta = bench.cache_features(cohort, tmp_path / "cache", workers=1)
    assert meta.height == 6 and set(meta["view"]) == {"A4C"} and meta["ef"].null_count() == 0
    chan, grid = feats["dynamics, channels"], feats["dynamics, 3 x 3"]
    assert chan.shape[0] == grid.shape[0] == feats["content"].shape[0] == 6 and grid.shape[1] == 9 * chan.shape[1]
    half = chan.shape[1] // 2
    assert (chan[:, half:] > 0).all(), "the frame standard deviation of a beating heart is never zero"
    again, _ = bench.cache_features(cohort, tmp_path / "cache", workers=1)  # read back from the cache
    assert np.array_equal(again["dynamics, 3 x 3"], grid)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30)) * rng.uniform(0.1, 10, 30)
    y = 50 + x[:, 0] / x[:, 0].std() * 8 - x[:, 3] / x[:, 3].std() * 4
    fit = bench.ridge(x[:150], y[:150], components=30, lam=1e-4)
    assert np.abs(fit(x[150:]) - y[150:]).mean() < 0.5


def cycle_archive(root: Path) -> tuple[Path, dict[str, float], set[str]]:
    """An index whose content vectors carry no EF and whose zero-shot EF is ~9 points off, but whose cycle vectors
    carry it (small in scale among large features, as the tower's spread over the frames does), with a report
    stating each study's EF: (index, true EF per study UID, UIDs of the studies after an EF decline)."""
    from echosearch.catalog import Catalog
    from echosearch.store.schema import cycle_table_sql

    try:
        from test_identity import Cohort, build_catalog
    except ImportError:  # pragma: no cover - when tests are imported as a package
        from tests.test_identity import Cohort, build_catalog

    studies = Cohort(seed=5).patients(40, visits=(5, 5))
    rng = np.random.default_rng(6)
    true_ef: dict[str, float] = {}
    for p in {s.true for s in studies}:
        mine = sorted((s for s in studies if s.true == p), key=lambda s: s.day)
        ef = float(rng.uniform(45, 65))
        for v, s in enumerate(mine):
            if v and rng.random() < 0.3:
                ef = float(np.clip(ef - rng.uniform(15, 25), 15, 70))  # a decline beyond the 10-point margin
                s.events = ["ef_decline"]
            true_ef[s.uid] = ef
            s.preds["ef"] = ef + float(rng.normal(0, 11))  # zero-shot: ~9 points off
    index = build_catalog(root, studies, videos_per_study=3)
    dim = 48
    with Catalog.open(index) as cat:
        rows = cat.con.sql("SELECT v.video_key, s.study_uid FROM videos v JOIN studies s USING (study_key) "
                           "ORDER BY v.video_key").fetchall()
        ef_of = np.asarray([true_ef[u] for _, u in rows])
        cyc = np.c_[rng.normal(size=(len(rows), dim - 4)) * 3.0,
                    0.002 * (ef_of[:, None] - 50) + rng.normal(0, 0.004, (len(rows), 4))]
        cat.con.execute(cycle_table_sql(dim))  # as an index whose encoder stores cycle vectors
        cat.set_manifest("cycle", {"format": "echosearch-cycle-v1", "split": 3, "grid": 3, "channels": 1, "dim": dim})
        cat.store_cycle_vectors([int(k) for k, _ in rows], cyc)
        for s in studies:
            cat.record_report(s.uid, f"LV EJECTION FRACTION IS {true_ef[s.uid] + rng.normal(0, 2):.0f}%.", "test")
    return index, true_ef, {s.uid for s in studies if s.events}


def test_ef_is_read_from_the_cycle_vectors_when_the_index_stores_them(tmp_path: Path) -> None:
    """On :func:`cycle_archive`: the EF probe reads the cycle vectors, its estimate is a few points off, and an EF
    fall's clause leads with it."""
    import polars as pl

    from echosearch.catalog import Catalog
    from echosearch.change import scan_changes
    from echosearch.change.features import load_timeline
    from echosearch.change.scan import study_predictions

    index, true_ef, declines = cycle_archive(tmp_path)
    with Catalog.open(index) as cat:
        T = load_timeline(cat, study_predictions(cat))
        truth = np.asarray([true_ef[u] for u in T.meta["study_uid"].to_list()])
        assert T.ef_probe_input == "cycle"
        assert np.abs(T.pred["ef_probe"] - truth).mean() < 3.0 < 7.0 < np.abs(T.pred["ef"] - truth).mean()
        from echosearch.evaluation.change import _ef_learnt

        st = pl.DataFrame({"study_key": T.keys, "ef": truth, "mislabelled": False})
        measured = _ef_learnt(T, st)  # what `eval` reports: both estimates on the same studies
        assert measured["input"] == "cycle" and measured["n_studies"] == len(T)
        assert measured["mae"] < 3.0 < 7.0 < measured["zero_shot_mae"]
        out = scan_changes(cat, store=False, min_probability=0.01)
    falls = [f for fl in out["flags"].to_list() for f in json.loads(fl or "[]") if f["type"] == "ef_fall"]
    assert falls and all(f["evidence"]["values"]["source"] == "ef_probe" for f in falls)
    assert all("EF learnt from this archive's reports" in f["text"] for f in falls)
    declined = out.filter(pl.col("study_uid").is_in(sorted(declines)))
    stable = out.filter(pl.col("prev_study_key").is_not_null()
                        & ~pl.col("study_uid").is_in(declined["study_uid"].to_list()))
    assert declined["p_ef_fall"].mean() > stable["p_ef_fall"].mean() + 0.3  # type: ignore[operator]
    assert declined["ef_learnt"].is_not_null().all()
