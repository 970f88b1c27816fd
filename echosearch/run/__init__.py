"""Indexing as a chain of stages composed by a runner, on one machine or many (docs/scale.md).

The stages know nothing of each other; a runner passes each one's records (:mod:`.records`) to the next:

* :mod:`echosearch.run.setup`: settings -> encoder, identity encoder, zero-shot prompts, bound to the catalog
  (the one setup both runners use).
* :mod:`echosearch.run.read`: **read** = discover + decode + prepare + scope: file -> prepared clip record.
* :mod:`echosearch.run.encode`: **encode**: batches of clips -> vectors, zero-shot values, identity vectors.
* :mod:`echosearch.run.write`: **write** into a catalog (a transaction per batch), and
  :mod:`echosearch.run.shards`: **write** into a Parquet shard per unit of work.
* :mod:`echosearch.run.finish`: from the catalog: scope evidence, study pooling, report vectors, vector indexes.

Runners:

* :mod:`echosearch.run.local`: the local runner (``index``, ``scan``), reading in worker processes
  (:mod:`echosearch.run.workers`), committing per batch, resumable.
* :mod:`echosearch.run.ray_runner`: the Ray Data runner (``index --executor ray``) over units of work
  (:mod:`echosearch.run.units`), then :mod:`echosearch.run.merge` (shards -> catalog, idempotent).

:mod:`echosearch.run.single` runs one file through read and encode for queries; :mod:`echosearch.run.compare`
compares two runners' catalogs.
"""
