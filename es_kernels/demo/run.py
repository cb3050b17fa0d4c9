"""The main job: train a small network on real data with several methods and
compare them fairly: wall-clock, backward work, test accuracy, and the time
each method needs to reach the full baseline's accuracy.

    es-kernels demo                  # default run
    es-kernels demo --quick          # a smoke test (8 epochs: too few for ES)
    es-kernels demo --label-noise 0.4
    es-kernels demo --ablate         # the grid and the rule behind the defaults
    es-kernels demo --eta-only       # time an epoch of full and ES per data set, print the ETA
    es-kernels demo --nproc 2        # every method under DDP on 2 gloo processes
    es-kernels demo --task lm        # a small GPT-2 on the standard library's sources (held-out loss)
    es-kernels demo --threads 1 --clock process   # time = this process's CPU time (a shared machine)

Methods, each with the same optimizer and model:

* ``full``: backprop the whole meta-batch of B samples;
* ``uniform``: b random samples of each meta-batch (ES's backward budget);
* ``es``: Evolved Sampling, b of B chosen by the fused ``es_step``;
* ``eswp``: ES with pruning (ESWPSampler) on top;
* ``infobatch``: the InfoBatch rule as the peer baseline: each epoch, drop
  samples whose last loss is below the mean with probability r, rescale the
  kept ones by 1/(1-r), anneal; backprop whole meta-batches of what is kept;
* ``uniform-time``, ``full-time``: uniform / full trained for ES's mean
  wall-clock on that data set (stopped by time, however many epochs that is).

Fair metrics (docs in README, "The demo"): the target is the mean over seeds
of full's final test accuracy; time-to-target (wall-clock and backward
samples; "not reached" is a result); accuracy at ES's wall-clock; the mean
accuracy over the window [0, ES's wall-clock] (area under the held
accuracy-vs-time curve divided by the window).

Data, all generated or shipped locally: MNIST-1D made by the ``mnist1d``
package (``make_dataset``, never its download) and scikit-learn's bundled
handwritten digits. ``--task lm`` (:mod:`es_kernels.demo.lmtask`): a GPT-2
built from a ``transformers`` config trained on the Python standard
library's sources, bytes as tokens; the metric is the held-out loss
(nats/byte, lower is better) and the target full's final held-out loss.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F

from .._spec import DEFAULT_EPS, DEFAULT_LAM
from ..functional import DEFAULT_BETA1, DEFAULT_BETA2, es_update
from ..sampler import ESWPSampler, EvolvedSampler
from . import metrics as M
from .report import clock_name, fmt_s, format_ablation, format_summary, machine, plot
from .tasks import corrupt_labels, load_dataset

TIME_METHODS = ("uniform-time", "full-time")
METHODS = ("full", "uniform", "es", "eswp", "infobatch") + TIME_METHODS
# the scoring-schedule study (bench/results/demo_schedule): --methods only, not in the default run.
# A method ``es-<policy>`` / ``eswp-<policy>`` is ES (ESWP) with EvolvedSampler(schedule=SCHEDULES[policy])
# at the sampler's default cap; ``stale3``'s max_age is 3 epochs of steps of the task.
SCHEDULES = {"epoch3": "epoch:3", "frac": f"fraction:{1 / 3!r}", "stale3": "stale:{3 epochs}"}
SCHEDULE_METHODS = tuple(f"{kind}-{policy}" for kind in ("es", "eswp") for policy in SCHEDULES)
ALL_METHODS = METHODS[:5] + SCHEDULE_METHODS + TIME_METHODS


def policy_of(method: str) -> str | None:
    """``"es-epoch3"`` / ``"eswp-epoch3"`` -> ``"epoch3"``; None for a method without a schedule."""
    head, _, tail = method.partition("-")
    return tail if head in ("es", "eswp") and tail in SCHEDULES else None


def schedule_of(method: str, steps_per_epoch: int) -> str:
    """The sampler's ``schedule`` argument for ``method`` (``"step"`` without a policy)."""
    policy = policy_of(base_method(method))
    if policy is None:
        return "step"
    return SCHEDULES[policy].replace("{3 epochs}", str(3 * steps_per_epoch))


