"""Sign-in throttling (``echosearch.serve.login_guard``) with an injected clock."""

from __future__ import annotations

import threading

import pytest

from echosearch.serve.login_guard import Limits, LoginGuard


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fail(guard: LoginGuard, name: str = "dr who", client: str | None = None) -> None:
    assert not guard.attempt(name, client, lambda: False).ok


def test_five_failures_lock_a_name_with_doubling_capped_back_off() -> None:
    clock = Clock()
    guard = LoginGuard(Limits(), clock)
    for _ in range(4):
        fail(guard)
        clock.t += 1
    assert guard.retry_after("dr who") == 0, "four failures: no lock yet"
    fail(guard)  # the fifth within 15 minutes: locked for a minute
    assert guard.retry_after("dr who") == 60
    called: list[bool] = []
    d = guard.attempt("dr who", None, lambda: called.append(True) or True)
    assert not d.ok and d.locked and d.retry_after_s == 60 and not called, "the right password is refused unchecked"
    assert guard.retry_after("Dr Who ") == 60, "names are compared case- and space-insensitively"
    assert guard.retry_after("someone else") == 0
    clock.t += 60
    waits = []
    for _ in range(6):
        d = guard.attempt("dr who", None, lambda: False)
        assert not d.ok and not d.locked
        waits.append(d.retry_after_s)
        clock.t += d.retry_after_s
    assert waits == [120, 240, 480, 900, 900, 900], "doubling, capped at 15 minutes"
    with pytest.raises(ValueError):
        Limits(max_lock_s=3600)  # a lock longer than the window would reset the count it punishes


def test_old_failures_expire_and_a_success_resets_the_name() -> None:
    clock = Clock()
    guard = LoginGuard(Limits(), clock)
    for _ in range(4):
        fail(guard)
    clock.t += 15 * 60 + 1
    fail(guard)
    assert guard.retry_after("dr who") == 0, "failures older than the window do not count"
    for _ in range(3):
        fail(guard)
    assert guard.attempt("dr who", None, lambda: True).ok
    fail(guard)
    assert guard.retry_after("dr who") == 0, "a success cleared the name's earlier failures"


def test_clients_and_all_attempts_are_limited_across_names() -> None:
    clock = Clock()
    guard = LoginGuard(Limits(), clock)
    for i in range(5):  # a shared password: guessing with a new name each time
        fail(guard, f"name{i}", client="10.0.0.7")
    assert guard.retry_after("fresh name", "10.0.0.7") == 60, "the client is locked"
    assert guard.retry_after("fresh name", "10.0.0.8") == 0, "another client is not"
    assert guard.attempt("fresh name", "10.0.0.7", lambda: True).locked
    for i in range(15):  # clients not told apart (loopback, behind a proxy): the global limit
        fail(guard, f"other{i}")
    assert guard.retry_after("anyone", None) == 60 and guard.retry_after("anyone", "10.9.9.9") == 60


def test_concurrent_attempts_cannot_slip_past_the_limit() -> None:
    guard = LoginGuard(Limits(), Clock())
    checked: list[int] = []
    barrier = threading.Barrier(20)

    def work() -> None:
        barrier.wait()
        guard.attempt("dr who", None, lambda: checked.append(1) is not None and False)

    threads = [threading.Thread(target=work) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(checked) == 5, "only five passwords were checked before the lock"


def test_replay_rebuilds_the_state() -> None:
    clock = Clock()
    guard = LoginGuard(Limits(), clock)
    t = clock.t - 30
    guard.replay([(t, "login_failed", "dr who", None)] * 3 + [(t + 1, "login", "dr who", None)]
                 + [(t + 2, "login_failed", "dr who", "10.0.0.7")] * 5)
    assert guard.retry_after("dr who") == 32 and guard.retry_after("x", "10.0.0.7") == 32
