"""The benchmark harness shared by the CPU and the GPU benchmark
(bench/bench_ops.py, bench/bench_gpu.py): timing with median and p20/p80
over repeats, peak memory of the measured call, the noise check, the
benchmark state, machine and version information, one row builder, the
table, and one writer (a dated JSON file plus a line per row appended to
bench/results/history.csv, which bench/plot.py reads).

Peak memory (the ``peak_mem_mb`` column; ``mem_method`` says which):

* ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated()`` after a
  ``reset_peak_memory_stats()``, minus the bytes allocated before the call:
  the most memory the call held at once through PyTorch's CUDA allocator
  (outputs and workspace; Triton and CUB workspaces allocated through torch
  count, memory a library allocates itself would not).
* ``vmhwm``: on Linux, the process's peak resident set (``VmHWM`` in
  /proc/self/status) is reset to its current resident set by writing ``5``
  to /proc/self/clear_refs, the C heap is trimmed (``malloc_trim``), the call
  runs once, and the row records ``VmHWM`` after the call minus ``VmRSS``
  before it: the most *physical* memory the call added, whoever allocated it
  (torch's allocator, std::vector in the C++ kernels, OpenMP stacks). It is a
  lower bound on what the call allocated: heap memory already resident and
  reused, and pages allocated but never touched, do not count.
* ``ru_maxrss``: where clear_refs cannot be written, the growth of
  ``getrusage().ru_maxrss`` over the call, which only shows memory beyond
  the process's earlier peak (often 0): read it as "at least".

Noise: on a loaded machine a CPU timing lands on multiples of the
scheduler's slice (4 ms), so medians read 8 or 16 ms whatever the op costs.
``noise_check`` flags a row ``noisy`` when the load average (at the start or
the end of the measurement) is above the number of cores, when at least
half of the samples between 3.5 and 64 ms lie within 2% of a multiple of
4 ms, or when the median is over 1 ms and over 4 times the fastest sample
(the other runs waited for a core); the reasons go in ``noise``.
"""

from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
HISTORY = RESULTS / "history.csv"

# The run's package, commit and machine columns of history.csv (from the run info).
RUN_INFO_COLUMNS = ["version", "commit", "dirty", "cpu", "cores", "torch_threads", "torch", "cuda_device"]
# history.csv's columns, in order. A row may lack some (a CPU row has no GB/s).
HISTORY_COLUMNS = [
    "run_id",
    "date",
    "bench",
    "quick",
    *RUN_INFO_COLUMNS,
    "op",
    "size",
    "n",
    "dtype",
    "backend",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "repeats",
    "ref_ms",
    "x_ref",
    "baseline",
    "baseline_ms",
    "x_baseline",
    "baseline2",
    "baseline2_ms",
    "x_baseline2",
    "GBps",
    "x_read_once",
    "peak_mem_mb",
    "mem_method",
    "noisy",
    "noise",
    "load_start",
    "load_end",
]

SLICE_MS = 4.0


# ---------------------------------------------------------------- timing ----
def quantiles(times_ms: list[float]) -> dict:
    """Median, p20, p80 and the count of ``times_ms``; the samples themselves
    ride along under ``samples`` for the noise check (not written out)."""
    ts = sorted(times_ms)
    q = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
    return {"median_ms": statistics.median(ts), "p20_ms": q[0], "p80_ms": q[3], "repeats": len(ts), "samples": ts}


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
    """How many repeats fit in ``budget_s`` (between ``lo`` and ``hi``)."""
    return int(max(lo, min(hi, budget_s / max(seconds_per_call, 1e-6))))


def bench_cpu(fn, setup=None, budget_s: float = 3.0) -> dict:
    """Time ``fn`` on the CPU within about ``budget_s`` seconds (one warm-up
    call sizes the repeats), with the load average before and after."""
    load0 = load_average()
    first = time_cpu(fn, repeats=1, warmup=1, setup=setup)
    r = time_cpu(fn, repeats=repeats_for(first["median_ms"] / 1e3, budget_s), warmup=0, setup=setup)
    r.update(load_start=load0, load_end=load_average())
    return r


def bench_cpu_interleaved(fns: dict, budget_s: float = 3.0) -> dict:
    """Time several functions in turn, one call of each per round (a change
    in the machine's load hits them all alike), within about ``budget_s``
    seconds in all: ``{name: bench_cpu's dict}``."""
    load0 = load_average()
    first = {k: time_cpu(fn, repeats=1, warmup=1)["median_ms"] for k, fn in fns.items()}
    rounds = repeats_for(sum(first.values()) / 1e3, budget_s)
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    load1 = load_average()
    return {k: dict(quantiles(ts), load_start=load0, load_end=load1) for k, ts in times.items()}


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def noise_check(t: dict, cores: int | None = None) -> list[str]:
    """Reasons to distrust the timing ``t`` (from ``time_cpu``/``bench_cpu``);
    empty when none. See the module docstring."""
    cores = cores or os.cpu_count() or 1
    reasons = []
    loads = [x for x in (t.get("load_start"), t.get("load_end")) if x is not None]
    if loads and max(loads) > cores:
        reasons.append(f"load {max(loads):.1f} > {cores} cores")
    samples = t.get("samples", ())
    window = [s for s in samples if 3.5 <= s <= 16 * SLICE_MS]
    if len(window) >= 3:
        on = sum(abs(s - SLICE_MS * round(s / SLICE_MS)) <= 0.02 * SLICE_MS * round(s / SLICE_MS) for s in window)
        if on >= 0.5 * len(window):
            reasons.append(f"{on}/{len(window)} samples on {SLICE_MS:g} ms slices")
    if len(samples) >= 3 and t.get("median_ms", 0) >= 1.0 and min(samples) * 4 < t["median_ms"]:
        reasons.append(f"median {t['median_ms']:.3g} ms > 4x the fastest run ({min(samples):.3g} ms)")
    return reasons


