"""The HTTP floor for ``bench/gateway.py``: a server that reads each request body and answers 200.

It runs on the gateway's HTTP stack (uvicorn with uvloop and httptools) and does nothing else, so its
rate and CPU time per request show what the benchmark client and the HTTP layer alone cost on this
machine: the part of the gap to Orthanc that no change to the gateway's own work can remove.

Usage: python bench/http_floor.py PORT
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    received = 0
    while True:
        message = await receive()
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b'{"received": %d}' % received
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(
        app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", loop="uvloop", http="httptools"
    )
