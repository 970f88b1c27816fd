"""Decode workers (``run.workers.iter_processed``) and multiprocessing's resource tracker die with a killed indexer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")

# A stand-in for `echosearch index`: two decode workers, a generator left suspended (workers idle and
# waiting for more work, as while the model encodes), then a long sleep for the test to kill it in.
SCRIPT = """
import sys, time
from pathlib import Path
from echosearch.ingest.discover import FileRecord
from echosearch.run.workers import iter_processed
from echosearch.ingest.prepare import FramePolicy

if __name__ == "__main__":
    recs = [FileRecord(Path(p), Path(p).stat().st_size, f"{i:064x}", "dicom") for i, p in enumerate(sys.argv[1:])]
    results = iter_processed(recs, FramePolicy(), workers=2, prefetch=0)
    next(results)
    print("ready", flush=True)
    time.sleep(300)
"""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (scanning /proc for parent pids)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None and st[0] != "Z":
            parents[int(entry.name)] = st[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"  # a zombie has exited (nobody may reap it in a container)


def test_workers_and_resource_tracker_die_with_a_killed_parent(tmp_path: Path) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"clip{i}.dcm"
        f.write_bytes(b"not really a DICOM file " * 40)
        files.append(str(f))
    (tmp_path / "indexer.py").write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "indexer.py"), *files], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    children: set[int] = set()
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while len(children) < 3 and time.monotonic() < deadline:  # two workers and the resource tracker
            children = descendants(proc.pid)
            time.sleep(0.1)
        assert len(children) >= 3, f"expected two workers and a resource tracker, found {children}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in children if alive(p)]
        assert not survivors, f"processes outlived their killed parent: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


WATCHED = """
import os, sys, time
if sys.argv[1] == "fallback":
    sys.platform = "other"  # the portable path: a thread polling os.getppid()
from echosearch.run.workers import _die_with_parent
_die_with_parent(int(sys.argv[2]), poll_s=0.05)
print("armed", flush=True)
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "__PARENT__"], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["linux", "fallback"])
def test_a_worker_whose_parent_is_gone_exits(mode: str) -> None:
    if mode == "linux" and not sys.platform.startswith("linux"):
        pytest.skip("prctl is Linux-only")
    # started after its parent died (parent pid no longer ours): exits at once
    done = subprocess.run([sys.executable, "-c", WATCHED, mode, "1" if os.getppid() != 1 else "2"], timeout=30,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "armed" not in done.stdout
    # armed while its parent lives, then the parent is killed: it follows within a few seconds
    parent_src = PARENT.replace('"__PARENT__"', "str(__import__('os').getpid())")
    proc = subprocess.Popen([sys.executable, "-c", parent_src, WATCHED, mode], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = 0
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert alive(child)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the worker outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)
