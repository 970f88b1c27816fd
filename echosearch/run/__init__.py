"""Indexing as a chain of stages (read -> encode -> write) composed by runners, for one machine or many.

* :mod:`echosearch.run.stages`: the read and encode stages and the records they pass along.
* :mod:`echosearch.run.shards`: the write stage (one Parquet shard per unit of work) and the shard format.
* :mod:`echosearch.run.units`: units of work (fixed groups of input files, named by their content).
* :mod:`echosearch.run.ray_runner`: the Ray Data runner (``index --executor ray``).
* :mod:`echosearch.run.merge`: ``merge``: shards -> catalog (idempotent) -> vector indexes built in chunks.

The default local runner is :func:`echosearch.pipeline.index_sources`. docs/scale.md tells how to run on a
cluster.
"""
