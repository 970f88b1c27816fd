"""Evaluation against a ground-truth table: EchoCLIP's protocol next to echosearch's scoring, on the same vectors.

The truth table (``ground_truth.parquet`` of the synthetic cohort, or any table with the same columns) is
joined to the catalog's videos by path suffix, then by SOP Instance UID. Identity metrics use the TRUE
patient from the truth table, never the recorded one. See ``docs/longitudinal.md`` for what each number
means and the published EchoCLIP anchors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from rich.table import Table

from echosearch import calibration as cal
from echosearch.catalog import Catalog
from echosearch.change import scan_changes, study_predictions
from echosearch.errors import ConfigError, QueryError
from echosearch.identity import StudySet, audit, load_studies, own_scores, patient_scores
from echosearch.report_facts import visible_in_view
from echosearch.zeroshot import BINARY_TASKS, METHODS, PromptBank, load_prompts, predict
from echosearch.zeroshot import study_predictions as pool_video_predictions

if TYPE_CHECKING:
    from echosearch.encode import Encoder

TRUTH_FILE = "ground_truth.parquet"
EVENTS = ("ef_decline", "ef_recovery", "pacer_implant", "tavr_implant", "mitraclip_implant", "transplant")
DEVICE_TASKS = BINARY_TASKS  # every binary zero-shot finding is scored against its truth column
ANCHORS = {"identity_auc": 0.86, "transplant_auc": 0.79, "cardiac_surgery_auc": 0.77}
DEFAULT_FINDINGS = {
    "severely reduced EF": ("SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION.", "ef < 35"),
    "normal EF": ("NORMAL LEFT VENTRICULAR SYSTOLIC FUNCTION.", "ef >= 52"),
    "pacer lead": ("ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD.", "pacer_lead"),
    "TAVR": ("A BIOPROSTHETIC STENT-VALVE IS PRESENT IN THE AORTIC POSITION.", "tavr"),
    "MitraClip": ("MITRACLIP IN PLACE.", "mitraclip"),
}


def _f(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


# ---- truth -----------------------------------------------------------------------------------------
def find_truth(catalog: Catalog) -> Path:
    """``ground_truth.parquet`` in the common parent of the indexed video paths or one of its parents."""
    paths = list(catalog.locations(None).values())
    if not paths:
        raise QueryError("the index has no videos, so no source folder to find the ground truth in")
    try:
        start = Path(os.path.commonpath([str(p) for p in paths]))
    except ValueError as exc:
        raise QueryError(f"videos come from unrelated folders ({exc}); pass --truth") from exc
    for folder in [start, *start.parents][:6]:
        if (folder / TRUTH_FILE).is_file():
            return folder / TRUTH_FILE
    raise QueryError(f"no {TRUTH_FILE} found above {start}; pass --truth FILE")


def load_truth(path: Path) -> pl.DataFrame:
    """A truth table from Parquet or CSV (CSV ``events`` as ``a;b``, ``a|b`` or ``[a, b]``)."""
    if not path.is_file():
        raise QueryError(f"truth file {path} does not exist")
    df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, try_parse_dates=True)
    if "true_patient_id" not in df.columns or not ({"path", "sop_uid"} & set(df.columns)):
        raise QueryError(f"{path} needs true_patient_id and path or sop_uid columns")
    if "events" in df.columns and df["events"].dtype == pl.String:  # CSV: "a;b", "[a, b]" or "a|b"
        df = df.with_columns(pl.col("events").map_elements(_split_events, return_dtype=pl.List(pl.String)))
    return df


def _split_events(text: str | None) -> list[str]:
    return [e.strip() for e in re.split(r"[,;|]", re.sub(r"[\[\]'\"]", "", text or "")) if e.strip()]


def join_truth(catalog: Catalog, truth: pl.DataFrame) -> pl.DataFrame:
    """Truth rows with ``video_key`` and ``study_key``: by path suffix first, then by SOP Instance UID."""
    videos = catalog.con.sql("SELECT video_key, study_key, sop_uid FROM videos ORDER BY video_key").pl()
    where = catalog.locations(None)  # the files' own paths (sealed in the catalog)
    suffix: dict[str, int] = {}
    for key in videos["video_key"].to_list():
        p = where[int(key)]
        parts = Path(p).as_posix().split("/")
        for i in range(len(parts)):
            suffix.setdefault("/".join(parts[i:]), key)
    matched: list[int | None] = [None] * truth.height
    if "path" in truth.columns:
        for i, p in enumerate(truth["path"].to_list()):
            if p:
                matched[i] = suffix.get(Path(str(p)).as_posix().removeprefix("./").lstrip("/"))
    if "sop_uid" in truth.columns:
        by_sop = {s: k for k, s in zip(videos["video_key"].to_list(), videos["sop_uid"].to_list(), strict=True) if s}
        used = {m for m in matched if m is not None}
        for i, s in enumerate(truth["sop_uid"].to_list()):
            if matched[i] is None and s in by_sop and by_sop[s] not in used:
                matched[i] = by_sop[s]
                used.add(by_sop[s])
    t = truth.with_columns(pl.Series("video_key", matched, dtype=pl.Int64)).drop_nulls("video_key")
    t = t.unique("video_key", keep="first", maintain_order=True)
    return t.join(videos.select("video_key", "study_key"), on="video_key", how="inner")


def study_truth(vt: pl.DataFrame) -> pl.DataFrame:
    """One truth row per catalog study (true patient, mislabelled, EF, devices, events)."""
    aggs: list[pl.Expr] = [pl.col("true_patient_id").first()]
    for c, how in (("mislabelled", "any"), ("ef", "mean"), ("pacer_lead", "any"), ("tavr", "any"),
                   ("mitraclip", "any"), ("lv_dilated", "any"), ("transplanted", "any"), ("visit_index", "first"),
                   ("events", "first"), ("study_date", "first"), ("report", "first")):
        if c in vt.columns:
            aggs.append(getattr(pl.col(c), how)().alias(c))
    return vt.group_by("study_key").agg(aggs).sort("study_key")


# ---- metrics ---------------------------------------------------------------------------------------
def _identity(catalog: Catalog, st: pl.DataFrame, S: StudySet, max_pairs: int, seed: int) -> dict[str, Any]:
    keyed = st.filter(pl.col("study_key").is_in(S.keys.tolist()))
    rows = np.searchsorted(S.keys, keyed["study_key"].to_numpy())
    codes = keyed["true_patient_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    T = StudySet(S.keys[rows], S.vecs[rows], codes, keyed)
    i, j = cal.within_group_pairs(codes, max_pairs=max_pairs, seed=seed)
    ni, nj = cal.between_group_pairs(codes, max_pairs, seed=seed + 1)
    pair_auc = cal.auc(cal.pair_cosines(T.vecs, i, j), cal.pair_cosines(T.vecs, ni, nj))
    everyone = np.ones(len(T), dtype=bool)
    own, _, _, n_ref = own_scores(T, everyone)
    rng = np.random.default_rng(seed + 2)
    q = np.nonzero(n_ref > 0)[0]
    uniq = np.unique(codes)
    other = uniq[rng.integers(0, uniq.size, size=q.size)] if uniq.size > 1 else np.zeros(0, np.int64)
    ok = other != codes[q] if uniq.size > 1 else np.zeros(0, bool)
    neg, _, _ = patient_scores(T, q[ok], other[ok], everyone)
    return {"study_pair_auc": _f(pair_auc), "study_patient_auc": _f(cal.auc(own[q], neg)),
            "n_same_pairs": int(i.size), "n_studies_with_other_visits": int(q.size)}


def _video_pairs(catalog: Catalog, vt: pl.DataFrame, max_pairs: int, seed: int) -> dict[str, Any]:
    ids, vecs = catalog.embeddings("video", vt["video_key"].to_list())
    t = vt.filter(pl.col("video_key").is_in(ids.tolist())).sort("video_key")
    v = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    pid = t["true_patient_id"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    study = t["study_key"].to_numpy()
    i, j = cal.within_group_pairs(pid)
    keep = study[i] != study[j]
    i, j = i[keep], j[keep]
    if i.size > max_pairs:
        pick = np.random.default_rng(seed).choice(i.size, max_pairs, replace=False)
        i, j = i[pick], j[pick]
    ni, nj = cal.between_group_pairs(pid, max_pairs, seed=seed + 1)
    pos, neg = cal.pair_cosines(v, i, j), cal.pair_cosines(v, ni, nj)
    out = {"video_pair_identity_auc": _f(cal.auc(pos, neg)), "n_pairs": int(i.size)}
    if "view" in t.columns:
        view = t["view"].cast(pl.String).fill_null("").to_numpy()
        out["same_view_pair_auc"] = _f(cal.auc(pos[view[i] == view[j]], neg[view[ni] == view[nj]]))
    return out


def _baseline_events(st: pl.DataFrame, S: StudySet) -> dict[str, Any]:
    """EchoCLIP protocol: dissimilarity to the true patient's first study; events since baseline vs none."""
    if "events" not in st.columns or "visit_index" not in st.columns:
        return {"skipped": "truth has no events/visit_index"}
    t = st.filter(pl.col("study_key").is_in(S.keys.tolist())).sort("true_patient_id", "visit_index")
    rows = np.searchsorted(S.keys, t["study_key"].to_numpy())
    pid = t["true_patient_id"].to_list()
    out: dict[str, Any] = {}
    scores: list[float] = []
    since: list[set[str]] = []
    base, acc = -1, set[str]()
    for n, (r, ev) in enumerate(zip(rows, t["events"].to_list(), strict=True)):
        if n == 0 or pid[n] != pid[n - 1]:
            base, acc = r, set()
            continue
        acc = acc | set(ev or [])
        scores.append(1.0 - float(S.vecs[r] @ S.vecs[base]))
        since.append(set(acc))
    s = np.asarray(scores)
    none = np.asarray([not e for e in since], dtype=bool)
    for e in EVENTS:
        pos = np.asarray([e in x for x in since], dtype=bool)
        out[e] = {"auc": _f(cal.auc(s[pos], s[none])), "n_pos": int(pos.sum()), "n_neg": int(none.sum())}
    return out


