#!/usr/bin/env bash
# Runs a command with the local stack and the five services up. Whatever this script had to start,
# it stops afterwards; what was already running (e.g. from `make up`) is left running.
#
#   scripts/with-stack.sh CMD...                      start the stack, then run CMD
#   scripts/with-stack.sh --meanwhile 'PRE' CMD...    start the stack in the background while PRE runs
#                                                     (`make test` runs lint and unit tests there), then CMD
. "$(dirname "$0")/stack/common.sh"
. "$STACK_DIR/services.env"
meanwhile=""
if [ "${1:-}" = "--meanwhile" ]; then meanwhile="$2"; shift 2; fi
started=()
for c in kafka minio ferretdb $SERVICES; do pid_alive "$c" || started+=("$c"); done
starter=""
cleanup() {
  if [ -n "$starter" ]; then kill "$starter" 2>/dev/null; wait "$starter" 2>/dev/null; fi
  if [ ${#started[@]} -gt 0 ]; then log "stopping what this run started: ${started[*]}"; "$STACK_DIR/down.sh" "${started[@]}"; fi
}
trap cleanup EXIT
start_stack() { "$STACK_DIR/up.sh" && "$REPO_ROOT/scripts/dev-setup.sh" && "$REPO_ROOT/scripts/services.sh" up; }
if [ -n "$meanwhile" ]; then
  mkdir -p "$LOGS_DIR"
  start_log="$LOGS_DIR/stack-start.log"
  log "starting the stack in the background (log: $start_log) while: $meanwhile"
  start_stack >"$start_log" 2>&1 &
  starter=$!
  set +e
  bash -c "$meanwhile"
  rc=$?
  # What the start printed so far, then its progress until it ends (a first run builds the stack).
  tail -n +1 -f --pid="$starter" "$start_log" >&2
  wait "$starter"
  start_rc=$?
  starter=""
  set -e
  [ "$rc" -eq 0 ] || exit "$rc"
  [ "$start_rc" -eq 0 ] || { log "the stack did not start (see above)"; exit "$start_rc"; }
else
  start_stack
fi
set +e
"$@"
rc=$?
exit $rc
