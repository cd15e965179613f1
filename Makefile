# One command each: `make demo` runs the whole demo chain, `make test` runs the test suite.
# Both create the virtual environment (.venv) and install medldm into it first.
VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
TEST_WORKERS ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test install system-test-deps lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	snakemake --cores $(CORES)

# Debian packages some tests use (headless Chromium for the report page, SLURM for the cluster
# test): installed when we are root with apt-get; otherwise those tests skip and say why.
system-test-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  command -v chromium >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	else echo "not root with apt-get: browser and SLURM tests will skip"; fi

# pytest-xdist: one worker per core; the SLURM tests share one cluster, so one worker runs them
# all (tests/conftest.py). TEST_WORKERS=0 runs in this process.
test: install system-test-deps
	python -m pytest -n $(TEST_WORKERS)

lint: install
	ruff check .
	snakemake --lint

clean:
	rm -rf results .snakemake