def _audit_metrics(catalog: Catalog, st: pl.DataFrame) -> dict[str, Any]:
    if "mislabelled" not in st.columns:
        return {"skipped": "truth has no mislabelled column"}
    a = audit(catalog, store=False, report_unverifiable=True).join(
        st.select("study_key", "mislabelled"), on="study_key", how="inner")
    y = a["mislabelled"].fill_null(False).to_numpy().astype(bool)
    flag = a["suspect"].to_numpy().astype(bool)
    s = a["suspicion"].fill_null(-np.inf).to_numpy()
    order = np.argsort(-s, kind="stable")
    hits = y[order]
    prec = np.cumsum(hits) / np.arange(1, hits.size + 1)
    rec = np.cumsum(hits) / max(int(y.sum()), 1)
    tp = int((flag & y).sum())
    unver = (a["status"] == "unverifiable").to_numpy()
    return {"n_studies": int(y.size), "n_mislabelled": int(y.sum()), "n_flagged": int(flag.sum()),
            "precision": _f(tp / flag.sum()) if flag.sum() else None,
            "recall": _f(tp / y.sum()) if y.sum() else None,
            "suspicion_auc": _f(cal.auc(s[y & np.isfinite(s)], s[~y & np.isfinite(s)])),
            "recall_at_precision_0.9": _f(float(rec[prec >= 0.9].max())) if (prec >= 0.9).any() else 0.0,
            "average_precision": _f(float((prec * hits).sum() / max(int(y.sum()), 1))),
            "mislabelled_unverifiable": int((y & unver).sum())}


