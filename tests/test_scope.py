"""Scope of clips (echosearch.model.scope): echo or not, B-mode or Doppler, view; stored, filterable, and left out
of zero-shot values and study vectors. Real non-cardiac files come from ``shared/testdata/real-dicom``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DICOM, demo_model_available
from hypothesis import given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog
from echosearch.filters import Filters, resolve_ids
from echosearch.ingest.discover import inspect_file
from echosearch.ingest.prepare import FramePolicy
from echosearch.model import scope
from echosearch.run.read import process_file

NOT_ECHO = ("Acuson_thyroid_YBR_FULL_RLE.dcm", "Philips_iU22_abdomen_JPEGLS.dcm", "US1_J2KR.dcm")
ECHO_BMODE = ("SonoSite_echo_A4C_30f_JPEG_small.dcm", "ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm",
              "Philips_EPIQ_echo_PLAX_JPEGLossless.dcm", "US-MONO2-8-8x-execho.dcm")
DOPPLER = ("US-PAL-8-10x-echo_JPEGLS.dcm", "US-RGB-8-esopecho.dcm", "US1_J2KR.dcm")


def real(name: str) -> Path:
    path = REAL_DICOM / name
    if not path.is_file():
        pytest.skip(f"real DICOM corpus file missing: {path}")
    return path


def cheap(name: str) -> scope.ClipScope:
    p = process_file(inspect_file(real(name)), FramePolicy(n_frames=8))
    return scope.cheap_scope(p.record.path, p.frames, p.meta.n_frames, kind=p.record.kind)


# ---- cheap signals on real files ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOT_ECHO)
def test_real_non_cardiac_ultrasound_is_not_echo(name: str) -> None:
    sc = cheap(name)
    assert not sc.is_echo and not sc.in_scope, sc.summary()
    assert sc.reasons() and "not an echocardiogram" in sc.summary()


@pytest.mark.parametrize("name", ECHO_BMODE)
def test_real_bmode_echo_is_in_scope(name: str) -> None:
    sc = cheap(name)
    assert sc.is_echo and sc.mode == "bmode" and sc.in_scope, sc.summary()


@pytest.mark.parametrize("name", DOPPLER)
def test_real_colour_doppler_is_doppler(name: str) -> None:
    sc = cheap(name)
    assert sc.mode == "doppler" and sc.mode_confidence > 0.9 and not sc.in_scope, sc.summary()


def test_header_signals_read_anatomy_probe_and_depth() -> None:
    sig = scope.header_signals(real("Acuson_thyroid_YBR_FULL_RLE.dcm"))
    assert sig["transducer"] == "LINEAR" and sig["depth_cm"] is not None and sig["depth_cm"] < 6
    sig = scope.header_signals(real("ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm"))
    assert sig["depth_cm"] is not None and 12 < sig["depth_cm"] < 26 and sig["heart_rate"]


# ---- the colour share: tinted grey is B-mode, flow colours are Doppler --------------------------------------
def fan(size: int = 64, frames: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Speckled grey frames inside a sector (apex at the top), and the sector mask."""
    yy, xx = np.mgrid[0:size, 0:size]
    mask = (yy > 2) & (np.abs(xx - size / 2) < (yy * 0.6))
    rng = np.random.default_rng(seed)
    grey = (rng.integers(40, 230, (frames, size, size)) * mask).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), mask


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.floats(0.5, 1.0), st.floats(0.5, 1.0), st.floats(0.5, 1.0)), st.integers(0, 1000))
def test_a_tinted_display_map_is_not_doppler(gains: tuple[float, float, float], seed: int) -> None:
    frames, _ = fan(seed=seed)
    tinted = (frames * np.asarray(gains)).astype(np.uint8)
    sig = scope.frame_signals(tinted)
    assert sig["colour_share"] < scope.DOPPLER_SHARE
    assert scope.doppler_probability(sig)[0] < 0.5


@settings(max_examples=25, deadline=None)
@given(st.floats(0.04, 0.4), st.sampled_from([(200, 30, 30), (30, 60, 220), (230, 200, 40)]), st.integers(0, 1000))
def test_flow_colours_make_doppler(share: float, colour: tuple[int, int, int], seed: int) -> None:
    frames, mask = fan(seed=seed)
    rows, cols = np.nonzero(mask)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rows), int(share * len(rows)), replace=False)
    frames[:, rows[pick], cols[pick]] = colour
    sig = scope.frame_signals(frames)
    assert sig["colour_share"] == pytest.approx(share, rel=0.35)
    assert scope.doppler_probability(sig)[0] > 0.5


def test_a_rectangle_counts_against_echo_and_a_fan_for_it() -> None:
    frames, _ = fan()
    assert scope.frame_signals(frames)["apex_ratio"] < 0.3
    rect = np.full((2, 64, 64, 3), 120, np.uint8)
    assert scope.frame_signals(rect)["apex_ratio"] > 0.9
    base = scope.decide({}).echo_confidence
    assert scope.decide({"apex_ratio": 1.0}).echo_confidence < base < scope.decide({"apex_ratio": 0.1}).echo_confidence


# ---- an index with echo and non-echo clips ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not demo_model_available():
        pytest.skip("the shipped demo model is missing; build it with `make demo-model`")
    if not REAL_DICOM.is_dir():
        pytest.skip(f"real DICOM corpus not found at {REAL_DICOM}")
    from echosearch.config import load_settings
    from echosearch.run.local import index_sources
    from echosearch.synth import generate_cohort

    base = tmp_path_factory.mktemp("scope")
    generate_cohort(base / "src" / "cohort", patients=4, seed=31, visits=(2, 2), views=("A4C", "PLAX"))
    for name in {*NOT_ECHO, *DOPPLER, "SonoSite_echo_A4C_30f_JPEG_small.dcm", "wrong_CT_small.dcm"}:
        shutil.copy(real(name), base / "src" / name)
    settings_ = load_settings(mode="demo", model="echosearch-demo", workers=0, device="cpu", frames_per_video=8)
    index_sources([base / "src"], base / "index", settings_, progress=False)
    return base / "index"