# ---------------------------------------------------------------- memory ----
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn, setup=None, device: str = "cpu") -> dict:
    """Run ``fn`` once (after ``setup()``, untimed) and return
    ``{"peak_mem_mb", "mem_method"}``: the most memory the call added (see
    the module docstring for what each method means)."""
    args = setup() if setup else ()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn(*args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return {"peak_mem_mb": peak / 2**20, "mem_method": "cuda_max_allocated"}
    _malloc_trim()
    if _reset_hwm() and _proc_status_kb("VmHWM") is not None:
        before = _proc_status_kb("VmRSS")
        out = fn(*args)
        peak = _proc_status_kb("VmHWM") - before
        del out
        return {"peak_mem_mb": max(peak, 0) / 1024, "mem_method": "vmhwm"}
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn(*args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    del out
    return {"peak_mem_mb": peak * scale / 2**20, "mem_method": "ru_maxrss"}


# ----------------------------------------------------------------- state ----
def state_for(n: int, device: str = "cpu"):
    """An ``ESState`` of ``n`` samples with every other one observed once (a
    loss uniform in [0, 3)), the rest unseen: the state every benchmark uses.
    No randperm, so it builds in O(n) memory even for n = 1e9 on a GPU."""
    import es_kernels as ek

    st = ek.ESState(n, device=device)
    ids = torch.arange(0, n, 2, device=device)
    ek.es_update(ids, torch.rand(ids.numel(), device=device) * 3, st)
    return st


# --------------------------------------------------------------- machine ----
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> tuple[str, bool | None]:
    """(short sha, dirty: tracked files outside bench/results changed) of the
    checkout. ``BENCH_COMMIT`` overrides it (a machine that got a copy of the
    tree without .git); a trailing ``+`` there means dirty."""
    env = os.environ.get("BENCH_COMMIT")
    if env:
        return env.rstrip("+"), env.endswith("+")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        # bench/results is left out: the benchmark itself appends to history.csv
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            != ""
        )
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def machine_info() -> dict:
    """The run's context: date, package version, commit, machine."""
    import es_kernels as ek

    sha, dirty = git_commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    info = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "version": ek.__version__,
        "commit": sha,
        "dirty": dirty,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
    }
    return info


# ------------------------------------------------------------------ rows ----
def make_row(
    op: str,
    size: str,
    n: int,
    dtype: str,
    backend: str,
    mine: dict,
    ref: dict | None = None,
    baselines: dict[str, dict] | None = None,
    mem: dict | None = None,
    bytes_read: int | None = None,
    copy_GBps: float | None = None,
) -> dict:
    """One result row: ``backend``'s median and p20/p80 (ms), the ratios to
    the reference and to up to two baselines (their time over ours: higher is
    better for es-kernels), the peak memory, the noise flag, and, given the
    bytes the op must read and the measured copy bandwidth, its GB/s and its
    time as a multiple of the time to read those bytes once."""
    r = {
        "op": op,
        "size": size,
        "n": int(n),
        "dtype": dtype,
        "backend": backend,
        "median_ms": mine["median_ms"],
        "p20_ms": mine["p20_ms"],
        "p80_ms": mine["p80_ms"],
        "repeats": mine.get("repeats"),
    }
    if ref is not None:
        r.update(ref_ms=ref["median_ms"], x_ref=ref["median_ms"] / mine["median_ms"])
    for k, (name, base) in enumerate((baselines or {}).items()):
        suffix = "" if k == 0 else str(k + 1)
        r.update(
            {
                f"baseline{suffix}": name,
                f"baseline{suffix}_ms": base["median_ms"],
                f"x_baseline{suffix}": base["median_ms"] / mine["median_ms"],
            }
        )
    if bytes_read is not None and copy_GBps:
        gbs = bytes_read / (mine["median_ms"] * 1e-3) / 1e9
        r.update(GBps=gbs, x_read_once=copy_GBps / gbs)
    if mem:
        r.update(mem)
    timings = {backend: mine, "reference": ref, **(baselines or {})}
    timings = {k: t for k, t in timings.items() if t is not None}
    loads = [t.get(k) for t in timings.values() for k in ("load_start", "load_end")]
    loads = [x for x in loads if x is not None]
    reasons = noise_check({"load_start": max(loads)} if loads else {})
    for name, t in timings.items():
        reasons += [f"{name}: {x}" for x in noise_check({k: v for k, v in t.items() if not k.startswith("load")})]
    r.update(
        noisy=bool(reasons), noise="; ".join(reasons), load_start=mine.get("load_start"), load_end=mine.get("load_end")
    )
    if reasons:
        print(f"warning: {op} {size} {dtype}: timing looks noisy ({r['noise']})", file=sys.stderr, flush=True)
    return r


