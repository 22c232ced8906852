# Sourced by the stack scripts: paths, ports and helpers shared by install/up/down/status.
set -euo pipefail
STACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$STACK_DIR/../.." && pwd)"
# shellcheck source=versions.env
. "$STACK_DIR/versions.env"
ENCLAVE_CACHE="${ENCLAVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enclave}"
ENCLAVE_STATE="${ENCLAVE_STATE:-$REPO_ROOT/.state}"
KAFKA_HOME="$ENCLAVE_CACHE/kafka-$KAFKA_SCALA-$KAFKA_VERSION"
MINIO_BIN="$ENCLAVE_CACHE/minio-$MINIO_MODULE_VERSION/minio"
FERRETDB_BIN="$ENCLAVE_CACHE/ferretdb-$FERRETDB_VERSION-p$FERRETDB_PATCH_LEVEL/ferretdb"
KAFKA_PORT="${ENCLAVE_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${ENCLAVE_KAFKA_CONTROLLER_PORT:-19093}"
MINIO_PORT="${ENCLAVE_MINIO_PORT:-19000}"
MINIO_CONSOLE_PORT="${ENCLAVE_MINIO_CONSOLE_PORT:-19001}"
MONGO_PORT="${ENCLAVE_MONGO_PORT:-27018}"
MINIO_ROOT_USER="${MINIO_ROOT_USER:-enclave-dev}"
MINIO_ROOT_PASSWORD="${MINIO_ROOT_PASSWORD:-enclave-dev-secret}"
PIDS_DIR="$ENCLAVE_STATE/pids"
LOGS_DIR="$ENCLAVE_STATE/logs"

log() { printf '[stack] %s\n' "$*" >&2; }

proc_alive() { # pid: true if it runs (a zombie awaiting its reaper does not count)
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Z]).*/\1/' "/proc/$1/stat" 2>/dev/null)"
  [ -n "$state" ] && [ "$state" != "Z" ]
}

pid_alive() { # name
  local f="$PIDS_DIR/$1.pid"
  [ -f "$f" ] && proc_alive "$(cat "$f")"
}

wait_for() { # description timeout_seconds command...
  local what="$1" timeout="$2"; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - start > timeout )); then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
  log "$what is ready ($((SECONDS - start))s)"
}

port_open() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
