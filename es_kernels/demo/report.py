"""The demo's output: machine description, plot, markdown tables."""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import textwrap
import time
from pathlib import Path

import torch

from . import metrics as M
from .config import smoke_note

CLOCK_NAMES = {"wall": "wall-clock", "process": "process CPU time"}


def clock_name(cfg: dict) -> str:
    """What the run's times are: wall-clock or process CPU time (``--clock``)."""
    return CLOCK_NAMES[cfg.get("clock", "wall")]


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_start": list(load) if load else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def fmt_s(x) -> str:
    """Seconds with enough decimals for short runs: 39.4, 2.63, 0.412."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    ax = abs(x)
    return f"{x:.0f}" if ax >= 100 else f"{x:.1f}" if ax >= 10 else f"{x:.2f}" if ax >= 1 else f"{x:.3f}"


def _scaled(per: int, x: float) -> str:
    return f"{per * x:.0f}"


def _ms(d: dict, f=fmt_s) -> str:
    if not d or d.get("mean") is None:
        return "—"
    return f(d["mean"]) if d.get("sd") is None else f"{f(d['mean'])} ± {f(d['sd'])}"


def goal_of(ds: dict) -> M.Goal:
    """A data set's goal (accuracy unless its JSON names another)."""
    return M.GOALS[ds.get("metric", M.ACCURACY.key)]


def backward_unit(ds: dict) -> tuple:
    """(unit name, units per backward sample): tokens for the LM, else samples."""
    per = ds.get("tokens_per_sample")
    return ("tokens", per) if per else ("samples", 1)


def model_caption(cfg: dict) -> str:
    if cfg.get("task") == "lm":
        return (
            f"GPT-2 {cfg['lm_layers']} layers x {cfg['lm_width']} ({cfg['lm_heads']} heads), "
            f"sequences of {cfg['lm_seq_len']} bytes"
        )
    return f"MLP hidden {cfg['hidden']}"


def settings_caption(cfg: dict) -> str:
    return (
        f"{cfg['epochs']} epochs, B={cfg['meta_batch']}, b={cfg['mini_batch']} "
        f"(b/B={cfg['mini_batch'] / cfg['meta_batch']:.3g}), "
        f"{model_caption(cfg)}, Adam lr {cfg['lr']:g}, {cfg['seeds']} seeds, label noise {cfg['label_noise']:g}; "
        f"ES beta1={cfg['beta1']:g} beta2={cfg['beta2']:g} lam={cfg.get('lam', 1):g} eps={cfg.get('eps', 0):g}; "
        f"ESWP/InfoBatch prune {cfg['prune_ratio']:g}, anneal {cfg['anneal_frac']:g}; "
        f"{cfg['threads']} threads, {cfg.get('device', 'cpu')}; times: training {clock_name(cfg)}"
    )


