"""GPU benchmark of the Triton ops (run by bench/gpu_check.sh on a CUDA machine).

Times with triton.testing.do_bench (median, p20, p80 in ms) the Triton ops
against the reference composition and what users would otherwise call
(F.cross_entropy(reduction="none"), torch.topk, torch.multinomial), and
reports achieved bandwidth against a device-to-device copy it measures.
Writes bench/results/gpu_<date>.json and .md (or to --out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import es_kernels as ek  # noqa: E402
from es_kernels import reference as R  # noqa: E402

OPS = torch.ops.es_kernels
BETAS = (0.2, 0.9)


def bench(fn) -> dict:
    med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus bytes written."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))["median_ms"]
    return 2 * x.numel() * 4 / (t * 1e-3) / 1e9


def state_for(n):
    st = ek.ESState(n, device="cuda")
    half = torch.randperm(n, device="cuda")[: n // 2]
    ek.es_update(half, torch.rand(half.numel(), device="cuda") * 3, st)
    return st


def row(op, size, dtype, mine, ref=None, baseline=None, base=None, bytes_=None, bw=None):
    r = harness.make_row(op, size, dtype, "triton", mine, ref, baseline, base)
    if bytes_ is not None:
        gbs = bytes_ / (mine["median_ms"] * 1e-3) / 1e9
        r.update(GBps=gbs, x_read_time=bw / gbs)  # time over the time to read the bytes once at copy bandwidth
    print(r, flush=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(harness.RESULTS))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    for B, C in [(256, 32000), (4096, 1000), (4096, 32000), (65536, 1000), (16384, 32000)]:
        logits = torch.randn(B, C, device="cuda").bfloat16()
        targets = torch.randint(0, C, (B,), device="cuda")
        ids = torch.randperm(4 * B, device="cuda")[:B]
        st = state_for(4 * B)
        b = B // 4
        mine = bench(lambda: OPS.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS,
                                         "sample", 0, 1))
        ref = bench(lambda: R.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS, "sample", 0, 1))
        ce = bench(lambda: F.cross_entropy(logits, targets, reduction="none"))
        rows.append(row("es_step (logits)", f"B={B} C={C}", "bfloat16", mine, ref, "F.cross_entropy", ce,
                        logits.numel() * 2, bw))
    for B in (4096, 65536):
        losses = torch.rand(B, device="cuda")
        ids = torch.randperm(4 * B, device="cuda")[:B]
        st = state_for(4 * B)
        mine = bench(lambda: OPS.es_step_from_losses(losses, ids, st.tensor, st.errors, B // 4, *BETAS, "sample", 0, 1))
        ref = bench(lambda: R.es_step_from_losses(losses, ids, st.tensor, st.errors, B // 4, *BETAS, "sample", 0, 1))
        rows.append(row("es_step (losses)", f"B={B} b={B // 4}", "float32", mine, ref))
    for B in (4096, 65536):
        w = torch.rand(B, device="cuda") * 3 + 1e-3
        b = B // 4
        for mode, name, fn in [("sample", "torch.multinomial", lambda: torch.multinomial(w, b)),
                               ("topk", "torch.topk", lambda: torch.topk(w, b))]:
            mine = bench(lambda: OPS.weighted_select(w, b, mode, 0, 1))
            ref = bench(lambda: R.weighted_select(w, b, mode, 0, 1))
            rows.append(row(f"weighted_select ({mode})", f"B={B} b={b}", "float32", mine, ref, name, bench(fn)))
    for n in (10**5, 10**6, 10**7):
        st = state_for(n)
        mine = bench(lambda: OPS.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True))
        ref = bench(lambda: R.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True))
        rows.append(row("eswp_prune", f"N={n:.0e}", "float32", mine, ref, bytes_=n * 8, bw=bw))
    info = harness.machine_info()
    info["copy_GBps"] = bw
    date = dt.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = [("op", "op"), ("size", "size"), ("dtype", "dtype"), ("triton_ms", "Triton ms (median)"),
               ("ref_ms", "reference ms"), ("x_ref", "x reference"), ("baseline", "baseline"),
               ("baseline_ms", "baseline ms"), ("x_baseline", "x baseline"), ("GBps", "GB/s"),
               ("x_read_time", "x read-once time")]
    table = harness.format_table(rows, columns)
    header = f"{info.get('gpu')}, torch {info['torch']}, copy {bw:.0f} GB/s, {info['date']}"
    (out / f"gpu_{date}.json").write_text(__import__("json").dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    (out / f"gpu_{date}.md").write_text(f"{header}\n\n{table}\n")
    print(f"\n{header}\n\n{table}")


if __name__ == "__main__":
    main()
