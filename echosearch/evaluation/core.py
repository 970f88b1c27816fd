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

from echosearch.catalog import Catalog
from echosearch.change import study_predictions
from echosearch.errors import ConfigError, QueryError
from echosearch.evaluation.change import change_metrics, change_rows, legacy_views
from echosearch.evaluation.identity import (
    DEFAULT_PREVALENCE,
    audit_metrics,
    identity_metrics,
    identity_rows,
    video_pairs,
)
from echosearch.identity import StudySet, load_studies
from echosearch.identity import calibration as cal
from echosearch.model.report_facts import visible_in_view
from echosearch.model.zeroshot import BINARY_TASKS, METHODS, PromptBank, load_prompts, predict
from echosearch.model.zeroshot import study_predictions as pool_video_predictions

if TYPE_CHECKING:
    from echosearch.model.encode import Encoder

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
    videos = catalog.video_studies()
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
                   ("events", "first"), ("study_date", "first"), ("report", "first"), ("heart_id", "first")):
        if c in vt.columns:
            aggs.append(getattr(pl.col(c), how)().alias(c))
    return vt.group_by("study_key").agg(aggs).sort("study_key")


# ---- metrics ---------------------------------------------------------------------------------------
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
        from echosearch.model.encode import encoder_for_index

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
        from echosearch.model.zeroshot import load_prompts

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


def _scope(catalog: Catalog, vt: pl.DataFrame, encoder: Encoder | None, seed: int) -> dict[str, Any]:
    """Scope and search-confidence figures (:mod:`echosearch.evaluation.scope`)."""
    from echosearch.evaluation.scope import scope_metrics

    return scope_metrics(catalog, vt, encoder, seed)


def evaluate(index: Path | str | Catalog, truth: Path | str | None = None, *, k: int = 10,
             max_pairs: int = 20000, seed: int = 0, text: bool = True,
             prevalence: float = DEFAULT_PREVALENCE) -> dict[str, Any]:
    """All evaluation numbers of an index against its ground truth, as a nested dict (see module doc);
    ``prevalence``: the mislabel rate the audit's projection assumes."""
    cat = index if isinstance(index, Catalog) else Catalog.open(index, read_only=True)
    try:
        path = Path(truth) if truth is not None else find_truth(cat)
        vt = join_truth(cat, load_truth(path))
        if vt.height == 0:
            raise QueryError(f"no video of the index matches a row of {path} (by path suffix or SOP UID)")
        st = study_truth(vt)
        S = load_studies(cat)
        enc, why = _load_encoder(cat) if text else (None, "disabled")
        change = change_metrics(cat, vt, seed=seed)  # every change score on the same pairs (eval_change)
        change_auc, baseline_event_auc = legacy_views(change)
        res: dict[str, Any] = {
            "truth": str(path),
            "n": {"videos": vt.height, "studies": st.height, "patients": st["true_patient_id"].n_unique(),
                  "mislabelled_studies": int(st["mislabelled"].sum()) if "mislabelled" in st.columns else None},
            "anchors_echoclip_paper": ANCHORS,
            "echoclip_protocol": {**video_pairs(cat, vt, max_pairs, seed),
                                  "baseline_event_auc": baseline_event_auc},
            "echosearch": {"identity": identity_metrics(cat, st, max_pairs, seed),
                           "audit": audit_metrics(cat, st, prevalence),
                           "change_auc": change_auc},
            "change": change,
            "zero_shot": _zero_shot(cat, st),
            "zero_shot_methods": _zero_shot_methods(cat, vt, enc, why),
            "retrieval": {"text_to_video": _text_retrieval(cat, vt, k, encoder=enc) if enc is not None else {"skipped": why},
                          "study_to_report": _report_rank(cat, S, seed=seed)},
            "scope": _scope(cat, vt, enc, seed),
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

    for row in identity_rows(es, ec):
        t.add_row(*row)
    for row in change_rows(result.get("change", {})):
        t.add_row(*row)
    zs = result["zero_shot"]
    t.add_row("EF MAE (points)", fmt(zs.get("ef_mae")), "", "")
    learnt = (result.get("change") or {}).get("ef_learnt") or {}
    if "mae" in learnt:
        t.add_row(f"EF MAE learnt from the reports ({learnt['input']} vectors, cross-fitted; n={learnt['n_studies']})",
                  fmt(learnt["mae"]), f"zero-shot {fmt(learnt['zero_shot_mae'])} on the same studies", "")
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
    for row in scope_rows(result.get("scope") or {}):
        t.add_row(*row)
    return t


def scope_rows(sc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Table rows of the scope figures (view accuracy, real files, "no close match")."""
    rows: list[tuple[str, str, str, str]] = []
    view = sc.get("view") or {}
    if "accuracy" in view:
        rows.append(("view accuracy, model (labels hidden)", f"{view['accuracy']:.3f} {view.get('ci95')}", "", ""))
        if "zero_shot" in view:
            rows.append(("view accuracy, zero-shot prompts", f"{view['zero_shot']['accuracy']:.3f}", "", ""))
    real = sc.get("real_files") or {}
    if "echo_accuracy" in real:
        rows.append((f"real files: echo or not ({real['n']} files)", f"{real['echo_accuracy']:.3f}", "", ""))
        rows.append(("real files: in scope (echo B-mode)", f"{real['in_scope_accuracy']:.3f}", "", ""))
    ncm = sc.get("no_close_match") or {}
    if "nonsense" in ncm:
        rows.append(("nonsense queries answered 'no close match'", f"{ncm['nonsense']['no_close_match_share']:.3f}",
                     "", ""))
    if "report_sentences" in ncm:
        rows.append(("  archive report sentences answered 'no close match'",
                     f"{ncm['report_sentences']['no_close_match_share']:.3f}", "", ""))
    return rows
