"""The Streamlit app (``app/``) under ``streamlit.testing.v1.AppTest``, its data access and ``echosearch serve``.

One small index (6 synthetic patients, the shipped demo model) is built once per session; each user of it
gets its own copy, because a running app holds its catalog open read-write (DuckDB's one-writer rule).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import polars as pl
import pytest
from conftest import REAL_DICOM

from echosearch.appcore import auth
from echosearch.appcore.data import SERVER_ENV, LocalAppIndex
from echosearch.appcore.launch import INDEX_ENV
from echosearch.catalog import Catalog
from echosearch.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "app" / "main.py"
REAL_CLIP = REAL_DICOM / "SonoSite_echo_A4C_30f_JPEG_small.dcm"
TIMEOUT = 180


def model_name() -> str:
    """The shipped demo model (``ECHOSEARCH_TEST_APP_MODEL`` may name another, e.g. ``local-dir:DIR``)."""
    return os.environ.get("ECHOSEARCH_TEST_APP_MODEL", "echosearch-demo")


@lru_cache(maxsize=1)
def _built_index(root: str) -> Path:
    """Cohort -> index, once per process (shared by test_app.py and test_browser.py)."""
    from echosearch.config import load_settings
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    base = Path(root)
    cohort = base / "cohort"
    generate_cohort(cohort, patients=6, seed=5, visits=(2, 3), mislabel_rate=0.2)
    settings = load_settings(mode="demo", model=model_name(), workers=0, device="cpu", frames_per_video=8)
    index_sources([cohort], base / "index", settings, progress=False)
    return base / "index"


def index_copy(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A private copy of the session's test index (built on first use); skips without the demo model."""
    if model_name() == "echosearch-demo":
        from echosearch.model.models import DEMO_MODEL_DIR

        if not (DEMO_MODEL_DIR / "open_clip_model.safetensors").is_file():
            pytest.skip(f"the shipped demo model is missing ({DEMO_MODEL_DIR}); build it with `make demo-model`")
    base = _built_index(str(tmp_path_factory.getbasetemp() / "app-index-build"))
    dest = tmp_path_factory.mktemp(name) / "index"
    shutil.copytree(base, dest)
    return dest


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return index_copy(tmp_path_factory, "app")


@pytest.fixture
def loopback() -> Iterator[None]:
    """The app's configured address is loopback for the test, restored afterwards."""
    from streamlit import config

    old = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", old)


@pytest.fixture
def app_env(index_dir: Path, monkeypatch: pytest.MonkeyPatch, loopback: None) -> Path:
    """Environment of an AppTest run: the index, loopback address, no login configured."""
    monkeypatch.setenv(INDEX_ENV, str(index_dir))
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(SERVER_ENV, raising=False)  # the catalog opened in the test process
    monkeypatch.setenv(auth.USER_ENV, "tester")
    return index_dir


def new_app() -> object:
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(MAIN), default_timeout=TIMEOUT)


def ok(at: object) -> None:
    assert not at.exception, [e.value for e in at.exception]  # type: ignore[attr-defined]
    assert not at.error, [e.value for e in at.error]  # type: ignore[attr-defined]


@pytest.fixture
def media_added(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Mime types registered with Streamlit's media file manager (served at /media/ without a session)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    added: list[str] = []
    original = MediaFileManager.add

    def spy(self: MediaFileManager, path_or_data: object, mimetype: str, *args: object, **kw: object) -> str:
        added.append(mimetype)
        return original(self, path_or_data, mimetype, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(MediaFileManager, "add", spy)
    return added


def clips(at: object) -> list[str]:
    """Clips on the page: ``st.html`` bodies holding a preview inline as a ``data:`` URI."""
    return [h.value for h in at.html if 'src="data:' in h.value]  # type: ignore[attr-defined]


def log_rows(index_dir: Path, action: str) -> pl.DataFrame:
    # same process as the app: open read-write like it (DuckDB shares one instance per file and config)
    with Catalog.open(index_dir) as cat:
        return cat.con.sql("SELECT * FROM access_log WHERE action = ?", params=[action]).pl()


# ---- pages -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", ["app_pages/search.py", "app_pages/patient.py", "app_pages/audit.py",
                                  "app_pages/index_status.py"])
