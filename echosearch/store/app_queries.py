"""Named queries that the app and the server read (patients, timelines, audit pages, decisions, status)."""

from __future__ import annotations

from echosearch.store.base import QueryBase


class AppQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""
