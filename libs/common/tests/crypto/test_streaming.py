"""Round trips and every tamper case of the at-rest object format."""

from __future__ import annotations

import io
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from enclave_common.crypto import (
    DEFAULT_SEGMENT_SIZE,
    KeyNotFoundError,
    KeyUnwrapError,
    LocalKeyring,
    ObjectDecryptor,
    ObjectEncryptor,
    ObjectFormatError,
    ObjectHeader,
    ObjectIdentity,
    ObjectTruncatedError,
    SegmentError,
    decrypt_bytes,
    decrypt_object,
    decrypt_object_async,
    encrypt_bytes,
    encrypt_object,
    encrypt_object_async,
    encrypt_to_temp_file,
    scrub_object,
)
from hypothesis import given, settings
from hypothesis import strategies as st

SEG = 64
TAG = 16
IDENTITY = ObjectIdentity("tenant-a", "study-1", "object-1")


@pytest.fixture
def keyring() -> LocalKeyring:
    return LocalKeyring.generate("test-kek")


@pytest.fixture
def data_key(keyring: LocalKeyring):
    return keyring.generate_data_key(IDENTITY.key_context())


def _encrypt(data: bytes, data_key, identity: ObjectIdentity = IDENTITY, seg: int = SEG) -> bytes:
    dek, wrapped = data_key
    return encrypt_bytes(data, dek, wrapped, identity, segment_size=seg)


def _split(blob: bytes, seg: int = SEG) -> tuple[bytes, list[bytes]]:
    _, length = ObjectHeader.from_bytes(blob)
    body = blob[length:]
    step = seg + TAG
    return blob[:length], [body[i : i + step] for i in range(0, len(body), step)]


@pytest.mark.parametrize(
    ("size", "segments"),
    [(0, 1), (1, 1), (SEG, 1), (SEG + 1, 2), (2 * SEG, 2), (10 * SEG + 7, 11)],
    ids=["empty", "one-byte", "exactly-one-segment", "segment-plus-one", "two-full", "many"],
)
def test_round_trip_and_segment_count(size: int, segments: int, keyring, data_key) -> None:
    data = os.urandom(size)
    blob = _encrypt(data, data_key)
    header, parts = _split(blob)
    assert len(parts) == segments
    assert len(blob) == len(header) + size + segments * TAG
    assert decrypt_bytes(blob, IDENTITY, keyring) == data
    assert decrypt_bytes(blob, IDENTITY, data_key[0]) == data


@pytest.mark.parametrize("piece", [1, 7, SEG, SEG + TAG, 1000])
def test_arbitrary_input_chunking_gives_identical_output(piece: int, keyring, data_key) -> None:
    data = os.urandom(5 * SEG + 3)
    dek, wrapped = data_key
    prefix = b"\x01" * 7
    whole = encrypt_bytes(data, dek, wrapped, IDENTITY, segment_size=SEG, nonce_prefix=prefix)
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    chunked = b"".join(encrypt_object(pieces, dek, wrapped, IDENTITY, segment_size=SEG, nonce_prefix=prefix))
    assert chunked == whole
    ct_pieces = [whole[i : i + piece] for i in range(0, len(whole), piece)]
    assert b"".join(decrypt_object(ct_pieces, IDENTITY, keyring)) == data


def test_file_like_source_and_mutable_buffers(keyring, data_key) -> None:
    data = os.urandom(3 * SEG + 5)
    dek, wrapped = data_key
    blob = b"".join(encrypt_object(io.BytesIO(data), dek, wrapped, IDENTITY, segment_size=SEG))
    assert b"".join(decrypt_object(io.BytesIO(blob), IDENTITY, keyring)) == data
    reused = bytearray(SEG)
    encryptor = ObjectEncryptor(dek, wrapped, IDENTITY, segment_size=SEG)
    out = [encryptor.header_bytes]
    for i in range(0, len(data), SEG):
        piece = data[i : i + SEG]
        reused[: len(piece)] = piece
        out += encryptor.update(memoryview(reused)[: len(piece)])
        reused[:] = b"\xff" * SEG  # the encryptor must not have kept a view of the caller's buffer
    out.append(encryptor.finalize())
    assert decrypt_bytes(b"".join(out), IDENTITY, keyring) == data


