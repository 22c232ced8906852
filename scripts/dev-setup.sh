#!/usr/bin/env bash
# Creates the local development keys and configuration under $ENCLAVE_STATE (once), never in the repo.
. "$(dirname "$0")/stack/common.sh"
mkdir -p "$ENCLAVE_STATE"
exec "$REPO_ROOT/.venv/bin/python" "$REPO_ROOT/scripts/dev_setup.py" "$ENCLAVE_STATE"
