"""``echosearch server``: a real uvicorn process on a free loopback port, its clients, ingest while searching,
authentication, and a kill -9 in the middle of an ingest job.

Two tiny synthetic cohorts (3 patients each, the shipped demo model, 8 frames per clip): cohort A is indexed
once per module and copied per test; cohort B arrives through the server while clients search.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import demo_model_available

from echosearch.serve.client import ServerClient, connect, recorded_server
from echosearch.serve.run import ADDRESS_FILE

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="the shipped demo model is missing")

ENV = {"ECHOSEARCH_WORKERS": "0", "ECHOSEARCH_FRAMES_PER_VIDEO": "8", "ECHOSEARCH_BATCH_SIZE": "8",
       "ECHOSEARCH_DEVICE": "cpu", "ECHOSEARCH_MODEL": "echosearch-demo"}
CLEARED = ("ECHOSEARCH_API_TOKEN", "ECHOSEARCH_APP_PASSWORD", "ECHOSEARCH_SERVER", "ECHOSEARCH_FAULT_KILL_AFTER_COMMITS")
QUERY = "severely reduced left ventricular systolic function"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return out | ENV | extra


@pytest.fixture(autouse=True)
def _settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in CLEARED:
        monkeypatch.delenv(k, raising=False)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(cohort A, cohort B, an index of cohort A)."""
    from echosearch.config import load_settings
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    base = tmp_path_factory.mktemp("server")
    a, b = base / "cohort-a", base / "cohort-b"
    generate_cohort(a, patients=3, seed=21, visits=(2, 2), views=("A4C", "PLAX"))
    generate_cohort(b, patients=3, seed=22, visits=(2, 2), views=("A4C", "PLAX"))
    settings = load_settings(workers=0, frames_per_video=8, batch_size=8, device="cpu", model="echosearch-demo")
    index_sources([a], base / "index-a", settings, reports=a / "reports.csv", progress=False)
    return a, b, base / "index-a"


@pytest.fixture
def index(cohorts: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    dest = tmp_path / "index"
    shutil.copytree(cohorts[2], dest)
    return dest


def n_files(cohort: Path) -> int:
    return len(list(cohort.rglob("*.dcm")))


def start(index: Path, log: Path, *extra: str, **env_extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``echosearch server`` on a free loopback port; returns (process, URL) once its health route answers."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "echosearch", "server", "--index", str(index), "--port",
                                 str(port), *extra], stdout=out, stderr=subprocess.STDOUT, env=env(**env_extra))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if recorded_server(index) is not None:
            return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.2)
    stop(proc)
    raise AssertionError("the server did not become healthy within 120 s")


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM by process id (SIGKILL after 30 s); returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@pytest.fixture
def server(index: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc, url = start(index, tmp_path / "server.log")
    yield proc, url
    stop(proc)


def cli(*args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "echosearch", *args], capture_output=True, text=True,
                          env=env(**env_extra), timeout=300)


def catalog_facts(index: Path) -> dict[str, int]:
    """Row counts straight from the catalog (the server must be stopped)."""
    from echosearch.catalog import Catalog

    with Catalog.open(index, read_only=True) as cat:
        return {name: int(cat.one(sql)[0]) for name, sql in {  # type: ignore[index]
            "videos": "SELECT count(*) FROM videos", "distinct_files": "SELECT count(DISTINCT sha256) FROM videos",
            "unencoded": "SELECT count(*) FROM videos WHERE encoded_at IS NULL",
            "video_embeddings": "SELECT count(*) FROM video_embeddings",
            "studies": "SELECT count(*) FROM studies", "study_embeddings": "SELECT count(*) FROM study_embeddings",
            "patients": "SELECT count(*) FROM patients"}.items()}


