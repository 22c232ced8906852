#!/usr/bin/env bash
# Stops exactly the processes the project started (by pid file), services first, then the stack.
. "$(dirname "$0")/common.sh"
stop() { # name
  local f="$PIDS_DIR/$1.pid" pid
  [ -f "$f" ] || return 0
  pid="$(cat "$f")"
  if proc_alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 60); do proc_alive "$pid" || break; sleep 0.5; done
    if proc_alive "$pid"; then log "$1 did not stop in 30s: SIGKILL"; kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
    log "$1 stopped (pid $pid)"
  fi
  rm -f "$f"
}
order=(gateway ingest deid analysis audit kafka minio ferretdb)
if [ $# -eq 0 ]; then set -- "${order[@]}"; fi
# Whatever order the names come in: services before the stack they need to leave their consumer
# groups and flush their producers (with Kafka gone first, a service waits out its grace period).
for n in "${order[@]}"; do
  for wanted in "$@"; do [ "$wanted" = "$n" ] && stop "$n"; done
done
