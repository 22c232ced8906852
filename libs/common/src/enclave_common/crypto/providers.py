"""The KEK provider interface every key backend implements (local keyring, AWS KMS)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from enclave_common.crypto.wrapped_key import KeyContext, WrappedKey

DATA_KEY_BYTES = 32
"""Every DEK is an AES-256 key."""


@runtime_checkable
class KeyEncryptionKeyProvider(Protocol):
    """Generates, unwraps and re-wraps data keys under a key-encryption key (KEK).

    ``context`` is bound to every wrap (AAD for the local keyring, EncryptionContext for KMS):
    a wrapped key only unwraps with the exact context it was generated with.
    """

    @property
    def current_key_id(self) -> str:
        """The KEK id new data keys are wrapped with (the local keyring appends ``#v<version>``)."""
        ...

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, WrappedKey]:
        """Return a fresh 32-byte DEK and that DEK wrapped under the current KEK."""
        ...

    def unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        """Return the plaintext DEK, or raise KeyNotFoundError / KeyRetiredError / KeyUnwrapError."""
        ...

    def rewrap(self, wrapped: WrappedKey, context: KeyContext) -> WrappedKey:
        """Re-wrap a DEK under the current KEK version; the DEK itself is unchanged."""
        ...
