#!/usr/bin/env bash
# Exit 0 when the local Kafka broker answers a metadata request (not merely an open port).
. "$(dirname "$0")/common.sh"
port_open "$KAFKA_PORT" || exit 1
exec "$REPO_ROOT/.venv/bin/python" - "$KAFKA_PORT" <<'PY'
import asyncio, sys
from aiokafka.admin import AIOKafkaAdminClient
async def main() -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{sys.argv[1]}", request_timeout_ms=3000)
    await admin.start()
    try:
        await admin.describe_cluster()
    finally:
        await admin.close()
asyncio.run(asyncio.wait_for(main(), 8))
PY