def test_decryptor_yields_segment_by_segment(keyring, data_key) -> None:
    data = os.urandom(4 * SEG)
    blob = _encrypt(data, data_key)
    header, parts = _split(blob)
    decryptor = ObjectDecryptor(IDENTITY, keyring)
    assert decryptor.update(header) == []
    assert decryptor.update(parts[0]) == []  # cannot know yet whether segment 0 is the last
    assert decryptor.update(parts[1]) == [data[:SEG]]
    assert decryptor.update(parts[2] + parts[3]) == [data[SEG : 2 * SEG], data[2 * SEG : 3 * SEG]]
    assert decryptor.finalize() == data[3 * SEG :]


async def test_async_round_trip(keyring, data_key) -> None:
    data = os.urandom(3 * SEG + 1)
    dek, wrapped = data_key

    async def plain():
        for i in range(0, len(data), 50):
            yield data[i : i + 50]

    encrypted = encrypt_object_async(plain(), dek, wrapped, IDENTITY, segment_size=SEG)
    blob = b"".join([c async for c in encrypted])

    async def cipher():
        for i in range(0, len(blob), 33):
            yield blob[i : i + 33]

    assert b"".join([p async for p in decrypt_object_async(cipher(), IDENTITY, keyring)]) == data


def test_default_segment_size_is_one_mebibyte(data_key) -> None:
    dek, wrapped = data_key
    assert ObjectEncryptor(dek, wrapped, IDENTITY).header.segment_size == DEFAULT_SEGMENT_SIZE == 1 << 20


# ---- tampering -------------------------------------------------------------------------------


def _expect_segment_error(blob: bytes, keyring, index: int, problem: str, identity=IDENTITY) -> SegmentError:
    with pytest.raises(SegmentError) as info:
        decrypt_bytes(blob, identity, keyring)
    assert info.value.segment_index == index
    assert info.value.problem == problem
    assert f"segment {index}" in str(info.value) or f"from {index}" in str(info.value)
    return info.value


def test_truncation_missing_last_segment(keyring, data_key) -> None:
    header, parts = _split(_encrypt(os.urandom(3 * SEG + 1), data_key))
    error = _expect_segment_error(header + b"".join(parts[:3]), keyring, 3, "truncated")
    assert isinstance(error, ObjectTruncatedError)


def test_truncation_to_header_only(keyring, data_key) -> None:
    header, _ = _split(_encrypt(b"abc", data_key))
    with pytest.raises(ObjectTruncatedError):
        decrypt_bytes(header, IDENTITY, keyring)


def test_truncation_inside_header(keyring, data_key) -> None:
    header, _ = _split(_encrypt(b"abc", data_key))
    with pytest.raises(ObjectFormatError):
        decrypt_bytes(header[:10], IDENTITY, keyring)
    with pytest.raises(ObjectFormatError):
        decrypt_bytes(header[:-1], IDENTITY, keyring)


def test_truncation_inside_last_segment(keyring, data_key) -> None:
    blob = _encrypt(os.urandom(2 * SEG), data_key)
    _expect_segment_error(blob[:-1], keyring, 1, "authentication")
    _expect_segment_error(blob[: -(SEG + 10)], keyring, 1, "short-segment")


def test_reordered_segments(keyring, data_key) -> None:
    header, parts = _split(_encrypt(os.urandom(3 * SEG + 1), data_key))
    _expect_segment_error(header + parts[1] + parts[0] + parts[2] + parts[3], keyring, 0, "authentication")


def test_duplicated_segment(keyring, data_key) -> None:
    header, parts = _split(_encrypt(os.urandom(2 * SEG + 1), data_key))
    _expect_segment_error(header + parts[0] + parts[0] + parts[1] + parts[2], keyring, 1, "authentication")


def test_data_appended_after_last_segment(keyring, data_key) -> None:
    blob = _encrypt(os.urandom(SEG), data_key)
    _expect_segment_error(blob + os.urandom(SEG + TAG), keyring, 0, "trailing-data")


