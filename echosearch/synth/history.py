"""Clinical course of a synthetic patient: EF, devices, dilation and events visit by visit.

Events are defined against the previous visit: ``ef_decline`` / ``ef_recovery`` are changes of at least
10 EF points (ordinary visit-to-visit drift stays within 7), implants appear once, and a transplant replaces
the heart (new anatomy and texture, normal EF, no devices). The first visit never has events.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from echosearch.synth.anatomy import Anatomy, drift, random_anatomy, remodel

DILATED_AT = 0.12  # dilation from which the LV is reported (and flagged) as dilated


@dataclass(frozen=True)
class VisitState:
    """What one study shows: the remodelled heart, function, devices and events since the last visit."""

    visit_index: int
    date: dt.date
    anatomy: Anatomy  # as imaged (dilation applied)
    ef: float
    dilation: float
    pacer: bool
    tavr: bool
    mitraclip: bool
    transplanted: bool
    events: tuple[str, ...]
    hr: float  # heart rate, beats per minute

    @property
    def lv_dilated(self) -> bool:
        return self.dilation >= DILATED_AT


def _baseline_ef(rng: np.random.Generator) -> float:
    u = rng.random()
    if u < 0.52:
        return float(rng.uniform(55, 70))
    if u < 0.72:
        return float(rng.uniform(41, 54))
    if u < 0.86:
        return float(rng.uniform(30, 40))
    return float(rng.uniform(15, 29))


def _dilation_for(rng: np.random.Generator, ef: float) -> float:
    if ef < 40 and rng.random() < 0.7:
        return float(rng.uniform(0.15, 0.45))
    if ef < 53 and rng.random() < 0.3:
        return float(rng.uniform(0.12, 0.25))
    return float(rng.uniform(0.12, 0.2)) if rng.random() < 0.04 else 0.0


def patient_history(rng: np.random.Generator, n_visits: int, first_date: dt.date, spread: float,
                    difficulty: float, event_rate: float = 1.0) -> list[VisitState]:
    """Draw a patient's visits in date order (dates strictly increasing, months to years apart).

    ``event_rate`` multiplies the per-visit chance of every event (capped so that no event is certain);
    1 keeps the default clinical mix and draws exactly the same random numbers as before it existed."""

    def p(base: float, cap: float = 0.9) -> float:
        return min(cap, base * event_rate)

    heart_id = 0
    base = random_anatomy(rng, heart_id, spread, difficulty)
    ef = _baseline_ef(rng)
    dil = _dilation_for(rng, ef)
    pacer = bool(rng.random() < 0.12)
    tavr = bool(rng.random() < 0.07)
    clip = bool(rng.random() < 0.05 + 0.05 * (ef < 40))
    transplanted = bool(rng.random() < 0.03)
    if transplanted:
        ef, dil, tavr, clip = float(rng.uniform(55, 68)), 0.0, False, False
    hr0 = float(rng.uniform(60, 95))
    date = first_date
    out: list[VisitState] = []
    for k in range(n_visits):
        events: list[str] = []
        if k > 0:
            date = date + dt.timedelta(days=int(rng.integers(120, 900)))
            base = drift(base, rng, difficulty)
            if rng.random() < p(0.16 if ef < 30 else 0.04, 0.5):
                heart_id += 1
                base = random_anatomy(rng, heart_id, spread, difficulty)
                ef, dil = float(rng.uniform(55, 68)), 0.0
                pacer = tavr = clip = False
                transplanted = True
                events.append("transplant")
            else:
                u = rng.random()
                if ef >= 38 and u < p(0.16, 0.45):
                    ef = max(15.0, ef - float(rng.uniform(12, 25)))
                    events.append("ef_decline")
                    if rng.random() < 0.6:
                        dil = min(0.45, max(dil, 0.05) + float(rng.uniform(0.1, 0.25)))
                elif ef < 45 and u < p(0.25, 0.7):
                    ef = min(68.0, ef + float(rng.uniform(12, 25)))
                    events.append("ef_recovery")
                    dil = max(0.0, dil - float(rng.uniform(0.05, 0.2)))
                    dil = 0.0 if dil < DILATED_AT else dil
                else:
                    ef = float(np.clip(ef + np.clip(2.5 * rng.standard_normal(), -7, 7), 15, 70))
                if not pacer and rng.random() < p(0.2 if ef < 35 else 0.09):
                    pacer = True
                    events.append("pacer_implant")
                if not tavr and rng.random() < p(0.06):
                    tavr = True
                    events.append("tavr_implant")
                if not clip and rng.random() < p(0.1 if ef < 40 else 0.04):
                    clip = True
                    events.append("mitraclip_implant")
        hr = float(np.clip(hr0 + 6 * rng.standard_normal(), 52, 110))
        out.append(VisitState(k, date, remodel(base, dil), round(ef, 1), dil, pacer, tavr, clip, transplanted,
                              tuple(events), hr))
    return out

