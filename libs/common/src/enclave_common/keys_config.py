"""Building a KEK provider from settings: a local keyring file (dev/tests) or AWS KMS (production)."""

from __future__ import annotations

import os
from pathlib import Path

from enclave_common.crypto import (
    AwsKmsProvider,
    KeyContext,
    KeyEncryptionKeyProvider,
    LocalKeyring,
    WrappedKey,
)
from enclave_common.errors import ConfigurationError
from enclave_common.settings import BaseServiceSettings


class FileKeyring:
    """A LocalKeyring that follows its file: after ``enclave-ingest-keys rotate`` (another process)
    a running service wraps with the new version and can unwrap records re-wrapped under it, and a
    retired version stops working everywhere, without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns = -1
        self._keyring: LocalKeyring | None = None

    @property
    def keyring(self) -> LocalKeyring:
        mtime = os.stat(self.path).st_mtime_ns
        if self._keyring is None or mtime != self._mtime_ns:
            self._keyring = LocalKeyring.load(self.path)
            self._mtime_ns = mtime
        return self._keyring

    @property
    def current_key_id(self) -> str:
        return self.keyring.current_key_id

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, WrappedKey]:
        return self.keyring.generate_data_key(context)

    def unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        return self.keyring.unwrap(wrapped, context)

    def rewrap(self, wrapped: WrappedKey, context: KeyContext) -> WrappedKey:
        return self.keyring.rewrap(wrapped, context)


def kek_provider(
    settings: BaseServiceSettings, keyring_file: Path | None, kms_key_id: str | None
) -> KeyEncryptionKeyProvider:
    if kms_key_id:
        import boto3

        return AwsKmsProvider(boto3.client("kms", region_name=settings.s3_region), kms_key_id)
    if keyring_file is not None:
        provider = FileKeyring(keyring_file)
        _ = provider.keyring  # fail at startup, not at the first message, if the file is unusable
        return provider
    prefix = settings.model_config.get("env_prefix") or "ENCLAVE_"
    raise ConfigurationError(
        f"no key-encryption key configured: set {prefix}KEYRING_FILE (a keyring file) or "
        f"{prefix}KMS_KEY_ID (a KMS key id)"
    )
