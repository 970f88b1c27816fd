"""Discover stage: folders, single files and manifest CSVs -> file records (path, size, sha256, kind).

The content hash is a file's identity (a re-run skips hashes already in the catalog, and a file seen twice
in one run is processed once; empty files, which all share one hash, are each reported). The kind comes from the content, never the extension: DICOM by its
``DICM`` magic (or a plausible headerless data set), AVI by its RIFF header, MP4/MOV by its ``ftyp`` box.
Sidecar files (csv/parquet/txt/json/md), hidden files and DICOMDIR are skipped silently; symlinks are
followed only when their target lies inside the source tree (a link loop or a link to nothing is reported
as a failure, and so is an unreadable file, a FIFO or a device). :func:`load_sidecars` reads the sidecar
tables that come with the sources (ground truth, reports, labels).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import stat
import struct
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from echosearch.errors import IngestError

FileKind = Literal["dicom", "avi", "mp4", "unknown"]
SIDECAR_SUFFIXES = frozenset({".csv", ".parquet", ".txt", ".json", ".md", ".tsv", ".xlsx", ".log", ".yaml",
                              ".yml", ".toml", ".png", ".html", ".pdf"})
SKIP_NAMES = frozenset({"DICOMDIR", "Thumbs.db", "desktop.ini"})
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    """One candidate input file. ``kind`` "unknown" means the content matched no supported format."""

    path: Path
    size: int
    sha256: str
    kind: FileKind


@dataclass(frozen=True)
class DiscoverFailure:
    """A path that could not be read or listed (stage "discover"); the batch goes on."""

    path: Path
    reason: str
    sha256: str | None = None
    stage: str = "discover"


def sniff_kind(head: bytes) -> FileKind:
    """File kind from its first bytes (>= 132 needed for the DICOM preamble check)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if len(head) >= 8 and head[4:8] == b"ftyp":
        return "mp4"
    if _headerless_dicom(head):
        return "dicom"
    return "unknown"


def _headerless_dicom(head: bytes) -> bool:
    """A DICOM data set written without preamble: first tag in group 0002/0008, explicit VR or sane length."""
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (length,) = struct.unpack("<I", head[4:8])
    return 0 < length < 1024


class NotRegularFile(IngestError, OSError):
    """A path that is not a regular file (FIFO, device, socket, folder): never read, it could block for ever.
    An OSError for callers that handle unreadable files, an IngestError (one line) for the CLI."""

    def __init__(self, reason: str) -> None:
        IngestError.__init__(self, reason, "discover")


def _special(entry: os.DirEntry[str]) -> bool:
    """A FIFO, device or socket met in a walk: listed, so that it becomes a failure with a reason."""
    try:
        mode = entry.stat().st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


