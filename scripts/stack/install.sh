#!/usr/bin/env bash
# Installs the local stack into $ENCLAVE_CACHE, once per pinned version:
#   Apache Kafka (broker jars from Maven Central), MinIO and FerretDB (built with Go).
# Safe to run again: a finished install is detected by its binary and skipped.
. "$(dirname "$0")/common.sh"
mkdir -p "$ENCLAVE_CACHE"

install_kafka() {
  if [ -f "$KAFKA_HOME/.complete" ]; then log "kafka $KAFKA_VERSION: cached"; return; fi
  log "kafka $KAFKA_VERSION: resolving broker jars from Maven Central"
  rm -rf "$KAFKA_HOME"; mkdir -p "$KAFKA_HOME/libs"
  mvn -B -ntp -f "$STACK_DIR/kafka-pom.xml" \
    -Dkafka.version="$KAFKA_VERSION" -Dkafka.scala="$KAFKA_SCALA" -Dslf4j.version="$SLF4J_RELOAD4J_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$KAFKA_HOME/libs" -DincludeScope=runtime \
    | grep -E 'BUILD|ERROR' | sed 's/^/[mvn] /' >&2
  ls "$KAFKA_HOME/libs"/kafka_"$KAFKA_SCALA"-"$KAFKA_VERSION".jar >/dev/null
  touch "$KAFKA_HOME/.complete"
  log "kafka: $(ls "$KAFKA_HOME/libs" | wc -l) jars"
}

install_minio() {
  if [ -x "$MINIO_BIN" ]; then log "minio $MINIO_MODULE_VERSION: cached"; return; fi
  log "minio $MINIO_MODULE_VERSION: building with Go (several minutes on 2 cores)"
  local dir; dir="$(dirname "$MINIO_BIN")"; mkdir -p "$dir"
  GOBIN="$dir.tmp" CGO_ENABLED=0 go install -v "github.com/minio/minio@$MINIO_MODULE_VERSION" 2>&1 \
    | awk '{n++; if (n % 50 == 0) printf "[go] minio: %d packages compiled\n", n > "/dev/stderr"}'
  mv "$dir.tmp/minio" "$MINIO_BIN"; rmdir "$dir.tmp"
  log "minio: built $MINIO_BIN"
}

install_ferretdb() {
  if [ -x "$FERRETDB_BIN" ]; then log "ferretdb $FERRETDB_VERSION: cached"; return; fi
  log "ferretdb $FERRETDB_VERSION (patch level $FERRETDB_PATCH_LEVEL): downloading module and building (a plain go install panics at start)"
  local src dir; dir="$(dirname "$FERRETDB_BIN")"
  src="$(go mod download -json "github.com/FerretDB/FerretDB@$FERRETDB_VERSION" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  rm -rf "$dir.src"; mkdir -p "$dir"; cp -r "$src" "$dir.src"; chmod -R u+w "$dir.src"
  echo "$FERRETDB_VERSION" > "$dir.src/build/version/version.txt"
  echo "enclave-local" > "$dir.src/build/version/package.txt"
  local patch
  for patch in "$STACK_DIR"/patches/ferretdb-"$FERRETDB_VERSION"-*.patch; do
    [ -e "$patch" ] || continue
    log "ferretdb: applying $(basename "$patch")"
    patch -s -p1 -d "$dir.src" < "$patch"
  done
  (cd "$dir.src" && CGO_ENABLED=0 go build -v -o "$FERRETDB_BIN" ./cmd/ferretdb 2>&1 \
    | awk '{n++; if (n % 50 == 0) printf "[go] ferretdb: %d packages compiled\n", n > "/dev/stderr"}')
  rm -rf "$dir.src"
  log "ferretdb: built $FERRETDB_BIN"
}

need() { command -v "$1" >/dev/null || { log "missing tool: $1 ($2)"; exit 1; }; }
need java "OpenJDK 17+"; need mvn "Apache Maven"; need go "Go 1.24+"

case "${1:-all}" in
  kafka) install_kafka ;;
  minio) install_minio ;;
  ferretdb) install_ferretdb ;;
  all) install_kafka; install_ferretdb; install_minio ;;
  *) echo "usage: $0 [all|kafka|minio|ferretdb]" >&2; exit 2 ;;
esac
