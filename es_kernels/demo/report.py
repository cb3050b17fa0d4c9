"""The demo's output: machine description, plot, markdown tables."""

from __future__ import annotations

import math
import os
import platform
import statistics
import textwrap
import time
from pathlib import Path

import torch

from . import metrics as M

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


def _ms(d: dict, f=fmt_s) -> str:
    if not d or d.get("mean") is None:
        return "—"
    return f(d["mean"]) if d.get("sd") is None else f"{f(d['mean'])} ± {f(d['sd'])}"


def settings_caption(cfg: dict) -> str:
    return (
        f"{cfg['epochs']} epochs, B={cfg['meta_batch']}, b={cfg['mini_batch']} "
        f"(b/B={cfg['mini_batch'] / cfg['meta_batch']:.3g}), "
        f"MLP hidden {cfg['hidden']}, Adam lr {cfg['lr']:g}, {cfg['seeds']} seeds, label noise {cfg['label_noise']:g}; "
        f"ES beta1={cfg['beta1']:g} beta2={cfg['beta2']:g} lam={cfg.get('lam', 1):g} eps={cfg.get('eps', 0):g}; "
        f"ESWP/InfoBatch prune {cfg['prune_ratio']:g}, anneal {cfg['anneal_frac']:g}; "
        f"{cfg['threads']} threads, {cfg.get('device', 'cpu')}; times: training {clock_name(cfg)}"
    )


def plot(results: dict, path: Path) -> None:
    """Accuracy against training time (``--clock``): one point per evaluation (start,
    each epoch, a time stop), mean over seeds with the seeds' min-max band,
    the target line, each method's mean time-to-target, the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 5.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        ds = results["datasets"][name]
        target, window = ds.get("target_acc"), ds.get("window_s")
        for i, (method, rs) in enumerate(ds["runs"].items()):
            if not rs:
                continue
            color = f"C{i}"
            n = min(len(r["curve"]) for r in rs)  # time stops may give unequal lengths
            t = [statistics.fmean(r["curve"][e][0] for r in rs) for e in range(n)]
            a = [statistics.fmean(r["curve"][e][1] for r in rs) for e in range(n)]
            lo = [min(r["curve"][e][1] for r in rs) for e in range(n)]
            hi = [max(r["curve"][e][1] for r in rs) for e in range(n)]
            label = method
            tt = ds["summary"].get(method, {}).get("time_to_target")
            if tt is not None:
                if tt["reached"]:
                    label += f" (target at {fmt_s(tt['wall_s']['mean'])} s, {tt['reached']}/{tt['of']} seeds)"
                    ax.plot(
                        [tt["wall_s"]["mean"]],
                        [target],
                        marker="*",
                        markersize=13,
                        color=color,
                        markeredgecolor="black",
                        zorder=5,
                    )
                else:
                    label += " (target not reached)"
            ax.plot(t, a, marker=".", color=color, label=label, drawstyle="steps-post")  # held between evaluations
            if len(rs) > 1:
                ax.fill_between(t, lo, hi, color=color, alpha=0.15, linewidth=0, step="post")
            if any(len(r["curve"]) > n for r in rs):  # the seeds' own last points
                ax.plot([r["curve"][-1][0] for r in rs], [r["curve"][-1][1] for r in rs], "x", color=color)
        if target is not None:
            ax.axhline(
                target, color="black", linestyle="--", linewidth=1, label=f"target: full's final accuracy {target:.2f}%"
            )
        if window:
            ax.axvline(
                window, color="gray", linestyle=":", linewidth=1, label=f"ES's {clock_name(cfg)} {fmt_s(window)} s"
            )
        accs = [p[1] for rs in ds["runs"].values() for r in rs for p in r["curve"][1:]]
        if accs:  # the start (chance level) would squash the interesting part
            top = max(accs)
            ax.set_ylim(max(0.0, min(accs) - 2), min(100.0, top + 0.2 * (top - min(accs)) + 1))
        ax.set_title(
            f"{name} ({ds['n_train']} train, label noise {cfg['label_noise']:g})"
            + ("  SMOKE TEST" if results.get("smoke_test") else "")
        )
        ax.set_xlabel(f"training {clock_name(cfg)} (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
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
        from .run import smoke_note

        lines.append(smoke_note(cfg["epochs"]))
    if results.get("load_warning"):
        lines.append(results["load_warning"])
    if not results.get("complete", True):
        lines.append("PARTIAL: interrupted; the tables hold the runs that finished.")
    for name, ds in results["datasets"].items():
        summ = ds["summary"]
        seeds = max((len(rs) for rs in ds["runs"].values()), default=0)
        lines.append(
            f"\n{name}: {ds['n_train']} train / {ds['n_test']} test, "
            f"label noise {cfg['label_noise']:g}, {seeds} seeds, {cfg['epochs']} epochs"
        )
        lines.append(
            f"| method | epochs | {clock} s | vs full | backward samples | test acc % | vs full (points) "
            "| scoring share | ideal saving |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for m, s in summ.items():
            saving = s.get("wall_saving_vs_full")
            vs_full = "—" if saving is None else f"{-100 * saving + 0.0:+.0f}%"
            share = s.get("scoring_share")
            share = "—" if share is None else f"{100 * share['mean']:.0f}%"
            ideal = "—" if s.get("ideal_saving") is None else f"{100 * s['ideal_saving']:.0f}%"
            lines.append(
                f"| {m} | {s['epochs']['mean']:.3g} | {_ms(s['wall_s'])} | {vs_full} "
                f"| {s['backward_samples']['mean']:.0f} | {_ms(s['test_acc'], lambda x: f'{x:.2f}')} "
                f"| {s.get('acc_minus_full', math.nan):+.2f} "
                f"| {share} | {ideal} |"
            )
        target, window = ds.get("target_acc"), ds.get("window_s")
        if target is None and window is None:
            continue
        lines.append("")
        if target is not None:
            lines.append(
                f"target: full's final test accuracy, {target:.2f}% (mean over seeds); "
                "time to target: mean over the seeds that reach it"
            )
        if window:
            lines.append(
                f"window: [0, {fmt_s(window)} s] (ES's mean {clock}): accuracy held at that time, "
                "and the mean accuracy over the window (area under the held curve / window)"
            )
        lines.append(
            f"| method | reached target | time to target s ({clock}) | backward samples to target "
            "| acc at window end % | mean acc over window % |"
        )
        lines.append("|---|---|---|---|---|---|")
        for m, s in summ.items():
            tt = s.get("time_to_target")
            reached = "—" if tt is None else f"{tt['reached']}/{tt['of']}"
            lines.append(
                f"| {m} | {reached} | {_ms(tt and tt['wall_s'])} "
                f"| {_ms(tt and tt['backward_samples'], lambda x: f'{x:.0f}')} "
                f"| {_ms(s.get('acc_at_window'), lambda x: f'{x:.2f}')} | {_ms(s.get('auc'), lambda x: f'{x:.2f}')} |"
            )
    lines.append(
        "\nscoring share: the scoring passes' (no-grad forward over B + the fused step) share of the "
        "method's training time; ideal saving: 1 - (scoring time / full's time + backward samples / "
        "full's), what ES would save if training b samples cost exactly b/B of a full step."
    )
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
    lines.append("targets: " + "; ".join(f"{t}: {a:.2f}%" for t, a in res["targets"].items()))
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
        ma = "—" if r is None else f"{r['mean_final_acc']:.2f}"
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
