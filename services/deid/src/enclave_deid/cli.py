"""Operator commands of the deid service (same settings as the service, ``ENCLAVE_DEID_*``).

``enclave-deid-linkage``: the audited break-glass read of a patient's linkage.
``enclave-deid-keys rotate``: a new version of the deid keyring, then every DEK wrapped under the deid KEK
re-wrapped (de-identified objects' header key slots, linkage records when they share the KEK).
``enclave-deid-redo``: re-de-identify released copies made under an older revision of the rules
(``enclave_deid.redo``), audited like the other operator commands (``enclave_common.operator_actions``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import IO, Any

from enclave_common import topics
from enclave_common.crypto import LocalKeyring, rewrap_object_header
from enclave_common.crypto.streaming import read_up_to
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.errors import EnclaveError, PermanentError
from enclave_common.events import KeyEvent
from enclave_common.kafka import EventPublisher, create_broker
from enclave_common.logging import configure_logging
from enclave_common.mongo import mongo_client, paged
from enclave_common.operator_actions import (
    ALL_TENANTS,
    OperatorAction,
    record_end,
    record_start,
)
from enclave_common.storage import S3ObjectStore

from enclave_deid.break_glass import read_linkage
from enclave_deid.config import DeidSettings
from enclave_deid.linkage import LinkageVault, rewrap_linkage
from enclave_deid.main import build_pipeline, load_checked_keys, load_keys
from enclave_deid.pipeline import deid_object_identity
from enclave_deid.records import DeidRecords
from enclave_deid.redo import MISSING_OBJECT, CopyRedo, RedoTally
from enclave_deid.revision import DEID_REVISION


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
    rewrapped = skipped = 0
    async with _Clients(settings) as clients:
        try:
            async for done in _rewrap_all(settings, clients, keyring):
                if done == SKIPPED:
                    skipped += 1
                else:
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
    print(
        json.dumps({"key_id": keyring.key_id, "version": version, "rewrapped": rewrapped, "skipped": skipped})
    )
    return 0


#: What ``_rewrap_all`` yields for each key slot: re-wrapped, or skipped (its copy was replaced or
#: deleted by ``enclave-deid-redo`` while the rotation walked).
REWRAPPED, SKIPPED = "rewrapped", "skipped"


async def _rewrap_all(settings: DeidSettings, clients: _Clients, keyring: LocalKeyring) -> AsyncIterator[str]:
    """Every released object's key slot, then the linkage keys that share the KEK, re-wrapped under
    the keyring's current version; yields ``REWRAPPED`` or ``SKIPPED`` for each, as it is done."""
    store = S3ObjectStore(settings)
    records = DeidRecords(clients.db)
    async for doc in records.released_objects():
        ref = doc["object"]
        identity = deid_object_identity(doc["tenant"], doc["study_key"], ref["key"])
        try:
            body = await store.open(ref["bucket"], ref["key"], ref.get("version_id"))
        except PermanentError as exc:
            now = await records.get(doc["_id"])
            if exc.code in MISSING_OBJECT and (now or {}).get("object") != ref:
                yield SKIPPED  # a redo replaced (or withdrew) the copy and deleted it meanwhile
                continue
            raise
        try:
            prefix = await asyncio.to_thread(read_up_to, body, HEADER_PREFIX_BYTES)
            new_header = rewrap_object_header(prefix, keyring, identity)
            rewritten = _Prepended(new_header.header + prefix[new_header.replaced_length :], body)
            put = await store.put(ref["bucket"], ref["key"], io.BufferedReader(rewritten))
        finally:
            body.close()
        updated = await records.collection.update_one(
            {"_id": doc["_id"], "object.key": ref["key"]}, {"$set": {"object.version_id": put.version_id}}
        )
        if updated.matched_count == 0:
            # `enclave-deid-redo` replaced the copy meanwhile (and may have deleted it): what this
            # wrote would be an old copy again, readable by no record.
            await store.delete_all_versions(ref["bucket"], ref["key"])
            yield SKIPPED
            continue
        yield REWRAPPED
    if settings.linkage_keyring_file is None and not settings.linkage_kms_key_id:
        vault = LinkageVault(clients.db, keyring)
        async for doc in paged(vault.collection, {}):
            new_wrapped = rewrap_linkage(keyring, doc)
            if new_wrapped is not None:
                await vault.collection.update_one({"_id": doc["_id"]}, {"$set": {"wrapped_key": new_wrapped}})
                yield REWRAPPED


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


#: Outcomes that do not make the command exit 3: the instance is as the current rules want it, or
#: its refusal was reported by an earlier run (``still_refused_<code>``, counted in the summary).
_DONE = ("redone", "withdrawn_", "finished", "changed", "still_refused_")


