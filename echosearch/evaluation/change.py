"""Change evaluation against the ground truth: echosearch's change score and every baseline on the same pairs.

Two tasks, each on one fixed set of pairs taken from the scan's own timeline (studies filed under another
patient's ID are left out, and so is any pair that touches one):

- ``since_previous``: each follow-up study against the previous study the scan compared it with; positives of
  an event = the event happened at a true visit after the previous study and up to this one; negatives =
  pairs with no event in between.
- ``since_first``: each follow-up study against the patient's first study (EchoCLIP's protocol), events
  accumulated since the first visit.

Every score (echosearch's change probability, plain 1 - cosine of the study vectors, of the identity vectors,
of like views) is an AUC on exactly those positives and negatives, with a bootstrap 95 % interval (positives
and negatives resampled separately) and the paired difference to the plain cosine. Each explanation clause is
checked against the truth: its precision (share of the visits it is shown on where it is true) and the share
of true events it names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from rich.table import Table

from echosearch.catalog import Catalog
from echosearch.change import CLAUSE_TYPES, EF_MARGIN, LABELS, scan_changes
from echosearch.change.features import DEVICES, Timeline, load_timeline, raw_pair_features
from echosearch.change.scan import study_predictions
from echosearch.identity import calibration as cal

EVENTS = ("ef_decline", "ef_recovery", "pacer_implant", "tavr_implant", "mitraclip_implant", "transplant")
TASKS = ("since_previous", "since_first")
# the clause that names each event
NAMES = {"ef_decline": "ef_fall", "ef_recovery": "ef_rise", "pacer_implant": "new_pacer_lead",
         "tavr_implant": "new_tavr", "mitraclip_implant": "new_mitraclip", "transplant": "new_heart"}
SCORES = {"echosearch": "echosearch change probability", "plain": "plain 1 - cos (study vectors)",
          "identity": "1 - cos (identity study vectors)", "like_view": "1 - cos (like views, mean)"}


def _f(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def change_truth(vt: pl.DataFrame) -> pl.DataFrame:
    """One truth row per catalog study: true patient and visit, events, EF, devices, heart, mislabelled."""
    aggs: list[pl.Expr] = [pl.col("true_patient_id").first()]
    for c, how in (("mislabelled", "any"), ("ef", "mean"), ("pacer_lead", "any"), ("tavr", "any"),
                   ("mitraclip", "any"), ("visit_index", "first"), ("events", "first"), ("heart_id", "first")):
        if c in vt.columns:
            aggs.append(getattr(pl.col(c), how)().alias(c))
    st = vt.group_by("study_key").agg(aggs).sort("study_key")
    if "mislabelled" not in st.columns:
        st = st.with_columns(pl.lit(False).alias("mislabelled"))
    return st


def _ef_learnt(T: Timeline, st: pl.DataFrame) -> dict[str, Any]:
    """Study EF error against the truth of the EF learnt from the archive's reports (the change scan's EF probe,
    cross-fitted by patient: no study's own report informs its estimate) and of the zero-shot EF, on the same
    studies (those that have both); ``input``: what the probe read (``cycle`` or ``content`` vectors)."""
    learnt = T.pred.get("ef_probe")
    if learnt is None or "ef" not in st.columns:
        return {"skipped": "no EF probe (no report states an EF) or no true EF"}
    d = (pl.DataFrame({"study_key": T.keys, "learnt": learnt, "zero_shot": T.pred["ef"]})
         .join(st.select("study_key", "ef", "mislabelled"), on="study_key")
         .filter(~pl.col("mislabelled")).drop_nulls().drop_nans())
    if not d.height:
        return {"skipped": "no study with both estimates and a true EF"}
    return {"input": T.ef_probe_input, "n_studies": d.height,
            "mae": _f(float((d["learnt"] - d["ef"]).abs().mean())),  # type: ignore[arg-type]
            "zero_shot_mae": _f(float((d["zero_shot"] - d["ef"]).abs().mean()))}  # type: ignore[arg-type]


def _events_between(truth_all: pl.DataFrame) -> dict[str, list[tuple[int, set[str]]]]:
    """Per true patient, (visit index, events) of every true visit, in order (studies missing from the index
    included: their events still happened)."""
    t = truth_all.select("true_patient_id", "visit_index", "events").unique(["true_patient_id", "visit_index"])
    out: dict[str, list[tuple[int, set[str]]]] = {}
    for pid, vi, ev in t.sort("true_patient_id", "visit_index").iter_rows():
        out.setdefault(str(pid), []).append((int(vi), set(ev or [])))
    return out


def change_pairs(scan: pl.DataFrame, st: pl.DataFrame, visits: dict[str, list[tuple[int, set[str]]]],
                 task: str) -> pl.DataFrame:
    """The pairs of one task (columns study_key, other_key, events, ef/devices/heart of both, flags),
    mislabelled studies and pairs touching them left out."""
    other = "prev_study_key" if task == "since_previous" else "baseline_study_key"
    d = scan.filter(pl.col(other).is_not_null() & (pl.col(other) != pl.col("study_key")))
    cols = [c for c in ("study_key", "true_patient_id", "mislabelled", "visit_index", "ef", "pacer_lead", "tavr",
                        "mitraclip", "heart_id") if c in st.columns]
    a = st.select(cols)
    b = a.rename({c: f"{c}_o" for c in cols if c != "study_key"}).rename({"study_key": other})
    keep = ["study_key", other, "flag_types", "flagged", "change_prob", "change_prob_baseline"]
    d = d.select(keep).join(a.rename({"ef": "ef_true"}), on="study_key", how="inner").join(b, on=other, how="inner")
    d = d.filter(~pl.col("mislabelled") & ~pl.col("mislabelled_o")).rename({other: "other_key"})
    ev: list[list[str]] = []
    for pid, lo, hi in d.select("true_patient_id", "visit_index_o", "visit_index").iter_rows():
        got: set[str] = set()
        for vi, e in visits.get(str(pid), []):
            if lo < vi <= hi:
                got |= e
        ev.append(sorted(got))
    return d.with_columns(pl.Series("events", ev, dtype=pl.List(pl.String)),
                          pl.col("change_prob" if task == "since_previous" else "change_prob_baseline")
                          .alias("echosearch"))


def _auc_boot(s: np.ndarray, pos: np.ndarray, neg: np.ndarray, n_boot: int, rng: np.random.Generator,
              ref: np.ndarray | None = None) -> dict[str, Any]:
    """AUC, its bootstrap 95 % interval, and (``ref`` given) the paired difference AUC(s) - AUC(ref)."""
    p, q = np.nonzero(pos)[0], np.nonzero(neg)[0]
    out: dict[str, Any] = {"auc": _f(cal.auc(s[p], s[q]))}
    if p.size == 0 or q.size == 0:
        return out
    aucs, diffs = [], []
    for _ in range(n_boot):
        bp, bq = rng.choice(p, p.size), rng.choice(q, q.size)
        a = cal.auc(s[bp], s[bq])
        aucs.append(a)
        if ref is not None:
            diffs.append(a - cal.auc(ref[bp], ref[bq]))
    out["ci95"] = [_f(float(np.nanpercentile(aucs, 2.5))), _f(float(np.nanpercentile(aucs, 97.5)))]
    if ref is not None:
        out["minus_plain"] = _f(float(cal.auc(s[p], s[q]) - cal.auc(ref[p], ref[q])))
        out["minus_plain_ci95"] = [_f(float(np.nanpercentile(diffs, 2.5))), _f(float(np.nanpercentile(diffs, 97.5)))]
    return out


def _baselines(T: Timeline, d: pl.DataFrame) -> dict[str, np.ndarray]:
    """Every baseline score of the pairs, computed here from the catalog's own vectors (``T``)."""
    row = {int(k): r for r, k in enumerate(T.keys)}
    i = np.asarray([row[int(k)] for k in d["study_key"]], dtype=np.int64)
    j = np.asarray([row[int(k)] for k in d["other_key"]], dtype=np.int64)
    raw = raw_pair_features(T, i, j) if i.size else {k: np.zeros(0) for k in ("study_dist", "id_dist", "view_dist")}
    out = {"plain": 1.0 - np.einsum("ij,ij->i", T.content[i], T.content[j]), "like_view": raw["view_dist"]}
    if T.identity_source == "identity":
        out["identity"] = raw["id_dist"]
    return out


