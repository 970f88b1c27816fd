"""Studies from PACS: a DICOM receiver (C-STORE SCP) and DICOMweb pull, both feeding the ordinary indexing path.

See ``docs/intake.md``. The receiver is a library a server starts in-process (:func:`start_receiver`) as well
as the ``echosearch receive`` command; ``echosearch pull`` is :func:`pull`.
"""

from __future__ import annotations

from echosearch.intake.indexer import BackgroundIndexer, CatalogIndexer
from echosearch.intake.receiver import ReceiverHandle, start_receiver
from echosearch.intake.store import ULTRASOUND_CLASSES, IntakeBusy, IntakeError, IntakeStore, Stored

__all__ = ["ULTRASOUND_CLASSES", "BackgroundIndexer", "CatalogIndexer", "IntakeBusy", "IntakeError", "IntakeStore",
           "ReceiverHandle", "Stored", "start_receiver"]
