"""Confidence a person can read: each search score placed against the archive's own distribution.

A raw cosine means little on its own: with CLIP-style models a nonsense text can score higher against
every clip than a real finding does, because some items (and some queries) are close to everything.
What carries meaning is how much more a query matches an item than a meaningless query does.

* **text queries**: for each result item, the mean and spread of the scores that *null queries* (seeded
  pseudo-words and everyday nouns, never the reported ones) get on that same item; the result's z-value
  is its score measured in that spread. The floor is the 99th percentile of the best z-value that other,
  held-out null queries reach in the archive (sample): below it the search shows "no close match".
* **clip queries** (upload, more like this): the query's own score profile over a sample of the archive
  (mean and spread); the floor is the 1st percentile of the best z-value the archive's own clips reach
  (the clip itself left out).

Placement ("top 1 % of matches in this archive") compares a result's z-value with the z-values of every
(reference query, archive item) pair, the reference queries being the archive's own report sentences
(text) or its own clips (clip queries).
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from echosearch.model.report_facts import split_sentences

SAMPLE_ITEMS = 4000
"""Archive items a query's score profile is measured on (a fixed seeded sample)."""
N_REFERENCE = 48
N_NULL = 128
NULL_SEED = 20261204
NULL_QUANTILE = 0.99
CLIP_QUANTILE = 0.01
_SYLLABLES = ("ba", "zy", "qu", "lo", "xy", "fe", "mir", "tan", "gor", "pli", "ve", "sno", "kra", "dun", "wi",
              "zz", "op", "ra", "nek", "tul")
_WORDS = ("banana", "umbrella", "violin", "pancake", "galaxy", "teapot", "bicycle", "marmalade", "penguin",
          "saxophone", "lighthouse", "origami", "cactus", "volcano", "kite", "spaghetti", "tractor", "pillow")


def null_queries(n: int = N_NULL, seed: int = NULL_SEED) -> list[str]:
    """Queries that describe nothing in an echo archive: pseudo-words and everyday nouns, seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pseudo = ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(rng.randint(1, 2))]
        nouns = rng.sample(_WORDS, rng.randint(1, 2))
        words = pseudo if i % 3 == 0 else nouns if i % 3 == 1 else pseudo[:1] + nouns[:1]
        out.append(" ".join(w.upper() if rng.random() < 0.3 else w for w in words))
    return out


def reference_queries(texts: list[str], n: int = N_REFERENCE, seed: int = 0) -> list[str]:
    """Distinct sentences of the archive's reports (what users of this archive search for), sampled."""
    sents = sorted({s for t in texts for s in split_sentences(t) if len(s) > 3})
    rng = random.Random(seed)
    return sents if len(sents) <= n else rng.sample(sents, n)


@dataclass
class Calibration:
    """The archive's distributions for one kind of query (text or clip) at one level and context."""

    kind: str
    level: str
    context: float
    match_z: np.ndarray  # sorted z-values of reference (query, item) pairs
    best_z: np.ndarray  # sorted best z-value of each reference query
    null_best_z: np.ndarray  # sorted best z-value of each held-out null query (text only)
    floor: float
    null_vecs: np.ndarray | None = None  # the null queries items are normalised by (text only)

    def summary(self) -> dict[str, Any]:
        frac = float(np.mean(self.null_best_z < self.floor)) if len(self.null_best_z) else None
        return {"kind": self.kind, "level": self.level, "context": self.context, "floor_z": round(self.floor, 3),
                "n_reference": int(len(self.best_z)), "n_null": int(len(self.null_best_z)),
                "reference_above_floor": round(float(np.mean(self.best_z >= self.floor)), 3),
                "null_below_floor": None if frac is None else round(frac, 3)}


@dataclass
class Assessment:
    """How a search's results stand against the archive: per-result z and readable placement."""

    no_match: bool
    floor: float
    best_z: float
    z: list[float] = field(default_factory=list)
    top_share: list[float] = field(default_factory=list)  # share of archive matches at least this strong
    labels: list[str] = field(default_factory=list)

    def headline(self) -> str:
        if self.no_match:
            return ("No close match: even the best result matches no better than a meaningless query does "
                    "in this archive. Try report language, or widen the filters.")
        return f"Best result: {self.labels[0]}." if self.labels else "No results."


