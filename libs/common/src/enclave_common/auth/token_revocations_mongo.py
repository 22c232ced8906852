"""The :class:`~enclave_common.auth.token_revocations.TokenRevocationStore` in MongoDB (collection
``token_revocations``): one document per tenant and subject, ``_id`` both (``<tenant>|<subject>``; a
tenant name holds no ``|``), the latest instant kept by ``$max``. The gateway reads them all every few
seconds (:class:`~enclave_common.auth.token_revocations.RevokedTokens`), never on a request's path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pymongo
from pymongo.asynchronous.database import AsyncDatabase

from enclave_common.auth.grants_mongo import aware_utc
from enclave_common.auth.token_revocations import TokenRevocation

COLLECTION = "token_revocations"


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

    async def all(self) -> Sequence[TokenRevocation]:
        with pymongo.timeout(self._read_timeout_s):
            return [
                TokenRevocation(
                    tenant=doc["tenant"],
                    subject=doc["subject"],
                    revoked_before=aware_utc(doc["revoked_before"]),
                    revoked_by=doc["revoked_by"],
                    justification=doc["justification"],
                )
                async for doc in self._collection.find({})
            ]
