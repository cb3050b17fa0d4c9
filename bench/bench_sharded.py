"""The sharded sampler's step and epoch planning against the replicated sampler's, on a
gloo group of CPU processes (docs/design_distributed.md).

    python bench/bench_sharded.py [--world 2] [--num-samples 4000000] [--meta-batch 4096]
    python bench/bench_sharded.py --plan [--num-samples 4000000] [--rounds 3]

``--plan``: one process, one thread, no group: one rank's ESWP plan (W = 1, the whole
state as its shard: the threshold's two passes and ``shard_prune_plan``) against the
plain-PyTorch model of the same plan (python_tests/shard_plan_model.py, the plan before
it ran on the prune op) and the replicated op (``eswp_prune`` and its kept ids on the
host), interleaved round by round; medians, ratios, and the plans compared bit for bit.

Every rank passes ``meta-batch`` ids of its own range per step (what the sharded mode
needs; the replicated sampler accepts them too) and selects a quarter. Prints, per
sampler, the median wall-clock of a ``select`` over the steps (rank 0's; gloo runs
the all-gather on the calling thread), the state bytes per rank, and the time to plan
an ESWP epoch.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def body(rank: int, world: int, init: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from es_kernels.distributed import DistributedESWPSampler, DistributedEvolvedSampler
    from es_kernels.sharded import ShardedESWPSampler, ShardedEvolvedSampler, shard_range

    n, cap = args.num_samples, args.meta_batch
    lo, hi = shard_range(n, world, rank)
    g = torch.Generator().manual_seed(rank)
    kinds = {
        "replicated": (DistributedEvolvedSampler, DistributedESWPSampler),
        "sharded": (ShardedEvolvedSampler, ShardedESWPSampler),
    }
    rows = []
    for name, (es_cls, pr_cls) in kinds.items():
        es = es_cls(n, cap // 4, seed=1, meta_batch=cap)
        times = []
        for step in range(args.warmup + args.steps):
            ids = lo + torch.randperm(hi - lo, generator=g)[:cap]
            losses = torch.rand(cap, generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            es.select(ids, losses=losses)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        es.state.tensor[:, 0].uniform_(generator=g)  # every sample observed: half below the mean
        es.state.tensor[:, 1] = 0.0
        pr = pr_cls(es, num_epochs=4)
        dist.barrier()
        t0 = time.perf_counter()
        len(pr)  # plans the epoch
        plan_s = time.perf_counter() - t0
        state_mb = es.state.tensor.numel() * es.state.tensor.element_size() / 2**20
        rows.append((name, statistics.median(times) * 1e3, state_mb, plan_s))
    if rank == 0:
        print(f"W = {world}, N = {n}, meta_batch = {cap} per rank, {args.steps} steps (median of rank 0)")
        for name, ms, mb, plan_s in rows:
            print(f"  {name:10s}  select {ms:7.2f} ms   state {mb:8.1f} MiB per rank   plan an epoch {plan_s:6.2f} s")
        print(f"  step ratio sharded / replicated: {rows[1][1] / rows[0][1]:.2f}")
    dist.destroy_process_group()


def plan_bench(args) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python_tests"))
    import shard_plan_model as model

    import es_kernels as ek
    from es_kernels import sharded

    torch.set_num_threads(1)
    n = args.num_samples
    g = torch.Generator().manual_seed(0)
    st = ek.ESState(n)
    st.tensor[:, 0].uniform_(generator=g)  # every sample observed: half below the mean
    st.tensor[:, 1] = 0.0
    st.tensor[::7, 0] = float("nan")  # and some never observed
    cfg = dict(prune_ratio=0.5, seed=1, epoch=0, num_epochs=4)

    taus = {}

    def tau_of(x):
        amax = float(sharded._score_max(x))
        return sharded._threshold(amax, sharded._fixed_point(x, amax).tolist())

    def old():  # the threshold and the plan as before (chunks of 2**22 ids)
        taus["old"] = model.threshold(st.tensor)
        return model.plan(st.tensor, 0, 0, taus["old"], *cfg.values())

    def new_threshold():
        taus["new"] = tau_of(st.tensor)

    def new_plan():
        return sharded.shard_prune_plan(st.tensor, 0, 0, taus["new"], *cfg.values())

    def replicated():
        res = ek.eswp_prune(st, cfg["prune_ratio"], seed=1, epoch=0, num_epochs=4)
        return res.kept_ids, res.scale

    runs = {"model (before)": old, "  threshold": new_threshold, "  shard_prune_plan": new_plan}
    runs["replicated op"] = replicated
    times: dict[str, list[float]] = {k: [] for k in runs}
    out = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    times["now (both)"] = [a + b for a, b in zip(times["  threshold"], times["  shard_prune_plan"])]
    same = taus["old"] == taus["new"] or (math.isnan(taus["old"]) and math.isnan(taus["new"]))
    same = same and all(torch.equal(a, b) for a, b in zip(out["model (before)"], out["  shard_prune_plan"]))
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"N = {n}, 1 thread, {args.rounds} rounds interleaved (median), load average {load}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:20s} {t:7.3f} s   (rounds: {', '.join(f'{x:.3f}' for x in times[name])})")
    print(f"  before / now: {med['model (before)'] / med['now (both)']:.1f}x")
    print(f"  now / replicated op: {med['now (both)'] / med['replicated op']:.2f}x")
    print(f"  plans bit-identical (kept ids in order, scales): {same}")
    if not same:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=4_000_000)
    p.add_argument("--meta-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--plan", action="store_true", help="time one rank's ESWP plan in one process")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.plan:
        plan_bench(args)
        return
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(body, args=(args.world, os.path.join(d, "init"), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
