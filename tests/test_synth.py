"""Synthetic cohort generator: files readable, ground truth consistent, pixels follow the ground truth."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import av
import cv2
import numpy as np
import polars as pl
import pydicom
import pytest
import typer
from typer.testing import CliRunner

from echosearch.synth import EVENTS, SynthConfig, generate_cohort, plan_cohort, render_video, video_jobs
from echosearch.synth.render import Sector, metal_artifacts
from echosearch.synth.scenes import BLOOD, DEVICE, MYO
from echosearch.synth.video import echonet_crop
from echosearch.synth.writers import _packbits_frames, packbits

REQUIRED_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                 "PatientID", "PatientName", "PatientBirthDate", "StudyDate", "AccessionNumber",
                 "Manufacturer", "ManufacturerModelName", "FrameTime", "CineRate", "NumberOfFrames",
                 "PhotometricInterpretation")


def _sector(js: str) -> Sector:
    d = json.loads(js)
    return Sector(d["apex_x"], d["apex_y"], d["radius"], d["half_angle_deg"], 10_000, 10_000)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort20(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    out = tmp_path_factory.mktemp("c20")
    return out, generate_cohort(out, patients=20, seed=0, visits=(1, 1), views=("A4C",), workers=1)


def test_default_cohort_mixes_syntaxes_and_colour(cohort20: tuple[Path, pl.DataFrame]) -> None:
    _, df = cohort20
    assert df["transfer_syntax"].n_unique() >= 3
    assert {"MONOCHROME2", "RGB", "YBR_FULL_422"} <= set(df["photometric"])
    assert df["has_regions"].any() and not df["has_regions"].all()


def test_every_dicom_reads_with_tags_regions_and_pixels(cohort20: tuple[Path, pl.DataFrame]) -> None:
    out, df = cohort20
    for row in df.iter_rows(named=True):
        ds = pydicom.dcmread(out / row["path"])
        for tag in REQUIRED_TAGS:
            assert tag in ds, (row["path"], tag)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.3.1" and ds.Modality == "US"
        assert ds.file_meta.TransferSyntaxUID == row["transfer_syntax"]
        assert (ds.PatientID, ds.AccessionNumber, ds.StudyInstanceUID, ds.SOPInstanceUID) == (
            row["recorded_patient_id"], row["accession_number"], row["study_uid"], row["sop_uid"])
        arr = ds.pixel_array
        assert arr.shape[:3] == (row["n_frames"], row["height"], row["width"])
        assert (arr.ndim == 4) == (row["photometric"] != "MONOCHROME2")
        regions = ds.get("SequenceOfUltrasoundRegions")
        assert bool(regions) == row["has_regions"]
        if regions:
            r = regions[0]
            x0, y0, x1, y1 = json.loads(row["sector"])["bbox"]
            assert (r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1,
                    r.RegionLocationMaxY1) == (x0, y0, x1 - 1, y1 - 1)
            assert r.RegionSpatialFormat == 1 and r.RegionDataType == 1


def test_overlays_outside_sector_and_nothing_else_there(cohort20: tuple[Path, pl.DataFrame]) -> None:
    out, df = cohort20
    for row in df.iter_rows(named=True):
        arr = pydicom.dcmread(out / row["path"]).pixel_array
        grey = arr if arr.ndim == 3 else arr.max(axis=3)
        h, w = row["height"], row["width"]
        s = _sector(row["sector"])
        inside = dataclasses.replace(s, height=h, width=w).mask()
        boxes = json.loads(row["overlay_boxes"])
        assert {b["kind"] for b in boxes} == {"text", "scale", "ecg"}
        covered = np.zeros((h, w), bool)
        for b in boxes:
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert not inside[y0:y1, x0:x1].any(), (row["path"], b)
            covered[y0:y1, x0:x1] = True
        # blanking the sector's outside removes every annotation; the annotations are really drawn
        tol = 40 if row["photometric"] == "YBR_FULL_422" else 0  # JPEG ringing near the text
        assert grey[:, ~inside & ~covered].max() <= tol
        assert grey[:, covered].max() > 100
        ecg = next(b["box"] for b in boxes if b["kind"] == "ecg")
        strip = grey[:, ecg[1]:ecg[3], ecg[0]:ecg[2]].astype(int)
        assert np.abs(strip[0] - strip[-1]).sum() > 0  # the ECG sweeps


def test_deterministic_across_runs_and_workers(tmp_path: Path) -> None:
    kw = dict(patients=3, seed=11, visits=(1, 2), views=("A4C", "PLAX"), fmt="both", mislabel_rate=0.3)
    a = generate_cohort(tmp_path / "a", workers=1, **kw)  # type: ignore[arg-type]
    b = generate_cohort(tmp_path / "b", workers=1, **kw)  # type: ignore[arg-type]
    assert a.equals(b)
    da, db = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert da == db and len(da) == a.height + 4  # + ground truth, reports, FileList, manifest
    assert pl.read_parquet(tmp_path / "a" / "ground_truth.parquet").equals(a)


def test_layout_reports_and_echonet_avi(tmp_path: Path) -> None:
    df = generate_cohort(tmp_path, patients=3, seed=2, visits=(2, 3), views=("A4C", "PLAX", "A2C"),
                         fmt="both")
    studies = df.select("study_uid").n_unique()
    assert df.height == studies * 3 * 2
    assert all((tmp_path / p).is_file() for p in df["path"])
    reports = pl.read_csv(tmp_path / "reports.csv")
    assert reports.columns == ["study_uid", "accession_number", "report"] and reports.height == studies
    assert reports["report"].str.starts_with("L").all()
    avi = df.filter(pl.col("format") == "avi")
    filelist = pl.read_csv(tmp_path / "avi" / "FileList.csv")
    assert filelist.height == avi.height and {"FileName", "EF", "Split"} <= set(filelist.columns)
    name = filelist["FileName"][0]
    assert "." not in name and (tmp_path / "avi" / "Videos" / f"{name}.avi").is_file()
    with av.open(str(tmp_path / "avi" / "Videos" / f"{name}.avi")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert frames[0].shape == (112, 112, 3) and len(frames) == filelist["NumberOfFrames"][0]


def test_ground_truth_consistency() -> None:
    cfg = SynthConfig(patients=300, seed=5, visits=(1, 6), mislabel_rate=0.1)
    plans = plan_cohort(cfg)
    studies = [p for row in plans for p in row]
    mis = [p.recorded.pid != p.true.pid for p in studies]
    assert abs(np.mean(mis) - 0.1) < 0.01
    assert len({p.study_uid for p in studies}) == len({p.accession for p in studies}) == len(studies)
    seen = set()
    for row in plans:
        assert 1 <= len(row) <= 6 and len({p.true.pid for p in row}) == 1
        assert row[0].visit.events == ()
        for prev, cur in zip(row, row[1:], strict=False):
            v0, v1 = prev.visit, cur.visit
            assert v1.date > v0.date and v1.visit_index == v0.visit_index + 1
            seen.update(v1.events)
            if "transplant" in v1.events:
                assert v1.anatomy.heart_id != v0.anatomy.heart_id
                assert v1.anatomy.texture_seed != v0.anatomy.texture_seed
                assert not (v1.pacer or v1.tavr or v1.mitraclip)
                continue
            assert v1.anatomy.heart_id == v0.anatomy.heart_id
            assert ("ef_decline" in v1.events) == (v1.ef <= v0.ef - 10)
            assert ("ef_recovery" in v1.events) == (v1.ef >= v0.ef + 10)
            for flag in ("pacer", "tavr", "mitraclip"):
                event = f"{flag}_implant"
                assert (event in v1.events) == (getattr(v1, flag) and not getattr(v0, flag))
    assert seen == set(EVENTS)


def test_table_matches_plan(tmp_path: Path) -> None:
    df = generate_cohort(tmp_path, patients=4, seed=3, visits=(2, 4), mislabel_rate=0.25)
    per = df.group_by("true_patient_id").agg(pl.col("study_date").n_unique(), pl.col("study_uid").n_unique())
    assert (per["study_date"] == per["study_uid"]).all()
    mis = df.filter("mislabelled")
    assert mis.height > 0 and (mis["recorded_patient_id"] != mis["true_patient_id"]).all()
    ok = df.filter(~pl.col("mislabelled"))
    assert (ok["recorded_patient_id"] == ok["true_patient_id"]).all()
    assert df.filter(pl.col("visit_index") == 0)["events"].list.len().max() == 0
    assert set(df["view"]) == {"A4C", "PLAX"} and df["n_frames"].is_between(16, 24).all()


def test_lv_cavity_area_in_pixels_follows_ef() -> None:
    cfg = SynthConfig(patients=30, seed=1, visits=(1, 1), views=("A4C", "PLAX"))
    for view in cfg.views:
        efs, facs = [], []
        for row in plan_cohort(cfg):
            job = next(j for j in video_jobs(cfg, row[0]) if j.acq.view == view)
            r = render_video(job.visit, job.acq)
            region = r.lv_masks.any(0)  # the LV at end-diastole, from the renderer
            dark = np.array([((cv2.blur(f, (5, 5)) < 60) & region).sum() for f in r.frames])
            efs.append(job.visit.ef)
            facs.append(1 - dark.min() / dark.max())
        assert np.corrcoef(efs, facs)[0, 1] > 0.8, view


def test_devices_and_transplant_are_visible() -> None:
    cfg = SynthConfig(patients=4, seed=4, visits=(1, 1), views=("A4C", "PLAX"))
    plan = plan_cohort(cfg)[0][0]
    base = dataclasses.replace(plan.visit, pacer=False, tavr=False, mitraclip=False, transplanted=False)
    for view, flag in (("A4C", "pacer"), ("PLAX", "tavr"), ("A4C", "mitraclip"), ("PLAX", "mitraclip")):
        job = next(j for j in video_jobs(cfg, plan) if j.acq.view == view)
        off = render_video(base, job.acq).frames
        on = render_video(dataclasses.replace(base, **{flag: True}), job.acq).frames
        assert (on >= 250).sum() - (off >= 250).sum() > 20 * len(on), (view, flag)


@pytest.mark.parametrize("angle_deg", [-25.0, 0.0, 20.0])
def test_metal_shadows_and_rings_only_deeper_along_its_beam(angle_deg: float) -> None:
    sector = Sector(100.0, 5.0, 180.0, 40.0, 200, 200)
    x0, y0, x1, y1 = sector.bbox
    tissue = np.random.default_rng(3).integers(MYO - 10, MYO + 10, (y1 - y0, x1 - x0)).astype(np.uint8)
    assert np.array_equal(metal_artifacts(tissue.copy(), sector, 1.0), tissue)  # no metal: untouched

    def xy(r: float) -> tuple[int, int]:
        b = np.radians(angle_deg)
        return round(sector.apex_x - x0 + r * np.sin(b)), round(sector.apex_y - y0 + r * np.cos(b))

    ref = tissue.copy()
    cv2.circle(ref, xy(100), 16, BLOOD, -1)  # a blood pool right behind the metal, as the LA behind a MitraClip
    cv2.circle(ref, xy(80), 4, DEVICE, -1)  # a metal disc on the beam, 76-84 px deep
    out = metal_artifacts(ref.copy(), sector, 1.0)

    def at(img: np.ndarray, r: float) -> int:
        x, y = xy(r)
        return int(img[y, x])

    assert at(out, 80) == DEVICE  # the metal itself stays
    assert all(at(out, r) == at(ref, r) for r in (20, 50, 70))  # shallower: untouched
    assert all(at(out, r) < 0.5 * at(ref, r) for r in (125, 160))  # tissue deeper on the beam: shadowed
    rise = [at(out, r) - at(ref, r) for r in (86, 91, 96)]  # all in the blood pool
    assert rise[0] > 30 and rise[0] > rise[1] > rise[2] >= 0, rise  # a comet tail that fades with depth ...
    assert at(out, 110) <= at(ref, 110)  # ... and ends: past ~12 mm only the shadow is left
    yy, xx = np.mgrid[y0:y1, x0:x1]
    beam = np.degrees(np.arctan2(xx - sector.apex_x, yy - sector.apex_y))
    far = np.abs(beam - angle_deg) > 8  # beams that never cross the 9-px disc
    assert np.array_equal(out[far], ref[far])


def test_visits_of_a_patient_are_not_pixel_identical() -> None:
    cfg = SynthConfig(patients=1, seed=6, visits=(2, 2), views=("A4C",))
    a, b = (video_jobs(cfg, p)[0] for p in plan_cohort(cfg)[0])
    fa = echonet_crop(render_video(a.visit, a.acq).frames, a.acq.sector)[0][0]
    fb = echonet_crop(render_video(b.visit, b.acq).frames, b.acq.sector)[0][0]
    assert np.abs(fa.astype(int) - fb.astype(int)).mean() > 10


def test_packbits_roundtrip() -> None:
    from pydicom.pixels.decoders.rle import _rle_decode_segment

    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (3, 200), (17, 5), (40, 300)):
        for a in (rng.integers(0, 3, (h, w)), rng.integers(0, 256, (h, w)), np.zeros((h, w))):
            plane = a.astype(np.uint8)
            for enc in (packbits(plane), _packbits_frames(plane[None])[0]):  # numpy and libtiff encoders
                assert len(enc) % 2 == 0
                assert bytes(_rle_decode_segment(enc)[: h * w]) == plane.tobytes()


def test_invalid_config_is_refused(tmp_path: Path) -> None:
    for kw in ({"patients": 0}, {"visits": (3, 2)}, {"views": ("A5C",)}, {"mislabel_rate": 0.9},
               {"difficulty": -1.0}, {"fmt": "mp4"}, {"size": "huge"}, {"event_rate": -1.0}, {"event_rate": 11.0}):
        with pytest.raises(ValueError):
            generate_cohort(tmp_path, **kw)  # type: ignore[arg-type]


def _event_counts(cfg: SynthConfig) -> tuple[dict[str, int], int]:
    counts = dict.fromkeys(EVENTS, 0)
    for row in plan_cohort(cfg):
        for p in row:
            for e in p.visit.events:
                counts[e] += 1
    return counts, sum(len(row) for row in plan_cohort(cfg))


def test_event_rate_gives_enough_positives_and_leaves_the_default_unchanged() -> None:
    """``event_rate`` 1 draws the same histories as before the option; 3 gives 30+ of every event type from 110
    patients of 4-6 visits, for a change measurement with useful intervals (any seed)."""
    base = SynthConfig(patients=40, seed=9, visits=(4, 6))
    same = dataclasses.replace(base, event_rate=1.0)
    assert [[(p.visit.events, p.visit.ef, p.study_uid) for p in r] for r in plan_cohort(base)] == \
        [[(p.visit.events, p.visit.ef, p.study_uid) for p in r] for r in plan_cohort(same)]
    none, _ = _event_counts(dataclasses.replace(base, event_rate=0.0))
    assert sum(none.values()) == 0
    for seed in (9, 77):
        cfg = SynthConfig(patients=110, seed=seed, visits=(4, 6), event_rate=3.0)
        counts, n_studies = _event_counts(cfg)
        assert min(counts.values()) >= 30 and n_studies < 600, counts
        default, _ = _event_counts(dataclasses.replace(cfg, event_rate=1.0))
        assert all(counts[e] > default[e] for e in EVENTS), (counts, default)


def test_cli(tmp_path: Path) -> None:
    from echosearch.cli.synth_cmd import synth

    app = typer.Typer()
    app.command("synth")(synth)
    app.command("noop")(lambda: None)  # a second command keeps `synth` a subcommand
    runner = CliRunner()
    res = runner.invoke(app, ["synth", str(tmp_path / "c"), "--patients", "2", "--visits", "1:2", "--views",
                              "A4C", "--format", "avi", "--mislabel-rate", "0.5", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (tmp_path / "c" / "avi" / "FileList.csv").is_file()
    assert "--event-rate" in runner.invoke(app, ["synth", "--help"]).output
    for bad in (["--visits", "4:2"], ["--views", "A4C,XYZ"], ["--format", "mp4"], ["--patients", "0"],
                ["--event-rate", "-1"]):
        res = runner.invoke(app, ["synth", str(tmp_path / "d"), *bad])
        assert res.exit_code == 2, (bad, res.output)
