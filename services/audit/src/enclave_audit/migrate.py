"""``enclave-audit-migrate``: create the audit database's indexes, under the migration's user.

    enclave-audit-migrate                 # create what is missing (idempotent), then list what exists
    enclave-audit-migrate --check         # only say what is missing (exit 1 if anything is)
    enclave-audit-migrate --print-roles   # the mongosh script that creates both roles and users

The service itself runs under a role with ``find`` and ``insert`` on the trail (see
:mod:`enclave_audit.privileges`); with ``ENCLAVE_AUDIT_CREATE_INDEXES=false`` it only checks at
start that these indexes exist, and refuses to start, naming them, when they do not. Reads the same
settings as the service (``ENCLAVE_MONGO_URL``: here the migration user's URL). Exit code 0 when
every index exists, 1 when ``--check`` found some missing, 2 when the database cannot be reached
or refused the command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from enclave_audit.config import AuditSettings
from enclave_audit.privileges import role_script
from enclave_audit.store import INDEXES, AuditStore


async def _run(settings: AuditSettings, *, check_only: bool) -> int:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        settings.mongo_url.get_secret_value(), serverSelectionTimeoutMS=5000, appname="enclave-audit-migrate"
    )
    try:
        store = AuditStore(client[settings.mongo_database])
        if not check_only:
            await store.ensure_indexes()
        missing = await store.missing_indexes()
    finally:
        await client.close()
    for collection, name, _, _ in INDEXES:
        state = "MISSING" if f"{collection}.{name}" in missing else "ok     "
        print(f"{state} {settings.mongo_database}.{collection} index {name}")
    return 1 if missing else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enclave-audit-migrate", description="Create the audit database's indexes."
    )
    parser.add_argument("--check", action="store_true", help="create nothing; exit 1 if an index is missing")
    parser.add_argument(
        "--print-roles", action="store_true", help="print the mongosh script creating the roles and users"
    )
    args = parser.parse_args(argv)
    settings = AuditSettings()
    if args.print_roles:
        print(role_script(settings.mongo_database), end="")
        return 0
    try:
        return asyncio.run(_run(settings, check_only=args.check))
    except PyMongoError as exc:
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        print(f"cannot migrate the audit database: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
