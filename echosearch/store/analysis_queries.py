"""Named queries that identity, change, scope, training and evaluation read."""

from __future__ import annotations

from echosearch.store.base import QueryBase


class AnalysisQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""
