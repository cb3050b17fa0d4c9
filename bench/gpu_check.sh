#!/usr/bin/env bash
# One command on a CUDA machine (made for an H200; under 6 minutes): build the
# package with the machine's torch, run the tests (the Triton backend on
# CUDA), run the fused path under torch.cuda.set_sync_debug_mode("error"),
# and time the Triton ops (bench/bench_gpu.py). Results go to
# bench/results/gpu_<date>.{json,md}, or to $OUT when set (the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== build (CMakeLists.txt, the one build definition)"
# (CMake finds the interpreter's torch itself; no CUDA toolkit needed)
cmake -S . -B build/gpu -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" \
      -DES_KERNELS_OUTPUT_DIR="$PWD/es_kernels" > "$RESULTS/build.log" 2>&1 || { tail -30 "$RESULTS/build.log"; exit 1; }
cmake --build build/gpu >> "$RESULTS/build.log" 2>&1 || { tail -30 "$RESULTS/build.log"; exit 1; }

echo "== tests (Triton backend on CUDA)"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider python_tests 2>&1 | tee "$RESULTS/tests.log" | tail -15

echo "== fused path under set_sync_debug_mode('error')"
$PY - <<'PY'
import torch, es_kernels as ek
assert ek.HAS_TRITON_CUDA, "the Triton kernels did not register for CUDA"
dev = "cuda"
st = ek.ESState(100_000, device=dev)
logits = torch.randn(4096, 1000, device=dev).bfloat16()
targets = torch.randint(0, 1000, (4096,), device=dev)
seq = torch.randn(8, 64, 512, device=dev).bfloat16(), torch.randint(0, 512, (8, 64), device=dev)
ids = torch.randperm(100_000, device=dev)[:4096]
def run(step):
    ek.es_step(logits, targets, ids, st, 1024, step=step)
    ek.es_step(*seq, ids[:8], st, 2, step=step)
    ek.es_step_from_losses(torch.rand(4096, device=dev), ids, st, 1024, step=step, mode="topk")
    ek.weighted_select(torch.rand(4096, device=dev), 100, step=step)
    ek.eswp_prune(st, 0.5, epoch=step, num_epochs=10)
run(0)  # compile the kernels first
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
for step in range(1, 4):
    run(step)
torch.cuda.set_sync_debug_mode(0)
torch.cuda.synchronize()
st.check()
print("no synchronisation in the fused path: ok")
PY

echo "== timings"
$PY bench/bench_gpu.py --out "$RESULTS"
