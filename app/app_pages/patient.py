"""Patient timeline: change probability over time, EF (learnt from the archive's reports where it can be, and
zero-shot) and device states, flags with their probability and evidence clips side by side, and two visits
compared with their report text."""

from __future__ import annotations

import json
from typing import Any

import altair as alt
import polars as pl
import streamlit as st
import ui

from echosearch.appcore.views import TASK_LABELS
from echosearch.change import EF_MARGIN, MIN_PROBABILITY
from echosearch.model.zeroshot import BINARY_TASKS, recorded_thresholds

EF_ESTIMATES = (("ef_learnt", "learnt from this archive's reports"), ("ef", "zero-shot"))  # column, what it is
DATE_AXIS = alt.Axis(format="%b %Y", labelAngle=-30, title="study date")  # years on every label

st.title("Patient timeline")
idx = ui.app_index()
patients = idx.patients().filter(pl.col("n_studies") > 0)
if patients.height == 0:
    st.info("This index has no studies yet.")
    st.stop()

asked = st.query_params.get("patient")  # a link: ?patient=P-...
if asked is not None and "patient_request" not in st.session_state and asked not in set(patients["patient_pseudonym"]):
    # never fall back to another (real) patient for an unknown link, and log nothing: no patient is shown
    st.error("No such patient in this index: the link names a patient pseudonym that this index does not hold.")
    st.stop()

if patients.height > ui.MAX_CHOICES:  # a large archive: find the patient by pseudonym first
    prefix = st.text_input("Find a patient by pseudonym", value=st.session_state.get("patient_last") or "P-")
    patients = patients.filter(pl.col("patient_pseudonym").str.starts_with(prefix.strip())).head(ui.MAX_CHOICES)
    if patients.height == 0:
        st.info("No patient pseudonym starts with that.")
        st.stop()
names = patients["patient_pseudonym"].to_list()
labels = {r["patient_pseudonym"]: f"{ui.patient_label(r['patient_pseudonym'], r['patient_id_raw'])} · "
          f"{r['n_studies']} studies · {ui.fmt_date(r['first_study'])} to {ui.fmt_date(r['last_study'])}"
          for r in patients.iter_rows(named=True)}
requested = st.session_state.pop("patient_request", None)  # from "Patient" buttons on other pages
if requested in labels:
    st.session_state["patient_choice"] = requested
elif st.session_state.get("patient_choice") not in labels:
    first = asked or st.session_state.get("patient_last")
    st.session_state["patient_choice"] = first if first in labels else names[0]
choice = st.selectbox("Patient", names, key="patient_choice", format_func=lambda p: labels.get(p, p))
st.session_state["patient_last"] = choice
if st.query_params.get("patient") != choice:
    st.query_params["patient"] = choice  # the URL names the patient shown: a reload or a shared link keeps it
row = patients.filter(pl.col("patient_pseudonym") == choice).row(0, named=True)
ui.log_once(f"view_patient:{choice}", "view_patient", {"patient": choice, "patient_key": row["patient_key"]})

with st.spinner("Scoring change between visits ..."):
    tl = idx.patient_timeline(int(row["patient_key"]))
if tl.height == 0:
    st.info("No studies for this patient.")
    st.stop()


