"""The training loop: one run of one method on one task (:func:`train`),
the classification task and the pieces the loop shares with a process group."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..functional import es_update
from ..sampler import ESWPSampler, EvolvedSampler
from . import metrics as M
from .config import CLOCKS, Config, sampler_kind, schedule_of


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
        ES: Callable[..., EvolvedSampler] = functools.partial(DistributedEvolvedSampler, meta_batch=B)
        Pruner: Callable[..., ESWPSampler] = DistributedESWPSampler
    else:
        ES, Pruner = EvolvedSampler, ESWPSampler
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: the optimizer is not the bottleneck
    g = torch.Generator().manual_seed(seed)
    es: EvolvedSampler | None = None
    pruner: ESWPSampler | None = None
    if base in ("es", "eswp"):
        schedule = schedule_of(method, -(-n // B))
        if schedule != "step" and world > 1:
            raise ValueError(f"{method}: the demo runs a scoring schedule in one process")
        es = ES(
            n, b, beta1=cfg.beta1, beta2=cfg.beta2, lam=cfg.lam, eps=cfg.eps, seed=seed, device=dev, schedule=schedule
        )
    if base == "infobatch":  # score = the last training loss: s = l, d = 0
        es = ES(n, B, beta1=0.0, beta2=1.0, seed=seed, device=dev)
    if base in ("eswp", "infobatch"):
        assert es is not None  # made above for both
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
            elif es is not None and not es.needs_scores:  # a scoring schedule: select from the stored state
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
                assert es is not None  # es and eswp make it above
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