def _change_metrics(catalog: Catalog, st: pl.DataFrame) -> dict[str, Any]:
    if "events" not in st.columns:
        return {"skipped": "truth has no events column"}
    ch = scan_changes(catalog, store=False)
    mis = st.select("study_key", pl.col("mislabelled").alias("_mis")) if "mislabelled" in st.columns else \
        st.select("study_key", pl.lit(False).alias("_mis"))
    d = ch.filter(pl.col("prev_study_key").is_not_null()).join(st.select("study_key", "events"), on="study_key") \
        .join(mis, on="study_key").join(mis.rename({"study_key": "prev_study_key", "_mis": "_pmis"}),
                                        on="prev_study_key", how="left")
    d = d.filter(~pl.col("_mis") & ~pl.col("_pmis").fill_null(False))
    z = d["z_prev"].fill_null(np.nan).to_numpy()
    flagged = d["flagged"].to_numpy().astype(bool)
    ev = [set(e or []) for e in d["events"].to_list()]
    none = np.asarray([not e for e in ev], dtype=bool)
    out: dict[str, Any] = {"stable_visits": int(none.sum()),
                           "stable_flag_rate": _f(float(flagged[none].mean())) if none.any() else None}
    for e in EVENTS:
        pos = np.asarray([e in x for x in ev], dtype=bool)
        out[e] = {"auc": _f(cal.auc(z[pos], z[none])), "flag_recall": _f(float(flagged[pos].mean())) if pos.any()
                  else None, "n_pos": int(pos.sum())}
    return out


