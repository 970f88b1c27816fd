"""Throttling of password sign-ins: exponential back-off per user name, per client address and overall.

Each key (the user name, the client address when known, and one key for all attempts) counts its failures
in a row: a failure more than ``window_s`` after the previous one starts the count again. From ``failures``
failures on, the key is locked for ``lock_s`` after the latest one, doubling with every further failure, up
to ``max_lock_s`` (not above ``window_s``, so waiting out a lock does not reset the count). A locked attempt
is refused without looking at the password; a success clears that name's count. The state is a function of
the failure and success times alone, so :meth:`LoginGuard.replay` rebuilds it from the access log after a
restart (``appcore.auth.login_guard``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

ALL = "all"


@dataclass(frozen=True)
class Limits:
    """When a key locks and for how long (seconds)."""

    failures: int = 5  # failures in a row (none more than window_s apart) before a name or a client locks
    window_s: float = 15 * 60
    lock_s: float = 60  # the first lock; doubles with each further failure
    max_lock_s: float = 15 * 60
    global_failures: int = 20  # all attempts together (behind a proxy every client has the proxy's address)

    def __post_init__(self) -> None:
        if min(self.failures, self.global_failures) < 1 or not 0 < self.lock_s <= self.max_lock_s <= self.window_s:
            raise ValueError("need failures >= 1 and 0 < lock_s <= max_lock_s <= window_s")


@dataclass(frozen=True)
class Decision:
    """Outcome of one attempt: ``ok``; ``locked`` (refused unchecked); seconds until the next try is allowed."""

    ok: bool
    locked: bool = False
    retry_after_s: float = 0.0


class LoginGuard:
    """Failure counts of one server process, shared by all its sessions (thread-safe)."""

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # key -> (failures in a row, time of the latest)
        self._lock = threading.Lock()

    def _keys(self, name: str, client: str | None) -> list[tuple[str, int]]:
        keys = [(f"name:{name.strip().casefold()}", self.limits.failures), (ALL, self.limits.global_failures)]
        if client:
            keys.append((f"client:{client}", self.limits.failures))
        return keys

    def _locked_until(self, key: str, threshold: int) -> float:
        n, last = self._failures.get(key, (0, 0.0))
        if n < threshold:
            return 0.0
        return last + min(self.limits.lock_s * 2.0 ** min(n - threshold, 64), self.limits.max_lock_s)

    def _retry_after(self, name: str, client: str | None, now: float) -> float:
        until = max(self._locked_until(key, n) for key, n in self._keys(name, client))
        return max(0.0, until - now)

    def retry_after(self, name: str, client: str | None = None) -> float:
        """Seconds until ``name`` from ``client`` may try again (0: now)."""
        with self._lock:
            return self._retry_after(name, client, self.clock())

    def _failed(self, name: str, client: str | None, now: float) -> None:
        for key, _ in self._keys(name, client):
            n, last = self._failures.get(key, (0, 0.0))
            self._failures[key] = (n + 1 if now - last <= self.limits.window_s else 1, now)

    def _succeeded(self, name: str, now: float) -> None:
        self._failures.pop(self._keys(name, None)[0][0], None)

    def failed(self, name: str, client: str | None = None, at: float | None = None) -> None:
        """Record a failed attempt."""
        with self._lock:
            self._failed(name, client, self.clock() if at is None else at)

    def succeeded(self, name: str, at: float | None = None) -> None:
        """A successful sign-in clears the name's count (not the client's or the global one)."""
        with self._lock:
            self._succeeded(name, self.clock() if at is None else at)

    def attempt(self, name: str, client: str | None, verify: Callable[[], bool]) -> Decision:
        """Refuse while locked (``verify`` is not called), else check and record the outcome, atomically
        (concurrent attempts cannot all slip in before the failures are counted)."""
        with self._lock:
            now = self.clock()
            wait = self._retry_after(name, client, now)
            if wait > 0:
                return Decision(False, locked=True, retry_after_s=wait)
            if verify():
                self._succeeded(name, now)
                return Decision(True)
            self._failed(name, client, now)
            return Decision(False, retry_after_s=self._retry_after(name, client, now))

    def replay(self, events: Iterable[tuple[float, str, str, str | None]]) -> None:
        """Rebuild from past ``(time, action, name, client)`` events in time order (``login``, ``login_failed``)."""
        for at, action, name, client in events:
            if action == "login_failed":
                self.failed(name, client, at=at)
            elif action == "login":
                self.succeeded(name, at=at)
