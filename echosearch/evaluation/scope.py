"""Evaluation of scope and search confidence (part of ``echosearch eval``).

* ``view``: accuracy of the model's view (nearest centroid of the archive's labelled clips, each patient's
  clips predicted from the other patients' centroids, so no clip sees its own label) against the truth
  views, with a bootstrap interval over patients; and of the zero-shot view prompts when an encoder is given.
* ``real_files``: echo-or-not and B-mode-or-Doppler of the real DICOM corpus (``shared/testdata/real-dicom``:
  echo, thyroid, abdomen, lymph node, CT, MR, XA, ECG) against what each file is, scoped against this index.
* ``no_close_match``: the share of nonsense queries (seeded apart from the calibration's) answered "no close
  match", and the share of the archive's own report sentences that are answered with a match.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from echosearch.catalog import Catalog

EVAL_NULL_SEED = 777001  # never the calibration's seed (confidence.NULL_SEED)
# what each file of the real corpus is: (echo, mode); decode refuses the non-ultrasound ones
REAL_TRUTH: dict[str, tuple[bool, str]] = {
    "SonoSite_echo_A4C_30f_JPEG_small.dcm": (True, "bmode"), "ACUSON_Sequoia_echo_A4C_65f_JPEG.dcm": (True, "bmode"),
    "US-PAL-8-10x-echo_JPEGLS.dcm": (True, "doppler"), "US-MONO2-8-8x-execho.dcm": (True, "bmode"),
    "US-RGB-8-esopecho.dcm": (True, "doppler"), "Philips_EPIQ_echo_PLAX_JPEGLossless.dcm": (True, "bmode"),
    "US1_J2KR.dcm": (False, "doppler"), "Acuson_thyroid_YBR_FULL_RLE.dcm": (False, "bmode"),
    "Philips_iU22_abdomen_JPEGLS.dcm": (False, "bmode"), "wrong_CT_small.dcm": (False, "bmode"),
    "wrong_MR_multiframe_emri_small.dcm": (False, "bmode"), "wrong_XA_cine_96f_JPEG.dcm": (False, "bmode"),
    "wrong_ECG_waveform_no_pixels.dcm": (False, "bmode"),
}


def real_corpus() -> Path | None:
    """``ECHOSEARCH_REAL_DICOM``, else ``shared/testdata/real-dicom`` beside (or above) the source checkout."""
    env = os.environ.get("ECHOSEARCH_REAL_DICOM")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for base in Path(__file__).resolve().parents:
        cand = base / "shared" / "testdata" / "real-dicom"
        if cand.is_dir():
            return cand
    return None


def _boot(correct: np.ndarray, groups: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of the accuracy, resampling groups (patients)."""
    uniq = np.unique(groups)
    if len(uniq) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    by = [correct[groups == g] for g in uniq]
    accs = []
    for _ in range(n):
        pick = rng.integers(0, len(uniq), len(uniq))
        c = np.concatenate([by[i] for i in pick])
        accs.append(c.mean())
    return [round(float(np.quantile(accs, 0.025)), 4), round(float(np.quantile(accs, 0.975)), 4)]


def view_accuracy(catalog: Catalog, truth: pl.DataFrame | None = None, encoder: Any = None,
                  seed: int = 0) -> dict[str, Any]:
    """Model view accuracy with labels hidden (leave one patient out); ``truth``: video_key, view columns
    (default: the catalog's own labels)."""
    labels = (truth if truth is not None and "view" in truth.columns else catalog.video_views()).select("video_key", "view")
    labels = labels.drop_nulls()
    if labels.height == 0:
        return {"skipped": "no view labels"}
    keys, vecs = catalog.embeddings("video", labels["video_key"].to_list())
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    view_of = dict(labels.iter_rows())
    y = np.array([view_of[int(k)] for k in keys])
    pat = catalog.video_patient_keys()
    groups = np.array([pat[int(k)] for k in keys])
    names = sorted(set(y.tolist()))
    pred = np.empty(len(keys), dtype=object)
    for g in np.unique(groups):
        test, train = groups == g, groups != g
        cents = []
        for v in names:
            m = train & (y == v)
            c = vecs[m].mean(0) if m.any() else np.zeros(vecs.shape[1])
            cents.append(c / max(float(np.linalg.norm(c)), 1e-12))
        pred[test] = np.array(names)[np.argmax(vecs[test] @ np.stack(cents).T, axis=1)]
    correct = (pred == y).astype(float)
    out: dict[str, Any] = {"n": int(len(keys)), "views": names, "accuracy": round(float(correct.mean()), 4),
                           "ci95": _boot(correct, groups, seed=seed), "method": "archive labels, leave one patient out",
                           "chance": round(float(max(np.mean(y == v) for v in names)), 4)}
    if encoder is not None:
        from echosearch.model.report_facts import VIEW_PHRASES

        known = [v for v in names if v in VIEW_PHRASES]
        if known:
            tv = np.asarray(encoder.encode_text([VIEW_PHRASES[v] for v in known]), np.float32)
            tv = tv / np.maximum(np.linalg.norm(tv, axis=1, keepdims=True), 1e-12)
            zs = np.array(known)[np.argmax(vecs @ tv.T, axis=1)]
            zc = (zs == y).astype(float)
            out["zero_shot"] = {"accuracy": round(float(zc.mean()), 4), "ci95": _boot(zc, groups, seed=seed)}
    return out


