"""Scope of a clip: echocardiogram or not, B-mode or colour Doppler, and its view, each with a confidence.

EchoCLIP-family models were trained on transthoracic B-mode echo (EchoCLIP: apical four-chamber clips):
a thyroid scan, a CT, or a colour-Doppler clip is outside what they know, and their zero-shot numbers for
such a clip mean nothing. Every indexed clip and every upload is therefore given a scope:

* **echo or not**: log-odds evidence added up from cheap signals that need no trained model (DICOM
  modality, the anatomy in ImageType and the descriptions, transducer type, imaging depth from the
  ultrasound regions, an ECG trace or heart rate, the shape of the imaging sector, cine or single frame)
  and from the model (how far the clip's vector lies from the archive's own clips, against the archive's
  own nearest-neighbour spread). ``echo_confidence`` is the resulting probability.
* **B-mode or colour Doppler**: the share of sector pixels whose colour departs from the clip's grey (or
  tinted) display map, plus the DICOM ImageType mode bits and colour-flow regions.
* **view**: a label when the manifest or the DICOM header names one; else the model: nearest centroid of
  the archive's labelled clips when it has enough, else zero-shot view prompts.

``in_scope`` = echo and B-mode. Out-of-scope clips are indexed and marked (table ``clip_scope``); their
zero-shot predictions are not stored and study vectors (identity, change) pool only in-scope clips.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch.catalog import Catalog
from echosearch.model.report_facts import VIEW_PHRASES

PRIOR_LOG_ODDS = 1.5
"""An echo archive's prior that a clip is echo (p = 0.82) before any evidence."""
DOPPLER_SHARE = 0.02
"""Share of sector pixels in flow colours above which a clip is colour Doppler (B-mode clips measure 0)."""
MIN_ARCHIVE = 20
"""Clips an archive needs before its nearest-neighbour spread counts as model evidence."""
CARDIAC_WORDS = ("ECHO", "CARDI", "HEART", "TTE", "TEE", "APICAL", "PARASTERNAL", "SUBCOSTAL", "A4C", "A2C",
                 "PLAX", "PSAX", "EPICARDIAL", "STRESS", "LAX", "VENTRIC", "ATRI", "MITRAL", "AORTIC VALVE")
OTHER_WORDS = ("THYROID", "ABDOM", "LIVER", "KIDNEY", "RENAL", "GALLBLADDER", "SPLEEN", "PANCREA", "BREAST",
               "OBSTETRIC", " OB ", "GYN", "PELVI", "PROSTATE", "SMALL PARTS", "VASCULAR", "CAROTID", "VENOUS",
               "LYMPH", "TESTI", "SCROT", "MUSCUL", "NECK", "BLADDER", "UTER", "OVAR", "FETAL", "NEONATAL HEAD")
VIEW_PATTERNS = (("A4C", r"\bA4C\b|APICAL ?4|4 ?CH|FOUR CHAMBER"), ("A2C", r"\bA2C\b|APICAL ?2|2 ?CH|TWO CHAMBER"),
                 ("A3C", r"\bA3C\b|APICAL ?3|3 ?CH|THREE CHAMBER|APLAX"), ("A5C", r"\bA5C\b|5 ?CH|FIVE CHAMBER"),
                 ("PLAX", r"\bPLAX\b|PS ?LAX|PARASTERNAL LONG"), ("PSAX", r"\bPSAX\b|PS ?SAX|SHORT AXIS"),
                 ("SC4C", r"\bSC4C\b|SUBCOSTAL"))
SCOPE_COLUMNS: dict[str, Any] = {
    "video_key": pl.Int64, "is_echo": pl.Boolean, "echo_confidence": pl.Float64, "mode": pl.String,
    "mode_confidence": pl.Float64, "view": pl.String, "view_confidence": pl.Float64, "view_source": pl.String,
    "in_scope": pl.Boolean, "evidence": pl.String, "signals": pl.String, "model_checked": pl.Boolean,
}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, x))))


@dataclass
class Evidence:
    """One signal's contribution: log-odds for echo (or for Doppler) and the sentence a person reads."""

    signal: str
    log_odds: float
    reason: str


