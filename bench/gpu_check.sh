#!/usr/bin/env bash
# One command on a CUDA machine (made for an H200; under 8 minutes): build the
# package with the machine's torch, run the tests (the Triton backend on
# CUDA), run the GPU checks (bench/gpu_checks.py: no host sync under
# torch.cuda.set_sync_debug_mode("error"), a CUDA graph of a sampler step
# replayed with fresh noise, torch.compile, the device guard), and time the
# Triton ops (bench/bench_gpu.py, BENCH_BUDGET_S seconds of timing, default
# 180), after the cost of a scoring step against a training step
# (bench_gpu.py --step-costs, about a minute). Results go to bench/results/gpu_ops_<date>.{json,md} and
# bench/results/history.csv, or to $OUT when set (the device tool); merge a
# device run's history with `python bench/harness.py merge $OUT/history.csv`.
# Where the tree has no .git (a copy), pass the commit: BENCH_COMMIT=<sha>[+].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== build (pip, the one build definition: setup.py + CMakeLists.txt; no CUDA toolkit needed)"
ES_KERNELS_REQUIRE_BUILD=1 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1 \
  || { tail -30 "$RESULTS/build.log"; exit 1; }

echo "== tests (Triton backend on CUDA; includes the ahead-of-time compile test)"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider python_tests 2>&1 | tee "$RESULTS/tests.log" | tail -15

echo "== no host sync, CUDA graph replay, torch.compile, device guard"
$PY bench/gpu_checks.py --out "$RESULTS"

echo "== a scoring step against a training step (demo models, a 1.2B LM in bf16)"
$PY bench/bench_gpu.py --step-costs --out "$RESULTS" 2>&1 | tee "$RESULTS/step_costs.log" | grep -v Warning

echo "== timings"
$PY bench/bench_gpu.py --out "$RESULTS" --budget-s "${BENCH_BUDGET_S:-180}"