def _zero_shot(catalog: Catalog, st: pl.DataFrame) -> dict[str, Any]:
    p = study_predictions(catalog).join(st, on="study_key", how="inner", suffix="_true")
    out: dict[str, Any] = {"n_studies": p.height}
    if "ef_true" in p.columns:
        e = p.select("ef", "ef_true").drop_nulls()
        out["ef_mae"] = _f(float(np.mean(np.abs(e["ef"].to_numpy() - e["ef_true"].to_numpy())))) if e.height else None
    for t in DEVICE_TASKS:
        if f"{t}_true" in p.columns:
            e = p.select(t, f"{t}_true").drop_nulls()
            out[f"{t}_auc"] = _f(cal.auc_from_labels(e[t].to_numpy(), e[f"{t}_true"].to_numpy().astype(bool)))
    return out


def compare_methods(catalog: Catalog, encoder: Encoder, vt: pl.DataFrame,
                    prompts: dict[str, Any] | None = None) -> pl.DataFrame:
    """Zero-shot scores of both methods (``echoclip``, ``contrast``) recomputed from the same stored vectors of the
    truth's videos: EF MAE and finding AUCs per study (videos pooled by the pipeline's rule). Columns task, method,
    metric, value, n, and ``vectors``: per-frame vectors when every video has them (``keep_frame_embeddings``),
    else each video vector as a single frame."""
    keys = vt["video_key"].to_list()
    frames = catalog.frame_embeddings(keys)
    vectors = "frame vectors"
    if not keys or set(frames) != set(keys):
        ids, vecs = catalog.embeddings("video", keys)
        frames, vectors = {int(k): v[None, :] for k, v in zip(ids, vecs, strict=True)}, "video vectors (one frame each)"
    owner = dict(zip(vt["video_key"].to_list(), vt["study_key"].to_list(), strict=True))
    st = study_truth(vt)
    rows: list[dict[str, Any]] = []
    for method in METHODS:
        try:
            bank = PromptBank.build(encoder, prompts, method=method)
        except ConfigError as exc:  # e.g. contrast on a prompt file without negative prompts
            rows.append({"task": "*", "method": method, "metric": f"skipped: {exc}", "value": None, "n": 0})
            continue
        by_study: dict[int, list[dict[str, float]]] = {}
        for k, fv in frames.items():
            by_study.setdefault(owner[k], []).append(predict(bank, fv))
        pred = pl.DataFrame([{"study_key": s, **pool_video_predictions(p)} for s, p in by_study.items()])
        p = pred.join(st, on="study_key", how="inner", suffix="_true") if pred.height else pred
        for task in ("ef", *DEVICE_TASKS):
            if task not in p.columns or f"{task}_true" not in p.columns:
                continue
            e = p.select(task, f"{task}_true").drop_nulls()
            x, y = e[task].to_numpy(), e[f"{task}_true"].to_numpy()
            value = None if not e.height else float(np.mean(np.abs(x - y))) if task == "ef" else \
                cal.auc_from_labels(x, y.astype(bool))
            rows.append({"task": task, "method": method, "metric": "mae" if task == "ef" else "auc",
                         "value": None if value is None else _f(value), "n": e.height})
    schema = {"task": pl.String, "method": pl.String, "metric": pl.String, "value": pl.Float64, "n": pl.Int64}
    return pl.DataFrame(rows, schema=schema).with_columns(pl.lit(vectors).alias("vectors"))


