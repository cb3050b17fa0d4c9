"""The demo's settings: :class:`Config`, the methods, the presets (the
default run, ``--full``, ``--quick``, the LM task) and the training clocks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .._spec import DEFAULT_EPS, DEFAULT_LAM
from ..functional import DEFAULT_BETA1, DEFAULT_BETA2

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


def base_method(method: str) -> str:
    return method[: -len("-time")] if method.endswith("-time") else method


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


# The default run (es-kernels demo, make demo): the methods that answer "what
# does ES buy?" on the digits, 3 seeds, timed on one thread's CPU time: a few
# minutes of real time on 2 busy cores. --full: the study of the README's
# tables (every method of METHODS on MNIST-1D and the digits, 3 seeds).
DEFAULT_METHODS = ("full", "uniform", "es", "eswp", "uniform-time")
DEFAULT_RUN: dict[str, Any] = dict(seeds=3, methods=DEFAULT_METHODS)
DEFAULT_DATASETS = ("digits",)  # the classification task's (the LM has its own)
FULL_RUN: dict[str, Any] = dict(seeds=3)  # and the task's methods and data sets: Config's, LM's for the LM
CLI_THREADS = 1  # the command line's --threads and --clock (a Config's own defaults: torch's threads, wall)
CLI_CLOCK = "process"
QUICK: dict[str, Any] = dict(epochs=8, mnist1d_samples=6000, hidden=512, smoke_test=True)
LM_METHODS = ("full", "uniform", "es", "eswp") + TIME_METHODS
# the LM task's run (--task lm), fixed before its first run (README, "The LM task")
LM: dict[str, Any] = dict(
    task="lm", datasets=("lm",), methods=LM_METHODS, epochs=12, meta_batch=64, mini_batch=16, lr=2e-3
)
LM_QUICK: dict[str, Any] = dict(epochs=3, lm_train_seqs=512, lm_test_seqs=128, smoke_test=True)
