# Enclave: the commands a person runs, and the same ones CI runs (.ci/run calls `make test`).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
PYTEST := .venv/bin/pytest
STACK := scripts/stack
ENCLAVE_CACHE ?= $(HOME)/.cache/enclave
UV := $(ENCLAVE_CACHE)/uv-$(shell sed -n 's/^UV_VERSION=//p' scripts/bootstrap.sh)/bin/uv

.PHONY: help bootstrap install-stack up down status stack-up stack-down services-up services-down \
        test lint unit integration bench bench-crypto bench-deid bench-audit bench-analysis bench-gateway \
        fuzz openapi asyncapi clean-state deploy-tools deploy-test images chaos bench-pipeline

help: ## List the targets
	@grep -E '^[a-z][a-z -]*:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-18s %s\n", $$1, $$2}'

bootstrap: ## Install uv (pinned) and the locked Python environment
	@scripts/bootstrap.sh

install-stack: ## Build/download Kafka, MinIO and FerretDB into the cache (once per version)
	@$(STACK)/install.sh all

up: bootstrap ## Install on first use, start the stack and all five services, print the endpoints
	@$(STACK)/up.sh
	@scripts/dev-setup.sh
	@scripts/services.sh up
	@$(STACK)/status.sh

down: ## Stop exactly the processes `make up` started
	@$(STACK)/down.sh

status: ## Which of our processes run, with endpoints
	@$(STACK)/status.sh

stack-up: bootstrap ## Start only Kafka, MinIO and FerretDB (and create the dev keys and topics)
	@$(STACK)/up.sh && scripts/dev-setup.sh
stack-down: ## Stop only Kafka, MinIO and FerretDB
	@$(STACK)/down.sh kafka minio ferretdb
services-up: ## Start only the five services (exported ENCLAVE_* settings win over .state/dev.env)
	@scripts/services.sh up
services-down: ## Stop only the five services
	@scripts/services.sh down

lint: bootstrap ## ruff, mypy (strict on libs/common), spec drift
	@.venv/bin/ruff check .
	@.venv/bin/ruff format --check .
	@.venv/bin/mypy
	@$(PY) scripts/specs.py --check

unit: bootstrap ## Unit tests (no network)
	@$(PYTEST) libs/common/tests services -q -m "not integration"

deploy-tools: ## Install the pinned kustomize, kubeconform, promtool and schemas for deploy-test (cached)
	@scripts/install-deploy-tools.sh >/dev/null

deploy-test: bootstrap deploy-tools ## kustomize build + offline schema validation of deploy/k8s, Dockerfile lint
	@$(PYTEST) tests/deploy -q $(NO_HYPOTHESIS)

images: ## Build the five container images (needs a Docker engine; not available on the dev machines)
	@for s in gateway ingest deid analysis audit; do docker build -f services/$$s/Dockerfile -t enclave/$$s:$${TAG:-dev} . || exit 1; done

# The deploy and integration suites use no Hypothesis, yet its pytest plugin imports it at the end of a
# run (terminal summary). On CPython 3.11 that late import can die with "SystemError: AST constructor
# recursion depth mismatch" after every test passed (CI, d7ffde6): the ast module's recursion counter
# is shared, and 3.11's traceback module parses source lines, so a traceback formatted meanwhile (by
# a finalizer's unraisable-exception hook, or a thread) upsets pytest's assertion rewriting of the
# imported module (cpython#106905; reproduced here with a finalizer raising during ast.parse and a
# hook formatting its traceback, as pytest's does). Those runs leave the plugin out.
NO_HYPOTHESIS = -p no:hypothesispytest
INTEGRATION_TESTS = $(PYTEST) tests/integration -q -m integration $(NO_HYPOTHESIS)

integration: bootstrap ## Integration tests on the real stack (starts it if needed, stops only what it started)
	@scripts/with-stack.sh $(INTEGRATION_TESTS)

test: bootstrap deploy-tools ## Everything: lint, unit tests, deploy validation, integration tests
	@scripts/with-stack.sh --meanwhile '$(MAKE) --no-print-directory lint unit deploy-test' $(INTEGRATION_TESTS)

openapi asyncapi: bootstrap ## Regenerate the committed OpenAPI/AsyncAPI documents from the code
	@$(PY) scripts/specs.py --write

bench: bench-crypto bench-deid bench-audit bench-analysis bench-gateway bench-pipeline ## All benchmarks, each side by side with its baseline

bench-crypto: bootstrap ## Streaming AEAD vs raw AES-GCM, then ingest throughput (chunks -> stored) on the stack
	@$(PY) bench/crypto.py
	@scripts/with-stack.sh $(PY) bench/ingest.py
bench-deid: bootstrap ## De-identification throughput: Enclave vs dicognito, dicom-anonymizer and a plain pydicom copy
	@$(UV) run --frozen --package enclave-deid --group bench python bench/deid.py
bench-audit: bootstrap ## Audit hash chain: append rate, query p95, verify and checkpoint times
	@scripts/with-stack.sh $(PY) bench/audit_chain.py --records 1000000 --db-records 2000 --query-runs 5
bench-analysis: bootstrap ## Analysis of the MNI152 brain as a DICOM series: wall time and peak RSS per stage
	@$(PY) bench/analysis.py
bench-gateway: bootstrap ## STOW-RS: HTTP floor, Orthanc and the gateway side by side; RSS for 1 GiB
	@scripts/install-orthanc.sh
	@scripts/with-stack.sh $(PY) bench/gateway.py
bench-pipeline: bootstrap ## Whole pipeline: acceptance vs Orthanc, time to audited/de-identified, per-stage rates, RSS/CPU
	@scripts/install-orthanc.sh
	@scripts/with-stack.sh $(PY) bench/pipeline.py

chaos: bootstrap ## Kill -9 every component in turn, then hang FerretDB, during 500 uploads; check nothing acknowledged is lost or duplicated
	@scripts/with-stack.sh $(PY) scripts/chaos.py

FUZZ_SECONDS ?= 60
fuzz: bootstrap ## Bounded-time fuzzing of the multipart parser and DICOM validation (FUZZ_SECONDS=60)
	@$(PY) services/gateway/fuzz/fuzz_edge.py --seconds $(FUZZ_SECONDS)

clean-state: down ## Stop everything and delete local data (keeps the install cache)
	rm -rf .state
