"""``enclave-ingest-keys``: key rotation, retirement, crypto-shredding and the integrity scrub.

Every key operation publishes a ``key.*`` event (audited). Runs with the ingest service's settings
(the same environment), against the same Kafka, MongoDB and object store.

    enclave-ingest-keys --actor A rotate             new KEK version; every study key re-wrapped
    enclave-ingest-keys --actor A retire --version N destroy KEK version N (refused while in use)
    enclave-ingest-keys --actor A shred --tenant T --study-key S --reason "..."
    enclave-ingest-keys scrub [--tenant T]           verify every stored object (tags and SHA-256)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from enclave_common import topics
from enclave_common.crypto import (
    CryptoError,
    LocalKeyring,
    ObjectIdentity,
    decrypt_object,
    rewrap_study_key,
    scrub_object,
    study_key_id,
)
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.events import KeyEvent
from enclave_common.kafka import EventPublisher, create_broker
from enclave_common.keys_config import FileKeyring, kek_provider
from enclave_common.logging import configure_logging
from enclave_common.storage import S3ObjectStore
from enclave_common.study_key_objects import StudyKeyObjects

from enclave_ingest.catalogue import Catalogue
from enclave_ingest.config import IngestSettings

T = TypeVar("T")


class KeyAdmin:
    def __init__(self, settings: IngestSettings) -> None:
        from pymongo import AsyncMongoClient

        self.settings = settings
        self.mongo: Any = AsyncMongoClient(settings.mongo_url.get_secret_value(), tz_aware=True)
        self.catalogue = Catalogue(self.mongo[settings.mongo_database])
        self.store = S3ObjectStore(settings)
        self.kek = kek_provider(settings, settings.keyring_file, settings.kms_key_id)
        self.keys = StudyKeyObjects(self.store, settings.originals_bucket, self.kek)
        self.broker = create_broker(settings)
        self.publisher = EventPublisher(self.broker)

    async def __aenter__(self) -> KeyAdmin:
        await self.broker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.stop()
        await self.mongo.close()

    async def _event(self, event: KeyEvent, *, tenant: str, actor: str) -> None:
        topic = {
            "shredded": topics.KEY_SHREDDED,
            "rotated": topics.KEY_ROTATED,
            "retired": topics.KEY_ROTATED,
        }.get(event.operation, topics.KEY_CREATED)
        envelope = Envelope.for_topic(
            topic, event, source="ingest", tenant=tenant, actor=actor, correlation_id=new_event_id()
        )
        await self.publisher.publish(topic, envelope, key=event.key_id)

    def _local(self) -> LocalKeyring:
        if not isinstance(self.kek, FileKeyring):
            raise SystemExit("rotate/retire act on the local keyring file; AWS KMS rotates its keys itself")
        return self.kek.keyring

    async def rotate(self, actor: str) -> int:
        keyring = self._local()
        version = keyring.rotate()
        keyring.save(self.kek.path)  # type: ignore[attr-defined]
        count = 0
        async for record in self.catalogue.active_study_keys():
            rewrapped = rewrap_study_key(self.kek, record)
            await self.keys.save(rewrapped)
            await self.catalogue.replace_study_key(rewrapped)
            count += 1
        await self._event(
            KeyEvent(operation="rotated", key_id=keyring.key_id, key_version=version, rewrapped=count),
            tenant="*",
            actor=actor,
        )
        return count

    async def retire(self, version: int, actor: str) -> None:
        keyring = self._local()
        async for record in self.catalogue.active_study_keys():
            if record.wrapped.key_version == version:
                raise SystemExit(
                    f"KEK version {version} still wraps study keys; run `enclave-ingest-keys --actor A rotate` first"
                )
        keyring.retire(version)
        keyring.save(self.kek.path)  # type: ignore[attr-defined]
        await self._event(
            KeyEvent(operation="retired", key_id=keyring.key_id, key_version=version), tenant="*", actor=actor
        )

    async def shred(self, tenant: str, study_key: str, actor: str, reason: str) -> str:
        """Crypto-shred one study: "shredded", "again" (already shredded) or "unknown".

        An already shredded study gets its ``key.shredded`` event again, so services that erase
        derived data (deid's linkage) finish anything a concurrent write left behind.
        """
        if not reason.strip():
            raise SystemExit("a reason is required to crypto-shred a study")
        changed = await self.catalogue.mark_shredded(tenant, study_key, actor)
        destroyed = await self.keys.destroy(tenant, study_key)
        if changed or destroyed:
            outcome = "shredded"
        elif await self.catalogue.is_shredded(tenant, study_key):
            outcome = "again"
        else:
            return "unknown"
        await self._event(
            KeyEvent(operation="shredded", key_id=study_key_id(tenant, study_key), study_key=study_key),
            tenant=tenant,
            actor=actor,
        )
        return outcome

    async def scrub(self, tenant: str | None, on_problem: Callable[[dict[str, Any]], None]) -> int:
        """Verify every stored object (of ``tenant``): each segment's tag, then the plaintext's SHA-256
        against the catalogue. Each problem goes to ``on_problem`` as it is found; returns how many
        objects were checked. Objects are streamed from the store, never held whole, and the
        catalogue is read a page at a time (a long scrub outlived the server's cursor before)."""
        checked = 0
        async for doc in self.catalogue.all_stored(tenant):
            checked += 1
            for problem in await self._scrub_one(doc):
                on_problem({"imaging_id": doc["_id"], "object": doc["object"]["key"], **problem})
        return checked

    async def _scrub_one(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """One streamed pass that decrypts (every segment's tag checked) and hashes the plaintext; only
        an object that fails it is read again, by ``scrub_object``, to name every bad segment."""
        ref = doc["object"]
        identity = ObjectIdentity(doc["tenant"], doc["study_key"], ref["key"])

        def plaintext_digest(body: Any) -> str:
            digest = hashlib.sha256()
            for piece in decrypt_object(body, identity, provider):
                digest.update(piece)
            return digest.hexdigest()

        try:
            provider = await self.keys.object_provider(doc["tenant"], doc["study_key"])
            digest = await self._with_body(ref, plaintext_digest)
        except CryptoError as exc:
            failure = str(exc)  # Enclave's own message (no data); the segments are named below
        except Exception as exc:
            return [{"segment": None, "problem": type(exc).__name__}]
        else:
            return [] if digest == doc["sha256"] else [{"segment": None, "problem": "sha256 mismatch"}]
        try:
            report = await self._with_body(ref, lambda body: scrub_object(body, identity, provider))
        except Exception as exc:
            return [{"segment": None, "problem": type(exc).__name__}]
        problems = [{"segment": p.segment_index, "problem": p.problem} for p in report.problems]
        return problems or [{"segment": None, "problem": failure}]

    async def _with_body(self, ref: dict[str, Any], read: Callable[[Any], T]) -> T:
        """``read`` the object's body in a worker thread; the response is closed whatever happens."""
        body = await self.store.open(ref["bucket"], ref["key"], ref.get("version_id"))
        try:
            return await asyncio.to_thread(read, body)
        finally:
            body.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-ingest-keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--actor",
        default="",
        help="who runs the operation (e.g. user:sre-jane), recorded in the audit trail; required but for scrub",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("rotate")
    retire = sub.add_parser("retire")
    retire.add_argument("--version", type=int, required=True)
    shred = sub.add_parser("shred")
    shred.add_argument("--tenant", required=True)
    shred.add_argument("--study-key", required=True)
    shred.add_argument("--reason", required=True)
    scrub = sub.add_parser("scrub")
    scrub.add_argument("--tenant")
    args = parser.parse_args(argv)
    if args.command != "scrub" and not args.actor.strip():
        # Until the eleventh session it defaulted to "admin-cli": a shred's audit record named no one.
        parser.error(
            "--actor is required for rotate, retire and shred: who runs it (recorded in the audit trail)"
        )
    settings = IngestSettings()
    configure_logging("ingest-keys", "WARNING", stream=sys.stderr)

    async def run() -> int:
        async with KeyAdmin(settings) as admin:
            if args.command == "rotate":
                print(f"rotated: {await admin.rotate(args.actor)} study keys re-wrapped")
            elif args.command == "retire":
                await admin.retire(args.version, args.actor)
                print(f"retired KEK version {args.version}")
            elif args.command == "shred":
                outcome = await admin.shred(args.tenant, args.study_key, args.actor, args.reason)
                print(
                    {
                        "shredded": "shredded",
                        "again": "already shredded; key.shredded published again",
                        "unknown": "nothing to shred: no such study key",
                    }[outcome]
                )
            elif args.command == "scrub":
                found: list[dict[str, Any]] = []

                def report(p: dict[str, Any]) -> None:
                    found.append(p)
                    print(
                        f"CORRUPT imaging_id={p['imaging_id']} object={p['object']} segment={p['segment']} "
                        f"problem={p['problem']}",
                        flush=True,
                    )

                checked = await admin.scrub(args.tenant, report)
                print(f"scrub: {checked} objects checked, {len(found)} problem(s)")
                return 1 if found else 0
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
