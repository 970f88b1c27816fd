"""Search: free text, an uploaded clip, or "more like this"; filters; a gallery of playing clips.

The page is honest about its state: results always match the filters shown (a changed filter re-runs the
search), the heading names the active filters, an error clears old results, an empty query asks for one,
and the URL carries the query, filters and patient so that a result can be shared. Each result says how
it stands against this archive, and why it matched.
"""

from __future__ import annotations

import json
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import streamlit as st
import ui

from echosearch.appcore.data import preview_html
from echosearch.appcore.search import EF_BANDS, SearchRequest, make_filters, sentences
from echosearch.errors import EchosearchError
from echosearch.ingest.previews import preferred_extension, preview_policy, render_preview
from echosearch.model.report_facts import report_ef
from echosearch.search.view import READING_LABEL, SearchOutcome, describe_filters

EXAMPLE = "SEVERELY REDUCED LEFT VENTRICULAR SYSTOLIC FUNCTION."
DEVICE_LABELS = {"pacer_lead": "pacemaker/ICD lead", "tavr": "TAVR valve", "mitraclip": "MitraClip"}
SCOPE_LABELS = {"in": "Echo B-mode only (what the model knows)", "all": "All clips",
                "out": "Out-of-scope clips only"}
MODE_LABELS = {"bmode": "B-mode", "doppler": "colour Doppler"}
LEVEL_LABELS = {"video": "clips", "study": "studies"}
COLUMNS = 3

st.title("Search echoes")
idx = ui.app_index()
opts = idx.filter_options()
pseudonyms = opts["patients"]["patient_pseudonym"].to_list()
raw = {r["patient_pseudonym"]: r["patient_id_raw"] for r in opts["patients"].iter_rows(named=True)}
ss = st.session_state


