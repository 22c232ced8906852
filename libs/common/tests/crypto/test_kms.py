"""AwsKmsProvider against a botocore Stubber (no network)."""

from __future__ import annotations

import os

import boto3
import pytest
from botocore.stub import Stubber
from enclave_common.crypto import (
    AwsKmsProvider,
    KeyNotFoundError,
    KeyUnwrapError,
    ObjectIdentity,
    WrappedKey,
    decrypt_bytes,
    encrypt_bytes,
)

KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
NEW_ARN = "arn:aws:kms:eu-west-1:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321"
CONTEXT = {"tenant": "tenant-a", "study_key": "study-1"}


@pytest.fixture
def kms():
    client = boto3.client(
        "kms", region_name="eu-west-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def test_generate_and_unwrap(kms) -> None:
    client, stubber = kms
    dek, blob = os.urandom(32), os.urandom(184)
    stubber.add_response(
        "generate_data_key",
        {"CiphertextBlob": blob, "Plaintext": dek, "KeyId": KEY_ARN},
        {"KeyId": "alias/enclave", "KeySpec": "AES_256", "EncryptionContext": CONTEXT},
    )
    stubber.add_response(
        "decrypt",
        {"Plaintext": dek, "KeyId": KEY_ARN},
        {"CiphertextBlob": blob, "KeyId": KEY_ARN, "EncryptionContext": CONTEXT},
    )
    provider = AwsKmsProvider(client, "alias/enclave")
    plaintext, wrapped = provider.generate_data_key(CONTEXT)
    assert plaintext == dek
    assert wrapped == WrappedKey("aws-kms", KEY_ARN, 0, blob)
    assert provider.unwrap(wrapped, CONTEXT) == dek
    assert provider.current_key_id == "alias/enclave"


def test_object_round_trip_through_kms(kms) -> None:
    client, stubber = kms
    identity = ObjectIdentity("tenant-a", "study-1", "object-1")
    dek, blob = os.urandom(32), os.urandom(184)
    stubber.add_response("generate_data_key", {"CiphertextBlob": blob, "Plaintext": dek, "KeyId": KEY_ARN})
    stubber.add_response(
        "decrypt",
        {"Plaintext": dek, "KeyId": KEY_ARN},
        {"CiphertextBlob": blob, "KeyId": KEY_ARN, "EncryptionContext": dict(identity.key_context())},
    )
    provider = AwsKmsProvider(client, KEY_ARN)
    key, wrapped = provider.generate_data_key(identity.key_context())
    sealed = encrypt_bytes(b"pixel data", key, wrapped, identity, segment_size=64)
    assert decrypt_bytes(sealed, identity, provider) == b"pixel data"


def test_rewrap_uses_re_encrypt_to_current_key(kms) -> None:
    client, stubber = kms
    old = WrappedKey("aws-kms", KEY_ARN, 0, os.urandom(184))
    new_blob = os.urandom(184)
    stubber.add_response(
        "re_encrypt",
        {"CiphertextBlob": new_blob, "KeyId": NEW_ARN, "SourceKeyId": KEY_ARN},
        {
            "CiphertextBlob": old.ciphertext,
            "SourceKeyId": KEY_ARN,
            "SourceEncryptionContext": CONTEXT,
            "DestinationKeyId": "alias/enclave",
            "DestinationEncryptionContext": CONTEXT,
        },
    )
    assert AwsKmsProvider(client, "alias/enclave").rewrap(old, CONTEXT) == WrappedKey(
        "aws-kms", NEW_ARN, 0, new_blob
    )


def test_kms_errors_are_mapped(kms) -> None:
    client, stubber = kms
    wrapped = WrappedKey("aws-kms", KEY_ARN, 0, os.urandom(184))
    stubber.add_client_error("decrypt", service_error_code="InvalidCiphertextException")
    stubber.add_client_error("decrypt", service_error_code="DisabledException")
    stubber.add_client_error("decrypt", service_error_code="ThrottlingException")
    provider = AwsKmsProvider(client, KEY_ARN)
    with pytest.raises(KeyUnwrapError):
        provider.unwrap(wrapped, CONTEXT)
    with pytest.raises(KeyNotFoundError):
        provider.unwrap(wrapped, CONTEXT)
    with pytest.raises(Exception, match="Throttling") as transient:
        provider.unwrap(wrapped, CONTEXT)
    assert not isinstance(transient.value, KeyUnwrapError | KeyNotFoundError)
    with pytest.raises(KeyNotFoundError, match="provider"):
        provider.unwrap(WrappedKey("local", "kek", 1, b"x" * 60), CONTEXT)
