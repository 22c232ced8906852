"""AWS KMS as the KEK provider: KMS generates, decrypts and re-encrypts data keys.

The boto3 KMS client is injected (built by the service's ``create_app``), so this module does not
import boto3 and unit tests pass a botocore ``Stubber``-backed client.  The key context becomes the
KMS ``EncryptionContext``, which KMS binds to the ciphertext and writes to CloudTrail.
"""

from __future__ import annotations

from typing import Any, Protocol

from enclave_common.crypto.errors import KeyNotFoundError, KeyUnwrapError
from enclave_common.crypto.providers import DATA_KEY_BYTES
from enclave_common.crypto.wrapped_key import KeyContext, WrappedKey

KMS_PROVIDER = "aws-kms"


class KmsClient(Protocol):
    """The three boto3 KMS client methods this provider calls."""

    def generate_data_key(self, **kwargs: Any) -> dict[str, Any]: ...

    def decrypt(self, **kwargs: Any) -> dict[str, Any]: ...

    def re_encrypt(self, **kwargs: Any) -> dict[str, Any]: ...


def _is_client_error(exc: Exception, *codes: str) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    return response.get("Error", {}).get("Code") in codes


class AwsKmsProvider:
    """``KeyEncryptionKeyProvider`` backed by one KMS symmetric key (id, ARN or alias).

    KMS rotates backing key material under the same key id, so ``WrappedKey.key_version`` is 0;
    ``rewrap`` moves a DEK to whatever key ``key_id`` names now (e.g. after re-pointing an alias).
    Throttling and network errors from botocore propagate unchanged (transient, retry them);
    authentication failures become ``KeyUnwrapError`` (permanent).
    """

    def __init__(self, client: KmsClient, key_id: str) -> None:
        if not key_id:
            raise ValueError("AwsKmsProvider needs a KMS key id, key ARN or alias (alias/...)")
        self._client = client
        self._key_id = key_id

    @property
    def current_key_id(self) -> str:
        return self._key_id

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, WrappedKey]:
        response = self._client.generate_data_key(
            KeyId=self._key_id, KeySpec="AES_256", EncryptionContext=dict(context)
        )
        plaintext = bytes(response["Plaintext"])
        if len(plaintext) != DATA_KEY_BYTES:
            raise KeyUnwrapError(f"KMS returned a {len(plaintext)}-byte data key; expected 32")
        return plaintext, self._wrapped(response)

    def unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        self._check_provider(wrapped)
        try:
            response = self._client.decrypt(
                CiphertextBlob=wrapped.ciphertext, KeyId=wrapped.key_id, EncryptionContext=dict(context)
            )
        except Exception as exc:
            if _is_client_error(exc, "InvalidCiphertextException", "IncorrectKeyException"):
                raise KeyUnwrapError(
                    f"KMS rejected the wrapped key for {wrapped.key_id!r}: wrong key context or tampered "
                    "ciphertext"
                ) from exc
            if _is_client_error(exc, "NotFoundException", "KMSInvalidStateException", "DisabledException"):
                raise KeyNotFoundError(
                    f"KMS key {wrapped.key_id!r} is missing, disabled or pending deletion"
                ) from exc
            raise
        plaintext = bytes(response["Plaintext"])
        if len(plaintext) != DATA_KEY_BYTES:
            raise KeyUnwrapError(f"KMS returned a {len(plaintext)}-byte data key; expected 32")
        return plaintext

    def rewrap(self, wrapped: WrappedKey, context: KeyContext) -> WrappedKey:
        self._check_provider(wrapped)
        try:
            response = self._client.re_encrypt(
                CiphertextBlob=wrapped.ciphertext,
                SourceKeyId=wrapped.key_id,
                SourceEncryptionContext=dict(context),
                DestinationKeyId=self._key_id,
                DestinationEncryptionContext=dict(context),
            )
        except Exception as exc:
            if _is_client_error(exc, "InvalidCiphertextException", "IncorrectKeyException"):
                raise KeyUnwrapError(
                    f"KMS rejected the wrapped key for {wrapped.key_id!r}: wrong key context or tampered "
                    "ciphertext"
                ) from exc
            raise
        return self._wrapped(response)

    @staticmethod
    def _wrapped(response: dict[str, Any]) -> WrappedKey:
        return WrappedKey(
            provider=KMS_PROVIDER,
            key_id=str(response["KeyId"]),
            key_version=0,
            ciphertext=bytes(response["CiphertextBlob"]),
        )

    @staticmethod
    def _check_provider(wrapped: WrappedKey) -> None:
        if wrapped.provider != KMS_PROVIDER:
            raise KeyNotFoundError(
                f"wrapped key was made by provider {wrapped.provider!r}; this provider is {KMS_PROVIDER!r}"
            )
