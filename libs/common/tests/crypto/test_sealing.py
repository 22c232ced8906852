"""HPKE sealing: one-shot and streamed, key serialization, and chunk-sequence attacks."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common.crypto import (
    SEALED_CHUNK_OVERHEAD,
    InstanceSealer,
    InstanceUnsealer,
    KeyFormatError,
    SealContext,
    SealedChunkSequenceError,
    SealError,
    generate_ingest_keypair,
    load_private_key,
    load_public_key,
    private_key_to_pem,
    public_key_to_pem,
    public_key_to_raw,
    seal,
    seal_instance_chunks,
    unseal,
)

CONTEXT = SealContext(tenant="tenant-a", instance_upload_id="iu-0001")


@pytest.fixture(scope="module")
def ingest_key() -> X25519PrivateKey:
    return generate_ingest_keypair()


def test_one_shot_round_trip_and_context_binding(ingest_key) -> None:
    sealed = seal(b"metadata", ingest_key.public_key(), CONTEXT)
    assert unseal(sealed, ingest_key, CONTEXT) == b"metadata"
    assert b"metadata" not in sealed
    with pytest.raises(SealError):
        unseal(sealed, ingest_key, SealContext("tenant-b", "iu-0001"))
    with pytest.raises(SealError):
        unseal(sealed, generate_ingest_keypair(), CONTEXT)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(SealError):
        unseal(bytes(tampered), ingest_key, CONTEXT)


@pytest.mark.parametrize("size", [0, 1, 100, 1000, 1001])
def test_streamed_round_trip(size: int, ingest_key) -> None:
    data = os.urandom(size)
    chunks = seal_instance_chunks(data, ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    assert len(chunks) == max(1, -(-size // 100))
    assert all(len(c) <= 100 + SEALED_CHUNK_OVERHEAD for c in chunks)
    unsealer = InstanceUnsealer(ingest_key, CONTEXT)
    assert b"".join(unsealer.unseal_chunk(c) for c in chunks) == data
    unsealer.finish()
    assert unsealer.finished


def test_one_encapsulation_per_instance(ingest_key) -> None:
    chunks = seal_instance_chunks(os.urandom(300), ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    key_blocks = {bytes(c[12 : 12 + 80]) for c in chunks}
    assert len(key_blocks) == 1
    other = seal_instance_chunks(os.urandom(300), ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    assert bytes(other[0][12:92]) not in key_blocks


def test_truncation_is_detected(ingest_key) -> None:
    chunks = seal_instance_chunks(os.urandom(300), ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    unsealer = InstanceUnsealer(ingest_key, CONTEXT)
    for chunk in chunks[:2]:
        unsealer.unseal_chunk(chunk)
    with pytest.raises(SealedChunkSequenceError) as info:
        unsealer.finish()
    assert (info.value.expected, info.value.received) == (2, None)


def test_reordering_is_detected(ingest_key) -> None:
    chunks = seal_instance_chunks(os.urandom(300), ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    unsealer = InstanceUnsealer(ingest_key, CONTEXT)
    unsealer.unseal_chunk(chunks[0])
    with pytest.raises(SealedChunkSequenceError) as info:
        unsealer.unseal_chunk(chunks[2])
    assert (info.value.expected, info.value.received) == (1, 2)


def test_duplicate_and_after_final_are_detected(ingest_key) -> None:
    chunks = seal_instance_chunks(os.urandom(200), ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    unsealer = InstanceUnsealer(ingest_key, CONTEXT)
    unsealer.unseal_chunk(chunks[0])
    with pytest.raises(SealedChunkSequenceError) as dup:
        unsealer.unseal_chunk(chunks[0])
    assert (dup.value.expected, dup.value.received) == (1, 0)
    unsealer.unseal_chunk(chunks[1])
    with pytest.raises(SealedChunkSequenceError) as late:
        unsealer.unseal_chunk(chunks[1])
    assert (late.value.expected, late.value.received) == (None, 1)


def test_relabelled_index_or_final_flag_fails_authentication(ingest_key) -> None:
    chunks = seal_instance_chunks(os.urandom(300), ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    as_final = bytearray(chunks[1])
    as_final[5] = 1  # claim chunk 1 is final: an attacker truncating the stream
    with pytest.raises(SealError, match="authentication"):
        InstanceUnsealer(ingest_key, CONTEXT).open_chunk(bytes(as_final))
    relabelled = bytearray(chunks[2])
    relabelled[9] = 1  # claim chunk 2 is chunk 1: reordering
    with pytest.raises(SealError, match="authentication"):
        InstanceUnsealer(ingest_key, CONTEXT).open_chunk(bytes(relabelled))


def test_chunk_from_another_instance_is_rejected(ingest_key) -> None:
    mine = seal_instance_chunks(os.urandom(200), ingest_key.public_key(), CONTEXT, chunk_bytes=100)
    other_ctx = SealContext("tenant-a", "iu-0002")
    theirs = seal_instance_chunks(os.urandom(200), ingest_key.public_key(), other_ctx, chunk_bytes=100)
    unsealer = InstanceUnsealer(ingest_key, CONTEXT)
    unsealer.unseal_chunk(mine[0])
    with pytest.raises(SealError, match="another instance"):
        unsealer.unseal_chunk(theirs[1])
    with pytest.raises(SealError, match="did not open"):
        InstanceUnsealer(ingest_key, CONTEXT).unseal_chunk(theirs[0])


def test_wrong_private_key_and_malformed_chunks(ingest_key) -> None:
    chunks = seal_instance_chunks(b"abc", ingest_key.public_key(), CONTEXT)
    with pytest.raises(SealError):
        InstanceUnsealer(generate_ingest_keypair(), CONTEXT).unseal_chunk(chunks[0])
    with pytest.raises(SealError, match="shorter"):
        InstanceUnsealer(ingest_key, CONTEXT).unseal_chunk(chunks[0][:50])
    with pytest.raises(SealError, match="format"):
        InstanceUnsealer(ingest_key, CONTEXT).unseal_chunk(b"XXXX" + chunks[0][4:])


def test_sealer_enforces_chunk_limit_and_single_final(ingest_key) -> None:
    sealer = InstanceSealer(ingest_key.public_key(), CONTEXT, max_chunk_bytes=10)
    with pytest.raises(SealError, match="exceeds"):
        sealer.seal_chunk(b"x" * 11, final=False)
    sealer.seal_chunk(b"x" * 10, final=True)
    with pytest.raises(SealError, match="final"):
        sealer.seal_chunk(b"", final=True)


def test_key_serialization_round_trips(tmp_path, ingest_key) -> None:
    raw_public = public_key_to_raw(ingest_key.public_key())
    assert public_key_to_raw(load_public_key(public_key_to_pem(ingest_key.public_key()))) == raw_public
    assert public_key_to_raw(load_public_key(raw_public)) == raw_public
    encodings = [(private_key_to_pem(ingest_key), None), (private_key_to_pem(ingest_key, b"pw"), b"pw")]
    for pem, password in encodings:
        path = tmp_path / "ingest.pem"
        path.write_bytes(pem)
        for source in (pem, path, str(path)):
            loaded = load_private_key(source, password=password)
            assert public_key_to_raw(loaded.public_key()) == raw_public
    sealed = seal(b"x", load_public_key(raw_public), CONTEXT)
    assert unseal(sealed, load_private_key(private_key_to_pem(ingest_key)), CONTEXT) == b"x"


def test_key_loading_rejects_other_key_types() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    other = ed25519.Ed25519PrivateKey.generate()
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyFormatError, match="only X25519"):
        load_private_key(pem)
    with pytest.raises(KeyFormatError):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
