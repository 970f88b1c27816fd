"""Settings: environment, TOML, and the no-default-secret rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from echosearch.config import load_settings
from echosearch.errors import ConfigError
from echosearch.ingest.pseudonym import Pseudonymizer


def test_production_requires_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECHOSEARCH_SECRET", raising=False)
    monkeypatch.setenv("ECHOSEARCH_MODE", "production")
    with pytest.raises(ConfigError, match="no pseudonymisation secret"):
        load_settings().require_secret()


def test_demo_generates_a_secret_once_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Demo mode's key is generated once and kept (0600) in the user's cache, so a later process (locate,
    train-identity, a second index run) opens the same demo index; another user's cache gets another key."""
    monkeypatch.delenv("ECHOSEARCH_SECRET", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    first = load_settings(mode="demo").require_secret()
    assert len(first) >= 32 and load_settings(mode="demo").require_secret() == first
    kept = tmp_path / "a" / "echosearch" / "demo-secret"
    assert kept.read_text().encode() == first and kept.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert load_settings(mode="demo").require_secret() != first


def test_env_and_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml = tmp_path / "echosearch.toml"
    toml.write_text('batch_size = 7\nframes_per_video = 9\nsecret = "toml-secret-0123456789"\n')
    monkeypatch.setenv("ECHOSEARCH_CONFIG", str(toml))
    monkeypatch.delenv("ECHOSEARCH_SECRET", raising=False)
    monkeypatch.setenv("ECHOSEARCH_BATCH_SIZE", "11")
    s = load_settings()
    assert s.batch_size == 11  # environment beats the file
    assert s.frames_per_video == 9
    assert s.require_secret() == b"toml-secret-0123456789"


def test_invalid_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOSEARCH_BATCH_SIZE", "zero")
    with pytest.raises(ConfigError):
        load_settings()


def test_pseudonyms_are_keyed_and_stable() -> None:
    a, b = Pseudonymizer(b"k" * 16), Pseudonymizer(b"j" * 16)
    assert a.patient("123") == a.patient(" 123 ") != b.patient("123")
    assert a.patient("123") != a.accession("123")
    assert a.patient("") is None and a.patient("123").startswith("P-")  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["98765432109876543210", '["list-secret-0123456789"]', '{k = "table-secret-0123456789"}'])
def test_config_errors_never_show_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    from echosearch.cli import main

    toml = tmp_path / "echosearch.toml"
    toml.write_text(f"secret = {value}\nbatch_size = 7\n")
    monkeypatch.setenv("ECHOSEARCH_CONFIG", str(toml))
    monkeypatch.delenv("ECHOSEARCH_SECRET", raising=False)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "secret" in message and "string" in message
    for part in ("98765432109876543210", "0123456789"):
        assert part not in message and part not in repr(info.value.__cause__) and part not in repr(info.value.__context__)
    assert main(["scan", str(tmp_path), "--index", str(tmp_path / "idx")]) == ConfigError.exit_code
    assert "0123456789" not in capsys.readouterr().err
