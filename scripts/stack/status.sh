#!/usr/bin/env bash
# Tells which of the project's processes run, with pid and endpoint.
. "$(dirname "$0")/common.sh"
. "$STACK_DIR/services.env"
printf '%-10s %-8s %-8s %s\n' COMPONENT STATE PID ENDPOINT
row() { local name="$1" endpoint="$2" state=stopped pid=-
  if pid_alive "$name"; then state=running; pid="$(cat "$PIDS_DIR/$name.pid")"; fi
  printf '%-10s %-8s %-8s %s\n' "$name" "$state" "$pid" "$endpoint"; }
row kafka "127.0.0.1:$KAFKA_PORT (PLAINTEXT)"
row minio "http://127.0.0.1:$MINIO_PORT"
row ferretdb "mongodb://127.0.0.1:$MONGO_PORT"
for s in $SERVICES; do port_var="PORT_${s^^}"; row "$s" "http://127.0.0.1:${!port_var}"; done
