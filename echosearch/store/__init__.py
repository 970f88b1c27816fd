"""The catalog layer's named queries, grouped by the part of echosearch that reads them.

:class:`echosearch.catalog.Catalog` combines these groups with its core (opening, schema, migrations,
writes of the indexing path): every SQL statement of the library lives in the catalog layer, and the
app, the server, the CLI and the runners call these methods instead of writing SQL of their own.
"""
