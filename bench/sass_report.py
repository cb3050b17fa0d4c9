"""SASS report of the Triton kernels for sm_90 (H100/H200), without a GPU.

    python bench/sass_report.py            # writes bench/results/sass_report.md

Every variant the launchers produce (the harness of bench/aot.py,
the same as python_tests/test_aot_compile.py) is compiled for sm_90a; per
variant this reports registers and shared memory (cuobjdump -res-usage,
Triton's metadata), an occupancy estimate, and, from ``nvdisasm`` of the cubin,
the loops: instructions per iteration, per element, and barriers per
iteration. The method is written into the report (METHOD below).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JITFunctions
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aot  # noqa: E402  (bench/aot.py, next to this script)

# H100 / H200 (sm_90) per-SM limits
SM90 = dict(
    regs=65536,
    smem=228 * 1024,
    threads=2048,
    blocks=32,
    warps=64,
    reg_unit=256,  # registers are allocated per warp in units of 256
    smem_unit=128,  # shared memory allocation granularity (bytes)
    smem_reserved=1024,
)  # shared memory the system reserves per block (sm_80+)

METHOD = """\
**Occupancy** (sm_90: 65536 registers, 228 KB shared memory, 2048 threads, 32
blocks, 64 warps per SM): blocks per SM = min(by registers: floor(65536 /
(warps per block x ceil(32 x regs / 256) x 256)), by shared memory: floor(228 KB /
(shared rounded up to 128 B + 1 KB reserved per block)), by threads:
floor(2048 / threads per block), 32); occupancy = blocks x warps per block / 64.
The limiter is named.

**Loops** (from `nvdisasm -c` of the cubin): a loop is a backward branch (a
`BRA` to a label at a lower address than itself); its body is the address range
[label, branch]. Nested loops are intervals inside others; *innermost* loops
contain no other. *instr/iter* counts the static instructions in the body (NOPs
excluded; for a loop with inner loops, the instructions outside them: "own").
Predicated-off or branched-over instructions are counted too, so this is an
upper bound of the instructions a warp issues per iteration. *instr/elem* =
instr/iter / (elements per thread per iteration), assuming one iteration handles
one block of the kernel's block constexpr (the largest constexpr named
`*BLOCK*`; for ce_kernel ROWS x BLOCK_V, for observe_kernel BLOCK rows x
TBLOCK tokens) spread over all threads (32 x num_warps). A loop unrolled by the compiler shows k blocks
per iteration, and its instr/elem is then k times too large. *BAR/iter* counts
`BAR.*` instructions (BAR.SYNC: block-wide barriers, typically two per
cross-warp reduction or scan) in the body.
"""

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _opcode(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def parse_sass(sass: str):
    """[(address, instruction)], {label: address} of nvdisasm -c output."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    return instrs, labels


def loops(sass: str) -> list[dict]:
    """Every loop (backward branch) with its body's instruction and barrier
    counts, nesting depth and whether it is innermost."""
    instrs, labels = parse_sass(sass)
    spans = []
    for addr, text in instrs:
        if _opcode(text).startswith("BRA"):
            m = _TARGET.search(text)
            start = labels.get(m.group(1)) if m else None
            if start is not None and start < addr:  # the BRA-to-itself after EXIT is no loop
                spans.append((start, addr))
    spans = sorted(set(spans))
    out = []
    for s, e in spans:
        inner = [(a, b) for a, b in spans if (a, b) != (s, e) and s <= a and b <= e]
        outer = [(a, b) for a, b in spans if (a, b) != (s, e) and a <= s and e <= b]
        body = [t for a, t in instrs if s <= a <= e and _opcode(t) != "NOP" and not any(x <= a <= y for x, y in inner)]
        out.append(
            dict(
                start=s,
                end=e,
                depth=len(outer),
                innermost=not inner,
                instr=len(body),
                bars=sum(_opcode(t).startswith("BAR") for t in body),
                mufu=sum(_opcode(t).startswith("MUFU") for t in body),
            )
        )
    return out


def occupancy(regs: int, shared: int, num_warps: int) -> dict:
    L = SM90
    threads = 32 * num_warps
    per_warp = math.ceil(32 * max(regs, 1) / L["reg_unit"]) * L["reg_unit"]
    by = {
        "registers": L["regs"] // (per_warp * num_warps),
        "shared": L["smem"] // (math.ceil(shared / L["smem_unit"]) * L["smem_unit"] + L["smem_reserved"]),
        "threads": L["threads"] // threads,
        "blocks": L["blocks"],
    }
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    return dict(blocks=blocks, occupancy=blocks * num_warps / L["warps"], limiter=limiter)


# kernels whose loop iteration handles a 2-D tile: the product of these constexprs
TILE = {"ce_kernel": ("ROWS", "BLOCK_V"), "observe_kernel": ("BLOCK", "TBLOCK")}