def sampler_kind(method: str) -> str:
    """``es`` / ``eswp`` for ES with or without pruning (any schedule), else the method's base."""
    base = base_method(method)
    return base.partition("-")[0] if policy_of(base) else base


def smoke_note(epochs: int) -> str:
    return (
        f"SMOKE TEST (--quick): {epochs} epochs on reduced data check that everything runs; {epochs} epochs are "
        f"too few for ES's loss history (each sample is scored only {epochs} times, so its level s and trend d "
        "barely leave their first values). Do not read the numbers as results."
    )


@dataclass
class Config:
    datasets: tuple = ("mnist1d", "digits")
    seeds: int = 3
    epochs: int = 30
    meta_batch: int = 512
    mini_batch: int = 171  # b/B = 1/3, chosen with lam by the ablation's rule (README)
    hidden: int = 1024
    lr: float = 1e-3
    mnist1d_samples: int = 20000
    label_noise: float = 0.0
    beta1: float = DEFAULT_BETA1
    beta2: float = DEFAULT_BETA2
    prune_ratio: float = 0.5
    anneal_frac: float = 0.125
    methods: tuple = METHODS
    threads: int = field(default_factory=torch.get_num_threads)
    lam: float = DEFAULT_LAM
    eps: float = DEFAULT_EPS
    device: str = "cpu"
    score_dtype: str = "auto"  # the scoring pass: auto (bf16 autocast on CUDA), float32, bfloat16
    smoke_test: bool = False
    nproc: int = 1  # processes (DDP, gloo); the global meta-batch and mini-batch are split among them
    task: str = "classification"  # or "lm": the language model (es_kernels.demo.lmtask)
    lm_seq_len: int = 64  # bytes per sequence (the LM task)
    lm_train_seqs: int = 1024
    lm_test_seqs: int = 256
    lm_width: int = 64  # GPT-2 n_embd
    lm_layers: int = 2
    lm_heads: int = 4
    clock: str = "wall"  # what training time is measured on: CLOCKS


# Training time: "wall" is real time; "process" is this process's CPU time (all
# its threads: meaningful with --threads 1), fair between runs made at
# different moments on a machine shared with other work.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


QUICK = dict(epochs=8, mnist1d_samples=6000, hidden=512, smoke_test=True)
LM_METHODS = ("full", "uniform", "es", "eswp") + TIME_METHODS
# the LM task's run (--task lm), fixed before its first run (README, "The LM task")
LM = dict(task="lm", datasets=("lm",), methods=LM_METHODS, epochs=12, meta_batch=64, mini_batch=16, lr=2e-3)
LM_QUICK = dict(epochs=3, lm_train_seqs=512, lm_test_seqs=128, smoke_test=True)


# ---------------------------------------------------------------- training
def make_model(d_in: int, hidden: int, k: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, k),
    )


@torch.inference_mode()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * acc


class Classification:
    """The classification problem on ``(x_train, y_train, x_test, y_test,
    num_classes)`` tensors, as the training loop sees a task (the language
    model is :class:`es_kernels.demo.lmtask.LMTask`): the model, per-sample
    losses, ES's scoring pass, the evaluation and its :class:`Goal`."""

    goal = M.ACCURACY

    def __init__(self, data, hidden: int):
        self.xtr, self.ytr, self.xte, self.yte, self.k = data
        self.hidden = hidden

    def model(self, seed: int) -> torch.nn.Module:
        return make_model(self.xtr.shape[1], self.hidden, self.k, seed)

    def losses(self, model, x, y) -> torch.Tensor:
        return F.cross_entropy(model(x), y, reduction="none")

    def score(self, net, x, y) -> dict:
        """The scoring pass's arguments of ``EvolvedSampler.select`` (the caller holds inference_mode)."""
        return {"logits": net(x), "targets": y}

    def evaluate(self, net) -> float:
        return accuracy(net, self.xte, self.yte)


