#!/usr/bin/env bash
# Starts (up) or stops (down) the five Enclave services as local processes against the local stack.
. "$(dirname "$0")/stack/common.sh"
. "$STACK_DIR/services.env"
mkdir -p "$PIDS_DIR" "$LOGS_DIR" "$ENCLAVE_STATE/keys"

export ENCLAVE_ENVIRONMENT="${ENCLAVE_ENVIRONMENT:-dev}"
export ENCLAVE_KAFKA_BOOTSTRAP_SERVERS="${ENCLAVE_KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$KAFKA_PORT}"
export ENCLAVE_MONGO_URL="${ENCLAVE_MONGO_URL:-mongodb://127.0.0.1:$MONGO_PORT/}"
export ENCLAVE_S3_ENDPOINT_URL="${ENCLAVE_S3_ENDPOINT_URL:-http://127.0.0.1:$MINIO_PORT}"
export ENCLAVE_S3_ACCESS_KEY_ID="${ENCLAVE_S3_ACCESS_KEY_ID:-$MINIO_ROOT_USER}"
export ENCLAVE_S3_SECRET_ACCESS_KEY="${ENCLAVE_S3_SECRET_ACCESS_KEY:-$MINIO_ROOT_PASSWORD}"
export ENCLAVE_STATE_DIR="$ENCLAVE_STATE"
# Locally every service writes its spans to a JSON-lines file (tests check one upload = one trace).
export ENCLAVE_TRACING_EXPORTER="${ENCLAVE_TRACING_EXPORTER:-file}"
mkdir -p "$ENCLAVE_STATE/traces"
# The local keys and connection settings; what the caller exported wins (README: external Kafka, S3, MongoDB).
if [ -f "$ENCLAVE_STATE/dev.env" ]; then
  caller_env="$(export -p | grep '^declare -x ENCLAVE_' || true)"
  . "$ENCLAVE_STATE/dev.env"
  eval "$caller_env"
fi

up() {
  for s in $SERVICES; do
    if pid_alive "$s"; then log "$s already running (pid $(cat "$PIDS_DIR/$s.pid"))"; continue; fi
    (
      # Each service's own object-store identity on the local MinIO (scripts/dev_setup.py, deploy/iam/);
      # the gateway holds none. S3 credentials the caller exported for another store are kept.
      if [ "$s" = gateway ]; then
        unset ENCLAVE_S3_ACCESS_KEY_ID ENCLAVE_S3_SECRET_ACCESS_KEY
      elif [ "$ENCLAVE_S3_ACCESS_KEY_ID" = "$MINIO_ROOT_USER" ] \
        && [ "$ENCLAVE_S3_ENDPOINT_URL" = "http://127.0.0.1:$MINIO_PORT" ]; then
        if [ -f "$ENCLAVE_STATE/s3/$s.env" ]; then
          . "$ENCLAVE_STATE/s3/$s.env"
        else
          log "WARNING: $s runs as the MinIO root user: $ENCLAVE_STATE/s3/$s.env is missing (run scripts/dev-setup.sh)"
        fi
      fi
      ENCLAVE_TRACING_FILE="${ENCLAVE_TRACING_FILE:-$ENCLAVE_STATE/traces/$s.jsonl}" \
        exec setsid "$REPO_ROOT/.venv/bin/enclave-$s" >>"$LOGS_DIR/$s.log" 2>&1 < /dev/null
    ) &
    echo $! > "$PIDS_DIR/$s.pid"
    log "$s started (pid $!), log: $LOGS_DIR/$s.log"
  done
  for s in $SERVICES; do
    port_var="PORT_${s^^}"
    wait_for "$s ready on :${!port_var}" 90 curl -sf "http://127.0.0.1:${!port_var}/readyz"
  done
}

case "${1:-}" in
  up) up ;;
  down) "$STACK_DIR/down.sh" $SERVICES ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
