"""The GPU checks that need a real CUDA device (run by bench/gpu_check.sh).

1. the op paths under ``torch.cuda.set_sync_debug_mode("error")``: no host
   synchronisation, device seed/step tensors included;
2. a CUDA graph of a sampler step: each replay draws fresh noise (the device
   step counter advances inside the op), and replays equal eager calls made
   with the same steps;
3. ``torch.compile(fullgraph=True)`` of a loop step that calls the sampler
   compiles at most twice in 20 steps;
4. with two or more GPUs, tensors on ``cuda:1`` while the current device is
   ``cuda:0`` (the device guard around every launch).

Prints one line per check and exits non-zero on the first failure. Writes a
JSON summary to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import es_kernels as ek


def check_no_sync(dev: str) -> str:
    st = ek.ESState(100_000, device=dev)
    logits = torch.randn(4096, 1000, device=dev).bfloat16()
    targets = torch.randint(0, 1000, (4096,), device=dev)
    seq_logits = torch.randn(8, 64, 512, device=dev).bfloat16()
    seq_targets = torch.randint(0, 512, (8, 64), device=dev)
    ids = torch.randperm(100_000, device=dev)[:4096]
    seed_t = torch.tensor(7, device=dev)
    step_t = torch.zeros((), dtype=torch.int64, device=dev)
    es = ek.EvolvedSampler(100_000, 256, device=dev, eps=0.1)

    def run(step):
        ek.es_step(logits, targets, ids, st, 1024, step=step)
        ek.es_step(seq_logits, seq_targets, ids[:8], st, 2, step=step, label_smoothing=0.1)
        ek.es_step_from_losses(torch.rand(4096, device=dev), ids, st, 1024, step=step, select_mode="topk")
        ek.es_step_from_losses(
            torch.rand(4096, device=dev), ids, st, 1024, seed=seed_t, step=step_t, advance_step=True, eps=0.25, lam=0.5
        )
        ek.weighted_select(torch.rand(4096, device=dev), 100, step=step)
        ek.eswp_prune(st, 0.5, epoch=step, num_epochs=10)
        es.select(ids, logits=logits, targets=targets)

    run(0)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            run(step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    st.check()
    assert int(step_t) == 4 and es.step == 4
    return "no synchronisation in any op path (sync debug mode 'error')"


def check_cuda_graph(dev: str) -> str:
    n, B, b = 50_000, 4096, 1024
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randperm(n, device=dev, generator=g)[:B]
    logits = torch.randn(B, 1000, device=dev, generator=g).bfloat16()
    targets = torch.randint(0, 1000, (B,), device=dev, generator=g)
    graphed = ek.EvolvedSampler(n, b, seed=11, device=dev)
    eager = ek.EvolvedSampler(n, b, seed=11, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels), as torch.cuda.graphs advises
        for _ in range(2):
            graphed.select(ids, logits=logits, targets=targets)
            eager.select(ids, logits=logits, targets=targets)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel = graphed.select(ids, logits=logits, targets=targets)
    replays = []
    for _ in range(3):
        graph.replay()
        got = sel.positions.clone()
        want = eager.select(ids, logits=logits, targets=targets).positions
        assert torch.equal(got, want), "a replay differs from the eager call with the same step"
        replays.append(got)
    assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2]), (
        "replays drew the same positions: the step did not advance on the device"
    )
    assert graphed.step == eager.step == 5
    assert torch.equal(graphed.state.tensor.nan_to_num(-1), eager.state.tensor.nan_to_num(-1))
    return "CUDA graph of a sampler step: fresh noise each replay, equal to eager calls"


def check_compile(dev: str) -> str:
    import torch._dynamo

    torch._dynamo.reset()
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    n, B, b = 4000, 512, 128
    es = ek.EvolvedSampler(n, b, seed=3, device=dev)
    ref = ek.EvolvedSampler(n, b, seed=3, device=dev)

    @torch.compile(fullgraph=True, backend=backend)
    def step(ids, logits, targets):
        return es.select(ids, logits=logits, targets=targets).positions

    for _ in range(20):
        ids = torch.randperm(n, device=dev)[:B]
        logits = torch.randn(B, 100, device=dev)
        targets = torch.randint(0, 100, (B,), device=dev)
        assert torch.equal(step(ids, logits, targets), ref.select(ids, logits=logits, targets=targets).positions)
    assert len(frames) <= 2, f"{len(frames)} compiles in 20 steps"
    return f"torch.compile(fullgraph=True) of a sampler step: {len(frames)} compile(s) in 20 steps"


def check_other_device() -> str:
    if torch.cuda.device_count() < 2:
        return "device guard: skipped (one GPU)"
    torch.cuda.set_device(0)
    out = []
    for dev in ("cuda:0", "cuda:1"):
        st = ek.ESState(1000, device=dev)
        losses = torch.linspace(0.1, 2.0, 500, device=dev)
        out.append(ek.es_step_from_losses(losses, torch.arange(500, device=dev), st, 50, seed=1).positions.cpu())
    assert torch.equal(out[0], out[1])
    return "device guard: cuda:1 tensors with cuda:0 current give the cuda:0 result"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write gpu_checks.json here")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "no CUDA device"
    assert ek.HAS_TRITON_CUDA, "the Triton kernels did not register for CUDA"
    results = {}
    for name, fn in [
        ("no_sync", lambda: check_no_sync("cuda")),
        ("cuda_graph", lambda: check_cuda_graph("cuda")),
        ("compile", lambda: check_compile("cuda")),
        ("device_guard", check_other_device),
    ]:
        t0 = time.perf_counter()
        try:
            msg = fn()
            ok = True
        except Exception as exc:  # report, then fail
            msg, ok = f"FAILED: {type(exc).__name__}: {exc}", False
        results[name] = {"ok": ok, "message": msg, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {msg}", flush=True)
    if args.out:
        with open(f"{args.out}/gpu_checks.json", "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