def test_index_through_the_server_while_searching(cohorts: tuple[Path, Path, Path], index: Path,
                                                  server: tuple[subprocess.Popen[bytes], str], tmp_path: Path) -> None:
    """`echosearch index` reaches the running server (no lock error) and encodes cohort B as a job while a client
    searches: every search answers, the searchable count only grows and reaches A + B, and the final ranking
    equals a direct search of the same catalog once the server has stopped."""
    a, b, _ = cohorts
    proc, url = server
    n_a, n_b = n_files(a), n_files(b)
    with open(tmp_path / "index.out", "w") as out:
        indexer = subprocess.Popen([sys.executable, "-m", "echosearch", "index", str(b), "--index", str(index),
                                    "--reports", str(b / "reports.csv"), "--json"], stdout=out,
                                   stderr=subprocess.STDOUT, env=env())
    seen: list[int] = []
    client = connect(index)
    assert client is not None and client.url == url
    with client:
        while indexer.poll() is None or not seen or seen[-1] < n_a + n_b:
            got = client.search({"text": QUERY, "k": 5, "context": 0})
            assert got["results"], got
            scores = [r["score"] for r in got["results"]]
            assert scores == sorted(scores, reverse=True)
            seen.append(got["n_available"])
            assert len(seen) < 2000, "the searchable count never reached A + B"
        final = client.search({"text": QUERY, "k": 8, "level": "video"})
        job = client.call("GET", "/v1/jobs")["jobs"][-1]
    assert indexer.wait(timeout=60) == 0, (tmp_path / "index.out").read_text()
    summary = json.loads((tmp_path / "index.out").read_text()[(tmp_path / "index.out").read_text().index("{"):])
    assert summary["videos_encoded"] == n_b and summary["job_id"] == job["job_id"]
    assert seen == sorted(seen) and seen[0] >= n_a and seen[-1] == n_a + n_b
    assert final["n_available"] == n_a + n_b
    assert stop(proc) == 0
    assert not (index / ADDRESS_FILE).exists()  # removed on a clean exit
    from echosearch.query import Searcher

    with Searcher(index) as s:
        local = s.by_text(QUERY, 8, "video")
    assert [r["video_key"] for r in final["results"]] == local["video_key"].to_list()
    facts = catalog_facts(index)
    assert facts["videos"] == facts["distinct_files"] == facts["video_embeddings"] == n_a + n_b
    assert facts["unencoded"] == 0 and facts["studies"] == facts["study_embeddings"]


