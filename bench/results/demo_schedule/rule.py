"""The schedule study's decision rule (RULE.md) applied to the finished tasks.

    PYTHONPATH=. python bench/results/demo_schedule/rule.py > bench/results/demo_schedule/RESULTS_TABLES.md

Reads bench/results/demo_schedule/<task>/demo.json, prints a table per task
and the rule's ranking, then the targets of RULE.md for the winner.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from es_kernels.demo import metrics as M

HERE = Path(__file__).parent
CANDIDATES = ("es", "es-epoch3", "es-frac", "es-stale3")
ESWP = ("eswp-epoch3", "eswp-frac", "eswp-stale3")
ORDER = ("full", "uniform", "uniform-time") + CANDIDATES + ESWP
TASKS = ("mnist1d", "digits", "mnist1d_noise40", "digits_noise40", "mnist1d_noise60", "digits_noise60", "lm")


def load(task: str):
    p = HERE / task / "demo.json"
    if not p.exists():
        return None
    res = json.loads(p.read_text())
    (ds,) = res["datasets"].values()
    return res, ds


def cell(ds: dict, m: str, goal: M.Goal) -> dict:
    runs = ds["runs"].get(m) or []
    target, window = ds[f"target_{goal.short}"], ds["window_s"]
    full_wall = statistics.fmean(r["wall_s"] for r in ds["runs"]["full"])
    hits = [M.time_to_target(r["curve"], target, goal.higher) for r in runs]
    med = M.median_or_inf([None if h is None else h[0] for h in hits])
    return {
        "n": len(runs),
        "reached": sum(h is not None for h in hits),
        "ttt_median": med,
        "ttt_pct": 100 * med / full_wall,
        "wall_pct": 100 * statistics.fmean(r["wall_s"] for r in runs) / full_wall,
        "at_window": statistics.fmean(M.acc_at(r["curve"], window) for r in runs),
        "auc": statistics.fmean(M.auc(r["curve"], window) for r in runs),
        "final": statistics.fmean(r[goal.key] for r in runs),
        "final_sd": statistics.stdev([r[goal.key] for r in runs]) if len(runs) > 1 else None,
    }


def pct(x: float) -> str:
    return "not reached" if math.isinf(x) else f"{x:.0f}%"


def main() -> int:
    out = []
    table = {}
    for task in TASKS:
        got = load(task)
        if got is None:
            continue
        res, ds = got
        goal = M.GOALS[ds.get("metric", M.ACCURACY.key)]
        methods = [m for m in ORDER if ds["runs"].get(m)]
        if not all(ds["runs"].get(m) for m in CANDIDATES + ("full", "uniform-time")):
            out.append(f"\n## {task}: incomplete (not in the rule)\n")
            continue
        cells = {m: cell(ds, m, goal) for m in methods}
        table[task] = (goal, cells)
        loads = res["machine"].get("loadavg_start")
        out.append(
            f"\n## {task} ({cells['full']['n']} seeds, label noise {res['config']['label_noise']:g}; target "
            f"{goal.fmt(ds[f'target_{goal.short}'])}; window {ds['window_s']:.1f} s = es's mean process CPU time; "
            f"load average at start {loads[0] if loads else '?'})\n"
        )
        out.append(
            f"| method | reached | median time to target, % of full's time | time, % of full's | "
            f"{goal.short} at window | mean {goal.short} over window | final {goal.short} |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for m, c in cells.items():
            sd = "" if c["final_sd"] is None else f" ± {goal.fmt(c['final_sd'])}"
            out.append(
                f"| {m} | {c['reached']}/{c['n']} | {pct(c['ttt_pct'])} | {c['wall_pct']:.0f}% | "
                f"{goal.fmt(c['at_window'])} | {goal.fmt(c['auc'])} | {goal.fmt(c['final'])}{sd} |"
            )
    if not table:
        print("no finished task")
        return 1
    # the rule
    rank = {c: [] for c in CANDIDATES}
    auc_rank = {c: [] for c in CANDIDATES}
    for _task, (goal, cells) in table.items():
        for c, r in zip(CANDIDATES, M.average_ranks([cells[c]["ttt_median"] for c in CANDIDATES])):
            rank[c].append(r)
        sign = -1 if goal.higher else 1
        for c, r in zip(CANDIDATES, M.average_ranks([sign * cells[c]["auc"] for c in CANDIDATES])):
            auc_rank[c].append(r)
    accs = {
        c: statistics.fmean([cells[c]["final"] for g, cells in table.values() if g.higher] or [0.0]) for c in CANDIDATES
    }
    order = sorted(CANDIDATES, key=lambda c: (statistics.fmean(rank[c]), statistics.fmean(auc_rank[c]), -accs[c]))
    out.append(f"\n## The rule over {len(table)} tasks: {', '.join(table)}\n")
    out.append("| candidate | mean rank (time to target) | ranks per task | mean rank (window mean) | mean final acc |")
    out.append("|---|---|---|---|---|")
    for c in order:
        out.append(
            f"| {c} | {statistics.fmean(rank[c]):.2f} | {', '.join(f'{r:g}' for r in rank[c])} | "
            f"{statistics.fmean(auc_rank[c]):.2f} | {accs[c]:.2f} |"
        )
    win = order[0]
    out.append(f"\n**Default by the rule: `{win}`.**\n")
    # targets
    lines = []
    before_ut = sum(table[t][1][win]["ttt_median"] < table[t][1]["uniform-time"]["ttt_median"] for t in table)
    before_full = [t for t in table if table[t][1][win]["ttt_median"] < table[t][1]["full"]["ttt_median"]]
    lines.append(f"1a. before uniform-time on {before_ut} of {len(table)} finished tasks (target: 5 of 7)")
    lines.append(f"1b. before full on {len(before_full)} of {len(table)} ({', '.join(before_full) or 'none'})")
    eswp = "eswp-" + win.partition("-")[2] if win != "es" else None
    for t, (_g, cells) in table.items():
        if "noise" not in t:
            got = pct(cells[eswp]["ttt_pct"]) if eswp in cells else "not measured"
            ok = eswp in cells and cells[eswp]["ttt_pct"] <= 45
            lines.append(f"2. {eswp or 'eswp'} on {t}: {got} of full's time (<= 45%): {'met' if ok else 'missed'}")
    for t, (goal, cells) in table.items():
        if "noise" in t:
            best = max(
                [m for m in (win, eswp) if m in cells],
                key=lambda m: cells[m]["final"] if goal.higher else -cells[m]["final"],
            )
            ok = cells[best]["final"] > cells["full"]["final"] and cells[best]["final"] > cells["uniform-time"]["final"]
            lines.append(
                f"3. {t}: {best} ends at {goal.fmt(cells[best]['final'])} against full "
                f"{goal.fmt(cells['full']['final'])}, uniform-time {goal.fmt(cells['uniform-time']['final'])}: "
                f"{'met' if ok else 'missed'}"
            )
    default = "step" if win == "es" or len(before_full) < len(table) else win
    lines.append(
        f"Package default by RULE.md: `{default}`"
        + ("" if default != "step" or win == "es" else f" ({win} is not before full on every task: 1b)")
    )
    out.append("Targets (RULE.md):\n")
    out += [f"- {x}" for x in lines]
    out.append("\n## Summary: the package default (`es`, every step) and the rule's winner against the baselines\n")
    out.append("Median time to target, % of full's time (reached/seeds); final accuracy (loss for the LM).\n")
    cols = ("full", "uniform-time", "es", win, eswp)
    cols = tuple(dict.fromkeys(c for c in cols if c))
    out.append("| task | target | " + " | ".join(cols) + " | es before uniform-time | es before full |")
    out.append("|---|---|" + "---|" * len(cols) + "---|---|")
    for t, (goal, cells) in table.items():
        row = [
            f"{pct(cells[c]['ttt_pct'])} ({cells[c]['reached']}/{cells[c]['n']}), {goal.fmt(cells[c]['final'])}"
            for c in cols
        ]
        es_ut = cells["es"]["ttt_median"] < cells["uniform-time"]["ttt_median"]
        es_full = cells["es"]["ttt_median"] < cells["full"]["ttt_median"]
        out.append(
            f"| {t} | {goal.fmt(cells['full']['final'])} | "
            + " | ".join(row)
            + f" | {'yes' if es_ut else 'no'} | {'yes' if es_full else 'no'} |"
        )
    print("\n".join(out).lstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
