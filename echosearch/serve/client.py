"""Client of a running ``echosearch server`` (httpx): what the CLI uses instead of opening a served index.

:func:`connect` finds the server of an index folder from the address file it keeps there (or takes an
explicit URL), checks that it is alive and holds that index, and returns a :class:`ServerClient`. Error
responses become the library's own exceptions, so the CLI prints the same line and exit code either way.
Credentials come from the environment: ``ECHOSEARCH_API_TOKEN`` (bearer), else ``ECHOSEARCH_APP_USER`` /
``ECHOSEARCH_APP_PASSWORD`` (basic).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from echosearch import errors
from echosearch.serve.run import ADDRESS_FILE

HEALTH_TIMEOUT_S = 2.0


def auth_headers() -> dict[str, str]:
    """The Authorization header the environment's credentials give (none when none are set)."""
    import base64

    from echosearch.appcore.auth import PASSWORD_ENV, USER_ENV
    from echosearch.serve.auth import TOKEN_ENV

    token = os.environ.get(TOKEN_ENV)
    if token:
        return {"Authorization": f"Bearer {token}"}
    password = os.environ.get(PASSWORD_ENV)
    if password:
        user = os.environ.get(USER_ENV) or "cli"
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")}
    return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def recorded_server(index_dir: Path | str) -> dict[str, Any] | None:
    """The address file of a server that is alive and holds ``index_dir``; None when there is none, or it is
    stale (its process is gone, it does not answer, or another index answers at that address)."""
    from echosearch.serve.state import index_id

    path = Path(index_dir) / ADDRESS_FILE
    try:
        record = json.loads(path.read_text())
        url, pid = str(record["url"]), int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _pid_alive(pid):
        return None
    try:
        health = httpx.get(url.rstrip("/") + "/v1/health", timeout=HEALTH_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError):
        return None
    if health.get("index_id") != index_id(index_dir) or health.get("pid") != pid:
        return None
    return dict(record)


class ServerClient:
    """Calls the ``/v1`` routes of one server; every method returns the route's JSON document."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=auth_headers(),
                                 timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, *, raw: bool = False, with_type: bool = False, **kwargs: Any) -> Any:
        """One request; an error response raises the library's exception for it. Returns the JSON document, or
        with ``raw`` the body's bytes (and with ``with_type`` also its media type)."""
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise errors.CatalogError(f"cannot reach the echosearch server at {self.url}: {exc}") from exc
        if r.status_code < 400:
            if raw:
                return (r.content, r.headers.get("content-type", "").split(";")[0].strip()) if with_type else r.content
            return r.json()
        try:
            body = r.json()
        except ValueError:
            body = {}
        cls = getattr(errors, str(body.get("error")), None)
        if isinstance(cls, type) and issubclass(cls, errors.EchosearchError):
            raise cls(str(body.get("message")))
        detail = body.get("detail", r.text[:300])
        if r.status_code in (401, 429):
            raise errors.ConfigError(f"the echosearch server at {self.url} refused the request ({detail}): set "
                                     "ECHOSEARCH_API_TOKEN, or ECHOSEARCH_APP_USER and ECHOSEARCH_APP_PASSWORD")
        if r.status_code == 422:
            raise errors.QueryError(f"the server rejected the request: {json.dumps(detail)[:500]}")
        raise errors.CatalogError(f"the echosearch server at {self.url} answered {r.status_code}: {detail}")

    # ---- routes ----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return dict(self.call("GET", "/v1/health"))

    def info(self) -> dict[str, Any]:
        return dict(self.call("GET", "/v1/info"))

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/search", json=body))

    def search_file(self, path: Path, body: dict[str, Any]) -> dict[str, Any]:
        with Path(path).open("rb") as f:
            return dict(self.call("POST", "/v1/search/upload", files={"file": (Path(path).name, f)},
                                  data={"params": json.dumps(body, default=str)}))

    def reports(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/reports", json=body))

    def reports_file(self, path: Path, k: int) -> dict[str, Any]:
        with Path(path).open("rb") as f:
            return dict(self.call("POST", "/v1/reports/upload", files={"file": (Path(path).name, f)},
                                  data={"k": str(k)}))

    def audit(self, fpr: float, k: int, unverifiable: bool) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/audit", json={"fpr": fpr, "k": k, "unverifiable": unverifiable}))

    def changes(self, patient: str | None, **options: Any) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/changes", json={"patient": patient, **options}))

    def match(self, study: str, k: int) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/match", json={"study": study, "k": k}))

    def match_file(self, path: Path, k: int) -> dict[str, Any]:
        with Path(path).open("rb") as f:
            return dict(self.call("POST", "/v1/match/upload", files={"file": (Path(path).name, f)},
                                  data={"k": str(k)}))

    def timeline(self, patient: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/patients/{patient}/timeline"))

    def submit_job(self, sources: list[Path], reports: Path | None = None, labels: Path | None = None) -> dict[str, Any]:
        body = {"sources": [str(Path(s).resolve()) for s in sources],
                "reports": str(Path(reports).resolve()) if reports else None,
                "labels": str(Path(labels).resolve()) if labels else None}
        return dict(self.call("POST", "/v1/jobs", json=body))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/jobs/{job_id}"))

    def wait_job(self, job_id: str, on_poll: Callable[[dict[str, Any]], None] | None = None,
                 poll_s: float = 0.5) -> dict[str, Any]:
        """Poll a job until it is done or failed; returns its last state."""
        while True:
            job = self.job(job_id)
            if on_poll is not None:
                on_poll(job)
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(poll_s)


def filters_body(filters: Any) -> dict[str, Any]:
    """A :class:`~echosearch.filters.Filters` as the server's ``filters`` object (dates as ISO strings)."""
    from dataclasses import fields

    out: dict[str, Any] = {}
    for f in fields(filters):
        value = getattr(filters, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else (
            value.isoformat() if hasattr(value, "isoformat") else value)
    return out


def connect(index_dir: Path | str | None, server: str | None = None) -> ServerClient | None:
    """A client of ``server`` (a URL, checked to answer) or of the running server recorded in ``index_dir``;
    None when no server runs for that index (the caller then opens the catalog itself)."""
    if server:
        client = ServerClient(server)
        client.health()
        return client
    if index_dir is None:
        return None
    record = recorded_server(index_dir)
    return ServerClient(record["url"]) if record else None
