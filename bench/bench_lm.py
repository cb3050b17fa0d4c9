"""Language-model scoring: memory and time of per-sample losses from hidden
states (es_kernels.per_sample_losses_from_hidden, vocabulary chunks) against
materialised logits.

    python bench/bench_lm.py                 # B=8 T=512 H=256 V=32000 float32, writes bench/results/lm_hidden.json
    python bench/bench_lm.py --quick         # a small size (smoke test), writes nothing

Each variant runs in a fresh subprocess (so the peak is its own): inputs are
made, then the variant runs 1 + repeats times under ``torch.inference_mode``.
Before each run the process's peak-RSS mark is reset to its current RSS
(Linux: ``/proc/self/clear_refs`` = 5; where that is refused, only what exceeds
the earlier high-water mark counts); after it
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is read. "added" = that peak -
the RSS before the run (median over the runs, the maximum too): the memory the
scoring itself needed; "peak RSS" is the process's last peak. Time: median wall-clock of ``repeats`` runs after
one warm-up, with ``--threads`` intra-op threads (default 1: on a shared,
oversubscribed machine every multi-threaded op waits for descheduled
threads, which penalises many small ops over few large ones). All variants
score a causal LM's shifted labels (position t against labels[:, t + 1])
with right padding.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "logits + F.cross_entropy (HF-style shift)": "torch",
    "logits + per_sample_cross_entropy(shift_labels=True)": "es_logits",
    "hidden, workspace 256 MiB (default)": "hidden:268435456",
    "hidden, workspace 32 MiB": "hidden:33554432",
    "hidden, workspace 4 MiB": "hidden:4194304",
}


def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    import es_kernels as ek

    B, T, H, V = args.B, args.T, args.H, args.V
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, T // 2 :] = -100  # right padding
    kind = args.child
    torch.set_num_threads(args.threads)

    def run():
        if kind == "torch":  # what a Hugging Face loss does: shift, contiguous copy, per-token loss
            logits = F.linear(hidden, weight)
            shift_logits = logits[:, :-1].contiguous().float()
            tok = F.cross_entropy(shift_logits.view(-1, V), labels[:, 1:].reshape(-1), reduction="none")
            tok = tok.view(B, T - 1)
            count = (labels[:, 1:] != -100).sum(1)
            return torch.where(count > 0, tok.sum(1) / count.clamp(min=1), 0.0)
        if kind == "es_logits":
            return ek.per_sample_cross_entropy(F.linear(hidden, weight), labels, shift_labels=True)
        ws = int(kind.split(":")[1])
        return ek.per_sample_losses_from_hidden(hidden, weight, labels, shift_labels=True, workspace_bytes=ws)

    added, times, out = [], [], None
    with torch.inference_mode():
        for k in range(1 + args.repeats):
            reset = reset_peak()
            before_kb = current_rss_kb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            out = run()
            dt = time.perf_counter() - t0
            added.append((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024)
            if k:
                times.append(dt * 1e3)
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "added_mib": statistics.median(added),
        "added_max_mib": max(added),
        "added_per_run_mib": added,
        "median_ms": statistics.median(times),
        "times_ms": times,
        "losses": out.tolist(),
        "threads": torch.get_num_threads(),
        "hwm_reset": reset,
    }


def reset_peak() -> bool:
    """Reset the process's peak-RSS mark to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise OSError("no VmRSS")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--quick", action="store_true", help="B=2 T=64 H=32 V=1000, nothing written")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.B, args.T, args.H, args.V = 2, 64, 32, 1000
    if args.child:
        print(json.dumps(child(args)))
        return

    sys.path.insert(0, str(HERE))
    import harness

    size = dict(B=args.B, T=args.T, H=args.H, V=args.V, dtype=args.dtype)
    elt = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    logits_mb = args.B * args.T * args.V * elt / 1e6
    print(
        f"B={args.B} T={args.T} H={args.H} V={args.V} {args.dtype}: materialised logits {logits_mb:.0f} MB, "
        f"{args.threads} thread(s)"
    )
    rows, ref = [], None
    for name, kind in VARIANTS.items():
        cmd = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--repeats",
            str(args.repeats),
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
            "--B",
            str(args.B),
            "--T",
            str(args.T),
            "--H",
            str(args.H),
            "--V",
            str(args.V),
        ]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        losses = res.pop("losses")
        ref = ref if ref is not None else losses
        res["max_abs_diff_vs_first"] = max(abs(a - b) for a, b in zip(losses, ref))
        rows.append({"variant": name, **res})
        print(
            f"  {name}: peak RSS {res['peak_rss_mib']:.0f} MiB, added {res['added_mib']:.0f} MiB "
            f"(max {res['added_max_mib']:.0f}), "
            f"{res['median_ms']:.0f} ms, |loss - first| <= {res['max_abs_diff_vs_first']:.2g}"
        )
    print(
        harness.format_table(
            rows,
            [
                ("variant", "variant"),
                ("added_mib", "added peak RSS MiB"),
                ("added_max_mib", "max"),
                ("peak_rss_mib", "peak RSS MiB"),
                ("median_ms", "median ms"),
            ],
        )
    )
    if not args.quick:
        path = harness.write_results(
            "lm_hidden.json",
            rows,
            harness.machine_info(),
            {
                "size": size,
                "materialised_logits_mb": logits_mb,
                "repeats": args.repeats,
                "threads": args.threads,
                "command": " ".join(sys.argv),
            },
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