def test_every_page_renders(app_env: Path, page: str, media_added: list[str]) -> None:
    at = new_app().run()
    ok(at)
    at.switch_page(page).run()
    ok(at)
    assert at.title, "every page has a title"
    assert not media_added, "nothing is registered at /media/ (reachable without a session)"
    if page == "app_pages/patient.py":
        assert clips(at) or any("clip unavailable" in c.value for c in at.caption), "clips are shown inline"


def test_text_search_shows_a_gallery_and_is_logged(app_env: Path, media_added: list[str]) -> None:
    at = new_app().run()
    at.text_input[0].input("SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.")
    at.form_submit_button[0].click().run()
    ok(at)
    assert any("most like" in s.value for s in at.subheader)
    shown = clips(at)
    assert len(shown) >= 4 and all(c.startswith('<video src="data:video/mp4;base64,') for c in shown), \
        "result clips play as H.264 previews, inline"
    assert not at.get("video") and not at.get("imgs") and not media_added, "no clip is served from /media/"
    assert list((app_env / "previews").glob("*.mp4")), "previews are cached in the index folder"
    before = log_rows(app_env, "search").height
    assert before >= 1
    # "more like this" on the first result
    next(b for b in at.button if b.label == "More like this").click().run()
    ok(at)
    assert any("most like clip" in s.value for s in at.subheader)
    assert log_rows(app_env, "search").height == before + 1
    # "Patient" on the first result opens that patient's timeline
    first_patient = at.session_state["search"]["hits"]["patient_pseudonym"][0]
    next(b for b in at.button if b.label == "Patient").click().run()
    ok(at)
    assert at.title[0].value == "Patient timeline" and at.selectbox[0].value == first_patient


def test_upload_search_with_a_real_dicom(app_env: Path, media_added: list[str]) -> None:
    if not REAL_CLIP.is_file():
        pytest.skip(f"real DICOM test file missing: {REAL_CLIP}")
    at = new_app().run()
    at.file_uploader[0].set_value((REAL_CLIP.name, REAL_CLIP.read_bytes(), "application/dicom")).run()
    next(b for b in at.button if b.label == "Find similar").click().run()
    ok(at)
    assert any("the uploaded clip" in s.value for s in at.subheader)
    assert len(clips(at)) >= 2 and not media_added  # the query clip and its neighbours, inline
    row = log_rows(app_env, "search").filter(pl.col("detail").str.contains('"kind": "file"'))
    assert row.height and "file_sha256" in row["detail"][0] and REAL_CLIP.name not in row["detail"][0]


def test_patient_page_shows_a_timeline(app_env: Path) -> None:
    at = new_app().run()
    at.switch_page("app_pages/patient.py").run()
    ok(at)
    assert at.selectbox[0].label == "Patient"
    assert len(at.get("vega_lite_chart")) >= 3, "change, EF and device plots"
    heads = [s.value for s in at.subheader]
    assert "Change between visits" in heads and "Compare two visits" in heads
    patient = at.selectbox[0].value
    assert log_rows(app_env, "view_patient")["detail"].str.contains(patient).any()


def open_patient_link(patient: str) -> object:
    """The patient page as a link ``/patient?patient=...`` opens it."""
    at = new_app()
    at.query_params["patient"] = patient  # type: ignore[attr-defined]
    at.run()  # type: ignore[attr-defined]
    return at.switch_page("app_pages/patient.py").run()  # type: ignore[attr-defined]


def test_a_link_to_an_unknown_patient_shows_no_patient_and_logs_nothing(app_env: Path) -> None:
    before = log_rows(app_env, "view_patient").height
    at = open_patient_link("P-doesnotexist")
    assert not at.exception  # type: ignore[attr-defined]
    assert [e.value for e in at.error] == [  # type: ignore[attr-defined]
        "No such patient in this index: the link names a patient pseudonym that this index does not hold."]
    assert not at.selectbox and not at.get("vega_lite_chart") and not at.subheader  # type: ignore[attr-defined]
    assert log_rows(app_env, "view_patient").height == before
    known = LocalAppIndex(app_env).patients()["patient_pseudonym"].to_list()[-1]
    at = open_patient_link(known)  # a link to a patient the index holds opens that patient
    ok(at)
    assert at.selectbox[0].value == known  # type: ignore[attr-defined]
    assert log_rows(app_env, "view_patient")["detail"].str.contains(known).any()


