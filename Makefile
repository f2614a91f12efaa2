# Flameup Events: what a newcomer needs. `make run` and `make test` are the
# two commands the README starts with; both create the virtualenv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PROTO_FILES := $(shell find proto -name '*.proto')
PROTODEPS := build/protodeps

STORE ?= sqlite:///./data/events.db
GRPC_PORT ?= 50051
HTTP_PORT ?= 8080

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,cassandra]'
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create .venv with the service and test dependencies

$(BUF): package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

# google/api/{annotations,http}.proto ship inside the googleapis-common-protos
# wheel; copy them out so protoc and buf see the same files without a network.
$(PROTODEPS)/.stamp: $(VENV)/.installed
	rm -rf $(PROTODEPS) && mkdir -p $(PROTODEPS)/google/api
	$(PY) -c 'import google.api, pathlib, shutil, sys; src = pathlib.Path(google.api.__path__[0]); [shutil.copy(src / f, sys.argv[1]) for f in ("annotations.proto", "http.proto")]' $(PROTODEPS)/google/api
	touch $@

.PHONY: generate
generate: $(PROTODEPS)/.stamp ## regenerate generated/ from proto/ (offline)
	rm -rf generated/flameup
	mkdir -p generated
	$(PY) -m grpc_tools.protoc -I proto -I $(PROTODEPS) \
	  --python_out=generated --pyi_out=generated --grpc_python_out=generated $(PROTO_FILES)

.PHONY: check-generated
check-generated: generate ## fail when generated/ is stale
	git diff --exit-code -- generated
	@test -z "$$(git status --porcelain -- generated)" || { git status --porcelain -- generated; echo 'untracked generated files'; exit 1; }

.PHONY: lint
lint: $(BUF) $(PROTODEPS)/.stamp ## buf lint and buf format check
	$(BUF) lint
	$(BUF) format --diff --exit-code proto

.PHONY: run
run: $(VENV)/.installed ## start gRPC (:50051) and REST (:8080) on the embedded store
	$(PY) -m service serve --store '$(STORE)' --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT)

.PHONY: test
test: $(VENV)/.installed ## run the whole test suite (starts Cassandra when needed)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: $(VENV)/.installed ## the suite without the tests that need Cassandra (never starts it)
	$(PY) -m pytest -m 'not cassandra' $(PYTEST_ARGS)

.PHONY: clean
clean: ## remove the virtualenv, build output and local data
	rm -rf $(VENV) build node_modules data

.PHONY: cassandra-up
cassandra-up: ## start a local single-node Cassandra on 127.0.0.1:9042 (data in .cassandra-local/)
	scripts/cassandra.sh up

.PHONY: cassandra-down
cassandra-down: ## stop the local Cassandra (data is kept; scripts/cassandra.sh down --wipe drops it)
	scripts/cassandra.sh down

.PHONY: bench
bench: $(VENV)/.installed ## benchmark the real service next to the store's own limit (BENCH_QUICK=1: short run)
	$(PY) -m bench.run $(BENCH_ARGS)
