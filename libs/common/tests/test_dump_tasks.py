"""kill -USR1 on a service logs where each of its asyncio tasks waits: the chain of awaits as code
locations, never values."""

from __future__ import annotations

import asyncio
import io
import json

from enclave_common.logging import configure_logging
from enclave_common.service import dump_tasks

SECRET = "DOE^JANE"


async def _waits_for(event: asyncio.Event, note: str) -> None:
    await _inner(event, note)


async def _inner(event: asyncio.Event, note: str) -> None:
    await event.wait()


async def test_every_task_is_logged_with_its_chain_of_awaits_and_no_values():
    out = io.StringIO()
    configure_logging("test", "DEBUG", stream=out)
    event = asyncio.Event()
    task = asyncio.create_task(_waits_for(event, SECRET), name="stuck-handler")
    await asyncio.sleep(0)
    dump_tasks()
    event.set()
    await task
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (stuck,) = [line for line in lines if line.get("task") == "stuck-handler"]
    where = stuck["waits_at"].split(" > ")
    assert where[0].startswith("tests/test_dump_tasks.py:") and where[0].endswith(" _waits_for")
    assert where[1].endswith(" _inner") and "locks.py" in where[2]
    assert SECRET not in out.getvalue()
