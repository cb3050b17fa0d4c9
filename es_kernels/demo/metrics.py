"""Fair metrics for the demo, on accuracy-vs-time (or loss-vs-time) curves.

A curve is a list of evaluation points ``[wall_s, value, backward_samples]``
in time order: the start (``[0, value0, 0]``), the end of each epoch, and for
a run stopped by time the stop. The value is the task's :class:`Goal`: test
accuracy (higher is better) for classification, held-out loss (lower is
better) for the language model. Between two evaluations the model one has is
the last evaluated one, so every metric reads the curve as a step function
(sample and hold), never by interpolation.

* :func:`time_to_target`: wall-clock and backward samples at the first point
  whose value reaches the target (at or above it for accuracy, at or below
  it for a loss); ``None`` ("not reached") is a result.
* :func:`acc_at`: the accuracy one has at time ``t`` (equal-time comparisons).
* :func:`auc`: the mean accuracy over a common window ``[0, window]``: the
  area under the held curve divided by the window (a run that finished
  earlier keeps its final accuracy).
* :func:`rank_configs`: the ablation's rule (README, "How the defaults are
  chosen").
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

TOL = 1e-9  # accuracies are means of floats: "reached" allows rounding


@dataclass(frozen=True)
class Goal:
    """What a task's curves measure: ``key`` names the final value in a run
    (``test_acc``, ``test_loss``) and, with ``_at_window`` / ``_minus_full``,
    the summary's derived metrics; ``higher`` says which way is better."""

    key: str
    higher: bool
    label: str  # axis and table label
    decimals: int

    @property
    def short(self) -> str:  # "acc" / "loss"
        return self.key.split("_", 1)[1]

    def fmt(self, x: float) -> str:
        return f"{x:.{self.decimals}f}"


ACCURACY = Goal("test_acc", True, "test accuracy %", 2)
LM_LOSS = Goal("test_loss", False, "held-out loss (nats/byte)", 4)
GOALS = {g.key: g for g in (ACCURACY, LM_LOSS)}


def reached(value: float, target: float, higher: bool = True) -> bool:
    """``value`` is at the target or better (within rounding)."""
    return value >= target - TOL if higher else value <= target + TOL


def time_to_target(curve, target: float, higher: bool = True):
    """``(wall_s, backward_samples)`` of the first point whose value reaches
    ``target`` (``>=`` when ``higher``, else ``<=``), or ``None``."""
    for t, v, bw, *_ in curve:
        if reached(v, target, higher):
            return float(t), int(bw)
    return None


def acc_at(curve, t: float) -> float:
    """Accuracy of the last evaluation at or before ``t`` (the first point if none)."""
    acc = curve[0][1]
    for ti, a, *_ in curve:
        if ti <= t + TOL:
            acc = a
        else:
            break
    return float(acc)


def auc(curve, window: float) -> float:
    """Mean accuracy over ``[0, window]`` of the held curve (area / window)."""
    if not window > 0:
        raise ValueError(f"window must be > 0, got {window}")
    area = 0.0
    for (t0, a0, *_), (t1, *_) in zip(curve, curve[1:]):
        if t0 >= window:
            break
        area += a0 * (min(t1, window) - t0)
    t_last, a_last = curve[-1][0], curve[-1][1]
    if t_last < window:
        area += a_last * (window - t_last)
    return area / window


def mean_sd(xs) -> dict:
    xs = list(xs)
    if not xs:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None}  # one value: no spread


def median_or_inf(xs) -> float:
    """Median with ``None`` (not reached) counted as +inf."""
    return statistics.median([math.inf if x is None else x for x in xs])


def average_ranks(values) -> list:
    """Ranks 1..n of ``values`` ascending; ties (equal values, also inf) share their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_configs(cells: dict) -> list:
    """The rule that picks the defaults, fixed before any run.

    ``cells[config][task] = {"ttt": [per-seed wall-clock to target or None],
    "final_acc": [per-seed final accuracy]}``, every config on the same tasks.
    Per task, a config's time-to-target is the median over seeds (not reached
    = +inf); configs are ranked by it (ties share their mean rank); the mean
    rank over tasks orders the configs, ties broken by the higher mean final
    accuracy over tasks and seeds (the tasks measured by accuracy: an LM
    task's cell has ``final_loss`` instead and enters by its times alone).
    Returns ``[(config, mean_rank, mean_acc)]`` best first (mean_acc None
    without accuracy tasks).
    """
    configs = list(cells)
    if not configs:
        return []
    tasks = list(cells[configs[0]])
    total = {c: 0.0 for c in configs}
    for task in tasks:
        ranks = average_ranks([median_or_inf(cells[c][task]["ttt"]) for c in configs])
        for c, r in zip(configs, ranks):
            total[c] += r
    accs = {c: [a for t in tasks for a in cells[c][t].get("final_acc", [])] for c in configs}
    acc = {c: statistics.fmean(a) if a else None for c, a in accs.items()}
    out = [(c, total[c] / len(tasks), acc[c]) for c in configs]
    out.sort(key=lambda r: (r[1], -(r[2] or 0.0)))
    return out
