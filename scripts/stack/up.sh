#!/usr/bin/env bash
# Starts the local stack on loopback (Kafka KRaft, MinIO, FerretDB/SQLite), installing it first if needed.
# Data lives under $ENCLAVE_STATE, logs in $ENCLAVE_STATE/logs, pids in $ENCLAVE_STATE/pids.
# Safe to run twice: a component whose pid is alive is left alone.
. "$(dirname "$0")/common.sh"
components=("$@"); [ ${#components[@]} -gt 0 ] || components=(kafka ferretdb minio)
for c in "${components[@]}"; do "$STACK_DIR/install.sh" "$c"; done
mkdir -p "$PIDS_DIR" "$LOGS_DIR" "$ENCLAVE_STATE/kafka" "$ENCLAVE_STATE/minio" "$ENCLAVE_STATE/ferretdb"

start() { # name logfile command...
  local name="$1" logfile="$2"; shift 2
  if pid_alive "$name"; then log "$name already running (pid $(cat "$PIDS_DIR/$name.pid"))"; return 1; fi
  setsid "$@" >>"$logfile" 2>&1 < /dev/null &
  echo $! > "$PIDS_DIR/$name.pid"
  log "$name started (pid $!), log: $logfile"
}

start_kafka() {
  local conf="$ENCLAVE_STATE/kafka/server.properties" data="$ENCLAVE_STATE/kafka/data"
  cat > "$conf" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
num.partitions=3
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
min.insync.replicas=1
auto.create.topics.enable=true
message.max.bytes=2097152
replica.fetch.max.bytes=2097152
group.initial.rebalance.delay.ms=0
log.retention.hours=168
PROPS
  local log4j="$ENCLAVE_STATE/kafka/log4j.properties"
  cat > "$log4j" <<PROPS
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaServer=INFO
log4j.logger.kafka.server.BrokerServer=INFO
PROPS
  local java_opts=(-Xms256m -Xmx768m -XX:+UseG1GC -Dlog4j.configuration="file:$log4j" -cp "$KAFKA_HOME/libs/*")
  if [ ! -f "$data/meta.properties" ]; then
    log "kafka: formatting KRaft storage"
    java "${java_opts[@]}" kafka.tools.StorageTool format -t "$(cat "$ENCLAVE_STATE/kafka/cluster-id" 2>/dev/null || java "${java_opts[@]}" kafka.tools.StorageTool random-uuid | tee "$ENCLAVE_STATE/kafka/cluster-id")" -c "$conf" --ignore-formatted >&2
  fi
  start kafka "$LOGS_DIR/kafka.log" java "${java_opts[@]}" kafka.Kafka "$conf" || true
}

start_minio() {
  # A local KMS secret lets MinIO apply default bucket encryption (SSE-S3), our second layer at rest.
  local kms="$ENCLAVE_STATE/minio/kms-secret"
  [ -f "$kms" ] || (umask 077; printf 'enclave-local:%s' "$(head -c 32 /dev/urandom | base64)" > "$kms")
  MINIO_KMS_SECRET_KEY="$(cat "$kms")" MINIO_ROOT_USER="$MINIO_ROOT_USER" MINIO_ROOT_PASSWORD="$MINIO_ROOT_PASSWORD" MINIO_BROWSER=off \
  MINIO_UPDATE=off MINIO_CI_CD=1 \
    start minio "$LOGS_DIR/minio.log" "$MINIO_BIN" server "$ENCLAVE_STATE/minio/data" \
      --address "127.0.0.1:$MINIO_PORT" --console-address "127.0.0.1:$MINIO_CONSOLE_PORT" --quiet || true
}

start_ferretdb() {
  mkdir -p "$ENCLAVE_STATE/ferretdb/data"
  start ferretdb "$LOGS_DIR/ferretdb.log" "$FERRETDB_BIN" --handler=sqlite \
    --sqlite-url="file:$ENCLAVE_STATE/ferretdb/data/" --listen-addr="127.0.0.1:$MONGO_PORT" \
    --telemetry=disable --log-level="${ENCLAVE_FERRETDB_LOG_LEVEL:-WARN}" --state-dir="$ENCLAVE_STATE/ferretdb" --debug-addr="127.0.0.1:${ENCLAVE_FERRETDB_DEBUG_PORT:-18088}" || true
}

for c in "${components[@]}"; do "start_$c"; done
for c in "${components[@]}"; do
  case "$c" in
    minio) wait_for "minio on :$MINIO_PORT" 60 curl -sf "http://127.0.0.1:$MINIO_PORT/minio/health/ready" ;;
    ferretdb) wait_for "ferretdb on :$MONGO_PORT" 60 port_open "$MONGO_PORT" ;;
    kafka) wait_for "kafka on :$KAFKA_PORT" 90 "$STACK_DIR/kafka-ready.sh" ;;
  esac
done
