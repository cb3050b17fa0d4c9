"""Speed against size, per op and backend, from bench/results/history.csv.

    python bench/plot.py                          # latest commit's latest run, each bench
    python bench/plot.py --commit 0f14b13         # that commit's latest run
    python bench/plot.py --commit a1b2c3d --commit 0f14b13   # overlay two commits
    python bench/plot.py --bench cpu_ops --metric throughput --out bench/results/cpu_ops.png

For each bench in the history (cpu_ops, gpu_ops) it draws one figure,
bench/results/<bench>.png (or --out for one bench): a panel per op and
dtype, the x axis the op's size in elements (B*C logits, B weights, N
samples, B*T*V tokens' logits), the y axis the median time (ms; es-kernels'
error bar is p20-p80) or the throughput (elements per microsecond), one
line per backend: es-kernels (cpp or triton), the plain-PyTorch reference
and the baselines.
For a commit it uses that commit's latest run (the last run_id); rows
flagged noisy are drawn with hollow markers.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def select_runs(lines: list[dict], bench: str, commits: list[str] | None) -> dict[str, list[dict]]:
    """{commit: lines of its latest run} for ``bench``; without ``commits``,
    the commit of the bench's latest run."""
    lines = [r for r in lines if r.get("bench") == bench]
    if not lines:
        return {}
    if not commits:
        commits = [max(lines, key=lambda r: r["run_id"])["commit"]]
    out = {}
    for c in commits:
        mine = [r for r in lines if r["commit"].startswith(c)]
        if not mine:
            print(f"no {bench} run for commit {c}", file=sys.stderr)
            continue
        last = max(r["run_id"] for r in mine)
        out[mine[0]["commit"]] = [r for r in mine if r["run_id"] == last]
    return out


def series(run: list[dict], metric: str) -> dict[tuple[str, str], dict[str, list]]:
    """{(op, dtype): {label: [(n, y, lo, hi, noisy), ...]}} for one run."""
    out: dict = defaultdict(lambda: defaultdict(list))

    def y(ms, n):
        return ms if metric == "ms" else n / (ms * 1e3)

    for r in run:
        n, noisy = _f(r["n"]), r.get("noisy") in ("True", "true", "1")
        if not n:
            continue
        key = (r["op"], r["dtype"])
        med, lo, hi = _f(r["median_ms"]), _f(r["p20_ms"]), _f(r["p80_ms"])
        if med:
            out[key][f"es-kernels ({r['backend']})"].append((n, y(med, n), y(lo, n), y(hi, n), noisy))
        if _f(r.get("ref_ms")):
            out[key]["reference"].append((n, y(_f(r["ref_ms"]), n), None, None, noisy))
        for s in ("", "2"):
            if r.get(f"baseline{s}") and _f(r.get(f"baseline{s}_ms")):
                out[key][r[f"baseline{s}"]].append((n, y(_f(r[f"baseline{s}_ms"]), n), None, None, noisy))
    return out


def _role(label: str) -> tuple[int, str]:
    """Colour index and sort key: es-kernels, the reference, then baselines."""
    if label.startswith("es-kernels"):
        return 0, label
    if label == "reference":
        return 1, label
    return 2 + sum(map(ord, label)) % 6, label


def plot_bench(runs: dict[str, list[dict]], bench: str, metric: str, out: Path) -> Path:
    per_commit = {c: series(run, metric) for c, run in runs.items()}
    keys = sorted({k for s in per_commit.values() for k in s})
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, key in zip(axes.flat, keys):
        for ci, (commit, s) in enumerate(per_commit.items()):
            labels = sorted(s.get(key, {}), key=_role)
            for label in labels:
                pts = sorted(s[key][label])
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                color = f"C{_role(label)[0]}"
                name = label if len(per_commit) == 1 else f"{label} @{commit}"
                ax.plot(xs, ys, styles[ci % len(styles)], color=color, label=name)
                for p in pts:
                    err = None
                    if p[2] is not None:  # the p20-p80 band as an error bar
                        lo, hi = sorted((p[2], p[3]))
                        err = [[max(p[1] - lo, 0)], [max(hi - p[1], 0)]]
                    ax.errorbar(
                        [p[0]], [p[1]], yerr=err, fmt="o", color=color, mfc="none" if p[4] else color, ms=4, capsize=2
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{key[0]} [{key[1]}]", fontsize=9)
        ax.set_xlabel("size (elements)")
        ax.set_ylabel("median ms (lower is faster)" if metric == "ms" else "elements / µs (higher is faster)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    first = next(iter(runs.values()))[0]
    dirty = "+dirty" if first.get("dirty") in ("True", "true", "1") else ""
    dev = first.get("cuda_device") or f"{first['cpu']}, {first['cores']} cores"
    quick = ", quick run" if first.get("quick") == "1" else ""
    fig.suptitle(
        f"{bench}: es-kernels {first['version']} ({', '.join(runs)}{dirty}), {dev}, "
        f"torch {first['torch']}, {first['date']}{quick}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", default=str(harness.HISTORY))
    ap.add_argument("--commit", action="append", help="commit (prefix) to draw; repeat to overlay")
    ap.add_argument("--bench", action="append", help="cpu_ops or gpu_ops (default: each in the history)")
    ap.add_argument("--metric", choices=["ms", "throughput"], default="ms")
    ap.add_argument("--out", default=None, help="PNG path (one bench) or folder (default bench/results)")
    args = ap.parse_args(argv)
    lines = harness.read_history(Path(args.history))
    benches = args.bench or sorted({r["bench"] for r in lines})
    written = []
    for bench in benches:
        runs = select_runs(lines, bench, args.commit)
        if not runs:
            continue
        if args.out and args.out.endswith(".png"):
            out = Path(args.out)
        else:
            out = Path(args.out or harness.RESULTS) / f"{bench}.png"
        written.append(plot_bench(runs, bench, args.metric, out))
        print(f"wrote {written[-1]}")
    return written


if __name__ == "__main__":
    main()
