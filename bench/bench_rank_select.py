"""The distributed selection's cost by rank: rank ``W - 1`` against rank 0.

``rank_selection`` (one ``weighted_select`` over the rank's own ``B_r``
weights, its noise at the global positions ``r * cap + j`` through the op's
``offset``) against the construction it replaced (kept here as
:func:`padded_selection`: one ``weighted_select`` over a prefix of
``r * cap + B_r`` positions, the first ``r * cap`` of them ``-inf``, then a
fix-up of own ``-inf`` keys), at rank 0 and rank ``W - 1``, interleaved in one
process (no process group: the selection reads the gathered weights only).
Both give the same picks (checked on every call). It prints the median CPU
time of the calling thread per call, the ratio of rank ``W - 1`` to rank 0 for
each, and the load average (``uptime``) at the start and the end.

    python bench/bench_rank_select.py --world 8 --cap 4096 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from es_kernels._ops import ops  # noqa: E402
from es_kernels.distributed import eps_mix, rank_selection  # noqa: E402


def padded_selection(weights_all, rank, cap, n, b, select_mode, seed, step, eps=0.0):
    """The rank's selection as it was built before ``weighted_select`` took an
    offset: over the prefix ``[0, rank * cap + n)``, the other ranks' positions -inf."""
    lo = rank * cap
    own = weights_all[lo : lo + n].to(torch.float32)
    x = torch.full((lo + n,), -math.inf, dtype=torch.float32, device=own.device)
    x[lo:] = eps_mix(own, eps) if (eps > 0.0 and n > 0) else own
    pos = ops.weighted_select(x, b, select_mode, seed, step, None, None, 0.0) - lo
    if lo > 0 and b > 0:
        taken = torch.zeros(n + 1, dtype=torch.bool, device=pos.device)
        taken[torch.where(pos >= 0, pos, n)] = True
        free = ~taken[:n]
        taken = taken[:n] | (free & (free.cumsum(0) <= (pos < 0).sum()))
        pos = torch.sort((~taken).to(torch.uint8), stable=True).indices[:b]
    return pos


def _thread_ms(fn) -> float:
    t0 = time.thread_time()
    fn()
    return (time.thread_time() - t0) * 1e3


def measure(world: int, cap: int, mini: int, steps: int, warmup: int, eps: float = 0.0) -> dict:
    """Median thread CPU ms of each (implementation, rank), interleaved step by step."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(world * cap, generator=g) * 3 + 1e-3  # es_update's weights are >= w_min > 0
    ranks = (0, world - 1)
    impls = {"padded": padded_selection, "offset": rank_selection}
    times: dict[tuple[str, int], list[float]] = {(i, r): [] for i in impls for r in ranks}
    for step in range(warmup + steps):
        picks = {}
        order = [(name, r) for name in impls for r in ranks]
        for name, r in order if step % 2 == 0 else order[::-1]:  # alternate the order: no position bias
            out = []
            call = impls[name]
            ms = _thread_ms(lambda: out.append(call(weights, r, cap, cap, mini, "sample", 7, step, eps)))  # noqa: B023
            picks[name, r] = out[0]
            if step >= warmup:
                times[name, r].append(ms)
        for r in ranks:
            if not torch.equal(picks["padded", r], picks["offset", r]):
                raise AssertionError(f"rank {r}, step {step}: the two selections differ")
    med = {f"{i}_rank{r}_ms": statistics.median(v) for (i, r), v in times.items()}
    for i in impls:
        med[f"{i}_ratio"] = med[f"{i}_rank{world - 1}_ms"] / med[f"{i}_rank0_ms"]
    med["last_rank_padded_over_offset"] = med[f"padded_rank{world - 1}_ms"] / med[f"offset_rank{world - 1}_ms"]
    return med


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=8, help="W (default 8)")
    p.add_argument("--cap", type=int, default=4096, help="cap = B_r, the meta-batch per rank (default 4096)")
    p.add_argument("--mini", type=int, default=1024, help="b, selected per rank (default 1024)")
    p.add_argument("--eps", type=float, default=0.0, help="the exploration mix (default 0)")
    p.add_argument("--steps", type=int, default=100, help="timed steps (default 100)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()
    res = measure(a.world, a.cap, a.mini, a.steps, a.warmup, a.eps)
    res.update(
        world=a.world, cap=a.cap, mini=a.mini, eps=a.eps, steps=a.steps, threads=a.threads,
        load_start=load0, load_end=os.getloadavg(), cores=os.cpu_count(),
    )  # fmt: skip
    w = a.world - 1
    print(f"W = {a.world}, cap = B_r = {a.cap}, b = {a.mini}, sample, {a.threads} thread(s), {a.steps} steps")
    print("| selection | rank 0 ms | rank W-1 ms | rank W-1 / rank 0 |")
    print("|---|---|---|---|")
    for i in ("padded", "offset"):
        r0, rl = res[f"{i}_rank0_ms"], res[f"{i}_rank{w}_ms"]
        print(f"| {i} | {r0:.3f} | {rl:.3f} | {res[f'{i}_ratio']:.2f} |")
    print(f"rank W-1, padded / offset: {res['last_rank_padded_over_offset']:.2f}")
    print(f"load average (1, 5, 15 min): start {load0}, end {res['load_end']}; {res['cores']} cores")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
