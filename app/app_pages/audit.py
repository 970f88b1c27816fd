"""Identity audit: studies whose recorded patient looks wrong, with evidence, clips and reviewer decisions.

One figure per question, the same everywhere on the page: "similarity" to a patient is the audit's score of
the study against that patient (mean cosine to that patient's two closest studies), and suspects are listed
in the order of the probability shown (lowest probability that the recorded patient is right first)."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import streamlit as st
import ui

from echosearch.errors import EchosearchError

NA = "—"


def num(value: Any, digits: int = 3) -> str:
    return NA if value is None else f"{float(value):.{digits}f}"


def when(value: Any) -> str:
    """A run or decision time as a reader wants it (minutes, UTC), never a raw timestamp."""
    return value.strftime("%Y-%m-%d %H:%M UTC") if hasattr(value, "strftime") else (NA if value is None else str(value))


st.title("Identity audit")
st.caption("Studies ranked by how unlikely it is that they show their recorded patient. Each study is compared "
           "with its recorded patient's other studies and with the closest studies of every other patient; "
           "*similarity* to a patient is the mean cosine to that patient's two closest studies.")
idx = ui.app_index()

if idx.latest_run("audit") is None:
    st.info("No identity audit has been run on this index yet.")
    if st.button("Run the identity audit now", type="primary"):
        try:
            with st.spinner("Auditing every study ..."):
                idx.run_audit()
            ui.app_index().log(ui.actor(), "run_audit", {})
        except EchosearchError as exc:
            st.error(str(exc))
            st.stop()
        st.rerun()
    st.stop()

run = idx.audit_run() or {}
vectors = {"identity": "identity vectors", "content": "content (search) vectors"}.get(str(run.get("vectors")),
                                                                                     "study vectors")
auc = run.get("calibration_auc")
quality = ("" if auc is None else " — good" if auc >= 0.95 else " — fair: expect false alarms" if auc >= 0.85
           else " — weak: treat every suspect with caution")
st.caption(f"Latest run: {when(run.get('started_at'))}, on {vectors}. Calibration quality: the probability "
           f"separates a study's own patient from other patients with AUC {num(auc)}{quality}.")

SCOPES = ["awaiting review", "all suspects", "all audited studies"]
linked = {"awaiting": SCOPES[0], "suspects": SCOPES[1], "all": SCOPES[2]}.get(str(st.query_params.get("show")))
scope = st.segmented_control("Show", SCOPES, default=linked or SCOPES[1]) or SCOPES[1]
res = idx.audit_results(suspects_only=scope != "all audited studies")
suspects = res.filter(pl.col("suspect")) if res.height else res
c1, c2, c3 = st.columns(3)
c1.metric("Suspect studies", suspects.height)
c2.metric("Awaiting review", int(suspects["decision"].is_null().sum()) if suspects.height else 0)
c3.metric("Confirmed wrong ID", int((suspects["decision"] == "confirmed").sum()) if suspects.height else 0)
if scope == "awaiting review" and res.height:
    res = res.filter(pl.col("decision").is_null())
if st.button("Re-run the audit"):
    with st.spinner("Auditing every study ..."):
        idx.run_audit()
    idx.log(ui.actor(), "run_audit", {})
    st.rerun()
if res.height == 0:
    st.success("No suspect studies to show from the latest audit run.")
    st.stop()

if res.height > ui.MAX_CHOICES:
    st.caption(f"Showing the first {ui.MAX_CHOICES} of {res.height} studies in review order.")
    res = res.head(ui.MAX_CHOICES)
summary = res.select(
    pl.col("rank").alias("#"), pl.col("study_date").alias("study date"),
    pl.col("recorded_patient").alias("recorded patient"),
    pl.col("p_same").alias("P(recorded patient is right)"),
    pl.col("own_score").alias("similarity to recorded patient"),
    pl.col("best_other_patient").fill_null(NA).alias("most resembles"),
    pl.col("best_other_score").alias("similarity to that patient"),
    pl.when(pl.col("suspect")).then(pl.lit("suspect")).otherwise(pl.lit("not flagged")).alias("audit"),
    pl.col("decision").fill_null("awaiting review").alias("decision"), pl.col("reviewer").fill_null(NA))
st.dataframe(summary, hide_index=True, width="stretch",
             column_config={"P(recorded patient is right)": st.column_config.ProgressColumn(
                                min_value=0, max_value=1, format="%.2f",
                                help="Calibrated probability that the study shows its recorded patient; the list "
                                     "is in this order, lowest first"),
                            "similarity to recorded patient": st.column_config.NumberColumn(format="%.3f"),
                            "similarity to that patient": st.column_config.NumberColumn(format="%.3f"),
                            "study date": st.column_config.DateColumn(format="YYYY-MM-DD")})

ranks = res["rank"].to_list()
rank = st.selectbox("Review suspect", ranks, format_func=lambda r: (
    lambda row: f"#{r} · study of {ui.fmt_date(row['study_date'])} recorded as {row['recorded_patient']} · "
                f"P(right) {num(row['p_same'], 2)}")(res.filter(pl.col("rank") == r).row(0, named=True)))
s = res.filter(pl.col("rank") == rank).row(0, named=True)
study_key = int(s["study_key"])
ui.log_once(f"audit_view:{study_key}", "view_audit_suspect", {"study_key": study_key,
                                                              "patient": s["recorded_patient"]})
evidence = json.loads(s["evidence"] or "{}")
for reason in evidence.get("reasons") or []:
    st.warning(reason)
if heart := evidence.get("heart"):
    st.info(f"Compared with this patient's studies of the same heart only: heart {heart + 1} of "
            f"{s['recorded_patient']}, after a new heart (transplant) the change scan confirmed.")
m1, m2, m3 = st.columns(3)
m1.metric("P(recorded patient is right)", num(s["p_same"], 2))
m2.metric(f"Similarity to recorded patient {s['recorded_patient']}", num(s["own_score"]))
m3.metric(f"Similarity to {s['best_other_patient'] or 'the closest other patient'}", num(s["best_other_score"]))

own = [int(k) for k, _ in evidence.get("own_patient_studies") or []]
other = [int(k) for k, _ in evidence.get("best_other_studies") or []]
keys = [study_key] + own[:1] + other[:1]
vids = idx.study_videos(keys)
info = {r["study_key"]: r for r in idx.study_info(keys).iter_rows(named=True)}
first_view = vids.filter(pl.col("study_key") == study_key)["view"].drop_nulls().to_list()
view = first_view[0] if first_view else None

st.subheader("Side by side" + (f" ({view})" if view else ""))
st.caption("This study next to the closest study of its recorded patient and the closest study of the patient it "
           "most resembles, same view where there is one.")
cols = st.columns(3)
panels = [(study_key, f"This study, recorded as **{s['recorded_patient']}**", None),
          (own[0] if own else None, f"Recorded patient **{s['recorded_patient']}**", s["own_score"]),
          (other[0] if other else None, f"Most resembles **{s['best_other_patient'] or 'another patient'}**",
           s["best_other_score"])]
for col, (key, title, sim) in zip(cols, panels, strict=True):
    with col:
        st.markdown(title)
        if key is None:
            st.caption("no other study of this patient to compare with")
            continue
        r = info.get(key, {})
        ui.clip(ui.first_video_of(vids, key, view))
        extra = f" · similarity to this patient {num(sim)}" if sim is not None else ""
        st.caption(f"study of {ui.fmt_date(r.get('study_date'))}{extra}")
        if r.get("patient_pseudonym") and st.button("Open patient timeline", key=f"open-{key}"):
            ui.open_patient(str(r["patient_pseudonym"]))

st.subheader("Decision")
if s["decision"]:
    st.info(f"Latest decision: **{s['decision']}** by {s['reviewer'] or NA} on {when(s['decided_at'])}"
            + (f" — {s['note']}" if s["note"] else ""))
# no default: a decision is an explicit choice (Save stays disabled until one is made), and after a save the
# widgets start again from no choice (new keys), so that a stray click never records a wrong patient ID
form_gen = int(st.session_state.get("decision_form_gen", 0))
decision = st.radio("Is the recorded patient wrong?", ["confirmed", "dismissed"], index=None, horizontal=True,
                    key=f"decision-{study_key}-{form_gen}",
                    format_func={"confirmed": "Confirmed: wrong patient ID",
                                 "dismissed": "Dismissed: the recorded patient is right"}.get)
note = st.text_input("Note (optional; no patient names)", key=f"decision-note-{study_key}-{form_gen}")
if st.button("Save decision", type="primary", disabled=decision is None) and decision is not None:
    idx.record_decision(study_key, str(decision), ui.actor(), note or None)
    st.session_state["decision_form_gen"] = form_gen + 1
    st.toast(f"Saved: {decision}")
    st.rerun()
if decision is None:
    st.caption("Choose a decision to enable Save.")
hist = idx.decisions(study_key)
if hist.height:
    with st.expander(f"Decision history ({hist.height})"):
        st.dataframe(hist.select(pl.col("decision"), pl.col("reviewer").fill_null(NA),
                                 pl.col("occurred_at").dt.strftime("%Y-%m-%d %H:%M UTC").alias("when"),
                                 pl.col("note").fill_null(NA)), hide_index=True)
