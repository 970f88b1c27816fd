"""The indexing entry points, kept under their historical names: the code lives in :mod:`echosearch.run`.

``index_sources`` is the local runner (:mod:`echosearch.run.local`); ``embed_file`` and ``match_vector`` run
one file through the read and encode stages (:mod:`echosearch.run.single`); study pooling and report vectors
are in :mod:`echosearch.run.finish`.
"""

from echosearch.run.finish import embed_reports, pool_identity, pool_studies
from echosearch.run.local import IndexSummary, index_sources
from echosearch.run.setup import identity_encoder
from echosearch.run.single import embed_file, match_vector
from echosearch.run.write import store_predictions

__all__ = ["IndexSummary", "embed_file", "embed_reports", "identity_encoder", "index_sources", "match_vector",
           "pool_identity", "pool_studies", "store_predictions"]