def test_audit_decision_persists(app_env: Path, media_added: list[str]) -> None:
    at = new_app().run()
    at.switch_page("app_pages/audit.py").run()
    ok(at)
    run_now = [b for b in at.button if b.label == "Run the identity audit now"]
    if run_now:
        run_now[0].click().run()
        ok(at)
    if not at.radio:  # no suspect in this cohort: review any audited study
        at.get("button_group")[0].set_value("all audited studies").run()
        ok(at)
    rank = next(sb for sb in at.selectbox if sb.label == "Review suspect").value
    assert clips(at) and not media_added, "the suspect's clips are shown inline"
    suspects = LocalAppIndex(app_env).audit_results(suspects_only=False)
    study_key = int(suspects.filter(pl.col("rank") == rank)["study_key"][0])
    save = next(b for b in at.button if b.label == "Save decision")
    assert at.radio[0].value is None and save.disabled, "no decision is preselected; Save waits for a choice"
    at.radio[0].set_value("confirmed").run()
    assert not next(b for b in at.button if b.label == "Save decision").disabled
    at.text_input[0].input("checked against the worklist")
    next(b for b in at.button if b.label == "Save decision").click().run()
    ok(at)
    assert at.radio[0].value is None and next(b for b in at.button if b.label == "Save decision").disabled, \
        "after a save the choice starts again from none"
    assert at.text_input[0].value == ""
    with Catalog.open(app_env) as cat:
        rows = cat.con.sql("SELECT study_key, decision, reviewer, note FROM audit_decisions").fetchall()
        logged = cat.con.sql("SELECT actor FROM access_log WHERE action = 'audit_decision'").fetchall()
    assert rows and rows[-1][1:] == ("confirmed", "tester", "checked against the worklist")
    assert rows[-1][0] == study_key
    assert logged and logged[-1][0] == "tester"
    assert any("Latest decision: **confirmed**" in i.value for i in at.info)


def test_password_login_is_required_when_configured(app_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.PASSWORD_ENV, "correct horse battery staple")
    at = new_app().run()
    assert not at.get("tabs") and at.form, "only the login form before signing in"
    at.text_input[0].input("dr who")
    at.text_input[1].input("wrong")
    at.form_submit_button[0].click().run()
    assert at.error and "Wrong name or password" in at.error[0].value
    at.text_input[1].input("correct horse battery staple")
    at.form_submit_button[0].click().run()
    ok(at)
    assert any(t.value == "Search echoes" for t in at.title)
    assert log_rows(app_env, "login")["actor"].to_list()[-1] == "dr who"


def test_password_login_locks_after_repeated_failures(tmp_path_factory: pytest.TempPathFactory,
                                                      monkeypatch: pytest.MonkeyPatch, loopback: None) -> None:
    index = index_copy(tmp_path_factory, "login-lock")  # its own throttle (one per index and process)
    monkeypatch.setenv(INDEX_ENV, str(index))
    monkeypatch.setenv(auth.PASSWORD_ENV, "correct horse battery staple")
    at = new_app().run()
    at.text_input[0].input("mallory")
    for i in range(6):
        at.text_input[1].input(f"guess {i}")
        at.form_submit_button[0].click().run()
        assert at.error
    assert "Too many failed sign-ins: try again in" in at.error[0].value
    at.text_input[1].input("correct horse battery staple")
    at.form_submit_button[0].click().run()
    assert at.error and "Too many failed sign-ins: try again in" in at.error[0].value, "refused while locked"
    assert not any(t.value == "Search echoes" for t in at.title) and "actor" not in at.session_state
    assert log_rows(index, "login_failed").height == 5 and log_rows(index, "login").height == 0
    assert log_rows(index, "login_locked").height == 2, "every refusal is logged"
    # a restarted server rebuilds the lock from the access log
    wait = auth.login_guard(LocalAppIndex(index)).retry_after("mallory")
    assert 0 < wait <= 60


def test_app_refuses_a_network_address_without_login(app_env: Path) -> None:
    from streamlit import config

    config.set_option("server.address", "0.0.0.0")
    at = new_app().run()
    assert at.error and "no login is configured" in at.error[0].value
    assert not at.title


