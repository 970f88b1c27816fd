"""File paths carry patient and accession IDs (PACS exports): the catalog and every output hold labels,
the real locations are sealed under the secret and opened only with it."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from echosearch.catalog import Catalog
from echosearch.cli import main
from echosearch.config import load_settings
from echosearch.errors import ConfigError
from echosearch.ingest.pseudonym import Pseudonymizer
from echosearch.run.local import scan

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def pacs_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """A cohort laid out as a PACS export names it: dicom/<patient ID>/<accession>/<view>.dcm."""
    from echosearch.synth import generate_cohort

    out = tmp_path_factory.mktemp("pacs") / "export"
    truth = generate_cohort(out, patients=3, seed=5, visits=(2, 2), views=("A4C",))
    assert all(str(p).count("/") >= 3 for p in truth["path"].to_list())
    return out, truth


def _identifiers(truth: pl.DataFrame) -> set[str]:
    ids = set(truth["recorded_patient_id"].to_list()) | set(truth["accession_number"].to_list())
    return {str(i) for i in ids if i}


def _scan(src: Path, index: Path, **overrides: object) -> None:
    with Catalog.open(index, create=True) as cat:
        scan([src], cat, load_settings(workers=0, **overrides), progress=False)


def test_no_identifier_from_a_path_reaches_catalog_or_search_output(
        pacs_export: tuple[Path, pl.DataFrame], random_model_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.run.local import index_sources

    monkeypatch.setenv("ECHOSEARCH_SECRET", SECRET)
    src, truth = pacs_export
    bad = tmp_path / "more" / "SYN0000001" / "E0000002"
    bad.mkdir(parents=True)
    (bad / "broken.dcm").write_bytes(b"DICM but not really")  # an error row too
    index = tmp_path / "idx"
    index_sources([src, tmp_path / "more"], index, load_settings(workers=0, model=f"local-dir:{random_model_dir}"),
                  progress=False)
    ids = _identifiers(truth) | {"SYN0000001", "E0000002"}
    raw = (index / "catalog.duckdb").read_bytes()
    assert not [i for i in ids if i.encode() in raw]
    with Catalog.open(index, read_only=True) as cat:
        paths = [r[0] for r in cat.con.sql("SELECT path FROM videos UNION ALL SELECT path FROM ingest_errors").fetchall()]
        where = cat.locations(None)
        assert cat.counts()["ingest_errors"] == 1
    assert paths and all(p.startswith("F-") and p.endswith(".dcm") for p in paths)
    assert {p.relative_to(src).as_posix() for p in where.values()} == set(truth["path"].to_list())
    # search output, table and JSON, shows labels; --where matches labels only
    capsys.readouterr()
    for extra in ([], ["--json"]):
        assert main(["search", "--index", str(index), "--text", "LV EJECTION FRACTION", "-k", "6", *extra]) == 0
        out = capsys.readouterr().out
        assert "F-" in out and not [i for i in ids if i in out]
    assert main(["search", "--index", str(index), "--text", "x", "--where", "path LIKE '%SYN%'", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == []


def test_locate_reveals_the_path_with_the_secret_only(pacs_export: tuple[Path, pl.DataFrame], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ECHOSEARCH_SECRET", SECRET)
    src, truth = pacs_export
    index = tmp_path / "idx"
    _scan(src, index)
    with Catalog.open(index, read_only=True) as cat:
        key, label = cat.con.sql("SELECT video_key, path FROM videos ORDER BY video_key LIMIT 1").fetchall()[0]
    assert main(["locate", str(key), "--index", str(index), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found[0]["label"] == label and Path(found[0]["path"]).is_file()
    assert Path(found[0]["path"]).relative_to(src).as_posix() in truth["path"].to_list()
    assert main(["locate", label, "--index", str(index), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == found[0]["path"]
    with Catalog.open(index, read_only=True) as cat:
        assert cat.con.sql("SELECT action FROM access_log").fetchall()[-1][0] == "locate"
    monkeypatch.setenv("ECHOSEARCH_SECRET", "another-secret-0123456789")
    assert main(["locate", str(key), "--index", str(index)]) != 0
    assert "another pseudonymisation secret" in capsys.readouterr().err
    with Catalog.open(index, read_only=True) as cat, pytest.raises(ConfigError):
        cat.locate(str(key), Pseudonymizer(b"another-secret-0123456789"))


def test_paths_stored_in_the_clear_are_sealed_by_the_next_scan(pacs_export: tuple[Path, pl.DataFrame],
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index from before sealing (raw paths, no location) is mended in place, keys unchanged."""
    monkeypatch.setenv("ECHOSEARCH_SECRET", SECRET)
    src, truth = pacs_export
    index = tmp_path / "idx"
    _scan(src, index)
    with Catalog.open(index) as cat:
        before = dict(cat.locations(None))
        cat.con.execute("UPDATE videos SET path = ?, location = NULL WHERE video_key = ?",
                        [str(before[min(before)]), min(before)])
        assert cat.locations([min(before)]) == {min(before): before[min(before)]}  # readable meanwhile
    _scan(src, index)
    with Catalog.open(index, read_only=True) as cat:
        assert cat.locations(None) == before
        assert all(r[0].startswith("F-") for r in cat.con.sql("SELECT path FROM videos").fetchall())


