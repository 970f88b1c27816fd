"""Keyed hashing of patient and accession identifiers before they reach the catalog, and sealing of the
file locations that carry them (PACS exports name folders by patient and accession).

A file's location is stored twice: a *label* (``F-`` + a keyed hash of the path + the file's suffix), which is
what search output, filters and the app show, and the location itself *sealed* with AES-GCM under a key
derived from the same secret, which only a process holding the secret can open (to re-read the file for
re-encoding, training or a preview).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re

from echosearch.errors import ConfigError

LABEL_PREFIX = "F-"
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")


class Pseudonymizer:
    """HMAC-SHA256 pseudonyms: stable for one secret, unlinkable without it.

    The pseudonym is a 16-hex-digit prefix with a kind prefix (``P-``, ``A-``) so that it is readable
    in tables; 64 bits make collisions negligible for any archive.
    """

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("secret must not be empty")
        self._secret = secret

    def _hash(self, kind: str, raw: str) -> str:
        digest = hmac.new(self._secret, f"{kind}:{raw.strip()}".encode(), hashlib.sha256).hexdigest()
        return digest[:16]

    def patient(self, raw_id: str | None) -> str | None:
        """Pseudonym of a patient ID (``None`` or blank stays ``None``)."""
        if raw_id is None or not str(raw_id).strip():
            return None
        return "P-" + self._hash("patient", str(raw_id))

    def accession(self, raw: str | None) -> str | None:
        """Pseudonym of an accession number."""
        if raw is None or not str(raw).strip():
            return None
        return "A-" + self._hash("accession", str(raw))

    def fingerprint(self) -> str:
        """A short public fingerprint of the secret, stored in the manifest to detect a changed key."""
        return hashlib.sha256(b"echosearch-fp:" + self._secret).hexdigest()[:12]

    def file_label(self, path: str | os.PathLike[str]) -> str:
        """The stored, displayable stand-in of a file's absolute path: stable for one secret; keeps the suffix."""
        raw = os.fsencode(os.path.abspath(path))
        digest = hmac.new(self._secret, b"file:" + raw, hashlib.sha256).hexdigest()[:16]
        m = _SUFFIX.search(os.fsdecode(raw).rsplit("/", 1)[-1])
        return LABEL_PREFIX + digest + (m.group(0).lower() if m else "")

    @functools.cached_property
    def _aead(self) -> object:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"echosearch", info=b"file-locations v1").derive(
            self._secret)
        return AESGCM(key)

    def seal(self, path: str | os.PathLike[str]) -> bytes:
        """The absolute path's bytes, encrypted and authenticated (12-byte nonce + ciphertext + tag)."""
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, os.fsencode(os.path.abspath(path)), b"echosearch-location")  # type: ignore[attr-defined]

    def unseal(self, blob: bytes) -> str:
        """The path a :meth:`seal` made; refuses (one line) when the secret is not the one that sealed it."""
        from cryptography.exceptions import InvalidTag

        try:
            raw = self._aead.decrypt(bytes(blob[:12]), bytes(blob[12:]), b"echosearch-location")  # type: ignore[attr-defined]
        except (InvalidTag, ValueError) as exc:
            raise ConfigError("a stored file location cannot be opened with this secret: set the "
                              "ECHOSEARCH_SECRET the index was built with") from exc
        return os.fsdecode(raw)
