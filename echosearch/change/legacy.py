"""The earlier per-study explanation rule (finding crosses its presence threshold by more than the cohort's
noise), kept for callers that explain a single pair of prediction rows; the scan itself uses
:mod:`echosearch.change.scan`'s tracked states and calibrated flags."""

from __future__ import annotations

from typing import Any

import numpy as np

DEVICE_NAMES = {"pacer_lead": "pacer/ICD lead", "tavr": "TAVR valve", "mitraclip": "MitraClip"}


def _explain(r: dict[str, Any], thr: dict[str, float],
             present: dict[str, float | None] | None = None) -> tuple[list[str], list[str]]:
    """(clinical finding phrases, reasons for flagging) of one study against its previous one. ``present``: the
    index's per-task presence thresholds (default 0); a finding appears when it crosses its threshold by more
    than the cohort's noise, or, where the threshold is unknown (None), when it rises by more than the noise."""
    phrases: list[str] = []
    reasons: list[str] = []
    ef, ef0 = r.get("ef"), r.get("ef_prev")
    if ef is not None and ef0 is not None and np.isfinite(ef) and np.isfinite(ef0):
        d = ef - ef0
        if abs(d) >= 5:
            phrases.append(f"EF {ef0:.0f}% -> {ef:.0f}% ({d:+.0f})")
        if d <= -thr["ef"]:
            reasons.append("EF fall")
    for task in (*DEVICE_NAMES, "lv_dilated"):
        cur, prev = r.get(task), r.get(f"{task}_prev")
        if cur is None or prev is None or not (np.isfinite(cur) and np.isfinite(prev)):
            continue
        name = DEVICE_NAMES.get(task)
        p = 0.0 if present is None else present.get(task, 0.0)
        if (p is None or cur > p >= prev) and cur - prev > thr[task]:
            phrases.append(f"new {name}" if name else "LV newly dilated")
            if task in DEVICE_NAMES:
                reasons.append(f"new {name}")
        elif (p is None or prev > p >= cur) and prev - cur > thr[task]:
            phrases.append(f"{name} no longer seen" if name else "LV no longer dilated")
    return phrases, reasons
