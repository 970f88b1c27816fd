"""The intake store: where instances from PACS land before they are indexed, and the journal that says so.

An instance is *stored* when its bytes are on disk under ``<index>/received/<study UID>/<SOP UID>.dcm``
(written to a temporary file, fsynced, renamed, the folder fsynced) **and** a ``stored`` line for it is in
``<index>/received/journal.jsonl`` (appended and fsynced). Only then does the receiver acknowledge it.
An ``indexed`` line follows once the indexing path has turned it into a video or an ingest error. After a
crash, every stored instance without an ``indexed`` line is indexed again; the catalog deduplicates by
content hash, so an instance indexed just before the crash is not indexed twice.

The journal is shared by the receiver and ``echosearch pull`` (an advisory ``flock`` around each append and
read), so one SOP instance UID is stored once whichever way it arrives. Files stay where they are: the
catalog's (sealed) locations point at them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from echosearch.errors import EchosearchError

log = logging.getLogger(__name__)

RECEIVED_DIR = "received"
JOURNAL_FILE = "journal.jsonl"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP_PREFIX = ".incoming-"

# Ultrasound storage classes (current and retired) and Verification: what the receiver accepts.
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
ULTRASOUND_CLASSES = (US_IMAGE, US_MULTIFRAME, US_IMAGE_RETIRED, US_MULTIFRAME_RETIRED)
VERIFICATION = "1.2.840.10008.1.1"


class IntakeError(EchosearchError):
    """Intake could not proceed (a bad PACS answer, an unusable store, a receiver that cannot listen)."""

    exit_code = 11


class IntakeBusy(IntakeError):
    """Another intake process holds the lock of this index (a second ``pull`` started by cron)."""

    exit_code = 12


@dataclass(frozen=True)
class Stored:
    """One journaled instance: its UIDs, its file (relative to the received folder) and content hash."""

    sop_uid: str
    study_uid: str
    file: str
    sha256: str
    via: str


def safe_uid(uid: str | None, what: str) -> str:
    """A DICOM UID fit for a file name; anything else is refused (a UID is digits and dots, <= 64 chars)."""
    value = (uid or "").strip().rstrip("\x00").strip()
    if not value or len(value) > 64 or not _UID.match(value):
        raise IntakeError(f"the instance has no valid {what} (a UID of digits and dots)")
    return value


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the folder's own metadata)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: temp file, fsync, rename, fsync the folder."""
    folder = path.parent
    new_folder = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if new_folder:
        fsync_dir(folder.parent)
    tmp = folder / f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(folder)


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[int]:
    """An advisory ``flock`` on ``path`` (created when missing); :class:`IntakeBusy` when ``blocking`` is off
    and another process holds it. Released when the block ends or the process dies (kill -9 included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            raise IntakeBusy(f"another intake process holds {path.name} in this index; try again later") from exc
        yield fd
    finally:
        os.close(fd)


class IntakeStore:
    """The received folder and journal of one index; safe for threads of one process and for processes."""

    def __init__(self, index_dir: Path | str) -> None:
        self.index_dir = Path(index_dir)
        self.root = self.index_dir / RECEIVED_DIR
        self.journal = self.root / JOURNAL_FILE
        self._lock = threading.RLock()
        self._stored: dict[str, Stored] = {}
        self._indexed: set[str] = set()
        self._offset = 0
        self._tail = b""
        new = not self.root.is_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        if new:
            fsync_dir(self.root.parent)
        self._clean_temp_files()
        self.refresh()

    # ---- journal ---------------------------------------------------------------------------------
    def _clean_temp_files(self) -> None:
        """Partial files of an instance that was never acknowledged (the writer died before the rename)."""
        for tmp in self.root.glob(f"*/{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def refresh(self) -> None:
        """Read journal lines appended since the last read (by this or another process)."""
        with self._lock:
            if not self.journal.exists():
                return
            with self.journal.open("rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                try:
                    f.seek(self._offset)
                    chunk = f.read()
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            self._offset += len(chunk)
            data = self._tail + chunk
            lines = data.split(b"\n")
            self._tail = lines.pop()  # an incomplete last line (a writer that died mid-line) is kept aside
            for line in lines:
                self._apply(line)

    def _apply(self, line: bytes) -> None:
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return  # a torn line: its instance was never acknowledged
        if rec.get("op") == "stored":
            s = Stored(rec["sop"], rec["study"], rec["file"], rec["sha256"], rec.get("via", ""))
            self._stored.setdefault(s.sop_uid, s)
        elif rec.get("op") == "indexed":
            self._indexed.update(rec.get("sops", []))

    def _append(self, records: list[dict[str, Any]]) -> None:
        payload = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)
        new = not self.journal.exists()
        fd = os.open(self.journal, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size and self._needs_newline(fd):
                payload = b"\n" + payload  # end a torn line left by a writer that died, so ours parses
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        if new:
            fsync_dir(self.root)

    @staticmethod
    def _needs_newline(fd: int) -> bool:
        size = os.fstat(fd).st_size
        return os.pread(fd, 1, size - 1) != b"\n"

    # ---- instances -------------------------------------------------------------------------------
    def path_of(self, entry: Stored) -> Path:
        return self.root / entry.file

    def has(self, sop_uid: str) -> bool:
        with self._lock:
            if sop_uid not in self._stored:
                self.refresh()
            return sop_uid in self._stored

    def put(self, data: bytes, study_uid: str | None, sop_uid: str | None,
            via: str) -> tuple[Literal["stored", "duplicate"], Stored]:
        """Store one encoded instance (a DICOM file's bytes) durably and journal it; a SOP instance UID
        already in the journal is a duplicate: acknowledged, not written or indexed again."""
        sop, study = safe_uid(sop_uid, "SOP Instance UID"), safe_uid(study_uid, "Study Instance UID")
        with self._lock:
            if self.has(sop):
                return "duplicate", self._stored[sop]
            entry = Stored(sop, study, f"{study}/{sop}.dcm", hashlib.sha256(data).hexdigest(), via)
            write_durable(self.path_of(entry), data)
            self._append([{"op": "stored", "sop": sop, "study": study, "file": entry.file, "sha256": entry.sha256,
                           "via": via, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}])
            self._stored[sop] = entry
            return "stored", entry

    def mark_indexed(self, entries: list[Stored]) -> None:
        """Journal that ``entries`` went through the indexing path (each is now a video or an ingest error)."""
        if not entries:
            return
        with self._lock:
            sops = [e.sop_uid for e in entries]
            self._append([{"op": "indexed", "sops": sops,
                           "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}])
            self._indexed.update(sops)

    def pending(self) -> list[Stored]:
        """Stored instances not yet indexed, in journal order."""
        with self._lock:
            self.refresh()
            return [s for sop, s in self._stored.items() if sop not in self._indexed]

    def counts(self) -> dict[str, int]:
        with self._lock:
            self.refresh()
            return {"stored": len(self._stored), "indexed": len(self._indexed & self._stored.keys())}

    def entries(self) -> list[Stored]:
        with self._lock:
            self.refresh()
            return list(self._stored.values())
