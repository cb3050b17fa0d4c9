# The project's commands. Each works on a fresh machine with Python 3.9+ and a
# C++17 compiler: it creates .venv (CPU torch pinned), builds the C++ kernels,
# then runs.
#   make demo    the main job: train with full / uniform / ES / ESWP / InfoBatch
#                and compare (es-kernels demo; DEMO_ARGS=--quick: a smoke test,
#                DEMO_ARGS=--eta-only: the estimated run time)
#   make test    the test suite
#   make bench   the op benchmark (bench/bench_ops.py; BENCH_ARGS=--quick for a
#                smoke run): writes bench/results/cpu_ops_<date>.json, appends
#                to bench/results/history.csv, redraws bench/results/cpu_ops.png
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

CSRC := $(wildcard csrc/*.cpp csrc/*.h) CMakeLists.txt setup.py pyproject.toml

.PHONY: install test bench demo clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest -q python_tests

bench: install
	$(PY) bench/bench_ops.py $(BENCH_ARGS)
	$(PY) bench/plot.py --bench cpu_ops

demo: install
	$(PY) -m es_kernels demo $(DEMO_ARGS)

clean:
	rm -rf build es_kernels/_C*.so *.egg-info
