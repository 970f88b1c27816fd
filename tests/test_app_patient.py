"""The patient timeline page under ``streamlit.testing.v1.AppTest`` on a hand-made index whose patients have
known courses (test_change's cohort): flags once with probability and evidence, years on the date axes, a
readable device chart, report text next to the compared clips, the patient kept in the URL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from echosearch.appcore import auth
from echosearch.appcore.data import SERVER_ENV, LocalAppIndex
from echosearch.appcore.launch import INDEX_ENV
from echosearch.change import MIN_PROBABILITY

try:
    from test_change import _cohort
    from test_identity import build_catalog
except ImportError:  # pragma: no cover - when tests are imported as a package
    from tests.test_change import _cohort
    from tests.test_identity import build_catalog

MAIN = Path(__file__).resolve().parents[1] / "app" / "main.py"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from echosearch.catalog import Catalog

    index = build_catalog(tmp_path_factory.mktemp("patient-page"), _cohort(), videos_per_study=2)
    with Catalog.open(index) as cat:  # report text of P1's studies, as an ingested report would be
        for uid in ("P1.S1", "P1.S2"):
            cat.record_report(uid, f"REPORT OF {uid}. NORMAL LEFT VENTRICULAR SIZE.", "test")
    return index


@pytest.fixture
def app_env(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from streamlit import config

    old = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    monkeypatch.setenv(INDEX_ENV, str(index_dir))
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(SERVER_ENV, raising=False)  # the catalog opened in the test process
    monkeypatch.setenv(auth.USER_ENV, "tester")
    yield index_dir
    config.set_option("server.address", old)


def open_patient(patient: str) -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(MAIN), default_timeout=120)
    at.query_params["patient"] = patient
    at.run()
    at.switch_page("app_pages/patient.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def specs(at: Any) -> list[dict[str, Any]]:
    """Each chart's Vega-Lite spec, with its data sets (sent beside the spec) decoded as row dicts."""
    import pyarrow as pa

    out = []
    for c in at.get("vega_lite_chart"):
        spec = json.loads(c.proto.spec)
        spec["_rows"] = [r for ds in c.proto.datasets for r in pa.ipc.open_stream(ds.data.data).read_all().to_pylist()]
        out.append(spec)
    return out


def test_pacer_flag_shown_once_with_probability_and_evidence(app_env: Path) -> None:
    at = open_patient("P1")
    assert at.selectbox[0].value == "P1"
    text = [m.value for m in at.markdown]
    flags = [t for t in text if t.startswith("**new pacer/ICD lead** · probability")]
    assert len(flags) == 1, text  # once: not again as a "reason" line
    assert "zero-shot score" in flags[0]
    assert sum("new pacer/ICD lead" in t for t in text) == 1
    heads = [s.value for s in at.subheader]
    assert {"Change between visits", "Flags", "Compare two visits"} <= set(heads)
    # the evidence clips of the flag: one caption per side (the hand-made index has no files to preview)
    shown = [c.value for c in at.caption]
    assert any(c.startswith("clip unavailable") or c.startswith("before") for c in shown)


def test_dates_show_years_and_flag_marks_sit_above_the_flag_level(app_env: Path) -> None:
    at = open_patient("P1")
    charts = specs(at)
    assert len(charts) >= 3, "change, EF and device charts"
    text = json.dumps(charts, default=str)
    assert '"format": "%b %Y"' in text or '"format":"%b %Y"' in text, "years on the date axis"
    change = charts[0]
    rule = [layer for layer in change["layer"] if layer.get("mark", {}).get("type") == "rule"
            or layer.get("mark") == "rule"]
    assert rule and rule[0]["encoding"]["y"]["datum"] == MIN_PROBABILITY

    tl = LocalAppIndex(app_env).patient_timeline(int(LocalAppIndex(app_env).patients().filter(
        LocalAppIndex(app_env).patients()["patient_pseudonym"] == "P1")["patient_key"][0]))
    flagged = tl.filter(tl["flagged"].fill_null(False))
    assert flagged.height >= 1 and (flagged["change_prob"] >= MIN_PROBABILITY).all(), "a flag lifts the change line to its level"


def test_device_chart_is_a_state_strip_with_readable_labels(app_env: Path) -> None:
    at = open_patient("P1")
    device = next(c for c in specs(at) if "finding" in json.dumps(c.get("encoding", {}), default=str))
    assert device["mark"]["type"] == "square"
    assert device["encoding"]["y"]["axis"]["labelLimit"] >= 200
    data = device["_rows"]
    pacer = [d for d in data if d["finding"] == "pacemaker lead"]
    assert {d["state"] for d in pacer} == {"seen", "not seen"}  # 0 threshold: -0.05 not seen, 0.06 seen


def test_compare_shows_report_text_and_the_url_keeps_the_patient(app_env: Path) -> None:
    at = open_patient("P1")
    reports = [t.value for t in at.text_area]
    assert any("REPORT OF P1.S" in r for r in reports), reports
    at.selectbox[0].set_value("P2").run()
    assert at.query_params["patient"] == ["P2"] or at.query_params["patient"] == "P2"


def test_transplant_patient_shows_a_new_heart(app_env: Path) -> None:
    at = open_patient("P0")
    text = " ".join(m.value for m in at.markdown)
    assert "**new heart** · probability" in text and "a new heart of this patient" in text


def test_ef_learnt_from_the_reports_is_shown_beside_the_zero_shot_ef(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An archive whose reports teach the EF probe (cycle vectors): the EF chart draws the learnt and the zero-shot
    estimate of every visit, and each compared visit's caption gives both."""
    try:
        from test_change_probes import cycle_archive
    except ImportError:  # pragma: no cover - when tests are imported as a package
        from tests.test_change_probes import cycle_archive
    from streamlit import config

    index, true_ef, _ = cycle_archive(tmp_path)
    old = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    monkeypatch.setenv(INDEX_ENV, str(index))
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(SERVER_ENV, raising=False)
    monkeypatch.setenv(auth.USER_ENV, "tester")
    try:
        at = open_patient("P3")
    finally:
        config.set_option("server.address", old)
    rows = [r for c in specs(at) for r in c["_rows"] if "estimate" in r]
    by = {e: sorted((r["visit"], r["EF"]) for r in rows if r["estimate"] == e) for e in {r["estimate"] for r in rows}}
    assert set(by) == {"learnt from this archive's reports", "zero-shot"}
    assert [v for v, _ in by["zero-shot"]] == [v for v, _ in by["learnt from this archive's reports"]] == [1, 2, 3, 4, 5]
    truth = [ef for uid, ef in sorted(true_ef.items()) if uid.startswith("P3.")]
    learnt = [ef for _, ef in by["learnt from this archive's reports"]]
    assert np.abs(np.asarray(learnt) - truth).mean() < 5, "the learnt curve follows the patient's true EF"
    captions = [c.value for c in at.caption if c.value.startswith("EF ≈")]
    assert len(captions) == 2 and all("learnt from this archive's reports" in c and "zero-shot" in c for c in captions)
