"""No absolute path of a development machine ships with the project (package data included)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|work|root|home|Users|mnt|var/folders)/[\w.-]+")


def _shipped_files() -> list[Path]:
    files = [p for d in ("echosearch", "app") for p in (ROOT / d).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".safetensors", ".pyc")]
    return [*files, ROOT / "tests" / "conftest.py"]


def test_no_development_machine_paths_in_package_or_fixtures() -> None:
    found = []
    for path in _shipped_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
    assert not found, "absolute machine paths ship with the project:\n" + "\n".join(found)


def test_the_pattern_finds_what_it_is_for() -> None:
    tmp, work = "/".join(("", "tmp", "s6-dm2", "index")), "/".join(("", "work", "shared", "testdata"))
    assert MACHINE_PATH.search(f'"trained on {tmp}"')
    assert MACHINE_PATH.search(f"return Path('{work}')")
    assert not MACHINE_PATH.search("see docs/encode.md and a" + "/".join(("", "tmp", "b")) + ", https://x.org/home/page")
