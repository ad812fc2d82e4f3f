# The two commands a fresh machine needs: `make demo` and `make test`. Everything they need is set up here.
# Before a release: `make dist-check` builds the sdist and wheel and runs the example shop on the wheel.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_PORT ?= 7000
DEMO_DATA := .devcluster/demo-$(DEMO_PORT)
DEMO_LOCATION := redis://127.0.0.1:$(DEMO_PORT),redis://127.0.0.1:$(shell echo $$(($(DEMO_PORT)+1))),redis://127.0.0.1:$(shell echo $$(($(DEMO_PORT)+2)))
# The demo's Celery broker (a standalone Redis) and its worker, which drains the write-behind view counts.
DEMO_BROKER_PORT ?= 7010
DEMO_ENV := DISTCACHE_LOCATION=$(DEMO_LOCATION) DISTCACHE_BROKER_URL=redis://127.0.0.1:$(DEMO_BROKER_PORT)/0
DEMO_WORKER_LOG := .devcluster/demo-worker.log
DEMO_WORKER_PID := .devcluster/demo-worker.pid
# An absolute data dir: broker-up cannot start the server with a relative one.
DEMO_BROKER_ARGS := --base-port $(DEMO_BROKER_PORT) --data-dir $(CURDIR)/.devcluster/broker-$(DEMO_BROKER_PORT)

# A second interpreter (>= 3.12) for the newest Django, when the machine has one (pyenv or PATH).
NEWEST_PYTHON ?= $(shell for v in 3.14 3.13 3.12; do \
	  p=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v*/bin/python 2>/dev/null | sort -V | tail -1); \
	  [ -z "$$p" ] && p=$$(command -v python$$v 2>/dev/null); \
	  if [ -n "$$p" ] && "$$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then echo $$p; break; fi; \
	done)
VENV_NEWEST := .venv-newest-django

.PHONY: chaos venv demo docs-options test test-main test-newest-django test-under-load bench lint cluster-up cluster-down clean dist-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

venv: $(STAMP)

cluster-up: venv
	$(PY) -m django_distcache.devcluster up --base-port $(DEMO_PORT) --data-dir $(DEMO_DATA)

cluster-down: venv
	@pid=$$(cat $(DEMO_WORKER_PID) 2>/dev/null); \
	if [ -n "$$pid" ] && ps -o args= -p $$pid 2>/dev/null | grep -q celery; then \
	  echo "Stopping the demo's Celery worker (pid $$pid)"; kill -TERM $$pid; \
	  for _ in $$(seq 150); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
	  if kill -0 $$pid 2>/dev/null; then echo "The worker did not stop in 15 s; killing it"; kill -KILL $$pid; fi; \
	fi; \
	rm -f $(DEMO_WORKER_PID)
	$(PY) -m django_distcache.devcluster broker-down $(DEMO_BROKER_ARGS)
	$(PY) -m django_distcache.devcluster down --base-port $(DEMO_PORT) --data-dir $(DEMO_DATA)

# The worker is started through the `celery` script with absolute paths: on SIGHUP it re-executes its own
# command line from the directory --workdir moved it to (`python -m celery` re-runs as a plain script and
# fails on a relative import).
demo: cluster-up
	$(PY) -m django_distcache.devcluster broker-up $(DEMO_BROKER_ARGS)
	cd example_project && $(DEMO_ENV) ../$(PY) manage.py migrate --noinput
	cd example_project && $(DEMO_ENV) DISTCACHE_DEMO_SUPERUSER=1 ../$(PY) manage.py seed_catalogue
	cd example_project && $(DEMO_ENV) ../$(PY) manage.py warmcache --all
	@pid=$$(cat $(DEMO_WORKER_PID) 2>/dev/null); \
	if [ -n "$$pid" ] && ps -o args= -p $$pid 2>/dev/null | grep -q celery; then \
	  echo "The demo's Celery worker is already running (pid $$pid)"; \
	else \
	  $(DEMO_ENV) nohup $(CURDIR)/$(VENV)/bin/celery --workdir $(CURDIR)/example_project -A shop worker -B -P solo \
	    -l info -s $(CURDIR)/.devcluster/demo-beat-schedule >$(DEMO_WORKER_LOG) 2>&1 & \
	  echo $$! >$(DEMO_WORKER_PID); \
	  echo "Started a Celery worker with beat (pid $$!): it writes the view counts to the database."; \
	fi
	@echo "The worker logs to $(DEMO_WORKER_LOG)."
	@echo "Serving the catalogue on http://127.0.0.1:8000/ (admin: admin/admin); Ctrl-C stops it and the"
	@echo "worker, 'make cluster-down' stops the local cluster and the broker (and the worker, if it runs)."
	cd example_project && $(DEMO_ENV) ../$(PY) manage.py runserver 127.0.0.1:8000

# Both legs always run, the second even when the first fails; a summary of the two follows, and the target
# fails if either did. Each leg's output is kept in $(TEST_LOGS)/<leg>.log too (test-under-load reads it).
TEST_LOGS := .cache/test-logs
# pytest's output goes through tee (so unbuffered, -u), in colour when make's own output is a terminal.
PYTEST_COLOR := color=; [ -t 1 ] && color=--color=yes;
test: venv
	@mkdir -p $(TEST_LOGS); rm -f $(TEST_LOGS)/main.log $(TEST_LOGS)/newest-django.log; \
	main=0; newest=0; \
	$(MAKE) --no-print-directory test-main || main=$$?; \
	$(MAKE) --no-print-directory test-newest-django || newest=$$?; \
	.ci/test-summary $(TEST_LOGS) main=$$main newest-django=$$newest

