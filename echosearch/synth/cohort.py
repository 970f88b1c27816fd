"""Plan and write a synthetic longitudinal cohort; the ground-truth table is the result.

Planning (patients, visits, scanners, identifiers, mislabelling, reports) happens in the calling process
from seeded generators; rendering and writing run per patient, in worker processes when the cohort is
large. Every random stream is keyed by (seed, purpose, patient, visit, view), so the output is identical
for any number of workers and a patient's data does not change when more patients are asked for.
"""

from __future__ import annotations

import datetime as dt
import math
import multiprocessing
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import polars as pl
from pydicom.uid import generate_uid

from echosearch.synth.config import PROFILE_BY_NAME, PROFILES, VIEWS, Format, Size, SynthConfig
from echosearch.synth.history import VisitState, patient_history
from echosearch.synth.render import make_acquisition
from echosearch.synth.reports import ef_band, make_report, measurements
from echosearch.synth.video import VideoJob, avi_name, render_and_write
from echosearch.synth.writers import DicomIdentity

_SURNAMES = ("ALDERTON", "BRISCOE", "CALLOWAY", "DUNMORE", "ELLSWORTH", "FAIRBANK", "GALLOWAY", "HARTWELL",
             "INGRAM", "JESSOP", "KILBRIDE", "LANGDON", "MERRIWEATHER", "NORCROSS", "OAKSHOTT", "PEMBERTON",
             "QUINLAN", "ROSSITER", "SHELBOURNE", "TREMAYNE", "UPWOOD", "VANCOURT", "WHITLOCK", "YARDLEY",
             "ASHGROVE", "BELLAMY", "CROWTHER", "DRAYCOTT", "FENWICK", "GRANTHAM")
_GIVEN = {"F": ("ADA", "BEATRIX", "CLEMENTINE", "DELPHINE", "EDITH", "FLORA", "GWENDOLYN", "HAZEL", "IMOGEN",
                "JUNE", "LAVINIA", "MAEVE", "NELL", "OLIVE", "PRUDENCE"),
          "M": ("ALBERT", "BARNABY", "CEDRIC", "DESMOND", "EZRA", "FELIX", "GILBERT", "HORACE", "IVOR",
                "JASPER", "LEOPOLD", "MILES", "NEVILLE", "OSWALD", "RUPERT")}
_INSTITUTIONS = ("RIVERSIDE HEART INSTITUTE", "ST AGATHA GENERAL HOSPITAL", "LAKEVIEW CARDIOLOGY")
_TAG = "echosearch-synth"


@dataclass(frozen=True)
class Person:
    pid: str
    name: str
    birth_date: dt.date
    sex: str


@dataclass(frozen=True)
class StudyPlan:
    """One visit of one patient as it will be written (recorded identity may be another patient's)."""

    patient_index: int
    true: Person
    recorded: Person
    visit: VisitState
    study_uid: str
    accession: str
    study_time: str
    institution: str
    profile: str
    report: str


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=[_TAG, str(seed), *map(str, parts)]))


def plan_cohort(cfg: SynthConfig) -> list[list[StudyPlan]]:
    """Every patient's studies in date order, identifiers assigned and mislabelling applied."""
    rng = np.random.default_rng([cfg.seed, 1])
    n = cfg.patients
    ids = rng.choice(9_000_000, n, replace=False) + 1_000_000
    people: list[Person] = []
    histories: list[list[VisitState]] = []
    for i in range(n):
        prng = np.random.default_rng([cfg.seed, 2, i])
        sex = "F" if prng.random() < 0.45 else "M"
        name = f"{_SURNAMES[prng.integers(len(_SURNAMES))]}^{_GIVEN[sex][prng.integers(15)]}"
        first = dt.date(2010, 1, 1) + dt.timedelta(days=int(prng.integers(0, 7 * 365)))
        birth = first - dt.timedelta(days=int(prng.integers(30 * 365, 86 * 365)))
        people.append(Person(f"SYN{int(ids[i]):07d}", name, birth, sex))
        k = int(prng.integers(cfg.visits[0], cfg.visits[1] + 1))
        histories.append(patient_history(prng, k, first, cfg.spread, cfg.difficulty, cfg.event_rate))
    n_studies = sum(len(h) for h in histories)
    profiles = np.tile(np.arange(len(PROFILES)), math.ceil(n_studies / len(PROFILES)))[:n_studies]
    rng.shuffle(profiles)
    accessions = rng.choice(900_000_000, n_studies, replace=False) + 100_000_000
    owner = [i for i, h in enumerate(histories) for _ in h]
    recorded = list(owner)  # patient index whose identity each study carries
    n_mis = int(round(cfg.mislabel_rate * n_studies))
    for s in rng.choice(n_studies, n_mis, replace=False) if n_mis else []:
        other = int(rng.integers(0, n - 1))
        recorded[int(s)] = other + (other >= owner[int(s)])
    plans: list[list[StudyPlan]] = []
    s = 0
    for i, hist in enumerate(histories):
        row: list[StudyPlan] = []
        for v in hist:
            srng = np.random.default_rng([cfg.seed, 3, i, v.visit_index])
            minutes = int(srng.integers(7 * 60 + 30, 17 * 60 + 30))
            row.append(StudyPlan(
                patient_index=i, true=people[i], recorded=people[recorded[s]], visit=v,
                study_uid=_uid(cfg.seed, "study", i, v.visit_index), accession=f"E{int(accessions[s]):09d}",
                study_time=f"{minutes // 60:02d}{minutes % 60:02d}{int(srng.integers(60)):02d}",
                institution=_INSTITUTIONS[int(srng.integers(len(_INSTITUTIONS)))],
                profile=PROFILES[int(profiles[s])].name, report=make_report(v, srng)))
            s += 1
        plans.append(row)
    return plans


