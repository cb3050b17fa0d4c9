"""``es-kernels demo``: the command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import torch

from .._spec import DEFAULT_EPS, DEFAULT_LAM
from ..functional import DEFAULT_BETA1, DEFAULT_BETA2
from ..sampler import EvolvedSampler
from .ablation import (
    ABLATION_MNIST1D_SAMPLES,
    DEFAULT_GRID,
    DEFAULT_TASKS,
    Task,
    _ablation_key,
    ablation_jobs,
    grid_settings,
    merge_ablations,
    parse_grid,
    parse_tasks,
    run_ablation,
    task_config,
)
from .config import ALL_METHODS, CLOCKS, LM, LM_QUICK, QUICK, TIME_METHODS, Config
from .loop import train
from .progress import Eta, fmt_eta, load_warning
from .report import format_ablation, format_summary
from .run import _key, demo_jobs, run_demo
from .tasks import device_data, load_dataset


def estimate_only(cfg: Config, ablate: bool, grid: dict | None, tasks) -> float:
    """Time one epoch of full and of ES (b/B = 1/4) per data set, then the
    planned run's time from the cost model (Eta). A real run refines it with
    every run it measures."""
    torch.set_num_threads(cfg.threads)
    eta = Eta(cfg.meta_batch)
    datasets = sorted({t.dataset for t in tasks}) if ablate else list(cfg.datasets)
    for ds in datasets:
        dcfg = task_config(cfg, Task(ds, 1, 0.0)) if ablate else cfg  # the LM's meta-batch on an lm task
        data = device_data(load_dataset(ds, dcfg), dcfg)
        for method, b in (("full", dcfg.meta_batch), ("es", dcfg.meta_batch // 4)):
            r = train(method, data, replace(dcfg, epochs=1, mini_batch=b), 0)
            eta.record((ds, method, b), 1, r["elapsed_s"])
    if ablate:
        settings = grid_settings(parse_grid(grid or DEFAULT_GRID))
        jobs = [(_ablation_key(cfg, t, s), t.epochs) for t, _, s in ablation_jobs(cfg, tasks, settings)]
    else:
        jobs = [(_key(cfg, d, m), cfg.epochs) for d, _, m in demo_jobs(cfg)]
    return eta.remaining(jobs)


def _dist_worker(rank: int, world: int, cfg: Config, out: Path, show_progress: bool, init: str) -> dict:
    """One process of a distributed demo: join the gloo group, run every method."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        return run_demo(cfg, out, show_progress=show_progress)
    finally:
        dist.destroy_process_group()


DEMO_DEPS = {"mnist1d": "mnist1d", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}
LM_DEPS = {"matplotlib": "matplotlib", "tqdm": "tqdm", "transformers": "transformers"}


def missing_demo_deps(task: str = "classification") -> list:
    deps = LM_DEPS if task == "lm" else DEMO_DEPS
    return [pkg for mod, pkg in deps.items() if importlib.util.find_spec(mod) is None]