def real_file_scope(catalog: Catalog, folder: Path | None = None) -> dict[str, Any]:
    """Scope of each real corpus file against this index (cheap signals + the index's model) vs the truth."""
    from echosearch.model.scope import assess_file
    from echosearch.query import Searcher

    folder = folder or real_corpus()
    if folder is None:
        return {"skipped": "real DICOM corpus not found (set ECHOSEARCH_REAL_DICOM)"}
    rows = []
    s = Searcher(catalog.index_dir, catalog=catalog)
    for name, (echo, mode) in REAL_TRUTH.items():
        path = folder / name
        if not path.is_file():
            continue
        sc, _ = assess_file(path, s)
        rows.append({"file": name, "echo": echo, "pred_echo": sc.is_echo, "echo_confidence": sc.echo_confidence,
                     "mode": mode, "pred_mode": sc.mode if sc.is_echo or echo else mode,
                     "in_scope": echo and mode == "bmode", "pred_in_scope": sc.in_scope})
    if not rows:
        return {"skipped": f"no corpus file found in {folder.name}"}
    df = pl.DataFrame(rows)
    us_doppler = df.filter(pl.col("file").str.starts_with("wrong_").not_())
    def share(a: pl.Series, b: pl.Series) -> float:
        return round(float(np.mean(a.to_numpy() == b.to_numpy())), 4) if len(a) else float("nan")

    return {"n": df.height, "echo_accuracy": share(df["echo"], df["pred_echo"]),
            "in_scope_accuracy": share(df["in_scope"], df["pred_in_scope"]),
            "mode_accuracy_ultrasound": share(us_doppler["mode"], us_doppler["pred_mode"]),
            "wrong": df.filter((pl.col("echo") != pl.col("pred_echo")) | (pl.col("in_scope") != pl.col("pred_in_scope")))
            ["file"].to_list()}


def no_close_match(catalog: Catalog, encoder: Any, n: int = 60, seed: int = EVAL_NULL_SEED) -> dict[str, Any]:
    """Share of held-out nonsense queries answered "no close match" (and of archive sentences answered)."""
    from echosearch.query import TEXT_CONTEXT, Searcher
    from echosearch.search.confidence import Judge, null_queries, reference_queries

    s = Searcher(catalog.index_dir, catalog=catalog, encoder=encoder)
    judge = Judge(s)
    texts = catalog.report_texts()
    real = reference_queries(texts, n=n, seed=seed)
    out: dict[str, Any] = {}
    for name, queries in (("nonsense", null_queries(n, seed=seed)), ("report_sentences", real)):
        if not queries:
            continue
        vecs = np.asarray(encoder.encode_text(queries), np.float32)
        flags = []
        for v in vecs:
            hits = s.by_vector(v, k=10, level="video", context=TEXT_CONTEXT)
            a = judge.assess(v, hits["video_key"].to_list(), hits["score"].to_list(), "text", "video", TEXT_CONTEXT)
            flags.append(a.no_match)
        out[name] = {"n": len(queries), "no_close_match_share": round(float(np.mean(flags)), 4)}
    out["floor_z"] = round(judge.calibration("text", "video", TEXT_CONTEXT).floor, 3)
    return out


def scope_metrics(catalog: Catalog, truth: pl.DataFrame | None = None, encoder: Any = None,
                  seed: int = 0) -> dict[str, Any]:
    """Everything above, for ``echosearch eval``."""
    res: dict[str, Any] = {"view": view_accuracy(catalog, truth, encoder, seed)}
    if encoder is None:
        res["real_files"] = res["no_close_match"] = {"skipped": "no encoder for this index"}
        return res
    res["real_files"] = real_file_scope(catalog)
    res["no_close_match"] = no_close_match(catalog, encoder)
    res["stored"] = catalog.scope_counts()
    return res
