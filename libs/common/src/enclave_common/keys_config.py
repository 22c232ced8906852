"""Building a KEK provider from settings: a local keyring file (dev/tests) or AWS KMS (production)."""

from __future__ import annotations

from pathlib import Path

from enclave_common.crypto import AwsKmsProvider, KeyEncryptionKeyProvider, LocalKeyring
from enclave_common.errors import ConfigurationError
from enclave_common.settings import BaseServiceSettings


def kek_provider(
    settings: BaseServiceSettings, keyring_file: Path | None, kms_key_id: str | None
) -> KeyEncryptionKeyProvider:
    if kms_key_id:
        import boto3

        return AwsKmsProvider(boto3.client("kms", region_name=settings.s3_region), kms_key_id)
    if keyring_file is not None:
        return LocalKeyring.load(keyring_file)
    raise ConfigurationError("no key-encryption key configured: set a keyring file or a KMS key id")
