"""A scan over every kind of bad input (tests/badinputs.py) finishes, and each input ends as exactly one row.

Each input becomes one ``videos`` row or one ``ingest_errors`` row with a reason a person can act on; the
good clips beside them are indexed; the CLI's exit status says that some inputs failed; a re-run changes
nothing; and rows committed by an earlier scan survive a later scan that meets the corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

import pytest
from badinputs import (
    BadInput,
    kinds,
    synthetic_frames,
    unreadable,
    write_corpus,
    write_good_clips,
    write_manifest,
    write_video,
)

from echosearch.catalog import Catalog
from echosearch.config import Settings, load_settings
from echosearch.errors import SomeInputsFailed
from echosearch.ingest.pseudonym import Pseudonymizer
from echosearch.run import read as ingest
from echosearch.run.local import scan
from echosearch.run.records import REPORT_STAGE

WORDS = {  # kind -> words its reason must hold
    "rows_as_string": "Rows", "number_of_frames_abc": "Number of Frames", "transfer_syntax_unknown": "transfer syntax",
    "jpeg_fragments_random": "corrupt", "jpeg_fragments_empty": "corrupt", "symlink_loop": "loop",
    "symlink_loop_pair": "loop", "symlink_dangling": "broken symbolic link", "fifo": "FIFO", "empty_file": "empty",
    "avi_zero_length": "empty", "mp4_no_video_stream": "no video stream", "avi_no_video_stream": "no video stream",
    "manifest_row_missing_file": "missing", "manifest_row_outside_folder": "outside",
    "manifest_row_absolute_outside": "outside", "cut_mid_fragment": "truncated", "frames_more_than_data": "truncated",
    "native_cut_mid_pixels": "truncated", "rows_65535": "absurd", "columns_0": "absurd", "bits_allocated_7": "unsupported",
    "samples_per_pixel_4": "unsupported", "ct_object": "not an ultrasound", "random_bytes": "unrecognised",
    "number_of_frames_0": "0 frames", "missing_pixel_data": "no pixel data", "element_length_past_end": "ends early",
    "palette_color_without_lut": "Palette", "sr_without_pixels": "report",
    "header_element_unknown_vr": "damaged DICOM header", "header_element_odd_length": "damaged DICOM header",
    "header_element_length_2gib": "ends early", "cut_inside_element_value": "ends early",
    "sequence_nested_5000_deep": "nested too deeply", "avi_one_frame_of_another_size": "corrupt video stream",
    "jpeg_frame_header_claims_8000x8000": "compressed as 8000x8000", "j2k_size_claims_6000_rows": "compressed as 6000x",
}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("ECHOSEARCH_SECRET", "test-secret-0123456789abcdef")
    return load_settings(workers=0)


def stored(path: Path, settings: Settings) -> str:
    """The ``path`` column of a file's row: its keyed label (or, with raw identifiers, the path itself)."""
    if hasattr(ingest, "stored_location"):
        pz = Pseudonymizer(settings.require_secret())
        return str(ingest.stored_location(path, pz, settings.store_raw_identifiers)[0])
    return ingest._path_str(path)


def assert_readable(reason: str, where: str, private: list[str]) -> None:
    why = unreadable(reason, private)
    assert why is None, f"{where}: reason {why}: {reason!r}"


def build(tmp: Path, real_dir: Path) -> tuple[list[Path], list[BadInput], list[Path]]:
    """Sources (the corpus folder holding good clips, and a manifest), the bad inputs, the good clips."""
    corpus = tmp / "corpus"
    inputs = write_corpus(corpus, real_dir)
    manifest, rows = write_manifest(tmp / "echonet")
    good = write_good_clips(corpus / "good", real_dir)
    return [corpus, manifest], inputs + rows, good


def rows_by_path(cat: Catalog) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, list[tuple[Any, ...]]]]:
    videos: dict[str, list[tuple[Any, ...]]] = {}
    errors: dict[str, list[tuple[Any, ...]]] = {}
    for row in cat.con.sql("SELECT path, sha256 FROM videos").fetchall():
        videos.setdefault(row[0], []).append(row)
    for row in cat.con.sql("SELECT path, sha256, stage, reason FROM ingest_errors").fetchall():
        errors.setdefault(row[0], []).append(row)
    return videos, errors


