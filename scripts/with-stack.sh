#!/usr/bin/env bash
# Runs a command with the local stack and the five services up. Whatever this script had to start,
# it stops afterwards; what was already running (e.g. from `make up`) is left running.
. "$(dirname "$0")/stack/common.sh"
. "$STACK_DIR/services.env"
started=()
for c in kafka minio ferretdb $SERVICES; do pid_alive "$c" || started+=("$c"); done
cleanup() { if [ ${#started[@]} -gt 0 ]; then log "stopping what this run started: ${started[*]}"; "$STACK_DIR/down.sh" "${started[@]}"; fi; }
trap cleanup EXIT
"$STACK_DIR/up.sh"
"$REPO_ROOT/scripts/dev-setup.sh"
"$REPO_ROOT/scripts/services.sh" up
set +e
"$@"
rc=$?
exit $rc
