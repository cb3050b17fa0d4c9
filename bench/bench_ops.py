"""CPU benchmark of the C++ ops against the plain-PyTorch reference and what
users would otherwise call (F.cross_entropy, torch.topk, torch.multinomial).

    python bench/bench_ops.py            # full sweep, writes bench/results/cpu_ops.json
    python bench/bench_ops.py --quick    # small sizes only (smoke test)

Rows: median and p20/p80 wall-clock over repeats; `x_ref` is the reference
time over the C++ time (higher is better for es-kernels).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import es_kernels as ek  # noqa: E402
from es_kernels import reference as R  # noqa: E402

OPS = torch.ops.es_kernels
MEM_BUDGET = 10e9  # bytes the largest case (and the reference's copies) may use
BETAS = (0.2, 0.9)


def bench(fn, setup=None, budget_s=3.0):
    first = harness.time_cpu(fn, repeats=1, warmup=1, setup=setup)
    return harness.time_cpu(fn, repeats=harness.repeats_for(first["median_ms"] / 1e3, budget_s),
                            warmup=0, setup=setup)


def state_for(n):
    st = ek.ESState(n)
    half = torch.randperm(n)[: n // 2]
    ek.es_update(half, torch.rand(half.numel()) * 3, st)
    return st


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
            st = state_for(4 * B)
            b = B // 4
            cpp = bench(lambda: OPS.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS,
                                            "sample", 0, 1))
            ref = bench(lambda: R.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS,
                                          "sample", 0, 1))
            ce = bench(lambda: F.cross_entropy(logits.float(), targets, reduction="none"))
            rows.append(harness.make_row("es_step (logits)", f"B={B} C={C}", str(dtype)[6:], "cpp", cpp, ref,
                                         "F.cross_entropy", ce))
            print(rows[-1], flush=True)
    return rows


def select_rows(sizes):
    rows = []
    for B in sizes:
        w = torch.rand(B) * 3 + 1e-3
        b = B // 4
        for mode, baseline, base_fn in [
            ("sample", "torch.multinomial", lambda: torch.multinomial(w, b, replacement=False)),
            ("topk", "torch.topk", lambda: torch.topk(w, b)),
        ]:
            cpp = bench(lambda: OPS.weighted_select(w, b, mode, 0, 1))
            ref = bench(lambda: R.weighted_select(w, b, mode, 0, 1))
            base = bench(base_fn)
            rows.append(harness.make_row(f"weighted_select ({mode})", f"B={B} b={b}", "float32", "cpp", cpp,
                                         ref, baseline, base))
            print(rows[-1], flush=True)
    return rows


def prune_rows(sizes):
    rows = []
    for n in sizes:
        st = state_for(n)
        cpp = bench(lambda: OPS.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True))
        ref = bench(lambda: R.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True), budget_s=6.0)
        rows.append(harness.make_row("eswp_prune", f"N={n:.0e}", "float32", "cpp", cpp, ref))
        print(rows[-1], flush=True)
    return rows


COLUMNS = [("op", "op"), ("size", "size"), ("dtype", "dtype"), ("cpp_ms", "C++ ms (median)"),
           ("ref_ms", "reference ms"), ("x_ref", "x reference"), ("baseline", "baseline"),
           ("baseline_ms", "baseline ms"), ("x_baseline", "x baseline")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes only; writes cpu_ops_quick.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        rows = (step_rows([(256, 10), (256, 1000)], [torch.float32]) + select_rows([4096])
                + prune_rows([10**5]))
    else:
        sizes = [(B, C) for B in (256, 4096, 65536) for C in (10, 1000, 32000)]
        rows = (step_rows(sizes, [torch.float32]) + step_rows([(4096, 1000), (4096, 32000)], [torch.bfloat16])
                + select_rows([4096, 65536, 10**6]) + prune_rows([10**5, 10**6, 10**7]))
    info = harness.machine_info()
    path = harness.write_results("cpu_ops_quick.json" if args.quick else "cpu_ops.json", rows, info)
    print(f"\n{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['date']}\n")
    print(harness.format_table(rows, COLUMNS))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
