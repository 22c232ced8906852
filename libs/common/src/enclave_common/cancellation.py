"""Recording a request the server is cancelling (its graceful-shutdown timeout), shared by the
services whose answers are recorded in the audit trail (the gateway, the audit API)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Final

#: How long a cancelled request waits for its access record before the cancellation goes on.
RECORD_ON_CANCEL_S: Final = 5.0


async def finish_despite_cancel(
    recording: Awaitable[object], unfinished: set[asyncio.Future[Any]] | None = None
) -> None:
    """Await the record of a request being cancelled (the server's graceful-shutdown timeout), before
    the cancellation goes on: shielded from a further cancellation, for at most
    :data:`RECORD_ON_CANCEL_S` (then cancelled, and ``TimeoutError``: a record that cannot finish in
    time does not run on unseen). What the shield keeps running past a further cancellation is kept in
    ``unfinished`` until it ends."""
    task = asyncio.ensure_future(recording)
    if unfinished is not None:
        unfinished.add(task)
        task.add_done_callback(unfinished.discard)
    try:
        async with asyncio.timeout(RECORD_ON_CANCEL_S):
            await asyncio.shield(task)
    except TimeoutError:
        task.cancel()
        raise
