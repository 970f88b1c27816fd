"""Same-patient matching, calibration and the identity audit on small catalogs with structured vectors.

Study vectors are built as in real archives: a per-patient centre plus per-visit noise (same-patient
cosines ~0.7-0.9, different-patient ~0.2-0.5), each study having two videos whose mean is the study vector.
``build_catalog`` is also used by ``test_change.py`` and ``test_evaluate.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog, VideoRecord
from echosearch.errors import QueryError
from echosearch.identity import audit, match_patients, same_patient_probability
from echosearch.identity import calibration as cal

DIM = 32
MODEL = {"name": "test", "weights_sha256": "x", "embed_dim": DIM, "preprocessing": {}}


@dataclass
class Study:
    """One synthetic study: recorded and true patient, date, vector and study-level predictions."""

    uid: str
    recorded: str
    true: str
    day: date
    vec: np.ndarray
    preds: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Cohort:
    """Generator of patient centres and visit vectors (a shared direction sets the different-patient level)."""

    def __init__(self, seed: int = 0, shared: float = 0.6, noise: float = 0.45) -> None:
        self.rng = np.random.default_rng(seed)
        self.g = unit(self.rng.normal(size=DIM))
        self.shared, self.noise = shared, noise

    def centre(self) -> np.ndarray:
        return self.shared * self.g + unit(self.rng.normal(size=DIM))

    def visit(self, centre: np.ndarray, noise: float | None = None) -> np.ndarray:
        sigma = self.noise if noise is None else noise
        return unit(centre + sigma * self.rng.normal(size=DIM) / np.sqrt(DIM))

    def patients(self, n: int, visits: tuple[int, int] = (2, 5), prefix: str = "P") -> list[Study]:
        out: list[Study] = []
        for p in range(n):
            c = self.centre()
            for v in range(int(self.rng.integers(visits[0], visits[1] + 1))):
                out.append(Study(f"{prefix}{p}.S{v}", f"{prefix}{p}", f"{prefix}{p}",
                                 date(2015, 1, 1) + timedelta(days=200 * v + p), self.visit(c),
                                 {"ef": 60.0 + float(self.rng.normal(0, 2)), "pacer_lead": -0.05, "tavr": -0.05,
                                  "mitraclip": -0.05, "lv_dilated": -0.05}))
        return out


def build_catalog(root: Path, studies: list[Study], videos_per_study: int = 2, seed: int = 0,
                  source: Path | None = None) -> Path:
    """An index folder holding ``studies`` (videos recorded, video/study vectors and predictions stored)."""
    rng = np.random.default_rng(seed)
    index = root / "index"
    cat = Catalog.open(index, create=True)
    cat.bind_model(MODEL)
    src = source or root / "source"
    vkeys: list[int] = []
    vvecs: list[np.ndarray] = []
    skeys: list[int] = []
    svecs: list[np.ndarray] = []
    tx = cat.transaction()
    tx.__enter__()
    for s in studies:
        vecs = unit(s.vec[None, :] + 0.15 * rng.normal(size=(videos_per_study, DIM)) / np.sqrt(DIM))
        for v in range(videos_per_study):
            view = ("A4C", "PLAX", "A2C")[v % 3]
            key = cat.record_video(VideoRecord(
                sha256=f"{s.uid}-{v}", path=str(src / s.true / s.uid / f"{view}.dcm"), size_bytes=1, kind="dicom",
                patient_pseudonym=s.recorded, study_uid=s.uid, study_date=s.day, sop_uid=f"{s.uid}.{v}", view=view))
            vkeys.append(key)
            vvecs.append(vecs[v])
        sk = cat.study_key(s.uid)
        assert sk is not None
        skeys.append(sk)
        svecs.append(unit(vecs.mean(axis=0)))
    tx.__exit__(None, None, None)
    cat.store_video_embeddings(vkeys, np.stack(vvecs), [16] * len(vkeys))
    cat.store_level_embeddings("study", skeys, np.stack(svecs), [videos_per_study] * len(skeys))
    rows = [("study", k, task, float(val), "test") for k, s in zip(skeys, studies, strict=True)
            for task, val in s.preds.items()]
    if rows:
        preds = pl.DataFrame(rows, schema=["level", "key", "task", "value", "model"], orient="row").to_arrow()
        cat.con.register("_preds", preds)
        cat.con.execute("INSERT INTO predictions SELECT * FROM _preds")
    cat.close()
    return index


def mislabel(studies: list[Study], rate: float, seed: int = 1) -> list[Study]:
    """Record a share of studies under another (existing) patient's ID."""
    rng = np.random.default_rng(seed)
    patients = sorted({s.true for s in studies})
    for s in studies:
        if rng.random() < rate:
            s.recorded = str(rng.choice([p for p in patients if p != s.true]))
    return studies


# ---- calibration -------------------------------------------------------------------------------------
scores = st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=1, max_size=40)


@given(scores, scores)
@settings(max_examples=60, deadline=None)
def test_auc_matches_brute_force(pos: list[float], neg: list[float]) -> None:
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert cal.auc(pos, neg) == pytest.approx(brute, abs=1e-9)
    labels = [True] * len(pos) + [False] * len(neg)
    assert cal.auc_from_labels(pos + neg, labels) == pytest.approx(brute, abs=1e-9)


