"""Starting and stopping the server: uvicorn on one socket, its address recorded in the index folder.

While the server runs, ``<index>/server.json`` says where it listens (written atomically once the socket is
bound, removed on a clean exit). A server killed without cleaning up leaves the file behind: clients check
the recorded process and the health route before trusting it (:func:`echosearch.serve.client.find_server`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from echosearch.config import Settings
from echosearch.errors import ConfigError

ADDRESS_FILE = "server.json"
log = logging.getLogger(__name__)


def url_host(host: str) -> str:
    """The address a local client dials for a server listening on ``host`` (wildcards -> loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def write_address(index_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``server.json`` atomically (temporary file, fsync, rename)."""
    target = index_dir / ADDRESS_FILE
    tmp = index_dir / f".{ADDRESS_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def remove_address(index_dir: Path, pid: int) -> None:
    """Remove ``server.json`` if it is this process's own (a newer server's file is left alone)."""
    target = index_dir / ADDRESS_FILE
    try:
        if json.loads(target.read_text()).get("pid") == pid:
            target.unlink()
    except (OSError, ValueError):
        pass


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, except that a SIGTERM/SIGINT ends ``run`` normally (uvicorn re-raises the signal
        after its graceful shutdown, which would kill the process before the address file is removed)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server


def serve(index_dir: Path, settings: Settings, *, host: str = "127.0.0.1", port: int = 8600,
          on_ready: Callable[[dict[str, Any]], None] | None = None, resume: bool = True, dicom_port: int | None = None,
          ae_title: str | None = None) -> None:
    """Run the server on ``index_dir`` until SIGINT/SIGTERM (blocking); ``on_ready(record)`` gets what
    ``server.json`` records once it listens. ``dicom_port``: also run the DICOM receiver there (0: any free port),
    its received instances indexed as this server's ingest jobs."""
    import uvicorn

    from echosearch.serve.app import create_app
    from echosearch.serve.auth import check_server_safety
    from echosearch.serve.state import ServerState

    _Server = _server_class()
    mode = check_server_safety(host)
    index_dir = Path(index_dir).resolve()
    sock = bind(host, port)
    try:
        state = ServerState(index_dir, settings, resume=resume)
    except BaseException:
        sock.close()
        raise
    pid = os.getpid()
    try:
        bound_port = sock.getsockname()[1]
        url = f"http://{url_host(host)}:{bound_port}"
        server = _Server(uvicorn.Config(create_app(state), log_level="warning", access_log=False,
                                               timeout_graceful_shutdown=5))
        dicom: dict[str, Any] = {}
        if dicom_port is not None:
            handle = state.start_receiver(host=host, port=dicom_port, ae_title=ae_title)
            dicom = {"dicom": {"ae_title": handle.ae_title, "port": handle.port}}
            log.info("DICOM receiver %s on port %d", handle.ae_title, handle.port)
        record = {"url": url, "pid": pid, "host": host, "port": bound_port, **dicom, "index_id": state.id,
                  "auth": mode, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_address(index_dir, record)
        if on_ready is not None:
            on_ready(record)
        server.run(sockets=[sock])
    finally:
        remove_address(index_dir, pid)
        state.close()
        sock.close()
