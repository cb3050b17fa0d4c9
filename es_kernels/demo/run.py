"""The main job's runs: every method on every data set, seed by seed
(:func:`run_demo`); the JSON after each run, the plot, the markdown and the
verdict at the end, or when interrupted. The command line is
:mod:`es_kernels.demo.cli`; the settings :mod:`es_kernels.demo.config`; one
run :func:`es_kernels.demo.loop.train`; the ablation
:mod:`es_kernels.demo.ablation`. The names below stay importable from here.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from . import loop
from .ablation import (  # noqa: F401  (the ablation's names, as before the split)
    DEFAULT_GRID,
    DEFAULT_TASKS,
    RULE,
    Task,
    grid_settings,
    merge_ablations,
    parse_grid,
    parse_tasks,
    rank_ablation,
    run_ablation,
    setting_name,
    task_config,
)
from .config import (  # noqa: F401
    ALL_METHODS,
    CLOCKS,
    LM,
    LM_METHODS,
    LM_QUICK,
    METHODS,
    QUICK,
    SCHEDULE_METHODS,
    SCHEDULES,
    TIME_METHODS,
    Config,
    base_method,
    policy_of,
    sampler_kind,
    schedule_of,
    smoke_note,
)
from .loop import Classification, _world, accuracy, as_task, infobatch_losses, make_model, train  # noqa: F401
from .progress import Eta, _Log, fmt_eta, load_warning, write_json  # noqa: F401
from .report import clock_name, format_summary, machine, plot
from .summary import fair_reference, summarize, verdict  # noqa: F401
from .tasks import corrupt_labels, describe, device_data, load_dataset, task_goal, with_noise  # noqa: F401

_device_data, _with_noise, _goal = device_data, with_noise, task_goal  # the names before the split


def _key(cfg: Config, ds: str, method: str):
    base = base_method(method)
    if method.endswith("-time"):
        return (ds, "es", cfg.mini_batch)  # runs for ES's time
    return (ds, base, cfg.meta_batch if base in ("full", "infobatch") else cfg.mini_batch)


def demo_jobs(cfg: Config) -> list:
    """The runs in order: per data set, the epoch-bounded methods seed by seed,
    then the time-bounded ones (they need ES's mean wall-clock)."""
    jobs = []
    for ds in cfg.datasets:
        for seed in range(cfg.seeds):
            jobs += [(ds, seed, m) for m in cfg.methods if m not in TIME_METHODS]
        for seed in range(cfg.seeds):
            jobs += [(ds, seed, m) for m in cfg.methods if m in TIME_METHODS]
    return jobs


def calibrate(cfg: Config, eta: Eta, data: dict, methods=("full",)) -> None:
    """Time an epoch of each of ``methods`` (seed 0) on each data set of
    ``data`` (name -> device data) into ``eta``: the ETA before the first run.
    An epoch's time is a 2-epoch run's less a 1-epoch run's (both after a
    warm-up run), so the one-time costs (the first run's warm-up, a run's
    model and first evaluation) do not count 30 times over."""
    for name, d in data.items():
        for method in methods:
            b = cfg.meta_batch if method == "full" else cfg.meta_batch // 4
            one, two = (replace(cfg, epochs=e, mini_batch=b) for e in (1, 2))
            loop.train(method, d, one, 0)  # warm-up
            t1, t2 = (loop.train(method, d, c, 0)["elapsed_s"] for c in (one, two))
            eta.record((name, method, b), 1, t2 - t1 if t2 > t1 else t2 / 2)  # noise: the mean


def run_demo(cfg: Config, out_dir: Path, show_progress: bool = True, calibrate_eta: bool = True) -> dict:
    """Every method on every data set; demo.json is rewritten after each run
    (``complete`` false until the end), so an interrupt (Ctrl-C, SIGTERM)
    keeps what finished; at the end (or the interrupt) demo.md (the tables
    and the verdict) and demo.png. ``calibrate_eta``: first time one epoch of
    full per data set, for an ETA before the first run ends."""
    world, rank = _world()
    torch.set_num_threads(max(1, cfg.threads // world))
    warn = load_warning(cfg.threads, cfg.clock)
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "machine": machine(),
        "smoke_test": cfg.smoke_test,
        "complete": False,
        "interrupted": False,
        "load_warning": warn,
        "datasets": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.json"
    jobs = demo_jobs(cfg)
    eta = Eta(cfg.meta_batch)
    log = _Log(len(jobs), "es-kernels demo", show_progress, quiet=rank > 0)
    log.line(f"times: training {clock_name(asdict(cfg))} (--clock {cfg.clock}), evaluation excluded")
    if cfg.smoke_test:
        log.line(smoke_note(cfg.epochs))
    if warn:
        log.line(warn)
    cache = {}
    with log.running(results, path):
        for name in cfg.datasets:
            cache[name] = device_data(load_dataset(name, cfg), cfg)
            results["datasets"][name] = {**describe(cache[name]), "summary": {}, "runs": {m: [] for m in cfg.methods}}
        if calibrate_eta:
            calibrate(cfg, eta, cache)
            total = eta.remaining([(_key(cfg, d, m), cfg.epochs) for d, _, m in jobs])
            log.line(
                f"{len(jobs)} runs: {fmt_eta(total)} (real time, from an epoch of full per data set; "
                "refined after every run)"
            )
            log.update(fmt_eta(total), step=0)
        for i, (name, seed, method) in enumerate(jobs):
            ds = results["datasets"][name]
            goal = task_goal(cache[name])
            data = with_noise(cache[name], cfg.label_noise, seed)
            budget = None
            if method in TIME_METHODS:
                if not ds["runs"].get("es"):
                    raise ValueError(f"{method} needs es in the methods (it trains for ES's wall-clock)")
                budget = statistics.fmean(r["wall_s"] for r in ds["runs"]["es"])
            r = train(method, data, cfg, seed, log.bar, time_budget=budget)
            eta.record(_key(cfg, name, method), r["epochs"], r["elapsed_s"])
            ds["runs"][method].append(r)
            ds["summary"] = summarize(ds["runs"], goal)
            ds.update(fair_reference(ds["runs"], goal))
            ds["verdict"] = verdict(name, ds)
            if rank == 0:
                write_json(path, results)
            rest = eta.remaining_partial([(_key(cfg, d, m), cfg.epochs) for d, _, m in jobs[i + 1 :]])
            log.finished(i, f"{name} {method} seed {seed}", r, goal, rest)
    if rank > 0:  # rank 0 writes
        return results
    results["verdicts"] = {name: ds["verdict"] for name, ds in results["datasets"].items() if ds.get("verdict")}
    write_json(path, results)
    (out_dir / "demo.md").write_text(f"# es-kernels demo\n\n{format_summary(results)}\n")
    if any(rs for ds in results["datasets"].values() for rs in ds["runs"].values()):
        plot(results, out_dir / "demo.png")
    return results