def as_task(data, cfg):
    """A task object from a data tuple (classification) or the task itself."""
    return Classification(data, cfg.hidden) if isinstance(data, tuple) else data


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def score_autocast_dtype(cfg: Config, dev: torch.device):
    """The autocast dtype of the scoring pass, or None (no autocast)."""
    if cfg.score_dtype == "float32":
        return None
    if cfg.score_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.score_dtype != "auto":
        raise ValueError(f"score_dtype must be auto, float32 or bfloat16; got {cfg.score_dtype!r}")
    return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _world() -> tuple:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _agree_max(x: float, world: int) -> float:
    """The largest ``x`` over the ranks (``x`` itself in one process)."""
    if world == 1:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def base_method(method: str) -> str:
    return method[: -len("-time")] if method.endswith("-time") else method


def infobatch_losses(es, ids: torch.Tensor, per: torch.Tensor) -> torch.Tensor:
    """InfoBatch's step on a meta-batch: the losses become the samples' scores
    (``s = l``, ``d = 0``: ``es`` has ``beta1 = 0``, ``beta2 = 1``) and come back
    scaled by the epoch's rescale (``1/(1-r)`` for a kept pruned-class sample).
    Under a process group (a DistributedEvolvedSampler) every rank's losses
    reach every replica."""
    from ..distributed import DistributedEvolvedSampler

    if isinstance(es, DistributedEvolvedSampler):
        es.observe(ids, per.detach())
    else:
        es_update(ids, per.detach(), es.state, beta1=0.0, beta2=1.0)
    return per * es.scales_of(ids)


