"""Change between visits: like-view pair features, a calibrated change model, flags with their evidence.

:func:`scan_changes` is the entry point; :mod:`echosearch.change.features` computes what a pair of studies
shows, :mod:`echosearch.change.model` turns it into probabilities, :mod:`echosearch.change.scan` tracks
device and heart states along each timeline and writes the flags, :mod:`echosearch.change.hearts` tells which heart
each study shows. See ``docs/longitudinal.md``.
"""

from echosearch.change.hearts import HeartSplit, heart_segments
from echosearch.change.model import EF_MARGIN, FLAG_TYPES, ChangeModel, default_model
from echosearch.change.scan import (
    CLAUSE_TYPES,
    DEVICE_NAMES,
    LABELS,
    MIN_PROBABILITY,
    scan_changes,
    score_cohort,
    study_predictions,
)

__all__ = ["CLAUSE_TYPES", "DEVICE_NAMES", "EF_MARGIN", "FLAG_TYPES", "LABELS", "MIN_PROBABILITY", "ChangeModel",
           "HeartSplit", "default_model", "heart_segments", "scan_changes", "score_cohort", "study_predictions"]
