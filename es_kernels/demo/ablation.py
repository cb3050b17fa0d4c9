"""The ablation (``es-kernels demo --ablate``): ES over a grid of settings on
a list of tasks, ranked by a rule fixed before any run."""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from . import metrics as M
from .config import LM, Config
from .loop import train
from .progress import Eta, _Log, load_warning, write_json
from .report import clock_name, format_ablation, machine
from .tasks import device_data, load_dataset, task_goal, with_noise


@dataclass(frozen=True)
class Task:
    dataset: str
    epochs: int
    label_noise: float

    @property
    def name(self) -> str:
        return f"{self.dataset} {self.epochs}ep noise {self.label_noise:g}"


DEFAULT_TASKS = (
    "mnist1d:10:0,digits:10:0,mnist1d:30:0,digits:30:0,mnist1d:30:0.4,digits:30:0.4,mnist1d:30:0.6,digits:30:0.6"
)
DEFAULT_GRID = {"beta1": "0,0.2,0.5", "beta2": "0.5,0.9", "lam": "0,1,2", "eps": "0,0.1", "ratio": "1/8,1/4,1/3"}
ABLATION_MNIST1D_SAMPLES = 10000  # half the demo's: the grid is large
RULE = (
    "Rule, fixed before any run: per task the target is full's final test accuracy (mean over seeds); "
    "a setting's time-to-target on a task is the median over seeds of the training wall-clock at the first "
    "epoch whose test accuracy reaches the target (not reached = infinite); per task the settings are ranked "
    "by it (ties share their mean rank); the setting with the lowest mean rank over the tasks wins, ties "
    "broken by the higher mean final test accuracy over tasks and seeds."
)


def parse_tasks(text: str) -> list:
    tasks = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"a task is dataset:epochs:label_noise, got {item!r}")
        task = Task(parts[0], int(parts[1]), float(parts[2]))
        if task.dataset == "lm" and task.label_noise > 0:
            raise ValueError(f"label noise applies to the classification data sets, not the LM task: {item!r}")
        tasks.append(task)
    return tasks


def parse_grid(spec: dict) -> dict:
    grid: dict[str, list[Any]] = {
        k: [float(Fraction(v.strip())) for v in spec[k].split(",")] for k in ("beta1", "beta2", "lam", "eps")
    }
    grid["ratio"] = [str(Fraction(v.strip())) for v in spec["ratio"].split(",")]
    return grid


def grid_settings(grid: dict) -> list:
    """The distinct ES settings of the grid: with lam = 0 beta2 does not enter
    the weight (w = s), and with beta2 = 1 the trend stays 0, so those
    collapse to one setting each (the grid's first beta2 / lam)."""
    seen, out = set(), []
    for b1, b2, lam, eps, ratio in itertools.product(
        grid["beta1"], grid["beta2"], grid["lam"], grid["eps"], grid["ratio"]
    ):
        if lam == 0:
            b2 = grid["beta2"][0]
        if b2 == 1:
            lam = grid["lam"][0]
        key = (b1, b2, lam, eps, ratio)
        if key not in seen:
            seen.add(key)
            out.append({"beta1": b1, "beta2": b2, "lam": lam, "eps": eps, "ratio": ratio})
    return out


def setting_name(s: dict) -> str:
    return f"beta1={s['beta1']:g} beta2={s['beta2']:g} lam={s['lam']:g} eps={s['eps']:g} b/B={s['ratio']}"


def _mini_batch(cfg: Config, ratio: str) -> int:
    return max(1, round(cfg.meta_batch * Fraction(ratio)))


def ablation_jobs(cfg: Config, tasks, settings) -> list:
    jobs = []
    for t in tasks:
        jobs += [(t, seed, None) for seed in range(cfg.seeds)]  # full: the target
        jobs += [(t, seed, s) for s in settings for seed in range(cfg.seeds)]
    return jobs


def task_config(cfg: Config, task: Task) -> Config:
    """The run's config on an ablation task: its epochs and label noise; the
    LM task (``lm:EPOCHS:0``) with the LM run's meta-batch and learning rate."""
    lm: dict[str, Any] = {k: LM[k] for k in ("task", "meta_batch", "lr")} if task.dataset == "lm" else {}
    return replace(cfg, epochs=task.epochs, label_noise=task.label_noise, **lm)


def _ablation_key(cfg: Config, task: Task, s):
    tcfg = task_config(cfg, task)
    return (task.dataset, "full", tcfg.meta_batch) if s is None else (task.dataset, "es", _mini_batch(tcfg, s["ratio"]))


def rank_ablation(res: dict) -> list:
    """The rule over the tasks where every setting has all its seeds."""
    cells, seeds = res["cells"], res["config"]["seeds"]
    tasks = [t for t in res["tasks"] if all(len(c.get(t, {}).get("ttt", [])) == seeds for c in cells.values())]
    if not cells or not tasks:
        return []
    return M.rank_configs({c: {t: cells[c][t] for t in tasks} for c in cells})