@dataclass
class ClipScope:
    """The scope of one clip (see the module docstring)."""

    is_echo: bool
    echo_confidence: float
    mode: str  # "bmode" or "doppler"
    mode_confidence: float
    view: str | None = None
    view_confidence: float | None = None
    view_source: str | None = None  # label, dicom header, archive labels, zero-shot
    evidence: list[Evidence] = field(default_factory=list)
    signals: dict[str, Any] = field(default_factory=dict)
    model_checked: bool = False

    @property
    def in_scope(self) -> bool:
        return self.is_echo and self.mode == "bmode"

    def summary(self) -> str:
        """One line for a person: what the clip is and how sure."""
        what = (f"echocardiogram ({self.echo_confidence:.0%} sure)" if self.is_echo
                else f"not an echocardiogram ({1 - self.echo_confidence:.0%} sure)")
        mode = "colour Doppler" if self.mode == "doppler" else "B-mode"
        out = f"{what}, {mode} ({self.mode_confidence:.0%})"
        if self.view:
            src = f", {self.view_confidence:.0%}" if self.view_confidence is not None and self.view_source not in (
                "label", "dicom header") else ""
            out += f", view {self.view} ({self.view_source}{src})"
        return out

    def reasons(self, n: int = 3) -> list[str]:
        """The strongest evidence, strongest first (the side it argues for is in the words)."""
        return [e.reason for e in sorted(self.evidence, key=lambda e: -abs(e.log_odds))[:n] if e.log_odds]

    def row(self, video_key: int) -> dict[str, Any]:
        return {"video_key": int(video_key), "is_echo": self.is_echo, "echo_confidence": self.echo_confidence,
                "mode": self.mode, "mode_confidence": self.mode_confidence, "view": self.view,
                "view_confidence": self.view_confidence, "view_source": self.view_source, "in_scope": self.in_scope,
                "evidence": json.dumps([asdict(e) for e in self.evidence]),
                "signals": json.dumps(self.signals, default=str), "model_checked": self.model_checked}


# ---- cheap signals ---------------------------------------------------------------------------------------
def header_signals(path: Path) -> dict[str, Any]:
    """What a DICOM header says about anatomy, probe, depth, ECG and mode (``{}`` for AVI/MP4 or unreadable)."""
    from echosearch.ingest.decode import read_dicom_header

    try:
        ds = read_dicom_header(Path(path), check=False)
    except Exception:  # a header that cannot be read gives no evidence; decode reports real failures
        return {}
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    words = " ".join(str(ds.get(t) or "") for t in ("StudyDescription", "SeriesDescription", "ProtocolName",
                                                    "BodyPartExamined", "ViewName", "PerformedProcedureStepDescription"))
    regions = list(ds.get("SequenceOfUltrasoundRegions") or [])
    depth = None
    for r in regions:
        if int(r.get("RegionDataType", 0) or 0) == 1 and int(r.get("PhysicalUnitsYDirection", 0) or 0) == 3:
            rows = int(r.get("RegionLocationMaxY1", 0) or 0) - int(r.get("RegionLocationMinY0", 0) or 0)
            delta = float(r.get("PhysicalDeltaY", 0) or 0)
            if rows > 0 and 0 < delta < 1:
                depth = round(rows * delta, 1)
                break
    mode_bits = None
    if len(image_type) >= 4 and re.fullmatch(r"[0-9A-F]{4}", image_type[3]):
        mode_bits = int(image_type[3], 16)
    try:
        heart_rate = float(ds.get("HeartRate") or 0)
    except (TypeError, ValueError):
        heart_rate = 0.0
    return {"modality": str(ds.get("Modality") or "").upper() or None,
            "anatomy": image_type[2] if len(image_type) >= 3 and image_type[2] else None,
            "words": " ".join(words.split()) or None,
            "transducer": str(ds.get("TransducerType") or "").upper() or None,
            "depth_cm": depth, "heart_rate": heart_rate or None, "mode_bits": mode_bits,
            "ecg_region": any(int(r.get("RegionDataType", 0) or 0) == 10 for r in regions),
            "colour_region": any(int(r.get("RegionDataType", 0) or 0) == 2 for r in regions)}