def _clause_truth(d: pl.DataFrame, margin: float) -> dict[str, np.ndarray]:
    def col(c: str) -> np.ndarray:
        return d[c].cast(pl.Float64).fill_null(np.nan).to_numpy() if c in d.columns else np.full(d.height, np.nan)

    dd = col("ef_true") - col("ef_o")
    out = {"ef_fall": dd <= -margin, "ef_rise": dd >= margin}
    for dev in DEVICES:
        a, b = col(dev) > 0.5, col(f"{dev}_o") > 0.5
        out[f"new_{dev}"], out[f"removed_{dev}"] = a & ~b, b & ~a
    if "heart_id" in d.columns:
        out["new_heart"] = (d["heart_id"] != d["heart_id_o"]).fill_null(False).to_numpy()
    else:
        out["new_heart"] = np.asarray(["transplant" in e for e in d["events"].to_list()], dtype=bool)
    return out


def change_metrics(catalog: Catalog, vt: pl.DataFrame, *, n_boot: int = 500, seed: int = 0,
                   scan: pl.DataFrame | None = None) -> dict[str, Any]:
    """All change figures (see the module doc) for an index and its truth rows (``evaluate.join_truth``);
    ``<task>.pairs`` lists the (study key, earlier study key) pairs every score of that task was measured on."""
    if "events" not in vt.columns or "visit_index" not in vt.columns:
        return {"skipped": "truth has no events/visit_index columns"}
    st = change_truth(vt)
    scan = scan_changes(catalog, store=False) if scan is None else scan
    visits = _events_between(vt)
    rng = np.random.default_rng(seed)
    T = load_timeline(catalog, study_predictions(catalog))  # the vectors every baseline is computed from
    res: dict[str, Any] = {"pairs": "each task: one set of (study, earlier study) pairs from the scan's timeline, "
                                    "mislabelled studies left out; every score on exactly these pairs",
                           "scores": SCORES}
    for task in TASKS:
        d = change_pairs(scan, st, visits, task)
        ev = [set(e) for e in d["events"].to_list()]
        none = np.asarray([not e for e in ev], dtype=bool)
        scores = {"echosearch": d["echosearch"].fill_null(np.nan).to_numpy(), **_baselines(T, d)}
        out: dict[str, Any] = {"n_pairs": d.height, "n_negatives": int(none.sum()),
                               "pairs": [[int(a), int(b)] for a, b in d.select("study_key", "other_key").iter_rows()]}
        for e in EVENTS:
            pos = np.asarray([e in x for x in ev], dtype=bool)
            out[e] = {"n_pos": int(pos.sum()), "n_neg": int(none.sum())}
            for name, s in scores.items():
                out[e][name] = _auc_boot(s, pos, none, n_boot, rng, scores["plain"] if name != "plain" else None)
        if task == "since_previous":
            flagged = d["flagged"].to_numpy().astype(bool)
            out["stable_flag_rate"] = _f(float(flagged[none].mean())) if none.any() else None
            res["clauses"] = _clauses(scan, st, d, ev)
        res[task] = out
    res["ef_learnt"] = _ef_learnt(T, st)
    return res