def _block(v: aot.Variant) -> int:
    """Elements one loop iteration handles: the largest ``*BLOCK*`` constexpr,
    or for the kernels in TILE the product of its constexprs (rows x columns)."""
    names = list(getattr(__import__(v.module, fromlist=[v.name]), v.name).arg_names)
    consts = {
        n: int(v.constexprs[(i,)])
        for i, n in enumerate(names)
        if (i,) in v.constexprs and v.signature[n] == "constexpr" and isinstance(v.constexprs[(i,)], int)
    }
    if v.name in TILE:
        return math.prod(consts.get(n, 1) for n in TILE[v.name])
    blocks = [val for n, val in consts.items() if "BLOCK" in n]
    return max(blocks) if blocks else 1


def _completeness(v: aot.Variant, r: aot.Result):
    """The 'fullest' variant of a kernel: most flags on, largest block, aligned."""
    flags = sum(sum(x is True for x in (val if isinstance(val, tuple) else (val,))) for val in v.constexprs.values())
    return (flags, _block(v), "(unaligned)" not in v.label, -len(v.label))


# H200 (sm_90) figures for the estimates: SMs, boost clock, HBM3e bandwidth
H200 = dict(sms=132, clock_hz=1.98e9, hbm_bytes_s=4.8e12, issue_per_sm=4, mufu_lanes_per_sm=16)

ESTIMATE_METHOD = """\
Estimates, **not measurements** (no GPU measured them): for a shape, the
kernel's hot loop (its first innermost loop: the unmasked chunks) runs
`rows x (columns / BLOCK_V)` iterations per warp of `warps` warps;
*issue time* = those warp instructions / (132 SMs x 4 schedulers x 1.98 GHz),
*MUFU time* = the loop's MUFU instructions x 32 lanes / (132 SMs x 16 lanes x
1.98 GHz), *read time* = the bytes read once / 4.8 TB/s (H200 HBM3e peak; a
real copy reaches less: `bench/bench_gpu.py` measures it). A loop whose issue
and MUFU times stay below the read time is memory-bound on paper; the
epilogue, the tail chunk and the launches after it are not counted.
`bash bench/gpu_check.sh` measures the real times."""

# (what, kernel, constexprs the variant must have, logits dtype, rows, columns)
ESTIMATES = [
    ("es_step [4096, 32000] bf16: CE + update + key (launch 1)", "ce_kernel",
     {"ROWS": 1, "BLOCK_V": 4096, "G": 8, "SMOOTH": False, "MODE": lambda m: m[0]}, "*bf16", 4096, 32000),
    ("per_sample_cross_entropy [4096, 32000] bf16", "ce_kernel",
     {"ROWS": 1, "BLOCK_V": 4096, "G": 8, "SMOOTH": False, "MODE": lambda m: not m[0]}, "*bf16", 4096, 32000),
    ("same, label_smoothing > 0", "ce_kernel",
     {"ROWS": 1, "BLOCK_V": 4096, "G": 8, "SMOOTH": True, "MODE": lambda m: not m[0]}, "*bf16", 4096, 32000),
    ("per-sequence CE [64, 2048, 8192] bf16 (token rows)", "ce_kernel",
     {"ROWS": 1, "BLOCK_V": 4096, "G": 8, "SMOOTH": False, "MODE": lambda m: not m[0]}, "*bf16", 64 * 2048, 8192),
    ("per_sample_cross_entropy [4096, 32000] fp32", "ce_kernel",
     {"ROWS": 1, "BLOCK_V": 4096, "G": 4, "SMOOTH": False, "MODE": lambda m: not m[0]}, "*fp32", 4096, 32000),
]  # fmt: skip


def _matches(v: aot.Variant, want: dict, ptr: str) -> bool:
    names = list(getattr(__import__(v.module, fromlist=[v.name]), v.name).arg_names)
    got = {n: v.constexprs.get((i,)) for i, n in enumerate(names)}
    ok = all(w(got.get(k)) if callable(w) else got.get(k) == w for k, w in want.items())
    return ok and v.signature.get(names[0]) == ptr


