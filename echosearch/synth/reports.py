"""Study reports in the style of echo report text used for CLIP training: short upper-case phrases.

The phrases are this project's own templates. EF, function and device phrases come first so that a
64-token text context always holds them; chamber size and the LV diameter (from the rendered anatomy)
follow. Normal LV size is not mentioned, to keep reports short.
"""

from __future__ import annotations

import numpy as np

from echosearch.synth.config import es_area_ratio, lv_volume_ml
from echosearch.synth.history import DILATED_AT, VisitState

PACER = "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD."
TAVR = "A BIOPROSTHETIC STENT-VALVE IS PRESENT IN THE AORTIC POSITION."
MITRACLIP = "MITRACLIP IN PLACE."
TRANSPLANT = "STATUS POST ORTHOTOPIC HEART TRANSPLANT."


def ef_band(ef: float) -> str:
    """normal (>= 53), mild (41-52), moderate (30-40) or severe (< 30) reduction."""
    if ef >= 53:
        return "normal"
    if ef >= 41:
        return "mild"
    if ef >= 30:
        return "moderate"
    return "severe"


def dilation_grade(dilation: float) -> str:
    if dilation < DILATED_AT:
        return "normal"
    if dilation < 0.22:
        return "mild"
    if dilation < 0.34:
        return "moderate"
    return "severe"


_FUNCTION = {
    "normal": "NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION.",
    "mild": "MILDLY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.",
    "moderate": "MODERATELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.",
    "severe": "SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.",
}
_SIZE = {
    "normal": "NORMAL LEFT VENTRICULAR CAVITY SIZE.",
    "mild": "THE LEFT VENTRICLE IS MILDLY DILATED.",
    "moderate": "THE LEFT VENTRICLE IS MODERATELY DILATED.",
    "severe": "THE LEFT VENTRICLE IS SEVERELY DILATED.",
}


def measurements(v: VisitState) -> dict[str, float]:
    """Linear sizes (mm) and area-length volumes (mL) of the heart as rendered at this visit."""
    a = v.anatomy
    r = es_area_ratio(v.ef)
    edv = lv_volume_ml(a.lv_wid, a.lv_len)
    return {
        "lvidd_mm": round(a.lv_wid, 1),
        "lvids_mm": round(a.lv_wid * r**0.7, 1),
        "lv_length_mm": round(a.lv_len, 1),
        "ivsd_mm": round(a.sept, 1),
        "lvpwd_mm": round(a.wall, 1),
        "la_mm": round(a.la_ap, 1),
        "ao_root_mm": round(a.ao, 1),
        "edv_ml": round(edv, 1),
        "esv_ml": round(edv * (1 - v.ef / 100.0), 1),
    }


def make_report(v: VisitState, rng: np.random.Generator) -> str:
    """One study's report (~25-50 BPE tokens); ``rng`` picks among equivalent phrasings."""
    ef = int(round(v.ef))
    parts = [f"LV EJECTION FRACTION IS {ef}%." if rng.random() < 0.8
             else f"LEFT VENTRICULAR EJECTION FRACTION ESTIMATED AT {ef}%."]
    parts.append(_FUNCTION[ef_band(v.ef)])
    if v.pacer:
        parts.append(PACER)
    if v.tavr:
        parts.append(TAVR)
    if v.mitraclip:
        parts.append(MITRACLIP)
    if v.transplanted:
        parts.append(TRANSPLANT)
    if v.lv_dilated:
        parts.append(_SIZE[dilation_grade(v.dilation)])
    m = measurements(v)
    if m["ivsd_mm"] >= 12.5:
        parts.append("MILD LEFT VENTRICULAR HYPERTROPHY.")
    if m["la_mm"] >= 42:
        parts.append("THE LEFT ATRIUM IS DILATED.")
    parts.append(f"LVIDD {m['lvidd_mm']:.0f} MM.")
    return " ".join(parts)
