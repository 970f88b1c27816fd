"""Hearts along each timeline: which heart of its recorded patient every study shows, from the change scan's
new-heart flags and what confirms them (the next visit, or the post-transplant state the reports calibrate). The
identity audit reads it to audit a transplanted patient's hearts apart. See ``docs/longitudinal.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from echosearch.catalog import Catalog
from echosearch.change.model import ChangeModel
from echosearch.change.scan import MIN_PROBABILITY, clauses, score_cohort, steps_up


def _new_heart_support(clause: dict[str, Any]) -> str | None:
    """What confirms a new-heart clause: ``state`` (the archive's reports calibrate a step into the post-transplant
    state), ``next`` (the next visit continues the new heart), or None (a lone unlike study: a transplant not yet
    confirmed, or another patient's study - the audit's question)."""
    v = clause["evidence"]["values"]
    if steps_up(v.get("post_transplant_before"), v.get("post_transplant_after")):
        return "state"
    nxt, back = v.get("next_visit_similarity_to_this"), v.get("next_visit_similarity_to_previous")
    return "next" if nxt is not None and back is not None and nxt > back else None


@dataclass(frozen=True)
class HeartSplit:
    """Which heart of its recorded patient each study shows (study key -> 0, 1, ...), and the studies where the
    scan sees a new heart that nothing confirms yet (a transplant at the last visit, or another patient's study)."""

    segment: dict[int, int]
    unconfirmed: frozenset[int]


def heart_segments(catalog: Catalog, model: ChangeModel | None = None,
                   min_probability: float = MIN_PROBABILITY) -> HeartSplit:
    """Per study key, which heart of its recorded patient the study shows: 0 up to the first confirmed new heart,
    then 1, and so on. A shown ``new_heart`` flag splits the timeline when the post-transplant state confirms it,
    or when the next visit continues it and each side keeps two studies or more: a first study unlike all later
    ones is as likely another patient's study as the heart before a transplant, and stays the audit's question.
    The identity audit compares a study with its own heart's studies only."""
    ctx = score_cohort(catalog, model)
    found = clauses(ctx, min_probability)
    pk = ctx.T.meta["patient_key"].to_numpy()
    support: dict[int, str] = {}
    lone: set[int] = set()
    for r, got in found.items():
        for c in got:
            if c["type"] == "new_heart":
                if how := _new_heart_support(c):
                    support[r] = how
                else:
                    lone.add(r)
    starts = np.r_[0, np.nonzero(pk[1:] != pk[:-1])[0] + 1]  # each patient's first timeline row
    ends = np.r_[starts[1:], pk.size]
    cuts: dict[int, list[int]] = {}  # patient (index into starts) -> rows of its confirmed new hearts, in order
    for b in sorted(support):
        cuts.setdefault(int(np.searchsorted(starts, b, side="right")) - 1, []).append(b)
    seg = np.zeros(pk.size, np.int64)
    for p, rows in cuts.items():
        edges = [int(starts[p]), *rows, int(ends[p])]
        for k, b in enumerate(rows):
            if support[b] == "state" or min(b - edges[k], edges[k + 2] - b) >= 2:
                seg[b:edges[-1]] += 1
    keys = ctx.T.keys.tolist()
    return HeartSplit(dict(zip(keys, seg.tolist(), strict=True)), frozenset(int(keys[r]) for r in lone))
