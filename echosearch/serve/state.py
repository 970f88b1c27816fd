"""What one server process holds: the catalog's one connection, the encoder, live vector indexes, jobs, auth."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from echosearch.catalog import Catalog
from echosearch.config import Settings
from echosearch.serve.auth import Authenticator
from echosearch.serve.jobs import JobRunner
from echosearch.serve.live import LiveIndexes


def index_id(index_dir: Path | str) -> str:
    """A short stable name of an index folder (hash of its resolved path): the health check tells clients
    which index a server holds without showing the path."""
    return hashlib.sha256(os.fsencode(Path(index_dir).resolve())).hexdigest()[:16]


class ServerState:
    """The server's resources. The catalog is opened read-write once; every request and job works on a cursor
    of it (reads never wait; write transactions take turns, see :meth:`Catalog.share_writes`)."""

    def __init__(self, index_dir: Path | str, settings: Settings, *, resume: bool = True) -> None:
        self.index_dir = Path(index_dir).resolve()
        self.settings = settings
        self.root = Catalog.open(self.index_dir, create=True).share_writes()
        self._encoder: Any = None
        self._enc_lock = threading.Lock()
        self.live = LiveIndexes(self.root, self.encoder)
        self.jobs = JobRunner(self.root, settings, self.encoder_if_bound, self.live.invalidate)
        self.auth = Authenticator(self.root)
        self.id = index_id(self.index_dir)
        if resume:
            with self.reader() as cat:
                pending = cat.has_table("videos") and cat.unencoded_videos().height > 0
            if pending:  # an ingest killed with the previous server: encode what it recorded
                self.jobs.submit([])

    def encoder(self) -> Any:
        """The index's encoder (loaded once, shared by searches and jobs)."""
        with self._enc_lock:
            if self._encoder is None:
                from echosearch.model.encode import encoder_for_index

                with self.reader() as cat:
                    self._encoder = encoder_for_index(cat, device=self.settings.device)
            return self._encoder

    def encoder_if_bound(self) -> Any:
        """The encoder when the index has a model; None for a new index (the job loads the configured one)."""
        with self.reader() as cat:
            bound = cat.get_manifest("model") is not None
        return self.encoder() if bound else None

    @contextmanager
    def reader(self) -> Iterator[Catalog]:
        """A catalog on a fresh read cursor (for the calling thread)."""
        with self.root.cursor_block(read_only=True) as cur:
            yield cur

    @contextmanager
    def writer(self) -> Iterator[Catalog]:
        """A writable catalog on a fresh cursor (its transactions take the server's write lock)."""
        with self.root.cursor_block() as cur:
            yield cur

    def log(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """Append to the access log without waiting for a job's write transaction: ``access_log`` has no key
        and is only ever appended to, so this insert cannot conflict with another writer."""
        cur = Catalog(self.index_dir, self.root.con.cursor(), read_only=False)
        try:
            cur.log_access(actor, action, detail)
        finally:
            cur.close()

    def start_receiver(self, *, host: str, port: int, ae_title: str | None = None) -> Any:
        """Start the DICOM receiver (C-STORE SCP, :mod:`echosearch.intake`) in this process: each batch of
        received instances becomes an ingest job of this server. Returns the receiver's handle."""
        from echosearch.errors import IngestError
        from echosearch.intake import start_receiver

        def index_fn(paths: list[Path]) -> dict[str, Any] | None:
            job = self.jobs.wait(self.jobs.submit([str(p) for p in paths]).job_id)
            if job.state != "done":
                raise IngestError(f"ingest job {job.job_id} of received instances failed: {job.error}")
            return job.summary

        opts: dict[str, Any] = {"ae_title": ae_title} if ae_title else {}
        self.receiver = start_receiver(self.index_dir, self.settings, host=host, port=port, index_fn=index_fn,
                                       **opts)
        return self.receiver

    def close(self) -> None:
        receiver = getattr(self, "receiver", None)
        if receiver is not None:
            receiver.stop()
        self.jobs.stop()
        self.root.close()
