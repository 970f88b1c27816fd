"""Catalog schema, migrations, documentation drift, and CLI error handling."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echosearch.catalog import SCHEMA_VERSION, Catalog, VideoRecord
from echosearch.cli import main
from echosearch.errors import CatalogError, IndexNotFoundError, ModelMismatchError

DOC = Path(__file__).resolve().parents[1] / "docs" / "catalog.md"
IDENTITY = {"name": "m", "weights_sha256": "abc", "embed_dim": 8, "preprocessing": {"policy": "sector"}}


def _doc_schema() -> dict[str, set[str]]:
    tables: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"^## (\w+)\s*$", line)
        if m:
            current = m.group(1)
            tables[current] = set()
            continue
        m = re.match(r"^- `(\w+)`:", line)
        if m and current:
            tables[current].add(m.group(1))
    return tables


def _live_schema(cat: Catalog) -> dict[str, set[str]]:
    rows = cat.con.sql(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'"
    ).fetchall()
    out: dict[str, set[str]] = {}
    for t, c in rows:
        out.setdefault(t, set()).add(c)
    return out


def test_schema_matches_documentation(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        cat.bind_model(IDENTITY)
        cat.bind_identity({"name": "head", "weights_sha256": "def", "embed_dim": 4})  # identity tables too
        cat.bind_cycle({"format": "echosearch-cycle-v1", "split": 3, "grid": 3, "channels": 2, "dim": 36}, True)
        live = _live_schema(cat)
    doc = _doc_schema()
    assert live == doc, f"docs/catalog.md drifted from the schema: live-only={ {k: live[k] - doc.get(k, set()) for k in live} }"


def test_new_catalog_is_versioned_and_empty(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        assert cat.schema_version() == SCHEMA_VERSION
        assert all(v == 0 for v in cat.counts().values())
        assert cat.generation() == 0


def test_missing_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError):
        Catalog.open(tmp_path / "nothing")


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        cat.con.execute("INSERT INTO schema_migrations VALUES (999, 'future', now())")
    with pytest.raises(CatalogError, match="schema version 999"):
        Catalog.open(tmp_path / "idx")


def _record(i: int, patient: str = "P-1", study: str = "1.2.3") -> VideoRecord:
    return VideoRecord(sha256=f"h{i}", path=f"/x/{i}.dcm", size_bytes=10, kind="dicom", patient_pseudonym=patient,
                       study_uid=study, study_date=date(2020, 1, 1), view="A4C")


def test_record_video_is_idempotent_and_keys_are_explicit(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        k1 = cat.record_video(_record(1))
        k2 = cat.record_video(_record(2))
        assert cat.record_video(_record(1)) == k1
        assert cat.counts()["videos"] == 2 and cat.counts()["studies"] == 1 and cat.counts()["patients"] == 1
        cat.bind_model(IDENTITY)
        vecs = np.eye(8, dtype=np.float32)[:2]
        # stored in reverse order: read back by key, never by position
        cat.store_video_embeddings([k2, k1], vecs, [4, 4])
        ids, got = cat.embeddings("video")
        assert list(ids) == sorted([k1, k2])
        assert np.allclose(got[list(ids).index(k2)], vecs[0])
        assert cat.generation() == 1


_VIDEO_ROWS = ("SELECT v.video_key, v.sha256, v.path, v.view, v.n_frames, v.fps, v.sector_bbox, s.study_key, s.study_uid, "
               "s.study_date, p.patient_key, p.patient_pseudonym, p.patient_name FROM videos v JOIN studies s "
               "USING (study_key) JOIN patients p ON p.patient_key = s.patient_key ORDER BY v.video_key")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=24),
       batch=st.integers(1, 9))
def test_bulk_recording_equals_one_by_one(tmp_path_factory: pytest.TempPathFactory, files: list[tuple[int, int, int]],
                                          batch: int) -> None:
    """Recording in batches (what scan does) gives the same keys and rows as one file at a time, whatever
    the repeats: a known file keeps its key, a patient and a study take their first record's values."""
    recs = [VideoRecord(sha256=f"h{f}", path=f"/x/{f}-{i}.dcm", size_bytes=f, kind="dicom",
                        patient_pseudonym=f"P{s // 2}", study_uid=f"1.2.{s}", study_date=date(2020, 1, 1 + i % 28),
                        view=("A4C", "PLAX", None)[v], n_frames=f or None, fps=30.0 if v else None,
                        sector_bbox=[f, 2, 3, 4] if v != 1 else None, patient_name=f"name{i}")
            for i, (f, s, v) in enumerate(files)]
    root = tmp_path_factory.mktemp("bulk")
    with Catalog.open(root / "one", create=True) as one, Catalog.open(root / "bulk", create=True) as bulk:
        keys_one = {r.sha256: one.record_video(r) for r in recs}
        keys_bulk: dict[str, int] = {}
        for i in range(0, len(recs), batch):
            got = bulk.record_videos(recs[i:i + batch])
            assert set(got) == {r.sha256 for r in recs[i:i + batch]}
            assert all(keys_bulk.setdefault(k, v) == v for k, v in got.items())  # a key never changes
        assert keys_bulk == keys_one
        rows = bulk.con.execute(_VIDEO_ROWS).fetchall()
        assert rows == one.con.execute(_VIDEO_ROWS).fetchall()
        assert bulk.counts() == one.counts()
    # and both are what the rules say, computed here independently of the catalog
    first: dict[str, VideoRecord] = {}
    for r in recs:
        first.setdefault(r.sha256, r)
    study_first = {r.study_uid: r for r in reversed(list(first.values()))}  # first video of each study
    patient_first = {r.patient_pseudonym: r for r in reversed(list(first.values()))}
    assert [row[1] for row in rows] == list(first)  # keys ascend in order of first appearance
    for row in rows:
        v = first[row[1]]
        s0 = study_first[v.study_uid]
        assert (row[2], row[3], row[4], row[5], row[6]) == (v.path, v.view, v.n_frames, v.fps, v.sector_bbox)
        assert (row[8], row[9], row[11]) == (v.study_uid, s0.study_date, s0.patient_pseudonym)
        assert row[12] == patient_first[s0.patient_pseudonym].patient_name