def run_ablation(cfg: Config, out_dir: Path, grid: dict | None = None, tasks=None, show_progress: bool = True) -> dict:
    """ES over the grid on each task, full once per task and seed for the
    target; ablation.json (rewritten after every run) and ablation.md."""
    torch.set_num_threads(cfg.threads)
    grid = parse_grid(grid or DEFAULT_GRID)
    tasks = parse_tasks(DEFAULT_TASKS) if tasks is None else tasks
    settings = grid_settings(grid)
    jobs = ablation_jobs(cfg, tasks, settings)
    warn = load_warning(cfg.threads, cfg.clock)
    res: dict[str, Any] = {
        "config": asdict(cfg),
        "machine": machine(),
        "rule": RULE,
        "grid": grid,
        "settings": settings,
        "tasks": [t.name for t in tasks],
        "targets": {},
        "metrics": {},  # per task: test_acc, or test_loss (the LM)
        "cells": {setting_name(s): {} for s in settings},
        "full": {},
        "ranking": [],
        "chosen": None,
        "complete": False,
        "interrupted": False,
        "load_warning": warn,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "ablation.json"
    eta = Eta(cfg.meta_batch)
    log = _Log(len(jobs), "ablation", show_progress)
    log.line(
        f"ablation: {len(settings)} settings x {len(tasks)} tasks x {cfg.seeds} seeds = "
        f"{len(settings) * len(tasks) * cfg.seeds} ES runs + {len(tasks) * cfg.seeds} full runs"
    )
    log.line(RULE)
    log.line(f"times: training {clock_name(asdict(cfg))} (--clock {cfg.clock})")
    if warn:
        log.line(warn)
    cache = {}
    with log.running(res, path):
        for i, (task, seed, s) in enumerate(jobs):
            if task.dataset not in cache:
                cache[task.dataset] = device_data(load_dataset(task.dataset, cfg), cfg)
            goal = task_goal(cache[task.dataset])
            res["metrics"][task.name] = goal.key
            data = with_noise(cache[task.dataset], task.label_noise, seed)
            tcfg = task_config(cfg, task)
            if s is None:
                r = train("full", data, tcfg, seed, log.bar)
                res["full"].setdefault(task.name, []).append({k_: r[k_] for k_ in ("wall_s", goal.key, "curve")})
                if len(res["full"][task.name]) == cfg.seeds:
                    res["targets"][task.name] = statistics.fmean(x[goal.key] for x in res["full"][task.name])
                what = "full"
            else:
                tcfg = replace(
                    tcfg,
                    beta1=s["beta1"],
                    beta2=s["beta2"],
                    lam=s["lam"],
                    eps=s["eps"],
                    mini_batch=_mini_batch(tcfg, s["ratio"]),
                )
                r = train("es", data, tcfg, seed, log.bar)
                hit = M.time_to_target(r["curve"], res["targets"][task.name], goal.higher)
                final = f"final_{goal.short}"  # final_acc; final_loss for the LM (not in the tie-break)
                cell = res["cells"][setting_name(s)].setdefault(
                    task.name, {"ttt": [], "ttt_backward": [], final: [], "wall_s": [], "curve": []}
                )
                cell["ttt"].append(None if hit is None else hit[0])
                cell["ttt_backward"].append(None if hit is None else hit[1])
                cell[final].append(r[goal.key])
                cell["wall_s"].append(r["wall_s"])
                cell["curve"].append(r["curve"])
                what = setting_name(s)
            eta.record(_ablation_key(cfg, task, s), r["epochs"], r["elapsed_s"])
            write_json(path, res)
            rest = eta.remaining_partial([(_ablation_key(cfg, t, s_), t.epochs) for t, _, s_ in jobs[i + 1 :]])
            log.finished(i, f"{task.name} seed {seed} {what}", r, goal, rest)
    return _finish_ablation(res, out_dir)


def _finish_ablation(res: dict, out_dir: Path) -> dict:
    """Rank by the rule, choose (only when complete), write ablation.json and ablation.md."""
    ranking = rank_ablation(res)
    res["ranking"] = [{"setting": c, "mean_rank": r, "mean_final_acc": a} for c, r, a in ranking]
    res["chosen"] = None
    if ranking and res["complete"]:
        res["chosen"] = next(s for s in res["settings"] if setting_name(s) == ranking[0][0])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "ablation.json", res)
    (out_dir / "ablation.md").write_text(format_ablation(res) + "\n")
    return res


def merge_ablations(paths, out_dir: Path) -> dict:
    """One ablation from several runs of the same grid on different tasks
    (shards run side by side): each shard's finished tasks (every setting,
    every seed) are taken, a task in two shards is refused; the rule then
    ranks the union as if one run had made it. ``merged_from`` records which
    tasks came from which file, and whether that run completed (a run stopped
    early gives the tasks it finished)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    same = ("grid", "settings", "rule")
    for p, r in zip(paths[1:], parts[1:]):
        bad = [k for k in same if r[k] != parts[0][k]]
        bad += [k for k in ("seeds", "clock", "threads") if r["config"].get(k) != parts[0]["config"].get(k)]
        if bad:
            raise ValueError(f"paths: {p} differs from {paths[0]} in {', '.join(bad)}")
    res = dict(parts[0], tasks=[], targets={}, full={}, cells={c: {} for c in parts[0]["cells"]}, merged_from=[])
    for p, r in zip(paths, parts):
        done = [t for t in r["tasks"] if t in r["targets"] and all(t in cell for cell in r["cells"].values())]
        done = [t for t in done if all(len(c[t]["final_acc"]) == r["config"]["seeds"] for c in r["cells"].values())]
        twice = set(done) & set(res["tasks"])
        if twice:
            raise ValueError(f"paths: tasks {sorted(twice)} are in more than one file")
        res["tasks"] += done
        for t in done:
            res["targets"][t], res["full"][t] = r["targets"][t], r["full"][t]
            for c in res["cells"]:
                res["cells"][c][t] = r["cells"][c][t]
        res["merged_from"].append({"path": str(p), "tasks": done, "complete": r["complete"]})
    res.update(complete=bool(res["tasks"]), interrupted=False)
    return _finish_ablation(res, out_dir)
