"""An HMAC-SHA256 PseudonymKeys for tests, and the policy with every implemented option."""

from __future__ import annotations

import hashlib
import hmac

from enclave_deid.policy import DeidPolicy


class HmacKeys:
    """A PseudonymKeys made of HMAC-SHA256 under one secret, scoped by tenant (what production derives)."""

    def __init__(self, secret: bytes = b"test-pseudonymisation-key") -> None:
        self._secret = secret

    def _digest(self, *parts: str) -> bytes:
        message = "\x1f".join(parts).encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def pseudonym(self, tenant: str, kind: str, value: str) -> str:
        return "PSN-" + self._digest(tenant, kind, value).hex()[:24].upper()

    def uid(self, tenant: str, value: str) -> str:
        return "2.25." + str(int.from_bytes(self._digest(tenant, "uid", value)[:16], "big"))

    def date_shift_days(self, tenant: str, patient_pseudonym: str) -> int:
        return -(1 + int.from_bytes(self._digest(tenant, "date-shift", patient_pseudonym)[:4], "big") % 3650)


ALL_OPTIONS = DeidPolicy(
    retain_longitudinal_modified_dates=True,
    retain_patient_characteristics=True,
    retain_device_identity=True,
    clean_descriptors=True,
)