def test_segment_swapped_between_objects_of_same_study(keyring, data_key) -> None:
    other = ObjectIdentity(IDENTITY.tenant, IDENTITY.study_key, "object-2")
    data = os.urandom(2 * SEG + 1)
    header_a, parts_a = _split(_encrypt(data, data_key))
    _, parts_b = _split(_encrypt(data, data_key, identity=other))
    _expect_segment_error(header_a + parts_a[0] + parts_b[1] + parts_a[2], keyring, 1, "authentication")


def test_whole_object_moved_to_another_identity(keyring, data_key) -> None:
    blob = _encrypt(b"payload", data_key)
    moved = ObjectIdentity(IDENTITY.tenant, IDENTITY.study_key, "object-9")
    _expect_segment_error(blob, data_key[0], 0, "authentication", identity=moved)
    with pytest.raises(KeyUnwrapError):  # another study: the DEK itself does not unwrap
        decrypt_bytes(blob, ObjectIdentity(IDENTITY.tenant, "study-2", IDENTITY.object_key), keyring)


@pytest.mark.parametrize(
    ("offset", "error"),
    [
        (0, ObjectFormatError),  # magic
        (4, ObjectFormatError),  # format version
        (5, ObjectFormatError),  # flags
        (9, SegmentError),  # segment size (low byte)
        (12, SegmentError),  # nonce prefix
        (19, ObjectFormatError),  # key slot encoding version
        (22, KeyNotFoundError),  # key slot: provider name
        (30, KeyNotFoundError),  # key slot: KEK id
        (-63, KeyNotFoundError),  # key slot: KEK version (low byte)
        (-1, KeyUnwrapError),  # last byte of the wrapped DEK
    ],
)
def test_header_tampering(offset: int, error: type[Exception], keyring, data_key) -> None:
    blob = bytearray(_encrypt(os.urandom(SEG + 3), data_key))
    _, length = ObjectHeader.from_bytes(bytes(blob))
    position = offset if offset >= 0 else length + offset
    blob[position] ^= 0x01
    with pytest.raises(error):
        decrypt_bytes(bytes(blob), IDENTITY, keyring)


def test_flipped_ciphertext_bit_names_the_segment(keyring, data_key) -> None:
    blob = bytearray(_encrypt(os.urandom(4 * SEG), data_key))
    _, length = ObjectHeader.from_bytes(bytes(blob))
    blob[length + 2 * (SEG + TAG) + 5] ^= 0x80
    _expect_segment_error(bytes(blob), keyring, 2, "authentication")


def test_wrong_kek(data_key) -> None:
    blob = _encrypt(b"x" * 100, data_key)
    other = LocalKeyring.generate("test-kek")
    with pytest.raises(KeyUnwrapError):
        decrypt_bytes(blob, IDENTITY, other)


def test_wrong_dek(data_key) -> None:
    blob = _encrypt(b"x" * 100, data_key)
    _expect_segment_error(blob, AESGCM.generate_key(256), 0, "authentication")


# ---- scrub -----------------------------------------------------------------------------------


def test_scrub_clean_object(keyring, data_key) -> None:
    report = scrub_object(io.BytesIO(_encrypt(os.urandom(5 * SEG), data_key)), IDENTITY, keyring)
    assert report.ok
    assert report.segments_ok == 5


def test_scrub_reports_every_bad_segment_and_keeps_going(keyring, data_key) -> None:
    blob = bytearray(_encrypt(os.urandom(6 * SEG), data_key))
    _, length = ObjectHeader.from_bytes(bytes(blob))
    for bad in (1, 4):
        blob[length + bad * (SEG + TAG)] ^= 0x01
    report = scrub_object(io.BytesIO(bytes(blob)), IDENTITY, keyring)
    found = [(p.segment_index, p.problem) for p in report.problems]
    assert found == [(1, "authentication"), (4, "authentication")]
    assert report.segments_ok == 4


