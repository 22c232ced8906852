"""The service's ``PseudonymKeys``: the common library's keyed pseudonyms and UIDs, plus a keyed date shift.

The date shift is hand-written (a few lines of stdlib ``hmac``): no library derives a per-patient shift
that is stable across restarts and scoped per tenant. Its input is framed like ``Pseudonymizer``'s, under
its own label, so it can never equal a pseudonym or UID derivation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

from enclave_common.crypto import Pseudonymizer
from enclave_common.pseudonyms import pseudonymizer_from_base64

_DATE_SHIFT_LABEL = b"enclave.deid.date-shift.v1\x00"
#: Shifts are whole days in [-MAX_SHIFT_DAYS, -1]: always into the past, never zero, about ten years at most.
MAX_SHIFT_DAYS = 3650


class DeidPseudonymKeys:
    """Pseudonyms, UIDs and date shifts of the de-identified output, all under the deid pseudonym key."""

    __slots__ = ("_key", "_pseudonymizer")

    def __init__(self, key: bytes) -> None:
        self._pseudonymizer = Pseudonymizer(key)
        self._key = bytes(key)

    @classmethod
    def from_base64(cls, value: str | None, setting: str) -> DeidPseudonymKeys:
        """Build from a base64 setting; errors name the setting, never the value."""
        pseudonymizer_from_base64(value, setting)  # validates presence, base64 and length
        assert value is not None
        return cls(base64.b64decode(value, validate=True))

    def pseudonym(self, tenant: str, kind: str, value: str) -> str:
        return self._pseudonymizer.pseudonym(tenant, kind, value)

    def uid(self, tenant: str, value: str) -> str:
        return self._pseudonymizer.uid(tenant, value)

    def date_shift_days(self, tenant: str, patient_pseudonym: str) -> int:
        framed = b"".join(
            struct.pack(">I", len(p)) + p for p in (tenant.encode(), patient_pseudonym.encode())
        )
        digest = hmac.new(self._key, _DATE_SHIFT_LABEL + framed, hashlib.sha256).digest()
        return -(1 + int.from_bytes(digest[:8], "big") % MAX_SHIFT_DAYS)

    def __repr__(self) -> str:
        return "DeidPseudonymKeys(key=<redacted>)"
