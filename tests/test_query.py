"""Query API and CLI: filters resolve to the right keys, results equal brute force over them, ids are checked."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from echosearch.catalog import Catalog, VideoRecord
from echosearch.cli import main
from echosearch.errors import IndexMismatchError, QueryError
from echosearch.filters import Filters, check_where, resolve_ids
from echosearch.query import RESULT_COLUMNS, Searcher, reindex
from echosearch.store.vectorindex import build_all, normalise

D = 32
MODEL = {"name": "test", "weights_sha256": "x", "embed_dim": D, "preprocessing": {}}
VIEWS = ("A4C", "PLAX", "A2C")
PATIENTS = [f"PSN-{i:03d}" for i in range(14)]


def build(root: Path, seed: int = 0) -> pl.DataFrame:
    """A catalog of 14 patients x 3 studies x 3 clips with vectors, predictions and reports; returns its truth."""
    rng = np.random.default_rng(seed)
    cat = Catalog.open(root, create=True)
    cat.bind_model(MODEL)
    rows = []
    for p, pseudonym in enumerate(PATIENTS):
        centre = rng.standard_normal(D)
        for s in range(3):
            uid = f"1.2.840.{p}.{s}"
            for v in range(3):
                key = cat.record_video(VideoRecord(
                    sha256=f"{p}-{s}-{v}", path=f"/echo/{pseudonym}/{s}/{v}.dcm", size_bytes=10, kind="dicom",
                    patient_pseudonym=pseudonym, study_uid=uid, study_date=date(2016 + 2 * s + p % 2, 1 + p % 12, 3),
                    view=VIEWS[v], manufacturer=("GE Vingmed", "Philips Medical")[(p + s) % 2]))
                rows.append({"video_key": key, "study_uid": uid, "patient_pseudonym": pseudonym, "view": VIEWS[v],
                             "study_date": date(2016 + 2 * s + p % 2, 1 + p % 12, 3),
                             "manufacturer": ("GE Vingmed", "Philips Medical")[(p + s) % 2],
                             "vec": centre + 0.8 * rng.standard_normal(D)})
    truth = pl.DataFrame(rows)
    vkeys = truth["video_key"].to_list()
    vecs = normalise(np.stack(truth["vec"].to_list()).astype(np.float32))
    cat.store_video_embeddings(vkeys, vecs, [16] * len(vkeys))
    studies = cat.con.sql("SELECT study_key, study_uid FROM studies ORDER BY study_key").pl()
    truth = truth.join(studies, on="study_uid")
    skeys = studies["study_key"].to_list()
    svecs = np.stack([vecs[(truth["study_key"] == k).to_numpy()].mean(0) for k in skeys])
    cat.store_level_embeddings("study", skeys, svecs, [3] * len(skeys))
    cat.store_level_embeddings("report", skeys, normalise(svecs + 0.3 * rng.standard_normal(svecs.shape)))
    for uid in studies["study_uid"]:
        cat.record_report(uid, f"report for {uid}", "test")
    with cat.transaction():
        for k, ef in zip(vkeys, rng.uniform(15, 75, len(vkeys)), strict=True):
            cat.con.execute("INSERT INTO predictions VALUES ('video', ?, 'ef', ?, 'test')", [k, float(ef)])
            cat.con.execute("INSERT INTO predictions VALUES ('video', ?, 'tavr', ?, 'test')", [k, float(k % 5 == 0) - 0.5])
    build_all(cat)
    cat.close()
    return truth.drop("vec")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    root = tmp_path_factory.mktemp("query") / "idx"
    return root, build(root)


@pytest.fixture(scope="module")
def searcher(index: tuple[Path, pl.DataFrame]) -> Searcher:
    with Searcher(index[0]) as s:
        yield s


def vectors(s: Searcher, level: str) -> tuple[np.ndarray, np.ndarray]:
    ids, vecs = s.catalog.embeddings(level)
    return ids, normalise(vecs)


def brute(s: Searcher, level: str, q: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    ids, vecs = vectors(s, level)
    mask = np.isin(ids, allowed)
    sims = vecs[mask] @ normalise(q)[0]
    return np.sort(sims)[::-1][:k]


filters_st = st.builds(
    Filters,
    patients=st.lists(st.sampled_from(PATIENTS), max_size=3).map(tuple),
    exclude_patients=st.lists(st.sampled_from(PATIENTS), max_size=2).map(tuple),
    since=st.one_of(st.none(), st.dates(date(2015, 1, 1), date(2022, 12, 31))),
    until=st.one_of(st.none(), st.dates(date(2015, 1, 1), date(2022, 12, 31))),
    views=st.lists(st.sampled_from([*VIEWS, "a4c"]), max_size=2).map(tuple),
    manufacturers=st.lists(st.sampled_from(["ge", "PHILIPS"]), max_size=1).map(tuple),
    ef_min=st.one_of(st.none(), st.floats(10, 80)),
    devices=st.lists(st.just("tavr"), max_size=1).map(tuple),
)


def allowed_truth(truth: pl.DataFrame, f: Filters, ef: dict[int, float], tavr: set[int]) -> pl.DataFrame:
    t = truth
    if f.patients:
        t = t.filter(pl.col("patient_pseudonym").is_in(list(f.patients)))
    if f.exclude_patients:
        t = t.filter(~pl.col("patient_pseudonym").is_in(list(f.exclude_patients)))
    if f.since:
        t = t.filter(pl.col("study_date") >= f.since)
    if f.until:
        t = t.filter(pl.col("study_date") <= f.until)
    if f.views:
        t = t.filter(pl.col("view").is_in([v.upper() for v in f.views]))
    if f.manufacturers:
        t = t.filter(pl.col("manufacturer").str.to_lowercase().str.contains(f.manufacturers[0].lower(), literal=True))
    if f.ef_min is not None:
        t = t.filter(pl.col("video_key").map_elements(lambda k: ef[k] >= f.ef_min, return_dtype=pl.Boolean))
    if f.devices:
        t = t.filter(pl.col("video_key").is_in(list(tavr)))
    return t


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(f=filters_st, k=st.integers(1, 15), row=st.integers(0, 125))
def test_filtered_video_search_equals_brute_force(searcher: Searcher, index: tuple[Path, pl.DataFrame], f: Filters,
                                                  k: int, row: int) -> None:
    truth = index[1]
    preds = searcher.catalog.con.sql("SELECT key, task, value FROM predictions").pl()
    ef = dict(preds.filter(pl.col("task") == "ef").select("key", "value").iter_rows())
    tavr = set(preds.filter((pl.col("task") == "tavr") & (pl.col("value") > 0))["key"].to_list())
    allowed = allowed_truth(truth, f, ef, tavr)["video_key"].to_numpy()
    got = resolve_ids(searcher.catalog.con, "video", f)
    assert got is None if f.is_empty() else np.array_equal(got, np.sort(allowed))
    ids, vecs = vectors(searcher, "video")
    q = vecs[row % len(ids)][None]
    df = searcher.by_vector(q[0], k, "video", f)
    assert df.columns == list(RESULT_COLUMNS)
    assert searcher.last_info is not None and searcher.last_info.n_available == len(allowed)
    assert df.height == min(k, len(allowed))
    assert set(df["video_key"].to_list()) <= set(allowed.tolist())  # ids exist and satisfy the filter
    np.testing.assert_allclose(df["score"].to_numpy(), brute(searcher, "video", q, allowed, k), atol=1e-5)
    assert df["rank"].to_list() == list(range(1, df.height + 1))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(f=filters_st, k=st.integers(1, 8))
def test_study_level_filters_and_brute_force(searcher: Searcher, index: tuple[Path, pl.DataFrame], f: Filters,
                                              k: int) -> None:
    truth = index[1]
    allowed_studies = resolve_ids(searcher.catalog.con, "study", Filters(patients=f.patients, since=f.since,
                                                                         views=f.views))
    check = allowed_truth(truth, Filters(patients=f.patients, since=f.since, views=f.views), {}, set())
    assert set(allowed_studies.tolist() if allowed_studies is not None else truth["study_key"].to_list()) == set(
        check["study_key"].to_list())
    ids, vecs = vectors(searcher, "study")
    df = searcher.by_vector(vecs[3], k, "study", Filters(patients=f.patients, since=f.since, views=f.views))
    pool = ids if allowed_studies is None else allowed_studies
    np.testing.assert_allclose(df["score"].to_numpy(), brute(searcher, "study", vecs[3][None], pool, k), atol=1e-5)
    assert df["video_key"].null_count() == df.height and set(df["study_key"].to_list()) <= set(pool.tolist())


def test_like_video_excludes_itself_and_joins_metadata(searcher: Searcher, index: tuple[Path, pl.DataFrame]) -> None:
    truth = index[1]
    key = int(truth["video_key"][10])
    df = searcher.like_video(key, 5)
    assert key not in df["video_key"].to_list() and df.height == 5
    row = truth.filter(pl.col("video_key") == df["video_key"][0]).row(0, named=True)
    got = df.row(0, named=True)
    assert (got["patient_pseudonym"], got["view"], got["study_date"], got["path"].startswith("/echo/")) == (
        row["patient_pseudonym"], row["view"], row["study_date"], True)
    assert got["pred_ef"] is not None and 15 <= got["pred_ef"] <= 75
    assert searcher.last_info.n_available == truth.height - 1
    own_study = int(truth["study_key"][10])
    studies = searcher.like_video(key, 4, level="study")
    assert own_study not in studies["study_key"].to_list()


def test_collapse_keeps_best_clip_per_study(searcher: Searcher, index: tuple[Path, pl.DataFrame]) -> None:
    ids, vecs = vectors(searcher, "video")
    df = searcher.by_vector(vecs[0], 6, collapse_study=True)
    assert df.height == 6 and df["study_key"].n_unique() == 6
    assert searcher.last_info.n_available == index[1]["study_key"].n_unique()
    full = searcher.by_vector(vecs[0], len(ids))
    best = full.group_by("study_key", maintain_order=True).first().head(6)
    assert df["video_key"].to_list() == best["video_key"].to_list()


def test_like_study_and_reports(searcher: Searcher, index: tuple[Path, pl.DataFrame]) -> None:
    truth = index[1]
    uid = truth["study_uid"][20]
    own = int(truth["study_key"][20])
    df = searcher.like_study(uid, 5)
    assert own not in df["study_key"].to_list() and df.height == 5
    vids = searcher.like_study(uid, 5, level="video")
    assert own not in vids["study_key"].to_list()
    rep = searcher.reports_for(uid, 3)
    assert rep.height == 3 and own not in rep["study_key"].to_list()
    assert all(t.startswith("report for ") for t in rep["report_text"].to_list())
    assert own in searcher.reports_for(uid, 3, include_self=True)["study_key"].to_list()
    assert searcher.reports_for(int(truth["video_key"][0]), 2).height == 2


def test_unknown_ids_and_bad_queries(searcher: Searcher) -> None:
    with pytest.raises(QueryError):
        searcher.like_video(987654, 3)
    with pytest.raises(QueryError):
        searcher.like_study("no.such.study", 3)
    with pytest.raises(QueryError):
        searcher.by_vector(np.ones(D + 3, np.float32), 3)
    with pytest.raises(QueryError):
        searcher.by_vector(np.ones(D, np.float32), 3, level="frames")
    with pytest.raises(QueryError):
        Filters(devices=("pacemaker",))
    with pytest.raises(QueryError):
        Filters(since="last tuesday")


def test_typed_filters_bind_values(searcher: Searcher) -> None:
    evil = Filters(patients=("x'); DROP TABLE videos; --",), views=("' OR 1=1 --",))
    assert len(resolve_ids(searcher.catalog.con, "video", evil)) == 0
    assert searcher.by_vector(np.ones(D, np.float32), 5, filters=evil).height == 0
    assert searcher.last_info.n_available == 0


def test_where_sql_is_an_expression_on_a_read_only_connection(searcher: Searcher, index: tuple[Path, pl.DataFrame]
                                                              ) -> None:
    truth = index[1]
    f = Filters(where="study_date >= '2019-01-01' AND view = 'A4C'", exclude_patients=(PATIENTS[0],))
    want = truth.filter((pl.col("study_date") >= date(2019, 1, 1)) & (pl.col("view") == "A4C")
                        & (pl.col("patient_pseudonym") != PATIENTS[0]))["video_key"].sort().to_list()
    assert resolve_ids(searcher.catalog.con, "video", f).tolist() == want
    assert len(resolve_ids(searcher.catalog.con, "video", Filters(where="pred_ef < 40 OR tavr > 0"))) > 0
    for bad in ("1=1; DROP TABLE videos", "1=1 -- comment", "1=1) OR (1=1", "(view = 'A4C'", "'unclosed"):
        with pytest.raises(QueryError):
            check_where(bad)
    with pytest.raises(QueryError, match="no_such_column"):
        resolve_ids(searcher.catalog.con, "video", Filters(where="no_such_column > 1"))
    with pytest.raises(QueryError, match="disabled|Permission"):
        resolve_ids(searcher.catalog.con, "video", Filters(where="EXISTS (SELECT * FROM read_text('/etc/hostname'))"))
    writable = duckdb.connect()
    with pytest.raises(QueryError, match="read-only"):
        resolve_ids(writable, "video", Filters(where="1=1"))


class FakeEncoder:
    identity = MODEL

    def __init__(self, vec: np.ndarray) -> None:
        self.vec = vec

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vec for _ in texts])


def test_text_query_uses_the_given_encoder(index: tuple[Path, pl.DataFrame]) -> None:
    with Searcher(index[0]) as s:
        ids, vecs = vectors(s, "video")
        s._encoder = FakeEncoder(vecs[7])
        df = s.by_text("severe aortic stenosis", 3, filters=Filters(views=("A4C",)))
        assert df.height == 3 and set(df["view"].to_list()) == {"A4C"}
        s._encoder = FakeEncoder(vecs[7])
        s._encoder.identity = {**MODEL, "weights_sha256": "other"}
        with pytest.raises(Exception, match="built with"):
            s.by_text("x", 3)


def test_searcher_on_a_callers_catalog(index: tuple[Path, pl.DataFrame]) -> None:
    with Catalog.open(index[0], read_only=True) as cat:
        s = Searcher(index[0], catalog=cat)
        assert s.like_video(int(index[1]["video_key"][0]), 2).height == 2
        s.close()  # the caller's catalog stays open
        assert cat.study_key(index[1]["study_uid"][0]) is not None


def test_no_embeddings_and_stale_index(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    cat = Catalog.open(root, create=True)
    cat.bind_model(MODEL)
    key = cat.record_video(VideoRecord(sha256="a", path="/a", size_bytes=1, kind="avi", patient_pseudonym="P",
                                       study_uid="1"))
    cat.close()
    with Searcher(root) as s, pytest.raises(QueryError, match="no video embeddings"):
        s.by_vector(np.ones(D, np.float32), 3)
    with Catalog.open(root) as cat:
        cat.store_video_embeddings([key], np.ones((1, D), np.float32), [1])
    with Searcher(root) as s, pytest.raises(IndexMismatchError, match="reindex"):
        s.like_video(key, 3)
    manifests = reindex(root)
    assert manifests["video"]["ntotal"] == 1 and manifests["study"]["ntotal"] == 0
    with Searcher(root) as s:
        assert s.by_vector(np.ones(D, np.float32), 3)["video_key"].to_list() == [key]
        assert s.like_video(key, 3).height == 0 and s.last_info.n_available == 0


def test_cli_search_reports_reindex(index: tuple[Path, pl.DataFrame], capsys: pytest.CaptureFixture[str]) -> None:
    root, truth = index
    key = int(truth["video_key"][4])
    assert main(["search", "--index", str(root), "--like-video", str(key), "-k", "4", "--json",
                 "--view", "A4C", "--exclude-patient", PATIENTS[1]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 4 and out["n_available"] == truth.filter(
        (pl.col("view") == "A4C") & (pl.col("patient_pseudonym") != PATIENTS[1]) & (pl.col("video_key") != key)).height
    assert all(r["view"] == "A4C" and r["video_key"] != key for r in out["results"])
    assert out["context"] == 0.0 and "clip_score" not in out["results"][0]  # only text queries default to context
    assert main(["search", "--index", str(root), "--like-video", str(key), "--collapse", "--since", "2018-01-01"]) == 0
    table = capsys.readouterr().out
    assert "best clip per study" in table and "PSN-" in table and "/echo/" in table
    uid = truth["study_uid"][0]
    assert main(["search", "-i", str(root), "--like-study", uid, "--level", "study", "--where", "view = 'PLAX'"]) == 0
    capsys.readouterr()
    assert main(["reports", "--index", str(root), "--like-study", uid, "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    assert main(["search", "--index", str(root), "--like-video", "999999"]) == QueryError.exit_code
    assert main(["search", "--index", str(root), "--like-video", "1", "--text", "x"]) == QueryError.exit_code
    assert main(["search", "--index", str(root), "--like-video", "1", "--where", "1=1; DROP TABLE x"]) == 8
    assert main(["search", "--index", str(root), "--like-video", str(key), "-k", "3", "--context", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["context"] == 0.5 and all("clip_score" in r for r in out["results"])
    assert main(["search", "--index", str(root), "--like-video", str(key), "-k", "3", "--context", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "study context 0.5" in table and "clip" in table.splitlines()[2]
    assert main(["search", "--index", str(root), "--like-video", str(key), "--context", "2"]) != 0
    capsys.readouterr()
    assert main(["reindex", "--index", str(root), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"video", "study", "report"}


def build_context_index(root: Path, seed: int = 3) -> np.ndarray:
    """Studies laid out so that the best clips by their own vectors, the best studies and the best fused
    scores for a query along ``e1`` (returned) are three different sets: 40 studies with one clip at cos 0.9
    and two opposite (study cos < 0), 40 whose three clips sit at cos 0.45 in different directions (study
    cos ~0.65), 6 whose clips sit at cos 0.6 together (fused ~0.6, the true top), 120 of background; and 2
    studies without a study vector (a run stopped before pooling) whose clips sit at cos 0.8 (scored as the
    clip alone: in the top, reached by neither list)."""
    rng = np.random.default_rng(seed)

    def unit_orth(n: int) -> np.ndarray:
        u = rng.standard_normal((n, D))
        u[:, 0] = 0
        return u / np.linalg.norm(u, axis=1, keepdims=True)

    def at(cos: float, u: np.ndarray) -> np.ndarray:
        return cos * np.eye(D)[0] + np.sqrt(1 - cos**2) * u

    studies: list[np.ndarray] = []
    studies += [np.stack([at(0.9, unit_orth(1)[0]), at(-0.9, unit_orth(1)[0]), at(-0.9, unit_orth(1)[0])])
                for _ in range(40)]
    studies += [at(0.45, unit_orth(3)) for _ in range(40)]
    studies += [at(0.6, normalise((unit_orth(1) + 0.3 * unit_orth(3)).astype(np.float32))) for _ in range(6)]
    studies += [normalise(rng.standard_normal((3, D)).astype(np.float32)) for _ in range(120)]
    studies += [at(0.8, unit_orth(3)) for _ in range(2)]
    order = rng.permutation(len(studies))  # keys do not follow the layout
    pooled = [i for i, o in enumerate(order) if o < len(studies) - 2]
    studies = [studies[i] for i in order]
    cat = Catalog.open(root, create=True)
    cat.bind_model(MODEL)
    recs = [VideoRecord(sha256=f"{s}-{v}", path=f"/e/{s}/{v}.avi", size_bytes=1, kind="avi",
                        patient_pseudonym=f"P{s // 3}", study_uid=f"1.9.{s}", view=VIEWS[v])
            for s in range(len(studies)) for v in range(3)]
    keys = cat.record_videos(recs)
    vecs = normalise(np.concatenate(studies).astype(np.float32))
    cat.store_video_embeddings([keys[r.sha256] for r in recs], vecs, [16] * len(recs))
    smap = dict(cat.con.sql("SELECT study_uid, study_key FROM studies").fetchall())
    cat.store_level_embeddings("study", [smap[f"1.9.{s}"] for s in pooled],
                               normalise(vecs.reshape(len(studies), 3, D)[pooled].mean(1)), [3] * len(pooled))
    build_all(cat)
    cat.close()
    return np.eye(D, dtype=np.float32)[0]


@pytest.fixture(scope="module")
def context_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("context") / "idx"
    return root, build_context_index(root)


def fused_brute(s: Searcher, q: np.ndarray, c: float, allowed: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(video keys, fused scores, study keys) of every allowed clip, best first, by a full scan."""
    vids, vv = vectors(s, "video")
    sids, sv = vectors(s, "study")
    study = s.catalog.con.sql("SELECT video_key, study_key FROM videos ORDER BY video_key").fetchnumpy()
    st_of = dict(zip(study["video_key"].tolist(), study["study_key"].tolist(), strict=True))
    vs = np.array([st_of[int(v)] for v in vids])
    srow = np.minimum(np.searchsorted(sids, vs), len(sids) - 1)
    q0 = normalise(q[None])[0]
    clip = vv @ q0
    study = np.where(sids[srow] == vs, sv[srow] @ q0, clip)  # no study vector: the clip alone
    fused = (1 - c) * clip + c * study
    keep = np.ones(len(vids), bool) if allowed is None else np.isin(vids, allowed)
    order = np.argsort(-fused[keep], kind="stable")
    return vids[keep][order], fused[keep][order], vs[keep][order]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 12), c=st.sampled_from([0.2, 0.5, 0.8, 1.0]), row=st.integers(0, 617),
       view=st.sampled_from([None, "PLAX"]), collapse=st.booleans(), fetch=st.sampled_from([1, 64]),
       along_e1=st.booleans())