def test_scrub_reports_truncation(keyring, data_key) -> None:
    header, parts = _split(_encrypt(os.urandom(3 * SEG + 1), data_key))
    report = scrub_object([header, *parts[:2]], IDENTITY, keyring)
    assert [(p.segment_index, p.problem) for p in report.problems] == [(2, "truncated")]
    assert report.segments_ok == 1  # segment 0 verified; segment 1 authenticates only as non-last


def test_scrub_reports_key_and_header_problems(keyring, data_key) -> None:
    blob = _encrypt(b"abc", data_key)
    wrong = scrub_object([blob], IDENTITY, LocalKeyring.generate("test-kek"))
    assert [(p.segment_index, p.problem) for p in wrong.problems] == [(None, "key")]
    garbage = scrub_object([b"NOPE" + blob[4:]], IDENTITY, keyring)
    assert [(p.segment_index, p.problem) for p in garbage.problems] == [(None, "header")]


# ---- limits and properties -------------------------------------------------------------------


def test_segment_size_limits(data_key) -> None:
    from enclave_common.crypto.object_format import MAX_SEGMENT_SIZE

    dek, wrapped = data_key
    for ok in (1, MAX_SEGMENT_SIZE):
        assert ObjectEncryptor(dek, wrapped, IDENTITY, segment_size=ok).header.segment_size == ok
    for bad in (0, MAX_SEGMENT_SIZE + 1):
        with pytest.raises(ObjectFormatError, match="segment size"):
            ObjectEncryptor(dek, wrapped, IDENTITY, segment_size=bad)


def test_data_key_must_be_32_bytes(data_key) -> None:
    from enclave_common.crypto import KeyFormatError

    _, wrapped = data_key
    with pytest.raises(KeyFormatError, match="32 bytes"):
        ObjectEncryptor(b"k" * 16, wrapped, IDENTITY)


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=300),
    segment_size=st.integers(min_value=1, max_value=40),
    piece=st.integers(min_value=1, max_value=100),
)
def test_round_trip_property(data: bytes, segment_size: int, piece: int) -> None:
    keyring = LocalKeyring.generate("prop")
    dek, wrapped = keyring.generate_data_key(IDENTITY.key_context())
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    blob = b"".join(encrypt_object(pieces, dek, wrapped, IDENTITY, segment_size=segment_size))
    ct_pieces = [blob[i : i + piece] for i in range(0, len(blob), piece)]
    assert b"".join(decrypt_object(ct_pieces, IDENTITY, keyring)) == data
    assert scrub_object(io.BytesIO(blob), IDENTITY, keyring).ok


def test_the_ciphertext_file_has_no_name_and_round_trips(tmp_path, keyring, data_key) -> None:
    data = os.urandom(5 * SEG + 3)
    dek, wrapped = data_key
    encryptor = ObjectEncryptor(dek, wrapped, IDENTITY, segment_size=SEG)
    out, size = encrypt_to_temp_file(
        lambda sink: sink.write(data), encryptor, directory=tmp_path, prefix="c-"
    )
    with out:
        assert list(tmp_path.iterdir()) == []
        assert size == len(data) and decrypt_bytes(out.read(), IDENTITY, keyring) == data


_KILLED_MID_WRITE = """
import os, signal, sys
from enclave_common.crypto import LocalKeyring, ObjectEncryptor, ObjectIdentity, encrypt_to_temp_file
identity = ObjectIdentity("t", "s", "o")
dek, wrapped = LocalKeyring.generate("k").generate_data_key(identity.key_context())
def write(sink):
    sink.write(b"x" * (4 << 20))
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer or kubectl delete --force would
encrypt_to_temp_file(write, ObjectEncryptor(dek, wrapped, identity), directory=sys.argv[1], prefix="c-")
"""


def test_a_process_killed_while_writing_the_ciphertext_leaves_nothing_on_disk(tmp_path) -> None:
    """Ingest and deid write each object's ciphertext here before uploading it. A named file stayed
    behind when the process was killed mid-write, in a Kubernetes emptyDir that outlives the
    container: up to 768 MiB per kill, until the pod was evicted."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path)], check=False)
    assert done.returncode == -9
    assert list(tmp_path.iterdir()) == []
