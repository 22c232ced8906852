"""Hash chain: appending, canonical JSON, and tamper detection at the exact sequence."""

from __future__ import annotations

import pytest
import rfc8785
from enclave_audit.chain import (
    GENESIS,
    GENESIS_HASH,
    BreakReason,
    ChainHead,
    HashChain,
    canonical_json,
    compute_record_hash,
    record_body,
    verify_chain,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def stored(records):
    """The records as a document store returns them: plain dicts, extra ``_id``."""
    return [r.model_dump() | {"_id": f"oid-{r.sequence}"} for r in records]


def test_chain_links_each_record_to_its_predecessor(make_chain):
    records = make_chain(5)
    assert [r.sequence for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in zip(records, records[1:], strict=False):
        assert after.prev_hash == before.record_hash
    assert all(compute_record_hash(record_body(r)) == r.record_hash for r in records)


def test_intact_chain_verifies_from_stored_documents(make_chain):
    records = make_chain(30)
    result = verify_chain(stored(records), expected_last_sequence=30)
    assert result.ok
    assert (result.checked, result.first_sequence, result.last_sequence) == (30, 1, 30)
    assert result.last_hash == records[-1].record_hash


def test_changed_field_is_detected_at_that_record(make_chain):
    docs = stored(make_chain(20))
    docs[11]["actor"] = "someone-else"
    result = verify_chain(docs)
    assert not result.ok
    assert (result.broken_sequence, result.reason) == (12, BreakReason.HASH_MISMATCH)
    assert result.last_sequence == 11


def test_changed_envelope_value_is_detected(make_chain):
    docs = stored(make_chain(10))
    docs[4]["envelope"]["data"]["study_key"] = "study-forged"
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (5, BreakReason.HASH_MISMATCH)


def test_deleted_record_is_detected_at_the_missing_sequence(make_chain):
    docs = stored(make_chain(20))
    del docs[6]
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (7, BreakReason.MISSING_SEQUENCE)


def test_deleted_first_record_is_detected(make_chain):
    docs = stored(make_chain(5))[1:]
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (1, BreakReason.MISSING_SEQUENCE)


def test_deleted_tail_is_detected_against_the_expected_end(make_chain):
    docs = stored(make_chain(10))[:8]
    assert verify_chain(docs).ok
    result = verify_chain(docs, expected_last_sequence=10)
    assert (result.broken_sequence, result.reason) == (9, BreakReason.TRUNCATED)


def test_swapped_records_are_detected_at_the_first_swapped_position(make_chain):
    docs = stored(make_chain(20))
    # An attacker swaps the contents of records 8 and 13 in place: reads by sequence see 13's body at 8.
    a, b = docs[7], docs[12]
    a_seq, b_seq = a["sequence"], b["sequence"]
    docs[7], docs[12] = b | {"sequence": a_seq}, a | {"sequence": b_seq}
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (8, BreakReason.HASH_MISMATCH)


def test_records_delivered_out_of_order_are_detected(make_chain):
    docs = stored(make_chain(10))
    docs[3], docs[4] = docs[4], docs[3]
    result = verify_chain(docs)
    assert result.broken_sequence == 4
    assert result.reason == BreakReason.MISSING_SEQUENCE
    docs = stored(make_chain(10))
    docs.insert(5, docs[2])
    assert verify_chain(docs).reason == BreakReason.OUT_OF_ORDER


def test_altered_prev_hash_is_detected(make_chain):
    docs = stored(make_chain(10))
    docs[5]["prev_hash"] = "0" * 64
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (6, BreakReason.HASH_MISMATCH)


def test_rehashed_forgery_breaks_the_next_link(make_chain):
    records = make_chain(10)
    altered = records[5].model_copy(update={"actor": "mallory"})
    forged = altered.model_copy(update={"record_hash": compute_record_hash(record_body(altered))})
    docs = stored(records)
    docs[5] = forged.model_dump()
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (7, BreakReason.PREV_HASH_MISMATCH)


def test_malformed_record_is_reported_with_its_sequence(make_chain):
    docs = stored(make_chain(5))
    docs[2]["record_hash"] = "not-a-hash"
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (3, BreakReason.MALFORMED)
    assert "record_hash" in (result.detail or "")


def test_range_verifies_from_an_anchor(make_chain):
    records = make_chain(20)
    anchor = ChainHead(records[9].sequence, records[9].record_hash)
    assert verify_chain(stored(records[10:]), anchor=anchor).ok
    wrong = verify_chain(stored(records[10:]), anchor=ChainHead(10, GENESIS_HASH))
    assert (wrong.broken_sequence, wrong.reason) == (11, BreakReason.PREV_HASH_MISMATCH)


def test_chain_resumes_after_restart_from_its_last_record(make_chain):
    records = make_chain(6)
    resumed = HashChain(head=ChainHead(records[2].sequence, records[2].record_hash))
    again = [resumed.append(r) for r in records[3:]]
    assert again == records[3:]
    assert resumed.head == ChainHead(6, records[-1].record_hash)


def test_empty_chain_is_ok():
    result = verify_chain([])
    assert result.ok
    assert result.checked == 0
    assert GENESIS.sequence == 0


def test_on_record_sees_every_verified_record(make_chain):
    seen = []
    verify_chain(make_chain(7), on_record=lambda r: seen.append(r.sequence))
    assert seen == list(range(1, 8))


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_json_equals_the_rfc8785_reference(value):
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize(
    "value", [100.0, 0.0, -0.0, 1e-7, 1e21, 123456789012345680000.0, 0.1, {"\U0001f600": 1, "\ue000": 2}]
)
def test_canonical_json_edge_cases(value):
    assert canonical_json(value) == rfc8785.dumps(value)


@pytest.mark.parametrize("index", [0, 6, 19])
def test_json_documents_take_the_fast_path_and_still_catch_tampering(make_chain, index):
    docs = [r.model_dump(mode="json") for r in make_chain(20)]
    assert verify_chain(docs).ok
    docs[index]["outcome"] = 12
    result = verify_chain(docs)
    assert (result.broken_sequence, result.reason) == (index + 1, BreakReason.HASH_MISMATCH)