def frame_signals(frames: np.ndarray) -> dict[str, float]:
    """From model-input frames (N,S,S,3, outside the sector blanked): the share of sector pixels in flow
    colours and the sector's apex ratio (width of its top eighth over its widest row: a phased-array fan is
    narrow at the top, a linear probe's rectangle is not)."""
    fr = np.asarray(frames, dtype=np.int16)
    if fr.ndim != 4 or fr.shape[-1] != 3 or fr.size == 0:
        return {}
    mask = fr.max(axis=(0, 3)) > 10
    sector_px = int(mask.sum()) * fr.shape[0]
    total = fr.sum(-1) + 1
    chroma = fr.max(-1) - fr.min(-1)
    bright = total > 120
    chrom = fr / total[..., None]
    grey = np.median(chrom[bright], axis=0) if bright.any() else np.full(3, 1 / 3)
    # a display map (grey or tinted) keeps one chromaticity; flow colours depart from it strongly
    flow = bright & (chroma >= 50) & (np.abs(chrom - grey).sum(-1) > 0.25)
    rows = np.flatnonzero(mask.any(1))
    apex = 1.0
    if len(rows):
        widths = mask.sum(1)[rows[0]:rows[-1] + 1]
        apex = float(widths[:max(1, len(widths) // 8)].mean() / max(1, widths.max()))
    return {"colour_share": round(float(flow.sum()) / max(1, sector_px), 4), "apex_ratio": round(apex, 3),
            "n_frames_sampled": int(fr.shape[0])}


def _has(words: str | None, vocab: Sequence[str]) -> str | None:
    padded = f" {(words or '').upper()} "
    return next((w.strip() for w in vocab if w in padded), None)


def echo_evidence(sig: dict[str, Any]) -> list[Evidence]:
    """Log-odds evidence that a clip is echo, from cheap signals (model evidence is added apart)."""
    ev = [Evidence("prior", PRIOR_LOG_ODDS, "an echo archive: clips are echo unless evidence says otherwise")]
    mod = sig.get("modality")
    if mod and mod != "US":
        ev.append(Evidence("modality", -12.0, f"DICOM modality {mod}: not ultrasound"))
    text = " ".join(str(sig.get(k) or "") for k in ("anatomy", "words"))
    other, cardiac = _has(text, OTHER_WORDS), _has(text, CARDIAC_WORDS)
    if other:
        ev.append(Evidence("anatomy", -5.0, f"the DICOM header names non-cardiac anatomy ({other.lower()})"))
    elif cardiac:
        ev.append(Evidence("anatomy", 4.0, f"the DICOM header names a cardiac exam ({cardiac.lower()})"))
    probe = sig.get("transducer")
    if probe and "LINEAR" in probe and "CURVED" not in probe:
        ev.append(Evidence("transducer", -2.5, "linear probe (vascular/small-parts imaging; echo uses phased arrays)"))
    elif probe and "CURVED" in probe:
        ev.append(Evidence("transducer", -1.0, "curved-array probe (abdominal/obstetric imaging)"))
    elif probe and "PHASED" in probe:
        ev.append(Evidence("transducer", 1.0, "phased-array probe (as used for echo)"))
    depth = sig.get("depth_cm")
    if depth is not None and depth < 8:
        ev.append(Evidence("depth", -2.5, f"imaging depth {depth:.1f} cm (adult echo is usually 12-24 cm)"))
    elif depth is not None and 11 <= depth <= 26:
        ev.append(Evidence("depth", 0.5, f"imaging depth {depth:.1f} cm, as in echo"))
    if sig.get("ecg_region") or (sig.get("heart_rate") or 0) > 0:
        ev.append(Evidence("ecg", 1.5, "an ECG was recorded with the clip"))
    apex = sig.get("apex_ratio")
    if apex is not None and apex > 0.75:
        ev.append(Evidence("geometry", -2.0, "rectangular image (linear probe), not a sector"))
    elif apex is not None and apex < 0.3:
        ev.append(Evidence("geometry", 0.5, "narrow-apex sector, as from a phased-array echo probe"))
    if sig.get("n_frames") == 1:
        ev.append(Evidence("frames", -0.5, "a single still frame (echo is mostly recorded as cine loops)"))
    return ev


def doppler_probability(sig: dict[str, Any]) -> tuple[float, str]:
    """(probability of colour Doppler, reason) from the flow-colour share, mode bits and colour regions."""
    share = sig.get("colour_share")
    lo = 0.0 if share is None else 8.0 * (math.log(max(share, 1e-4)) - math.log(DOPPLER_SHARE)) / math.log(10)
    reason = f"{share:.1%} of the sector in flow colours" if share is not None else "no pixel evidence"
    bits = sig.get("mode_bits")
    if bits is not None and bits & (0x10 | 0x20 | 0x100):
        lo, reason = lo + 4.0, reason + "; the DICOM image type says colour Doppler"
    if sig.get("colour_region"):
        lo, reason = lo + 3.0, reason + "; a colour-flow region is recorded"
    return _sigmoid(lo), reason


def header_view(sig: dict[str, Any]) -> str | None:
    """A view named by the DICOM header's descriptions (e.g. the series description ``A4C``)."""
    words = (sig.get("words") or "").upper()
    return next((v for v, pat in VIEW_PATTERNS if re.search(pat, words)), None)


def decide(sig: dict[str, Any], extra: Sequence[Evidence] = (), view: tuple[str | None, float | None, str | None]
           = (None, None, None), model_checked: bool = False) -> ClipScope:
    """A scope from cheap signals plus model evidence (``extra``) and a view (value, confidence, source)."""
    ev = echo_evidence(sig) + list(extra)
    p_echo = _sigmoid(sum(e.log_odds for e in ev))
    p_dop, why = doppler_probability(sig)
    mode = "doppler" if p_dop >= 0.5 else "bmode"
    return ClipScope(p_echo >= 0.5, round(p_echo, 4), mode, round(max(p_dop, 1 - p_dop), 4), view[0],
                     None if view[1] is None else round(view[1], 4), view[2],
                     ev + [Evidence("doppler", 0.0, why)], sig, model_checked)


def cheap_scope(path: Path, frames: np.ndarray, n_frames: int | None, label_view: str | None = None,
                kind: str = "dicom") -> ClipScope:
    """The scope a clip gets from cheap signals alone (at indexing, before its vector is compared)."""
    sig = (header_signals(path) if kind == "dicom" else {}) | frame_signals(frames) | {"n_frames": n_frames}
    hv = header_view(sig)
    view = (label_view, 1.0, "label") if label_view else (hv, 1.0, "dicom header") if hv else (None, None, None)
    return decide(sig, view=view)


def from_row(row: dict[str, Any]) -> ClipScope:
    """A stored ``clip_scope`` row back as a :class:`ClipScope`."""
    ev = [Evidence(**e) for e in json.loads(row.get("evidence") or "[]")]
    return ClipScope(bool(row["is_echo"]), float(row["echo_confidence"]), str(row["mode"]),
                     float(row["mode_confidence"]), row.get("view"), row.get("view_confidence"),
                     row.get("view_source"), ev, json.loads(row.get("signals") or "{}"),
                     bool(row.get("model_checked")))


# ---- model evidence ----------------------------------------------------------------------------------------
@dataclass
class ArchiveModel:
    """What the archive itself says about a vector: its nearest-neighbour spread and its view centroids."""

    ref: np.ndarray  # (n, d) normalised in-scope reference vectors (a sample)
    ref_keys: np.ndarray
    nn_median: float
    nn_mad: float
    centroids: dict[str, np.ndarray]
    view_prompts: dict[str, np.ndarray]
    view_source: str | None

    @classmethod
    def build(cls, catalog: Catalog, encoder: Any = None, max_ref: int = 20000, seed: int = 0) -> ArchiveModel | None:
        """From the catalog's video vectors (None when it has none); ``encoder`` gives zero-shot view prompts."""
        if not catalog.has_table("video_embeddings"):
            return None
        keys = catalog.embedding_keys("video")
        out = catalog.out_of_scope_videos()
        keys = keys[~np.isin(keys, np.fromiter(out, np.int64, len(out)))]
        if len(keys) > max_ref:  # a sample: only its vectors are read
            keys = np.sort(np.random.default_rng(seed).choice(keys, max_ref, replace=False))
        if len(keys) == 0:
            return None
        keys, vecs = catalog.embeddings("video", keys.tolist())
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        med = mad = float("nan")
        if len(keys) >= MIN_ARCHIVE:
            nn = _nn_cosines(vecs[:2000], vecs, exclude_self=True)
            med = float(np.median(nn))
            mad = float(max(np.median(np.abs(nn - med)) * 1.4826, 1e-3))
        labels = catalog.video_views()
        centroids: dict[str, np.ndarray] = {}
        for view, group in labels.select("video_key", "view").group_by("view"):
            rows = np.flatnonzero(np.isin(keys, group["video_key"].to_numpy()))
            if len(rows) >= 3:
                c = vecs[rows].mean(axis=0)
                centroids[str(view[0])] = c / max(float(np.linalg.norm(c)), 1e-12)
        prompts: dict[str, np.ndarray] = {}
        if encoder is not None:
            tv = np.asarray(encoder.encode_text(list(VIEW_PHRASES.values())), dtype=np.float32)
            prompts = {v: t / max(float(np.linalg.norm(t)), 1e-12) for v, t in zip(VIEW_PHRASES, tv, strict=True)}
        source = "archive labels" if len(centroids) >= 2 else "zero-shot" if prompts else None
        return cls(vecs, keys, med, mad, centroids if len(centroids) >= 2 else {}, prompts, source)

    def nn_z(self, vecs: np.ndarray, self_keys: np.ndarray | None = None) -> np.ndarray:
        """Robust z of each vector's nearest-neighbour cosine against the archive's own spread (NaN: too few)."""
        if not math.isfinite(self.nn_median):
            return np.full(len(vecs), np.nan)
        nn = _nn_cosines(vecs, self.ref, exclude_keys=self_keys, ref_keys=self.ref_keys)
        return (nn - self.nn_median) / self.nn_mad

    def view_of(self, vecs: np.ndarray) -> list[tuple[str | None, float | None, str | None]]:
        """(view, confidence, source) per vector: nearest labelled centroid, else zero-shot view prompts."""
        table = self.centroids or self.view_prompts
        if not table:
            return [(None, None, None)] * len(vecs)
        names = list(table)
        sims = np.asarray(vecs, np.float32) @ np.stack([table[n] for n in names]).T
        logits = sims / 0.02  # a CLIP-like temperature; confidences are the model's, not calibrated
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        best = p.argmax(1)
        return [(names[b], float(p[i, b]), self.view_source) for i, b in enumerate(best)]


def _nn_cosines(q: np.ndarray, ref: np.ndarray, *, exclude_self: bool = False, exclude_keys: np.ndarray | None = None,
                ref_keys: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """Best cosine of each query row among ``ref`` (its own row, or rows with its key, left out)."""
    qn = np.asarray(q, np.float32)
    qn = qn / np.maximum(np.linalg.norm(qn, axis=1, keepdims=True), 1e-12)
    out = np.empty(len(qn), np.float32)
    for s in range(0, len(qn), chunk):
        sims = qn[s:s + chunk] @ ref.T
        if exclude_self:
            idx = np.arange(s, min(s + chunk, len(qn)))
            sims[idx - s, idx] = -np.inf
        if exclude_keys is not None and ref_keys is not None:
            sims[np.asarray(exclude_keys[s:s + chunk])[:, None] == ref_keys[None, :]] = -np.inf
        out[s:s + chunk] = sims.max(1)
    return out


def model_evidence(z: float) -> Evidence | None:
    """Log-odds from how far a clip's vector lies from the archive (robust z of its nearest-neighbour cosine)."""
    if not math.isfinite(z):
        return None
    # weaker than the cheap signals on purpose: an unusual echo (other scanner, rare view) is far from the
    # archive too, and a header-less AVI has only the prior and its geometry to set against this
    if z < -6:
        return Evidence("model", -1.5, f"unlike every clip in this archive (nearest-neighbour z {z:.1f})")
    if z < -3:
        return Evidence("model", -0.75, f"far from the clips of this archive (nearest-neighbour z {z:.1f})")
    if z > -1.5:
        return Evidence("model", 0.5, "close to clips of this archive")
    return None


def finalize(catalog: Catalog, encoder: Any = None, chunk: int = 50000) -> int:
    """Add model evidence and model views to the clips not yet model-checked (after encoding); a clip the
    model moves out of scope loses its zero-shot predictions. Returns how many clips were checked."""
    todo = catalog.scope_to_check()
    if not len(todo):
        return 0
    model = ArchiveModel.build(catalog, encoder)
    if model is None:
        return 0
    n = 0
    for start in range(0, len(todo), chunk):  # bounded memory on a first index of a large archive
        n += _finalize_chunk(catalog, model, todo[start:start + chunk])
    if catalog.has_table("video_embeddings"):
        catalog.set_manifest("scope", {"nn_median": model.nn_median, "nn_mad": model.nn_mad,
                                       "view_source": model.view_source, "n_reference": int(len(model.ref_keys)),
                                       "views": sorted(model.centroids or model.view_prompts)})
    return n


def _finalize_chunk(catalog: Catalog, model: ArchiveModel, todo: np.ndarray) -> int:
    keys, vecs = catalog.embeddings("video", [int(k) for k in todo])
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    zs = model.nn_z(vecs, keys)
    views = model.view_of(vecs)
    stored = {int(r["video_key"]): r for r in catalog.scope_rows([int(k) for k in keys]).iter_rows(named=True)}
    labelled = {int(k): (v, src) for k, v, src in catalog.video_views().iter_rows()}
    rows, demoted = [], []
    for key, z, mview in zip(keys.tolist(), zs.tolist(), views, strict=True):
        old = stored.get(key)
        sig = json.loads(old["signals"]) if old else {}
        if key in labelled:
            view: tuple[str | None, float | None, str | None] = (labelled[key][0], 1.0, labelled[key][1])
        else:
            view = mview
        ev = model_evidence(float(z))
        new = decide(sig, [ev] if ev else [], view, model_checked=True)
        if not new.in_scope:
            demoted.append(key)
        rows.append(new.row(key))
    with catalog.transaction():
        catalog.store_scope(pl.DataFrame(rows, schema=SCOPE_COLUMNS))
        catalog.drop_predictions("video", demoted)
    return len(rows)


_MODELS: dict[tuple[int, int], ArchiveModel | None] = {}


def archive_model(catalog: Catalog, encoder: Any) -> ArchiveModel | None:
    """:meth:`ArchiveModel.build` cached per catalog connection and generation (uploads reuse it)."""
    key = (id(catalog), catalog.generation())
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = ArchiveModel.build(catalog, encoder, max_ref=5000)
    return _MODELS[key]


def assess_file(path: Path, searcher: Any) -> tuple[ClipScope, np.ndarray | None]:
    """(scope, video vector) of an uploaded file against a searcher's index; a file decode refuses is out of
    scope, with why, and has no vector."""
    from echosearch.errors import IngestError
    from echosearch.ingest.discover import inspect_file
    from echosearch.run.read import process_file

    enc = searcher.encoder()
    try:
        prepared = process_file(inspect_file(Path(path)), enc.policy)
    except IngestError as exc:
        sig = header_signals(Path(path))
        why = Evidence("decode", -12.0, f"cannot be read as an ultrasound clip: {exc}")
        return decide(sig, [why]), None
    scope = cheap_scope(Path(path), prepared.frames, prepared.meta.n_frames, kind=prepared.record.kind)
    fv = np.asarray(enc.encode_frames(prepared.frames), np.float32)
    vec = fv.mean(axis=0)
    vec = (vec / max(float(np.linalg.norm(vec)), 1e-12))[None, :]
    model = archive_model(searcher.catalog, enc)
    if model is None:
        return scope, vec[0]
    ev = model_evidence(float(model.nn_z(vec)[0]))
    view = (scope.view, scope.view_confidence, scope.view_source) if scope.view else model.view_of(vec)[0]
    return decide(scope.signals, [ev] if ev else [], view, model_checked=True), vec[0]
