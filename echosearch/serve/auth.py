"""Who may call the server: the app's rules, for an HTTP API.

* On a loopback address without configured credentials every local caller is trusted (like the app).
* Beyond loopback the server refuses to start unless credentials are configured: a bearer token
  (``ECHOSEARCH_API_TOKEN``) and/or the app's password (``ECHOSEARCH_APP_PASSWORD``, HTTP basic auth with
  any user name, which becomes the actor in the access log).
* Once configured, credentials are required on every route but the health check, also on loopback.
* Every check goes through the app's sign-in throttle (:class:`~echosearch.serve.login_guard.LoginGuard`, replayed
  from the access log on start); failures and lock-outs are logged like the app's sign-ins.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from echosearch.appcore.auth import PASSWORD_ENV, REPLAY_S, check_password, is_loopback, local_actor
from echosearch.catalog import Catalog
from echosearch.errors import ConfigError
from echosearch.serve.login_guard import Limits, LoginGuard

TOKEN_ENV = "ECHOSEARCH_API_TOKEN"
MIN_TOKEN_CHARS = 16


def configured_modes() -> list[str]:
    """The credentials the environment configures: ``token``, ``password`` (both may be)."""
    modes = []
    token = os.environ.get(TOKEN_ENV, "")
    if token:
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"{TOKEN_ENV} must be at least {MIN_TOKEN_CHARS} characters")
        modes.append("token")
    if os.environ.get(PASSWORD_ENV):
        modes.append("password")
    return modes


def check_server_safety(host: str) -> str:
    """Refuse a non-loopback address without credentials; returns the auth mode (``token``, ``password``,
    ``token+password`` or ``none``)."""
    modes = configured_modes()
    if not is_loopback(host) and not modes:
        raise ConfigError(f"refusing to listen on {host} without authentication: set {TOKEN_ENV} (bearer token, "
                          f">= {MIN_TOKEN_CHARS} characters) or {PASSWORD_ENV} (basic auth) (see docs/server.md)")
    return "+".join(modes) or "none"


@dataclass(frozen=True)
class Verdict:
    """Outcome of one request's credential check: the actor, or an HTTP status with a reason."""

    actor: str | None
    status: int = 200
    reason: str = ""
    retry_after_s: float = 0.0


class Authenticator:
    """Checks the ``Authorization`` header of each request against the configured credentials."""

    def __init__(self, root: Catalog, limits: Limits | None = None) -> None:
        self.root = root
        self.modes = configured_modes()
        self.guard = LoginGuard(limits)
        cur = root.cursor(read_only=True)
        try:
            since = datetime.fromtimestamp(self.guard.clock() - REPLAY_S, timezone.utc).replace(tzinfo=None)
            events = cur.access_events(("login", "login_failed"), since)
        finally:
            cur.close()
        import json

        self.guard.replay((at.replace(tzinfo=timezone.utc).timestamp(), action, actor,
                           json.loads(detail or "{}").get("client")) for at, action, actor, detail in events)

    @property
    def required(self) -> bool:
        return bool(self.modes)

    def _log(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        cur = self.root.cursor()
        try:
            cur.log_access(actor, action, detail)
        finally:
            cur.close()

    def check(self, authorization: str | None, client: str | None) -> Verdict:
        """The actor of a request with this ``Authorization`` header from ``client`` (its address)."""
        if not self.modes:
            return Verdict(local_actor())
        scheme, _, value = (authorization or "").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and "token" in self.modes:
            name, method = "api-token", "token"
            expected = os.environ.get(TOKEN_ENV, "")

            def verify() -> bool:
                return hmac.compare_digest(hashlib.sha256(value.strip().encode()).digest(),
                                           hashlib.sha256(expected.encode()).digest())
        elif scheme == "basic" and "password" in self.modes:
            try:
                name, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return Verdict(None, 401, "malformed basic credentials")
            name, method = name.strip(), "password"

            def verify() -> bool:
                return bool(name) and check_password(password)
        else:
            return Verdict(None, 401, f"authentication required ({' or '.join(self.modes)})")
        detail: dict[str, Any] = {"method": f"api-{method}", **({"client": client} if client else {})}
        decision = self.guard.attempt(name, client, verify)
        if decision.ok:
            return Verdict(name)
        if decision.locked:
            self._log(name or "?", "login_locked", {**detail, "retry_after_s": round(decision.retry_after_s)})
            return Verdict(None, 429, "too many failed sign-ins", decision.retry_after_s)
        self._log(name or "?", "login_failed", detail)
        return Verdict(None, 401, "wrong credentials", decision.retry_after_s)
