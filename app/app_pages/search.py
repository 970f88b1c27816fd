"""Search: free text, an uploaded clip, or "more like this"; filters; a gallery of playing clips."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import streamlit as st
import ui

from echosearch import app_api
from echosearch.errors import EchosearchError
from echosearch.previews import preferred_extension, preview_policy, render_preview

EXAMPLE = "SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION."
DEVICE_LABELS = {"pacer_lead": "pacemaker/ICD lead", "tavr": "TAVR valve", "mitraclip": "MitraClip"}
COLUMNS = 3

st.title("Search echoes")
idx = ui.app_index()
opts = idx.filter_options()

# ---- filters --------------------------------------------------------------------------------------------
with st.sidebar:
    st.header("Filters")
    lo, hi = opts["date_min"], opts["date_max"]
    dates: Any = st.date_input("Study dates", value=(lo, hi) if lo and hi else (), min_value=lo, max_value=hi)
    views = st.multiselect("View", opts["views"])
    pseudonyms = opts["patients"]["patient_pseudonym"].to_list()
    if len(pseudonyms) <= ui.MAX_CHOICES:
        patient = st.selectbox("Patient (pseudonym)", ["any", *pseudonyms])
    else:
        patient = st.text_input("Patient (pseudonym)", placeholder="P-...").strip() or "any"
    ef_band = st.selectbox("Predicted EF", list(app_api.EF_BANDS))
    devices = st.multiselect("Device present (predicted)", list(DEVICE_LABELS), format_func=DEVICE_LABELS.get)
    makers = st.multiselect("Manufacturer", opts["manufacturers"]) if opts["manufacturers"] else []
    level = st.radio("Show", ["video", "study"], format_func={"video": "clips", "study": "studies"}.get,
                     horizontal=True)
    k = st.slider("Results", 3, 48, 12, step=3)
since, until = (dates[0], dates[1]) if isinstance(dates, (tuple, list)) and len(dates) == 2 else (None, None)
if since == lo and until == hi:
    since = until = None
filters = app_api.make_filters(since=since, until=until, views=views, patient=None if patient == "any" else patient,
                               ef_band=ef_band, devices=devices, manufacturers=makers)


def run(req: app_api.SearchRequest, query_clip: str | None = None) -> None:
    """Run a search, keep its results in the session and record it in the access log."""
    try:
        with st.spinner("Searching ..."):
            hits, reports = app_api.run_search(ui.searcher(), req)
    except (EchosearchError, OSError) as exc:
        st.error(str(exc))
        return
    idx.log(ui.actor(), "search", req.log_detail(hits.height))
    st.session_state["search"] = {"label": req.label, "hits": hits, "reports": reports, "level": req.level,
                                  "query_clip": query_clip, "request": req}


# ---- query -----------------------------------------------------------------------------------------------
text_tab, clip_tab = st.tabs(["Describe findings", "Upload a clip"])
with text_tab, st.form("text-search"):
    text = st.text_input("Findings to look for (report language works best)", placeholder=EXAMPLE)
    whole_study = st.checkbox("Weigh each clip with its whole study", value=True,
                              help="A finding is reported per study and shows in some views only: a clip's score "
                                   "mixes its own similarity with its study's (the clip's own is shown in brackets). "
                                   "Untick to find the clips that show the finding themselves.")
    if st.form_submit_button("Search", type="primary"):
        run(app_api.SearchRequest("text", k=k, level=level, filters=filters, text=text or EXAMPLE,
                                  label=f"“{text or EXAMPLE}”", context=None if whole_study else 0.0))
with clip_tab:
    upload = st.file_uploader("Echo clip: DICOM, AVI or MP4", accept_multiple_files=False)
    if upload is not None and st.button("Find similar", type="primary"):
        with tempfile.TemporaryDirectory(prefix="echosearch-upload-") as tmp:
            path = Path(tmp) / ("query" + Path(upload.name).suffix.lower()[:8])
            path.write_bytes(upload.getvalue())
            clip = None
            try:
                policy = preview_policy((idx.manifest().get("model") or {}).get("preprocessing"))
                prev = render_preview(path, Path(tmp) / f"preview{preferred_extension()}", policy)
                clip = app_api.preview_html(prev)
            except Exception:  # no preview is no reason to fail; the search reports unreadable files
                clip = None
            run(app_api.SearchRequest("file", k=k, level=level, filters=filters, path=path,
                                      label="the uploaded clip"), clip)

pending = st.session_state.pop("more_like", None)
if pending is not None:
    run(app_api.SearchRequest(k=k, level=level, filters=filters, **pending))
linked = st.query_params.get("q")  # a shareable link: ?q=findings
if linked and st.session_state.get("_linked_q") != linked:
    st.session_state["_linked_q"] = linked
    run(app_api.SearchRequest("text", k=k, level=level, filters=filters, text=linked, label=f"“{linked}”"))

# ---- results ---------------------------------------------------------------------------------------------
res = st.session_state.get("search")
if not res:
    st.info("Describe what you are looking for (for example “" + EXAMPLE + "”), upload a clip, or use "
            "“More like this” on any result. Filters are in the sidebar.")
    st.stop()

hits: pl.DataFrame = res["hits"]
st.subheader(f"{hits.height} {'clips' if res['level'] == 'video' else 'studies'} most like {res['label']}")
if res.get("query_clip"):
    qc, rc = st.columns([1, 3])
    with qc:
        st.html(res["query_clip"])  # inline data: URI, never a /media/ URL
        st.caption("Query clip as the model sees it (sector only)")
else:
    rc = st.container()
reports: pl.DataFrame = res["reports"]
with rc:
    if reports.height:
        st.markdown("**Nearest report sentences**")
        for r in reports.iter_rows(named=True):  # report text is data: plain text, never markdown or HTML
            st.text(f"• {' '.join(app_api.sentences(r.get('report_text'), 3))} (score {r['score']:.2f})")
if hits.height == 0:
    st.warning("Nothing matches these filters.")
    st.stop()

study_keys = hits["study_key"].drop_nulls().to_list()
vids = idx.study_videos(study_keys)
own_reports = {r["study_key"]: r["text"] for r in idx.reports(study_keys).iter_rows(named=True)}
raw = {r["patient_pseudonym"]: r["patient_id_raw"] for r in opts["patients"].iter_rows(named=True)}
rows = hits.rows(named=True)
for start in range(0, len(rows), COLUMNS):
    cols = st.columns(COLUMNS)
    for col, h in zip(cols, rows[start:start + COLUMNS], strict=False):
        with col, st.container(border=True):
            vk = h.get("video_key")
            if vk is None:
                vk = ui.first_video_of(vids, int(h["study_key"]), views[0] if views else None)
            ui.clip(vk)
            ef = f" · EF≈{h['pred_ef']:.0f}%" if h.get("pred_ef") is not None else ""
            clip_only = f" (clip {h['clip_score']:.3f})" if h.get("clip_score") is not None else ""
            st.markdown(f"**{h['score']:.3f}**{clip_only} · {ui.fmt_date(h['study_date'])} · "
                        f"{h.get('view') or 'view n/a'}{ef}")
            st.caption(ui.patient_label(h["patient_pseudonym"], raw.get(h["patient_pseudonym"])))
            sent = app_api.sentences(own_reports.get(h["study_key"]), 2)
            if sent:
                st.text("Report: " + " ".join(sent))  # plain text: report text is never markdown or HTML
            b1, b2 = st.columns(2)
            if b1.button("More like this", key=f"more-{h['rank']}-{h['study_key']}-{vk}"):
                st.session_state["more_like"] = (
                    {"kind": "video", "video_key": int(vk), "label": f"clip {vk}"} if h.get("video_key") is not None
                    else {"kind": "study", "study_uid": h["study_uid"], "label": f"study of {ui.fmt_date(h['study_date'])}"})
                st.rerun()
            if b2.button("Patient", key=f"pat-{h['rank']}-{h['study_key']}-{vk}"):
                ui.open_patient(h["patient_pseudonym"])