def _clauses(scan: pl.DataFrame, st: pl.DataFrame, d: pl.DataFrame, ev: list[set[str]]) -> dict[str, Any]:
    truth = _clause_truth(d, EF_MARGIN)
    shown = [set(t or []) for t in d["flag_types"].to_list()]
    out: dict[str, Any] = {}
    for c in CLAUSE_TYPES:
        on = np.asarray([c in s for s in shown], dtype=bool)
        row: dict[str, Any] = {"label": LABELS[c], "shown": int(on.sum())}
        if c in truth:
            row["precision"] = _f(float(truth[c][on].mean())) if on.any() else None
            row["true"] = int(truth[c].sum())
            row["recall"] = _f(float(on[truth[c]].mean())) if truth[c].any() else None
        out[c] = row
    named: dict[str, Any] = {}
    for e, c in NAMES.items():
        pos = np.asarray([e in x for x in ev], dtype=bool)
        on = np.asarray([c in s for s in shown], dtype=bool)
        named[e] = {"clause": c, "n": int(pos.sum()), "named": _f(float(on[pos].mean())) if pos.any() else None}
    out["events_named"] = named
    pos = np.asarray(["transplant" in x for x in ev], dtype=bool)
    heart = np.asarray(["new_heart" in s for s in shown], dtype=bool)
    out["different_heart"] = {"on_first_post_transplant": _f(float(heart[pos].mean())) if pos.any() else None,
                              "on_other_visits": _f(float(heart[~pos].mean())) if (~pos).any() else None}
    # "another patient's study" is shown on mislabelled studies themselves, which the pairs leave out
    mis = scan.join(st.select("study_key", "mislabelled"), on="study_key", how="inner")
    on = np.asarray(["other_patient" in (t or []) for t in mis["flag_types"].to_list()], dtype=bool)
    y = mis["mislabelled"].to_numpy().astype(bool)
    out["other_patient"].update({"precision": _f(float(y[on].mean())) if on.any() else None, "true": int(y.sum()),
                                 "recall": _f(float(on[y].mean())) if y.any() else None})
    return out


