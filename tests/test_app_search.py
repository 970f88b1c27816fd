"""The search page under AppTest: scope warnings, "no close match", never-stale results, shareable URLs,
readable labels. Uses the shared 6-patient demo index of ``test_app.py`` (its own copy)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REAL_DICOM
from test_app import clips, index_copy, log_rows, new_app, ok

from echosearch.appcore import auth
from echosearch.appcore.data import SERVER_ENV
from echosearch.appcore.launch import INDEX_ENV

THYROID = REAL_DICOM / "Acuson_thyroid_YBR_FULL_RLE.dcm"
CT = REAL_DICOM / "wrong_CT_small.dcm"
REAL_ECHO = REAL_DICOM / "SonoSite_echo_A4C_30f_JPEG_small.dcm"
QUERY = "SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION."


def app() -> Any:
    """A fresh AppTest of the app (typed loosely: AppTest's element accessors are dynamic)."""
    return new_app()


@pytest.fixture(scope="module")
def search_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return index_copy(tmp_path_factory, "app-search")


@pytest.fixture
def loopback() -> Iterator[None]:
    """The app's configured address is loopback for the test, restored afterwards."""
    from streamlit import config

    old = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", old)


@pytest.fixture
def env(search_index: Path, monkeypatch: pytest.MonkeyPatch, loopback: None) -> Path:
    monkeypatch.setenv(INDEX_ENV, str(search_index))
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(SERVER_ENV, raising=False)  # the catalog opened in the test process
    monkeypatch.setenv(auth.USER_ENV, "tester")
    return search_index


def texts(at: Any) -> list[str]:
    """Every piece of text a person reads on the page."""
    kinds = ("title", "subheader", "markdown", "caption", "text", "info", "warning", "error", "success")
    return [str(e.value) for kind in kinds for e in getattr(at, kind)]


def search(at: Any, query: str) -> Any:
    at.text_input(key="f_text").input(query)
    at.form_submit_button[0].click().run()
    return at


def upload(at: Any, path: Path) -> Any:
    at.file_uploader[0].set_value((path.name, path.read_bytes(), "application/dicom")).run()
    next(b for b in at.button if b.label == "Find similar").click().run()
    return at


@pytest.mark.parametrize("name", [THYROID.name, CT.name])
def test_a_non_echo_upload_gets_a_plain_warning_and_no_reading(env: Path, name: str) -> None:
    path = REAL_DICOM / name
    if not path.is_file():
        pytest.skip(f"missing {path}")
    at = app().run()
    search(at, QUERY)  # earlier results must not survive the refused upload
    assert any("most like" in s.value for s in at.subheader)
    upload(at, path)
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert any("does not look like an echocardiogram" in w for w in warnings), warnings
    assert not any("most like" in s.value for s in at.subheader), "old results cleared"
    page = texts(at)
    assert not any("Preliminary reading" in t or "Predicted EF" in t for t in page), "no cardiac reading"
    assert not [c for c in clips(at) if "Query clip" not in c][1:], "no result clips"


def test_a_real_echo_upload_is_searched_with_its_scope(env: Path) -> None:
    if not REAL_ECHO.is_file():
        pytest.skip(f"missing {REAL_ECHO}")
    at = upload(app().run(), REAL_ECHO)
    ok(at)
    assert any("the uploaded clip" in s.value for s in at.subheader)
    assert any(c.value.startswith("Query clip: echocardiogram") for c in at.caption)


def test_a_nonsense_query_shows_no_close_match(env: Path) -> None:
    at = search(app().run(), "xyzzy banana")
    ok(at)
    assert any(w.value.startswith("No close match") for w in at.warning), [w.value for w in at.warning]
    assert not any("Preliminary reading" in t for t in texts(at)), "no reading for a query that matches nothing"


def frequent_sentences(index: Path, n: int = 6) -> list[str]:
    """The archive's most frequent report sentences (what its users would search for)."""
    from collections import Counter

    from echosearch.catalog import Catalog
    from echosearch.model.report_facts import split_sentences

    with Catalog.open(index) as cat:
        reports = [r[0] for r in cat.con.sql("SELECT text FROM reports").fetchall()]
    return [s for s, _ in Counter(s for r in reports for s in split_sentences(r)).most_common(n)]


def test_results_say_how_they_stand_and_why_they_matched(env: Path) -> None:
    at = app().run()
    for query in [QUERY, *frequent_sentences(env)]:  # the first that the archive matches
        search(at, query)
        ok(at)
        if not any(w.value.startswith("No close match") for w in at.warning):
            break
    else:
        pytest.fail("none of the archive's own frequent report sentences found a close match")
    page = texts(at)
    assert any(re.search(r"top \d+(\.\d)? % of matches in this archive|below the no-close-match floor|weaker than", t)
               for t in at.markdown.values), "each result is placed against the archive"
    assert any("Unvalidated model output" in t for t in page), "the reading is labelled as model output"
    assert any(t.startswith("Predicted EF (model estimate)") and "Report EF (stated in the report)" in t for t in page)
    assert any(t.startswith("Closest to your query: ") for t in page), "the matching sentence is shown"
    reports = [t for t in page if t.startswith("Report: ")]
    assert reports and all(len(t) > 60 for t in reports), "the full report, not two sentences"
    for t in page:  # readable names everywhere
        assert not re.search(r"\bNone\b|\bclip \d+\b|\{\"|\d{2}:\d{2}:\d{2}", t), t


def test_a_changed_filter_reruns_the_search_and_names_it(env: Path) -> None:
    at = search(app().run(), QUERY)
    ok(at)
    views = at.multiselect(key="f_views").options
    assert views
    at.multiselect(key="f_views").select(views[-1]).run()
    ok(at)
    head = next(s.value for s in at.subheader if "most like" in s.value)
    assert f"view {views[-1]}" in head, head
    hits = at.session_state["search"]["hits"]
    assert hits.height and set(hits["view"].to_list()) == {views[-1]}, "results match the filters shown"
    assert log_rows(env, "search").height >= 2


def test_an_empty_query_asks_for_one_and_clears_results(env: Path) -> None:
    at = search(app().run(), QUERY)
    at.text_input(key="f_text").input("")
    at.form_submit_button[0].click().run()
    assert any("Type what to look for" in e.value for e in at.error)
    assert not any("most like" in s.value for s in at.subheader)


def test_a_shared_url_restores_the_page(env: Path) -> None:
    at = search(app().run(), QUERY)
    patient = at.session_state["search"]["hits"]["patient_pseudonym"][0]
    at.selectbox(key="f_patient").set_value(patient).run()
    ok(at)
    params = dict(at.query_params)
    assert params.get("q") == QUERY and params.get("patient") == patient, params
    fresh = app()
    for key, value in params.items():
        fresh.query_params[key] = value
    fresh.run()
    ok(fresh)
    assert fresh.text_input(key="f_text").value == QUERY
    assert fresh.selectbox(key="f_patient").value == patient
    head = next(s.value for s in fresh.subheader if "most like" in s.value)
    assert f"patient {patient}" in head
    assert set(fresh.session_state["search"]["hits"]["patient_pseudonym"].to_list()) == {patient}
