"""Keyed pseudonyms and DICOM UIDs derived with HMAC-SHA256 (stdlib ``hmac``).

The pseudonymisation key is its own key domain: it never encrypts data and data keys never
pseudonymise.  Every input is framed (label, tenant, kind, value as length-prefixed UTF-8) so
different tenants, kinds, or field boundaries can never produce the same HMAC input.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct

_PSEUDONYM_LABEL = b"enclave.pseudonym.v1\x00"
_UID_LABEL = b"enclave.uid.v1\x00"
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
_PSEUDONYM_BYTES = 20
UID_ROOT = "2.25"
"""PS3.5 B.2: UIDs derived from a 128-bit UUID-like integer live under 2.25."""
MIN_KEY_BYTES = 32


def _frame(*parts: str) -> bytes:
    encoded = [p.encode() for p in parts]
    return b"".join(struct.pack(">I", len(p)) + p for p in encoded)


class Pseudonymizer:
    """Deterministic, tenant-scoped pseudonyms: same (tenant, kind, value) -> same output, key-dependent."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"pseudonymisation key must be at least {MIN_KEY_BYTES} bytes; got {len(key)}")
        self._key = bytes(key)

    def pseudonym(self, tenant: str, kind: str, value: str) -> str:
        """32-character lowercase base32 pseudonym (160 bits of HMAC-SHA256) of ``value``.

        ``kind`` names what ``value`` is (``"patient"``, ``"study_uid"``, ...): lowercase letters,
        digits and ``_``, starting with a letter, at most 32 characters.
        """
        if not tenant:
            raise ValueError("tenant must be non-empty")
        if not _KIND.fullmatch(kind):
            raise ValueError("kind must match [a-z][a-z0-9_]{0,31} (e.g. 'patient', 'study_uid')")
        digest = hmac.new(self._key, _PSEUDONYM_LABEL + _frame(tenant, kind, value), hashlib.sha256).digest()
        return base64.b32encode(digest[:_PSEUDONYM_BYTES]).decode("ascii").lower()

    def uid(self, tenant: str, value: str) -> str:
        """A DICOM UID ``2.25.<integer>`` from 128 bits of HMAC-SHA256 of (tenant, value).

        At most 44 characters; the integer component is written without leading zeros, as
        PS3.5 section 9.1 requires.
        """
        if not tenant:
            raise ValueError("tenant must be non-empty")
        digest = hmac.new(self._key, _UID_LABEL + _frame(tenant, value), hashlib.sha256).digest()
        return f"{UID_ROOT}.{int.from_bytes(digest[:16], 'big')}"

    def __repr__(self) -> str:
        return "Pseudonymizer(key=<redacted>)"
