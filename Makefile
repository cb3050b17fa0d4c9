# The project's commands. Each works on a fresh machine with Python 3.9+ and a
# C++17 compiler: it creates .venv (CPU torch pinned) with what it needs
# (make demo: the demo's packages only), builds the C++ kernels, then runs.
#   make demo    the main job: train with full / uniform / ES / ESWP on the digits
#                and compare; ends with the verdict, writes demo_results/ (es-kernels
#                demo; minutes on a busy 2-core machine. DEMO_ARGS=--full: the study,
#                MNIST-1D too and every method; DEMO_ARGS=--quick: a smoke test;
#                DEMO_ARGS=--eta-only: the estimated run time; DEMO_ARGS="--task lm":
#                the language-model task)
#   make test    the test suite (with the install tests, marked slow)
#   make bench   the op benchmark (bench/bench_ops.py; BENCH_ARGS=--quick for a
#                smoke run): writes bench/results/cpu_ops_<date>.json, appends
#                to bench/results/history.csv, redraws bench/results/cpu_ops.png
#   make aot     every Triton kernel variant compiled for sm_90a / sm_80 (about half an hour)
#   make lint    ruff (lint + format check), mypy (the static type check of
#                es_kernels/, configured in pyproject.toml) and clang-format
#   make clean   removes the build (the next make rebuilds); make distclean also .venv
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc) CMakeLists.txt setup.py pyproject.toml

.PHONY: install test lint bench demo aot clean distclean

# torch first, pinned: a bare `torch` requirement pulls the multi-GB CUDA build
# (the local CPU wheel where pip's config has one), with the build tools. Then
# the package as pure Python (an editable install) with the extra a target
# needs: `demo` for make demo, `dev` (tests, linters, Triton, integrations)
# for the rest; the C++ build is its own step, with its progress shown.
$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) "setuptools>=77.0.3" "cmake>=3.18.4" "ninja>=1.11.1"
	touch $@

$(VENV)/.deps: $(VENV)/.base pyproject.toml
	ES_KERNELS_NO_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

$(VENV)/.demo-deps: $(VENV)/.base pyproject.toml
	ES_KERNELS_NO_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e ".[demo]"
	touch $@

# The C++ kernels, in place (es_kernels/_C*.so, which the editable install
# imports). ES_KERNELS_REQUIRE_BUILD: here a failed build is an error, not a
# pure-Python package with a warning.
$(VENV)/.built: $(VENV)/.base $(CSRC)
	@echo "es-kernels: building the C++ CPU kernels (CMake + Ninja; about 2 minutes on 2 cores)"
	ES_KERNELS_REQUIRE_BUILD=1 $(PY) setup.py -q build_ext --inplace
	touch $@

install: $(VENV)/.deps $(VENV)/.built

# The suite, then the op tests once more on a pure-Python install's kernels
# (ES_KERNELS_NO_CPP=1: torch.ops on CPU tensors run the reference fallback),
# then the C++ cross-entropy's portable copy (ES_KERNELS_NO_AVX2=1; the suite
# ran the AVX2 copy where the CPU has it).
test: install
	$(PY) -m pytest -q python_tests
	ES_KERNELS_NO_CPP=1 $(PY) -m pytest -q python_tests/test_update.py python_tests/test_select.py \
	    python_tests/test_step.py python_tests/test_prune.py python_tests/test_cross_entropy.py \
	    python_tests/test_api.py python_tests/test_op_contract.py -k "not triton and not frequencies"
	ES_KERNELS_NO_AVX2=1 $(PY) -m pytest -q python_tests/test_cross_entropy.py \
	    python_tests/test_cross_entropy_extremes.py python_tests/test_step.py -k "not triton"

# Every Triton kernel variant compiled for sm_90a and sm_80 (no GPU needed):
# 1,928 compiles, about 30 minutes on 2 cores (Triton's cache makes a
# rerun faster); rewrites bench/results/aot_kernels.md and .json. make test runs
# the fast part (the launch matrix, ce_kernel at LM vocabularies).
aot: install
	ES_KERNELS_AOT_FULL=1 $(PY) -m pytest -q python_tests/test_aot_compile.py

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h

bench: install
	$(PY) bench/bench_ops.py $(BENCH_ARGS)
	$(PY) bench/plot.py --bench cpu_ops

demo: $(VENV)/.demo-deps $(VENV)/.built
	$(PY) -m es_kernels demo $(DEMO_ARGS)

clean:
	rm -rf build dist es_kernels/_C*.so *.egg-info $(VENV)/.built

distclean: clean
	rm -rf $(VENV)
