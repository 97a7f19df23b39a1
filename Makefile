# Every target sets itself up: `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# protoc-gen-mypy (from mypy-protobuf) must be on PATH for `make proto`.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
PROTOS := $(shell find protos -name '*.proto' | sort)
MODELS := examples/housing/models/.stamp
# Debian's prometheus, chromium and chromedriver: the tests' real Prometheus and browser.
SYSTEM_TOOLS := prometheus chromium chromium-driver

.PHONY: system-tools test-slow install lock proto proto-check fmt lint test test-all demo models bench bench-auth bench-traffic bench-http bench-pause clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,train,plot]'
	touch $(STAMP)

# Moves every locked package to the newest version pyproject allows; run the tests, then commit.
lock: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade --upgrade-strategy eager \
	  -e '.[dev,train,plot]'
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos \
	  --mypy_out=quiet:protos --mypy_grpc_out=only_async,quiet:protos $(PROTOS)

# Generated code is committed; this fails when it drifts from the .proto sources.
proto-check: proto
	@test -z "$$(git status --porcelain protos)" || \
	  { git status --porcelain protos; echo "generated code is stale: run 'make proto' and commit"; exit 1; }

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

lint: $(STAMP)
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check . && $(VENV)/bin/mypy

# Installs what is missing when this user may (root, as in CI); elsewhere the tests that need
# a tool skip and say which.
system-tools:
	@missing=$$(for p in $(SYSTEM_TOOLS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: $(STAMP) system-tools
	$(VENV)/bin/pytest -m "not slow and not gpu"

# The tests marked slow alone (network-namespace hosts, kills and restarts, drains, model
# training); CI runs them after `make test`.
test-slow: $(STAMP) system-tools
	$(VENV)/bin/pytest -m "slow and not gpu"

test-all: $(STAMP) system-tools
	$(VENV)/bin/pytest

models: $(MODELS)

$(MODELS): $(STAMP) examples/housing/make_models.py
	$(PY) examples/housing/make_models.py --out examples/housing/models
	touch $(MODELS)

# Benchmarks write bench/results/<date>-<host>.{json,md}; QUICK=1 for the short run, PEERS=1
# to add KServe (installed into its own virtualenv, bench/.peers, on first use).
bench: $(STAMP)
	$(PY) bench/run.py $(if $(QUICK),--quick) $(if $(PEERS),--peers)

# The token check's cost alone (make bench includes it): bench/results/<date>-<host>-auth.md.
bench-auth: $(STAMP)
	$(PY) -m bench._auth

# Shadow deploys' cost to the champion alone (make bench includes it): <date>-<host>-traffic.md.
bench-traffic: $(STAMP)
	$(PY) -m bench._shadow

# The serving pause by model size alone, in process vs a process of its own (make bench
# includes it): bench/results/<date>-<host>-pause.md.
bench-pause: $(STAMP)
	$(PY) bench/run.py --pause-only $(if $(QUICK),--quick)

# HTTP's cost next to gRPC's alone (make bench includes it): <date>-<host>-http.md.
bench-http: $(STAMP)
	$(PY) -m bench._http $(if $(PEERS),--peers)

demo: $(STAMP) $(MODELS)
	$(VENV)/bin/hotswap demo --models examples/housing/models

clean:
	rm -rf $(VENV) examples/housing/models .pytest_cache .mypy_cache .ruff_cache
