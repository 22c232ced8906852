"""Integration tests run against the real local stack started by `make up` / scripts/with-stack.sh.

Endpoints come from the same environment variables the services read (defaults = the local stack).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import boto3
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from botocore.config import Config
from pymongo import AsyncMongoClient

KAFKA = os.environ.get("ENCLAVE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
MONGO_URL = os.environ.get("ENCLAVE_MONGO_URL", "mongodb://127.0.0.1:27018/")
S3_ENDPOINT = os.environ.get("ENCLAVE_S3_ENDPOINT_URL", "http://127.0.0.1:19000")
S3_KEY = os.environ.get("ENCLAVE_S3_ACCESS_KEY_ID", "enclave-dev")
S3_SECRET = os.environ.get("ENCLAVE_S3_SECRET_ACCESS_KEY", "enclave-dev-secret")
SERVICE_PORTS = {"gateway": 8080, "ingest": 8081, "deid": 8082, "analysis": 8083, "audit": 8084}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)
    # The dead-letter check reads what every other test caused: it runs last.
    items.sort(key=lambda item: item.path.name == "test_dead_letters.py")


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def s3():
    return boto3.client(
        "s3",
        endpoint_url=S3_ENDPOINT,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
    )


@pytest.fixture
async def mongo():
    client: AsyncMongoClient = AsyncMongoClient(MONGO_URL, tz_aware=True, serverSelectionTimeoutMS=5000)
    yield client
    await client.close()


@pytest.fixture(scope="session", autouse=True)
def dead_letter_offsets() -> dict[TopicPartition, int]:
    """Where every dead-letter topic ended when the session's first test started (read by
    ``test_dead_letters.py``, which runs last)."""

    async def read() -> dict[TopicPartition, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public way
            partitions = [
                TopicPartition(topic, partition)
                for topic in await consumer.topics()
                if topic.endswith(".dlq")
                for partition in consumer.partitions_for_topic(topic) or ()
            ]
            return dict(await consumer.end_offsets(partitions)) if partitions else {}
        finally:
            await consumer.stop()

    return asyncio.run(read())
