"""RFC 6962 Merkle roots and proofs, and Ed25519-signed checkpoints."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from enclave_audit.checkpoints import (
    CHECKPOINT_GENESIS_HASH,
    Checkpoint,
    CheckpointError,
    CheckpointRoots,
    build_checkpoint,
    verify_checkpoint,
)
from enclave_audit.merkle import (
    EMPTY_ROOT,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    verify_inclusion,
)
from enclave_audit.signing import Ed25519Signer, load_public_key_pem

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def hashes(n):
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def reference_root(leaves):
    """RFC 6962 MTH written straight from the definition."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 33, 100])
def test_streaming_root_equals_rfc6962_definition(n):
    assert merkle_root(hashes(n)) == reference_root(hashes(n)).hex()


def test_root_depends_on_order_and_content():
    leaves = hashes(8)
    swapped = leaves[:]
    swapped[2], swapped[3] = swapped[3], swapped[2]
    assert merkle_root(swapped) != merkle_root(leaves)
    assert merkle_root(leaves[:7]) != merkle_root(leaves)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_inclusion_proofs_verify_for_every_leaf(n):
    leaves = hashes(n)
    root = merkle_root(leaves)
    for index, leaf in enumerate(leaves):
        proof = inclusion_proof(leaves, index)
        assert verify_inclusion(leaf, index, n, proof, root)


def test_inclusion_proof_fails_for_wrong_leaf_index_or_root():
    leaves = hashes(10)
    root = merkle_root(leaves)
    proof = inclusion_proof(leaves, 4)
    assert not verify_inclusion(leaves[5], 4, 10, proof, root)
    assert not verify_inclusion(leaves[4], 5, 10, proof, root)
    assert not verify_inclusion(leaves[4], 4, 10, proof, merkle_root(leaves[:9]))
    assert not verify_inclusion(leaves[4], 10, 10, proof, root)
    with pytest.raises(ValueError, match="outside the tree"):
        inclusion_proof(leaves, 10)


@pytest.fixture
def signer():
    return Ed25519Signer.generate()


def test_checkpoint_round_trips_and_verifies(make_chain, signer):
    records = make_chain(10)
    cp = build_checkpoint(records, signer=signer, created_at=NOW)
    assert (cp.first_sequence, cp.last_sequence, cp.tree_size) == (1, 10, 10)
    assert cp.root_hash == merkle_root(r.record_hash for r in records)
    assert cp.last_record_hash == records[-1].record_hash
    assert cp.prev_checkpoint_hash == CHECKPOINT_GENESIS_HASH
    assert cp.object_key == "checkpoints/000000000001-000000000010.json"
    raw = cp.to_bytes()
    assert Checkpoint.from_bytes(raw) == cp
    result = verify_checkpoint(raw, signer.public_key, record_hashes=[r.record_hash for r in records])
    assert result.ok, result.reason


def test_checkpoints_chain_to_each_other(make_chain, signer):
    records = make_chain(12)
    first = build_checkpoint(records[:5], signer=signer, created_at=NOW)
    second = build_checkpoint(records[5:], signer=signer, created_at=NOW, previous=first)
    assert second.prev_checkpoint_hash == first.checkpoint_hash()
    assert verify_checkpoint(second, signer.public_key, previous=first).ok
    other = build_checkpoint(records[:5], signer=signer, created_at=datetime(2024, 6, 2, tzinfo=UTC))
    assert "prev_checkpoint_hash" in (
        verify_checkpoint(second, signer.public_key, previous=other).reason or ""
    )


def test_checkpoint_refuses_gaps_and_wrong_start(make_chain, signer):
    records = make_chain(6)
    with pytest.raises(CheckpointError, match="contiguous"):
        build_checkpoint([records[0], records[2]], signer=signer, created_at=NOW)
    first = build_checkpoint(records[:3], signer=signer, created_at=NOW)
    with pytest.raises(CheckpointError, match="sequence 4 expected"):
        build_checkpoint(records[4:], signer=signer, created_at=NOW, previous=first)
    with pytest.raises(CheckpointError, match="empty"):
        build_checkpoint([], signer=signer, created_at=NOW)


def test_tampered_checkpoint_fails_signature(make_chain, signer):
    cp = build_checkpoint(make_chain(4), signer=signer, created_at=NOW)
    forged = cp.model_copy(update={"root_hash": "0" * 64})
    result = verify_checkpoint(forged, signer.public_key)
    assert not result.ok
    assert "signature" in (result.reason or "")


def test_checkpoint_from_another_key_is_refused(make_chain, signer):
    cp = build_checkpoint(make_chain(4), signer=signer, created_at=NOW)
    stranger = Ed25519Signer.generate()
    result = verify_checkpoint(cp, stranger.public_key)
    assert not result.ok
    assert "not among the trusted keys" in (result.reason or "")
    # A forger who relabels the key id still fails the signature.
    relabelled = cp.model_copy(update={"key_id": stranger.key_id})
    assert "signature" in (verify_checkpoint(relabelled, stranger.public_key).reason or "")


def test_checkpoint_detects_altered_record_hashes(make_chain, signer):
    records = make_chain(8)
    cp = build_checkpoint(records, signer=signer, created_at=NOW)
    hashes_ = [r.record_hash for r in records]
    hashes_[3] = "f" * 64
    result = verify_checkpoint(cp, signer.public_key, record_hashes=hashes_)
    assert "Merkle root" in (result.reason or "")
    short = verify_checkpoint(cp, signer.public_key, record_hashes=[r.record_hash for r in records[:7]])
    assert "7 records given" in (short.reason or "")


def test_malformed_checkpoint_bytes_are_reported(signer):
    result = verify_checkpoint(b'{"format": "enclave.audit.checkpoint.v1"}', signer.public_key)
    assert not result.ok
    assert "malformed" in (result.reason or "")


def test_public_key_pem_round_trip_and_wrong_key_type(signer):
    assert load_public_key_pem(signer.public_key_pem()) == signer.public_key
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="only Ed25519"):
        load_public_key_pem(ec_pem)


def test_checkpoint_roots_of_one_walk_match_the_signed_roots_in_any_listed_order(make_chain, signer):
    """Verification computes every checkpoint's root in one walk over the records (each record meets
    only the checkpoints covering it); the roots equal the signed ones whatever order the checkpoints
    are listed in, and a checkpoint whose last record never comes is not reported complete."""
    records = make_chain(50)
    signed, previous = [], None
    for start in range(0, 50, 7):
        previous = build_checkpoint(
            records[start : start + 7], signer=signer, created_at=NOW, previous=previous
        )
        signed.append(previous)
    roots = CheckpointRoots(reversed(signed))
    for record in records[:45]:  # the walk stops inside 43..49 (and never reaches 50..50)
        roots.add(record)
    completed = {cp.first_sequence: (root, last) for cp, root, last in roots.completed}
    assert sorted(completed) == [cp.first_sequence for cp in signed[:-2]]
    for cp in signed[:-2]:
        assert completed[cp.first_sequence] == (cp.root_hash, cp.last_record_hash)


def test_a_checkpoint_whose_records_have_a_gap_gets_a_root_that_differs_from_the_signed_one(
    make_chain, signer
):
    records = make_chain(10)
    cp = build_checkpoint(records[:10], signer=signer, created_at=NOW)
    roots = CheckpointRoots([cp])
    for record in records[:4] + records[5:]:
        roots.add(record)
    # Record 5 is missing: the root covers 9 records and differs from the signed one.
    [(_, root, _)] = roots.completed
    assert root != cp.root_hash
