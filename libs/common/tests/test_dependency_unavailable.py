"""A route that fails because a dependency did not answer (the database, the object store, Kafka)
answers 503 with ``Retry-After`` in the services' error shape, naming what did not answer; it never
answers a bare 500, and the exception's text (which may quote data) is neither sent nor logged. So
does a route that failed because the service's machine ran out of disk space or file handles
(``resource_exhausted``). Any other failure is still a 500."""

from __future__ import annotations

import errno
import io
import json
import os
from collections.abc import Iterator

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError, UnsupportedVersionError
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError
from enclave_common.errors import TransientError
from enclave_common.logging import configure_logging
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pymongo.errors import (
    AutoReconnect,
    ExecutionTimeout,
    NetworkTimeout,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
)

PLANTED = "PHI-MRN-66120-ZK"

FAILURES: dict[str, tuple[Exception, str]] = {
    "mongo-reconnect": (AutoReconnect(f"lost {PLANTED}"), "the database"),
    "mongo-timeout": (NetworkTimeout(f"timed out reading {PLANTED}"), "the database"),
    "mongo-selection": (ServerSelectionTimeoutError(f"no server for {PLANTED}"), "the database"),
    # The server stopped the operation at its time limit (maxTimeMS): until the twentieth session a 500.
    "mongo-time-limit": (ExecutionTimeout(f"operation exceeded time limit {PLANTED}", 50), "the database"),
    # A read under pymongo.timeout() that waited for a connection while the new ones hung on a silent
    # server: until the twenty-fourth session a 500 (CI's silent-database test).
    "mongo-pool-wait": (
        WaitQueueTimeoutError(f"Timed out while checking out a connection from connection pool {PLANTED}"),
        "the database",
    ),
    "s3": (EndpointConnectionError(endpoint_url=f"http://minio/{PLANTED}"), "the object store"),
    "kafka": (KafkaConnectionError(f"broker gone {PLANTED}"), "Kafka"),
    "kafka-client": (KafkaError(f"Unexpected error during batch delivery {PLANTED}"), "Kafka"),
    "s3-connect": (ConnectTimeoutError(endpoint_url=f"http://minio/{PLANTED}"), "the object store"),
    # No S3 credentials configured: a setup problem like refused ones, never the event's fault.
    "s3-no-credentials": (NoCredentialsError(), "the object store"),
    "timeout": (TimeoutError(PLANTED), "a dependency"),
}


@pytest.fixture
def logs() -> io.StringIO:
    out = io.StringIO()
    configure_logging("test", "INFO", stream=out)
    return out


@pytest.fixture
def client() -> Iterator[TestClient]:
    router = APIRouter()

    @router.get("/fails/{name}")
    async def fails(name: str) -> dict[str, str]:
        raise FAILURES[name][0]

    @router.get("/ours")
    async def ours() -> dict[str, str]:
        raise TransientError("the key store is unavailable", code="key_store_unavailable")

    @router.get("/kafka-refused")
    async def kafka_refused() -> dict[str, str]:
        raise UnsupportedVersionError(PLANTED)  # a Kafka error that retrying cannot help

    @router.get("/disk/{name}")
    async def disk(name: str) -> dict[str, str]:
        number = getattr(errno, name)
        raise OSError(number, os.strerror(number), f"/spool/{PLANTED}.tmp")

    @router.get("/bug")
    async def bug() -> dict[str, str]:
        raise ValueError(PLANTED)

    runtime = ServiceRuntime(BaseServiceSettings(service_name="dependency-test"))
    app = runtime.http_app(title="t", routers=[router], start_runtime=False)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_a_dependency_that_did_not_answer_is_a_503_naming_it(
    client: TestClient, logs: io.StringIO, name: str
) -> None:
    answer = client.get(f"/fails/{name}")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "10"
    detail = answer.json()["detail"]
    assert detail["code"] == "dependency_unavailable"
    assert detail["message"] == (
        f"{FAILURES[name][1]} did not answer, so the request could not be completed; retry later"
    )
    assert PLANTED not in answer.text
    records = [json.loads(line) for line in logs.getvalue().splitlines()]
    refused = [r for r in records if r["event"] == "request refused: a dependency is unavailable"]
    assert len(refused) == 1
    assert refused[0]["dependency"] == FAILURES[name][1]
    assert refused[0]["route"] == "/fails/{name}"
    assert refused[0]["error_type"] == type(FAILURES[name][0]).__name__
    assert PLANTED not in logs.getvalue()


def test_enclaves_own_transient_error_keeps_its_code_and_says_to_retry(client: TestClient) -> None:
    answer = client.get("/ours")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "10"
    assert answer.json()["detail"]["code"] == "key_store_unavailable"


def test_a_kafka_error_retrying_cannot_help_and_any_other_failure_stay_500(client: TestClient) -> None:
    for path in ("/kafka-refused", "/bug"):
        answer = client.get(path)
        assert answer.status_code == 500, path
        assert PLANTED not in answer.text


@pytest.mark.parametrize(
    ("name", "resource"),
    [("ENOSPC", "local disk space"), ("EDQUOT", "local disk quota"), ("EMFILE", "open files")],
)
def test_a_machine_out_of_disk_or_files_is_a_503_naming_what_ran_out(
    client: TestClient, logs: io.StringIO, name: str, resource: str
) -> None:
    answer = client.get(f"/disk/{name}")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "10"
    assert answer.json()["detail"] == {
        "code": "resource_exhausted",
        "message": f"the service ran out of {resource}, so the request could not be completed; retry later",
    }
    assert PLANTED not in answer.text
    records = [json.loads(line) for line in logs.getvalue().splitlines()]
    refused = [r for r in records if r["event"] == "request refused: the service ran out of a resource"]
    assert len(refused) == 1
    assert refused[0]["level"] == "error"
    assert (refused[0]["resource"], refused[0]["error_errno"]) == (resource, name)
    assert PLANTED not in logs.getvalue()


def test_any_other_failed_system_call_stays_a_500(client: TestClient, logs: io.StringIO) -> None:
    answer = client.get("/disk/EIO")
    assert answer.status_code == 500
    assert PLANTED not in answer.text
    assert PLANTED not in logs.getvalue()