def _redo_target(args: argparse.Namespace) -> str:
    """The access target: ``tenant:T/study:K/revision_below:N`` (``revision:any`` with ``--all``)."""
    parts = [f"tenant:{args.tenant}"]
    if args.study_key:
        parts.append(f"study:{args.study_key}")
    parts.append("revision:any" if args.everything else f"revision_below:{DEID_REVISION}")
    if args.withdraw_unredoable:
        parts.append("withdraw_unredoable")
    return "/".join(parts)


def _counts(tally: RedoTally) -> str:
    outcomes = ", ".join(f"{name} {count}" for name, count in sorted(tally.outcomes.items()))
    return f"{sum(tally.selected.values())} selected" + (f"; {outcomes}" if outcomes else "")


class _Progress:
    """A line on stderr at most every ``every`` seconds: counts only."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last = time.monotonic()

    def __call__(self, tally: RedoTally) -> None:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            print(f"progress: {_counts(tally)}", file=sys.stderr)


async def _redo(args: argparse.Namespace, settings: DeidSettings, audited: OperatorAction | None) -> int:
    # The service's own key and configuration guard, and its pipeline, before anything is recorded: a
    # copy made under another pseudonym key would split its study (and replace the right one).
    keys = None if args.dry_run else load_checked_keys(settings)
    store = S3ObjectStore(settings)
    pipeline = build_pipeline(settings, keys, store) if keys is not None else _NoPipeline()
    if audited is not None:
        await record_start(settings, audited, "started")
    tally = RedoTally()
    try:
        async with _Clients(settings) as clients:
            vault = LinkageVault(clients.db, keys.linkage if keys is not None else None)
            redo = CopyRedo(
                records=DeidRecords(clients.db),
                vault=vault,
                pipeline=pipeline,
                store=store,
                publisher=clients.publisher,
                policy_for=settings.policy_for,
                originals_bucket=settings.originals_bucket,
                actor=args.actor,
                correlation_id=audited.correlation_id if audited is not None else new_event_id(),
                progress=_Progress(),
                withdraw_unredoable=args.withdraw_unredoable,
            )
            redo.tally = tally
            await redo.run(
                args.tenant, study_key=args.study_key, everything=args.everything, dry_run=args.dry_run
            )
    except BaseException as exc:
        if audited is not None:
            stopped = f"stopped: {_counts(tally)}: {type(exc).__name__}"
            await record_end(settings, audited.event(outcome="error", status_code=500, detail=stopped))
        raise
    if audited is not None:
        await record_end(settings, audited.event(detail=_counts(tally)))
    print(json.dumps({"dry_run": args.dry_run, "revision": DEID_REVISION, **tally.summary()}, indent=2))
    return redo_exit_code(tally)


def redo_exit_code(tally: RedoTally) -> int:
    """3 when a copy was refused for the first time or busy (someone should look, or run again
    later), else 0: a refusal an earlier run reported (``still_refused_<code>``) does not raise the
    alarm on every run; ``--withdraw-unredoable`` ends the unredoable ones."""
    left = [name for name in tally.outcomes if not name.startswith(_DONE)]
    return 3 if left else 0


class _NoPipeline:
    """A dry run de-identifies nothing (and loads no key)."""

    bucket = ""

    async def run_original(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("a dry run de-identifies nothing")


def redo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-deid-redo",
        description="Re-de-identify a tenant's released copies made under an older revision of deid's rules "
        f"(the current revision is {DEID_REVISION}): each from its original, into a new copy that replaces "
        "the old one (deleted, every version); the new outcome is published for every upload of the "
        "instance. Prints counts only. Exit 3 when a copy was refused for the first time or was busy "
        "(run again later); a refusal an earlier run reported counts as still_refused_<code>.",
    )
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--study-key", help="only this study, by its pseudonymous key (ingest's study_key)")
    parser.add_argument(
        "--all",
        dest="everything",
        action="store_true",
        help="every released copy, whatever its revision (e.g. after a tenant's policy changed)",
    )
    parser.add_argument(
        "--actor", required=True, help="who asks (e.g. user:privacy-officer), for the audit trail"
    )
    parser.add_argument(
        "--reason",
        default="",
        help="why (10 to 500 characters), for the audit trail; required unless --dry-run",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would be redone by reason, change nothing"
    )
    parser.add_argument(
        "--withdraw-unredoable",
        action="store_true",
        help="withdraw the copies that can never be redone (study crypto-shredded, original missing or "
        "changed): every version deleted, linkage erased, instance.quarantined published",
    )
    args = parser.parse_args(argv)
    audited = OperatorAction.from_command_line(
        parser, args, source="enclave-deid-redo", action="deid_redo", target=_redo_target(args)
    )
    settings = DeidSettings()
    configure_logging("deid-redo", settings.log_level, stream=sys.stderr)
    return _run(_redo(args, settings, audited))


def _run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except EnclaveError as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        return 2
