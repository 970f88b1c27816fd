"""Report text -> facts, for training: which texts describe which clip, and labels read from reports.

Contrastive training from scratch with one positive per row treats every other clip in the batch as a
negative, although reports of the same finding (two pacemaker patients, two EFs of 50 %) say the same
thing. Here a report becomes a set of facts — template sentences, and quantities whose sentences differ
only in their numbers — so that a training text is scored against every clip of the batch
(:func:`relevance`): shared findings are positives, near values are partly positive. The same facts are
multi-label and regression targets for auxiliary heads (:class:`ReportLabels`), which give the image
tower a dense signal early in training. Everything is read from the reports themselves; nothing here
knows the synthetic cohort's ground truth.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NUMBER = re.compile(r"\d+(?:\.\d+)?")
VIEW_PHRASES = {"A4C": "APICAL FOUR CHAMBER VIEW.", "A2C": "APICAL TWO CHAMBER VIEW.",
                "A3C": "APICAL THREE CHAMBER VIEW.", "A5C": "APICAL FIVE CHAMBER VIEW.",
                "PLAX": "PARASTERNAL LONG AXIS VIEW.", "PSAX": "PARASTERNAL SHORT AXIS VIEW.",
                "SC4C": "SUBCOSTAL FOUR CHAMBER VIEW."}
_VIEW_OF_PHRASE = {p: v for v, p in VIEW_PHRASES.items()}
# numeric sentences that name one of these are the same quantity however they are phrased
QUANTITY_ALIASES = ("EJECTION FRACTION",)
_EF = re.compile(r"EJECTION FRACTION[^.\d]*?(\d{1,2}(?:\.\d)?)\s*%?", re.IGNORECASE)

Facts = dict[str, float | None]


def report_ef(text: str | None) -> float | None:
    """The ejection fraction a report states (``LV EJECTION FRACTION IS 35%``), or None."""
    m = _EF.search(text or "")
    return float(m.group(1)) if m else None


def split_sentences(report: str) -> list[str]:
    """Report text -> sentences (reports are upper-case template phrases ending in '.')."""
    parts = [p.strip() for p in re.split(r"(?<=\.)\s+", report.strip()) if p.strip()]
    return parts or [report]


def sentence_fact(sentence: str) -> tuple[str, float | None]:
    """A sentence -> (key, value): the view, a quantity with its number, or the template sentence itself."""
    s = sentence.strip()
    if s in _VIEW_OF_PHRASE:
        return "VIEW:" + _VIEW_OF_PHRASE[s], None
    nums = NUMBER.findall(s)
    if not nums:
        return s, None
    key = NUMBER.sub("#", s)
    for alias in QUANTITY_ALIASES:
        if alias in key:
            key = alias
    return key, float(nums[0])


# Structures a report sentence may name -> the standard transthoracic views that show them. A sentence
# that names only structures out of a clip's view describes the clip's study but not the clip: a
# TAVR stent is not in an apical four-chamber view, a pacing lead in the right ventricle not in A2C.
STRUCTURE_VIEWS: dict[str, frozenset[str]] = {
    "AORTIC": frozenset({"PLAX", "PSAX", "A3C", "A5C"}),
    "RIGHT VENTRIC": frozenset({"A4C", "A5C", "PLAX", "PSAX", "SC4C"}),
    "RIGHT ATRI": frozenset({"A4C", "A5C", "PSAX", "SC4C"}),
    "TRICUSPID": frozenset({"A4C", "A5C", "PSAX", "SC4C"}),
}


def visible_in_view(sentence: str, view: str | None) -> bool:
    """Whether a clip of ``view`` can show what ``sentence`` describes (True when the view is unknown or
    the sentence names no view-limited structure; with several structures, any one in view suffices)."""
    if view not in VIEW_PHRASES:
        return True
    upper = sentence.upper()
    named = [views for key, views in STRUCTURE_VIEWS.items() if key in upper]
    return not named or any(view in views for views in named)


def visible_report(report: str, view: str | None) -> str:
    """The sentences of a study's report that a clip of ``view`` can show (the report itself when none)."""
    sents = split_sentences(report)
    keep = [s for s in sents if visible_in_view(s, view)]
    return " ".join(keep) if keep else report.strip()


def fact_sentence(key: str) -> str | None:
    """The sentence that states a (non-quantity) fact: its template sentence, or its view's phrase (None
    for a view without a standard phrase, e.g. a sidecar's own view label)."""
    return VIEW_PHRASES.get(key.removeprefix("VIEW:")) if key.startswith("VIEW:") else key


def report_facts(report: str, view: str | None = None) -> Facts:
    """All facts of one clip: its report's sentences, plus its view when known."""
    facts: Facts = dict(sentence_fact(s) for s in split_sentences(report))
    if view:
        facts["VIEW:" + view] = None
    return facts


def value_tolerance(value: float) -> float:
    """Scale on which two reported numbers count as the same (8 % of the value, at least 2 units)."""
    return max(2.0, 0.08 * abs(value))


Statements = list[tuple[str, float | None]]


def statements(text: str) -> Statements:
    """A text's statements as (key, value) facts, parsed once per text of a batch."""
    return [sentence_fact(s) for s in split_sentences(text)]


def relevance(facts: Facts, text: str | Statements) -> float:
    """How well ``text`` (or its :func:`statements`) describes a clip with ``facts``: 1 if every statement
    holds, decaying with numeric distance for quantities, 0 if it states something the report does not."""
    r = 1.0
    for key, value in statements(text) if isinstance(text, str) else text:
        if key not in facts:
            return 0.0
        known = facts[key]
        if value is not None and known is not None:
            r *= math.exp(-abs(known - value) / value_tolerance(value))
    return r