def _kind_of_mode(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_regular(path: Path | str) -> IO[bytes]:
    """Open a regular file for reading; :class:`NotRegularFile` for anything else. Checked before opening
    (a FIFO's open would block) and again on the open descriptor (opened non-blocking), so that a file
    swapped for a FIFO or device between the two is refused rather than waited on."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{_kind_of_mode(mode)}, not a regular file: not read")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{_kind_of_mode(mode)}, not a regular file: not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a regular file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def inspect_file(path: Path) -> FileRecord:
    """Hash and sniff one file (raises OSError when unreadable, :class:`NotRegularFile` for a FIFO/device)."""
    with open_regular(path) as f:
        head = f.read(512)
    digest, size = hash_file(path)
    return FileRecord(path=path, size=size, sha256=digest, kind=sniff_kind(head))


def discover(
    sources: Sequence[Path], known_hashes: Container[str] = frozenset()
) -> Iterator[FileRecord | DiscoverFailure]:
    """Yield a record (or failure) for every candidate file under ``sources``, in a deterministic order."""
    seen: set[str] = set()
    for source in sources:
        source = Path(source)
        for item in _candidates(source):
            if isinstance(item, DiscoverFailure):
                yield item
                continue
            try:
                rec = inspect_file(item)
            except FileNotFoundError:
                yield DiscoverFailure(item, "file vanished before it could be read")
                continue
            except NotRegularFile as exc:
                yield DiscoverFailure(item, str(exc))
                continue
            except OSError as exc:
                yield DiscoverFailure(item, f"unreadable file: {exc.strerror or exc}")
                continue
            if rec.size and (rec.sha256 in seen or rec.sha256 in known_hashes):  # an empty file is no copy:
                continue  # each one is reported (as a failure), not folded into the first
            seen.add(rec.sha256)
            yield rec


def count_candidates(sources: Sequence[Path]) -> int:
    """Number of candidate files under ``sources`` (a cheap walk, no hashing): the total of a progress bar."""
    return sum(1 for s in sources for c in _candidates(Path(s)))


def is_manifest(path: Path) -> bool:
    """True for an EchoNet-style CSV manifest (a ``FileName`` column)."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "FileName" in header


def _candidates(source: Path) -> Iterator[Path | DiscoverFailure]:
    if not source.exists():
        yield DiscoverFailure(source, "source does not exist (check the path)")
    elif source.is_dir():
        yield from _walk(source)
    elif is_manifest(source):
        yield from _manifest_paths(source)
    else:
        yield source


def _walk(root: Path) -> Iterator[Path | DiscoverFailure]:
    """Sorted recursive walk; symlinks (dirs and files) followed only when they resolve inside ``root``."""
    real_root = root.resolve()
    visited: set[Path] = set()

    def inside(p: Path) -> bool:
        try:
            return p.resolve().is_relative_to(real_root)
        except (OSError, RuntimeError):
            return False

    def walk(folder: Path) -> Iterator[Path | DiscoverFailure]:
        real = folder.resolve()
        if real in visited:
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield DiscoverFailure(folder, f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") or entry.name in SKIP_NAMES:
                continue
            if entry.is_symlink() and (broken := _broken_link(path)):
                yield DiscoverFailure(path, broken)
                continue
            if entry.is_symlink() and not inside(path):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                yield from walk(path)
            elif path.suffix.lower() not in SIDECAR_SUFFIXES and (entry.is_file() or _special(entry)):
                yield path

    yield from walk(root)


def _broken_link(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (a loop, a missing target), or None when it can."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself): not read"
        if exc.errno == errno.ENOENT:
            return "broken symbolic link (its target does not exist): not read"
        return f"symbolic link that cannot be followed: {exc.strerror or exc}"
    return None


def _manifest_paths(manifest: Path) -> Iterator[Path | DiscoverFailure]:
    """EchoNet-Dynamic FileList.csv: ``FileName`` (extension optional) -> ``Videos/<FileName>.avi``.

    A row that resolves outside the manifest's folder (``../x``, an absolute path, a symlink out) is refused
    as a failure and never opened."""
    base = manifest.parent
    real_base = base.resolve()

    def inside(p: Path) -> bool:
        try:
            return p.resolve().is_relative_to(real_base)
        except (OSError, RuntimeError):
            return False
    with manifest.open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            name = (row.get("FileName") or "").strip()
            if not name:
                continue
            candidates = (
                [base / "Videos" / name, base / name]
                if Path(name).suffix
                else [base / "Videos" / f"{name}.avi", base / f"{name}.avi", base / "Videos" / name]
            )
            if not all(inside(c) for c in candidates):
                yield DiscoverFailure(candidates[0], f"listed in {manifest.name} but outside the source folder "
                                      "(the manifest's own folder): not read")
                continue
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                yield DiscoverFailure(candidates[0], f"listed in {manifest.name} but missing")
            else:
                yield found


# ---- sidecar tables -------------------------------------------------------------------------------------
LABEL_SKIP = frozenset({"filename", "file_name", "path", "sop_uid", "study_uid", "frameheight", "framewidth",
                        "fps", "numberofframes"})


@dataclass
class Sidecars:
    """Ground truth (view; identity of AVI/MP4 files), report text and labels that come with the sources.

    Found at a source folder's root (or beside a manifest): ``ground_truth.parquet`` and ``reports.csv``;
    a manifest CSV given as a source is also a label table (EchoNet EF, ESV, EDV, Split). Report keys are
    ``study_uid``, ``accession`` or ``file``; label keys ``file``, ``sop_uid`` or ``study_uid``.
    """

    truth: dict[str, dict[str, Any]] = field(default_factory=dict)  # absolute posix path -> row
    truth_by_sop: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: list[tuple[str, str, str, str]] = field(default_factory=list)  # key kind, key, text, source
    # label: key kind, key, name, value, source
    labels: list[tuple[str, str, str, float | str, str]] = field(default_factory=list)

    def add_truth(self, root: Path, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row.get("path"):
                self.truth[(root / str(row["path"])).absolute().as_posix()] = row
                if row.get("ef") is not None:
                    self.labels.append(("file", Path(str(row["path"])).name, "EF", float(row["ef"]),
                                        "ground_truth.parquet"))
            if row.get("sop_uid"):
                self.truth_by_sop[str(row["sop_uid"])] = row

    def add_reports(self, rows: list[dict[str, Any]], source: str) -> None:
        keys = (("study_uid", ("study_uid", "studyinstanceuid")),
                ("accession", ("accession_number", "accessionnumber", "accession")),
                ("file", ("file_name", "filename", "path")))
        for row in rows:
            text = pick(row, "report", "text", "report_text")
            key = next(((k, str(v)) for k, names in keys if (v := pick(row, *names)) is not None), None)
            if text is not None and key is not None:
                self.reports.append((key[0], key[1], str(text), source))

    def add_labels(self, rows: list[dict[str, Any]], source: str) -> None:
        keys = (("file", ("filename", "file_name", "path")), ("sop_uid", ("sop_uid",)),
                ("study_uid", ("study_uid",)))
        for row in rows:
            key = next(((k, str(v)) for k, names in keys if (v := pick(row, *names)) is not None), None)
            if key is None:
                continue
            for name, value in row.items():
                if _norm(name) in LABEL_SKIP or value is None or not str(value).strip():
                    continue
                value = value if isinstance(value, str) else float(value)
                self.labels.append((key[0], key[1], name, value, source))

    def identity_row(self, path: Path, sop_uid: str | None) -> dict[str, Any] | None:
        """The ground-truth row of a file (by path, else by SOP instance UID)."""
        row = self.truth.get(path.absolute().as_posix())
        return row if row is not None or not sop_uid else self.truth_by_sop.get(sop_uid)


def load_sidecars(
    sources: Sequence[Path], reports: Path | None = None, labels: Path | None = None
) -> Sidecars:
    """Read the sidecar tables of ``sources`` plus explicit ``--reports`` / ``--labels`` files."""
    side = Sidecars()
    for source in map(Path, sources):
        root = source if source.is_dir() else source.parent
        if (root / "ground_truth.parquet").is_file():
            side.add_truth(root, read_table(root / "ground_truth.parquet"))
        if (root / "reports.csv").is_file():
            side.add_reports(read_table(root / "reports.csv"), "reports.csv")
        if source.is_file() and is_manifest(source):
            side.add_labels(read_table(source), source.name)
    if reports is not None:
        side.add_reports(read_table(reports), Path(reports).name)
    if labels is not None:
        side.add_labels(read_table(labels), Path(labels).name)
    return side


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV or Parquet file (a ConfigError-like IngestError when unreadable)."""
    import polars as pl

    from echosearch.errors import IngestError

    try:
        if path.suffix.lower() == ".parquet":
            df = pl.read_parquet(path)
        else:
            df = pl.read_csv(path, infer_schema_length=10000)
    except Exception as exc:
        raise IngestError(f"cannot read {path}: {exc}", stage="discover") from exc
    return df.to_dicts()


def pick(row: dict[str, Any], *names: str) -> Any:
    """First non-blank value among column ``names`` (matched case-insensitively, spaces as underscores)."""
    lowered = {_norm(k): v for k, v in row.items()}
    for n in names:
        v = lowered.get(n)
        if v is not None and str(v).strip():
            return v
    return None


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_")