def _load_encoder(catalog: Catalog) -> tuple[Encoder | None, str]:
    try:
        from echosearch.encode import encoder_for_index

        return encoder_for_index(catalog), ""
    except Exception as exc:  # no model here is a note in the report, not a failure
        return None, f"no encoder for this index ({type(exc).__name__}: {exc})"


def _zero_shot_methods(catalog: Catalog, vt: pl.DataFrame, encoder: Encoder | None, why: str) -> dict[str, Any]:
    if encoder is None:
        return {"skipped": why}
    from echosearch.config import load_settings

    path = load_settings().zeroshot_prompts
    return {"rows": compare_methods(catalog, encoder, vt, load_prompts(str(path)) if path else None).to_dicts()}


def _relevant(vt: pl.DataFrame, rule: str) -> np.ndarray | None:
    m = re.fullmatch(r"\s*(\w+)\s*(<=|>=|<|>|==)\s*([-\d.]+)\s*", rule)
    if m:
        col, op, val = m.group(1), m.group(2), float(m.group(3))
        if col not in vt.columns:
            return None
        x = vt[col].cast(pl.Float64).fill_null(np.nan).to_numpy()
        return {"<": x < val, "<=": x <= val, ">": x > val, ">=": x >= val, "==": x == val}[op]
    return vt[rule.strip()].fill_null(False).to_numpy().astype(bool) if rule.strip() in vt.columns else None


