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
    "hidden + segment_ids (4 documents a row), workspace 256 MiB": "packed:268435456",
}
GB = 1e9


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
    segments = torch.arange(B * 4).repeat_interleave(-(-T // 4))[: B * T].view(B, T)  # packed: 4 documents a row
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
        if kind.startswith("packed"):
            return ek.lm.per_document_losses_from_hidden(
                hidden, weight, labels, segments, shift_labels=True, workspace_bytes=ws
            ).losses[: B * 4]
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


def estimate(B: int, T: int, H: int, V: int, elt: int, workspace: int) -> dict:
    """Bytes each variant adds at a size too big for this machine, by arithmetic:
    the logits ``L = B*T*V*elt``; Hugging Face's causal-LM loss also makes a
    float32 copy of the logits and a float32 log-softmax (``2 * 4*B*T*V``);
    ``per_sample_cross_entropy`` reads the logits in place (``L``); the hidden
    path holds one float32 chunk (``workspace``), its matmul output in the
    input dtype (``workspace * elt / 4``, none for float32) and ``O(B*T)``
    float32 vectors (about 10 of them; the packed path adds about 10 int64
    ``B*T`` buffers), next to the ``B*T*H`` hidden states the model made anyway."""
    rows = B * T
    logits = rows * V * elt
    chunk = workspace + (workspace * elt // 4 if elt != 4 else 0)
    return {
        "size": dict(B=B, T=T, H=H, V=V, bytes_per_element=elt, workspace=workspace),
        "logits_gb": logits / GB,
        "hf_style_gb": (logits + 2 * rows * V * 4) / GB,
        "per_sample_cross_entropy_gb": logits / GB,
        "hidden_gb": (chunk + 10 * rows * 4) / GB,
        "hidden_packed_gb": (chunk + 10 * rows * 4 + 10 * rows * 8) / GB,
        "hidden_states_gb": rows * H * elt / GB,
        "chunks": -(-V // max(1, workspace // (rows * 4))),
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
        # the packed variant's losses are per document: not comparable with the per-sequence ones
        same_kind = not kind.startswith("packed")
        res["max_abs_diff_vs_first"] = max(abs(a - b) for a, b in zip(losses, ref)) if same_kind else None
        rows.append({"variant": name, **res})
        print(
            f"  {name}: peak RSS {res['peak_rss_mib']:.0f} MiB, added {res['added_mib']:.0f} MiB "
            f"(max {res['added_max_mib']:.0f}), "
            f"{res['median_ms']:.0f} ms, |loss - first| <= {res['max_abs_diff_vs_first']}"
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
    big = estimate(32, 2048, 4096, 128256, 2, 256 * 2**20)
    print(
        "estimate, B=32 T=2048 H=4096 V=128256 bfloat16 (not measured): logits {logits_gb:.1f} GB; added by "
        "HF-style {hf_style_gb:.1f} GB, per_sample_cross_entropy {per_sample_cross_entropy_gb:.1f} GB, "
        "hidden (256 MiB workspace, {chunks} chunks) {hidden_gb:.2f} GB, packed {hidden_packed_gb:.2f} GB".format(**big)
    )
    if not args.quick:
        path = HERE / "results" / "lm_hidden.json"
        info = {
            "machine": harness.machine_info(),
            "size": size,
            "materialised_logits_mb": logits_mb,
            "repeats": args.repeats,
            "threads": args.threads,
            "command": " ".join(sys.argv),
            "estimate_big": big,
            "rows": rows,
        }
        path.write_text(json.dumps(info, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