def _floats(text: str) -> str:
    for v in text.split(","):
        float(Fraction(v.strip()))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="es-kernels demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: smaller data, 8 epochs (too few for ES's loss history: not results)",
    )
    ap.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="P",
        help="symmetric label corruption of the training set, probability P",
    )
    ap.add_argument(
        "--task",
        choices=("classification", "lm"),
        default="classification",
        help="classification (MNIST-1D and digits, the default) or lm: a small GPT-2 on the Python standard "
        "library's sources (needs transformers: es-kernels[demo,integrations])",
    )
    ap.add_argument("--datasets", default=None, help="comma-separated: mnist1d,digits")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--mnist1d-samples", type=int, default=None)
    ap.add_argument("--mini-batch", type=int, default=None, metavar="b", help="ES's b of each meta-batch of 512")
    ap.add_argument("--beta1", type=float, default=DEFAULT_BETA1, help="ES level smoothing (default %(default)s)")
    ap.add_argument("--beta2", type=float, default=DEFAULT_BETA2, help="ES trend smoothing (default %(default)s)")
    ap.add_argument(
        "--lam", type=float, default=DEFAULT_LAM, help="ES trend gain: w = max(s + lam*d, w_min) (default %(default)s)"
    )
    ap.add_argument(
        "--eps", type=float, default=DEFAULT_EPS, help="uniform share of ES's selection mass (default %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=tuple(CLOCKS),
        help="what training time is measured on: wall (real time, the default) or process (this process's "
        "CPU time, time.process_time: fair between runs on a shared machine; meaningful with --threads 1)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument(
        "--score-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="autocast dtype of ES's scoring pass: auto = bfloat16 on CUDA, float32 on the CPU",
    )
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="run ES over the grid of settings on the task list and pick the defaults by the rule",
    )
    ap.add_argument(
        "--tasks", default=DEFAULT_TASKS, help="ablation tasks, dataset:epochs:label_noise,... (default %(default)s)"
    )
    for k, v in DEFAULT_GRID.items():
        ap.add_argument(f"--grid-{k}", type=_floats, default=v, help=f"ablation values of {k} (default %(default)s)")
    ap.add_argument(
        "--merge",
        default=None,
        metavar="JSON,...",
        help="with --ablate: merge ablation.json files of the same grid run on different tasks "
        "(shards run side by side), rank the union by the rule, write to --out",
    )
    ap.add_argument(
        "--eta-only",
        action="store_true",
        help="time one epoch per data set, print the estimated run time of the planned run, exit",
    )
    ap.add_argument("--out", default="demo_results", help="folder for the JSON, markdown and plot")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="W",
        help="run every method under DDP on W gloo processes (spawned here); "
        "under torchrun the processes come from torchrun instead",
    )
    a = ap.parse_args(argv)
    if not 0.0 <= a.label_noise < 1.0:
        ap.error("--label-noise must be in [0, 1)")
    if a.nproc < 1:
        ap.error("--nproc must be >= 1")
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    lm = a.task == "lm"
    missing = missing_demo_deps(a.task)
    if missing:
        print(
            f"es-kernels demo{' --task lm' if lm else ''} needs {', '.join(missing)}: "
            f'pip install "es-kernels[demo{",integrations" if lm else ""}]" (or pip install {" ".join(missing)})',
            file=sys.stderr,
        )
        return 2
    if lm and a.ablate:
        ap.error("the ablation takes the LM as a task: --ablate --tasks lm:EPOCHS:0,... (without --task lm)")
    if lm and (a.datasets or a.label_noise > 0 or a.mnist1d_samples is not None):
        ap.error("--task lm trains on the standard library's sources: no --datasets, --label-noise, --mnist1d-samples")
    cfg = Config(
        label_noise=a.label_noise,
        beta1=a.beta1,
        beta2=a.beta2,
        lam=a.lam,
        eps=a.eps,
        device=a.device,
        score_dtype=a.score_dtype,
        clock=a.clock,
    )
    if lm:
        cfg = replace(cfg, **LM)
    if a.quick:
        cfg = replace(cfg, **(LM_QUICK if lm else QUICK))
    if a.ablate and not a.quick:
        cfg = replace(cfg, mnist1d_samples=ABLATION_MNIST1D_SAMPLES)
    over = {
        "seeds": a.seeds,
        "epochs": a.epochs,
        "mnist1d_samples": a.mnist1d_samples,
        "threads": a.threads,
        "mini_batch": a.mini_batch,
    }
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if a.datasets:
        cfg = replace(cfg, datasets=tuple(a.datasets.split(",")))
    if a.methods:
        bad = set(a.methods.split(",")) - set(ALL_METHODS)
        if bad:
            ap.error(f"unknown methods: {sorted(bad)}")
        cfg = replace(cfg, methods=tuple(m for m in ALL_METHODS if m in a.methods.split(",")))
        if set(cfg.methods) & set(TIME_METHODS) and "es" not in cfg.methods:
            ap.error(f"{', '.join(TIME_METHODS)} train for ES's wall-clock: add es to --methods")
    try:  # the sampler validates: fail before any training
        EvolvedSampler(1, 1, beta1=cfg.beta1, beta2=cfg.beta2, lam=cfg.lam, eps=cfg.eps)
    except ValueError as e:
        ap.error(str(e))
    grid = {k: getattr(a, f"grid_{k}") for k in DEFAULT_GRID}
    try:
        tasks = parse_tasks(a.tasks)
    except ValueError as e:
        ap.error(f"--tasks: {e}")
    out = Path(a.out)
    if a.eta_only:
        total = estimate_only(cfg, a.ablate, grid, tasks)
        what = "ablation" if a.ablate else "demo"
        print(
            f"estimated {what} run time: {fmt_eta(total)[4:]} (from one epoch of full and ES per data set"
            f" on this machine, {cfg.threads} threads; the estimate is real time)"
        )
        warn = load_warning(cfg.threads, cfg.clock)
        if warn:
            print(warn)
        return 0
    if torchrun or a.nproc > 1:
        cfg = replace(cfg, nproc=int(os.environ["WORLD_SIZE"]) if torchrun else a.nproc)
        if a.ablate or a.eta_only:
            ap.error("--ablate and --eta-only run in one process")
        if torchrun:  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
            res = _dist_worker(int(os.environ["RANK"]), cfg.nproc, cfg, out, not a.no_progress, "env://")
            if int(os.environ["RANK"]) > 0:
                return 0
        else:
            import tempfile

            import torch.multiprocessing as mp

            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(
                    _dist_worker,
                    args=(cfg.nproc, cfg, out, not a.no_progress, f"file://{tmp}/init"),
                    nprocs=cfg.nproc,
                    join=True,
                )
            res = json.loads((out / "demo.json").read_text())
        print(format_summary(res))
        print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}")
        return 130 if res["interrupted"] else 0
    if a.merge:
        if not a.ablate:
            ap.error("--merge goes with --ablate")
        try:
            res = merge_ablations(a.merge.split(","), out)
        except ValueError as e:
            ap.error(str(e))
        print(format_ablation(res))
        print(f"\nwrote {out / 'ablation.json'} and {out / 'ablation.md'}")
        return 0
    if a.ablate:
        res = run_ablation(cfg, out, grid=grid, tasks=tasks, show_progress=not a.no_progress)
        print(format_ablation(res))
        print(f"\nwrote {out / 'ablation.json'} and {out / 'ablation.md'}")
        return 130 if res["interrupted"] else 0
    res = run_demo(cfg, out, show_progress=not a.no_progress)
    print(format_summary(res))
    print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}")
    return 130 if res["interrupted"] else 0
