"""CPU benchmark of the C++ ops against the plain-PyTorch reference and what
users would otherwise call (F.cross_entropy, torch.topk, torch.multinomial).

    python bench/bench_ops.py              # full sweep (make bench)
    python bench/bench_ops.py --quick      # small sizes only (smoke test)
    python bench/bench_ops.py --out DIR    # write into DIR instead of bench/results
    python bench/bench_ops.py --step 64x10 --select 256 --prune 1000 --budget-s 0.05   # chosen sizes
    python bench/bench_ops.py --ce-grad 64x10,4096x32000 --threads 1   # the cross-entropy backward

Each run writes <out>/cpu_ops_<date>.json (cpu_ops_quick_<date>.json with
--quick) and appends one line per row to <out>/history.csv (or --history).
Rows: median and p20/p80 wall-clock over repeats, the peak memory of one
call, and `x_ref` (the reference's time over the C++ op's) and `x_baseline`
(the baseline's time over the C++ op's): higher is better for es-kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from es_kernels import reference as R  # noqa: E402

OPS = torch.ops.es_kernels
MEM_BUDGET = 10e9  # bytes the largest case (and the reference's copies) may use
BETAS = (0.2, 0.9)
BUDGET_S = 3.0  # seconds of timing per measurement (--budget-s)


def bench(fn, budget_s=None):
    return harness.bench_cpu(fn, budget_s=budget_s or BUDGET_S)


def step_rows(sizes, dtypes):
    rows = []
    for B, C in sizes:
        for dtype in dtypes:
            if B * C * 4 * 3 > MEM_BUDGET:
                print(f"skip es_step B={B} C={C}: over the memory budget", file=sys.stderr)
                continue
            logits = torch.randn(B, C).to(dtype)
            targets = torch.randint(0, C, (B,))
            ids = torch.randperm(4 * B)[:B]
            st = harness.state_for(4 * B)
            b = max(1, B // 4)

            def mine():
                return OPS.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS, "sample", 0, 1)

            cpp = bench(mine)
            ref = bench(lambda: R.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS, "sample", 0, 1))
            ce = bench(lambda: F.cross_entropy(logits.float(), targets, reduction="none"))
            rows.append(
                harness.make_row(
                    "es_step (logits)",
                    f"B={B} C={C}",
                    B * C,
                    str(dtype)[6:],
                    "cpp",
                    cpp,
                    ref,
                    {"F.cross_entropy": ce},
                    harness.peak_memory(mine),
                )
            )
    return rows


def ce_grad_rows(sizes, dtypes):
    """per_sample_cross_entropy_backward against F.cross_entropy's backward
    (autograd.grad of its per-sample losses, the graph built once, on the
    logits in their dtype) and the reference, timed interleaved."""
    rows = []
    for B, C in sizes:
        for dtype in dtypes:
            if B * C * 4 * 4 > MEM_BUDGET:
                print(f"skip ce_grad B={B} C={C}: over the memory budget", file=sys.stderr)
                continue
            logits = torch.randn(B, C).to(dtype)
            targets = torch.randint(0, C, (B,))
            g = torch.rand(B)
            x = logits.clone().requires_grad_()
            tok = F.cross_entropy(x, targets, reduction="none")

            def mine():
                return OPS.per_sample_cross_entropy_backward(g, logits, targets, -100, 0.0)

            t = harness.bench_cpu_interleaved(
                {
                    "mine": mine,
                    "F.cross_entropy backward": lambda: torch.autograd.grad(tok, x, g.to(tok.dtype), retain_graph=True),
                    "reference": lambda: R.per_sample_cross_entropy_backward(g, logits, targets, -100, 0.0),
                },
                budget_s=3 * BUDGET_S,
            )
            base = {"F.cross_entropy backward": t["F.cross_entropy backward"]}
            rows.append(
                harness.make_row(
                    "ce_backward",
                    f"B={B} C={C}",
                    B * C,
                    str(dtype)[6:],
                    "cpp",
                    t["mine"],
                    t["reference"],
                    base,
                    harness.peak_memory(mine),
                )
            )
    return rows


def select_rows(sizes):
    rows = []
    for B in sizes:
        w = torch.rand(B) * 3 + 1e-3
        b = max(1, B // 4)
        for mode, baseline, base_fn in [
            ("sample", "torch.multinomial", lambda: torch.multinomial(w, b, replacement=False)),
            ("topk", "torch.topk", lambda: torch.topk(w, b)),
        ]:

            def mine():
                return OPS.weighted_select(w, b, mode, 0, 1)

            cpp = bench(mine)
            ref = bench(lambda: R.weighted_select(w, b, mode, 0, 1))
            base = bench(base_fn)
            rows.append(
                harness.make_row(
                    f"weighted_select ({mode})",
                    f"B={B} b={b}",
                    B,
                    "float32",
                    "cpp",
                    cpp,
                    ref,
                    {baseline: base},
                    harness.peak_memory(mine),
                )
            )
    return rows


def prune_rows(sizes):
    rows = []
    for n in sizes:
        st = harness.state_for(n)

        def mine():
            return OPS.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True)

        cpp = bench(mine)
        ref = bench(lambda: R.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True), budget_s=2 * (BUDGET_S))
        rows.append(
            harness.make_row("eswp_prune", f"N={n:.0e}", n, "float32", "cpp", cpp, ref, mem=harness.peak_memory(mine))
        )
    return rows


COLUMNS = harness.table_columns(
    "median_ms ref_ms x_ref baseline baseline_ms x_baseline", median_ms="C++ ms (median)", ref_ms="reference ms"
)


def _pairs(text):
    return [tuple(int(float(v)) for v in s.split("x")) for s in text.split(",") if s]


def _ints(text):
    return [int(float(s)) for s in text.split(",") if s]


def main(argv=None):
    global BUDGET_S
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--out", default=str(harness.RESULTS), help="folder for the JSON file (default bench/results)")
    ap.add_argument("--history", default=None, help="history CSV to append to (default <out>/history.csv)")
    ap.add_argument("--step", type=_pairs, default=None, metavar="BxC,...", help="es_step sizes (float32)")
    ap.add_argument("--select", type=_ints, default=None, metavar="B,...", help="weighted_select sizes")
    ap.add_argument("--prune", type=_ints, default=None, metavar="N,...", help="eswp_prune sizes")
    ap.add_argument(
        "--ce-grad", type=_pairs, default=None, metavar="BxC,...", help="ce backward sizes (float32, bfloat16)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="seconds of timing per measurement (default 3, 0.5 with --quick)"
    )
    args = ap.parse_args(argv)
    BUDGET_S = args.budget_s or (0.5 if args.quick else 3.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    chosen = any(x is not None for x in (args.step, args.select, args.prune, args.ce_grad))
    if chosen:
        rows = (
            step_rows(args.step or [], [torch.float32])
            + ce_grad_rows(args.ce_grad or [], [torch.float32, torch.bfloat16])
            + select_rows(args.select or [])
            + prune_rows(args.prune or [])
        )
    elif args.quick:
        rows = (
            step_rows([(256, 10), (256, 1000)], [torch.float32])
            + select_rows([1024, 16384])
            + prune_rows([10**4, 10**5])
        )
    else:
        sizes = [(B, C) for B in (256, 4096, 65536) for C in (10, 1000, 32000)]
        rows = (
            step_rows(sizes, [torch.float32])
            + step_rows([(4096, 1000), (4096, 32000)], [torch.bfloat16])
            + ce_grad_rows([(64, 10), (4096, 32000)], [torch.float32, torch.bfloat16])
            + select_rows([4096, 65536, 10**6])
            + prune_rows([40, 10**5, 10**6, 10**7])
        )
    info = harness.machine_info()
    paths = harness.write_results("cpu_ops", rows, info, out=args.out, history=args.history, quick=args.quick or chosen)
    print(f"\n{harness.header_line(info)}\n")
    print(harness.format_table(rows, COLUMNS))
    noisy = sum(r["noisy"] for r in rows)
    if noisy:
        print(
            f"\nwarning: {noisy} of {len(rows)} rows look noisy (machine loaded?): see the `noise` column",
            file=sys.stderr,
        )
    print(f"\nwrote {paths['json']}\nappended {len(rows)} lines to {paths['history']}")
    return paths


if __name__ == "__main__":
    main()
