"""Object storage behind a small Protocol; the S3 implementation uses boto3 (in worker threads).

Objects are always written already encrypted by Enclave (see crypto/); the bucket's default
server-side encryption is a second layer. Keys are opaque and never derived from DICOM values.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from enclave_common.errors import ConfigurationError, PermanentError, TransientError
from enclave_common.settings import BaseServiceSettings

#: S3 error codes that mean "try again later". Besides the store being busy or starting, the service's
#: own credentials being refused (rotated, revoked or expired): that is fixed outside the event, never a
#: reason to dead-letter it, and the service's readiness says so meanwhile. ``AccessDenied`` is not
#: here: Object Lock's refusal to overwrite or delete a retained version is also ``AccessDenied``, and
#: that stays permanent.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "XMinioServerNotInitialized",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "TokenRefreshRequired",
    }
)


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    version_id: str | None
    size: int | None = None


class ObjectStore(Protocol):
    async def ensure_bucket(self, bucket: str, *, object_lock: bool = False) -> None: ...

    async def put(
        self, bucket: str, key: str, body: IO[bytes], *, metadata: dict[str, str] | None = None
    ) -> StoredObject: ...

    async def put_locked(
        self, bucket: str, key: str, data: bytes, *, retain_until: dt.datetime
    ) -> StoredObject: ...

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> IO[bytes]: ...

    async def delete_all_versions(self, bucket: str, key: str) -> int: ...

    async def list_versions(
        self, bucket: str, prefix: str, *, after: str = "", until: str | None = None
    ) -> list[tuple[str, str]]: ...

    async def ping(self, bucket: str) -> None: ...


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def s3_error(exc: ClientError, action: str) -> PermanentError | TransientError:
    """Classify a botocore ClientError; the message names the action and S3's code only."""
    code = _code(exc)
    if code in _TRANSIENT_CODES or _status(exc) >= 500:
        return TransientError(f"object store {action} failed ({code})")
    return PermanentError(f"object store {action} failed ({code})", code=f"s3_{code}")


