"""The MongoDB privileges of the audit service and of its index migration, as data.

Two roles, so that the running service cannot alter what it stored:

- the service (``enclaveAuditAppendOnly``): ``find`` and ``insert`` on the trail (records, checkpoint
  index, raised alerts), ``find``/``insert``/``update`` on ``anomaly_windows`` (the anomaly rules'
  per-minute buckets: derived state, not the trail, upserted with ``$addToSet``) and on
  ``token_revocations`` (the token revocations recorded in the trail, one document per tenant and
  subject, upserted with ``$max``: derived state too), and
  ``listIndexes`` to check at start that the migration ran;
- the migration (``enclaveAuditMigration``, run by ``enclave-audit-migrate`` at deploy time):
  ``createIndex``.

``enclave-audit-migrate --print-roles`` prints the script a database administrator applies; the
integration test ``tests/integration/test_audit_privileges.py`` records every command the service
sends to a real MongoDB-wire server and checks each against :data:`SERVICE_PRIVILEGES`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from enclave_common.auth.token_revocations_mongo import COLLECTION as TOKEN_REVOCATIONS

from enclave_audit.store import ALERTS, CHECKPOINTS, RECORDS
from enclave_audit.windows import WINDOWS

SERVICE_ROLE: Final = "enclaveAuditAppendOnly"
MIGRATION_ROLE: Final = "enclaveAuditMigration"

#: collection ("" = the whole database) -> the actions the service's role grants on it.
SERVICE_PRIVILEGES: Final[Mapping[str, tuple[str, ...]]] = {
    RECORDS: ("find", "insert"),
    CHECKPOINTS: ("find", "insert"),
    ALERTS: ("find", "insert"),
    WINDOWS: ("find", "insert", "update"),
    TOKEN_REVOCATIONS: ("find", "insert", "update"),
    "": ("listIndexes",),
}
#: The migration's: indexes on collections that may not exist yet.
MIGRATION_PRIVILEGES: Final[Mapping[str, tuple[str, ...]]] = {
    "": ("createCollection", "createIndex", "listIndexes"),
}

#: Commands a client may run without a privilege on a collection (handshake, cursors it opened,
#: sessions, ``ping`` for readiness).
UNPRIVILEGED_COMMANDS: Final = frozenset(
    {
        "hello",
        "ismaster",
        "isMaster",
        "ping",
        "buildInfo",
        "buildinfo",
        "endSessions",
        "getMore",
        "killCursors",
    }
)
#: The action a command needs on its collection (what the service can send; anything else is refused).
COMMAND_ACTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "find": ("find",),
    "aggregate": ("find",),
    "count": ("find",),
    "distinct": ("find",),
    "listIndexes": ("listIndexes",),
    "insert": ("insert",),
    "update": ("update",),
    "delete": ("remove",),
    "findAndModify": ("find", "update"),
    "createIndexes": ("createIndex",),
    "dropIndexes": ("dropIndex",),
    "drop": ("dropCollection",),
    "create": ("createCollection",),
}


def actions_needed(name: str, command: Mapping[str, object]) -> tuple[str, ...]:
    """The actions a command needs on its collection (an upsert also inserts; a findAndModify that
    removes needs ``remove``); ``<unknown command ...>`` for one the table does not know."""
    needed = list(COMMAND_ACTIONS.get(name, (f"<unknown command {name}>",)))
    updates = command.get("updates")
    if name == "update" and isinstance(updates, list) and any(u.get("upsert") for u in updates):
        needed.append("insert")
    if name == "findAndModify":
        if command.get("upsert"):
            needed.append("insert")
        if command.get("remove"):
            needed = ["find", "remove"]
    return tuple(needed)


def allows(privileges: Mapping[str, tuple[str, ...]], action: str, collection: str) -> bool:
    """Whether ``privileges`` grant ``action`` on ``collection`` (directly or database-wide)."""
    return action in privileges.get(collection, ()) or action in privileges.get("", ())


def role_script(database: str) -> str:
    """The mongosh script that creates both roles and their users (passwords prompted)."""

    def privileges(table: Mapping[str, tuple[str, ...]]) -> str:
        rows = [
            f"    {{ resource: {{ db: {json.dumps(database)}, collection: {json.dumps(c)} }}, "
            f"actions: {json.dumps(list(actions))} }}"
            for c, actions in table.items()
        ]
        return ",\n".join(rows)

    def role(name: str, table: Mapping[str, tuple[str, ...]], user: str) -> str:
        return (
            f"db.createRole({{\n  role: {json.dumps(name)},\n  privileges: [\n{privileges(table)}\n  ],\n"
            f"  roles: []\n}})\n"
            f"db.createUser({{\n  user: {json.dumps(user)},\n  pwd: passwordPrompt(),\n"
            f'  roles: [{{ role: {json.dumps(name)}, db: "admin" }}]\n}})\n'
        )

    return (
        "use admin\n"
        + role(SERVICE_ROLE, SERVICE_PRIVILEGES, "enclave-audit")
        + role(MIGRATION_ROLE, MIGRATION_PRIVILEGES, "enclave-audit-migrate")
    )
