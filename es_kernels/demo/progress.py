"""The runs' orchestration: the ETA, the load warning, the progress log,
atomic JSON writes and the interrupt (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
from pathlib import Path

from .config import sampler_kind
from .report import fmt_s

_COST = {
    "full": lambda r: 1.0,
    "infobatch": lambda r: 0.75,
    "uniform": lambda r: r,
    "es": lambda r: 1 / 3 + r,
    "eswp": lambda r: 0.75 * (1 / 3 + r),
}


class Eta:
    """Remaining time from measured epoch times (real time, evaluation
    included), keyed by (dataset, method, b); a key not measured yet is
    estimated from full's epoch on that data set and a cost model."""

    def __init__(self, meta_batch: int):
        self.B = meta_batch
        self.per_epoch: dict = {}

    def record(self, key, epochs: float, seconds: float) -> None:
        if epochs > 0:
            self.per_epoch.setdefault(key, []).append(seconds / epochs)

    def estimate(self, key, epochs: float):
        """Seconds for ``epochs`` of ``key``, or None when nothing on its data set was measured."""
        if key in self.per_epoch:
            return statistics.fmean(self.per_epoch[key]) * epochs
        ds, method, b = key
        cost = _COST.get(method) or _COST[sampler_kind(method)]  # a schedule: at most ES's cost
        # the data set's meta-batch: its full run's b (the LM's differs from the demo's)
        B = next((b2 for d2, m2, b2 in self.per_epoch if d2 == ds and m2 == "full"), self.B)
        for (d2, m2, b2), v in self.per_epoch.items():  # the same method at another b
            if d2 == ds and m2 == method:
                return statistics.fmean(v) * cost(b / B) / cost(b2 / B) * epochs
        full = self.per_epoch.get((ds, "full", B))
        if full is None:
            return None
        return statistics.fmean(full) * cost(b / B) * epochs

    def remaining(self, jobs) -> float | None:
        """``jobs``: [(key, epochs)]; None while some key cannot be estimated."""
        total = 0.0
        for key, epochs in jobs:
            e = self.estimate(key, epochs)
            if e is None:
                return None
            total += e
        return total

    def remaining_partial(self, jobs) -> tuple:
        """``(seconds of the estimable jobs, sorted data sets not measured yet)``."""
        total, unknown = 0.0, set()
        for key, epochs in jobs:
            e = self.estimate(key, epochs)
            if e is None:
                unknown.add(key[0])
            else:
                total += e
        return total, sorted(unknown)


def fmt_eta(seconds, unmeasured=()) -> str:
    """``seconds`` (None: unknown), plus the data sets not measured yet."""
    if seconds is None or (unmeasured and not seconds):
        return "ETA unknown until full has run once per data set"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = "ETA " + (f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s")
    return out + (f" + the runs on {', '.join(unmeasured)} (not measured yet)" if unmeasured else "")


def load_warning(threads: int, clock: str = "wall") -> str | None:
    """A warning when the 1-minute load average exceeds the thread count."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    if load > threads:
        return (
            f"WARNING: load average {load:.1f} > {threads} threads: other work competes for the cores, "
            f"so wall-clock numbers (and everything measured in time) are unreliable on this run."
            + (
                " The times here are this process's CPU time (--clock process): less affected by the load, "
                "not immune to it (shared caches and memory bandwidth)."
                if clock == "process"
                else ""
            )
        )
    return None


def write_json(path: Path, obj) -> None:
    """Atomic write (a partial file never replaces a complete one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside: SIGTERM raises KeyboardInterrupt in the main thread, as
    Ctrl-C does (elsewhere than the main thread, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Log:
    """A tqdm bar (or nothing) plus one printed line per finished run."""

    def __init__(self, total: int, desc: str, show: bool, quiet: bool = False):
        self.bar = None
        self.desc = desc
        self.total = total
        self.quiet = quiet  # a rank > 0 of a distributed run
        if show and not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, bar_format="{l_bar}{bar} {n_fmt}/{total_fmt} [{elapsed}]{postfix}")

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def update(self, eta: str = "", step: int = 1) -> None:
        if self.bar is not None:
            if eta:
                self.bar.set_description(f"{self.desc} ({eta})", refresh=False)
            self.bar.update(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finished(self, i: int, what: str, r: dict, goal, remaining: tuple) -> None:
        """The line of finished run ``i`` (``what``, its result ``r``, scored
        by ``goal``) with the ETA of the ``remaining`` runs (``Eta.remaining_partial``)."""
        rest = fmt_eta(*remaining)
        self.line(
            f"[{i + 1}/{self.total}] {what}: {fmt_s(r['wall_s'])} s, "
            f"{r['epochs']:.3g} epochs, {goal.short} {goal.fmt(r[goal.key])}; {rest}"
        )
        self.update(rest.split(" + ")[0])

    @contextlib.contextmanager
    def running(self, results: dict, path: Path):
        """Around the loop of runs: Ctrl-C stops it with ``results`` marked
        interrupted (the finished runs are in ``path``); the bar is closed;
        ``results["complete"]`` says whether every run finished. SIGTERM
        (``kill``, a job scheduler's stop) stops it as Ctrl-C does."""
        try:
            with sigterm_as_interrupt():
                yield
        except KeyboardInterrupt:
            results["interrupted"] = True
            self.line(f"interrupted: the finished runs are in {path}")
        finally:
            self.close()
        results["complete"] = not results["interrupted"]