def _study_row(p: StudyPlan) -> dict[str, Any]:
    v = p.visit
    return {"true_patient_id": p.true.pid, "recorded_patient_id": p.recorded.pid,
            "mislabelled": p.recorded.pid != p.true.pid, "patient_name": p.recorded.name,
            "true_patient_name": p.true.name, "birth_date": p.recorded.birth_date, "sex": p.recorded.sex,
            "study_uid": p.study_uid, "accession_number": p.accession, "study_date": v.date,
            "visit_index": v.visit_index, "ef": v.ef, "ef_band": ef_band(v.ef), "lv_dilated": v.lv_dilated,
            "pacer_lead": v.pacer, "tavr": v.tavr, "mitraclip": v.mitraclip, "transplanted": v.transplanted,
            "events": list(v.events), "heart_id": f"{p.true.pid}-H{v.anatomy.heart_id}",
            "profile": p.profile, "manufacturer": PROFILE_BY_NAME[p.profile].manufacturer,
            "model": PROFILE_BY_NAME[p.profile].model, "institution": p.institution, "report": p.report,
            **measurements(v)}


def video_jobs(cfg: SynthConfig, p: StudyPlan) -> list[VideoJob]:
    """The views of one study, acquisition settings drawn from the study's own seeded stream."""
    prof = PROFILE_BY_NAME[p.profile]
    jobs = []
    for view in cfg.views:
        vrng = np.random.default_rng([cfg.seed, 4, p.patient_index, p.visit.visit_index, VIEWS.index(view)])
        acq = make_acquisition(vrng, view, p.visit, prof, cfg.size, cfg.difficulty)
        ident = DicomIdentity(
            patient_id=p.recorded.pid, patient_name=p.recorded.name, birth_date=p.recorded.birth_date,
            sex=p.recorded.sex, study_uid=p.study_uid,
            series_uid=_uid(cfg.seed, "series", p.patient_index, p.visit.visit_index, view),
            sop_uid=_uid(cfg.seed, "sop", p.patient_index, p.visit.visit_index, view), accession=p.accession,
            study_date=p.visit.date, study_time=p.study_time, institution=p.institution, view=view,
            series_number=1 + VIEWS.index(view))
        jobs.append(VideoJob(p.visit, acq, prof, ident, p.true.name, cfg.size))
    return jobs