@example(k=3, c=0.5, row=0, view=None, collapse=False, fetch=1, along_e1=True)  # several rounds, always
@example(k=5, c=0.5, row=0, view=None, collapse=True, fetch=1, along_e1=True)
@example(k=3, c=1.0, row=0, view=None, collapse=False, fetch=1, along_e1=True)  # the top: clips without a study vector
def test_study_context_search_equals_a_full_scan(context_index: tuple[Path, np.ndarray], k: int, c: float, row: int,
                                                 view: str | None, collapse: bool, fetch: int, along_e1: bool) -> None:
    """The threshold algorithm over the clip and study lists returns the exact fused top k, with filters and
    one clip per study: for the layout's query the true top lies outside both lists' first ``fetch`` (1: several
    rounds), and for a query near a random clip the lists disagree less."""
    root, e1 = context_index
    with Searcher(root) as s:
        s.context_fetch = fetch
        ids, vecs = vectors(s, "video")
        rng = np.random.default_rng(row)
        q = (e1 if along_e1 else vecs[row]) + 0.05 * rng.standard_normal(D).astype(np.float32)
        f = Filters(views=(view,)) if view else None
        allowed = resolve_ids(s.catalog.con, "video", f)
        df = s.by_vector(q, k, filters=f, context=c, collapse_study=collapse)
        keys, fused, studies = fused_brute(s, q, c, allowed)
        if collapse:
            first = np.sort(np.unique(studies, return_index=True)[1])
            keys, fused = keys[first], fused[first]
        assert df.columns == [*RESULT_COLUMNS, "clip_score"] and df.height == k
        np.testing.assert_allclose(df["score"].to_numpy(), fused[:k], atol=1e-5)
        assert df["video_key"].to_list() == keys[:k].tolist() or np.allclose(fused[k - 1], fused[k], atol=1e-6)
        clip = dict(zip(ids.tolist(), (vecs @ normalise(q[None])[0]).tolist(), strict=True))
        np.testing.assert_allclose(df["clip_score"].to_numpy(), [clip[v] for v in df["video_key"]], atol=1e-5)
        if view:
            assert set(df["view"].to_list()) == {view}
        assert s.last_info is not None and s.last_info.context == c


