"""Evidence bundles: round trip through the offline verifier, and tampering that must fail it."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import UTC, datetime

import pytest
from enclave_audit.chain import ChainHead, canonical_json
from enclave_audit.checkpoints import build_checkpoint
from enclave_audit.export import (
    MANIFEST_PATH,
    RECORDS_PATH,
    build_bundle,
    covering_range,
    overlapping_checkpoints,
)
from enclave_audit.signing import Ed25519Signer
from enclave_audit.verify_bundle import NotATarArchive, main, verify_bundle

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def signer():
    return Ed25519Signer.generate()


@pytest.fixture
def trail(make_chain, signer):
    """30 records under three checkpoints of 10."""
    records = make_chain(30)
    checkpoints, previous = [], None
    for start in range(0, 30, 10):
        previous = build_checkpoint(
            records[start : start + 10], signer=signer, created_at=NOW, previous=previous
        )
        checkpoints.append(previous)
    return records, checkpoints


def bundle_for(records, checkpoints, signer, first, last):
    selected = [r for r in records if first <= r.sequence <= last]
    anchor_record = next((r for r in records if r.sequence == first - 1), None)
    anchor = (
        ChainHead(anchor_record.sequence, anchor_record.record_hash)
        if anchor_record
        else ChainHead(0, records[0].prev_hash)
    )
    return build_bundle(
        selected,
        signer=signer,
        created_at=NOW,
        anchor=anchor,
        checkpoints=overlapping_checkpoints(first, last, checkpoints),
    )


def rewrite(bundle: bytes, name: str, change) -> bytes:
    """Rebuild the tar with one member's bytes replaced by ``change(old_bytes)``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(bundle)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == name:
                data = change(data)
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


def edit_record(bundle: bytes, index: int, field: str, value) -> bytes:
    def change(data: bytes) -> bytes:
        lines = data.splitlines()
        doc = json.loads(lines[index])
        doc[field] = value
        lines[index] = canonical_json(doc)
        return b"\n".join(lines) + b"\n"

    return rewrite(bundle, RECORDS_PATH, change)


def test_whole_trail_bundle_verifies(trail, signer):
    records, checkpoints = trail
    bundle = bundle_for(records, checkpoints, signer, 1, 30)
    outcome = verify_bundle(io.BytesIO(bundle), signer.public_key)
    assert outcome.ok, outcome.problems
    assert (outcome.record_count, outcome.first_sequence, outcome.last_sequence) == (30, 1, 30)
    assert any("Merkle roots of 3 fully covered checkpoints" in p for p in outcome.passed)


def test_range_aligned_to_checkpoints_verifies_from_its_anchor(trail, signer):
    records, checkpoints = trail
    first, last = covering_range(14, 17, checkpoints)
    assert (first, last) == (11, 20)
    outcome = verify_bundle(
        io.BytesIO(bundle_for(records, checkpoints, signer, first, last)), signer.public_key
    )
    assert outcome.ok, outcome.problems
    assert outcome.record_count == 10


def test_partial_range_verifies_chain_and_reports_uncheckable_roots(trail, signer):
    records, checkpoints = trail
    outcome = verify_bundle(io.BytesIO(bundle_for(records, checkpoints, signer, 14, 17)), signer.public_key)
    assert outcome.ok, outcome.problems
    assert any("only partly in the bundle" in p for p in outcome.passed)


def test_edited_record_fails_verification(trail, signer):
    records, checkpoints = trail
    bundle = edit_record(bundle_for(records, checkpoints, signer, 1, 30), 4, "actor", "mallory")
    outcome = verify_bundle(io.BytesIO(bundle), signer.public_key)
    assert not outcome.ok
    assert any("records.ndjson: SHA-256 or size differs" in p for p in outcome.problems)


def test_signature_over_a_forged_manifest_fails(trail, signer):
    records, checkpoints = trail
    bundle = bundle_for(records, checkpoints, signer, 1, 30)

    def forge(data: bytes) -> bytes:
        doc = json.loads(data)
        doc["record_count"] = 29
        return canonical_json(doc)

    outcome = verify_bundle(io.BytesIO(rewrite(bundle, MANIFEST_PATH, forge)), signer.public_key)
    assert not outcome.ok
    assert "manifest signature does not verify" in outcome.problems[0]


def test_bundle_signed_by_attacker_with_consistent_hashes_still_fails_against_real_key(trail, signer):
    records, checkpoints = trail
    attacker = Ed25519Signer.generate()
    forged_records = [r.model_copy(update={"actor": "mallory"}) if r.sequence == 3 else r for r in records]
    bundle = bundle_for(forged_records, checkpoints, attacker, 1, 30)
    outcome = verify_bundle(io.BytesIO(bundle), signer.public_key)
    assert not outcome.ok


