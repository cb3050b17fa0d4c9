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


# one color per method, the same in every panel (the scoring-schedule study's methods take the rest)
COLORS = {
    "full": "#222222",
    "full-time": "#999999",
    "uniform": "#1f77b4",
    "uniform-time": "#6baed6",
    "es": "#d62728",
    "eswp": "#ff7f0e",
    "infobatch": "#2ca02c",
}
BANDS = ("full", "es")  # the seeds' spread is drawn for these (more bands hide the curves)
_SPARE = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")


def method_color(method: str, i: int) -> str:
    return COLORS.get(method, _SPARE[i % len(_SPARE)])


def _mean_curve(rs: list, col: int, scale: float) -> tuple:
    """(x, mean value, min, max) over the seeds' curves, to the shortest one."""
    n = min(len(r["curve"]) for r in rs)  # time stops may give unequal lengths
    x = [scale * statistics.fmean(r["curve"][e][col] for r in rs) for e in range(n)]
    a = [statistics.fmean(r["curve"][e][1] for r in rs) for e in range(n)]
    lo = [min(r["curve"][e][1] for r in rs) for e in range(n)]
    hi = [max(r["curve"][e][1] for r in rs) for e in range(n)]
    return x, a, lo, hi


def y_band(curves: list, higher: bool) -> tuple | None:
    """The y-range that matters: from the worst method's value at 20% of the
    longest run to the best value reached (curves: [(x, value)] held between
    points), padded by 5%."""
    curves = [(x, v) for x, v in curves if len(x) > 1]
    if not curves:
        return None
    at = 0.2 * max(x[-1] for x, _ in curves)
    held = [M.acc_at([[xi, vi] for xi, vi in zip(x, v)], at) for x, v in curves]
    every = [vi for _, v in curves for vi in v[1:]]
    lo, hi = (min(held), max(every)) if higher else (min(every), max(held))
    if not hi > lo:
        lo, hi = min(every), max(every)
    pad = 0.05 * (hi - lo) + 1e-6
    return lo - pad, hi + pad


def _curves(ax, ds: dict, col: int, scale: float, xlabel: str, clock: str) -> None:
    """The goal against curve column ``col`` (0: training time, 2: backward
    samples) times ``scale``: each method's mean over seeds (held between
    evaluations) with the seeds' min-max band, the target, ES's time."""
    goal = goal_of(ds)
    target, window = ds.get(f"target_{goal.short}"), ds.get("window_s")
    drawn, banded = [], []
    for i, (method, rs) in enumerate(ds["runs"].items()):
        if not rs:
            continue
        x, a, lo, hi = _mean_curve(rs, col, scale)
        color = method_color(method, i)
        width = 2.2 if method == "es" else 1.4
        style = "--" if method.endswith("-time") else "-"
        ax.plot(x, a, color=color, linewidth=width, linestyle=style, label=method, drawstyle="steps-post")
        if len(rs) > 1 and method in BANDS:
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0, step="post")
            banded.append(method)
        drawn.append((x, a))
    if target is not None:
        what = "accuracy" if goal.higher else "held-out loss"
        ax.axhline(target, color="black", linestyle=":", linewidth=1.2, label=f"target: full's final {what}")
    if window and col == 0:
        ax.axvline(window, color="#d62728", linestyle=":", linewidth=1, alpha=0.7, label="ES's training time")
    if banded:
        ax.fill_between([], [], color="gray", alpha=0.3, label=f"seeds' min-max ({', '.join(banded)})")
    band = y_band(drawn, goal.higher)
    if band:
        ax.set_ylim(*band)
    ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(goal.label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if goal.higher else "upper right", framealpha=0.9)


