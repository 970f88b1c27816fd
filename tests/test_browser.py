"""``echosearch serve`` in a real browser: headless Chromium loads the app, runs a linked search, plays clips.

Streamlit renders over a websocket after the page has loaded, so Chromium's one-shot ``--dump-dom`` /
``--screenshot`` with ``--virtual-time-budget`` stop before the app has drawn anything (virtual time runs
out while the script is still running). Chromium is therefore driven over the DevTools protocol (through
the ``websockets`` package, a Streamlit dependency): load, wait for the text, then screenshot and DOM.
Run ``python tests/test_browser.py --index DIR --out DIR`` to screenshot every page of a running index.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900", "--autoplay-policy=no-user-gesture-required"]
RUNNING = "document.querySelector('[data-testid=\"stStatusWidgetRunningIcon\"]') !== null"


def chromium_exe() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, exe: str, profile: Path, timeout: float = 60) -> None:
        from websockets.sync.client import connect

        port = free_port()
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      f"--remote-debugging-port={port}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        pages: list[dict[str, Any]] = []
        while not pages:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            try:
                pages = [t for t in _get_json(f"http://127.0.0.1:{port}/json/list") if t.get("type") == "page"]
            except OSError:
                time.sleep(0.2)
        self._conn = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
        self.ws = self._conn.__enter__()
        self._id = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def js(self, expr: str) -> Any:
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def load(self, url: str, wait_for: str, timeout: float = 120) -> str:
        """Open ``url`` and wait until the app finished running and its text contains ``wait_for``."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            time.sleep(0.5)
            text = str(self.js("document.body ? document.body.innerText : ''") or "")
            if wait_for in text and not self.js(RUNNING):
                self.js("Promise.all([...document.querySelectorAll('video')].map(v => v.play().catch(() => 0)))")
                time.sleep(1.5)  # let clips and charts draw
                return text
        raise AssertionError(f"{url}: {wait_for!r} did not appear within {timeout} s; page text: {text[:500]!r}")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            h = int(self.js("document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight || 900") or 900)
            self.call("Emulation.setDeviceMetricsOverride", width=1280, height=max(900, min(h + 80, 6000)),
                      deviceScaleFactor=1, mobile=False)
            time.sleep(1.0)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        if full_page:
            self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        return path

    def dom(self) -> str:
        return str(self.js("document.documentElement.outerHTML"))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()