def test_re_signed_tampering_is_caught_by_hashes_and_checkpoints(trail, signer):
    """Even the holder of the signing key cannot rewrite a record under a signed checkpoint."""
    records, checkpoints = trail
    from enclave_audit.chain import HashChain

    chain = HashChain()
    rewritten = [
        chain.append(r.model_copy(update={"actor": "mallory"}) if r.sequence == 3 else r) for r in records
    ]
    bundle = bundle_for(rewritten, checkpoints, signer, 1, 30)
    outcome = verify_bundle(io.BytesIO(bundle), signer.public_key)
    assert not outcome.ok
    assert any("do not match their checkpoint root" in p for p in outcome.problems)


def test_deleted_record_line_is_caught_even_with_a_re_signed_manifest(trail, signer):
    records, checkpoints = trail
    gapped = [r for r in records if r.sequence != 12]
    bundle = bundle_for(gapped, checkpoints, signer, 1, 30)
    outcome = verify_bundle(io.BytesIO(bundle), signer.public_key)
    assert not outcome.ok
    assert any("record 12" in p and "missing" in p for p in outcome.problems)


def test_extra_file_in_archive_fails(trail, signer):
    records, checkpoints = trail
    bundle = bundle_for(records, checkpoints, signer, 1, 10)
    with (
        tarfile.open(fileobj=io.BytesIO(bundle)) as src,
        tarfile.open(fileobj=(out := io.BytesIO()), mode="w") as dst,
    ):
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        info = tarfile.TarInfo("notes.txt")
        info.size = 2
        dst.addfile(info, io.BytesIO(b"hi"))
    outcome = verify_bundle(io.BytesIO(out.getvalue()), signer.public_key)
    assert any("notes.txt: in the archive but not in the manifest" in p for p in outcome.problems)


def test_cli_exit_codes(tmp_path, trail, signer, capsys):
    records, checkpoints = trail
    bundle_path = tmp_path / "bundle.tar"
    key_path = tmp_path / "audit.pub.pem"
    key_path.write_bytes(signer.public_key_pem())
    bundle_path.write_bytes(bundle_for(records, checkpoints, signer, 1, 30))
    assert main([str(bundle_path), "--public-key", str(key_path)]) == 0
    assert "VERIFIED: 30 records, sequence 1..30" in capsys.readouterr().out
    bundle_path.write_bytes(edit_record(bundle_path.read_bytes(), 0, "outcome", 12))
    assert main([str(bundle_path), "--public-key", str(key_path)]) == 1
    assert "NOT VERIFIED" in capsys.readouterr().out
    assert main([str(bundle_path), "--public-key", str(tmp_path / "missing.pem")]) == 2


def test_not_a_tar_is_reported(signer):
    with pytest.raises(NotATarArchive, match="not a tar archive"):
        verify_bundle(io.BytesIO(b"definitely not a tar archive" * 40), signer.public_key)


def test_a_file_that_is_not_a_tar_archive_is_unusable_input(tmp_path, trail, signer, capsys):
    """Before: "FAIL not a tar archive ... NOT VERIFIED", exit 1, as if a check of a bundle had failed."""
    key_path = tmp_path / "audit.pub.pem"
    key_path.write_bytes(signer.public_key_pem())
    refused = tmp_path / "bundle.tar"  # what curl -o saved of a refused export
    refused.write_text('{"detail":{"code":"bad_range","message":"the chain holds records 1..780"}}')
    assert main([str(refused), "--public-key", str(key_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read bundle {refused}: not a tar archive (it holds JSON" in err
    assert "nothing was verified" in err
    refused.write_bytes(b"")
    assert main([str(refused), "--public-key", str(key_path)]) == 2
    assert "not a tar archive; nothing was verified" in capsys.readouterr().err
    refused.write_bytes(bundle_for(*trail, signer, 1, 30)[:600])  # a download cut short (was: a traceback)
    assert main([str(refused), "--public-key", str(key_path)]) == 2
    assert "not a complete tar archive (cut short?); nothing was verified" in capsys.readouterr().err


def test_a_bundle_spanning_a_signing_key_rotation_verifies_with_the_earlier_key_also_trusted(
    tmp_path, make_chain, capsys
):
    """Checkpoints signed before a rotation carry the old key; the manifest, the new one."""
    old, new = Ed25519Signer.generate(), Ed25519Signer.generate()
    records = make_chain(20)
    first = build_checkpoint(records[:10], signer=old, created_at=NOW)
    second = build_checkpoint(records[10:], signer=new, created_at=NOW, previous=first)
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(bundle_for(records, [first, second], new, 1, 20))
    keys = {}
    for name, signer in (("new", new), ("old", old)):
        keys[name] = tmp_path / f"{name}.pem"
        keys[name].write_bytes(signer.public_key_pem())
    assert main([str(bundle), "--public-key", str(keys["new"])]) == 1
    assert "not among the trusted keys" in capsys.readouterr().out
    assert main([str(bundle), "--public-key", str(keys["new"]), "--also-trust", str(keys["old"])]) == 0