def _panel(ax, ds: dict, col: int, scale: float, xlabel: str, clock: str = "wall-clock") -> None:
    """One panel: the goal against curve column ``col`` (0: wall-clock, 2:
    backward samples) times ``scale``; mean over seeds, min-max band, the
    target line, the time-to-target stars, ES's window on the time axis."""
    goal = goal_of(ds)
    target, window = ds.get(f"target_{goal.short}"), ds.get("window_s")
    tt_key = "wall_s" if col == 0 else "backward_samples"
    for i, (method, rs) in enumerate(ds["runs"].items()):
        if not rs:
            continue
        color = f"C{i}"
        n = min(len(r["curve"]) for r in rs)  # time stops may give unequal lengths
        t = [scale * statistics.fmean(r["curve"][e][col] for r in rs) for e in range(n)]
        a = [statistics.fmean(r["curve"][e][1] for r in rs) for e in range(n)]
        lo = [min(r["curve"][e][1] for r in rs) for e in range(n)]
        hi = [max(r["curve"][e][1] for r in rs) for e in range(n)]
        label = method
        tt = ds["summary"].get(method, {}).get("time_to_target")
        if tt is not None:
            if tt["reached"]:
                at = scale * tt[tt_key]["mean"]
                label += f" (target at {fmt_s(at) if col == 0 else f'{at:.3g}'}, {tt['reached']}/{tt['of']} seeds)"
                ax.plot([at], [target], marker="*", markersize=13, color=color, markeredgecolor="black", zorder=5)
            else:
                label += " (target not reached)"
        ax.plot(t, a, marker=".", color=color, label=label, drawstyle="steps-post")  # held between evaluations
        if len(rs) > 1:
            ax.fill_between(t, lo, hi, color=color, alpha=0.15, linewidth=0, step="post")
        if any(len(r["curve"]) > n for r in rs):  # the seeds' own last points
            ax.plot([scale * r["curve"][-1][col] for r in rs], [r["curve"][-1][1] for r in rs], "x", color=color)
    if target is not None:
        what = "accuracy" if goal.higher else "held-out loss"
        ax.axhline(
            target, color="black", linestyle="--", linewidth=1, label=f"target: full's final {what} {goal.fmt(target)}"
        )
    if window and col == 0:
        ax.axvline(window, color="gray", linestyle=":", linewidth=1, label=f"ES's {clock} {fmt_s(window)} s")
    vals = [p[1] for rs in ds["runs"].values() for r in rs for p in r["curve"][1:]]
    if vals:  # the start (chance level, or the initial loss) would squash the interesting part
        lo_v, hi_v = min(vals), max(vals)
        if goal.higher:
            ax.set_ylim(max(0.0, lo_v - 2), min(100.0, hi_v + 0.2 * (hi_v - lo_v) + 1))
        else:
            pad = 0.05 * (hi_v - lo_v) + 1e-3
            ax.set_ylim(lo_v - pad, hi_v + pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(goal.label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)


def plot(results: dict, path: Path) -> None:
    """The goal (test accuracy, or the LM's held-out loss) against training
    time (``--clock``: wall-clock or process CPU time), and for the LM also
    against backward tokens: one point per evaluation (start, each epoch, a
    time stop), mean over seeds with the seeds' min-max band, the target
    line, each method's mean time-to-target (a star), the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    panels = []
    for name, ds in results["datasets"].items():
        unit, per = backward_unit(ds)
        panels.append((name, 0, 1.0, f"training {clock_name(cfg)} (s)"))
        if per > 1:  # the LM: also against backward tokens
            panels.append((name, 2, float(per), f"backward {unit}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.0), squeeze=False)
    for ax, (name, col, scale, xlabel) in zip(axes[0], panels):
        ds = results["datasets"][name]
        _panel(ax, ds, col, scale, xlabel, clock_name(cfg))
        if ds.get("metric") == M.LM_LOSS.key:
            title = f"{name} ({ds['n_train']} train / {ds['n_test']} held-out sequences)"
        else:
            title = f"{name} ({ds['n_train']} train, label noise {cfg['label_noise']:g})"
        ax.set_title(title + ("  SMOKE TEST" if results.get("smoke_test") else ""))
    m = results["machine"]
    cap = textwrap.fill(settings_caption(cfg), width=int(16 * fig.get_figwidth()))  # fits one data set's width
    cap += f"\n{m['platform']}, torch {m['torch']}, {m['cores']} cores, {m['date']}"
    if results.get("load_warning"):
        cap += "\nloaded machine (load average > threads): timings unreliable"
    if results.get("smoke_test"):
        cap += f"\nsmoke test (--quick): {cfg['epochs']} epochs are too few for ES's loss history; not results"
    if not results.get("complete", True):
        cap += "\npartial results (interrupted)"
    fig.text(0.01, 0.01, cap, fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.04 + 0.025 * cap.count("\n"), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(results: dict) -> str:
    cfg = results["config"]
    clock = clock_name(cfg)
    lines = [f"times: training {clock} (--clock {cfg.get('clock', 'wall')}), evaluation excluded"]
    if results.get("smoke_test"):
        lines.append(smoke_note(cfg["epochs"]))
    if results.get("load_warning"):
        lines.append(results["load_warning"])
    if not results.get("complete", True):
        lines.append("PARTIAL: interrupted; the tables hold the runs that finished.")
    for name, ds in results["datasets"].items():
        summ = ds["summary"]
        goal = goal_of(ds)
        unit, per = backward_unit(ds)
        seeds = max((len(rs) for rs in ds["runs"].values()), default=0)
        if goal.higher:
            what = f"{ds['n_train']} train / {ds['n_test']} test, label noise {cfg['label_noise']:g}"
        else:
            what = f"{ds['n_train']} train / {ds['n_test']} held-out sequences of {cfg['lm_seq_len']} bytes"
        lines.append(f"\n{name}: {what}, {seeds} seeds, {cfg['epochs']} epochs")
        lines.append(
            f"| method | epochs | {clock} s | vs full | backward {unit} | {goal.label} | vs full "
            "| scoring share | ideal saving |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        gf = goal.fmt
        for m, s in summ.items():
            saving = s.get("wall_saving_vs_full")
            vs_full = "—" if saving is None else f"{-100 * saving + 0.0:+.0f}%"
            share = s.get("scoring_share")
            share = "—" if share is None else f"{100 * share['mean']:.0f}%"
            ideal = "—" if s.get("ideal_saving") is None else f"{100 * s['ideal_saving']:.0f}%"
            lines.append(
                f"| {m} | {s['epochs']['mean']:.3g} | {_ms(s['wall_s'])} | {vs_full} "
                f"| {per * s['backward_samples']['mean']:.0f} | {_ms(s[goal.key], gf)} "
                f"| {s.get(f'{goal.short}_minus_full', math.nan):+.{goal.decimals}f} "
                f"| {share} | {ideal} |"
            )
        target, window = ds.get(f"target_{goal.short}"), ds.get("window_s")
        if target is None and window is None:
            continue
        lines.append("")
        if target is not None:
            lines.append(
                f"target: full's final {goal.label}, {gf(target)} (mean over seeds); "
                "time to target: mean over the seeds that reach it"
            )
        if window:
            lines.append(
                f"window: [0, {fmt_s(window)} s] (ES's mean {clock}): the {goal.short} held at that time, "
                f"and the mean {goal.short} over the window (area under the held curve / window)"
            )
        lines.append(
            f"| method | reached target | time to target s ({clock}) | backward {unit} to target "
            f"| {goal.short} at window end | mean {goal.short} over window |"
        )
        lines.append("|---|---|---|---|---|---|")
        for m, s in summ.items():
            tt = s.get("time_to_target")
            reached = "—" if tt is None else f"{tt['reached']}/{tt['of']}"
            lines.append(
                f"| {m} | {reached} | {_ms(tt and tt['wall_s'])} "
                f"| {_ms(tt and tt['backward_samples'], functools.partial(_scaled, per))} "
                f"| {_ms(s.get(f'{goal.short}_at_window'), gf)} | {_ms(s.get('auc'), gf)} |"
            )
    lines.append(
        "\nscoring share: the scoring passes' (no-grad forward over B + the fused step) share of the "
        "method's training time; ideal saving: 1 - (scoring time / full's time + backward samples / "
        "full's), what ES would save if training b samples cost exactly b/B of a full step."
    )
    verdicts = [ds["verdict"] for ds in results["datasets"].values() if ds.get("verdict")]
    if verdicts:
        lines.append(f"\nverdict ({clock}):")
        lines += [f"- {v}" for v in verdicts]
    return "\n".join(lines)


def format_ablation(res: dict) -> str:
    lines = ["# ES ablation", "", res["rule"], ""]
    cfg = res["config"]
    lines.append(
        f"{len(res['settings'])} settings x {len(res['tasks'])} tasks x {cfg['seeds']} seeds; "
        f"B={cfg['meta_batch']}, hidden {cfg['hidden']}, MNIST-1D {cfg['mnist1d_samples']} samples; "
        f"{cfg['threads']} threads; times: training {clock_name(cfg)} (--clock {cfg.get('clock', 'wall')}); "
        f"{res['machine']['date']}"
    )
    if res.get("load_warning"):
        lines.append(res["load_warning"])
    for m in res.get("merged_from", []):  # --merge: shards of one grid
        lines.append(
            f"merged from {m['path']}: {', '.join(m['tasks'])}"
            + ("" if m["complete"] else " (that run was stopped after them)")
        )
    if not res["complete"]:
        lines.append("PARTIAL: interrupted; ranked over the tasks every setting finished.")
    lines.append("")
    goals = {t: M.GOALS[k] for t, k in res.get("metrics", {}).items()}
    lines.append(
        "targets: "
        + "; ".join(
            f"{t}: {goals.get(t, M.ACCURACY).fmt(a)} ({goals.get(t, M.ACCURACY).label})"
            for t, a in res["targets"].items()
        )
    )
    lines.append("")
    tasks = res["tasks"]
    lines.append(
        "| rank | setting | mean rank | mean final acc % | " + " | ".join(f"{t}: s to target" for t in tasks) + " |"
    )
    lines.append("|---|---|---|---|" + "---|" * len(tasks))
    ranked = {r["setting"]: (i + 1, r) for i, r in enumerate(res["ranking"])}
    order = [r["setting"] for r in res["ranking"]] + [c for c in res["cells"] if c not in ranked]
    for c in order:
        cells = res["cells"][c]
        pos, r = ranked.get(c, ("—", None))
        per = []
        for t in tasks:
            cell = cells.get(t)
            if not cell:
                per.append("—")
                continue
            med = M.median_or_inf(cell["ttt"])
            hit = sum(x is not None for x in cell["ttt"])
            per.append(f"{'not reached' if med == math.inf else fmt_s(med)} ({hit}/{len(cell['ttt'])})")
        mr = "—" if r is None else f"{r['mean_rank']:.2f}"
        ma = "—" if r is None or r["mean_final_acc"] is None else f"{r['mean_final_acc']:.2f}"
        lines.append(f"| {pos} | {c} | {mr} | {ma} | " + " | ".join(per) + " |")
    lines.append("")
    if res.get("chosen"):
        s = res["chosen"]
        lines.append(
            f"chosen: beta1={s['beta1']:g} beta2={s['beta2']:g} lam={s['lam']:g} eps={s['eps']:g} b/B={s['ratio']}"
        )
    else:
        lines.append("chosen: none (the grid did not finish)")
    return "\n".join(lines)