def start_server(index: Path, log_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``echosearch serve`` on a free loopback port; returns (process, base URL) once healthy."""
    port = free_port()
    full_env = {**os.environ, "ECHOSEARCH_APP_USER": "browser-test", **(env or {})}
    full_env.pop("ECHOSEARCH_APP_PASSWORD", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "echosearch", "serve", "--index", str(index), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"echosearch serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    stop(proc)
    raise AssertionError("the app did not become healthy within 90 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on a private copy of the test index (see test_app.py), on a free loopback port."""
    if chromium_exe() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    from test_app import index_copy

    index = index_copy(tmp_path_factory, "browser")
    proc, url = start_server(index, tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    exe = chromium_exe()
    assert exe is not None
    b = Chromium(exe, tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


def test_search_page_loads_in_chromium(server: str, browser: Chromium, tmp_path: Path) -> None:
    text = browser.load(server + "/", "Findings to look for")
    shot = browser.screenshot(tmp_path / "search.png")
    assert shot.stat().st_size > 20_000, "a rendered, non-blank screenshot"
    assert "Search echoes" in text
    for page in ("Patient timeline", "Identity audit", "Index status"):
        assert page in text, f"navigation offers {page}"
    assert "echosearch" in browser.dom()


def test_linked_text_search_plays_clips_in_chromium(server: str, browser: Chromium, tmp_path: Path) -> None:
    query = urllib.parse.quote("SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.")
    text = browser.load(f"{server}/?q={query}", "most like", timeout=180)
    assert "Preliminary reading" in text or "Nearest reports in this archive" in text
    browser.screenshot(tmp_path / "results.png")
    n_videos = browser.js("document.querySelectorAll('video').length")
    assert n_videos >= 4, "results are clips"
    playing = browser.js("[...document.querySelectorAll('video')].filter(v => v.readyState >= 2 && !v.error).length")
    assert playing >= 1, "Chromium decodes the H.264 previews"
    srcs = browser.js("[...document.querySelectorAll('video, img')].map(e => e.currentSrc || e.src)")
    clip_srcs = [s for s in srcs if s.startswith("data:video/") or "/media/" in s]
    assert len(clip_srcs) >= 4 and all(s.startswith("data:video/mp4;base64,") for s in clip_srcs), \
        "clips are inline data: URIs"
    fetched = browser.js("performance.getEntriesByType('resource').map(e => e.name)")
    media = re.compile(r"(?<!/static)/media/")  # Streamlit's media endpoint, not its bundled fonts
    assert not media.search(browser.dom()) and not [u for u in fetched if media.search(urllib.parse.urlsplit(u).path)], \
        "no clip is served from Streamlit's session-less /media/ endpoint"


# ---- trust: scope, "no close match", never-stale results, shareable URLs, 1024 px, nothing from outside -----
def _narrow(browser: Chromium, width: int = 1024) -> None:
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=800, deviceScaleFactor=1, mobile=False)


def _truncated_buttons(browser: Chromium) -> list[str]:
    """Labels of visible buttons whose text does not fit (shown as "Mor...")."""
    return browser.js("[...document.querySelectorAll('[data-testid=\"stBaseButton-secondary\"], "
                      "[data-testid=\"stBaseButton-primary\"]')].filter(b => b.offsetParent && "
                      "[...b.querySelectorAll('p, span, div')].some(e => e.scrollWidth > e.clientWidth + 1))"
                      ".map(b => b.innerText)") or []


def test_nonsense_link_says_no_close_match_at_1024px_with_nothing_from_outside(server: str, browser: Chromium) -> None:
    _narrow(browser)
    text = browser.load(f"{server}/?q={urllib.parse.quote('xyzzy banana')}", "No close match", timeout=240)
    assert "most like “xyzzy banana”" in text and "Preliminary reading" not in text
    assert not _truncated_buttons(browser), "buttons keep their labels at 1024 px"
    origin = urllib.parse.urlsplit(server).netloc
    fetched = browser.js("performance.getEntriesByType('resource').map(e => e.name)") or []
    outside = [u for u in fetched if urllib.parse.urlsplit(u).scheme in ("http", "https", "ws", "wss")
               and urllib.parse.urlsplit(u).netloc != origin]
    icons = browser.js("[...document.querySelectorAll('link[rel*=icon]')].map(l => l.href)") or []
    outside += [u for u in icons if urllib.parse.urlsplit(u).scheme in ("http", "https")
                and urllib.parse.urlsplit(u).netloc != origin]
    assert not outside, f"fetched from outside the server: {outside}"


def test_a_shared_url_restores_query_and_filters_and_a_changed_filter_reruns(server: str, browser: Chromium) -> None:
    query = "SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION."
    text = browser.load(f"{server}/?q={urllib.parse.quote(query)}&view=A4C", "most like", timeout=240)
    heading = next(line for line in text.splitlines() if "most like" in line)
    assert query in heading and "view A4C" in heading, heading
    assert "q=" in (browser.js("location.search") or ""), "the URL keeps the query"
    # switch "Show" from clips to studies: the search re-runs under the new setting
    browser.js("[...document.querySelectorAll('[data-testid=\"stRadio\"] label')].find(l => "
               "l.innerText.trim() === 'studies').click()")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.5)
        text = str(browser.js("document.body.innerText") or "")
        if "studies most like" in text and not browser.js(RUNNING):
            break
    else:
        raise AssertionError(f"results were not re-run for studies: {text[:400]!r}")
    assert "clips most like" not in text, "no stale clip results under the new setting"
    assert "level=study" in (browser.js("location.search") or "")


def test_a_non_echo_upload_warns_in_chromium(server: str, browser: Chromium) -> None:
    from conftest import REAL_DICOM

    thyroid = REAL_DICOM / "Acuson_thyroid_YBR_FULL_RLE.dcm"
    if not thyroid.is_file():
        pytest.skip(f"missing {thyroid}")
    browser.load(server + "/", "Findings to look for")
    browser.js("[...document.querySelectorAll('[role=tab]')].find(t => t.innerText.includes('Upload')).click()")
    time.sleep(1)
    root = browser.call("DOM.getDocument", depth=-1)["root"]["nodeId"]
    node = browser.call("DOM.querySelector", nodeId=root, selector="input[type=file]")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(thyroid)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not browser.js(
            "[...document.querySelectorAll('button')].some(b => b.innerText.includes('Find similar'))"):
        time.sleep(0.5)
    browser.js("[...document.querySelectorAll('button')].find(b => b.innerText.includes('Find similar')).click()")
    deadline = time.monotonic() + 180
    text = ""
    while time.monotonic() < deadline:
        time.sleep(0.5)
        text = str(browser.js("document.querySelector('[data-testid=\"stMain\"]')?.innerText") or "")
        if "does not look like an echocardiogram" in text and not browser.js(RUNNING):
            break
    else:
        raise AssertionError(f"no out-of-scope warning: {text[:600]!r}")
    assert "Preliminary reading" not in text and "Predicted EF (model estimate)" not in text


# ---- screenshots of every page (manual check) -----------------------------------------------------------
PAGES = [("search", "/?q=" + urllib.parse.quote("SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION."), "most like"),
         ("patient", "/patient", "Compare two visits"), ("audit", "/audit?show=all", "Suspect studies"),
         ("index", "/index_status", "Access log")]


def screenshot_pages(index: Path, out: Path) -> list[Path]:
    """Serve ``index`` and save a full-page screenshot of every page under ``out``."""
    exe = chromium_exe()
    if exe is None:
        raise SystemExit("chromium is not installed")
    out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(index, out / "serve.log")
    shots = []
    b = Chromium(exe, out / "profile")
    try:
        for name, path, wait in PAGES:
            b.load(url + path, wait, timeout=240)
            shots.append(b.screenshot(out / f"{name}.png", full_page=True))
    finally:
        b.close()
        stop(proc)
        shutil.rmtree(out / "profile", ignore_errors=True)
    return shots


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="screenshot every page of the app")
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "echosearch-screens")
    a = ap.parse_args()
    for p in screenshot_pages(a.index, a.out):
        print(p)
