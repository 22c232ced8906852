"""Generate development keys and the dev environment file (idempotent: existing keys are kept).

Everything goes under the state folder given as argument; `scripts/services.sh` sources
``dev.env`` so the services find their keys. Production reads the same variables from Secrets.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(state: Path) -> None:
    keys = state / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    os.chmod(keys, 0o700)
    env_lines = [f"export ENCLAVE_STATE_DIR={state}"]
    (state / "dev.env").write_text("\n".join(env_lines) + "\n")
    print(f"[dev-setup] keys and dev.env under {state}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
