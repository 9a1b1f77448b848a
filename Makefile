# The README's two commands, `make demo` and `make test`, work alone on a fresh clone:
# each creates .venv when it is missing and installs the project into it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
WORKERS ?= 3
PORT   ?= 4200

.PHONY: install system-deps demo test bench server clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crawl2model demo

# Debian packages the tests use: chromium (the Prefect UI test), curl, iproute2 (unshare -n, ip),
# slurm-wlm and munge (a one-node Slurm for --executor slurm: tests/test_slurm.py).
system-deps:
	@missing=""; for c in chromium curl ip unshare slurmctld slurmd sbatch munged; do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium curl iproute2 util-linux slurm-wlm munge >/dev/null; \
	fi

# pytest-xdist workers: most slow tests wait (on process start-up, S3 retries, a stage to reach the
# point where it is killed), so 3 keep 2 cores busy. Ends with `suite took N s` (the pytest run
# alone, not the install).
test: $(STAMP) system-deps
	@start=$$(date +%s); $(PY) -m pytest -n $(WORKERS) $(PYTEST_ARGS); rc=$$?; \
	  echo "suite took $$(( $$(date +%s) - start )) s"; exit $$rc

bench: $(STAMP)
	$(PY) -m benchmarks.run

# A Prefect server on http://127.0.0.1:$(PORT) (4200) and every deployment served from this machine;
# SIGTERM or Ctrl-C stops both (make passes the signal on to the one process below it).
server: $(STAMP)
	exec $(PY) -m deployments.serve --start-server --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache lake
