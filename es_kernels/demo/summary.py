"""The demo's summaries: per method, means over seeds of the plain numbers
and of the fair metrics (:mod:`es_kernels.demo.metrics`), and the verdict."""

from __future__ import annotations

import statistics

from . import metrics as M
from .config import sampler_kind

_mean_sd = M.mean_sd


def fair_reference(runs: dict, goal: M.Goal = M.ACCURACY) -> dict:
    """The target (mean over seeds of full's final accuracy, or held-out
    loss: ``target_acc`` / ``target_loss``) and the common window (ES's mean
    wall-clock; without ES the shortest method's mean)."""
    full = runs.get("full") or []
    target = statistics.fmean(r[goal.key] for r in full) if full else None
    es = runs.get("es") or []
    window: float | None
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


def _share(tt: dict, full_s: float) -> str:
    """``"20.5 s (50% of full's)"`` with the seeds that reached, when not all."""
    t = tt["wall_s"]["mean"]
    seeds = "" if tt["reached"] == tt["of"] else f", {tt['reached']} of {tt['of']} seeds"
    return f"{t:.3g} s ({100 * t / full_s:.0f}% of full's time{seeds})"


def verdict(name: str, ds: dict) -> str | None:
    """One sentence on what ES bought on a data set (``ds``: its entry of the
    results, with ``summary`` and the target): ES's time to full's final
    value against full's training time, and what uniform sampling given
    ES's time (``uniform-time``) did. None without full and ES."""
    goal = M.GOALS[ds.get("metric", M.ACCURACY.key)]
    s = ds.get("summary", {})
    target = ds.get(f"target_{goal.short}")
    if "full" not in s or "es" not in s or target is None:
        return None
    full_s = s["full"]["wall_s"]["mean"]
    what = f"full's final accuracy ({target:.1f}%)" if goal.higher else f"full's final held-out loss ({target:.4f})"
    es = s["es"]
    tt = es["time_to_target"]
    if tt["reached"]:
        out = f"{name}: ES reached {what} in {_share(tt, full_s)}"
    else:
        final = goal.fmt(es[goal.key]["mean"]) + ("%" if goal.higher else "")
        out = f"{name}: ES did not reach {what} in its {es['epochs']['mean']:.3g} epochs (final {final})"
    u = s.get("uniform-time")
    if u is not None:
        ut = u["time_to_target"]
        same = f"uniform sampling given ES's time ({u['wall_s']['mean']:.3g} s)"
        if ut["reached"]:
            out += f"; {same} reached it in {_share(ut, full_s)}"
        else:
            final = goal.fmt(u[goal.key]["mean"]) + ("%" if goal.higher else "")
            out += f"; {same} did not reach it (final {final})"
    return out + "."