@given(scores, scores, st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=30))
@settings(max_examples=60, deadline=None)
def test_isotonic_calibration_is_monotone(pos: list[float], neg: list[float], probe: list[float]) -> None:
    model = cal.fit_isotonic(pos, neg)
    x = np.sort(np.asarray(probe))
    p = model.predict(x)
    assert np.all(np.diff(p) >= -1e-12)
    assert np.all((p >= 0) & (p <= 1))
    again = cal.IsotonicCalibration.from_params(json.loads(json.dumps(model.to_params())))
    assert np.all(np.diff(again.predict(x)) >= -1e-12)


def test_roc_and_threshold_at_fpr() -> None:
    neg = np.arange(100) / 100.0
    t = cal.threshold_at_fpr(neg, 0.05)
    assert np.mean(neg > t) <= 0.05
    fpr, tpr, _ = cal.roc_curve([0.9, 0.8, 0.3, 0.1], [True, True, False, False])
    assert fpr[0] == 0 and tpr[-1] == 1 and np.trapezoid(tpr, fpr) == pytest.approx(1.0)


# ---- matching and audit ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Study], pl.DataFrame]:
    root = tmp_path_factory.mktemp("identity")
    studies = Cohort(seed=3).patients(40, visits=(2, 5))
    victim = next(s for s in studies if s.true == "P7" and s.uid.endswith("S1"))
    victim.recorded = "P12"
    lone = Cohort(seed=4).patients(1, visits=(1, 1), prefix="L")
    index = build_catalog(root, studies + lone, videos_per_study=1)
    with Catalog.open(index) as cat:
        df = audit(cat, report_unverifiable=True)
        stored = cat.con.execute("SELECT count(*) FROM identity_audit").fetchone()
    assert stored is not None and stored[0] == df.height
    return index, studies, df


def test_injected_mislabel_ranked_first(audited: tuple[Path, list[Study], pl.DataFrame]) -> None:
    _, _, df = audited
    top = df.row(0, named=True)
    assert top["study_uid"] == "P7.S1" and top["suspect"]
    assert top["best_other_patient"] == "P7" and top["recorded_patient"] == "P12"
    assert top["margin"] < 0
    ev = json.loads(top["evidence"])
    assert ev["reasons"] and ev["best_other_studies"] and ev["own_patient_studies"]
    assert df.filter(pl.col("suspect")).height <= 3


def test_single_study_patient_not_flagged(audited: tuple[Path, list[Study], pl.DataFrame]) -> None:
    _, _, df = audited
    lone = df.filter(pl.col("study_uid") == "L0.S0").row(0, named=True)
    assert lone["own_score"] is None and not lone["suspect"] and lone["status"] == "unverifiable"


def test_clean_cohort_has_few_suspects(tmp_path: Path) -> None:
    index = build_catalog(tmp_path, Cohort(seed=5).patients(35, visits=(2, 5)), videos_per_study=1)
    with Catalog.open(index) as cat:
        df = audit(cat)
    assert df.filter(pl.col("suspect")).height <= 2
    assert "unverifiable" not in df["status"].to_list()


def test_audit_finds_mislabels_at_high_precision(tmp_path: Path) -> None:
    studies = mislabel(Cohort(seed=8).patients(60, visits=(2, 5)), 0.08, seed=2)
    index = build_catalog(tmp_path, studies, videos_per_study=1)
    truth = {s.uid: s.recorded != s.true for s in studies}
    with Catalog.open(index) as cat:
        df = audit(cat, store=False, report_unverifiable=True)
    flagged = set(df.filter(pl.col("suspect"))["study_uid"].to_list())
    wrong = {u for u, m in truth.items() if m}
    # chains of mislabels between two-study patients are ambiguous, so a small cohort is not perfect
    assert len(flagged & wrong) / max(len(flagged), 1) >= 0.85
    assert len(flagged & wrong) / len(wrong) >= 0.85


def test_match_patients_and_probability(audited: tuple[Path, list[Study], pl.DataFrame]) -> None:
    index, _, _ = audited
    with Catalog.open(index, read_only=True) as cat:
        res = match_patients(cat, "P3.S0", k_patients=3)
        assert res.row(0, named=True)["patient_pseudonym"] == "P3" and res.row(0, named=True)["is_recorded_patient"]
        assert res.row(0, named=True)["p_same"] > 0.8
        key = cat.study_key("P3.S0")
        assert key is not None
        own_keys = res.row(0, named=True)["supporting_study_keys"]
        assert key not in own_keys
        wrong = match_patients(cat, "P7.S1", k_patients=3)
        assert wrong.row(0, named=True)["patient_pseudonym"] == "P7"
        a, b, c = cat.study_key("P3.S0"), cat.study_key("P3.S1"), cat.study_key("P4.S0")
        assert a is not None and b is not None and c is not None
        assert same_patient_probability(cat, a, b) > 0.8 > 0.2 > same_patient_probability(cat, a, c)
        ids, vecs = cat.embeddings("study", [a])
        by_vec = match_patients(cat, vecs[0], k_patients=2)
        assert by_vec.row(0, named=True)["patient_pseudonym"] == "P3"
        with pytest.raises(QueryError):
            match_patients(cat, "no-such-study")
