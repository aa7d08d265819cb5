# esim-fulfillment — the two commands that matter: `make run` and `make test`.
SHELL := /bin/bash
UV_VERSION := 0.13.9
export UV_PYTHON_DOWNLOADS := never
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif

.PHONY: help setup services tools migrate run sandbox test test-unit check bench bench-pipeline clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## create .venv from uv.lock (installs uv first if missing)
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 \
	  || python3 -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) sync --frozen --all-packages

services:  ## make sure RabbitMQ and PostgreSQL answer (starts the local ones)
	scripts/ensure-services.sh

tools:  ## make sure the tools the tests call are installed (promtool, from Debian's prometheus package)
	scripts/ensure-tools.sh

migrate: setup services  ## create the database if needed and apply deploy/migrations
	$(UV) run --frozen esim-migrate --create-database

run: migrate  ## run the whole system in the sandbox, push one sample order through it (Ctrl-C stops it)
	$(UV) run --frozen python -m esim_sandbox.demo

sandbox: setup  ## only the emulators (Stripe, Zendit, SMTP capture) on their default ports
	$(UV) run --frozen python -m esim_sandbox

test: setup services tools  ## the whole suite on the real broker and database
	$(UV) run --frozen pytest

test-unit: setup  ## only the fast tests that need no broker or database
	$(UV) run --frozen pytest tests/unit

check: setup  ## lint and type-check
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy libs/common/esim_common

bench: setup services  ## run the benchmarks and record their results under bench/results (BENCH_ARGS=...)
	$(UV) run --frozen python -m bench.webhook_load $(BENCH_ARGS)

bench-pipeline: setup services  ## the whole-pipeline benchmark (all services + emulators) (BENCH_ARGS=...)
	$(UV) run --frozen python -m bench.pipeline_load $(BENCH_ARGS)

clean:  ## remove the environment and local artefacts
	rm -rf .venv var .pytest_cache .ruff_cache .mypy_cache