def train(method: str, data, cfg: Config, seed: int, progress=None, *, time_budget: float | None = None) -> dict:
    """One run. ``time_budget`` (seconds of training time on ``cfg.clock``) stops the run
    by time instead of by epochs, required by the ``-time`` methods: it stops
    after the last step that, at the last step's pace, ends within the budget.

    Returns wall_s (training time on ``cfg.clock``: real time, or this
    process's CPU time; evaluation excluded), backward_samples,
    test_acc (final; test_loss for the LM: the task's goal), curve
    (``[wall_s, test_acc or test_loss, backward]`` at the start,
    after each epoch and at a time stop), epochs (completed; a time stop adds
    the fraction of its last epoch), score_s (the scoring passes: no-grad
    forward over B and the fused step, timed inside the loop), elapsed_s
    (real time with evaluation) and load_1min (the load average at the end).

    Under a process group of W ranks (``--nproc`` or torchrun) each rank
    trains a DDP replica on its shard of every epoch with meta-batch B/W and
    mini-batch b/W; the ES state is replicated (es_kernels.distributed). The
    ranks agree on the wall-clock (the slowest rank's, at every evaluation)
    and on a time stop; backward samples are summed over the ranks.
    """
    task = as_task(data, cfg)
    xtr, ytr = task.xtr, task.ytr
    dev = xtr.device
    base = sampler_kind(method)
    if method.endswith("-time") and time_budget is None:
        raise ValueError(f"{method} needs a time_budget")
    n = xtr.shape[0]
    world, rank = _world()
    B, b = cfg.meta_batch // world, cfg.mini_batch // world
    if cfg.clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {cfg.clock!r}")
    clock = CLOCKS[cfg.clock]
    started = time.perf_counter()
    net = model = task.model(seed).to(dev)
    if world > 1:
        from ..distributed import DistributedESWPSampler, DistributedEvolvedSampler, shard_indices

        model = torch.nn.parallel.DistributedDataParallel(net)
        ES = functools.partial(DistributedEvolvedSampler, meta_batch=B)
        Pruner = DistributedESWPSampler
    else:
        ES, Pruner = EvolvedSampler, ESWPSampler
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: the optimizer is not the bottleneck
    g = torch.Generator().manual_seed(seed)
    es = pruner = None
    if base in ("es", "eswp"):
        schedule = schedule_of(method, -(-n // B))
        if schedule != "step" and world > 1:
            raise ValueError(f"{method}: the demo runs a scoring schedule in one process")
        sched_kw = {} if schedule == "step" else {"schedule": schedule}
        es = ES(n, b, beta1=cfg.beta1, beta2=cfg.beta2, lam=cfg.lam, eps=cfg.eps, seed=seed, device=dev, **sched_kw)
    if base == "infobatch":  # score = the last training loss: s = l, d = 0
        es = ES(n, B, beta1=0.0, beta2=1.0, seed=seed, device=dev)
    if base in ("eswp", "infobatch"):
        pruner = Pruner(es, num_epochs=cfg.epochs, prune_ratio=cfg.prune_ratio, anneal_frac=cfg.anneal_frac, seed=seed)
    ac_dtype = score_autocast_dtype(cfg, dev)
    max_epochs = cfg.epochs if time_budget is None else 1000 * max(cfg.epochs, 1)
    wall = score_s = 0.0
    backward = 0
    epochs = 0.0
    curve = [[0.0, task.evaluate(net), 0]]
    stopped = False
    for epoch in range(max_epochs):
        _sync(dev)
        t0 = clock()
        if pruner is not None:
            pruner.set_epoch(epoch)
            order = pruner.epoch_ids()  # what a DataLoader would draw
        else:
            if es is not None and world == 1:
                es.set_epoch(epoch)  # the scoring schedule's epoch (ESWP's sampler sets it itself)
            order = torch.randperm(n, generator=g)
            if world > 1:  # this rank's share, as DistributedSampler (same length on every rank)
                order = shard_indices(order, world, rank, False)
        n_order = order.shape[0]
        for start in range(0, n_order, B):
            t_step = clock()
            ids = order[start : start + B].to(dev)
            x, y = xtr[ids], ytr[ids]
            if base in ("full", "infobatch"):
                per = task.losses(model, x, y)
                if base == "infobatch":
                    per = infobatch_losses(es, ids, per)
                backward += ids.shape[0]
            elif base == "uniform":
                pos = torch.randperm(ids.shape[0], generator=g)[:b].to(dev)
                per = task.losses(model, x[pos], y[pos])
                backward += pos.shape[0]
            elif not es.needs_scores:  # a scoring schedule: select from the stored state
                ts = clock()
                sel = es.select(ids)
                score_s += clock() - ts
                pos = sel.positions
                per = task.losses(model, x[pos], y[pos])
                ts = clock()
                es.observe(ids[pos], per.detach())  # the training forward's losses, before the ESWP scale
                score_s += clock() - ts
                per = per * sel.scales
                backward += pos.shape[0]
            else:
                ts = clock()
                with (
                    torch.inference_mode(),
                    torch.autocast(dev.type, dtype=ac_dtype or torch.bfloat16, enabled=ac_dtype is not None),
                ):
                    scored = task.score(net, x, y)  # the scoring pass: no autograd record at all
                sel = es.select(ids, **scored)
                _sync(dev)  # CUDA only: timing the scoring separately costs a synchronisation there
                score_s += clock() - ts
                pos = sel.positions
                per = task.losses(model, x[pos], y[pos]) * sel.scales
                backward += pos.shape[0]
            opt.zero_grad(set_to_none=True)
            per.mean().backward()
            opt.step()
            if time_budget is not None:  # stop before a step that would overrun the budget
                _sync(dev)
                now = clock()
                over = wall + (now - t0) + (now - t_step) > time_budget
                if _agree_max(float(over), world) > 0:  # every rank stops after the same step
                    stopped = True
                    epochs += min(start + B, n_order) / n_order
                    break
        _sync(dev)
        wall = _agree_max(wall + clock() - t0, world)  # the slowest rank's
        if not stopped:
            epochs += 1
        curve.append([wall, task.evaluate(net), backward * world])  # evaluation is not timed
        if progress is not None:
            progress.set_postfix_str(
                f"{method} seed {seed} epoch {epoch + 1}"
                f"{'' if time_budget is not None else '/' + str(cfg.epochs)} "
                f"{task.goal.short} {task.goal.fmt(curve[-1][1])}"
            )
        if stopped:
            break
    if es is not None:
        es.state.check()
    if world > 1:  # backward samples: all ranks (equal shards: the curve's backward * world is exact)
        import torch.distributed as dist

        back = torch.tensor([backward], dtype=torch.int64)
        dist.all_reduce(back)
        backward = int(back)
        score_s = _agree_max(score_s, world)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "wall_s": wall,
        "backward_samples": backward,
        task.goal.key: curve[-1][1],
        "curve": curve,
        "epochs": epochs,
        "score_s": score_s,
        "elapsed_s": time.perf_counter() - started,
        "load_1min": load,
        "time_budget_s": time_budget,
    }


# ---------------------------------------------------------------- summaries
_mean_sd = M.mean_sd


def fair_reference(runs: dict, goal: M.Goal = M.ACCURACY) -> dict:
    """The target (mean over seeds of full's final accuracy, or held-out
    loss: ``target_acc`` / ``target_loss``) and the common window (ES's mean
    wall-clock; without ES the shortest method's mean)."""
    full = runs.get("full") or []
    target = statistics.fmean(r[goal.key] for r in full) if full else None
    es = runs.get("es") or []
    if es:
        window = statistics.fmean(r["wall_s"] for r in es)
    else:
        walls = [statistics.fmean(r["wall_s"] for r in rs) for rs in runs.values() if rs]
        window = min(walls) if walls else None
    return {f"target_{goal.short}": target, "window_s": window}


def summarize(runs: dict, goal: M.Goal = M.ACCURACY) -> dict:
    """Per method: means ± sd over seeds of the plain numbers and of the fair
    metrics (fair_reference); methods without runs are left out. The keys
    follow the goal: ``test_acc``, ``acc_at_window``, ``acc_minus_full`` for
    accuracy, ``test_loss``, ``loss_at_window``, ``loss_minus_full`` for the
    LM's held-out loss (``auc``: the mean value over the window, either)."""
    ref = fair_reference(runs, goal)
    target, window = ref[f"target_{goal.short}"], ref["window_s"]
    out = {}
    for method, rs in runs.items():
        if not rs:
            continue
        s = out[method] = {
            "wall_s": _mean_sd([r["wall_s"] for r in rs]),
            goal.key: _mean_sd([r[goal.key] for r in rs]),
            "backward_samples": _mean_sd([r["backward_samples"] for r in rs]),
            "epochs": _mean_sd([r.get("epochs", len(r["curve"]) - 1) for r in rs]),
        }
        if sampler_kind(method) in ("es", "eswp"):
            s["score_s"] = _mean_sd([r["score_s"] for r in rs])
            s["scoring_share"] = _mean_sd([r["score_s"] / r["wall_s"] for r in rs])
        if target is not None:
            hits = [M.time_to_target(r["curve"], target, goal.higher) for r in rs]
            got = [h for h in hits if h is not None]
            s["time_to_target"] = {
                "reached": len(got),
                "of": len(rs),
                "per_seed": hits,
                "wall_s": _mean_sd([h[0] for h in got]),
                "backward_samples": _mean_sd([h[1] for h in got]),
            }
        if window:
            s[f"{goal.short}_at_window"] = _mean_sd([M.acc_at(r["curve"], window) for r in rs])
            s["auc"] = _mean_sd([M.auc(r["curve"], window) for r in rs])
    if "full" in out:
        base = out["full"]
        for s in out.values():
            s["wall_saving_vs_full"] = 1.0 - s["wall_s"]["mean"] / base["wall_s"]["mean"]
            s[f"{goal.short}_minus_full"] = s[goal.key]["mean"] - base[goal.key]["mean"]
            if "score_s" in s:  # what ES would save if its training part cost exactly its share of backward
                s["ideal_saving"] = 1.0 - (
                    s["score_s"]["mean"] / base["wall_s"]["mean"]
                    + s["backward_samples"]["mean"] / base["backward_samples"]["mean"]
                )
    return out


# ---------------------------------------------------------------- ETA, load, output
_COST = {
    "full": lambda r: 1.0,
    "infobatch": lambda r: 0.75,
    "uniform": lambda r: r,
    "es": lambda r: 1 / 3 + r,
    "eswp": lambda r: 0.75 * (1 / 3 + r),
}


class Eta:
    """Remaining time from measured epoch times (real time, evaluation
    included), keyed by (dataset, method, b); a key not measured yet is
    estimated from full's epoch on that data set and a cost model."""

    def __init__(self, meta_batch: int):
        self.B = meta_batch
        self.per_epoch: dict = {}

    def record(self, key, epochs: float, seconds: float) -> None:
        if epochs > 0:
            self.per_epoch.setdefault(key, []).append(seconds / epochs)

    def estimate(self, key, epochs: float):
        """Seconds for ``epochs`` of ``key``, or None when nothing on its data set was measured."""
        if key in self.per_epoch:
            return statistics.fmean(self.per_epoch[key]) * epochs
        ds, method, b = key
        cost = _COST.get(method) or _COST[sampler_kind(method)]  # a schedule: at most ES's cost
        # the data set's meta-batch: its full run's b (the LM's differs from the demo's)
        B = next((b2 for d2, m2, b2 in self.per_epoch if d2 == ds and m2 == "full"), self.B)
        for (d2, m2, b2), v in self.per_epoch.items():  # the same method at another b
            if d2 == ds and m2 == method:
                return statistics.fmean(v) * cost(b / B) / cost(b2 / B) * epochs
        full = self.per_epoch.get((ds, "full", B))
        if full is None:
            return None
        return statistics.fmean(full) * cost(b / B) * epochs

    def remaining(self, jobs) -> float | None:
        """``jobs``: [(key, epochs)]; None while some key cannot be estimated."""
        total = 0.0
        for key, epochs in jobs:
            e = self.estimate(key, epochs)
            if e is None:
                return None
            total += e
        return total

    def remaining_partial(self, jobs) -> tuple:
        """``(seconds of the estimable jobs, sorted data sets not measured yet)``."""
        total, unknown = 0.0, set()
        for key, epochs in jobs:
            e = self.estimate(key, epochs)
            if e is None:
                unknown.add(key[0])
            else:
                total += e
        return total, sorted(unknown)


def fmt_eta(seconds, unmeasured=()) -> str:
    """``seconds`` (None: unknown), plus the data sets not measured yet."""
    if seconds is None or (unmeasured and not seconds):
        return "ETA unknown until full has run once per data set"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = "ETA " + (f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s")
    return out + (f" + the runs on {', '.join(unmeasured)} (not measured yet)" if unmeasured else "")


def load_warning(threads: int, clock: str = "wall") -> str | None:
    """A warning when the 1-minute load average exceeds the thread count."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load > threads:
        return (
            f"WARNING: load average {load:.1f} > {threads} threads: other work competes for the cores, "
            f"so wall-clock numbers (and everything measured in time) are unreliable on this run."
            + (
                " The times here are this process's CPU time (--clock process): less affected by the load, "
                "not immune to it (shared caches and memory bandwidth)."
                if clock == "process"
                else ""
            )
        )
    return None


def write_json(path: Path, obj) -> None:
    """Atomic write (a partial file never replaces a complete one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class _Log:
    """A tqdm bar (or nothing) plus one printed line per finished run."""

    def __init__(self, total: int, desc: str, show: bool, quiet: bool = False):
        self.bar = None
        self.desc = desc
        self.total = total
        self.quiet = quiet  # a rank > 0 of a distributed run
        if show and not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, bar_format="{l_bar}{bar} {n_fmt}/{total_fmt} [{elapsed}]{postfix}")

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def update(self, eta: str = "") -> None:
        if self.bar is not None:
            if eta:
                self.bar.set_description(f"{self.desc} ({eta})", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finished(self, i: int, what: str, r: dict, goal, remaining: tuple) -> None:
        """The line of finished run ``i`` (``what``, its result ``r``, scored
        by ``goal``) with the ETA of the ``remaining`` runs (``Eta.remaining_partial``)."""
        rest = fmt_eta(*remaining)
        self.line(
            f"[{i + 1}/{self.total}] {what}: {fmt_s(r['wall_s'])} s, "
            f"{r['epochs']:.3g} epochs, {goal.short} {goal.fmt(r[goal.key])}; {rest}"
        )
        self.update(rest.split(" + ")[0])

    @contextlib.contextmanager
    def running(self, results: dict, path: Path):
        """Around the loop of runs: Ctrl-C stops it with ``results`` marked
        interrupted (the finished runs are in ``path``); the bar is closed;
        ``results["complete"]`` says whether every run finished."""
        try:
            yield
        except KeyboardInterrupt:
            results["interrupted"] = True
            self.line(f"interrupted: the finished runs are in {path}")
        finally:
            self.close()
        results["complete"] = not results["interrupted"]


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


def _device_data(data, cfg: Config):
    dev = torch.device(cfg.device)
    if not isinstance(data, tuple):  # a task object (the LM)
        return data.to(dev)
    return tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in data)


def _with_noise(data, p: float, seed: int):
    """A seed's training data: classification labels corrupted with
    probability ``p``; a task object (the LM, no labels to flip) as is."""
    if not isinstance(data, tuple):
        if p > 0:
            raise ValueError(f"label noise applies to the classification data sets, not the LM task (got {p})")
        return data
    xtr, ytr, xte, yte, k = data
    return (xtr, corrupt_labels(ytr.cpu(), p, k, seed).to(ytr.device), xte, yte, k)


def _describe(data) -> dict:
    if isinstance(data, tuple):
        return {"n_train": int(data[0].shape[0]), "n_test": int(data[2].shape[0]), "metric": M.ACCURACY.key}
    return {**data.describe(), "metric": data.goal.key}


def _goal(data) -> M.Goal:
    return M.ACCURACY if isinstance(data, tuple) else data.goal


def run_demo(cfg: Config, out_dir: Path, show_progress: bool = True) -> dict:
    """Every method on every data set; demo.json is rewritten after each run
    (``complete`` false until the end), so an interrupt keeps what finished."""
    world, rank = _world()
    torch.set_num_threads(max(1, cfg.threads // world))
    warn = load_warning(cfg.threads, cfg.clock)
    results = {
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
        for i, (name, seed, method) in enumerate(jobs):
            if name not in cache:
                cache[name] = _device_data(load_dataset(name, cfg), cfg)
                results["datasets"][name] = {
                    **_describe(cache[name]),
                    "summary": {},
                    "runs": {m: [] for m in cfg.methods},
                }
            ds = results["datasets"][name]
            goal = _goal(cache[name])
            data = _with_noise(cache[name], cfg.label_noise, seed)
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
            if rank == 0:
                write_json(path, results)
            rest = eta.remaining_partial([(_key(cfg, d, m), cfg.epochs) for d, _, m in jobs[i + 1 :]])
            log.finished(i, f"{name} {method} seed {seed}", r, goal, rest)
    if rank > 0:  # rank 0 writes
        return results
    write_json(path, results)
    if any(rs for ds in results["datasets"].values() for rs in ds["runs"].values()):
        plot(results, out_dir / "demo.png")
    return results


# ---------------------------------------------------------------- ablation
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
    grid = {k: [float(Fraction(v.strip())) for v in spec[k].split(",")] for k in ("beta1", "beta2", "lam", "eps")}
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
    lm = {k: LM[k] for k in ("task", "meta_batch", "lr")} if task.dataset == "lm" else {}
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
    res = {
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
                cache[task.dataset] = _device_data(load_dataset(task.dataset, cfg), cfg)
            goal = _goal(cache[task.dataset])
            res["metrics"][task.name] = goal.key
            data = _with_noise(cache[task.dataset], task.label_noise, seed)
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


def estimate_only(cfg: Config, ablate: bool, grid: dict | None, tasks) -> float:
    """Time one epoch of full and of ES (b/B = 1/4) per data set, then the
    planned run's time from the cost model (Eta). A real run refines it with
    every run it measures."""
    torch.set_num_threads(cfg.threads)
    eta = Eta(cfg.meta_batch)
    datasets = sorted({t.dataset for t in tasks}) if ablate else list(cfg.datasets)
    for ds in datasets:
        dcfg = task_config(cfg, Task(ds, 1, 0.0)) if ablate else cfg  # the LM's meta-batch on an lm task
        data = _device_data(load_dataset(ds, dcfg), dcfg)
        for method, b in (("full", dcfg.meta_batch), ("es", dcfg.meta_batch // 4)):
            r = train(method, data, replace(dcfg, epochs=1, mini_batch=b), 0)
            eta.record((ds, method, b), 1, r["elapsed_s"])
    if ablate:
        settings = grid_settings(parse_grid(grid or DEFAULT_GRID))
        jobs = [(_ablation_key(cfg, t, s), t.epochs) for t, _, s in ablation_jobs(cfg, tasks, settings)]
    else:
        jobs = [(_key(cfg, d, m), cfg.epochs) for d, _, m in demo_jobs(cfg)]
    return eta.remaining(jobs)


# ---------------------------------------------------------------- command line
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