def quantity_grid(numeric: Sequence[tuple[str, float, float]], n: int,
                  rng: random.Random) -> list[tuple[str, str, float]]:
    """``n`` sentences per quantity at values spread evenly over its observed range from a random offset,
    each in one of the quantity's templates drawn at random: (quantity key, sentence, value).

    ``numeric`` is :attr:`PromptSampler.numeric`. These are the sentences a regression prompt set asks
    about ("LV EJECTION FRACTION IS 35%."): a fact anchor for a number, scored against every clip with a
    target that decays with the distance to the clip's reported value (:func:`value_target`). Values are
    whole numbers, as the reports' quantities are (EF in %, LVIDd in mm; :meth:`PromptSampler.sample`
    draws them the same way), kept within the observed range.
    """
    by_key: dict[str, list[tuple[str, float, float]]] = {}
    for tpl, lo, hi in numeric:
        by_key.setdefault(sentence_fact(tpl.format(1))[0], []).append((tpl, lo, hi))
    out = []
    for key, tpls in sorted(by_key.items()):
        lo, hi = min(t[1] for t in tpls), max(t[2] for t in tpls)
        first, last = math.ceil(lo), max(math.floor(hi), math.ceil(lo))  # whole numbers within the range
        u = rng.random()
        for j in range(n):
            value = float(min(max(round(lo + (j + u) / n * (hi - lo)), first), last))
            out.append((key, rng.choice(tpls)[0].format(int(value)), value))
    return out


def value_target(known: np.ndarray, value: np.ndarray) -> np.ndarray:
    """How well a clip with reported ``known`` values (NaN = not stated) is described by a sentence stating
    ``value`` (broadcast): ``exp(-|known - value| / tol)`` as in :func:`relevance`, 0 where not stated."""
    value = np.asarray(value)
    tol = np.array([value_tolerance(float(v)) for v in value.ravel()]).reshape(value.shape)  # a few values a step
    with np.errstate(invalid="ignore"):
        t = np.exp(-np.abs(known - value) / tol)
    return np.nan_to_num(t, nan=0.0).astype(np.float32)


def augment_report(report: str, rng: random.Random, view: str | None = None, view_rate: float = 0.5) -> str:
    """Half of the time the whole report, otherwise a random non-empty subset of its sentences.

    When the clip's view is known its phrase is prepended at ``view_rate``: the view is the most visible
    property of a frame, an easy signal that gets training from scratch going.
    """
    sents = split_sentences(report)
    if rng.random() >= 0.5 and len(sents) > 1:
        k = rng.randint(1, len(sents))
        sents = [sents[i] for i in sorted(rng.sample(range(len(sents)), k))]
    if view in VIEW_PHRASES and rng.random() < view_rate:
        sents = [VIEW_PHRASES[view], *sents]
    return " ".join(sents)


@dataclass
class PromptSampler:
    """Single-statement texts drawn from the training reports: every template sentence, every numeric
    template at values across its observed range, and the view phrases — the shape of search queries and
    zero-shot prompts, added to each batch so that they, not only whole reports, align with images."""

    sentences: list[str]
    numeric: list[tuple[str, float, float]]  # (template with '{}', low, high)
    views: list[str]

    @classmethod
    def from_reports(cls, reports: Sequence[str], views: Sequence[str | None] = ()) -> PromptSampler:
        plain: set[str] = set()
        ranges: dict[str, list[float]] = {}
        for rep in reports:
            for s in split_sentences(rep):
                nums = NUMBER.findall(s)
                if not nums:
                    plain.add(s)
                elif len(nums) == 1:
                    ranges.setdefault(NUMBER.sub("{}", s), []).append(float(nums[0]))
        numeric = [(t, min(v), max(v)) for t, v in sorted(ranges.items())]
        vp = sorted({VIEW_PHRASES[v] for v in views if v in VIEW_PHRASES})
        return cls(sorted(plain), numeric, vp)

    def sample(self, rng: random.Random) -> str:
        u = rng.random()
        if self.numeric and (u < 0.4 or not self.sentences):
            tpl, lo, hi = rng.choice(self.numeric)
            return tpl.format(int(round(rng.uniform(lo, hi))))
        if self.views and u > 0.9:
            return rng.choice(self.views)
        return rng.choice(self.sentences) if self.sentences else ""


@dataclass
class ReportLabels:
    """Per-clip targets read from reports: presence of each fact (multi-label) and standardised values of
    each quantity (regression, masked where a report does not state it)."""

    keys: list[str]
    quantities: list[str]
    present: np.ndarray  # (N, K) float32
    values: np.ndarray  # (N, Q) float32, standardised
    stated: np.ndarray  # (N, Q) float32 mask
    known: np.ndarray  # (N, Q) float32, the reported values as written, NaN where not stated

    @classmethod
    def build(cls, facts: Sequence[Facts]) -> ReportLabels:
        keys = sorted({k for f in facts for k, v in f.items() if v is None})
        quants = sorted({k for f in facts for k, v in f.items() if v is not None})
        present = np.array([[k in f for k in keys] for f in facts], np.float32).reshape(len(facts), len(keys))
        vals = np.zeros((len(facts), len(quants)), np.float32)
        stated = np.zeros_like(vals)
        known = np.full_like(vals, np.nan)
        for j, q in enumerate(quants):
            col = [(i, f[q]) for i, f in enumerate(facts) if f.get(q) is not None]
            xs = np.array([v for _, v in col], np.float64)
            mu, sd = float(xs.mean()), float(xs.std()) + 1e-6
            for i, v in col:
                vals[i, j] = (float(v) - mu) / sd  # type: ignore[arg-type]
                stated[i, j] = 1.0
                known[i, j] = v  # type: ignore[assignment]
        return cls(keys, quants, present, vals, stated, known)
