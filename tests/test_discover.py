"""Discover stage: content sniffing, walking rules, manifests, hashing, skipping known files."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REAL_DICOM

from echosearch.ingest.discover import DiscoverFailure, FileRecord, discover, sniff_kind

REAL = REAL_DICOM
DICOM_NAME = "US-MONO2-8-8x-execho.dcm"


def small_dicom(tmp_path: Path) -> bytes:
    src = REAL / DICOM_NAME
    if not src.is_file():
        pytest.skip(f"real DICOM corpus not found at {REAL}")
    return src.read_bytes()


def write_avi(path: Path, n: int = 4, fourcc: str = "MJPG") -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, (32, 32))
    for i in range(n):
        vw.write(np.full((32, 32, 3), i * 20, np.uint8))
    vw.release()
    return path


def records(items: list[FileRecord | DiscoverFailure]) -> list[FileRecord]:
    return [r for r in items if isinstance(r, FileRecord)]


def test_kind_by_content_not_extension(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "echo.bin").write_bytes(small_dicom(tmp_path))
    write_avi(tmp_path / "a" / "movie.avi").rename(tmp_path / "a" / "movie.dat")
    write_avi(tmp_path / "clip.mp4", fourcc="mp4v")
    shutil.copy(tmp_path / "clip.mp4", tmp_path / "clip.noext")  # same content: found once
    (tmp_path / "random.dcm").write_bytes(os.urandom(600))
    found = list(discover([tmp_path]))
    kinds = {r.path.name: r.kind for r in records(found)}
    assert kinds["echo.bin"] == "dicom" and kinds["movie.dat"] == "avi" and kinds["random.dcm"] == "unknown"
    assert kinds["clip.mp4"] == "mp4" and "clip.noext" not in kinds  # duplicate content is processed once


def test_sniffers() -> None:
    assert sniff_kind(b"\0" * 128 + b"DICM" + b"\0" * 10) == "dicom"
    assert sniff_kind(b"RIFF\x10\0\0\0AVI LIST") == "avi"
    assert sniff_kind(b"\0\0\0\x18ftypmp42") == "mp4"
    assert sniff_kind(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100") == "dicom"  # headerless explicit VR
    assert sniff_kind(b"\x08\x00\x16\x00\x1a\x00\x00\x001.2.840") == "dicom"  # headerless implicit VR
    assert sniff_kind(b"hello world, this is text") == "unknown"
    assert sniff_kind(b"") == "unknown"


def test_walk_is_sorted_skips_sidecars_and_hidden(tmp_path: Path) -> None:
    data = small_dicom(tmp_path)
    for i, name in enumerate(["b/2.dcm", "a/1.dcm", "c.dcm"]):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data + bytes([i]))  # distinct content
    for side in [
        "reports.csv",
        "ground_truth.parquet",
        "notes.txt",
        "meta.json",
        "README.md",
        ".hidden.dcm",
        "DICOMDIR",
    ]:
        (tmp_path / side).write_bytes(data + b"side")
    found = list(discover([tmp_path]))
    assert [r.path.relative_to(tmp_path).as_posix() for r in records(found)] == [
        "a/1.dcm",
        "b/2.dcm",
        "c.dcm",
    ]
    assert not [f for f in found if isinstance(f, DiscoverFailure)]
    assert found == list(discover([tmp_path]))  # deterministic


def test_hash_size_and_known_hashes(tmp_path: Path) -> None:
    data = small_dicom(tmp_path)
    (tmp_path / "x.dcm").write_bytes(data)
    (rec,) = records(list(discover([tmp_path])))
    assert rec.sha256 == hashlib.sha256(data).hexdigest() and rec.size == len(data)
    assert records(list(discover([tmp_path], known_hashes={rec.sha256}))) == []
    single = records(list(discover([tmp_path / "x.dcm"])))  # a single file as a source
    assert single == [rec]


def test_symlinks_outside_the_tree_are_not_followed(tmp_path: Path) -> None:
    data = small_dicom(tmp_path)
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.dcm").write_bytes(data + b"outside")
    (root / "inside.dcm").write_bytes(data)
    (root / "sub").mkdir()
    (root / "sub" / "other.dcm").write_bytes(data + b"other")
    os.symlink(outside / "secret.dcm", root / "link_out.dcm")
    os.symlink(outside, root / "dir_out")
    os.symlink(root / "sub", root / "dir_in")  # inside: allowed, but the same files are not listed twice
    os.symlink(root, root / "sub" / "loop")  # a cycle must not hang the walk
    names = sorted(r.path.name for r in records(list(discover([root]))))
    assert names == ["inside.dcm", "other.dcm"]


def test_manifest_csv(tmp_path: Path) -> None:
    (tmp_path / "Videos").mkdir()
    write_avi(tmp_path / "Videos" / "0X1A.avi", 3)
    write_avi(tmp_path / "Videos" / "0X2B.avi", 5)
    manifest = tmp_path / "FileList.csv"
    manifest.write_text("FileName,EF,Split\n0X2B,55.1,TRAIN\n0X1A,60.2,VAL\n0X3C,40,TEST\n")
    found = list(discover([manifest]))
    assert [r.path.name for r in records(found)] == ["0X2B.avi", "0X1A.avi"]  # manifest order
    failures = [f for f in found if isinstance(f, DiscoverFailure)]
    assert len(failures) == 1 and "missing" in failures[0].reason and failures[0].stage == "discover"


def test_missing_source_is_a_failure(tmp_path: Path) -> None:
    (f,) = list(discover([tmp_path / "nope"]))
    assert isinstance(f, DiscoverFailure) and "does not exist" in f.reason


def discover_with_deadline(sources: list[Path], unblock: list[Path], seconds: float = 20) -> list:  # type: ignore[type-arg]
    """``discover`` in a thread: a FIFO that hangs it fails the test (and is then opened for writing, to free it)."""
    import threading

    out: list = []  # type: ignore[type-arg]
    t = threading.Thread(target=lambda: out.extend(discover(sources)), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for fifo in unblock:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("discover blocked on a FIFO")
    return out


def test_fifos_and_devices_become_failures_never_hangs(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "good.dcm").write_bytes(small_dicom(tmp_path))
    os.mkfifo(root / "pipe.dcm")
    loose = tmp_path / "loose.dcm"
    os.mkfifo(loose)
    found = discover_with_deadline([root, loose, Path("/dev/null")], [root / "pipe.dcm", loose])
    assert [r.path.name for r in records(found)] == ["good.dcm"]
    reasons = {f.path.name: f.reason for f in found if isinstance(f, DiscoverFailure)}
    assert set(reasons) == {"pipe.dcm", "loose.dcm", "null"}
    assert "FIFO" in reasons["pipe.dcm"] and "FIFO" in reasons["loose.dcm"]
    assert "character device" in reasons["null"] and "not a regular file" in reasons["null"]


def test_cli_scan_and_preview_refuse_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from echosearch.catalog import Catalog
    from echosearch.cli import main

    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    assert main(["scan", str(fifo), "--index", str(tmp_path / "idx"), "--workers", "0", "--json"]) == 10
    with Catalog.open(tmp_path / "idx", read_only=True) as cat:
        ((reason,),) = cat.con.sql("SELECT reason FROM ingest_errors").fetchall()
    assert "FIFO" in reason
    assert main(["preview", str(fifo), "--out", str(tmp_path / "p.png")]) == 7
    assert "FIFO" in capsys.readouterr().err


def test_manifest_rows_outside_its_folder_are_refused(tmp_path: Path) -> None:
    base = tmp_path / "echonet"
    (base / "Videos").mkdir(parents=True)
    write_avi(base / "Videos" / "0X1A.avi", 3)
    write_avi(tmp_path / "outside.avi", 3)  # exists, but is not the manifest's to list
    (base / "Videos" / "link.avi").symlink_to(tmp_path / "outside.avi")
    manifest = base / "FileList.csv"
    manifest.write_text("FileName,EF\n0X1A,60\n../outside.avi,50\n../../outside,40\n/etc/passwd,30\nlink.avi,20\n")
    found = list(discover([manifest]))
    assert [r.path.name for r in records(found)] == ["0X1A.avi"]
    failures = [f for f in found if isinstance(f, DiscoverFailure)]
    assert len(failures) == 4 and all("outside the source folder" in f.reason for f in failures)