# ---- the URL: read once per session into the widgets -------------------------------------------------------
def _iso(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


if not ss.get("_url_read"):
    ss["_url_read"] = True
    qp = st.query_params
    if qp.get("q"):
        ss["f_text"] = qp["q"]
        ss["_pending_text"] = qp["q"]
    if qp.get("view"):
        ss["f_views"] = [v for v in qp["view"].split(",") if v in opts["views"]]
    if qp.get("patient") and (qp["patient"] in pseudonyms or len(pseudonyms) > ui.MAX_CHOICES):
        ss["f_patient"] = qp["patient"]
    if qp.get("scope") in SCOPE_LABELS:
        ss["f_scope"] = qp["scope"]
    if qp.get("ef") in EF_BANDS:
        ss["f_ef"] = qp["ef"]
    if qp.get("level") in LEVEL_LABELS:
        ss["f_level"] = qp["level"]
    if qp.get("since") or qp.get("until"):
        lo_, hi_ = _iso(qp.get("since")) or opts["date_min"], _iso(qp.get("until")) or opts["date_max"]
        if lo_ and hi_:
            ss["f_dates"] = (lo_, hi_)
    if qp.get("clip", "").isdigit():
        ss["more_like"] = {"kind": "video", "video_key": int(qp["clip"]), "label": "the shared clip"}

# ---- filters --------------------------------------------------------------------------------------------
with st.sidebar:
    st.header("Filters")
    lo, hi = opts["date_min"], opts["date_max"]
    first: dict[str, Any] = {} if "f_dates" in ss else {"value": (lo, hi) if lo and hi else ()}
    dates: Any = st.date_input("Study dates", min_value=lo, max_value=hi, key="f_dates", **first)
    scope: str = st.selectbox("Clips", list(SCOPE_LABELS), format_func=lambda v: SCOPE_LABELS[v], key="f_scope",
                         help="Out of scope: not an echocardiogram, or colour Doppler. The model was trained on "
                              "B-mode echo; its numbers for other clips mean nothing.")
    views = st.multiselect("View", opts["views"], key="f_views")
    modes = st.multiselect("Imaging mode", list(MODE_LABELS), format_func=lambda v: MODE_LABELS[v], key="f_modes")
    if len(pseudonyms) <= ui.MAX_CHOICES:
        patient = st.selectbox("Patient (pseudonym)", ["any", *pseudonyms], key="f_patient",
                               format_func=lambda p: "any patient" if p == "any" else ui.patient_label(p, raw.get(p)))
    else:
        patient = st.text_input("Patient (pseudonym)", placeholder="P-...", key="f_patient").strip() or "any"
    ef_band = st.selectbox("Predicted EF", list(EF_BANDS), key="f_ef")
    devices = st.multiselect("Device present (predicted)", list(DEVICE_LABELS), format_func=lambda v: DEVICE_LABELS[v],
                             key="f_devices")
    makers = st.multiselect("Manufacturer", opts["manufacturers"], key="f_makers") if opts["manufacturers"] else []
    level = st.radio("Show", list(LEVEL_LABELS), format_func=lambda v: LEVEL_LABELS[v], horizontal=True, key="f_level")
    k = st.slider("Results", 3, 48, 12, step=3, key="f_k")
since, until = (dates[0], dates[1]) if isinstance(dates, (tuple, list)) and len(dates) == 2 else (None, None)
if since == lo and until == hi:
    since = until = None
patient_value = None if patient == "any" else patient
try:
    filters = make_filters(since=since, until=until, views=views, patient=patient_value, ef_band=ef_band,
                                   devices=devices, manufacturers=makers, scope=None if scope == "all" else scope,
                                   modes=modes)
except EchosearchError as exc:
    st.error(str(exc))
    st.stop()
signature = json.dumps({"f": filters.as_dict() if filters else {}, "level": level, "k": k}, default=str, sort_keys=True)


def share_url(req: SearchRequest | None) -> None:
    """Put the query, filters and patient in the URL (a link restores the page)."""
    params: dict[str, str] = {}
    if req is not None and req.kind == "text" and req.text:
        params["q"] = req.text
    if req is not None and req.kind == "video" and req.video_key is not None:
        params["clip"] = str(req.video_key)
    if views:
        params["view"] = ",".join(views)
    if patient_value:
        params["patient"] = patient_value
    if scope != "in":
        params["scope"] = scope
    if ef_band != "any":
        params["ef"] = ef_band
    if since:
        params["since"] = since.isoformat()
    if until:
        params["until"] = until.isoformat()
    if level != "video":
        params["level"] = level
    st.query_params.from_dict(params)


def run(req: SearchRequest, query_clip: str | None = None) -> None:
    """Run a search under the current filters, keep its outcome in the session and log it. An error or a
    refused upload replaces earlier results: nothing old stays on the page under a new heading."""
    ss.pop("search", None)
    try:
        with st.spinner("Searching ..."):
            out = idx.search(req)
    except (EchosearchError, OSError) as exc:
        ss["search_error"] = str(exc)
        share_url(None)
        return
    ss.pop("search_error", None)
    idx.log(ui.actor(), "search", req.log_detail(out.hits.height))
    if req.kind == "file" and out.query_vector is not None:  # later filter changes re-run by the vector
        req = SearchRequest("vector", k=req.k, level=req.level, filters=req.filters,
                                    vector=out.query_vector, label=req.label)
    ss["search"] = {"label": req.label, "outcome": out, "hits": out.hits, "reports": out.reports, "level": req.level,
                    "query_clip": query_clip, "request": req, "signature": signature}
    share_url(req)


def request(**kw: Any) -> SearchRequest:
    return SearchRequest(k=k, level=level, filters=filters, **kw)


# ---- query -----------------------------------------------------------------------------------------------
text_tab, clip_tab = st.tabs(["Describe findings", "Upload a clip"])
with text_tab, st.form("text-search"):
    text = st.text_input("Findings to look for (report language works best)", placeholder=EXAMPLE, key="f_text")
    whole_study = st.checkbox("Weigh each clip with its whole study", value=True,
                              help="A finding is reported per study and shows in some views only: a clip's score "
                                   "mixes its own similarity with its study's. Untick to find the clips that show "
                                   "the finding themselves.")
    if st.form_submit_button("Search", type="primary"):
        if not (text or "").strip():
            ss.pop("search", None)
            ss["search_error"] = "Type what to look for, for example “" + EXAMPLE + "”."
        else:
            run(request(kind="text", text=text.strip(), label=f"“{text.strip()}”",
                        context=None if whole_study else 0.0))
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
                clip = preview_html(prev)
            except Exception:  # no preview is no reason to fail; the search reports unreadable files
                clip = None
            run(request(kind="file", path=path, label="the uploaded clip"), clip)

pending = ss.pop("more_like", None)
if pending is not None:
    run(request(**pending))
linked = ss.pop("_pending_text", None)
if linked:
    run(request(kind="text", text=linked, label=f"“{linked}”"))

res = ss.get("search")
if res and res.get("signature") != signature:  # the filters changed: re-run, never show stale results
    old: SearchRequest = res["request"]
    run(SearchRequest(old.kind, k=k, level=level, filters=filters, text=old.text, path=old.path,
                              video_key=old.video_key, study_uid=old.study_uid, label=old.label,
                              context=old.context, vector=old.vector), res.get("query_clip"))
    res = ss.get("search")

# ---- results ---------------------------------------------------------------------------------------------
if ss.get("search_error"):
    st.error(ss["search_error"])
    st.stop()
if not res:
    st.info("Describe what you are looking for (for example “" + EXAMPLE + "”), upload a clip, or use "
            "“More like this” on any result. Filters are in the sidebar.")
    st.stop()

out: SearchOutcome = res["outcome"]
hits: pl.DataFrame = out.hits
active = describe_filters(filters)
if out.warning:
    st.subheader(f"Not searched: {res['label']} is out of scope")
    st.warning(out.warning)
    if res.get("query_clip"):
        st.html(res["query_clip"])
    st.stop()
noun = LEVEL_LABELS[res["level"]]
st.subheader(f"{hits.height} {noun} most like {res['label']}" + (f" · {active}" if active else ""))
if out.scope is not None:
    st.caption(f"Query clip: {out.scope.summary()}.")
if out.no_match:
    st.warning(out.assessment.headline() if out.assessment else "No close match.")
elif out.assessment is not None:
    st.caption(out.assessment.headline() + " Placement compares each result with every match this archive "
               "gives to its own report sentences (text) or clips (clip queries).")
if res.get("query_clip"):
    qc, rc = st.columns([1, 3])
    with qc:
        st.html(res["query_clip"])  # inline data: URI, never a /media/ URL
        st.caption("Query clip as the model sees it (sector only)")
else:
    rc = st.container()
reports: pl.DataFrame = out.reports
with rc:
    if reports.height:
        if out.no_match:
            st.markdown("**Nearest reports in this archive**")
            st.caption("For reference only: the query found no close match, so this is not a reading.")
        else:
            st.markdown("**Preliminary reading**")
            st.caption(READING_LABEL)
        for r in reports.iter_rows(named=True):  # report text is data: plain text, never markdown or HTML
            st.text(f"• {' '.join(sentences(r.get('report_text'), 3))}")
if hits.height == 0:
    st.warning("Nothing matches these filters" + (f" ({active})." if active else "."))
    st.stop()

study_keys = hits["study_key"].drop_nulls().to_list()
vids = idx.study_videos(study_keys)
own_reports = {r["study_key"]: r["text"] for r in idx.reports(study_keys).iter_rows(named=True)}
scopes = idx.clip_scopes([int(v) for v in hits["video_key"].drop_nulls().to_list()]) \
    if "video_key" in hits.columns else {}
qvec = out.query_vector if out.meta.get("kind") == "text" else None
rows = hits.rows(named=True)
for start in range(0, len(rows), COLUMNS):
    cols = st.columns(COLUMNS)
    for col, h in zip(cols, rows[start:start + COLUMNS], strict=False):
        with col, st.container(border=True):
            vk = h.get("video_key")
            if vk is None:
                vk = ui.first_video_of(vids, int(h["study_key"]), views[0] if views else None)
            ui.clip(vk)
            sc = scopes.get(int(vk)) if vk is not None else None
            view = h.get("view") or (sc or {}).get("view")
            view_txt = ("view " + view) if view else "view not recorded"
            if sc and sc.get("view_source") not in (None, "label", "dicom header") and not h.get("view"):
                view_txt += f" (model, {sc['view_confidence']:.0%})"
            st.markdown(f"**{h.get('confidence') or 'similar'}**")
            clip_only = f", clip alone {h['clip_score']:.2f}" if h.get("clip_score") is not None else ""
            st.caption(f"{ui.fmt_date(h['study_date'])} · {view_txt} · similarity {h['score']:.2f}{clip_only}")
            st.caption(ui.patient_label(h["patient_pseudonym"], raw.get(h["patient_pseudonym"])))
            if sc and not sc.get("in_scope"):
                st.caption("Out of scope: " + ("colour Doppler" if sc.get("is_echo") else "not an echocardiogram")
                           + "; no model values are shown for it.")
            report = own_reports.get(h["study_key"])
            pred = f"{h['pred_ef']:.0f} %" if h.get("pred_ef") is not None else "none"
            stated = report_ef(report)
            st.caption(f"Predicted EF (model estimate): {pred} · Report EF (stated in the report): "
                       + (f"{stated:.0f} %" if stated is not None else "not stated"))
            if report:
                marked = idx.matched_sentences(report, qvec) if qvec is not None else []
                st.text("Report: " + report)  # plain text: report text is never markdown or HTML
                best = [s for s, hit in marked if hit]
                if best:
                    st.text("Closest to your query: " + " ".join(best))
            else:
                st.caption("No report text for this study.")
            when = ui.fmt_date(h["study_date"])
            more = ({"kind": "video", "video_key": int(vk), "label": f"clip {view or ''} of {when}".replace("  ", " ")}
                    if h.get("video_key") is not None
                    else {"kind": "study", "study_uid": h["study_uid"], "label": f"study of {when}"})
            if st.button("More like this", key=f"more-{h['rank']}-{h['study_key']}-{vk}", use_container_width=True):
                ss["more_like"] = more
                st.rerun()
            if st.button("Patient", key=f"pat-{h['rank']}-{h['study_key']}-{vk}", use_container_width=True,
                         help="Open this patient's timeline"):
                ui.open_patient(h["patient_pseudonym"])
