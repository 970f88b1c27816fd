"""Settings of the synthetic cohort: the user-facing :class:`SynthConfig` and the scanner profiles.

Scanner profiles stand in for the vendors of a real archive: each has its own image size, sector shape,
tint, transfer syntax and photometric interpretation, and some (older scanners) write no
SequenceOfUltrasoundRegions, so every decode and prepare path is exercised.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

Format = Literal["dicom", "avi", "both"]
Size = Literal["small", "realistic"]

VIEWS: tuple[str, ...] = ("A4C", "PLAX", "A2C")
EVENTS: tuple[str, ...] = (
    "ef_decline", "ef_recovery", "pacer_implant", "tavr_implant", "mitraclip_implant", "transplant",
)
AVI_SIZE = 112  # EchoNet-Dynamic frame side at size "small"
SMALL_FPS = 30


@dataclass(frozen=True)
class SynthConfig:
    """Arguments of :func:`echosearch.synth.generate_cohort`, validated in one place.

    ``workers`` is the number of processes used for rendering (``None``: one per CPU, at most 8, and a
    single process for small cohorts); the output does not depend on it. ``event_rate`` multiplies the
    per-visit chance of every event (EF decline/recovery, implants, transplant; 1 = the default mix, where a
    cohort of 100 patients with 4-6 visits has 17-48 of each; 3 gives 30+ of every event type from
    about 110 patients of 4-6 visits), for measurements that need many positives.
    """

    patients: int = 20
    seed: int = 0
    visits: tuple[int, int] = (1, 6)
    views: tuple[str, ...] = ("A4C", "PLAX")
    fmt: Format = "dicom"
    mislabel_rate: float = 0.0
    size: Size = "small"
    difficulty: float = 1.0
    workers: int | None = None
    event_rate: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.patients, int) or self.patients < 1:
            raise ValueError(f"patients must be a positive integer, got {self.patients!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        lo, hi = self.visits
        if not (1 <= lo <= hi <= 6):
            raise ValueError(f"visits must be MIN:MAX with 1 <= MIN <= MAX <= 6, got {lo}:{hi}")
        if not self.views:
            raise ValueError("at least one view is required")
        bad = [v for v in self.views if v not in VIEWS]
        if bad or len(set(self.views)) != len(self.views):
            raise ValueError(f"views must be distinct names among {', '.join(VIEWS)}, got {list(self.views)}")
        if self.fmt not in ("dicom", "avi", "both"):
            raise ValueError(f"format must be dicom, avi or both, got {self.fmt!r}")
        if self.size not in ("small", "realistic"):
            raise ValueError(f"size must be small or realistic, got {self.size!r}")
        if not (0.0 <= self.mislabel_rate <= 0.5):
            raise ValueError(f"mislabel rate must be within [0, 0.5], got {self.mislabel_rate}")
        if self.mislabel_rate > 0 and self.patients < 2:
            raise ValueError("mislabelling needs at least 2 patients")
        if not (0.0 <= self.difficulty <= 3.0):
            raise ValueError(f"difficulty must be within [0, 3], got {self.difficulty}")
        if not (0.0 <= self.event_rate <= 10.0):
            raise ValueError(f"event rate must be within [0, 10], got {self.event_rate}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")

    @classmethod
    def make(cls, patients: int = 20, seed: int = 0, visits: tuple[int, int] = (1, 6),
             views: Sequence[str] = ("A4C", "PLAX"), fmt: Format = "dicom", mislabel_rate: float = 0.0,
             size: Size = "small", difficulty: float = 1.0, workers: int | None = None,
             event_rate: float = 1.0) -> SynthConfig:
        """Build from loosely typed values (lists, numpy ints) as a CLI or notebook passes them."""
        return cls(int(patients), int(seed), (int(visits[0]), int(visits[1])),
                   tuple(str(v).upper() for v in views), fmt, float(mislabel_rate), size, float(difficulty),
                   None if workers is None else int(workers), float(event_rate))

    def n_workers(self, n_jobs: int) -> int:
        """Processes to use for ``n_jobs`` patient jobs: parallel only when it pays for process start-up."""
        if self.workers is not None:
            return max(1, min(self.workers, n_jobs))
        if n_jobs < 16:
            return 1
        return max(1, min(os.cpu_count() or 1, 8, n_jobs))

    @property
    def spread(self) -> float:
        """How far patients' anatomy spreads around the population mean (1 at difficulty 1, 0.4..2)."""
        return min(2.0, max(0.4, 1.3 / (0.3 + self.difficulty)))


@dataclass(frozen=True)
class Profile:
    """One scanner model: geometry and encoding of everything it exports."""

    name: str
    manufacturer: str
    model: str
    shape_small: tuple[int, int]  # (rows, columns)
    shape_realistic: tuple[int, int]
    tint: tuple[float, float, float] | None  # RGB gains of a coloured display map; None: greyscale
    transfer_syntax: UID
    photometric: str  # as written in the file
    has_regions: bool
    fps_realistic: int
    half_angle_deg: float
    apex_dx: float  # lateral shift of the sector apex, fraction of the width
    text_color: tuple[int, int, int]
    ecg_color: tuple[int, int, int]

    def shape(self, size: Size) -> tuple[int, int]:
        return self.shape_small if size == "small" else self.shape_realistic

    def fps(self, size: Size) -> int:
        return SMALL_FPS if size == "small" else self.fps_realistic

    @property
    def colour(self) -> bool:
        return self.tint is not None


PROFILES: tuple[Profile, ...] = (
    Profile("meridian-v9", "Meridian Imaging", "Vistara 9", (240, 320), (600, 800), None,
            ExplicitVRLittleEndian, "MONOCHROME2", True, 50, 42.0, 0.0, (235, 235, 235), (200, 200, 200)),
    Profile("northwind-c7", "Northwind Medical", "NW Cardio 7", (192, 256), (768, 1024), (1.0, 0.86, 0.66),
            JPEGBaseline8Bit, "YBR_FULL_422", True, 60, 40.0, 0.02, (240, 240, 200), (40, 220, 60)),
    Profile("helix-hs2000", "Helix Sonics", "HS-2000", (192, 256), (480, 640), None,
            RLELossless, "MONOCHROME2", False, 30, 38.0, -0.02, (220, 220, 220), (180, 180, 180)),
    Profile("acme-cx", "Acme Ultrasound", "Sonix CX", (192, 256), (600, 800), (0.84, 0.94, 1.0),
            RLELossless, "RGB", True, 40, 41.0, 0.0, (255, 255, 255), (250, 210, 40)),
)
PROFILE_BY_NAME = {p.name: p for p in PROFILES}


def es_area_ratio(ef: float) -> float:
    """End-systolic / end-diastolic LV cavity area for an ejection fraction in percent.

    The area-length method gives V = 0.85 A^2 / L. The cavity width shrinks as r^0.7 and its length as
    r^0.3 (r = ESA/EDA), so ESV/EDV = r^2 / r^0.3 = r^1.7 = 1 - EF, i.e. r = (1 - EF)^(1/1.7): the
    fractional area change 1 - r is 0.42 at EF 60 %, 0.22 at EF 35 % and 0.12 at EF 20 %.
    """
    return float((1.0 - ef / 100.0) ** (1.0 / 1.7))


def lv_volume_ml(width_mm: float, length_mm: float) -> float:
    """Area-length LV volume (mL) of an elliptical cavity of the given width and length."""
    import math

    area = math.pi * width_mm * length_mm / 4.0
    return 0.85 * area * area / length_mm / 1000.0