def _bars(ax, ds: dict, clock: str) -> None:
    """Each method's mean time to the target as a horizontal bar (labelled
    with its share of full's training time), or "not reached"."""
    goal = goal_of(ds)
    summ = ds.get("summary", {})
    full_s = summ.get("full", {}).get("wall_s", {}).get("mean")
    names, vals, colors, labels, partial = [], [], [], [], []
    for i, (method, rs) in enumerate(ds["runs"].items()):
        tt = summ.get(method, {}).get("time_to_target")
        if not rs or tt is None:
            continue
        names.append(method)
        colors.append(method_color(method, i))
        if tt["reached"]:
            v = tt["wall_s"]["mean"]
            share = f" ({100 * v / full_s:.0f}%)" if full_s else ""
            seeds = "" if tt["reached"] == tt["of"] else f"; {tt['reached']} of {tt['of']} seeds"
            vals.append(v)
            labels.append(f"{fmt_s(v)} s{share}{seeds}")
        else:
            vals.append(0.0)
            labels.append(f"not reached (0 of {tt['of']} seeds)")
        partial.append(tt["reached"] < tt["of"])
    if not names:
        ax.set_axis_off()
        return
    y = list(range(len(names)))
    for yi, v, c, part in zip(y, vals, colors, partial):  # faded: some seeds did not reach the target
        ax.barh(yi, v, color=c, height=0.6, alpha=0.35 if part else 1.0)
    if any(partial):
        ax.text(
            0.99,
            0.01,
            "faded: mean over the seeds that reached it",
            transform=ax.transAxes,
            fontsize=7,
            ha="right",
            va="bottom",
            color="#555555",
        )
    top = max(vals + [full_s or 0.0]) or 1.0
    for yi, v, text in zip(y, vals, labels):
        ax.text(v + 0.02 * top, yi, text, va="center", fontsize=8, color="#555555" if v == 0 else "black")
    if full_s:
        ax.axvline(full_s, color="#222222", linestyle=":", linewidth=1)
        ax.text(full_s, -0.65, "full's training time", fontsize=7, va="bottom", ha="center", clip_on=False)
    ax.set_yticks(y, names)
    ax.set_ylim(len(names) - 0.4, -0.6)
    ax.set_xlim(0, 1.7 * top)
    ax.set_xlabel(f"time to target (s, training {clock})")
    what = "accuracy" if goal.higher else "held-out loss"
    ax.set_title(f"time to reach full's final {what}", fontsize=10, pad=14)
    ax.grid(axis="x", alpha=0.3)


def plot(results: dict, path: Path) -> None:
    """One row per data set: the goal (test accuracy, or the LM's held-out
    loss) against training time (``--clock``), for the LM also against
    backward tokens, and each method's time to full's final value as bars;
    the verdict above the row, the settings below the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    clock = clock_name(cfg)
    rows = [(name, ds) for name, ds in results["datasets"].items() if any(ds["runs"].values())]
    if not rows:
        return
    ncols = max(3 if backward_unit(ds)[1] > 1 else 2 for _, ds in rows)
    fig = plt.figure(figsize=(5.2 * ncols + 1.5, 4.9 * len(rows) + 0.8))
    subs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for sub, (name, ds) in zip(subs, rows):
        unit, per = backward_unit(ds)
        panels = [(0, 1.0, f"training {clock} (s)")]
        if per > 1:  # the LM: also against backward tokens
            panels.append((2, float(per), f"backward {unit}"))
        ratios = [2.0] * len(panels) + [1.3] + [0.0001] * (ncols - len(panels) - 1)
        axes = sub.subplots(1, ncols, gridspec_kw={"width_ratios": ratios})
        for ax, (col, scale, xlabel) in zip(axes, panels):
            _curves(ax, ds, col, scale, xlabel, clock)
        _bars(axes[len(panels)], ds, clock)
        for ax in axes[len(panels) + 1 :]:
            ax.set_axis_off()
        if ds.get("metric") == M.LM_LOSS.key:
            what = f"{ds['n_train']} train / {ds['n_test']} held-out sequences"
        else:
            what = f"{ds['n_train']} train / {ds['n_test']} test, label noise {cfg['label_noise']:g}"
        seeds = max((len(rs) for rs in ds["runs"].values()), default=0)
        head = f"{name} ({what}; {seeds} seed{'s' if seeds != 1 else ''})"
        if results.get("smoke_test"):
            head += "  SMOKE TEST: not results"
        verdict = ds.get("verdict") or "no verdict (full or ES missing)"
        verdict = verdict.removeprefix(f"{name}: ")
        verdict = verdict[:1].upper() + verdict[1:]
        sub.suptitle(head + "\n" + textwrap.fill(verdict, width=int(12 * fig.get_figwidth())), fontsize=10.5)
    m = results["machine"]
    cap = textwrap.fill(settings_caption(cfg), width=int(15 * fig.get_figwidth()))
    cap += f"\n{m['platform']}, torch {m['torch']}, {m['cores']} cores, {m['date']}"
    if results.get("load_warning"):
        cap += "; loaded machine (load average > threads): real-time numbers unreliable"
    if not results.get("complete", True):
        cap += "\npartial results (interrupted)"
    fig.text(0.01, 0.002, cap, fontsize=7, va="bottom", ha="left", color="#444444")
    fig.subplots_adjust(bottom=0.0)
    for sub in subs:
        sub.subplots_adjust(left=0.07, right=0.98, top=0.80, bottom=0.17, wspace=0.35)
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
        if not any(ds["runs"].values()):  # interrupted before its first run
            continue
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
