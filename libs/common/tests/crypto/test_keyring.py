"""Local keyring: env loading, file format, atomic save, rotation, retirement, re-wrap of headers."""

from __future__ import annotations

import base64
import os
import stat

import pytest
from enclave_common.crypto import (
    KeyFormatError,
    KeyNotFoundError,
    KeyRetiredError,
    KeyUnwrapError,
    LocalKeyring,
    ObjectHeader,
    ObjectIdentity,
    WrappedKey,
    decrypt_bytes,
    encrypt_bytes,
    rewrap_object_header,
)

CONTEXT = {"tenant": "tenant-a", "study_key": "study-1"}


def test_generate_unwrap_and_context_binding() -> None:
    keyring = LocalKeyring.generate("kek")
    dek, wrapped = keyring.generate_data_key(CONTEXT)
    assert len(dek) == 32
    assert (wrapped.provider, wrapped.key_id, wrapped.key_version) == ("local", "kek", 1)
    assert dek not in wrapped.ciphertext
    assert keyring.unwrap(wrapped, CONTEXT) == dek
    with pytest.raises(KeyUnwrapError):
        keyring.unwrap(wrapped, {"tenant": "tenant-a", "study_key": "study-2"})
    assert keyring.current_key_id == "kek#v1"


def test_env_value_is_strict_base64_of_32_bytes() -> None:
    key = os.urandom(32)
    for text in (base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode().rstrip("=")):
        keyring = LocalKeyring.from_env_value(f"  {text}\n")
        assert keyring.versions == {1: key}
    secret_like = base64.b64encode(b"0123456789abcdef").decode()
    with pytest.raises(KeyFormatError, match="16 bytes") as info:
        LocalKeyring.from_env_value(secret_like)
    assert secret_like not in str(info.value)
    with pytest.raises(KeyFormatError, match="not valid base64"):
        LocalKeyring.from_env_value("not base64 at all!")
    with pytest.raises(KeyFormatError):
        LocalKeyring.from_env_value("correct horse battery staple is not a key")


def test_save_is_atomic_mode_0600_and_round_trips(tmp_path) -> None:
    keyring = LocalKeyring.generate("kek")
    keyring.rotate()
    keyring.retire(1)
    path = tmp_path / "keyring.json"
    path.write_text("old contents")
    keyring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.json"]  # no temp file left behind
    loaded = LocalKeyring.load(path)
    assert loaded.versions == keyring.versions
    assert (loaded.current_version, loaded.retired, loaded.key_id) == (2, {1}, "kek")


def test_bad_keyring_files_are_rejected(tmp_path) -> None:
    with pytest.raises(KeyFormatError, match="JSON"):
        LocalKeyring.from_json("{")
    with pytest.raises(KeyFormatError, match="format"):
        LocalKeyring.from_json('{"format": "other"}')
    with pytest.raises(KeyFormatError, match="current KEK version"):
        LocalKeyring.from_json(
            '{"format": "enclave.keyring.v1", "key_id": "k", "current_version": 2,'
            f' "versions": {{"1": {{"key": "{base64.b64encode(bytes(32)).decode()}"}}}}}}'
        )


def test_repr_never_shows_key_material() -> None:
    keyring = LocalKeyring.generate("kek")
    kek = keyring.versions[1]
    assert base64.b64encode(kek).decode() not in repr(keyring)
    assert repr(kek) not in repr(keyring)


def test_rotation_rewrap_and_retirement() -> None:
    keyring = LocalKeyring.generate("kek")
    dek, old = keyring.generate_data_key(CONTEXT)
    assert keyring.rotate() == 2
    _, new_key = keyring.generate_data_key(CONTEXT)
    assert new_key.key_version == 2
    rewrapped = keyring.rewrap(old, CONTEXT)
    assert rewrapped.key_version == 2
    assert keyring.unwrap(rewrapped, CONTEXT) == dek
    assert keyring.rewrap(rewrapped, CONTEXT) is rewrapped
    with pytest.raises(KeyFormatError, match="current"):
        keyring.retire(2)
    keyring.retire(1)
    with pytest.raises(KeyRetiredError, match="retired"):
        keyring.unwrap(old, CONTEXT)
    with pytest.raises(KeyNotFoundError):
        keyring.retire(1)
    assert keyring.rotate() == 3  # retired version numbers are never reused
    assert keyring.unwrap(rewrapped, CONTEXT) == dek


def test_wrapped_key_relabelled_to_other_version_fails() -> None:
    keyring = LocalKeyring.generate("kek")
    keyring.rotate()
    _, wrapped = keyring.generate_data_key(CONTEXT)
    relabelled = WrappedKey(wrapped.provider, wrapped.key_id, 1, wrapped.ciphertext)
    with pytest.raises(KeyUnwrapError):
        keyring.unwrap(relabelled, CONTEXT)


def test_unknown_provider_key_id_and_version() -> None:
    keyring = LocalKeyring.generate("kek")
    _, wrapped = keyring.generate_data_key(CONTEXT)
    for bad in (
        WrappedKey("aws-kms", "kek", 1, wrapped.ciphertext),
        WrappedKey("local", "other", 1, wrapped.ciphertext),
        WrappedKey("local", "kek", 7, wrapped.ciphertext),
    ):
        with pytest.raises(KeyNotFoundError):
            keyring.unwrap(bad, CONTEXT)


def test_wrapped_key_encodings_round_trip() -> None:
    wrapped = WrappedKey("aws-kms", "arn:aws:kms:eu-west-1:1:key/é", 0, os.urandom(184))
    assert WrappedKey.from_bytes(wrapped.to_bytes()) == wrapped
    assert WrappedKey.from_json_dict(wrapped.to_json_dict()) == wrapped
    with pytest.raises(KeyFormatError):
        WrappedKey.from_bytes(wrapped.to_bytes() + b"\x00")
    with pytest.raises(KeyFormatError):
        WrappedKey.from_bytes(wrapped.to_bytes()[:-1])
    with pytest.raises(KeyFormatError):
        WrappedKey.from_json_dict({**wrapped.to_json_dict(), "ciphertext": "***"})


def test_rotation_rewraps_object_header_without_touching_segments() -> None:
    keyring = LocalKeyring.generate("kek")
    identity = ObjectIdentity("tenant-a", "study-1", "object-1")
    dek, wrapped = keyring.generate_data_key(identity.key_context())
    data = os.urandom(500)
    blob = encrypt_bytes(data, dek, wrapped, identity, segment_size=64)
    keyring.rotate()
    result = rewrap_object_header(blob[:300], keyring, identity)
    assert result.wrapped_key.key_version == 2
    rotated = result.header + blob[result.replaced_length :]
    assert rotated[len(result.header) :] == blob[result.replaced_length :]
    keyring.retire(1)
    assert decrypt_bytes(rotated, identity, keyring) == data
    with pytest.raises(KeyRetiredError):
        decrypt_bytes(blob, identity, keyring)
    header, _ = ObjectHeader.from_bytes(rotated)
    assert header.wrapped_key.key_version == 2
