"""Named queries that the indexing runners and merge read and write (pending work, shards, study pooling, comparisons)."""

from __future__ import annotations

from echosearch.store.base import QueryBase


class RunQueries(QueryBase):
    """Mixed into :class:`echosearch.catalog.Catalog`."""