# ---- data access -----------------------------------------------------------------------------------------
def test_one_process_reads_and_writes_concurrently(index_dir: Path) -> None:
    app = LocalAppIndex(index_dir)  # a second index in this process shares the DuckDB instance
    before = app.access_log(10**6).height
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                app.log(f"user{i}", "search", {"j": j})
                assert app.patients().height == 6
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert app.access_log(10**6).height == before + 40
    with pytest.raises(Exception, match="decision"):
        app.record_decision(1, "maybe", "tester")


def test_previews_are_cached_atomically_with_a_gif_fallback(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from echosearch.ingest import previews

    with Catalog.open(index_dir) as cat:
        counts = previews.make_previews(index_dir, [1, 2], catalog=cat)
        again = previews.make_previews(index_dir, [1, 2], catalog=cat)
        assert counts["made"] + counts["cached"] == 2 and again["cached"] == 2
        p = previews.cached_preview(index_dir, 1)
        assert p is not None and p.media == "video" and p.path.read_bytes()[4:8] == b"ftyp"
        monkeypatch.setattr(previews, "has_h264", lambda: False)
        gif = previews.make_previews(index_dir, [3], catalog=cat, overwrite=True)
    assert gif["made"] == 1 and (index_dir / "previews" / "3.gif").read_bytes()[:6] == b"GIF89a"
    assert not [f for f in (index_dir / "previews").iterdir() if f.name.startswith(".")], "no temporary files left"


# ---- serve and safety ------------------------------------------------------------------------------------
def test_loopback_and_auth_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("10.1.2.3")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(SERVER_ENV, raising=False)  # the catalog opened in the test process
    assert auth.check_serve_safety("127.0.0.1") == "none"
    with pytest.raises(ConfigError, match="without authentication"):
        auth.check_serve_safety("0.0.0.0")
    monkeypatch.setenv(auth.PASSWORD_ENV, "s3cret-s3cret")
    assert auth.check_serve_safety("0.0.0.0") == "password"
    assert auth.check_password("s3cret-s3cret") and not auth.check_password("s3cret")
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text('[auth]\nredirect_uri = "x"\n')
    assert auth.auth_mode() == "oidc"


def test_serve_command(index_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(SERVER_ENV, raising=False)  # the catalog opened in the test process
    assert main(["serve", "--index", str(index_dir), "--port", "8599", "--dry-run"]) == 0
    server, cmd = capsys.readouterr().out.splitlines()
    assert "--server.address 127.0.0.1" in cmd and "--server.headless true" in cmd
    assert f"-- --index {index_dir.resolve()}" in cmd and str(MAIN) in cmd
    assert server.startswith("server: ") and f"server --index {index_dir.resolve()} --host 127.0.0.1 --port 0" in server
    assert main(["serve", "--index", str(index_dir), "--host", "0.0.0.0", "--dry-run"]) == ConfigError.exit_code
    assert "without authentication" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path / "nothing"), "--dry-run"]) == 3


def test_report_text_is_shown_as_plain_text(tmp_path_factory: pytest.TempPathFactory,
                                            monkeypatch: pytest.MonkeyPatch, loopback: None) -> None:
    index = index_copy(tmp_path_factory, "reports-html")
    payload = "<img src=x onerror=alert(1)> **LV** [see](http://evil.example) :red[alarm]."
    with Catalog.open(index) as cat:
        cat.con.execute("UPDATE reports SET text = ? || ' ' || text", [payload])
    monkeypatch.setenv(INDEX_ENV, str(index))
    monkeypatch.delenv(auth.PASSWORD_ENV, raising=False)
    monkeypatch.delenv(SERVER_ENV, raising=False)  # the catalog opened in the test process
    monkeypatch.setenv(auth.USER_ENV, "tester")
    at = new_app().run()
    at.text_input[0].input("SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.")
    at.form_submit_button[0].click().run()
    ok(at)
    shown = [t.value for t in at.text]  # type: ignore[attr-defined]
    assert any(payload in v for v in shown if v.startswith("•")), "nearest report sentences, verbatim"
    assert any(payload in v for v in shown if v.startswith("Report: ")), "each result's report, verbatim"
    rendered = [m.value for m in [*at.markdown, *at.caption]]  # type: ignore[attr-defined]
    assert not any(part in v for v in rendered for part in ("<img", "evil.example", "**LV**", ":red[alarm]"))