def test_study_context_defaults_and_limits(index: tuple[Path, pl.DataFrame]) -> None:
    """Text queries use the study context by default, vector queries and context=0 the clip alone; study-level
    searches ignore it; a weight outside [0, 1] is refused."""
    from echosearch.query import TEXT_CONTEXT

    with Searcher(index[0]) as s:
        ids, vecs = vectors(s, "video")
        s._encoder = FakeEncoder(vecs[11])
        by_text = s.by_text("dilated left ventricle", 5)
        assert s.last_info.context == TEXT_CONTEXT > 0 and "clip_score" in by_text.columns
        assert by_text.equals(s.by_vector(vecs[11], 5, context=TEXT_CONTEXT))
        plain = s.by_text("dilated left ventricle", 5, context=0.0)
        assert plain.columns == list(RESULT_COLUMNS) and plain.equals(s.by_vector(vecs[11], 5))
        assert plain["video_key"][0] == int(ids[11])
        assert s.by_vector(vecs[11], 4, level="study", context=0.7).columns == list(RESULT_COLUMNS)
        with pytest.raises(QueryError, match="context"):
            s.by_vector(vecs[11], 4, context=1.5)


def test_cli_shows_paths_with_markup_and_escapes_as_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "i[/b]"  # the index folder itself reads as markup
    names = ["a[/x].dcm", "\x1b[31mred.dcm", "bad\udcff.dcm", "[bold]b.dcm"]
    with Catalog.open(root, create=True) as cat:
        cat.bind_model(MODEL)
        keys = [cat.record_video(VideoRecord(sha256=f"h{i}", path=f"/e/{n}", size_bytes=1, kind="dicom",
                                             patient_pseudonym=f"P{i}", study_uid=f"1.{i}")) for i, n in enumerate(names)]
        vecs = normalise(np.random.default_rng(0).standard_normal((len(keys), D)).astype(np.float32))
        cat.store_video_embeddings(keys, vecs, [1] * len(keys))
        build_all(cat)
    capsys.readouterr()
    assert main(["search", "--index", str(root), "--like-video", str(keys[3]), "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "a[/x].dcm" in out and "\x1b" not in out and "\\x1b[31mred.dcm" in out and "bad\\xff.dcm" in out
    assert main(["info", "--index", str(root)]) == 0
    assert "i[/b]" in capsys.readouterr().out
    assert main(["search", "--index", str(root), "--video", str(tmp_path / "\x1b[2Jgone.dcm")]) != 0
    err = capsys.readouterr().err
    assert "\x1b[2J" not in err and "\\x1b[2Jgone.dcm" in err


def test_where_refuses_quoting_the_checker_does_not_parse(searcher: Searcher, index: tuple[Path, pl.DataFrame]) -> None:
    # balanced for a checker that knows only '...' and "...", but in SQL it escapes the wrapping parentheses,
    # so that the other filters (here: exclude a patient) no longer hold for the A4C rows
    widen = "$$($$ <> '' AND view = 'A4C') OR (1=1 OR $$)$$ = ''"
    with pytest.raises(QueryError, match="dollar"):
        resolve_ids(searcher.catalog.con, "video", Filters(where=widen, exclude_patients=(PATIENTS[0],)))
    for bad in ("view = $tag$A4C$tag$", "view = $1", "view = E'A4C\\'", "view = e'x'"):
        with pytest.raises(QueryError, match="--where"):
            check_where(bad)
    truth = index[1]
    for fine in ("view = 'A4C' OR path LIKE '%$%'", "view = 'e' OR view = 'E'", "type'x' IS NULL OR 1=1"):
        assert check_where(fine) == fine
    assert len(resolve_ids(searcher.catalog.con, "video", Filters(where="view = 'A4C' OR path LIKE '%$$%'"))) == \
        truth.filter(pl.col("view") == "A4C").height


@pytest.mark.parametrize("bound", ["nan", "inf", "-inf"])
def test_ef_bounds_must_be_finite(index: tuple[Path, pl.DataFrame], bound: str) -> None:
    with pytest.raises(QueryError, match="finite"):
        Filters(ef_min=float(bound))
    with pytest.raises(QueryError, match="finite"):
        Filters(ef_max=bound)  # type: ignore[arg-type]
    root, truth = index
    key = str(truth["video_key"][0])
    assert main(["search", "--index", str(root), "--like-video", key, "--ef-min", bound]) == QueryError.exit_code
