"""The distributed ES step against the single-process step, in one run.

``W`` gloo processes (spawned on this machine) each hold a replicated state of
``N`` samples and run, in alternation, the single-process step
(``EvolvedSampler.select`` on the rank's ``B`` ids and losses) and the
distributed step (``DistributedEvolvedSampler.select`` on the same ``B`` ids:
the exchange of ``W * B`` positions, their update on every replica and the
rank's selection), on disjoint ids per rank. It reports, per rank, the
median CPU time of each (the process's CPU time over the call: the calling
thread and gloo's threads) and wall time, their ratio, and the parts of the
distributed step timed alone: the exchange (pack + all_gather), the update
(deduplication + ``es_update``) and the selection. CPU time is the measure:
on a loaded machine wall time counts the other processes' turns.

    python bench/bench_distributed.py --world 2 --batch 4096 --threads 1

writes ``bench/results/distributed_<date>.json`` (``--out`` to change) and
prints a table with the load average (``uptime``) at the start and the end.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import es_kernels as ek  # noqa: E402
from es_kernels import distributed as D  # noqa: E402


def _timed(fn) -> tuple[float, float, float]:
    """(process CPU ms, calling thread's CPU ms, wall ms) of one call."""
    c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
    fn()
    return (time.process_time() - c0) * 1e3, (time.thread_time() - t0) * 1e3, (time.perf_counter() - w0) * 1e3


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def worker(rank: int, world: int, init: str, out: str, cfg: dict) -> None:
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        n, B, b = cfg["num_samples"], cfg["batch"], cfg["mini"]
        single = ek.EvolvedSampler(n, b, seed=1)
        multi = D.DistributedEvolvedSampler(n, b, seed=1, meta_batch=B)
        g = torch.Generator().manual_seed(0)  # the same on every rank: disjoint slices of one permutation

        def batch():
            perm = torch.randperm(n, generator=g)[: world * B]
            ids = perm[rank * B : (rank + 1) * B].clone()
            return ids, torch.rand(B, generator=torch.Generator().manual_seed(int(perm[0])))

        rec = {k: [] for k in ("single", "distributed", "exchange", "update", "selection")}
        for k in range(cfg["warmup"] + cfg["steps"]):
            ids, losses = batch()
            dist.barrier()
            s = _timed(lambda: single.select(ids, losses=losses))
            dist.barrier()
            m = _timed(lambda: multi.select(ids, losses=losses))
            # the parts of the distributed step, each alone
            dist.barrier()
            box = {}
            e = _timed(lambda: box.update(g=multi._gather(ids, losses, B)))
            u = _timed(lambda: box.update(w=multi._apply(box["g"])))
            sel = _timed(
                lambda: D.rank_selection(box["w"], rank, B, B, b, multi.select_mode, multi.seed, multi._step, 0.0)
            )
            if k >= cfg["warmup"]:
                for name, t in zip(rec, (s, m, e, u, sel)):
                    rec[name].append(t)
        res = {
            name: {key: _median([t[i] for t in ts]) for i, key in enumerate(("cpu_ms", "thread_ms", "wall_ms"))}
            for name, ts in rec.items()
        }
        for key in ("cpu", "thread", "wall"):
            res[f"ratio_{key}"] = res["distributed"][f"{key}_ms"] / res["single"][f"{key}_ms"]
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="gloo processes (default 2)")
    p.add_argument("--batch", type=int, default=4096, help="B, the meta-batch per rank (default 4096)")
    p.add_argument("--mini", type=int, default=1024, help="b, selected per rank (default 1024)")
    p.add_argument("--num-samples", type=int, default=1_000_000, help="N (default 1e6)")
    p.add_argument("--steps", type=int, default=60, help="timed steps (default 60)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--out", type=Path, default=None, help="the JSON file (default bench/results/distributed_<date>.json)"
    )
    a = p.parse_args(argv)
    cfg = dict(
        world=a.world, batch=a.batch, mini=a.mini, num_samples=a.num_samples, steps=a.steps, warmup=a.warmup,
        threads=a.threads,
    )  # fmt: skip
    load0 = harness.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(a.world, os.path.join(tmp, "init"), tmp, cfg), nprocs=a.world, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(a.world)]
    load1 = harness.load_average()
    info = harness.machine_info()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = {"config": cfg, "load_start": load0, "load_end": load1, "machine": info, "date": date, "ranks": ranks}
    path = a.out or harness.RESULTS / f"distributed_{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"W={a.world} gloo processes, B={a.batch} per rank, b={a.mini}, N={a.num_samples}, --threads {a.threads}")
    print(f"load average {load0} at the start, {load1} at the end ({os.cpu_count()} cores); medians of {a.steps} steps")
    head = f"{'rank':>4} {'single':>9} {'distrib.':>9} {'ratio':>6} {'exchange':>9} {'update':>9} {'select':>9}"
    for key, what in (("cpu", "process CPU ms: every thread"), ("thread", "CPU ms of the calling thread")):
        print(f"{head}   ({what})")
        for r, x in enumerate(ranks):
            t = [x[k][f"{key}_ms"] for k in ("single", "distributed", "exchange", "update", "selection")]
            print(f"{r:>4} {t[0]:9.3f} {t[1]:9.3f} {x[f'ratio_{key}']:6.2f} " + " ".join(f"{v:9.3f}" for v in t[2:]))
    walls = ", ".join(f"{x['ratio_wall']:.2f}" for x in ranks)
    print(f"wall-clock ratio per rank: {walls}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
