"""Generate the API documents from the code, or check that the committed ones match (CI fails on drift).

- docs/api/<service>.asyncapi.json: FastStream's AsyncAPI 3.0 of each service's broker
  (the topics it consumes and publishes).
- docs/api/<service>.openapi.json: FastAPI's OpenAPI of each service's HTTP API.

Usage: python scripts/specs.py --write | --check
"""

from __future__ import annotations

import argparse
import base64
import difflib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from faststream.specification import AsyncAPI

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api"
SERVICES = ("gateway", "ingest", "deid", "analysis", "audit")


def documents() -> dict[str, str]:
    # The documents must not depend on where this runs: fix the advertised server address.
    os.environ["ENCLAVE_KAFKA_BOOTSTRAP_SERVERS"] = "kafka.enclave.svc:9093"
    os.environ["ENCLAVE_ENVIRONMENT"] = "dev"
    # The gateway builds its pseudonymizer with the app; the documents do not depend on the key.
    os.environ.setdefault("ENCLAVE_GATEWAY_PSEUDONYM_KEY", base64.b64encode(bytes(32)).decode())
    docs: dict[str, str] = {}
    for name in SERVICES:
        main = importlib.import_module(f"enclave_{name}.main")
        app = main.create_app()
        runtime = app.state.runtime
        asyncapi = AsyncAPI(runtime.broker, title=f"Enclave {name}", version="1.0.0").to_specification()
        docs[f"{name}.asyncapi.json"] = _dump(asyncapi.to_jsonable())
        docs[f"{name}.openapi.json"] = _dump(app.openapi())
    return docs


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args()
    generated = documents()
    if args.write:
        OUT.mkdir(parents=True, exist_ok=True)
        for stale in OUT.glob("*.json"):
            if stale.name not in generated:
                stale.unlink()
        for name, text in generated.items():
            (OUT / name).write_text(text)
        print(f"wrote {len(generated)} documents to {OUT.relative_to(ROOT)}")
        return 0
    drift = []
    for name, text in generated.items():
        path = OUT / name
        current = path.read_text() if path.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), f"committed/{name}", f"code/{name}", n=1
            )
            drift.append("\n".join(list(diff)[:40]))
    if drift:
        print(
            "API documents drifted from the code; run `make openapi` and commit docs/api/:\n", file=sys.stderr
        )
        print("\n\n".join(drift), file=sys.stderr)
        return 1
    print(f"docs/api: {len(generated)} documents match the code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
