"""Keyed hashing of patient and accession identifiers before they reach the catalog."""

from __future__ import annotations

import hashlib
import hmac


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
