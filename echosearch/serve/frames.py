"""Tables over HTTP: JSON records for people and scripts, Arrow IPC for clients that want them back exactly.

A route that returns a table answers JSON ``{"rows": [...]}`` by default and an Arrow IPC stream when the
request's ``Accept`` header names :data:`ARROW` (what the app's remote index sends), so dates, timestamps,
lists and nulls arrive as the catalog holds them. Tables inside a JSON document travel as base64 Arrow
(:func:`encode_frame`) when the client asked for Arrow.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import polars as pl

ARROW = "application/vnd.apache.arrow.stream"


def frame_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_ipc_stream(buf)
    return buf.getvalue()


def read_frame(data: bytes) -> pl.DataFrame:
    return pl.read_ipc_stream(io.BytesIO(data))


def encode_frame(df: pl.DataFrame, arrow: bool) -> Any:
    """``df`` inside a JSON document: ``{"arrow": base64}`` when ``arrow``, else a list of records."""
    if arrow:
        return {"arrow": base64.b64encode(frame_bytes(df)).decode("ascii")}
    from echosearch.serve.ops import records

    return records(df)


def decode_frame(obj: Any) -> pl.DataFrame:
    """The inverse of :func:`encode_frame` (records give a frame with inferred types)."""
    if isinstance(obj, dict) and "arrow" in obj:
        return read_frame(base64.b64decode(obj["arrow"]))
    return pl.DataFrame(obj or [])


def wants_arrow(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for Arrow IPC."""
    return ARROW in (accept or "")


def frame_response(accept: str | None, df: pl.DataFrame, key: str = "rows") -> Any:
    """A route's table: Arrow IPC bytes when the client asks for them, else ``{key: records}``."""
    if wants_arrow(accept):
        from fastapi.responses import Response

        return Response(frame_bytes(df), media_type=ARROW)
    return {key: encode_frame(df, False)}
