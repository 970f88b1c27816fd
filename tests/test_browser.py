"""``echosearch serve`` in a real browser: headless Chromium loads the app and runs a linked search."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_app import index_copy

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"echosearch serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the app did not become healthy within {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``echosearch serve`` on a private copy of the test index, on a free loopback port."""
    chromium()
    index = index_copy(tmp_path_factory, "browser")
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("wb")
    env = {**os.environ, "ECHOSEARCH_APP_USER": "browser-test"}
    env.pop("ECHOSEARCH_APP_PASSWORD", None)
    proc = subprocess.Popen([sys.executable, "-m", "echosearch", "serve", "--index", str(index), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def browse(url: str, profile: Path, *extra: str, budget_ms: int = 30000, timeout: float = 150) -> str:
    """Run headless Chromium once on ``url``; returns stdout (the DOM with ``--dump-dom``)."""
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *extra, url]
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    return out.stdout.decode("utf-8", "replace")


def test_search_page_loads_in_chromium(server: str, tmp_path: Path) -> None:
    shot = tmp_path / "search.png"
    browse(server + "/", tmp_path / "profile", f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000, "a rendered (non-blank) screenshot"
    dom = browse(server + "/", tmp_path / "profile")
    assert "Search echoes" in dom and "Findings to look for" in dom
    assert "Patient timeline" in dom and "Identity audit" in dom, "navigation to every page"


def test_linked_text_search_plays_clips_in_chromium(server: str, tmp_path: Path) -> None:
    url = server + "/?q=" + urllib.request.quote("SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.")
    dom = browse(url, tmp_path / "profile", budget_ms=60000)
    assert "most like" in dom, "the linked search ran"
    assert "<video" in dom, "results are playable clips"