def test_indexing_marks_out_of_scope_clips_and_keeps_them_out(mixed_index: Path) -> None:
    with Catalog.open(mixed_index, read_only=True) as cat:
        rows = cat.scope_rows()
        n_videos = cat.one("SELECT count(*) FROM videos")
        assert n_videos and rows.height == n_videos[0], "every indexed clip has a scope"
        assert rows["model_checked"].all()
        out = cat.out_of_scope_videos()
        assert len(out) == len({*NOT_ECHO, *DOPPLER}), rows.filter(~rows["in_scope"])
        errors = cat.con.sql("SELECT reason FROM ingest_errors").fetchall()
        assert any("not an ultrasound" in r[0] for r in errors), "CT is refused at decode, as before"
        preds = {r[0] for r in cat.con.sql("SELECT key FROM predictions WHERE level = 'video'").fetchall()}
        assert preds and not preds & out, "no zero-shot values for out-of-scope clips"
        # study vectors pool in-scope clips only: identity and change never see a thyroid
        pooled = cat.con.sql("SELECT s.study_key, s.n_videos, count(v.video_key) FILTER (WHERE NOT list_contains("
                             "?::BIGINT[], v.video_key)) FROM study_embeddings s JOIN videos v USING (study_key) "
                             "GROUP BY ALL", params=[sorted(out)]).fetchall()
        assert pooled and all(n == m for _, n, m in pooled)
        # filters
        assert set(resolve_ids(cat.con, "video", Filters(scope="out")).tolist()) == out
        inside = set(resolve_ids(cat.con, "video", Filters(scope="in")).tolist())
        assert inside and not inside & out
        doppler = set(resolve_ids(cat.con, "video", Filters(modes=("doppler",))).tolist())
        assert len(doppler) == len(DOPPLER)
        assert resolve_ids(cat.con, "video", Filters(where="NOT in_scope AND NOT is_echo")).size == len(NOT_ECHO)


def test_model_views_when_labels_are_missing(mixed_index: Path) -> None:
    """Labels hidden: the archive's labelled centroids, fitted without the clip's own patient, name the view."""
    from echosearch.evaluation.scope import view_accuracy

    with Catalog.open(mixed_index, read_only=True) as cat:
        res = view_accuracy(cat)
    assert res["n"] >= 8 and res["accuracy"] >= 0.8, res


def test_an_older_catalog_opens_read_only_and_counts_every_clip_in_scope(mixed_index: Path, tmp_path: Path) -> None:
    copy = tmp_path / "old"
    shutil.copytree(mixed_index, copy)
    with Catalog.open(copy) as cat:  # back to schema 3: no clip_scope
        cat.con.execute("DROP TABLE clip_scope")
        cat.con.execute("DELETE FROM schema_migrations WHERE version >= 4")
    with Catalog.open(copy, read_only=True) as cat:
        assert not cat.has_scope() and cat.out_of_scope_videos() == set()
        n = cat.one("SELECT count(*) FROM videos")
        assert n and len(resolve_ids(cat.con, "video", Filters(scope="in"))) == n[0]
        assert len(resolve_ids(cat.con, "video", Filters(scope="out"))) == 0
    with Catalog.open(copy) as cat:  # a writable open migrates it
        assert cat.has_scope()


def test_an_upload_is_scoped_against_the_index(mixed_index: Path) -> None:
    from echosearch.query import Searcher

    with Searcher(mixed_index) as s:
        sc, vec = scope.assess_file(real("Acuson_thyroid_YBR_FULL_RLE.dcm"), s)
        assert not sc.in_scope and vec is not None and sc.model_checked
        sc, vec = scope.assess_file(real("wrong_CT_small.dcm"), s)
        assert not sc.is_echo and vec is None and "not an ultrasound" in " ".join(sc.reasons())
        sc, vec = scope.assess_file(real("SonoSite_echo_A4C_30f_JPEG_small.dcm"), s)
        assert sc.in_scope and vec is not None and sc.view is not None


def test_eval_reports_scope_of_real_files_and_nonsense_queries(mixed_index: Path) -> None:
    from echosearch.evaluation.scope import no_close_match, real_file_scope
    from echosearch.model.encode import encoder_for_index

    with Catalog.open(mixed_index, read_only=True) as cat:
        real_res = real_file_scope(cat, REAL_DICOM)
        assert real_res["n"] == 13 and real_res["echo_accuracy"] == 1.0 and not real_res["wrong"], real_res
        res = no_close_match(cat, encoder_for_index(cat), n=12)
    assert res["nonsense"]["n"] == 12 and res["nonsense"]["no_close_match_share"] >= 0.75, res


def test_cli_search_scope_filter_and_confidence(mixed_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from echosearch.cli import main

    assert main(["search", "--index", str(mixed_index), "--like-video", "1", "--scope", "out", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    with Catalog.open(mixed_index, read_only=True) as cat:
        assert {r["video_key"] for r in out["results"]} <= cat.out_of_scope_videos()
    assert main(["search", "--index", str(mixed_index), "--text", "xyzzy banana", "--confidence", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["no_close_match"] is True and all("floor" in r["confidence"] for r in out["results"])