def test_failed_transaction_changes_nothing(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        cat.record_video(_record(1))
        with pytest.raises(RuntimeError), cat.transaction():
            cat.record_video(_record(2, patient="P-2", study="9.9"))
            raise RuntimeError("boom")
        assert cat.counts()["videos"] == 1 and cat.counts()["patients"] == 1


def test_other_model_is_refused(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        cat.bind_model(IDENTITY)
        cat.bind_model(dict(IDENTITY))  # same model: fine
        with pytest.raises(ModelMismatchError):
            cat.bind_model({**IDENTITY, "weights_sha256": "other"})


def test_cli_info_json_on_empty_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Catalog.open(tmp_path / "idx", create=True).close()
    assert main(["info", "--index", str(tmp_path / "idx"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["videos"] == 0 and data["manifest"]["schema_version"] == SCHEMA_VERSION


def test_cli_missing_index_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["info", "--index", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == IndexNotFoundError.exit_code != 0
    assert len(err.splitlines()) == 1 and "no index at" in err and "Traceback" not in err


def test_console_script_version() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "echosearch", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("echosearch ")


def test_cli_bad_argument_is_a_usage_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["synth", str(tmp_path / "c"), "--visits", "3:1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "visits" in err


def test_frame_vectors_are_stored_by_key_and_position(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "idx", create=True) as cat:
        k1, k2 = cat.record_video(_record(1)), cat.record_video(_record(2))
        cat.bind_model(IDENTITY)
        f1 = np.eye(8, dtype=np.float32)[:3]
        f2 = np.eye(8, dtype=np.float32)[5:7]
        cat.store_video_embeddings([k2, k1], np.stack([f2.mean(0), f1.mean(0)]), [2, 3], [f2, f1])
        rows = cat.con.sql("SELECT video_key, frame_index, embedding FROM frame_embeddings "
                           "ORDER BY video_key, frame_index").fetchall()
        assert [(r[0], r[1]) for r in rows] == [(k1, 0), (k1, 1), (k1, 2), (k2, 0), (k2, 1)]
        assert np.allclose(rows[4][2], f2[1]) and np.allclose(rows[0][2], f1[0])
        assert cat.generation() == 1  # one atomic write, one generation


def test_named_queries_are_defined_once_across_the_catalog_layer() -> None:
    """Catalog combines its core with the store/ groups: a name defined twice would silently shadow one of them."""
    groups = [c for c in Catalog.__mro__ if c.__module__.startswith("echosearch.store.") and c.__name__ != "QueryBase"]
    assert len(groups) >= 6  # the catalog's core and every group of named queries take part
    seen: dict[str, str] = {}
    for cls in (Catalog, *groups):
        for name, value in vars(cls).items():
            if callable(value) or isinstance(value, (property, classmethod, staticmethod)):
                if name.startswith("__"):
                    continue
                assert name not in seen, f"{name} is defined in both {seen[name]} and {cls.__name__}"
                seen[name] = cls.__name__


def test_sql_lives_in_the_catalog_layer() -> None:
    """No module outside catalog.py, store/ and filters.py (which builds WHERE fragments) holds an SQL statement."""
    import ast

    root = Path(__file__).resolve().parents[1]
    allowed = {"echosearch/catalog.py", "echosearch/filters.py"}
    vector_files = {"echosearch/store/vectorindex.py", "echosearch/store/vectorrows.py"}  # FAISS side of store/: no SQL
    statement = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|WITH)\s", re.I)
    offenders = []
    for path in sorted([*root.joinpath("echosearch").rglob("*.py"), *root.joinpath("app").rglob("*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel in allowed or (rel.startswith("echosearch/store/") and rel not in vector_files):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and statement.match(node.value) \
                    and ("FROM" in node.value.upper() or "INTO" in node.value.upper() or "TABLE" in node.value.upper()):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
