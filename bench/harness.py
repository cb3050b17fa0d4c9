"""The benchmark harness shared by the CPU and GPU benchmarks: timing with
median and p20/p80 over repeats, machine information, the table and the JSON
data file (one row per measurement) that bench/plot.py and the README read."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def quantiles(times_ms: list[float]) -> dict:
    ts = sorted(times_ms)
    q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
    return {"median_ms": statistics.median(ts), "p20_ms": q[0], "p80_ms": q[3], "repeats": len(ts)}


def time_cpu(fn, repeats: int, warmup: int = 1, setup=None) -> dict:
    """Wall-clock of ``fn()`` on the CPU: median and p20/p80 of ``repeats`` runs
    after ``warmup`` runs; ``setup()`` (untimed) runs before each."""
    times = []
    for k in range(warmup + repeats):
        args = setup() if setup else ()
        t0 = time.perf_counter()
        fn(*args)
        dt = (time.perf_counter() - t0) * 1e3
        if k >= warmup:
            times.append(dt)
    return quantiles(times)


def repeats_for(seconds_per_call: float, budget_s: float = 3.0, lo: int = 3, hi: int = 50) -> int:
    return int(max(lo, min(hi, budget_s / max(seconds_per_call, 1e-6))))


def make_row(op: str, size: str, dtype: str, backend: str, mine: dict, ref: dict | None = None,
             baseline: str | None = None, base: dict | None = None) -> dict:
    """One result row: ``backend``'s median and p20/p80, and the ratios to the
    reference and to a baseline (their time over ours: higher is better)."""
    r = {"op": op, "size": size, "dtype": dtype, f"{backend}_ms": mine["median_ms"],
         f"{backend}_p20_ms": mine["p20_ms"], f"{backend}_p80_ms": mine["p80_ms"]}
    if ref is not None:
        r.update(ref_ms=ref["median_ms"], x_ref=ref["median_ms"] / mine["median_ms"])
    if base is not None:
        r.update(baseline=baseline, baseline_ms=base["median_ms"], x_baseline=base["median_ms"] / mine["median_ms"])
    return r


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], info: dict, extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"machine": info, "rows": rows, **(extra or {})}, indent=1) + "\n")
    return path
