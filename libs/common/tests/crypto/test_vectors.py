"""The test vectors published in docs/crypto-format.md must match the code byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from enclave_common.crypto import (
    InstanceUnsealer,
    LocalKeyring,
    ObjectEncryptor,
    ObjectHeader,
    ObjectIdentity,
    SealContext,
    WrappedKey,
    decrypt_bytes,
    load_private_key,
    public_key_to_raw,
)

DOC = Path(__file__).resolve().parents[4] / "docs" / "crypto-format.md"


@pytest.fixture(scope="module")
def vectors() -> dict:
    blocks = re.findall(r"```json\n(.*?)\n```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "docs/crypto-format.md must hold exactly one json block of test vectors"
    return json.loads(blocks[0])


def test_object_vector_encrypts_to_documented_bytes(vectors) -> None:
    v = vectors["object"]
    identity = ObjectIdentity(**v["identity"])
    wrapped = WrappedKey.from_bytes(bytes.fromhex(v["wrapped_key_hex"]))
    encryptor = ObjectEncryptor(
        bytes.fromhex(v["dek_hex"]),
        wrapped,
        identity,
        segment_size=v["segment_size"],
        nonce_prefix=bytes.fromhex(v["nonce_prefix_hex"]),
    )
    segments = encryptor.update(bytes.fromhex(v["plaintext_hex"])) + [encryptor.finalize()]
    assert encryptor.header_bytes.hex() == v["header_hex"]
    assert encryptor.header.header_hash().hex() == v["header_hash_hex"]
    assert identity.encode().hex() == v["identity_encoding_hex"]
    assert [s.hex() for s in segments] == v["segments_hex"]


def test_object_vector_follows_the_documented_construction(vectors) -> None:
    """Recompute every segment with raw AESGCM from the rules in the doc, not from the package."""
    v = vectors["object"]
    header = bytes.fromhex(v["header_hex"])
    assert header[:6] == b"ENCO\x01\x00"
    assert struct.unpack(">I", header[6:10])[0] == v["segment_size"]
    assert header[10:17].hex() == v["nonce_prefix_hex"]
    assert header[19:].hex() == v["wrapped_key_hex"]
    header_hash = hashlib.sha256(b"enclave.object.header.v1\x00" + header[:17]).digest()
    identity_encoding = b"enclave.object.identity.v1\x00" + b"".join(
        struct.pack(">H", len(f.encode())) + f.encode()
        for f in (v["identity"]["tenant"], v["identity"]["study_key"], v["identity"]["object_key"])
    )
    aead = AESGCM(bytes.fromhex(v["dek_hex"]))
    plaintext = bytes.fromhex(v["plaintext_hex"])
    size = v["segment_size"]
    pieces = [plaintext[i : i + size] for i in range(0, len(plaintext), size)]
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        nonce = bytes.fromhex(v["nonce_prefix_hex"]) + struct.pack(">IB", index, last)
        expected = aead.encrypt(nonce, piece, identity_encoding + header_hash)
        assert expected.hex() == v["segments_hex"][index]


def test_object_vector_decrypts_through_the_keyring(vectors) -> None:
    v = vectors["object"]
    keyring = LocalKeyring(
        key_id=v["kek_key_id"], versions={v["kek_version"]: bytes.fromhex(v["kek_hex"])}, current_version=1
    )
    header, _ = ObjectHeader.from_bytes(bytes.fromhex(v["header_hex"]))
    assert header.wrapped_key.ciphertext[:12].hex() == v["wrap_nonce_hex"]
    assert keyring.unwrap(header.wrapped_key, v["key_context"]).hex() == v["dek_hex"]
    blob = bytes.fromhex(v["header_hex"] + "".join(v["segments_hex"]))
    assert decrypt_bytes(blob, ObjectIdentity(**v["identity"]), keyring).hex() == v["plaintext_hex"]


def test_sealed_chunk_vector_unseals(vectors) -> None:
    v = vectors["sealed_chunks"]
    private_key = load_private_key(bytes.fromhex(v["recipient_private_key_hex"]))
    assert public_key_to_raw(private_key.public_key()).hex() == v["recipient_public_key_hex"]
    unsealer = InstanceUnsealer(private_key, SealContext(**v["context"]))
    opened = [unsealer.unseal_chunk(bytes.fromhex(c)).hex() for c in v["chunks_hex"]]
    unsealer.finish()
    assert opened == v["plaintexts_hex"]
