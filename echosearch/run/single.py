"""One file through the read and encode stages, for queries (search by an uploaded clip, patient matching):
the clip is prepared and encoded exactly as the index's clips were, and is not catalogued.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from echosearch.catalog import Catalog
from echosearch.errors import ConfigError, IngestError
from echosearch.ingest.discover import Sidecars
from echosearch.run.encode import EncodeStage
from echosearch.run.read import ReadContext, find_inputs, read_file
from echosearch.run.records import ClipRecord, EncodedClip

if TYPE_CHECKING:
    from echosearch.identity.model import IdentityEncoder
    from echosearch.model.encode import Encoder


def read_clip(path: Path, encoder: Encoder) -> ClipRecord:
    """The read stage on one file with the encoder's frame policy; raises IngestError when it is no clip."""
    (item,) = list(find_inputs([Path(path)], frozenset()))
    got = read_file(item, ReadContext(encoder.policy, Sidecars(), secret=None))
    if not isinstance(got, ClipRecord):
        raise IngestError(got.reason, got.stage)
    return got


def encode_clip(path: Path, encoder: Encoder, identity: IdentityEncoder | None = None) -> EncodedClip:
    """Read and encode one file: its video vector and frame vectors (and identity vector with ``identity``)."""
    stage = EncodeStage(encoder, identity=identity, keep_frames=True)
    (encoded,) = stage.encode([read_clip(path, encoder)])
    return encoded


def embed_file(path: Path, encoder: Encoder) -> tuple[np.ndarray, np.ndarray]:
    """One file -> (video vector, frame vectors), as the index's videos were encoded (query by upload)."""
    encoded = encode_clip(path, encoder)
    assert encoded.frame_vectors is not None
    return encoded.vector, encoded.frame_vectors


def match_vector(catalog: Catalog, path: Path, encoder: Encoder) -> np.ndarray:
    """A file's vector for patient matching: its identity vector when the index has identity vectors (the
    identity encoder the index recorded), else its content video vector."""
    if not catalog.has_identity():
        return encode_clip(path, encoder).vector
    from echosearch.identity.model import load_identity_encoder

    stored = catalog.get_manifest("identity_model")
    ident = load_identity_encoder(str(stored["source"]), encoder)
    if ident.weights != stored.get("weights_sha256"):
        raise ConfigError(f"the identity model {stored.get('name')} at {stored.get('source')} has changed since "
                          "this index was built: its vectors would not match the index's")
    encoded = encode_clip(path, encoder, ident)
    assert encoded.identity is not None
    return encoded.identity