def legacy_views(res: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``echosearch.change_auc``, ``echoclip_protocol.baseline_event_auc``) of ``evaluate``'s result: the
    since-previous change probability with the share of events its clause names, and the plain cosine on the
    since-first pairs."""
    if "skipped" in res:
        return res, res
    sp, sf = res["since_previous"], res["since_first"]
    named = res["clauses"]["events_named"]
    ours: dict[str, Any] = {"stable_visits": sp["n_negatives"], "stable_flag_rate": sp.get("stable_flag_rate")}
    theirs: dict[str, Any] = {}
    for e in EVENTS:
        ours[e] = {"auc": sp[e]["echosearch"]["auc"], "flag_recall": named[e]["named"], "n_pos": sp[e]["n_pos"]}
        theirs[e] = {"auc": sf[e]["plain"]["auc"], "n_pos": sf[e]["n_pos"], "n_neg": sf[e]["n_neg"]}
    return ours, theirs


def _ci(x: dict[str, Any] | None) -> str:
    if not x or x.get("auc") is None:
        return ""
    lo_hi = x.get("ci95")
    return f"{x['auc']:.3f}" + (f" [{lo_hi[0]:.2f}-{lo_hi[1]:.2f}]" if lo_hi and None not in lo_hi else "")


def format_change_table(res: dict[str, Any]) -> Table:
    """Change AUC per task and event for every score, all on the same pairs, and the clause checks."""
    t = Table(title="change AUC, every column on the SAME pairs, positives and negatives of its task "
                    "(bootstrap 95 % intervals; mislabelled studies left out)")
    if "skipped" in res:
        t.add_column("change")
        t.add_row(f"skipped: {res['skipped']}")
        return t
    names = [n for n in SCORES if any(n in res[task].get(e, {}) for task in TASKS for e in EVENTS)]
    for c in ("task: event", "pos/neg", *[SCORES[n] for n in names], "echosearch - plain [95 %]"):
        t.add_column(c)
    for task in TASKS:
        for e in EVENTS:
            r = res[task].get(e, {})
            if not r.get("n_pos"):
                continue
            es = r.get("echosearch", {})
            diff = es.get("minus_plain")
            dci = es.get("minus_plain_ci95") or [None, None]
            t.add_row(f"{task.replace('_', ' ')}: {e}", f"{r['n_pos']}/{r['n_neg']}", *[_ci(r.get(n)) for n in names],
                      "" if diff is None else f"{diff:+.3f} [{dci[0]:+.2f}, {dci[1]:+.2f}]")
    sfr = res["since_previous"].get("stable_flag_rate")
    t.add_row("flags on stable visits", "", "" if sfr is None else f"{sfr:.3f}", *[""] * len(names))
    cl = res.get("clauses", {})
    for c in CLAUSE_TYPES:
        r = cl.get(c, {})
        if r.get("shown") or r.get("true"):
            t.add_row(f"clause '{r['label']}'", f"{r.get('shown')} shown / {r.get('true')} true",
                      f"precision {r.get('precision')}", f"recall {r.get('recall')}", *[""] * (len(names) - 1))
    dh = cl.get("different_heart", {})
    t.add_row("'new heart' on first post-transplant / other visits", "",
              f"{dh.get('on_first_post_transplant')} / {dh.get('on_other_visits')}", *[""] * len(names))
    return t


def change_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (measure, echosearch, plain cosine on the same pairs, EchoCLIP paper) for ``evaluate.format_table``."""
    if not res or "skipped" in res:
        return [("change", f"skipped: {res.get('skipped')}" if res else "", "", "")]
    rows: list[tuple[str, str, str, str]] = []
    for task in TASKS:
        for e in EVENTS:
            r = res[task].get(e, {})
            if r.get("n_pos"):
                anchor = "0.79" if e == "transplant" and task == "since_first" else \
                    "0.77 (cardiac surgery)" if task == "since_first" and e in ("tavr_implant", "mitraclip_implant") else ""
                rows.append((f"change AUC {task.replace('_', ' ')}: {e} (n={r['n_pos']}/{r['n_neg']}, same pairs)",
                             _ci(r.get("echosearch")), f"plain 1-cos {_ci(r.get('plain'))}", anchor))
    sfr = res["since_previous"].get("stable_flag_rate")
    rows.append(("change flags on stable visits", "" if sfr is None else f"{sfr:.3f}", "", ""))
    return rows
