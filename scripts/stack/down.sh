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
names=("$@")
if [ ${#names[@]} -eq 0 ]; then names=(gateway ingest deid analysis audit kafka minio ferretdb); fi
for n in "${names[@]}"; do stop "$n"; done
