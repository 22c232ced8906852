"""Keyed pseudonyms and DICOM UIDs."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest
from enclave_common.crypto import Pseudonymizer
from hypothesis import given
from hypothesis import strategies as st

KEY = bytes(range(32))
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def test_deterministic_and_key_dependent() -> None:
    p = Pseudonymizer(KEY)
    a = p.pseudonym("tenant-a", "patient", "PAT-123")
    assert a == Pseudonymizer(KEY).pseudonym("tenant-a", "patient", "PAT-123")
    assert re.fullmatch(r"[a-z2-7]{32}", a)
    assert a != Pseudonymizer(bytes(32)).pseudonym("tenant-a", "patient", "PAT-123")
    assert "PAT-123" not in a


def test_scoped_per_tenant_and_kind() -> None:
    p = Pseudonymizer(KEY)
    values = {
        p.pseudonym("tenant-a", "patient", "X"),
        p.pseudonym("tenant-b", "patient", "X"),
        p.pseudonym("tenant-a", "study_uid", "X"),
        p.pseudonym("tenant-a", "patient", "Y"),
    }
    assert len(values) == 4
    assert p.uid("tenant-a", "1.2.3") != p.uid("tenant-b", "1.2.3")


def test_framing_prevents_boundary_collisions() -> None:
    p = Pseudonymizer(KEY)
    assert p.pseudonym("ab", "patient", "c") != p.pseudonym("a", "patient", "bc")


def test_uid_matches_independent_computation() -> None:
    digest = hmac.new(
        KEY, b"enclave.uid.v1\x00" + b"\x00\x00\x00\x01t" + b"\x00\x00\x00\x051.2.3", hashlib.sha256
    ).digest()
    assert Pseudonymizer(KEY).uid("t", "1.2.3") == f"2.25.{int.from_bytes(digest[:16], 'big')}"


def test_rejects_short_key_and_bad_kind() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Pseudonymizer(b"short")
    with pytest.raises(ValueError, match="kind"):
        Pseudonymizer(KEY).pseudonym("t", "Patient Name", "x")
    assert "redacted" in repr(Pseudonymizer(KEY))


@given(tenant=st.text(min_size=1, max_size=40), value=st.text(max_size=200))
def test_uid_is_valid_dicom_uid(tenant: str, value: str) -> None:
    uid = Pseudonymizer(KEY).uid(tenant, value)
    assert len(uid) <= 64
    assert uid.startswith("2.25.")
    assert UID.fullmatch(uid)