def placement(share: float) -> str:
    """``top 1 % of matches in this archive`` and the like."""
    if share <= 0.001:
        return "top 0.1 % of matches in this archive"
    if share <= 0.5:
        return f"top {math.ceil(share * 100)} % of matches in this archive"
    return "weaker than half of all matches in this archive"


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Judge:
    """Places a :class:`~echosearch.query.Searcher`'s results against its archive (calibrations cached)."""

    def __init__(self, searcher: Any, sample_items: int = SAMPLE_ITEMS, seed: int = 0) -> None:
        self.searcher = searcher
        self.sample_items, self.seed = sample_items, seed
        self._samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._cal: dict[tuple[str, str, float], Calibration] = {}
        self._lock = threading.RLock()

    # ---- item vectors and scores ------------------------------------------------------------------
    def _items(self, level: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(unit vectors, unit study vectors or NaN rows) of the items ``keys`` of a level, in that order."""
        cat = self.searcher.catalog
        ids, vecs = cat.embeddings(level, [int(k) for k in keys])
        pos = np.searchsorted(ids, keys)
        vecs = _unit(vecs[pos]) if len(keys) else np.zeros((0, cat.embed_dim() or 1), np.float32)
        if level != "video" or not len(keys):
            return vecs, None
        skeys = self.searcher._study_of(np.asarray(keys, np.int64))
        sids, svecs = cat.embeddings("study", sorted({int(k) for k in skeys}))
        study = np.full_like(vecs, np.nan)
        if len(sids):
            p = np.clip(np.searchsorted(sids, skeys), 0, len(sids) - 1)
            ok = sids[p] == skeys
            if ok.any():
                study[ok] = _unit(svecs[p[ok]])
        return vecs, study

    def _sample(self, level: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(keys, vectors, study vectors or None) of a fixed seeded sample of the level."""
        if level not in self._samples:
            keys = self.searcher.catalog.embedding_keys(level)
            if len(keys) > self.sample_items:  # a sample: only its vectors are read
                keys = np.sort(np.random.default_rng(self.seed).choice(keys, self.sample_items, replace=False))
            self._samples[level] = (keys, *self._items(level, keys))
        return self._samples[level]

    @staticmethod
    def _score(q: np.ndarray, vecs: np.ndarray, study: np.ndarray | None, context: float) -> np.ndarray:
        """Scores (queries x items) as the search computes them (study context at video level)."""
        qn = _unit(q)
        s = qn @ vecs.T
        if context > 0 and study is not None:
            has = ~np.isnan(study[:, 0])
            st = np.nan_to_num(study, nan=0.0) @ qn.T
            s = np.where(has[None, :], (1 - context) * s + context * st.T, s)
        return s

    def scores(self, q: np.ndarray, level: str, context: float) -> tuple[np.ndarray, np.ndarray]:
        """(sample keys, scores of every sample item for the query rows ``q``)."""
        keys, vecs, study = self._sample(level)
        return keys, self._score(q, vecs, study, context)

    # ---- calibration --------------------------------------------------------------------------
    def calibration(self, kind: str, level: str, context: float) -> Calibration:
        """The archive's distributions for ``kind`` (``text`` or ``clip``) queries (computed on first use)."""
        key = (kind, level, round(float(context), 3))
        with self._lock:
            if key not in self._cal:
                self._cal[key] = self._calibrate(kind, level, float(context))
            return self._cal[key]

    @staticmethod
    def _item_z(s: np.ndarray, null_s: np.ndarray) -> np.ndarray:
        """Scores measured in each item's null spread (columns are items)."""
        return (s - null_s.mean(0, keepdims=True)) / np.maximum(null_s.std(0, keepdims=True), 1e-3)

    def _calibrate(self, kind: str, level: str, context: float) -> Calibration:
        if kind == "text":
            enc = self.searcher.encoder()
            texts = self.searcher.catalog.report_texts()
            refs = reference_queries(texts, seed=self.seed)
            if not refs:  # no reports: the standard view phrases stand in
                from echosearch.model.report_facts import VIEW_PHRASES

                refs = list(VIEW_PHRASES.values())
            vecs = np.asarray(enc.encode_text(refs + null_queries()), np.float32)
            ref_v, null_v = vecs[:len(refs)], vecs[len(refs):]
            null_a, null_b = null_v[::2], null_v[1::2]  # items normalised by A; the floor from held-out B
            base = self.scores(null_a, level, context)[1]
            z = self._item_z(self.scores(ref_v, level, context)[1], base)
            null_best = np.sort(self._item_z(self.scores(null_b, level, context)[1], base).max(1))
            floor = float(np.quantile(null_best, NULL_QUANTILE))
            null_keep: np.ndarray | None = null_a
        else:
            keys, vecs, _ = self._sample("video")
            pick = np.random.default_rng(self.seed + 1).choice(len(keys), min(N_REFERENCE, len(keys)), replace=False)
            qk = keys[pick]
            own = qk if level == "video" else self.searcher._study_of(qk)
            skeys, s = self.scores(vecs[pick], level, 0.0)
            s = np.where(skeys[None, :] == own[:, None], np.nan, s)
            z = (s - np.nanmean(s, 1, keepdims=True)) / np.maximum(np.nanstd(s, 1, keepdims=True), 1e-4)
            floor = float(np.quantile(np.nanmax(z, axis=1), CLIP_QUANTILE)) if len(pick) else math.inf
            null_best, null_keep = np.zeros(0), None
        flat = z[~np.isnan(z)]
        if len(flat) > 50000:
            flat = np.random.default_rng(self.seed + 2).choice(flat, 50000, replace=False)
        best = np.sort(np.nanmax(z, axis=1)) if z.size else np.zeros(0)
        return Calibration(kind, level, context, np.sort(flat), best, null_best, floor, null_keep)

    # ---- assessing results --------------------------------------------------------------------
    def assess(self, q: np.ndarray, keys: list[int] | np.ndarray, scores: list[float] | np.ndarray, kind: str,
               level: str, context: float = 0.0) -> Assessment:
        """Place a search's results (item keys of ``level`` and their scores, best first) for query ``q``."""
        context = context if level == "video" else 0.0
        scores = np.asarray(scores, np.float64)
        with self._lock:
            cal = self.calibration(kind, level, context)
            if kind == "text" and cal.null_vecs is not None and len(keys):
                vecs, study = self._items(level, np.asarray(keys, np.int64))
                z = self._item_z(scores[None, :], self._score(cal.null_vecs, vecs, study, context))[0]
            else:
                s = self.scores(q, level, context)[1][0]
                z = (scores - s.mean()) / max(float(s.std()), 1e-4)
        n = len(cal.match_z)
        shares = [float(1 - np.searchsorted(cal.match_z, v, "left") / n) if n else 1.0 for v in z]
        best = float(z.max()) if len(z) else -math.inf
        labels = [("below the no-close-match floor" if v < cal.floor else placement(sh))
                  for v, sh in zip(z.tolist(), shares, strict=True)]
        return Assessment(best < cal.floor, cal.floor, best, z.tolist(), shares, labels)