def flags_of(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The flags of a visit as the scan wrote them (type, label, probability, text, evidence)."""
    try:
        return list(json.loads(r.get("flags") or "[]"))
    except (TypeError, ValueError):
        return []


dated = tl.filter(pl.col("study_date").is_not_null()).with_columns(pl.col("study_date").cast(pl.Date))
flag_rows = [r for r in tl.iter_rows(named=True) if flags_of(r)]
cols = st.columns(4)
cols[0].metric("Studies", tl.height)
cols[1].metric("First study", ui.fmt_date(tl["study_date"].min()))
cols[2].metric("Last study", ui.fmt_date(tl["study_date"].max()))
cols[3].metric("Visits with a flag", len(flag_rows))
date_x = alt.X("study_date:T", axis=DATE_AXIS)

# ---- change -----------------------------------------------------------------------------------------------
st.subheader("Change between visits")
if "change_prob" in tl.columns and dated.filter(pl.col("change_prob").is_not_null()).height:
    long = dated.filter(pl.col("change_prob").is_not_null()).select(
        "visit", "study_date", "views", "explanation", pl.col("flagged").fill_null(False),
        pl.col("change_prob").alias("since previous visit"),
        pl.col("change_prob_baseline").alias("since first visit"),
    ).unpivot(index=["visit", "study_date", "views", "explanation", "flagged"], variable_name="compared with",
              value_name="probability").drop_nulls("probability")
    base = alt.Chart(long.to_pandas()).encode(x=date_x)
    lines = base.mark_line(point=True).encode(
        y=alt.Y("probability:Q", title="probability of a flagged change", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("compared with:N", legend=alt.Legend(orient="top")),
        tooltip=["visit", alt.Tooltip("study_date:T", format="%d %b %Y"), "views",
                 alt.Tooltip("probability:Q", format=".2f"), "explanation"])
    # flagged visits: drawn on the "since previous visit" line, which a flag always lifts to the flag level or above
    marks = base.transform_filter((alt.datum.flagged) & (alt.datum["compared with"] == "since previous visit")) \
        .mark_point(size=180, shape="diamond", color="#d62728", filled=True).encode(y="probability:Q")
    rule = alt.Chart().mark_rule(strokeDash=[4, 4], color="#888").encode(y=alt.datum(MIN_PROBABILITY))
    st.altair_chart(alt.layer(lines, marks, rule).properties(height=240), width="stretch")
    st.caption(f"Probability that something on the flag list (EF fall or rise beyond {EF_MARGIN:g} points, a new "
               f"or removed device or valve, a new heart) happened since the previous visit and since the first "
               f"visit, from like-view comparisons of the clips; dashed line: the flag level {MIN_PROBABILITY:g}; "
               "red diamonds: visits with a flag (below).")
else:
    st.info("No change scores: this patient has a single study or no study vectors.")

# ---- EF (learnt and zero-shot) and device states -----------------------------------------------------------
left, right = st.columns(2)
with left:
    st.subheader("Predicted ejection fraction")
    series = {c: name for c, name in EF_ESTIMATES if c in tl.columns and dated.filter(pl.col(c).is_not_null()).height}
    if series:
        long = dated.select("visit", "study_date", *series).unpivot(index=["visit", "study_date"], on=list(series),
                                                                    variable_name="estimate", value_name="EF")
        long = long.with_columns(pl.col("estimate").replace_strict(series)).drop_nulls("EF")
        ef = alt.Chart(long.to_pandas()).mark_line(point=True).encode(
            x=date_x, y=alt.Y("EF:Q", title="EF (%)", scale=alt.Scale(domain=[0, 80])),
            color=alt.Color("estimate:N", legend=alt.Legend(orient="bottom", title=None)),
            tooltip=["visit", alt.Tooltip("study_date:T", format="%d %b %Y"), "estimate",
                     alt.Tooltip("EF:Q", format=".0f")])
        bands = alt.Chart(pl.DataFrame({"y": [50.0, 40.0, 30.0], "label": ["normal >= 50", "40", "severe < 30"]})
                          .to_pandas()).mark_rule(strokeDash=[2, 3], color="#999").encode(y="y:Q", tooltip=["label"])
        st.altair_chart(alt.layer(bands, ef).properties(height=240), width="stretch")
    else:
        st.info("No EF predictions.")
with right:
    st.subheader("Devices and findings")
    present = [t for t in BINARY_TASKS if t in tl.columns]
    if present and dated.height:
        thr = recorded_thresholds(idx.manifest().get("zeroshot"))
        dev = dated.select("visit", "study_date", *present).unpivot(
            index=["visit", "study_date"], variable_name="task", value_name="score").drop_nulls("score")
        dev = dev.with_columns(
            pl.col("task").replace_strict(TASK_LABELS, default=pl.col("task")).alias("finding"),
            pl.struct("task", "score").map_elements(
                lambda x: "no threshold" if thr.get(x["task"]) is None else
                "seen" if x["score"] > thr[x["task"]] else "not seen", return_dtype=pl.String).alias("state"))
        # one row per finding, one cell per visit: a device present throughout is a full row, not a flat line
        strip = alt.Chart(dev.to_pandas()).mark_square(size=260).encode(
            x=date_x, y=alt.Y("finding:N", title=None, axis=alt.Axis(labelLimit=220)),
            color=alt.Color("state:N", scale=alt.Scale(domain=["seen", "not seen", "no threshold"],
                                                       range=["#1f77b4", "#e3e3e3", "#ffbf79"]),
                            legend=alt.Legend(orient="bottom", title=None)),
            tooltip=["visit", alt.Tooltip("study_date:T", format="%d %b %Y"), "finding", "state",
                     alt.Tooltip("score:Q", format=".3f", title="zero-shot score")])
        st.altair_chart(strip.properties(height=40 + 36 * len(present)), width="stretch")
        st.caption("Seen: the study's zero-shot score is above the index's presence threshold for that finding "
                   "(scores in the tooltip). New and removed devices are judged along the whole timeline (Flags).")
    else:
        st.info("No device predictions.")

# ---- flags, each with its probability and the clips behind it -------------------------------------------------
st.subheader("Flags")
if flag_rows:
    vids_all = idx.study_videos(tl["study_key"].to_list())
    for r in flag_rows:
        prev = tl.filter(pl.col("study_key") == r.get("prev_study_key"))
        before = prev.row(0, named=True) if prev.height else None
        head = f"Visit {r['visit']} · {ui.fmt_date(r['study_date'])}"
        if before is not None:
            head += f" (compared with visit {before['visit']} · {ui.fmt_date(before['study_date'])})"
        with st.container(border=True):
            st.markdown(f"**{head}**")
            for f in flags_of(r):
                st.markdown(f"**{f['label']}** · probability {float(f['probability']):.2f}  \n{f['text']}")
                ev = f.get("evidence") or {}
                a, b = st.columns(2)
                for col, keys, when in ((a, ev.get("before") or [], "before"), (b, ev.get("after") or [], "after")):
                    with col:
                        key = int(keys[0]) if keys else None
                        view = vids_all.filter(pl.col("video_key") == key)["view"].to_list() if key else []
                        ui.clip(key, f"{when}: {view[0] if view and view[0] else 'clip'}" if key else None)
else:
    st.success(f"No flag reached probability {MIN_PROBABILITY:g} between this patient's visits.")
if "ef" in tl.columns and "ef_prev" in tl.columns:  # EF steps beyond the margin that did not make a flag
    for r in tl.iter_rows(named=True):
        learnt = r.get("ef_learnt") is not None and r.get("ef_learnt_prev") is not None  # the better estimate
        ef1, ef0 = (r.get("ef_learnt"), r.get("ef_learnt_prev")) if learnt else (r.get("ef"), r.get("ef_prev"))
        kinds = {f["type"] for f in flags_of(r)}
        if ef1 is not None and ef0 is not None and abs(ef1 - ef0) >= EF_MARGIN and not kinds & {"ef_fall", "ef_rise"}:
            st.info(f"Visit {r['visit']} · {ui.fmt_date(r['study_date'])}: "
                    f"{'EF learnt from the reports' if learnt else 'predicted EF'} {ef0:.0f}% -> {ef1:.0f}% "
                    f"({ef1 - ef0:+.0f} points) is beyond the {EF_MARGIN:g}-point margin, but the views disagree "
                    f"or the step is within the prediction's noise, so it is not flagged (probability "
                    f"{float(r.get('p_ef_fall' if ef1 < ef0 else 'p_ef_rise') or 0):.2f}).")

# ---- two visits side by side ---------------------------------------------------------------------------------
st.subheader("Compare two visits")
visits = tl.select("visit", "study_key", "study_date", "views").rows(named=True)
if len(visits) < 2:
    st.info("Only one visit.")
    st.stop()
vlabel = {v["visit"]: f"Visit {v['visit']} · {ui.fmt_date(v['study_date'])} · {v['views'] or 'no view'}" for v in visits}
default_b = flag_rows[0]["visit"] if flag_rows else visits[-1]["visit"]
default_a = max(1, default_b - 1)
c1, c2, c3 = st.columns([2, 2, 1])
va = c1.selectbox("Earlier visit", list(vlabel), index=default_a - 1, format_func=lambda v: vlabel.get(v, str(v)))
vb = c2.selectbox("Later visit", list(vlabel), index=default_b - 1, format_func=lambda v: vlabel.get(v, str(v)))
key_a = int(tl.filter(pl.col("visit") == va)["study_key"][0])
key_b = int(tl.filter(pl.col("visit") == vb)["study_key"][0])
vids = idx.study_videos([key_a, key_b])
views_a = set(vids.filter(pl.col("study_key") == key_a)["view"].drop_nulls().to_list())
views_b = set(vids.filter(pl.col("study_key") == key_b)["view"].drop_nulls().to_list())
common = sorted(views_a & views_b) or sorted(views_a | views_b) or ["(any)"]
view = c3.selectbox("View", common)
view_or_none = None if view == "(any)" else view
texts = dict(idx.reports([key_a, key_b]).select("study_key", "text").iter_rows())
ca, cb = st.columns(2)
for col, visit, key in ((ca, va, key_a), (cb, vb, key_b)):
    r = tl.filter(pl.col("visit") == visit).row(0, named=True)
    with col:
        st.markdown(f"**{vlabel[visit]}**")
        ui.clip(ui.first_video_of(vids, key, view_or_none))
        est = [f"{r[c]:.0f}% ({how})" for c, how in EF_ESTIMATES if r.get(c) is not None]
        st.caption(f"EF ≈ {'; '.join(est)}" if est else "EF not predicted")
        report = texts.get(key)
        st.text_area("Report", report or "no report text for this study", height=160, disabled=True,
                     key=f"report_{visit}_{col is ca}")
