"""Property: a mutated real file either decodes to model input of the right shape or fails with one of
echosearch's own errors and a readable reason; never another exception type, never a hang.

Seeds: the smallest real echo DICOMs (JPEG baseline, native grey, native RGB) and small synthetic MJPEG AVI
and MPEG-4 MP4 clips.
Mutations: truncate, flip bytes, overwrite a span with 0x00/0xFF, duplicate a span, delete a span; offsets
favour the first 2 KiB (the headers) half of the time. Decoding goes through ``process_file``, the function
that scan's workers call. Deterministic (``derandomize``), 200 examples, a few seconds.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
from badinputs import JPEG, MONO, RGB, synthetic_frames, unreadable, write_video
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from echosearch.errors import EchosearchError
from echosearch.ingest.discover import inspect_file
from echosearch.ingest.prepare import FramePolicy
from echosearch.run.read import PreparedVideo, process_file

POLICY = FramePolicy("sector", 8, 112)
PER_EXAMPLE_S = 10
SEEDS: dict[str, bytes] = {}


class Hang(Exception):
    """An example took longer than PER_EXAMPLE_S."""


@pytest.fixture
def seeds(real_dicom_dir: Path) -> Iterator[None]:
    """The files mutated (read once per test, not per example: the strategy draws from them)."""
    with tempfile.TemporaryDirectory() as tmp:
        SEEDS["jpeg.dcm"] = (real_dicom_dir / JPEG).read_bytes()
        SEEDS["mono.dcm"] = (real_dicom_dir / MONO).read_bytes()
        SEEDS["rgb.dcm"] = (real_dicom_dir / RGB).read_bytes()
        SEEDS["clip.avi"] = write_video(Path(tmp) / "clip.avi", synthetic_frames(12, seed=9)).read_bytes()
        SEEDS["clip.mp4"] = write_video(Path(tmp) / "clip.mp4", synthetic_frames(12, seed=9), "mp4", "mpeg4").read_bytes()
        yield
    SEEDS.clear()


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes, str]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    n = len(data)

    def offset() -> int:
        return draw(st.one_of(st.integers(0, min(2048, n - 1)), st.integers(0, n - 1)))

    op = draw(st.sampled_from(["truncate", "flip", "overwrite", "duplicate", "delete"]))
    at = offset()
    span = draw(st.integers(1, 4096))
    if op == "truncate":
        out = bytes(data[:at])
    elif op == "flip":
        for pos in [at, *draw(st.lists(st.integers(0, n - 1), max_size=7))]:
            data[pos] ^= draw(st.integers(1, 255))
        out = bytes(data)
    elif op == "overwrite":
        data[at:at + span] = bytes([draw(st.sampled_from([0x00, 0xFF]))]) * len(data[at:at + span])
        out = bytes(data)
    elif op == "duplicate":
        out = bytes(data[:at + span] + data[at:])
    else:
        out = bytes(data[:at] + data[at + span:])
    return name, out, f"{op} at {at} (span {span}) of {name}"


def _alarm(_sig: int, _frame: FrameType | None) -> None:
    raise Hang(f"decoding took longer than {PER_EXAMPLE_S} s")


@pytest.mark.timeout(300, method="thread")  # the per-example limit below uses SIGALRM itself
@settings(max_examples=200, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_mutated_real_files_decode_or_fail_with_a_readable_reason(seeds: None, case: tuple[str, bytes, str]) -> None:
    name, data, what = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        record = inspect_file(path)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, PER_EXAMPLE_S)
        try:
            out = process_file(record, POLICY)
        except EchosearchError as exc:
            reason = getattr(exc, "reason", str(exc))
            event(f"{name}: {type(exc).__name__}")
            why = unreadable(reason, [tmp])
            assert why is None, f"{what}: reason {why}: {reason!r}"
            return
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    event(f"{name}: decoded")
    assert isinstance(out, PreparedVideo), what
    assert out.frames.shape == (POLICY.n_frames, POLICY.size, POLICY.size, 3), what
    assert out.frames.dtype == np.uint8 and len(out.frame_indices) == POLICY.n_frames, what
    assert int(out.frame_indices.min()) >= 0 and int(out.frame_indices.max()) < out.meta.n_frames, what
