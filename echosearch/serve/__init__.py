"""``echosearch server``: the one process that owns an index's catalog, with an HTTP API under ``/v1``.

Modules: :mod:`~echosearch.serve.state` (the connection, encoder, jobs and live vector indexes of one
process), :mod:`~echosearch.serve.app` (FastAPI routes), :mod:`~echosearch.serve.ops` (what the routes
compute), :mod:`~echosearch.serve.live` (vector indexes that follow a catalog under ingest),
:mod:`~echosearch.serve.jobs` (ingest jobs), :mod:`~echosearch.serve.auth` (credentials),
:mod:`~echosearch.serve.run` (uvicorn, address file) and :mod:`~echosearch.serve.client` (what the CLI uses).
See docs/server.md.
"""
