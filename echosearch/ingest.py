"""The read stage and ``scan``, kept under their historical names: the code lives in :mod:`echosearch.run`.

Reading a file (discover, decode, prepare, scope, its catalog row) is :mod:`echosearch.run.read`; worker
processes are :mod:`echosearch.run.workers`; ``scan`` (rows without vectors) is the local runner without its
encode stage (:mod:`echosearch.run.local`), imported on first use so that reading needs no catalog libraries.
"""

from typing import Any

from echosearch.run.read import (
    REPORT_STAGE,
    FailedFile,
    PreparedVideo,
    ReportObject,
    default_policy,
    process_file,
    read_report_object,
    safe_process,
    stored_location,
    video_record,
)
from echosearch.run.workers import _die_with_parent, iter_processed

__all__ = ["REPORT_STAGE", "FailedFile", "PreparedVideo", "ReportObject", "_die_with_parent", "default_policy",
           "iter_processed", "process_file", "read_report_object", "safe_process", "stored_location", "summary_dict",
           "video_record"]  # and, imported on first use: scan, ScanSummary, attach_sidecars


def __getattr__(name: str) -> Any:
    if name in ("scan", "ScanSummary"):
        from echosearch.run import local

        return getattr(local, name)
    if name == "attach_sidecars":
        from echosearch.run.write import attach_sidecars

        return attach_sidecars
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def summary_dict(summary: Any) -> dict[str, Any]:
    """JSON-able form of a scan summary (``scan --json``)."""
    from dataclasses import asdict

    return dict(asdict(summary))