def snapshot(cat: Catalog) -> dict[str, list[tuple[Any, ...]]]:
    """Every committed row that a scan must neither duplicate nor lose (times of failures aside)."""
    return {
        "videos": cat.con.sql("SELECT * FROM videos ORDER BY video_key").fetchall(),
        "studies": cat.con.sql("SELECT * FROM studies ORDER BY study_key").fetchall(),
        "patients": cat.con.sql("SELECT * FROM patients ORDER BY patient_key").fetchall(),
        "labels": cat.con.sql("SELECT * FROM labels ORDER BY ALL").fetchall(),
        "errors": cat.con.sql("SELECT path, sha256, stage, reason FROM ingest_errors ORDER BY ALL").fetchall(),
    }


def test_the_corpus_has_many_named_kinds_of_unique_content(tmp_path: Path, real_dir: Path) -> None:
    inputs = write_corpus(tmp_path / "corpus", real_dir)
    names = kinds(inputs)
    assert len(names) >= 40 and len(set(names)) == len(names)
    contents = [i.path.read_bytes() for i in inputs if i.hashed and i.path.stat().st_size]
    assert len({hashlib.sha256(c).hexdigest() for c in contents}) == len(contents)


@pytest.fixture
def real_dir(real_dicom_dir: Path) -> Path:
    return real_dicom_dir


@pytest.mark.timeout(240)
def test_scan_over_every_bad_input_finishes_with_one_row_each(
    tmp_path: Path, real_dir: Path, settings: Settings
) -> None:
    sources, inputs, good = build(tmp_path, real_dir)
    expected = {stored(i.path, settings): i for i in inputs} | {
        stored(p, settings): BadInput("good", p, "video") for p in good
    }
    assert len(expected) == len(inputs) + len(good)
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan(sources, cat, settings, progress=False)
        videos, errors = rows_by_path(cat)
        wrong: list[str] = []
        for path, item in expected.items():
            n_video, n_error = len(videos.get(path, [])), len(errors.get(path, []))
            stage = errors[path][0][2] if n_error else None
            outcome = "skipped" if (n_video, n_error) == (0, 0) else "video" if (n_video, n_error) == (1, 0) else (
                ("report" if stage == REPORT_STAGE else "error") if (n_video, n_error) == (0, 1) else
                f"{n_video} video rows and {n_error} error rows")
            ok = outcome == item.expect or (item.expect == "either" and outcome in ("video", "error"))
            if not ok:
                wrong.append(f"{item.kind}: expected {item.expect}, got {outcome} {errors.get(path, '')}")
        assert not wrong, "\n".join(wrong)
        strays = (set(videos) | set(errors)) - set(expected)
        assert not strays, f"rows for paths that are no input: {sorted(strays)}"
        private = [str(tmp_path), tmp_path.name]
        for path, rows in errors.items():
            assert_readable(rows[0][3], f"{expected[path].kind} ({rows[0][2]})", private)
        for path, rows in errors.items():  # and says what is wrong, for a sample of kinds
            kind = expected[path].kind
            assert WORDS.get(kind, "").lower() in rows[0][3].lower(), (kind, rows[0][3])
        n_reports = sum(1 for rows in errors.values() if rows[0][2] == REPORT_STAGE)
        n_skipped = sum(1 for i in expected.values() if i.expect == "skipped")
        assert summary.discovered == len(expected) - n_skipped
        assert summary.videos_added == len(videos) and summary.failed == len(errors) - n_reports
        assert summary.report_objects == n_reports and summary.failed > 40
        assert all(stored(p, settings) in videos for p in good)
        before = snapshot(cat)
        again = scan(sources, cat, settings, progress=False)  # a re-run: nothing added, nothing lost
        assert again.videos_added == 0 and again.skipped_known == len(videos)
        assert again.failed == summary.failed
        assert snapshot(cat) == before