class S3ObjectStore:
    """boto3-backed store; every call runs in a worker thread so the event loop never blocks."""

    def __init__(self, settings: BaseServiceSettings) -> None:
        self._create = settings.s3_create_buckets
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id.get_secret_value()
            if settings.s3_access_key_id
            else None,
            aws_secret_access_key=(
                settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
            ),
            verify=settings.s3_ca_bundle,  # None: the system's trust store
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=16,
                s3={"addressing_style": "path"},
            ),
        )

    async def _call(self, action: str, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ClientError as exc:
            raise s3_error(exc, action) from exc

    async def ping(self, bucket: str) -> None:
        """Readiness: the store answers for ``bucket`` (HeadBucket, the service's own ``s3:ListBucket``).
        Until the nineteenth session it listed every bucket, which needed ``s3:ListAllMyBuckets`` and
        showed each service the names of all the buckets of the account."""
        await self._call("head bucket", self._client.head_bucket, Bucket=bucket)

    async def ensure_bucket(self, bucket: str, *, object_lock: bool = False) -> None:
        """Make sure ``bucket`` exists with versioning, default server-side encryption and (with
        ``object_lock``) Object Lock. With ``s3_create_buckets`` what is missing is created or turned
        on; without, nothing is written and what is missing is a :class:`ConfigurationError`. An
        existing encryption configuration is kept whatever its algorithm."""
        client = self._client
        problems: list[str] = []
        try:
            await asyncio.to_thread(client.head_bucket, Bucket=bucket)
        except ClientError as exc:
            if _status(exc) != 404:
                raise s3_error(exc, "head bucket") from exc
            if not self._create:
                raise ConfigurationError(
                    f"bucket {bucket} does not exist: create it (versioning on, default encryption"
                    f"{', Object Lock' if object_lock else ''}) or set ENCLAVE_S3_CREATE_BUCKETS=true"
                ) from None
            await self._create_bucket(bucket, object_lock)
        versioning = await self._call("get versioning", client.get_bucket_versioning, Bucket=bucket)
        if versioning.get("Status") != "Enabled":
            if self._create:
                await self._call(
                    "enable versioning",
                    client.put_bucket_versioning,
                    Bucket=bucket,
                    VersioningConfiguration={"Status": "Enabled"},
                )
            else:
                problems.append("versioning is not enabled")
        if not await self._has_default_encryption(bucket):
            if self._create:
                await self._call(
                    "enable default encryption",
                    client.put_bucket_encryption,
                    Bucket=bucket,
                    ServerSideEncryptionConfiguration={
                        "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                    },
                )
            else:
                problems.append("it has no default server-side encryption")
        if object_lock and not await self._has_object_lock(bucket):
            problems.append("Object Lock is not enabled (it can only be enabled when a bucket is created)")
        if problems:
            raise ConfigurationError(f"bucket {bucket}: {'; '.join(problems)}")

    async def _create_bucket(self, bucket: str, object_lock: bool) -> None:
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if object_lock:
            kwargs["ObjectLockEnabledForBucket"] = True
        try:
            await asyncio.to_thread(self._client.create_bucket, **kwargs)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise s3_error(exc, "create bucket") from exc

    async def _has_default_encryption(self, bucket: str) -> bool:
        found = await self._configuration(
            "get default encryption",
            self._client.get_bucket_encryption,
            bucket,
            "ServerSideEncryptionConfigurationNotFoundError",
        )
        return bool(found.get("ServerSideEncryptionConfiguration", {}).get("Rules"))

    async def _has_object_lock(self, bucket: str) -> bool:
        found = await self._configuration(
            "get object lock configuration",
            self._client.get_object_lock_configuration,
            bucket,
            "ObjectLockConfigurationNotFoundError",
        )
        return bool(found.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    async def _configuration(self, action: str, fn: Any, bucket: str, absent_code: str) -> dict[str, Any]:
        """A bucket configuration, or ``{}`` when S3 answers ``absent_code`` (none is set)."""
        try:
            return dict(await asyncio.to_thread(fn, Bucket=bucket))
        except ClientError as exc:
            if _code(exc) == absent_code:
                return {}
            raise s3_error(exc, action) from exc

    async def put(
        self, bucket: str, key: str, body: IO[bytes], *, metadata: dict[str, str] | None = None
    ) -> StoredObject:
        """Stream a file-like body (multipart upload above 8 MiB: memory stays bounded)."""
        extra = {"Metadata": metadata} if metadata else {}

        def upload() -> StoredObject:
            self._client.upload_fileobj(body, bucket, key, ExtraArgs=extra or None)
            head = self._client.head_object(Bucket=bucket, Key=key)
            return StoredObject(bucket, key, head.get("VersionId"), head.get("ContentLength"))

        return await self._call("put", upload)  # type: ignore[no-any-return]

    async def put_locked(
        self, bucket: str, key: str, data: bytes, *, retain_until: dt.datetime
    ) -> StoredObject:
        """Write once into an object-lock bucket in COMPLIANCE mode until ``retain_until``."""
        response = await self._call(
            "put locked",
            self._client.put_object,
            Bucket=bucket,
            Key=key,
            Body=data,
            ObjectLockMode="COMPLIANCE",
            ObjectLockRetainUntilDate=retain_until,
        )
        return StoredObject(bucket, key, response.get("VersionId"), len(data))

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> IO[bytes]:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        response = await self._call("get", self._client.get_object, **kwargs)
        return response["Body"]  # type: ignore[no-any-return]

    async def read(self, bucket: str, key: str, version_id: str | None = None) -> bytes:
        body = await self.open(bucket, key, version_id)
        return await asyncio.to_thread(body.read)

    async def exists(self, bucket: str, key: str) -> bool:
        try:
            await asyncio.to_thread(self._client.head_object, Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise s3_error(exc, "head") from exc

    async def delete_all_versions(self, bucket: str, key: str) -> int:
        """Delete every version and delete marker of ``key`` (exactly that key, not the keys it
        prefixes); the number deleted. A version the store refused to delete raises as in
        :meth:`delete_versions`: ``DeleteObjects`` answers 200 and only lists its refusals, and a
        crypto-shred or a redo must not report a deletion that did not happen."""

        def listed() -> list[tuple[str, str]]:
            return [
                (v["Key"], v["VersionId"])
                for page in self._version_pages(bucket, key)
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
                if v["Key"] == key
            ]

        versions: list[tuple[str, str]] = await self._call("list versions", listed)
        if versions:
            await self.delete_versions(bucket, versions)
        return len(versions)

    async def delete_versions(self, bucket: str, versions: list[tuple[str, str]]) -> None:
        """Delete these ``(key, version id)`` versions, ``DeleteObjects`` batches of 1,000. A version
        the store refused to delete makes it raise: ``TransientError`` for a code that says "later"
        (the store's transient codes, as for any call), ``PermanentError`` otherwise (``s3_<code>``)."""

        def delete() -> list[dict[str, Any]]:
            errors: list[dict[str, Any]] = []
            for start in range(0, len(versions), 1000):
                objects = [
                    {"Key": key, "VersionId": version} for key, version in versions[start : start + 1000]
                ]
                answer = self._client.delete_objects(
                    Bucket=bucket, Delete={"Objects": objects, "Quiet": True}
                )
                errors += answer.get("Errors", [])
            return errors

        errors = await self._call("delete versions", delete)
        if not errors:
            return
        code = str(errors[0].get("Code", "Unknown"))
        failed = f"object store delete versions failed for {len(errors)} of {len(versions)} versions ({code})"
        if any(str(e.get("Code")) in _TRANSIENT_CODES for e in errors):
            raise TransientError(f"{failed}; tried again", code=f"s3_{code}")
        raise PermanentError(failed, code=f"s3_{code}")

    async def list_versions(
        self, bucket: str, prefix: str, *, after: str = "", until: str | None = None
    ) -> list[tuple[str, str]]:
        """``(key, version id)`` of every stored version under ``prefix``, keys in order, each key's
        newest version first; only keys after ``after`` and up to ``until``. Delete markers are left
        out: a version hidden behind one is still there."""

        def versions() -> list[tuple[str, str]]:
            found: list[tuple[str, str]] = []
            for page in self._version_pages(bucket, prefix, after):
                for version in page.get("Versions", []):
                    if until is not None and version["Key"] > until:
                        return found
                    found.append((version["Key"], version["VersionId"]))
            return found

        return await self._call("list versions", versions)  # type: ignore[no-any-return]

    def _version_pages(self, bucket: str, prefix: str, after: str = "") -> Iterator[dict[str, Any]]:
        """The pages of ``ListObjectVersions`` under ``prefix`` (keys after ``after``), fetched as they
        are read (in the caller's worker thread)."""
        markers: dict[str, str] = {"KeyMarker": after} if after else {}
        while True:
            page: dict[str, Any] = self._client.list_object_versions(Bucket=bucket, Prefix=prefix, **markers)
            yield page
            if not page.get("IsTruncated"):
                return
            markers = {"KeyMarker": page["NextKeyMarker"], "VersionIdMarker": page["NextVersionIdMarker"]}

    def iter_keys(self, bucket: str, prefix: str = "") -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]