test-main: venv
	@mkdir -p $(TEST_LOGS)
	@echo "== Django $$($(PY) -c 'import django, sys; print(django.__version__, "on Python", sys.version.split()[0])')"
	set -o pipefail; $(PYTEST_COLOR) $(PY) -u -m pytest -q $$color 2>&1 | tee $(TEST_LOGS)/main.log

test-newest-django:
	@mkdir -p $(TEST_LOGS)
	@set -o pipefail; if [ -z "$(NEWEST_PYTHON)" ]; then \
	  echo "test-newest-django: no Python >= 3.12 on this machine; the newest Django needs one (skipped)" \
	    | tee $(TEST_LOGS)/newest-django.log; \
	else \
	  set -e; \
	  [ -x $(VENV_NEWEST)/bin/python ] || $(NEWEST_PYTHON) -m venv $(VENV_NEWEST); \
	  $(VENV_NEWEST)/bin/python -m pip install --quiet --upgrade pip; \
	  $(VENV_NEWEST)/bin/python -m pip install --quiet --upgrade -e ".[dev]" "django>=6"; \
	  echo "== newest Django: $$($(VENV_NEWEST)/bin/python -c 'import django, sys; print(django.__version__, "on Python", sys.version.split()[0])')"; \
	  echo "== (tests/test_chaos.py runs in the main pass only: it kills, stops and reshards cluster nodes under"; \
	  echo "   load, 45 s of the suite's 10-minute budget, and what it exercises, the topology's failure handling,"; \
	  echo "   does not change with Django's version)"; \
	  $(PYTEST_COLOR) $(VENV_NEWEST)/bin/python -u -m pytest -q $$color --ignore=tests/test_chaos.py 2>&1 \
	    | tee $(TEST_LOGS)/newest-django.log; \
	fi

# `make test` RUNS times (default 5) with BURNERS (default 3) CPU-burning processes beside it, as on a
# developer's busy machine (the tests are not niced); the burners are stopped however it ends. Prints
# passed/failed per run and per leg, and fails if any run did.
RUNS ?= 5
BURNERS ?= 3
test-under-load: venv
	@RUNS=$(RUNS) BURNERS=$(BURNERS) TEST_LOGS=$(TEST_LOGS) MAKE="$(MAKE)" .ci/test-under-load

bench: venv
	$(PY) -m bench.run_all

# Node failures under load (kill -9, SIGSTOP, restart, reshard, invalidation during an outage), then the
# write-behind drain faults on the machine's PostgreSQL (a database chaos_behind it creates and drops);
# prints the tables of docs/failure.md and exits non-zero if a write was lost or a row went backwards.
# `make test` runs the short forms (tests/test_chaos.py, tests/test_behind_chaos.py).
chaos: venv
	$(PY) -m bench.chaos

# The options table of docs/configuration.md, rendered from the options declared in django_distcache/conf.py
# (tests/test_conf.py fails while the two differ).
docs-options: venv
	$(PY) -m django_distcache.conf docs/configuration.md

# Ruff (lint, format, complexity at 12 on the package) and mypy --strict on the package (pyproject.toml).
lint: venv
	$(PY) -m ruff check django_distcache tests bench example_project
	$(PY) -m ruff format --check django_distcache tests bench
	$(PY) -m mypy

# Build the sdist and wheel (python -m build), check them (twine check --strict, and .ci/dist_check.py: what
# they must and must not hold), install the wheel with its celery extra into a fresh venv, and run the
# example shop on it against a cluster of its own (its own ports and data dir; stopped however the run
# ends): check, migrate, seed, warmcache, two visits of two pages through the test client, a drain.
DIST_PORT ?= 7200
DIST_DIR := .cache/dist
DIST_VENV := .cache/dist-venv
DIST_DATA := $(CURDIR)/.devcluster/dist-$(DIST_PORT)
DIST_ENV := DISTCACHE_LOCATION=redis://127.0.0.1:$(DIST_PORT),redis://127.0.0.1:$(shell echo $$(($(DIST_PORT)+1))) \
	DISTCACHE_BROKER_URL=redis://127.0.0.1:$(shell echo $$(($(DIST_PORT)+8)))/0 \
	DISTCACHE_KEY_PREFIX=dist-check DISTCACHE_EXAMPLE_DB=$(CURDIR)/$(DIST_VENV)/example.sqlite3

dist-check: venv
	rm -rf $(DIST_DIR) $(DIST_VENV) && mkdir -p $(DIST_DIR)
	@# The build's log is long; shown when it fails or warns of a deprecation (setuptools' warnings are dated).
	$(PY) -m build --outdir $(DIST_DIR) . >$(DIST_DIR)/build.log 2>&1 || { cat $(DIST_DIR)/build.log; exit 1; }
	@if grep -i -B2 -A8 deprecat $(DIST_DIR)/build.log; then echo "dist-check: the build warns"; exit 1; fi
	@rm $(DIST_DIR)/build.log
	$(PY) -m twine check --strict $(DIST_DIR)/*
	$(PY) .ci/dist_check.py contents $(DIST_DIR)
	$(PYTHON) -m venv $(DIST_VENV)
	$(DIST_VENV)/bin/python -m pip install --quiet "$$(ls $(DIST_DIR)/*.whl)[celery]"
	@trap '$(CURDIR)/$(PY) -m django_distcache.devcluster down --base-port $(DIST_PORT) --data-dir $(DIST_DATA)' EXIT; \
	trap 'exit 130' INT TERM; set -e; \
	$(PY) -m django_distcache.devcluster up --base-port $(DIST_PORT) --data-dir $(DIST_DATA) >/dev/null; \
	cd example_project && env -u PYTHONPATH $(DIST_ENV) $(CURDIR)/$(DIST_VENV)/bin/python ../.ci/dist_check.py example

clean:
	rm -rf $(VENV) $(VENV_NEWEST) .cache .devcluster
