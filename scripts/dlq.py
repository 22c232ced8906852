"""The runbook's `scripts/dlq.py`: the same command as `enclave-dlq` (enclave_common.dlq_cli), kept
for the local stack's commands.

    .venv/bin/python scripts/dlq.py inspect enclave.instance.stored.v1.dlq [--code C] [--group G]
    .venv/bin/python scripts/dlq.py replay enclave.instance.stored.v1.dlq --code C [--group G] \
        --actor user:NAME --reason "why (10 to 500 characters)"
"""

from __future__ import annotations

import sys

from enclave_common.dlq_cli import main

if __name__ == "__main__":
    sys.exit(main())