def _text_retrieval(catalog: Catalog, vt: pl.DataFrame, k: int, context: float | None = None,
                    encoder: Encoder | None = None) -> dict[str, Any]:
    """Finding phrase -> top-k clips among those with a truth row, scored as the query API's text search scores
    them (``query.context_score`` with ``query.TEXT_CONTEXT`` unless given; exact, from the catalog's vectors)
    and, as ``*_clip_only``, by the clip vectors alone."""
    if encoder is None:
        encoder, why = _load_encoder(catalog)
        if encoder is None:
            return {"skipped": why}
    from echosearch.query import TEXT_CONTEXT, context_score

    context = TEXT_CONTEXT if context is None else context
    findings = dict(DEFAULT_FINDINGS)
    try:
        from echosearch.zeroshot import load_prompts

        spec = load_prompts().get("findings", {})
        findings = {n: (f["text"], f["truth"]) for n, f in spec.items() if isinstance(f, dict)} or findings
    except (ImportError, OSError, ValueError):
        pass
    ids, vecs = catalog.embeddings("video", vt["video_key"].to_list())
    t = vt.filter(pl.col("video_key").is_in(ids.tolist())).sort("video_key")
    sids, svecs = catalog.embeddings("study")
    want = t["study_key"].to_numpy().astype(np.int64)  # t's rows are ids' (one per key, key order)
    srow = np.minimum(np.searchsorted(sids, want), max(len(sids) - 1, 0))
    has_study = (sids[srow] == want) if len(sids) else np.zeros(len(ids), bool)
    # views coded once: the visibility rule is asked per distinct view, not per video
    view_names, view_code = (np.unique(t["view"].fill_null("").to_numpy().astype(str), return_inverse=True)
                             if "view" in t.columns else (None, None))
    out: dict[str, Any] = {"context": context}
    vals: dict[str, list[float]] = {}
    text = encoder.encode_text([f[0] for f in findings.values()])
    for (name, (phrase, rule)), tv in zip(findings.items(), text, strict=True):
        rel = _relevant(t, rule)
        if rel is None or not rel.any():
            continue
        seen = None
        if view_names is not None:  # the truth is per study; a second figure counts only views that can show it
            shows = np.array([visible_in_view(phrase, v or None) for v in view_names])
            seen = rel & shows[view_code]
        out[name] = {"n_relevant": int(rel.sum())}
        clip = vecs @ tv
        study = np.where(has_study, svecs[srow] @ tv if len(sids) else np.nan, np.nan)
        for c, suffix in ((context, ""), (0.0, "_clip_only")):
            top = np.argsort(-context_score(clip, study, c), kind="stable")[:k]
            figs = {f"recall_at_{k}{suffix}": int(rel[top].sum()) / min(k, int(rel.sum()))}
            if seen is not None and seen.any():
                figs[f"recall_at_{k}_in_view{suffix}"] = int(seen[top].sum()) / min(k, int(seen.sum()))
            for fig, value in figs.items():
                vals.setdefault(fig.replace(f"recall_at_{k}", "mean"), []).append(value)
                out[name][fig] = _f(value)
        if seen is not None and seen.any():
            out[name]["n_relevant_in_view"] = int(seen.sum())
    n = len(vals.get("mean", []))
    out["mean"] = _f(float(np.mean(vals["mean"]))) if n else None
    for fig, values in vals.items():
        if fig != "mean" and len(values) == n:
            out[fig] = _f(float(np.mean(values)))
    return out


def _report_rank(catalog: Catalog, S: StudySet, max_queries: int = 2000, seed: int = 0) -> dict[str, Any]:
    if not catalog.has_table("report_embeddings"):
        return {"skipped": "no report embeddings"}
    rid, rvec = catalog.embeddings("report")
    common = np.intersect1d(rid, S.keys)
    if common.size == 0:
        return {"skipped": "no report embeddings"}
    rvec = rvec / np.maximum(np.linalg.norm(rvec, axis=1, keepdims=True), 1e-12)
    q = common if common.size <= max_queries else np.sort(np.random.default_rng(seed).choice(common, max_queries, False))
    sims = S.vecs[np.searchsorted(S.keys, q)] @ rvec.T
    own = sims[np.arange(q.size), np.searchsorted(rid, q)]
    ranks = 1 + (sims > own[:, None]).sum(axis=1)
    return {"mean_rank": _f(float(ranks.mean())), "median_rank": _f(float(np.median(ranks))),
            "recall_at_1": _f(float((ranks <= 1).mean())), "recall_at_10": _f(float((ranks <= 10).mean())),
            "n_reports": int(rid.size), "n_queries": int(q.size)}


def evaluate(index: Path | str | Catalog, truth: Path | str | None = None, *, k: int = 10,
             max_pairs: int = 20000, seed: int = 0, text: bool = True) -> dict[str, Any]:
    """All evaluation numbers of an index against its ground truth, as a nested dict (see module doc)."""
    cat = index if isinstance(index, Catalog) else Catalog.open(index, read_only=True)
    try:
        path = Path(truth) if truth is not None else find_truth(cat)
        vt = join_truth(cat, load_truth(path))
        if vt.height == 0:
            raise QueryError(f"no video of the index matches a row of {path} (by path suffix or SOP UID)")
        st = study_truth(vt)
        S = load_studies(cat)
        enc, why = _load_encoder(cat) if text else (None, "disabled")
        res: dict[str, Any] = {
            "truth": str(path),
            "n": {"videos": vt.height, "studies": st.height, "patients": st["true_patient_id"].n_unique(),
                  "mislabelled_studies": int(st["mislabelled"].sum()) if "mislabelled" in st.columns else None},
            "anchors_echoclip_paper": ANCHORS,
            "echoclip_protocol": {**_video_pairs(cat, vt, max_pairs, seed),
                                  "baseline_event_auc": _baseline_events(st, S)},
            "echosearch": {"identity": _identity(cat, st, S, max_pairs, seed), "audit": _audit_metrics(cat, st),
                           "change_auc": _change_metrics(cat, st)},
            "zero_shot": _zero_shot(cat, st),
            "zero_shot_methods": _zero_shot_methods(cat, vt, enc, why),
            "retrieval": {"text_to_video": _text_retrieval(cat, vt, k, encoder=enc) if enc is not None else {"skipped": why},
                          "study_to_report": _report_rank(cat, S, seed=seed)},
        }
    finally:
        if not isinstance(index, Catalog):
            cat.close()
    return res


