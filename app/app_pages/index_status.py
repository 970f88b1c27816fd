"""Index status: model and preprocessing, counts, vector indexes, ingest errors, identity calibration."""

from __future__ import annotations

import json
from pathlib import PurePath

import altair as alt
import polars as pl
import streamlit as st
import ui

st.title("Index status")
idx = ui.app_index()
info = idx.status()
manifest, counts = info["manifest"], info["counts"]
model = manifest.get("model") or {}
pp = model.get("preprocessing") or {}

st.subheader("Contents")
c = st.columns(5)
c[0].metric("Patients", counts.get("patients", 0))
c[1].metric("Studies", counts.get("studies", 0))
c[2].metric("Videos", counts.get("videos", 0))
c[3].metric("Reports", counts.get("reports", 0))
c[4].metric("Ingest errors", counts.get("ingest_errors", 0))

st.subheader("Model and preprocessing")
m = st.columns(5)
m[0].metric("Model", str(model.get("name", "none")))
m[1].metric("Embedding size", str(model.get("embed_dim", "n/a")))
m[2].metric("Frame policy", str(pp.get("name", "n/a")))
m[3].metric("Frames per clip", str(pp.get("n_frames", "n/a")))
m[4].metric("Input size", f"{pp.get('size', '?')} px")
st.caption(f"Weights sha256 `{str(model.get('weights_sha256'))[:16]}…` · model source "
           f"`{manifest.get('model_source', 'n/a')}` · created {manifest.get('created_at', 'n/a')} · "
           f"generation {manifest.get('generation', 'n/a')} · schema v{manifest.get('schema_version', '?')} · "
           f"sector masking {'on' if pp.get('masking') else 'off'}")

st.subheader("Vector indexes")
vec = info.get("vector_indexes") or {}
if vec:
    rows = [{"level": lvl, "type": v.get("index_type"), "vectors": v.get("ntotal"),
             "recall@10 vs exact": v.get("recall_at_10"), "p50 latency (ms)": v.get("latency_p50_ms"),
             "catalog generation": v.get("catalog_generation"), "built": v.get("created_at"),
             "up to date": v.get("catalog_generation") == manifest.get("generation")
             and v.get("ntotal") == counts.get(f"{lvl}_embeddings")} for lvl, v in vec.items()]
    st.dataframe(pl.DataFrame(rows), hide_index=True, width="stretch")
else:
    st.warning("No vector indexes: run `echosearch reindex`.")

st.subheader("Ingest errors")
errors = idx.ingest_errors()
if errors.height == 0:
    st.success("Every input file was read.")
else:
    failures = errors.filter(pl.col("stage") != "report-object")
    reports = errors.height - failures.height
    if reports:
        st.caption(f"{reports} report objects (SR / PDF) were recorded as reports, not failures.")
    if failures.height:
        by = failures.group_by("stage", "reason").len("files").sort("files", descending=True)
        st.dataframe(by, hide_index=True, width="stretch")
        with st.expander(f"All {failures.height} failed files"):
            st.dataframe(failures.with_columns(
                pl.col("path").map_elements(lambda p: PurePath(p).name, return_dtype=pl.String).alias("file"))
                .select("file", "stage", "reason", "occurred_at"), hide_index=True, width="stretch")
            st.caption("File names only; full paths are in the catalog table `ingest_errors`.")

st.subheader("Identity calibration")
cals = idx.calibrations()
if cals.height == 0:
    st.info("No calibration yet: it is fitted by the first identity audit or change scan.")
else:
    st.dataframe(cals.select("name", "auc", "threshold", "n_positive", "n_negative", "created_at"),
                 hide_index=True, width="stretch",
                 column_config={"auc": st.column_config.NumberColumn("AUC", format="%.3f"),
                                "threshold": st.column_config.NumberColumn("threshold at FPR", format="%.3f")})
dist = idx.score_distributions()
if dist.height:
    pair = cals.filter(pl.col("name") == "identity.study_pair") if cals.height else cals
    thr = pair["threshold"][0] if pair.height else None
    auc = pair["auc"][0] if pair.height else None
    hist = alt.Chart(dist.to_pandas()).transform_density(
        "score", groupby=["group"], as_=["score", "density"]).mark_area(opacity=0.5).encode(
        x=alt.X("score:Q", title="cosine similarity of two studies"), y=alt.Y("density:Q", stack=None),
        color=alt.Color("group:N", title=None, legend=alt.Legend(orient="top"),
                        scale=alt.Scale(domain=["same patient", "different patients"], range=["#1f77b4", "#ff7f0e"])))
    layers = [hist]
    if thr is not None:
        layers.append(alt.Chart().mark_rule(strokeDash=[4, 4], color="#444").encode(x=alt.datum(float(thr))))
    st.altair_chart(alt.layer(*layers).properties(height=260), width="stretch")
    st.caption("Study-pair similarity for pairs of the same recorded patient and of different patients"
               + (f"; AUC {auc:.3f}" if auc is not None else "")
               + (f"; dashed line: decision threshold {thr:.3f}" if thr is not None else "") + ".")
    if pair.height:
        params = json.loads(pair["params"][0] or "{}")
        if params.get("x") and params.get("y"):
            curve = pl.DataFrame({"score": params["x"], "p_same": params["y"]}).to_pandas()
            st.markdown("**Calibrated probability that two studies show the same patient**")
            st.altair_chart(alt.Chart(curve).mark_line(interpolate="step-after").encode(
                x=alt.X("score:Q", title="cosine similarity of two studies", scale=alt.Scale(zero=False)),
                y=alt.Y("p_same:Q", title="P(same patient)", scale=alt.Scale(domain=[0, 1]))
            ).properties(height=220), width="stretch")

st.subheader("Access log")
log = idx.access_log(100)
st.dataframe(log, hide_index=True, width="stretch")