def estimates(rows) -> list[str]:
    """The ESTIMATES table from the compiled variants (see ESTIMATE_METHOD)."""
    h = H200
    out = [
        "| shape | variant | regs | occupancy | hot loop: instr/elem, MUFU/elem, BAR/iter | issue us | MUFU us | "
        "read-once us | bound (on paper) |",
        "|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for what, name, want, ptr, n_rows, cols in ESTIMATES:
        found = [row for row in rows if row[0].name == name and _matches(row[0], want, ptr)]
        if not found:
            out.append(f"| {what} | (no such variant compiled) | | | | | | | |")
            continue
        v, r, occ, ls, per_thread = found[0]
        hot = next(lp for lp in ls if lp["innermost"])
        warps = v.options["num_warps"]
        iters = n_rows * (cols // _block(v))
        issue = iters * warps * hot["instr"] / (h["sms"] * h["issue_per_sm"] * h["clock_hz"]) * 1e6
        mufu = iters * warps * hot["mufu"] * 32 / (h["sms"] * h["mufu_lanes_per_sm"] * h["clock_hz"]) * 1e6
        read = n_rows * cols * (2 if "16" in ptr else 4) / h["hbm_bytes_s"] * 1e6
        bound = "memory" if max(issue, mufu) < read else ("issue" if issue >= mufu else "MUFU")
        out.append(
            f"| {what} | {v.label} | {r.regs} | {occ['occupancy']:.0%} | {hot['per_elem']:.1f}, "
            f"{hot['mufu'] / per_thread:.2f}, {hot['bars']} | {issue:.0f} | {mufu:.0f} | {read:.0f} | {bound} |"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sass_report.md"))
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rec = aot.record_calls()
    vs = aot.variants(rec.calls, ["sm_90a"])
    results = aot.compile_all(vs, args.workers, sass=True)
    bad = [r for r in results if not r.ok]
    rows = []
    for v, r in zip(vs, results):
        if not r.ok:
            continue
        warps = v.options["num_warps"]
        occ = occupancy(r.regs, r.shared, warps)
        per_thread = max(_block(v) / (32 * warps), 1e-9)
        ls = loops(r.sass)
        for lp in ls:
            lp["per_elem"] = lp["instr"] / per_thread
        rows.append((v, r, occ, ls, per_thread))

    lines = [
        "# SASS report of the Triton kernels (sm_90a)",
        "",
        f"Written by `python bench/sass_report.py` (Triton {aot._triton_version()}, no GPU needed): every "
        f"variant the launchers produce ({len(rows)} for sm_90a), compiled through the harness of "
        "bench/aot.py.",
        "",
        "## Method",
        "",
        METHOD,
        "## Per kernel (its fullest variant: most flags on, largest block)",
        "",
        "| kernel | variant | regs | shared (B) | threads | blocks/SM (limiter) | occupancy | "
        "innermost loops: instr/iter, instr/elem, BAR/iter |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    by_kernel: dict = {}
    for row in rows:
        by_kernel.setdefault(row[0].name, []).append(row)
    for name in sorted(by_kernel):
        v, r, occ, ls, _ = max(by_kernel[name], key=lambda x: _completeness(x[0], x[1]))
        lines.append(_row(v, r, occ, ls, name_col=True))
    lines += [
        "",
        "Across all variants:",
        "",
        "| kernel | variants | regs (min-max) | shared (max, B) | occupancy (min-max) | "
        "max BAR/iter in an innermost loop |",
        "|---|---:|---|---:|---|---:|",
    ]
    for name in sorted(by_kernel):
        g = by_kernel[name]
        regs = [x[1].regs for x in g]
        occs = [x[2]["occupancy"] for x in g]
        bars = [lp["bars"] for x in g for lp in x[3] if lp["innermost"]]
        lines.append(
            f"| {name} | {len(g)} | {min(regs)}-{max(regs)} | {max(x[1].shared for x in g)} | "
            f"{min(occs):.0%}-{max(occs):.0%} | {max(bars) if bars else 0} |"
        )
    lines += ["", "## Estimates for issue 13's shapes", "", ESTIMATE_METHOD, "", *estimates(rows)]
    lines += [
        "",
        "## Every variant",
        "",
        "Loops in address order, `*` innermost, `[d]` nesting depth when > 0: instructions per "
        "iteration / per element, barriers per iteration.",
        "",
        "| kernel | variant | regs | shared (B) | threads | blocks/SM (limiter) | occupancy | loops |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for v, r, occ, ls, _ in sorted(rows, key=lambda x: (x[0].name, aot._natural(x[0].label))):
        lines.append(_row(v, r, occ, ls, name_col=True, all_loops=True))
    if bad:
        lines += ["", "## Compile errors", ""] + [f"- {r.name} [{r.label}]: {r.error.splitlines()[-1]}" for r in bad]
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{args.out}: {len(rows)} variants, {len(bad)} compile errors, {time.perf_counter() - t0:.1f} s")
    return 1 if bad else 0


def _row(v, r, occ, ls, name_col=True, all_loops=False) -> str:
    shown = ls if all_loops else [lp for lp in ls if lp["innermost"]]
    loop_text = (
        "; ".join(
            ("*" if lp["innermost"] and all_loops else "")
            + (f"[{lp['depth']}]" if lp["depth"] else "")
            + f"{lp['instr']}, {lp['per_elem']:.1f}, {lp['bars']}"
            for lp in shown
        )
        or "no loop"
    )
    warps = v.options["num_warps"]
    return (
        f"| {v.name} | {v.label} | {r.regs} | {r.shared} | {32 * warps} | {occ['blocks']} ({occ['limiter']}) | "
        f"{occ['occupancy']:.0%} | {loop_text} |"
    )


if __name__ == "__main__":
    sys.exit(main())
