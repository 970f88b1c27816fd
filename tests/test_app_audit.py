"""The audit page as a reviewer needs it (issue 24, item 6), under ``streamlit.testing.v1.AppTest``.

The session's small app index (tests/test_app.py) is audited once more at a loose ``fpr`` so that several
studies are suspects; the page must list them in the order of the probability it shows, say when the run
was made and how good the calibration is, give one similarity figure per patient (table, metrics and
side-by-side agree), show no raw values, and put clips of both patients side by side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_app import app_env, clips, index_copy, loopback, new_app, ok  # noqa: F401  (fixtures reused)

from echosearch.appcore.data import LocalAppIndex
from echosearch.catalog import Catalog


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from echosearch.identity import audit

    idx = index_copy(tmp_path_factory, "app-audit")
    with Catalog.open(idx) as cat:
        df = audit(cat, fpr=0.3)  # loose on purpose: several suspects to order
    assert int(df["suspect"].sum()) >= 2
    return idx


def _page(app_env: Path) -> object:  # noqa: F811
    at = new_app().run()
    at.switch_page("app_pages/audit.py").run()  # type: ignore[attr-defined]
    ok(at)
    return at


def _texts(at: object) -> list[str]:
    out: list[str] = []
    for kind in ("markdown", "caption", "warning", "info", "metric", "subheader", "title"):
        for el in getattr(at, kind):
            out += [str(getattr(el, "value", "")), str(getattr(el, "label", ""))]
    return out


def test_suspects_in_the_order_of_the_probability_shown(app_env: Path) -> None:  # noqa: F811
    at = _page(app_env)
    table = at.dataframe[0].value  # type: ignore[attr-defined]
    p = table["P(recorded patient is right)"].to_numpy(dtype=float)
    assert list(table["#"]) == list(range(1, len(table) + 1))
    assert len(p) >= 2 and np.all(np.diff(p[np.isfinite(p)]) >= -1e-12), "listed lowest probability first"
    assert set(table["audit"]) == {"suspect"}
    # the review order is the API's rank, and every suspect of the run is listed
    res = LocalAppIndex(app_env).audit_results()
    assert res["rank"].to_list() == list(table["#"]) and res["study_key"].n_unique() == len(table)


def test_run_date_calibration_and_readable_values(app_env: Path) -> None:  # noqa: F811
    at = _page(app_env)
    text = " ".join(_texts(at))
    run = LocalAppIndex(app_env).audit_run()
    assert run is not None and run["vectors"] in ("identity", "content") and 0.5 <= run["calibration_auc"] <= 1
    assert f"Latest run: {run['started_at'].strftime('%Y-%m-%d %H:%M')} UTC" in text
    assert f"AUC {run['calibration_auc']:.3f}" in text
    assert "None" not in text and "nan" not in text.lower().split()
    assert not re.search(r"\bmargin\b|\bz -?\d|\bz-score", text), "no unexplained margin or z"
    assert not re.search(r"\d{2}:\d{2}:\d{2}\.\d", text), "no raw timestamps"
    table = at.dataframe[0].value  # type: ignore[attr-defined]
    assert not table.astype(str).isin(["None", "nan", "NaT"]).to_numpy().any()


def test_one_similarity_figure_and_both_patients_side_by_side(app_env: Path) -> None:  # noqa: F811
    at = _page(app_env)
    table = at.dataframe[0].value  # type: ignore[attr-defined]
    first = table.iloc[0]
    metrics = {m.label: m.value for m in at.metric}  # type: ignore[attr-defined]
    own = next(v for k, v in metrics.items() if k.startswith("Similarity to recorded patient"))
    assert own == f"{first['similarity to recorded patient']:.3f}"
    captions = " ".join(c.value for c in at.caption)  # type: ignore[attr-defined]
    assert f"similarity to this patient {own}" in captions, "the side-by-side shows the table's figure"
    other = first["similarity to that patient"]
    if other == other:  # a closest other patient exists (not NaN)
        assert f"similarity to this patient {other:.3f}" in captions
    row = LocalAppIndex(app_env).audit_results().row(0, named=True)
    ev = json.loads(row["evidence"])
    n_panels = 1 + bool(ev["own_patient_studies"]) + bool(ev["best_other_studies"])
    assert n_panels == 3 and len(clips(at)) == 3, "this study and both patients' closest studies, as clips"
    assert all("margin" not in r and " z " not in r for r in ev["reasons"])


def test_audit_run_of_an_older_run_reads_the_stored_calibration(index_dir: Path, tmp_path: Path) -> None:
    import shutil

    idx = tmp_path / "old"
    shutil.copytree(index_dir, idx)
    with Catalog.open(idx) as cat:  # as a run stored before the calibration's AUC was recorded with it
        run = int(cat.con.sql("SELECT max(run_id) FROM runs WHERE kind = 'audit'").fetchall()[0][0])
        params = json.loads(cat.con.execute("SELECT params FROM runs WHERE run_id = ?", [run]).fetchall()[0][0])
        params.pop("calibration_auc")
        cat.con.execute("UPDATE runs SET params = ? WHERE run_id = ?", [json.dumps(params), run])
        stored = cat.con.sql("SELECT auc FROM calibrations WHERE name = 'identity.study_patient'").fetchall()[0][0]
    app = LocalAppIndex(idx)
    try:
        info = app.audit_run()
        assert info is not None and info["calibration_auc"] == pytest.approx(stored)
        df = app.audit_results(suspects_only=False)
        assert df.filter(pl.col("suspect"))["rank"].max() < df.filter(~pl.col("suspect"))["rank"].min()
    finally:
        app.close()