def test_cli_read_commands_go_through_the_server(index: Path, server: tuple[subprocess.Popen[bytes], str]) -> None:
    """While the server holds the catalog, `search`, `info` and `match` answer through it (a direct open would
    fail on DuckDB's lock); `--server URL` names a server explicitly."""
    _, url = server
    r = cli("search", "--index", str(index), "--text", QUERY, "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["results"]) == 3
    r = cli("info", "--index", str(index), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["counts"]["videos"] > 0 and "jobs" in info
    study = ServerClient(url).search({"text": QUERY, "k": 1, "level": "study"})["results"][0]["study_uid"]
    r = cli("match", "--index", str(index), "--study", study, "--json", "--server", url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["candidates"]
    from echosearch.catalog import Catalog
    from echosearch.errors import CatalogError

    with pytest.raises(CatalogError, match="another process"):
        Catalog.open(index, read_only=True)


def test_exposed_server_needs_credentials(index: Path, tmp_path: Path) -> None:
    """A non-loopback address without credentials is refused before anything listens; with a token configured,
    requests without it or with a wrong one are refused (a wrong one is logged), the token is accepted."""
    r = cli("server", "--index", str(index), "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and "without authentication" in r.stderr
    token = "t0ken-for-the-test-0123456789"
    proc, url = start(index, tmp_path / "auth.log", ECHOSEARCH_API_TOKEN=token)
    try:
        import httpx

        assert httpx.get(url + "/v1/health").json()["auth_required"] is True
        assert httpx.get(url + "/v1/info").status_code == 401
        assert httpx.get(url + "/v1/info", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        ok = httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json()["counts"]["videos"] > 0
        r = cli("info", "--index", str(index), "--json")  # the CLI without the token is refused, clearly
        assert r.returncode == 2 and "refused" in r.stderr
        r = cli("info", "--index", str(index), "--json", ECHOSEARCH_API_TOKEN=token)
        assert r.returncode == 0, r.stderr
    finally:
        stop(proc)
    from echosearch.catalog import Catalog

    with Catalog.open(index, read_only=True) as cat:
        failed = cat.access_events(("login_failed",), __import__("datetime").datetime(2000, 1, 1))
    assert len(failed) == 1  # the wrong token (no credentials at all is not a sign-in attempt)
    assert json.loads(failed[0][3]) == {"method": "api-token", "client": "127.0.0.1"}


def test_kill_9_mid_ingest_then_restart_leaves_no_duplicates(cohorts: tuple[Path, Path, Path], index: Path,
                                                             tmp_path: Path) -> None:
    """kill -9 of the server while its job encodes cohort B: the address file is detected as stale, the restarted
    server finishes what was recorded, a resubmitted job adds the rest, and every file is one video with one
    vector."""
    a, b, _ = cohorts
    n_a, n_b = n_files(a), n_files(b)
    log = tmp_path / "server.log"
    proc, url = start(index, log)
    client = ServerClient(url)
    job = client.submit_job([b], b / "reports.csv")
    deadline = time.monotonic() + 120
    while client.job(job["job_id"])["videos_encoded"] < 2:
        assert time.monotonic() < deadline and client.job(job["job_id"])["state"] != "failed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    client.close()
    assert (index / ADDRESS_FILE).exists() and recorded_server(index) is None  # stale: its process is gone
    facts = catalog_facts(index)
    assert n_a < facts["videos"] <= n_a + n_b and facts["unencoded"] < facts["videos"]
    proc, url = start(index, log)
    try:
        with ServerClient(url) as client:
            again = client.wait_job(client.submit_job([b], b / "reports.csv")["job_id"])
            assert again["state"] == "done", again
            assert client.search({"text": QUERY, "k": 3})["n_available"] == n_a + n_b
    finally:
        assert stop(proc) == 0
    facts = catalog_facts(index)
    assert facts["videos"] == facts["distinct_files"] == facts["video_embeddings"] == n_a + n_b
    assert facts["unencoded"] == 0 and facts["studies"] == facts["study_embeddings"]


def test_dicom_receiver_in_the_server_feeds_its_ingest_jobs(cohorts: tuple[Path, Path, Path], index: Path,
                                                            tmp_path: Path) -> None:
    """`server --dicom-port 0`: a study sent by C-STORE is acknowledged, indexed by a job of the server and
    searchable through its API."""
    import pydicom
    from pynetdicom import AE

    _, b, _ = cohorts
    study = sorted({f.parent for f in b.rglob("*.dcm")})[0]
    files = sorted(study.glob("*.dcm"))
    proc, url = start(index, tmp_path / "server.log", "--dicom-port", "0")
    try:
        dicom = json.loads((index / ADDRESS_FILE).read_text())["dicom"]
        with ServerClient(url) as client:
            before = client.search({"text": QUERY, "k": 1})["n_available"]
            for f in files:
                ds = pydicom.dcmread(f)
                scu = AE(ae_title="MODALITY")
                scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
                assoc = scu.associate("127.0.0.1", dicom["port"], ae_title=dicom["ae_title"])
                assert assoc.is_established
                try:
                    assert assoc.send_c_store(ds).Status == 0x0000
                finally:
                    assoc.release()
            deadline = time.monotonic() + 120
            while client.search({"text": QUERY, "k": 1})["n_available"] < before + len(files):
                assert time.monotonic() < deadline, "received clips did not become searchable within 120 s"
                time.sleep(0.5)
            jobs = client.call("GET", "/v1/jobs")["jobs"]
            while any(j["state"] in ("queued", "running") for j in jobs):  # searchable before the job's last step
                assert time.monotonic() < deadline
                time.sleep(0.5)
                jobs = client.call("GET", "/v1/jobs")["jobs"]
            assert jobs and all(j["state"] == "done" and j["failed"] == 0 for j in jobs)
            assert sum(j["summary"]["scan"]["videos_added"] for j in jobs) == len(files)
    finally:
        assert stop(proc) == 0


# ---- the app as a client of the server -----------------------------------------------------------------------
def _app_test(index: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> object:
    """The app (AppTest, in this process) pointed at the server, on loopback, no login."""
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ECHOSEARCH_INDEX", str(index))
    monkeypatch.setenv("ECHOSEARCH_SERVER", url)
    monkeypatch.setenv("ECHOSEARCH_APP_USER", "dr app")
    config.set_option("server.address", "127.0.0.1")  # restored by the caller
    return AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"), default_timeout=240)


def _no_errors(at: object) -> None:
    assert not at.exception, [e.value for e in at.exception]  # type: ignore[attr-defined]
    assert not at.error, [e.value for e in at.error]  # type: ignore[attr-defined]


def test_the_app_reads_through_the_server_while_it_indexes(cohorts: tuple[Path, Path, Path], index: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The remote AppIndex answers the pages' data calls while an ingest job writes (a direct open would fail on
    the lock), the search page runs in the app against it, and once the job is done every call returns what the
    local AppIndex returns on the same catalog after the server has stopped."""
    from polars.testing import assert_frame_equal
    from streamlit import config

    from echosearch.appcore.data import LocalAppIndex
    from echosearch.appcore.remote import RemoteAppIndex
    from echosearch.appcore.search import SearchRequest

    _, b, _ = cohorts
    proc, url = start(index, tmp_path / "server.log")
    old_address = config.get_option("server.address")
    try:
        remote = RemoteAppIndex(url, index)
        with ServerClient(url) as client:
            job = client.submit_job([b], b / "reports.csv")
            rounds, counts, during = 0, [], 0
            while (state := client.job(job["job_id"])["state"]) in ("queued", "running") or rounds == 0:
                during += state in ("queued", "running")
                pts = remote.patients()
                counts.append(pts.height)
                key = int(pts.filter(pts["n_studies"] > 1)["patient_key"][0])
                assert remote.patient_timeline(key).height >= 2
                assert remote.search(SearchRequest("text", k=5, text=QUERY)).hits.height
                assert remote.filter_options()["views"]
                rounds += 1
            assert client.wait_job(job["job_id"])["state"] == "done"
        assert counts == sorted(counts) and during >= 1, "the pages' calls answered while the job wrote"
        at = _app_test(index, url, monkeypatch).run()  # type: ignore[attr-defined]
        _no_errors(at)
        assert any("through its server" in c.value for c in at.sidebar.caption)
        at.text_input(key="f_text").input(QUERY)
        at.form_submit_button[0].click().run()
        _no_errors(at)
        assert any("most like" in s.value for s in at.subheader)
        assert [h for h in at.html if 'src="data:video' in h.value or 'src="data:image' in h.value], "clips via HTTP"
        assert remote.run_audit() is not None
        audited = remote.audit_results(suspects_only=False)
        study = int(audited["study_key"][0])
        remote.record_decision(study, "dismissed", "dr remote", "checked")
        remote.log("dr remote", "view_patient", {"patient_key": key})
        pts = remote.patients()
        assert pts.height == 6  # cohorts A and B
        key = int(pts.filter(pts["n_studies"] > 1)["patient_key"][0])
        req = SearchRequest("text", k=8, text=QUERY, context=0.0)
        got = {"patients": pts, "timeline": remote.patient_timeline(key), "audit": remote.audit_results(False),
               "run": remote.audit_run(), "decisions": remote.decisions(study),
               "videos": remote.study_videos([study]), "info": remote.study_info([study]),
               "reports": remote.reports([study]), "errors": remote.ingest_errors(),
               "calibrations": remote.calibrations(), "search": remote.search(req), "form": remote.filter_options(),
               "clip": remote.clip(int(remote.study_videos([study])["video_key"][0]))}
        remote.close()
    finally:
        config.set_option("server.address", old_address)
        assert stop(proc) == 0
    local = LocalAppIndex(index)
    try:
        assert_frame_equal(got["patients"], local.patients())
        assert_frame_equal(got["timeline"], local.patient_timeline(key))
        assert_frame_equal(got["audit"], local.audit_results(False))
        assert got["run"] == local.audit_run()
        assert_frame_equal(got["decisions"], local.decisions(study))
        assert got["decisions"]["reviewer"].to_list() == ["dr remote"]
        for name, fn in (("videos", local.study_videos), ("info", local.study_info), ("reports", local.reports)):
            assert_frame_equal(got[name], fn([study]))
        assert_frame_equal(got["errors"], local.ingest_errors())
        assert_frame_equal(got["calibrations"], local.calibrations())
        form = local.filter_options()
        assert_frame_equal(got["form"].pop("patients"), form.pop("patients"))
        assert got["form"] == form
        mine = local.search(req)
        assert got["search"].hits["video_key"].to_list() == mine.hits["video_key"].to_list()
        assert got["search"].hits["score"].to_list() == pytest.approx(mine.hits["score"].to_list(), abs=1e-5)
        assert got["search"].no_match == mine.no_match
        assert got["clip"][1].startswith(("video/", "image/")) and got["clip"][0] == local.clip(
            int(got["videos"]["video_key"][0]))[0]
        log = local.access_log(10**6)
        actors = log.filter(log["action"].is_in(["view_patient", "search", "audit_decision"]))
        assert set(actors["actor"]) <= {"dr app", "dr remote"}, "app reads are logged by the app, for its user"
        assert log.filter((log["action"] == "view_patient") & (log["actor"] == "dr remote")).height == 1
    finally:
        local.close()


def test_serve_starts_a_server_and_the_app_and_stops_both(index: Path, tmp_path: Path) -> None:
    """`echosearch serve` starts `echosearch server` for the index (recorded in server.json) and the app; SIGTERM
    of `serve` stops both: the server's address file is removed and neither port answers."""
    import urllib.request

    port = free_port()
    with (tmp_path / "serve.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "echosearch", "serve", "--index", str(index), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env())
    app_url = f"http://127.0.0.1:{port}/_stcore/health"
    try:
        deadline, record, healthy = time.monotonic() + 180, None, False
        while not (record and healthy):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "serve did not bring up the server and the app within 180 s"
            time.sleep(0.5)
            record = recorded_server(index)
            try:
                with urllib.request.urlopen(app_url, timeout=2) as r:
                    healthy = r.status == 200
            except OSError:
                healthy = False
        assert record is not None and record["pid"] != proc.pid and record["host"] == "127.0.0.1"
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert not (index / ADDRESS_FILE).exists() and recorded_server(index) is None
    with pytest.raises(OSError):
        urllib.request.urlopen(app_url, timeout=2)
    with pytest.raises(ProcessLookupError):
        os.kill(int(record["pid"]), 0)
