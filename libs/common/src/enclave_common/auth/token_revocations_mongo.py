"""The :class:`~enclave_common.auth.token_revocations.TokenRevocationStore` in MongoDB (collection
``token_revocations``): one document per tenant and subject, ``_id`` both (``<tenant>|<subject>``; a
tenant name holds no ``|``), the latest instant kept by ``$max``. The gateway reads them all every few
seconds (:class:`~enclave_common.auth.token_revocations.RevokedTokens`), never on a request's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pymongo
import structlog
from pymongo.asynchronous.database import AsyncDatabase

from enclave_common.auth.grants_mongo import aware_utc
from enclave_common.auth.token_revocations import TokenRevocation

COLLECTION = "token_revocations"

log = structlog.get_logger("enclave.auth")


class MongoTokenRevocationStore:
    def __init__(self, database: AsyncDatabase[Any], *, read_timeout_s: float | None = None) -> None:
        self._collection = database[COLLECTION]
        self._read_timeout_s = read_timeout_s

    async def revoke(self, revocation: TokenRevocation) -> None:
        # The instant by $max; who and why are those of the latest request (two admins revoking one
        # subject in the same moment both end the same tokens).
        await self._collection.update_one(
            {"_id": f"{revocation.tenant}|{revocation.subject}"},
            {
                "$max": {"revoked_before": revocation.revoked_before},
                "$set": {
                    "tenant": revocation.tenant,
                    "subject": revocation.subject,
                    "revoked_by": revocation.revoked_by,
                    "justification": revocation.justification,
                },
            },
            upsert=True,
        )

    async def since(self, cutoff: datetime) -> Sequence[TokenRevocation]:
        """The justification is not read (the check needs who and when); a document that is no
        revocation (by hand, or of a newer version) is logged by id and left out."""
        found = []
        with pymongo.timeout(self._read_timeout_s):
            cursor = self._collection.find({"revoked_before": {"$gt": cutoff}}, {"justification": 0})
            async for doc in cursor:
                try:
                    found.append(
                        TokenRevocation(
                            tenant=doc["tenant"],
                            subject=doc["subject"],
                            revoked_before=aware_utc(doc["revoked_before"]),
                            revoked_by=doc["revoked_by"],
                            justification="",
                        )
                    )
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    log.error(
                        "a stored token revocation could not be read",
                        id=str(doc.get("_id")),
                        error=type(exc).__name__,
                    )
        return found
