# push-relay: every command sets up its own virtual environment (.venv) on first use.
#   make demo    the relay against the bundled fake providers, printing what each received
#   make test    the whole test suite (what CI runs); as root it first installs the system
#                tools some tests run (promtool, strace) with apt-get, when missing
#   make check   format, lint, types and tests
#   make bench   the relay beside the bare provider libraries on one nginx sink (~2.5 minutes);
#                as root it first installs nginx-light and its echo module with apt-get
PYTHON ?= python3
# The service writes no file, bytecode caches included: everything run from here runs so.
export PYTHONDONTWRITEBYTECODE := 1
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-tools bench bench-peer bytecode check lint types format proto

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) bytecode
	$(BIN)/push-relay demo

test: $(STAMP) test-tools bytecode
	$(BIN)/python -m pytest

# Bytecode is compiled here, ahead of any run, so that even `push-relay serve` started by hand
# without PYTHONDONTWRITEBYTECODE finds every cache fresh and writes none (only stale ones are
# recompiled). The image does the same at build time.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q relay adapters proto/pushrelay

bench: $(STAMP) bytecode
	@sh scripts/install-test-tools.sh nginx:nginx-light \
		/usr/lib/nginx/modules/ngx_http_echo_module.so:libnginx-mod-http-echo
	$(BIN)/python bench/bench_push.py

# The peer gateway beside the relay (bench/peer.py): Sygnal is not on PyPI, so it is installed
# by hand into a venv of its own, whose Python SYGNAL_PYTHON names.
bench-peer: $(STAMP) bytecode
	@sh scripts/install-test-tools.sh nginx:nginx-light \
		/usr/lib/nginx/modules/ngx_http_echo_module.so:libnginx-mod-http-echo
	$(BIN)/python bench/peer.py --sygnal-python "$(SYGNAL_PYTHON)"

# System tools some tests run (promtool, strace): installed when missing, as root with apt-get.
test-tools:
	@sh scripts/install-test-tools.sh

lint: $(STAMP)
	$(BIN)/ruff format --check relay adapters tests bench
	$(BIN)/ruff check relay adapters tests bench

types: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format relay adapters tests bench
	$(BIN)/ruff check --fix relay adapters tests bench

check: lint types test

# Regenerate the committed API code from proto/ (a test fails when it is stale).
proto: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--mypy_out=proto --mypy_grpc_out=proto proto/pushrelay/v1/relay.proto
