#!/usr/bin/env bash
# Creates the local development keys and configuration under $ENCLAVE_STATE (once), never in the repo.
. "$(dirname "$0")/stack/common.sh"
mkdir -p "$ENCLAVE_STATE"
export ENCLAVE_KAFKA_BOOTSTRAP_SERVERS="${ENCLAVE_KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$KAFKA_PORT}"
export ENCLAVE_MONGO_URL="${ENCLAVE_MONGO_URL:-mongodb://127.0.0.1:$MONGO_PORT/}"
export ENCLAVE_S3_ENDPOINT_URL="${ENCLAVE_S3_ENDPOINT_URL:-http://127.0.0.1:$MINIO_PORT}"
export ENCLAVE_S3_ACCESS_KEY_ID="${ENCLAVE_S3_ACCESS_KEY_ID:-$MINIO_ROOT_USER}"
export ENCLAVE_S3_SECRET_ACCESS_KEY="${ENCLAVE_S3_SECRET_ACCESS_KEY:-$MINIO_ROOT_PASSWORD}"
ENCLAVE_LOCAL_MINIO_ROOT_USER="$MINIO_ROOT_USER" exec "$REPO_ROOT/.venv/bin/python" "$REPO_ROOT/scripts/dev_setup.py" "$ENCLAVE_STATE"