# The header of each result key in the tables; a bench names its own time
# columns (their unit and backend) in table_columns.
HEADERS = {
    "op": "op",
    "size": "size",
    "dtype": "dtype",
    "x_ref": "x reference",
    "baseline": "baseline",
    "baseline_ms": "baseline ms",
    "x_baseline": "x baseline",
    "baseline2": "baseline 2",
    "x_baseline2": "x baseline 2",
    "GBps": "GB/s",
    "x_read_once": "x read-once time",
    "peak_mem_mb": "peak MB",
    "noisy": "noisy",
}


def table_columns(keys: str, **headers: str) -> list[tuple[str, str]]:
    """``[(key, header)]`` for :func:`format_table`: op, size and dtype, the
    space-separated ``keys`` (headers from :data:`HEADERS` or ``headers``),
    then the peak memory and the noisy flag."""
    return [(k, headers.get(k) or HEADERS[k]) for k in ["op", "size", "dtype", *keys.split(), "peak_mem_mb", "noisy"]]


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""

    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- writer ----
def _dated_path(out: Path, stem: str, date: str) -> Path:
    path = out / f"{stem}_{date}.json"
    k = 2
    while path.exists():
        path = out / f"{stem}_{date}_{k}.json"
        k += 1
    return path


def history_line(row: dict, info: dict, bench: str, quick: bool) -> dict:
    line = {k: info.get(k) for k in ("run_id", "date", *RUN_INFO_COLUMNS)}
    line.update(bench=bench, quick=int(quick))
    line.update({k: v for k, v in row.items() if k in HISTORY_COLUMNS})
    return line


def append_history(lines: list[dict], path: Path = HISTORY) -> Path:
    """Append ``lines`` to the CSV at ``path`` (created with a header when
    missing). A file with other columns (an older header) is rewritten once
    with the union of the columns, keeping every line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(HISTORY_COLUMNS)
    old = None
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if header != columns:
                old = list(reader)
                columns += [c for c in header if c not in columns]
    if old is not None:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        if new_file:
            w.writeheader()
        for line in lines:
            w.writerow({k: _csv_value(v) for k, v in line.items()})
    return path


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    if v is None:
        return ""
    return v


def read_history(path: Path = HISTORY) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def write_results(
    bench: str,
    rows: list[dict],
    info: dict,
    out: Path | str = RESULTS,
    history: Path | str | None = None,
    quick: bool = False,
    extra: dict | None = None,
) -> dict:
    """The one writer: ``<out>/<bench>_<YYYY-MM-DD>.json`` (``_2``, ``_3``...
    when that day's file exists; ``<bench>_quick_...`` for a quick run) with
    the machine and the rows, and one line per row appended to ``history``
    (default ``<out>/history.csv``). Returns {"json": path, "history": path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    date = info["run_id"][:8]
    date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    path = _dated_path(out, f"{bench}_quick" if quick else bench, date)
    clean = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    path.write_text(
        json.dumps({"machine": info, "bench": bench, "quick": quick, "rows": clean, **(extra or {})}, indent=1) + "\n"
    )
    hist = Path(history) if history else out / "history.csv"
    append_history([history_line(r, info, bench, quick) for r in clean], hist)
    return {"json": path, "history": hist}


def header_line(info: dict) -> str:
    dirty = "+dirty" if info.get("dirty") else ""
    dev = f", {info['cuda_device']}" if info.get("cuda_device") else ""
    return (
        f"es-kernels {info['version']} ({info['commit']}{dirty}), {info['cpu']}, {info['cores']} cores{dev}, "
        f"torch {info['torch']}, {info['date']}"
    )


def main(argv=None):
    """``python bench/harness.py merge FILE.csv [--into bench/results/history.csv]``:
    append a history file written elsewhere (e.g. the GPU check's $OUT) to
    the committed one, skipping lines already there."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("src")
    m.add_argument("--into", default=str(HISTORY))
    args = ap.parse_args(argv)
    into = Path(args.into)
    have = set()
    if into.exists():
        have = {
            (r.get("run_id"), r.get("bench"), r.get("op"), r.get("size"), r.get("dtype"), r.get("backend"))
            for r in read_history(into)
        }
    new = [
        r
        for r in read_history(Path(args.src))
        if (r.get("run_id"), r.get("bench"), r.get("op"), r.get("size"), r.get("dtype"), r.get("backend")) not in have
    ]
    append_history(new, into)
    print(f"appended {len(new)} lines to {into}")


if __name__ == "__main__":
    main()