@pytest.mark.timeout(240)
def test_cli_scan_of_the_corpus_says_some_inputs_failed(
    tmp_path: Path, real_dir: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from echosearch.cli import main

    sources, inputs, good = build(tmp_path, real_dir)
    index = tmp_path / "idx"
    argv = ["scan", *map(str, sources), "--index", str(index), "--workers", "2"]
    assert main([*argv, "--json"]) == SomeInputsFailed.exit_code
    summary = json.loads(capsys.readouterr().out)
    assert summary["failed"] > 40 and len(summary["failures"]) == summary["failed"]
    for row in summary["failures"]:
        assert_readable(row["reason"], row["path"], [str(tmp_path)])
    with Catalog.open(index, read_only=True) as cat:
        n_rows = cat.counts()["videos"] + cat.counts()["ingest_errors"]
        videos, _ = rows_by_path(cat)
    n_inputs = len(inputs) + len(good) - sum(1 for i in inputs if i.expect == "skipped")
    assert n_rows == n_inputs  # every input one row, through the worker processes too
    assert all(stored(p, settings) in videos for p in good)
    assert main(argv) == SomeInputsFailed.exit_code  # still failing on a re-run (the table), nothing doubled
    out = capsys.readouterr().out
    assert "failed inputs" in out and "\x1b" not in out  # hostile names printed as text
    with Catalog.open(index, read_only=True) as cat:
        assert cat.counts()["videos"] + cat.counts()["ingest_errors"] == n_rows


@pytest.mark.timeout(240)
def test_rows_of_an_earlier_scan_survive_a_scan_that_meets_the_corpus(
    tmp_path: Path, real_dir: Path, settings: Settings
) -> None:
    good_dir = tmp_path / "good"
    good = write_good_clips(good_dir, real_dir)
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        first = scan([good_dir], cat, settings, progress=False)
        assert first.videos_added == len(good) and first.failed == 0
        before = snapshot(cat)
        corpus = tmp_path / "corpus"
        inputs = write_corpus(corpus, real_dir)
        second = scan([good_dir, corpus], cat, settings, progress=False)
        assert second.skipped_known == len(good) and second.failed > 40
        after = snapshot(cat)
        for table in ("videos", "studies", "patients"):
            assert all(row in after[table] for row in before[table]), table  # unchanged, not only present
        n_skipped = sum(1 for i in inputs if i.expect == "skipped")
        assert len(after["videos"]) + len(after["errors"]) == len(good) + len(inputs) - n_skipped


def test_a_container_header_that_over_counts_is_sampled_over_the_frames_that_exist(tmp_path: Path) -> None:
    from badinputs import patch_avi

    from echosearch.ingest.decode import decode_video
    from echosearch.ingest.prepare import FramePolicy, sample_indices

    clip = write_video(tmp_path / "clip.avi", synthetic_frames(12, seed=3))
    liar = tmp_path / "liar.avi"
    liar.write_bytes(patch_avi(clip.read_bytes(), frames=5000))  # the header claims 5000 frames
    policy = FramePolicy("sector", 8, 112)
    honest = decode_video(clip, "avi", lambda m: sample_indices(m.n_frames, policy))
    lied = decode_video(liar, "avi", lambda m: sample_indices(m.n_frames, policy))
    assert lied.meta.n_frames == 12 and list(lied.frame_indices) == list(honest.frame_indices)
    assert (lied.frames == honest.frames).all()


def test_a_file_that_cannot_be_read_is_reported_even_as_root(
    tmp_path: Path, real_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corpus has a file without read permission only when not root (permissions do not bind root):
    here the refusal is simulated, so that the reason is checked everywhere."""
    import echosearch.ingest.discover as discover

    good = write_good_clips(tmp_path / "src", real_dir)
    locked = good[0]
    real_open = discover.open_regular

    def refuse(path: Path | str) -> IO[bytes]:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path)

    monkeypatch.setattr(discover, "open_regular", refuse)
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        summary = scan([tmp_path / "src"], cat, settings, progress=False)
        assert summary.videos_added == len(good) - 1 and summary.failed == 1
        ((path, stage, reason),) = cat.con.sql("SELECT path, stage, reason FROM ingest_errors").fetchall()
    assert path == stored(locked, settings) and stage == "discover" and "Permission denied" in reason
    assert_readable(reason, "no_read_permission", [str(tmp_path)])
