"""Patient timeline: studies over time, change scores, zero-shot EF and devices, flags, two visits side by side."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st
import ui

from echosearch.app_api import TASK_LABELS
from echosearch.zeroshot import BINARY_TASKS

Z_THRESHOLD = 3.0

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
row = patients.filter(pl.col("patient_pseudonym") == choice).row(0, named=True)
ui.log_once(f"view_patient:{choice}", "view_patient", {"patient": choice, "patient_key": row["patient_key"]})

with st.spinner("Scoring change between visits ..."):
    tl = idx.patient_timeline(int(row["patient_key"]))
if tl.height == 0:
    st.info("No studies for this patient.")
    st.stop()

dated = tl.filter(pl.col("study_date").is_not_null())
cols = st.columns(4)
cols[0].metric("Studies", tl.height)
cols[1].metric("First study", ui.fmt_date(tl["study_date"].min()))
cols[2].metric("Last study", ui.fmt_date(tl["study_date"].max()))
n_flags = int(tl["flagged"].fill_null(False).sum()) if "flagged" in tl.columns else 0
cols[3].metric("Flagged visits", n_flags)

pdf = dated.with_columns(pl.col("study_date").cast(pl.Date)).to_pandas()
date_x = alt.X("study_date:T", title="study date")

# ---- change scores ---------------------------------------------------------------------------------------
st.subheader("Change between visits")
if "z_prev" in tl.columns and dated.height:
    long = dated.select(
        "visit", "study_date", "views", "explanation",
        pl.col("z_prev").alias("since previous visit"), pl.col("z_baseline").alias("since baseline"),
        pl.col("flagged").fill_null(False),
    ).unpivot(index=["visit", "study_date", "views", "explanation", "flagged"], variable_name="compared with",
              value_name="z").with_columns(pl.col("study_date").cast(pl.Date), pl.col("z").fill_null(0.0))
    base = alt.Chart(long.to_pandas()).encode(x=date_x)
    lines = base.mark_line(point=True).encode(
        y=alt.Y("z:Q", title="change (z, 0 = typical for this patient)"),
        color=alt.Color("compared with:N", legend=alt.Legend(orient="top")),
        tooltip=["visit", alt.Tooltip("study_date:T"), "views", alt.Tooltip("z:Q", format=".1f"), "explanation"])
    flags = base.transform_filter(alt.datum.flagged).mark_point(size=180, shape="diamond", color="#d62728",
                                                                filled=True).encode(y="z:Q")
    rule = alt.Chart().mark_rule(strokeDash=[4, 4], color="#888").encode(y=alt.datum(Z_THRESHOLD))
    st.altair_chart(alt.layer(lines, flags, rule).properties(height=240), width="stretch")
    st.caption(f"Dissimilarity of each study's vector to the previous and to the first study, scaled by this "
               f"patient's own visit-to-visit spread; dashed line z = {Z_THRESHOLD:g}; red diamonds are flagged visits.")
else:
    st.info("No change scores: this patient has a single study or no study vectors.")

# ---- zero-shot predictions ---------------------------------------------------------------------------------
left, right = st.columns(2)
with left:
    st.subheader("Predicted ejection fraction")
    if "ef" in tl.columns and dated.height:
        ef = alt.Chart(pdf).mark_line(point=True).encode(
            x=date_x, y=alt.Y("ef:Q", title="EF (%), zero-shot", scale=alt.Scale(domain=[0, 80])),
            tooltip=["visit", alt.Tooltip("study_date:T"), alt.Tooltip("ef:Q", format=".0f")])
        bands = alt.Chart(pl.DataFrame({"y": [50.0, 40.0, 30.0], "label": ["normal >= 50", "40", "severe < 30"]})
                          .to_pandas()).mark_rule(strokeDash=[2, 3], color="#999").encode(y="y:Q", tooltip=["label"])
        st.altair_chart(alt.layer(bands, ef).properties(height=240), width="stretch")
    else:
        st.info("No EF predictions.")
with right:
    st.subheader("Devices and findings")
    present = [t for t in BINARY_TASKS if t in tl.columns]
    if present and dated.height:
        dev = dated.select("visit", pl.col("study_date").cast(pl.Date), *present).unpivot(
            index=["visit", "study_date"], variable_name="task", value_name="score").with_columns(
            pl.col("task").replace_strict(TASK_LABELS, default=pl.col("task")).alias("finding"))
        chart = alt.Chart(dev.to_pandas()).mark_line(point=True).encode(
            x=date_x, y=alt.Y("score:Q", title="zero-shot score (> 0 = present)"),
            color=alt.Color("finding:N", legend=alt.Legend(orient="bottom", columns=2, title=None)),
            tooltip=["visit", alt.Tooltip("study_date:T"), "finding", alt.Tooltip("score:Q", format=".3f")])
        zero = alt.Chart().mark_rule(color="#444").encode(y=alt.datum(0))
        st.altair_chart(alt.layer(chart, zero).properties(height=240), width="stretch")
    else:
        st.info("No device predictions.")

# ---- flags -----------------------------------------------------------------------------------------------
st.subheader("Flags")
if n_flags:
    for r in tl.filter(pl.col("flagged").fill_null(False)).iter_rows(named=True):
        reasons = ", ".join(r.get("reasons") or []) or "flagged"
        st.warning(f"**Visit {r['visit']} · {ui.fmt_date(r['study_date'])}** — {reasons}.  \n{r['explanation']}")
else:
    st.success("No clinically significant change suspected between this patient's visits.")

# ---- two visits side by side ---------------------------------------------------------------------------------
st.subheader("Compare two visits")
visits = tl.select("visit", "study_key", "study_date", "views").rows(named=True)
if len(visits) < 2:
    st.info("Only one visit.")
    st.stop()
vlabel = {v["visit"]: f"Visit {v['visit']} · {ui.fmt_date(v['study_date'])} · {v['views'] or 'no view'}" for v in visits}
first_flag = tl.filter(pl.col("flagged").fill_null(False))["visit"].to_list() if n_flags else []
default_b = first_flag[0] if first_flag else visits[-1]["visit"]
default_a = max(1, default_b - 1)
c1, c2, c3 = st.columns([2, 2, 1])
va = c1.selectbox("Earlier visit", list(vlabel), index=default_a - 1, format_func=vlabel.get)
vb = c2.selectbox("Later visit", list(vlabel), index=default_b - 1, format_func=vlabel.get)
key_a = int(tl.filter(pl.col("visit") == va)["study_key"][0])
key_b = int(tl.filter(pl.col("visit") == vb)["study_key"][0])
vids = idx.study_videos([key_a, key_b])
views_a = set(vids.filter(pl.col("study_key") == key_a)["view"].drop_nulls().to_list())
views_b = set(vids.filter(pl.col("study_key") == key_b)["view"].drop_nulls().to_list())
common = sorted(views_a & views_b) or sorted(views_a | views_b) or ["(any)"]
view = c3.selectbox("View", common)
view_or_none = None if view == "(any)" else view
ca, cb = st.columns(2)
for col, visit, key in ((ca, va, key_a), (cb, vb, key_b)):
    r = tl.filter(pl.col("visit") == visit).row(0, named=True)
    with col:
        st.markdown(f"**{vlabel[visit]}**")
        ui.clip(ui.first_video_of(vids, key, view_or_none))
        ef_txt = f"EF ≈ {r['ef']:.0f}%" if r.get("ef") is not None else "EF not predicted"
        st.caption(f"{ef_txt}; {r.get('explanation') or ''}")
