"""The demo's output: machine description, plot, markdown tables."""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, rs in results["datasets"][name]["runs"].items():
            epochs = len(rs[0]["curve"])
            t = [statistics.fmean(r["curve"][e][0] for r in rs) for e in range(epochs)]
            a = [statistics.fmean(r["curve"][e][1] for r in rs) for e in range(epochs)]
            ax.plot(t, a, marker=".", label=method)
        ax.set_title(f"{name} (label noise {results['config']['label_noise']:g})")
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(results: dict) -> str:
    lines = []
    for name, ds in results["datasets"].items():
        lines.append(f"\n{name}: {ds['n_train']} train / {ds['n_test']} test, "
                     f"label noise {results['config']['label_noise']:g}, {results['config']['seeds']} seeds")
        lines.append("| method | wall-clock s | vs full | backward samples | test acc % | vs full (points) |")
        lines.append("|---|---|---|---|---|---|")
        for m, s in ds["summary"].items():
            lines.append(
                f"| {m} | {s['wall_s']['mean']:.1f} ± {s['wall_s']['sd']:.1f} | "
                f"{-100 * s.get('wall_saving_vs_full', math.nan):+.0f}% | {s['backward_samples']['mean']:.0f} | "
                f"{s['test_acc']['mean']:.2f} ± {s['test_acc']['sd']:.2f} | {s.get('acc_minus_full', math.nan):+.2f} |")
    return "\n".join(lines)


