"""The DICOM receiver: a C-STORE SCP (pynetdicom) that stores ultrasound instances, then indexes them.

It accepts the ultrasound storage classes (US Image, US Multi-frame and their retired variants) in any
transfer syntax, and Verification (C-ECHO). Other SOP classes are refused when the association is
negotiated (their presentation context is rejected: "abstract syntax not supported"), so a PACS never
gets a success for an instance echosearch would not keep. Success (0x0000) is answered only after the
instance is durably on disk and journaled (:mod:`echosearch.intake.store`); an instance already journaled
is acknowledged and not stored or indexed again. Indexing runs after, in a background thread.

Logs carry counts, the calling AE title and file labels (``F-...``, as in ``ingest_errors``), never UIDs,
patient identifiers or paths.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echosearch.config import Settings
from echosearch.intake.indexer import BackgroundIndexer, CatalogIndexer, IndexFn
from echosearch.intake.store import (
    ULTRASOUND_CLASSES,
    US_IMAGE_RETIRED,
    US_MULTIFRAME_RETIRED,
    VERIFICATION,
    IntakeError,
    IntakeStore,
)

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from echosearch.ingest.pseudonym import Pseudonymizer

log = logging.getLogger(__name__)

DEFAULT_AE_TITLE = "ECHOSEARCH"
DEFAULT_PORT = 11112
# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
RETIRED_KEYWORDS = {US_IMAGE_RETIRED: "UltrasoundImageStorageRetired",
                    US_MULTIFRAME_RETIRED: "UltrasoundMultiFrameImageStorageRetired"}


@dataclass
class ReceiverStats:
    """What the receiver answered since it started."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.time)


def check_ae_title(ae_title: str) -> str:
    """An AE title: 1-16 printable ASCII characters, no backslash, not blank."""
    value = ae_title.strip()
    if not value or len(value) > 16 or not value.isascii() or "\\" in value or not value.isprintable():
        raise IntakeError("the AE title must be 1 to 16 printable ASCII characters without a backslash")
    return value


class Receiver:
    """The C-STORE handler bound to one store (used by :func:`start_receiver`)."""

    def __init__(self, store: IntakeStore, pz: Pseudonymizer, indexer: BackgroundIndexer | None) -> None:
        self.store, self.pz, self.indexer = store, pz, indexer
        self.stats = ReceiverStats()
        self._lock = threading.Lock()

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def on_store(self, event: Any) -> int:
        """Answer one C-STORE: success only once the instance is stored and journaled."""
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in ULTRASOUND_CLASSES:  # negotiation already refuses these; belt and braces
            self._count("refused")
            log.warning("refused an instance of SOP class %s from %s", sop_class, calling)
            return SOP_CLASS_NOT_SUPPORTED
        try:
            data = event.encoded_dataset(include_meta=True)
            study_uid = event.dataset.get("StudyInstanceUID")
        except Exception as exc:  # noqa: BLE001 - a dataset that does not parse is the sender's problem
            self._count("failed")
            log.warning("could not read an instance from %s: %s", calling, type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            outcome, entry = self.store.put(data, str(study_uid or ""), str(event.request.AffectedSOPInstanceUID),
                                            via=f"c-store:{calling}")
        except IntakeError as exc:
            self._count("failed")
            log.warning("refused an instance from %s: %s", calling, exc)
            return CANNOT_UNDERSTAND
        except OSError as exc:  # disk full, permissions: the sender keeps the instance and retries
            self._count("failed")
            log.error("could not store an instance from %s: %s", calling, exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        label = self.pz.file_label(self.store.path_of(entry).absolute())
        if outcome == "duplicate":
            self._count("duplicates")
            log.info("duplicate %s from %s acknowledged (already stored)", label, calling)
            return SUCCESS
        self._count("stored")
        log.info("stored %s from %s", label, calling)
        if self.indexer is not None:
            self.indexer.notify()
        return SUCCESS


@dataclass
class ReceiverHandle:
    """A running receiver: its address, store, indexer and statistics; :meth:`stop` ends it."""

    ae_title: str
    host: str
    port: int
    store: IntakeStore
    receiver: Receiver
    indexer: BackgroundIndexer | None
    server: ThreadedAssociationServer

    @property
    def stats(self) -> ReceiverStats:
        return self.receiver.stats

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every stored instance is indexed (True) or ``timeout`` passes (False)."""
        return self.indexer.wait_idle(timeout) if self.indexer is not None else True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop listening (associations in progress are closed), then the indexer after its current batch."""
        self.server.shutdown()
        if self.indexer is not None:
            self.indexer.stop(timeout)

    def __enter__(self) -> ReceiverHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_ae(ae_title: str) -> Any:
    """A pynetdicom AE that accepts the ultrasound storage classes in every transfer syntax, and C-ECHO."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import register_uid, uid_to_service_class

    for uid, keyword in RETIRED_KEYWORDS.items():  # pynetdicom knows the retired classes but serves none
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, keyword, StorageServiceClass)
    ae = AE(ae_title=check_ae_title(ae_title))
    ae.require_called_aet = True  # associations addressed to another AE title are rejected
    for uid in ULTRASOUND_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION)
    ae.maximum_pdu_size = 0  # no limit: multi-frame clips are large
    return ae


def start_receiver(index_dir: Path | str, settings: Settings, *, ae_title: str = DEFAULT_AE_TITLE,
                   host: str = "127.0.0.1", port: int = DEFAULT_PORT, index_fn: IndexFn | None = None,
                   index: bool = True, warm: bool = True) -> ReceiverHandle:
    """Start the receiver for ``index_dir`` in this process (threads) and return its handle.

    ``index_fn(paths)`` indexes newly stored files (default: :class:`CatalogIndexer`, the ordinary indexing
    path); ``index=False`` only stores and journals (a server indexing by other means). Instances a previous
    run stored but did not index are indexed first. ``port=0`` picks a free port (see ``handle.port``).
    """
    from pynetdicom import evt

    from echosearch.ingest.pseudonym import Pseudonymizer

    pz = Pseudonymizer(settings.require_secret())  # before listening: refuse to accept what cannot be indexed
    store = IntakeStore(index_dir)
    indexer: BackgroundIndexer | None = None
    if index:
        fn = index_fn
        if fn is None:
            cat_indexer = CatalogIndexer(index_dir, settings)
            if warm:
                cat_indexer.warm()  # the model is loaded before the first study arrives
            fn = cat_indexer
        indexer = BackgroundIndexer(store, fn)
    receiver = Receiver(store, pz, indexer)
    ae = make_ae(ae_title)
    try:
        server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, receiver.on_store)])
    except OSError as exc:
        raise IntakeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    if indexer is not None:
        indexer.start()
    bound_host, bound_port = server.server_address[:2]
    pending = len(store.pending())
    log.info("receiver %s listening on %s:%d (%d instance(s) left to index)", ae.ae_title, bound_host, bound_port,
             pending)
    return ReceiverHandle(str(ae.ae_title), str(bound_host), int(bound_port), store, receiver, indexer, server)
