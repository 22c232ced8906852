"""Which object-store errors are retried and which are final: a busy or starting store and refused
service credentials are transient (a consumer retries; it never dead-letters an instance because a
key was rotated), a refusal about the request itself is permanent. Messages name the action and S3's
code only."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from enclave_common.errors import PermanentError, TransientError
from enclave_common.storage import s3_error


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": "key originals/PHI-REF-11 ..."},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("SlowDown", 503),
        ("XMinioStorageFull", 507),
        ("InternalError", 500),
        ("InvalidAccessKeyId", 403),
        ("SignatureDoesNotMatch", 403),
        ("ExpiredToken", 400),
    ],
)
def test_a_busy_store_or_refused_service_credentials_are_retried(code: str, status: int) -> None:
    error = s3_error(_client_error(code, status), "put")
    assert isinstance(error, TransientError)
    assert str(error) == f"object store put failed ({code})"


@pytest.mark.parametrize(
    ("code", "status"), [("AccessDenied", 403), ("NoSuchKey", 404), ("InvalidRequest", 400)]
)
def test_a_refusal_of_the_request_itself_is_final(code: str, status: int) -> None:
    error = s3_error(_client_error(code, status), "put")
    assert isinstance(error, PermanentError)
    assert error.code == f"s3_{code}"
    assert "PHI-REF" not in str(error)
