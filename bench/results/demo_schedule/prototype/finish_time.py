"""Finish a demo run cut short after its epoch-bounded runs: run the
``-time`` methods (uniform-time) for the seeds that finished, for es's mean
time, as the demo would have, and rewrite demo.json and demo.png.

    PYTHONPATH=. python bench/results/demo_schedule/finish_time.py bench/results/demo_schedule/mnist1d

Used when the machine's load left no time for a task's third seed: the
epoch-bounded runs of the seeds in demo.json are kept as they are, the
seeds every method finished are the task's seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from es_kernels.demo import run as R
from es_kernels.demo.report import plot


def main(folder: str, methods=("uniform-time",)) -> int:
    path = Path(folder) / "demo.json"
    res = json.loads(path.read_text())
    cfg = R.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["config"].items()})
    torch.set_num_threads(cfg.threads)
    (name,) = res["datasets"]
    ds = res["datasets"][name]
    bounded = [m for m in cfg.methods if m not in R.TIME_METHODS]
    seeds = min(len(ds["runs"][m]) for m in bounded)
    for m in bounded:  # a method's run of a seed not every method finished is dropped
        ds["runs"][m] = ds["runs"][m][:seeds]
    data0 = R._device_data(R.load_dataset(name, cfg), cfg)
    goal = R._goal(data0)
    budget = statistics.fmean(r["wall_s"] for r in ds["runs"]["es"])
    for m in methods:
        ds["runs"][m] = []
        for seed in range(seeds):
            r = R.train(m, R._with_noise(data0, cfg.label_noise, seed), cfg, seed, time_budget=budget)
            ds["runs"][m].append(r)
            print(f"{name} {m} seed {seed}: {r['wall_s']:.1f} s, {r['epochs']:.3g} epochs", flush=True)
    res["config"]["seeds"] = seeds
    res["config"]["methods"] = bounded + list(methods)
    ds["runs"] = {m: ds["runs"][m] for m in res["config"]["methods"]}
    ds["summary"] = R.summarize(ds["runs"], goal)
    ds.update(R.fair_reference(ds["runs"], goal))
    res["complete"], res["interrupted"] = True, False
    res["cut_to_seeds"] = f"{seeds} seeds: the run was stopped after them for time; the -time methods were run after"
    R.write_json(path, res)
    plot(res, Path(folder) / "demo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
