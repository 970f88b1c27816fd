"""Patient identity: same-patient matching (``matching``), the identity audit (``mislabels``), score calibration
(``calibration``), and the identity models the index can carry (``map``, ``model``, ``tower``; trained by
``train`` and ``tower_train``).

``from echosearch.identity import audit`` (and the other names below) is the public API.
"""

from __future__ import annotations

from echosearch.identity.matching import (
    PATIENT_CAL,
    StudySet,
    fit_identity_calibrations,
    fit_patient_calibration,
    load_studies,
    match_patients,
    own_scores,
    patient_scores,
    same_patient_probability,
)
from echosearch.identity.mislabels import audit, score_studies

__all__ = [
    "PATIENT_CAL",
    "StudySet",
    "audit",
    "fit_identity_calibrations",
    "fit_patient_calibration",
    "load_studies",
    "match_patients",
    "own_scores",
    "patient_scores",
    "same_patient_probability",
    "score_studies",
]