def test_raw_paths_only_when_the_operator_opts_in(pacs_export: tuple[Path, pl.DataFrame], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOSEARCH_SECRET", SECRET)
    src, truth = pacs_export
    index = tmp_path / "idx"
    _scan(src, index, store_raw_identifiers=True)
    with Catalog.open(index, read_only=True) as cat:
        rows = cat.con.sql("SELECT path, location FROM videos").fetchall()
    assert all(loc is None and Path(p).is_absolute() for p, loc in rows)
    assert {Path(p).relative_to(src).as_posix() for p, _ in rows} == set(truth["path"].to_list())


def test_labels_are_keyed_and_seals_authenticated() -> None:
    a, b = Pseudonymizer(b"k" * 20), Pseudonymizer(b"j" * 20)
    path = "/exports/SYN1656593/E430790279/A4C.dcm"
    assert a.file_label(path) == a.file_label(path) != b.file_label(path)
    assert a.file_label(path).startswith("F-") and a.file_label(path).endswith(".dcm")
    assert "SYN1656593" not in a.file_label(path)
    sealed = a.seal(path)
    assert a.seal(path) != sealed and b"SYN" not in sealed  # fresh nonce each time, nothing in the clear
    assert a.unseal(sealed) == path
    with pytest.raises(ConfigError):
        b.unseal(sealed)
    with pytest.raises(ConfigError):
        a.unseal(sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_a_file_gone_before_encoding_is_an_error_row_with_its_sealed_location(
        pacs_export: tuple[Path, pl.DataFrame], random_model_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Videos scanned earlier and encoded later: a file that vanished meanwhile is reported under its label,
    and the operator can still find which file it was."""
    import shutil

    from echosearch.run.local import index_sources

    monkeypatch.setenv("ECHOSEARCH_SECRET", SECRET)
    src = tmp_path / "export"
    shutil.copytree(pacs_export[0], src)
    index = tmp_path / "idx"
    settings = load_settings(workers=0, model=f"local-dir:{random_model_dir}")
    with Catalog.open(index, create=True) as cat:
        from echosearch.model.encode import load_encoder

        enc = load_encoder(settings.model, device="cpu")
        cat.bind_model(enc.identity)
        scan([src], cat, settings, policy=enc.policy, progress=False)
        gone = next(iter(cat.locations(None).values()))
    gone.unlink()
    index_sources([], index, settings, encoder=enc, progress=False, build_vectors=False)
    with Catalog.open(index, read_only=True) as cat:
        (key, label), = cat.con.sql("SELECT error_id, path FROM ingest_errors").fetchall()
        assert label.startswith("F-") and cat.error_locations()[key] == gone
