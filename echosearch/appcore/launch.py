"""``echosearch serve``: the server that owns the index, and the Streamlit app as its client.

:func:`serve_app` reuses the server recorded for the index (``server.json``, checked alive) or starts
``echosearch server`` on a free loopback port in a child process, waits until it answers, then starts
``streamlit run app/main.py`` with ``ECHOSEARCH_SERVER`` naming that server. It supervises both: SIGINT or
SIGTERM stops the app and the server it started (a reused server is left running), and when either child
ends the other is stopped and its exit status is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from echosearch.errors import CatalogError, ConfigError

INDEX_ENV = "ECHOSEARCH_INDEX"
SERVER_START_S = 180.0  # a fresh server loads the catalog (and migrates it) before it answers
STOP_S = 30.0


def app_script() -> Path:
    """``ECHOSEARCH_APP_DIR/main.py``, else ``app/main.py`` of this checkout (beside the package), else the copy
    a wheel ships inside the package (``echosearch/app``, see setup.py)."""
    override = os.environ.get("ECHOSEARCH_APP_DIR")
    candidates = [Path(override)] if override else []
    package = Path(__file__).resolve().parents[1]
    candidates += [package.parent / "app", package / "app"]
    for folder in candidates:
        if (folder / "main.py").is_file():
            return folder / "main.py"
    raise ConfigError("the Streamlit app (app/main.py) was not found beside the echosearch package; run from a "
                      "source checkout or set ECHOSEARCH_APP_DIR")


def index_from_argv(argv: list[str]) -> Path | None:
    """``--index DIR`` from the script arguments (``streamlit run app/main.py -- --index DIR``)."""
    for i, arg in enumerate(argv):
        if arg == "--index" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--index="):
            return Path(arg.split("=", 1)[1])
    return None


def resolve_index(argv: list[str]) -> Path:
    """Index folder: script argument, else ``ECHOSEARCH_INDEX``, else the configured default."""
    from_args = index_from_argv(argv)
    if from_args is not None:
        return from_args
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV])
    from echosearch.config import load_settings

    return load_settings().index


def streamlit_command(script: Path, index: Path, host: str, port: int, base_url_path: str | None = None) -> list[str]:
    """The ``streamlit run`` command line (headless, explicit address, no usage statistics)."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(script),
           "--server.headless", "true", "--server.address", host, "--server.port", str(port),
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--global.showWarningOnDirectExecution", "false", "--client.toolbarMode", "viewer"]
    if base_url_path:
        cmd += ["--server.baseUrlPath", base_url_path]
    return cmd + ["--", "--index", str(index)]


def server_command(index: Path, port: int = 0) -> list[str]:
    """``echosearch server`` for the app: loopback only (the app is its one client), any free port."""
    return [sys.executable, "-m", "echosearch", "server", "--index", str(index), "--host", "127.0.0.1",
            "--port", str(port)]


@dataclass
class Plan:
    """What ``serve`` will run: the server to reuse (URL) or to start (command), and the app's command."""

    index: Path
    app: list[str]
    auth: str
    server_url: str | None = None
    server: list[str] | None = None


def plan(index: Path, host: str, port: int, base_url_path: str | None = None) -> Plan:
    """Check the index and the login rules; find a running server for the index or plan one."""
    from echosearch.appcore.auth import check_serve_safety
    from echosearch.errors import IndexNotFoundError
    from echosearch.serve.client import recorded_server
    from echosearch.store.schema import CATALOG_FILE

    index = Path(index).resolve()
    if not (index / CATALOG_FILE).is_file():
        raise IndexNotFoundError(f"no index at {index} (missing {CATALOG_FILE}); run `echosearch index` first")
    script = app_script()
    mode = check_serve_safety(host, script.parent)
    running = recorded_server(index)
    app = streamlit_command(script, index, host, port, base_url_path)
    if running is not None:
        return Plan(index, app, mode, server_url=str(running["url"]))
    return Plan(index, app, mode, server=server_command(index))


def _stop(proc: subprocess.Popen[bytes], timeout: float = STOP_S) -> int:
    """SIGTERM a child by its process id, SIGKILL after ``timeout`` s; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def start_server(p: Plan, cancelled: Callable[[], bool] = lambda: False) -> tuple[subprocess.Popen[bytes], str]:
    """Start the planned server and wait until it answers for the index (or ``cancelled()``); (process, URL)."""
    from echosearch.serve.client import recorded_server

    assert p.server is not None
    proc = subprocess.Popen(p.server)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and not cancelled():
        if proc.poll() is not None:
            raise CatalogError(f"the echosearch server for {p.index} exited with status {proc.returncode} before "
                               "it answered (see its messages above)")
        record = recorded_server(p.index)
        if record is not None and int(record["pid"]) == proc.pid:
            return proc, str(record["url"])
        time.sleep(0.2)
    _stop(proc)
    if cancelled():
        raise KeyboardInterrupt
    raise CatalogError(f"the echosearch server for {p.index} did not answer within {SERVER_START_S:.0f} s")


def serve_app(p: Plan, announce: Any = None) -> int:
    """Run the plan until SIGINT/SIGTERM or until a child ends; returns the exit status (0 on a signal)."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server: subprocess.Popen[bytes] | None = None
    app: subprocess.Popen[bytes] | None = None
    try:
        url = p.server_url
        if url is None:
            try:
                server, url = start_server(p, lambda: bool(stopping))
            except KeyboardInterrupt:
                return 0
        if announce is not None:
            announce(url, server is not None)
        if stopping:
            return 0
        env = {**os.environ, INDEX_ENV: str(p.index), "ECHOSEARCH_SERVER": url}
        app = subprocess.Popen(p.app, env=env)
        while not stopping:
            if app.poll() is not None:
                return int(app.returncode)
            if server is not None and server.poll() is not None:
                return int(server.returncode) or 1
            time.sleep(0.2)
        return 0
    finally:
        for child in (app, server):  # the app first: it is the server's client
            if child is not None:
                _stop(child)
        for s, handler in previous.items():
            signal.signal(s, handler)
