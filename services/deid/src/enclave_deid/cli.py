"""Operator commands of the deid service (same settings as the service, ``ENCLAVE_DEID_*``).

``enclave-deid-linkage``: the audited break-glass read of a patient's linkage.
``enclave-deid-keys rotate``: a new version of the deid keyring, then every DEK wrapped under the deid KEK
re-wrapped (de-identified objects' header key slots, linkage records when they share the KEK).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
from collections.abc import AsyncIterator, Sequence
from typing import IO, Any

from enclave_common import topics
from enclave_common.crypto import LocalKeyring, rewrap_object_header
from enclave_common.crypto.streaming import read_up_to
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.errors import EnclaveError
from enclave_common.events import KeyEvent
from enclave_common.kafka import EventPublisher, create_broker
from enclave_common.mongo import mongo_client, paged
from enclave_common.operator_actions import ALL_TENANTS
from enclave_common.storage import S3ObjectStore

from enclave_deid.break_glass import read_linkage
from enclave_deid.config import DeidSettings
from enclave_deid.linkage import LinkageVault, rewrap_linkage
from enclave_deid.main import load_keys
from enclave_deid.pipeline import deid_object_identity
from enclave_deid.records import DeidRecords


class _Clients:
    """Kafka producer and the deid database, for one command."""

    def __init__(self, settings: DeidSettings) -> None:
        self.broker = create_broker(settings)
        self.publisher = EventPublisher(self.broker)
        self.mongo = mongo_client(settings)
        self.db = self.mongo[settings.mongo_database]

    async def __aenter__(self) -> _Clients:
        await self.broker.connect()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.broker.stop()
        await self.mongo.close()


async def _linkage(args: argparse.Namespace, settings: DeidSettings) -> int:
    keys = load_keys(settings)
    async with _Clients(settings) as clients:
        disclosure = await read_linkage(
            vault=LinkageVault(clients.db, keys.linkage),
            publisher=clients.publisher,
            tenant=args.tenant,
            patient_pseudonym=args.pseudonym,
            actor=args.actor,
            justification=args.justification,
            roles=tuple(args.role),
        )
    json.dump(
        {
            "session_id": disclosure.session_id,
            "tenant": disclosure.tenant,
            "patient_pseudonym": disclosure.patient_pseudonym,
            "records": disclosure.records,
        },
        sys.stdout,
        indent=2,
    )
    sys.stdout.write("\n")
    return 0 if disclosure.records else 3


def linkage_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-deid-linkage",
        description="Break-glass: decrypt a patient's linkage. Records an access event and raises a security "
        "alert before anything is shown. Output is PHI.",
    )
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--pseudonym", required=True, help="the patient pseudonym of the de-identified data")
    parser.add_argument("--actor", required=True, help="who reads (e.g. user:dr-smith)")
    parser.add_argument("--justification", required=True, help="why (10-500 characters; not the patient)")
    parser.add_argument(
        "--role", action="append", default=[], help="the actor's role(s), for the audit trail"
    )
    args = parser.parse_args(argv)
    return _run(_linkage(args, DeidSettings()))


#: Enough of an object's start to hold its header (``rewrap_object_header``).
HEADER_PREFIX_BYTES = 4096


class _Prepended(io.RawIOBase):
    """``head`` then the rest of ``body``, read as one stream: a re-wrapped object is written as it
    is read (multipart above 8 MiB), never held whole. (Before the eleventh session rotation read
    each object whole into memory.)"""

    def __init__(self, head: bytes, body: IO[bytes]) -> None:
        self._head = memoryview(head)
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


async def _rotate(settings: DeidSettings, actor: str) -> int:
    if settings.keyring_file is None:
        print(
            "rotate needs ENCLAVE_DEID_KEYRING_FILE (with KMS, rotation is KMS's own key rotation)",
            file=sys.stderr,
        )
        return 2
    keyring = LocalKeyring.load(settings.keyring_file)
    version = keyring.rotate()
    keyring.save(settings.keyring_file)
    rewrapped = 0
    async with _Clients(settings) as clients:
        try:
            async for _ in _rewrap_all(settings, clients, keyring):
                rewrapped += 1
        finally:
            # Published even when the walk stopped part-way (the new version exists, and so many
            # keys were re-wrapped under it); running the command again re-wraps everything.
            event = KeyEvent(
                operation="rotated", key_id=keyring.key_id, key_version=version, rewrapped=rewrapped
            )
            envelope = Envelope.for_topic(
                topics.KEY_ROTATED,
                event,
                source="deid",
                tenant=ALL_TENANTS,
                actor=actor,
                correlation_id=new_event_id(),
            )
            await clients.publisher.publish(topics.KEY_ROTATED, envelope, key=keyring.key_id)
    print(json.dumps({"key_id": keyring.key_id, "version": version, "rewrapped": rewrapped}))
    return 0


async def _rewrap_all(
    settings: DeidSettings, clients: _Clients, keyring: LocalKeyring
) -> AsyncIterator[None]:
    """Every released object's key slot, then the linkage keys that share the KEK, re-wrapped under
    the keyring's current version; yields once for each, as it is done."""
    store = S3ObjectStore(settings)
    records = DeidRecords(clients.db)
    async for doc in records.released_objects():
        ref = doc["object"]
        identity = deid_object_identity(doc["tenant"], doc["study_key"], ref["key"])
        body = await store.open(ref["bucket"], ref["key"], ref.get("version_id"))
        try:
            prefix = await asyncio.to_thread(read_up_to, body, HEADER_PREFIX_BYTES)
            new_header = rewrap_object_header(prefix, keyring, identity)
            rewritten = _Prepended(new_header.header + prefix[new_header.replaced_length :], body)
            put = await store.put(ref["bucket"], ref["key"], io.BufferedReader(rewritten))
        finally:
            body.close()
        await records.collection.update_one(
            {"_id": doc["_id"]}, {"$set": {"object.version_id": put.version_id}}
        )
        yield
    if settings.linkage_keyring_file is None and not settings.linkage_kms_key_id:
        vault = LinkageVault(clients.db, keyring)
        async for doc in paged(vault.collection, {}):
            new_wrapped = rewrap_linkage(keyring, doc)
            if new_wrapped is not None:
                await vault.collection.update_one({"_id": doc["_id"]}, {"$set": {"wrapped_key": new_wrapped}})
                yield


def keys_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-deid-keys", description="Key operations of the deid key domain."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parser.add_argument(
        "--actor",
        required=True,
        help="who runs the operation (e.g. user:sre-jane), recorded in the audit trail",
    )
    sub.add_parser(
        "rotate",
        help="new deid keyring version; re-wrap every DEK under it (deid and analysis follow the keyring file)",
    )
    args = parser.parse_args(argv)
    return _run(_rotate(DeidSettings(), args.actor))


def _run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except EnclaveError as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        return 2