def _patient_rows(cfg: SynthConfig, out: str, plans: list[StudyPlan],
                  tick: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    cv2.setNumThreads(1)
    rows: list[dict[str, Any]] = []
    for p in plans:
        study = _study_row(p)
        for job in video_jobs(cfg, p):
            for r in render_and_write(job, Path(out), cfg.fmt):
                rows.append({**study, "view": job.acq.view, **r})
            if tick is not None:
                tick(1)
    return rows


_ORDER = ("path", "format", "sop_uid", "true_patient_id", "recorded_patient_id", "mislabelled",
          "patient_name", "true_patient_name", "birth_date", "sex", "study_uid", "accession_number",
          "study_date", "visit_index",
          "view", "ef", "ef_band", "lv_dilated", "pacer_lead", "tavr", "mitraclip", "transplanted", "events",
          "heart_id", "profile", "manufacturer", "model", "institution", "transfer_syntax", "photometric",
          "n_frames", "fps", "heart_rate", "depth_mm", "height", "width", "has_regions", "sector",
          "overlay_boxes", "report", "lvidd_mm", "lvids_mm", "lv_length_mm", "ivsd_mm", "lvpwd_mm", "la_mm",
          "ao_root_mm", "edv_ml", "esv_ml")
_SCHEMA: dict[str, Any] = {
    "birth_date": pl.Date, "study_date": pl.Date, "events": pl.List(pl.Utf8), "transfer_syntax": pl.Utf8,
    "photometric": pl.Utf8, "visit_index": pl.Int32, "n_frames": pl.Int32, "height": pl.Int32,
    "width": pl.Int32, "fps": pl.Float64, "ef": pl.Float64}


def _table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    if not rows:
        raise RuntimeError("no videos were generated")
    df = pl.DataFrame(rows, schema_overrides=_SCHEMA, infer_schema_length=None).select(list(_ORDER))
    view_rank = pl.col("view").replace_strict({v: i for i, v in enumerate(VIEWS)}, return_dtype=pl.Int32)
    return df.sort([pl.col("true_patient_id"), pl.col("visit_index"), view_rank, pl.col("format")])


def _write_sidecars(out: Path, df: pl.DataFrame, plans: list[list[StudyPlan]]) -> None:
    df.write_parquet(out / "ground_truth.parquet", compression="zstd", statistics=False)
    studies = [p for row in plans for p in row]
    pl.DataFrame({"study_uid": [p.study_uid for p in studies],
                  "accession_number": [p.accession for p in studies],
                  "report": [p.report for p in studies]}).write_csv(out / "reports.csv")
    avi = df.filter(pl.col("format") == "avi")
    if avi.height:
        names = [avi_name(s) for s in avi["sop_uid"]]
        rank = {pid: k for k, pid in enumerate(sorted(set(avi["true_patient_id"])))}
        split = [("TEST", "VAL")[rank[p] % 8] if rank[p] % 8 < 2 else "TRAIN" for p in avi["true_patient_id"]]
        avi.select(FileName=pl.Series(names), EF="ef", ESV="esv_ml", EDV="edv_ml", FrameHeight="height",
                   FrameWidth="width", FPS="fps", NumberOfFrames="n_frames", Split=pl.Series(split)
                   ).write_csv(out / "avi" / "FileList.csv")
        avi.select(FileName=pl.Series(names), patient_id="recorded_patient_id", patient_name="patient_name",
                   birth_date="birth_date", study_uid="study_uid", accession_number="accession_number",
                   study_date="study_date", view="view", fps="fps").write_csv(out / "avi" / "manifest.csv")


def generate_cohort(out: Path | str, patients: int = 20, seed: int = 0, *, visits: tuple[int, int] = (1, 6),
                    views: Sequence[str] = ("A4C", "PLAX"), fmt: Format = "dicom", mislabel_rate: float = 0.0,
                    size: Size = "small", difficulty: float = 1.0,
                    progress: Callable[[int, int], None] | None = None,
                    workers: int | None = None, event_rate: float = 1.0) -> pl.DataFrame:
    """Write a synthetic longitudinal echo cohort into ``out`` and return its ground-truth table.

    Files: ``dicom/<recorded patient>/<accession>/<view>.dcm`` and/or ``avi/Videos/<name>.avi`` (with
    ``avi/FileList.csv`` and ``avi/manifest.csv``), plus ``ground_truth.parquet`` (the returned table, one
    row per file) and ``reports.csv``. Same arguments give byte-identical output, whatever ``workers``.
    Invalid arguments raise ``ValueError``. Worker processes (cohorts of 16+ patients, or ``workers`` > 1)
    are spawned, so a calling script needs the ``if __name__ == "__main__":`` guard. ``event_rate``
    multiplies every event's per-visit chance (see :class:`SynthConfig`).
    """
    cfg = SynthConfig.make(patients, seed, visits, views, fmt, mislabel_rate, size, difficulty, workers, event_rate)
    return generate(out, cfg, progress)


def _parallel(cfg: SynthConfig, root: Path, plans: list[list[StudyPlan]], n_workers: int,
              tick: Callable[[int], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads (torch, OpenCV)
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        futures = {pool.submit(_patient_rows, cfg, str(root), p): len(p) for p in plans}
        for fut in as_completed(futures):
            rows.extend(fut.result())
            tick(futures[fut] * len(cfg.views))
    return rows


def generate(out: Path | str, cfg: SynthConfig,
             progress: Callable[[int, int], None] | None = None) -> pl.DataFrame:
    """:func:`generate_cohort` from a ready :class:`SynthConfig`."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(cfg)
    total = sum(len(p) for p in plans) * len(cfg.views)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    rows: list[dict[str, Any]] = []
    n_workers = cfg.n_workers(len(plans))
    if n_workers > 1:
        try:
            rows = _parallel(cfg, root, plans, n_workers, tick)
        except BrokenProcessPool:  # e.g. a script without the __main__ guard that spawn needs
            warnings.warn("synth worker processes failed to start; generating in this process instead "
                          "(guard the calling script with `if __name__ == '__main__':`)", stacklevel=2)
            rows, done = [], 0
    if not rows:
        for p in plans:
            rows.extend(_patient_rows(cfg, str(root), p, tick))
    df = _table(rows)
    _write_sidecars(root, df, plans)
    return df