def format_table(result: dict[str, Any]) -> Table:
    """A rich table: echosearch's number, EchoCLIP's protocol on the same vectors, and the paper's anchor."""
    es, ec = result["echosearch"], result["echoclip_protocol"]
    t = Table(title=f"evaluation against {result.get('truth')}")
    for c in ("measure", "echosearch", "EchoCLIP protocol (same vectors)", "EchoCLIP paper"):
        t.add_column(c)

    def fmt(v: Any) -> str:
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    t.add_row("same patient AUC", f"{fmt(es['identity'].get('study_patient_auc'))} (study vs patient)",
              f"{fmt(ec.get('video_pair_identity_auc'))} (video pairs)", "0.86")
    t.add_row("same patient AUC, study pairs", fmt(es["identity"].get("study_pair_auc")), "", "")
    au = es["audit"]
    if "skipped" not in au:
        t.add_row("audit precision / recall", f"{fmt(au['precision'])} / {fmt(au['recall'])}",
                  f"{au['n_flagged']} flagged, {au['n_mislabelled']} mislabelled", "")
        t.add_row("audit recall at precision 0.9", fmt(au["recall_at_precision_0.9"]), "", "")
    base = ec.get("baseline_event_auc", {})
    for e in EVENTS:
        ours = es["change_auc"].get(e, {}) if isinstance(es["change_auc"], dict) else {}
        theirs = base.get(e, {}) if isinstance(base, dict) else {}
        if ours.get("n_pos") or theirs.get("n_pos"):
            anchor = "0.79" if e == "transplant" else "0.77 (cardiac surgery)" if e in ("tavr_implant", "mitraclip_implant") else ""
            t.add_row(f"change AUC: {e}", f"{fmt(ours.get('auc'))} (n={ours.get('n_pos')})",
                      f"{fmt(theirs.get('auc'))} (n={theirs.get('n_pos')})", anchor)
    if isinstance(es["change_auc"], dict) and "stable_flag_rate" in es["change_auc"]:
        t.add_row("change flags on stable visits", fmt(es["change_auc"]["stable_flag_rate"]), "", "")
    zs = result["zero_shot"]
    t.add_row("EF MAE (points)", fmt(zs.get("ef_mae")), "", "")
    for d in DEVICE_TASKS:
        if f"{d}_auc" in zs:
            t.add_row(f"{d} AUC", fmt(zs[f"{d}_auc"]), "", "")
    tv = result["retrieval"]["text_to_video"]
    t.add_row("text -> video recall@k", tv.get("skipped", fmt(tv.get("mean"))), "", "")
    if "mean_in_view" in tv:
        t.add_row("  counting only views that can show the finding", fmt(tv["mean_in_view"]), "", "")
    if "mean_clip_only" in tv:
        t.add_row(f"  clip vectors alone (study context {tv['context']} above)", fmt(tv["mean_clip_only"]), "", "")
    rr = result["retrieval"]["study_to_report"]
    t.add_row("true report mean rank", rr.get("skipped", f"{fmt(rr.get('mean_rank'))} of {rr.get('n_reports')}"),
              "", "")
    return t
