"""GPU benchmark of the Triton ops (run by bench/gpu_check.sh on a CUDA machine).

Times with triton.testing.do_bench (median, p20, p80; shown in microseconds)
the Triton ops against the reference composition and what users would
otherwise call (F.cross_entropy(reduction="none"), torch.topk,
torch.multinomial, and Liger-Kernel's cross-entropy when `liger_kernel`
imports), and reports each op's time as a multiple of the time to read its
inputs once at the copy bandwidth it measures (`x_read_once`; 1 is the
floor). Writes <out>/gpu_ops_<date>.json and .md and appends to
<out>/history.csv (bench/harness.py; merge a device run's history into the
committed one with `python bench/harness.py merge $OUT/history.csv`).

    python bench/bench_gpu.py --dry-run      # print the plan of shapes (no CUDA needed)
    python bench/bench_gpu.py --out DIR      # run (CUDA), within --budget-s seconds of timing
    python bench/bench_gpu.py --device cpu --quick --out /tmp/x   # test the whole script on a CPU
    python bench/bench_gpu.py --step-costs   # what a scoring step costs against a training step

``--step-costs`` times, with :func:`es_kernels.estimate_cost`, a training
step on B and on b rows, the scoring pass and ES's own work for the demo's
MLP (B = 512, b = 171), the demo's GPT-2 (B = 64 sequences of 64 bytes,
b = 16) and a Llama-style model of about 1.2B parameters (bf16 weights,
B = 8 sequences of 2048 tokens, b = 3; scored from the hidden states in
vocabulary chunks, never the [B, T, V] logits), and writes
<out>/gpu_step_costs_<date>.json with each schedule's cost per meta-batch
(docs/cost.md has the estimates on paper this measures).

The shapes issue 13 asks for come first: es_step from logits B=4096
C=32000 bf16 (and per_sample_cross_entropy alone on the same logits: the
difference is what the fused update and key cost in the same launch);
weighted_select B=65536 b=16384 and B=1e6 b=250000; per-sequence mean
cross-entropy of [64, 2048, V] logits with V=8192 bf16 (2 GiB of logits;
V=32000 would be 8 GiB and the reference's float32 copies four times that),
and the per-sequence means alone (es_step_from_losses on token losses
[64, 2048] with a mask, against the masked mean in torch); eswp_prune N=1e8
and N=1e9 (8 GB of state and 12 GB of outputs at 1e9: run only when the free
memory allows, the reference only up to where it fits; issue 13's targets:
N=1e8 < 5 ms, N=1e9 < 50 ms and < 16 GB allocated by the call). Each case is
skipped, with a note, when its memory estimate exceeds 90% of the free GPU
memory or the time budget is spent.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from es_kernels import reference as R  # noqa: E402

OPS = torch.ops.es_kernels
BETAS = (0.2, 0.9)
SEQ_V = 8192  # vocabulary of the [64, 2048, V] per-sequence case (see the docstring)
GB = 1e9


@dataclass
class Case:
    """One planned measurement. ``build(device)`` makes the inputs and returns
    {"mine": fn, "ref": fn or None, "baselines": {name: fn}}; the byte counts
    are what the op must read once and estimates of the memory the inputs
    plus our call (``mem_mine``) and plus the reference (``mem_ref``) need."""

    op: str
    size: str
    n: int
    dtype: str
    bytes_read: int
    mem_mine: int
    mem_ref: int | None
    baselines: tuple[str, ...]
    build: Callable = field(repr=False)


def _liger_ce():
    """Liger-Kernel's cross-entropy (reduction="none"), or None."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss(reduction="none")
    except Exception:  # not installed, or a version without reduction="none"
        return None


def _ce_baselines(x2d, t1d, reduce_rows=None):
    """F.cross_entropy and (when importable) Liger's on logits ``x2d`` [R, C];
    ``reduce_rows`` turns the token losses into per-sequence means. Liger
    writes its gradient into its input, so it gets a copy."""
    post = reduce_rows or (lambda v: v)
    out = {"F.cross_entropy": lambda: post(F.cross_entropy(x2d, t1d, reduction="none"))}
    liger = _liger_ce()
    if liger is not None:
        xl = x2d.clone()
        out["liger cross_entropy"] = lambda: post(liger(xl, t1d))
    return out


def _base_names():
    return ("F.cross_entropy",) + (("liger cross_entropy",) if _liger_ce() is not None else ())


def step_case(B, C, dtype=torch.bfloat16):
    es = torch.finfo(dtype).bits // 8

    def build(dev):
        logits = torch.randn(B, C, device=dev).to(dtype)
        targets = torch.randint(0, C, (B,), device=dev)
        ids = torch.randperm(4 * B, device=dev)[:B]
        st = harness.state_for(4 * B, dev)
        b = B // 4
        return {
            "mine": lambda: OPS.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS, "sample", 0, 1),
            "ref": lambda: R.es_step(logits, targets, ids, st.tensor, st.errors, b, *BETAS, "sample", 0, 1),
            "baselines": _ce_baselines(logits, targets),
        }

    return Case(
        "es_step (logits)",
        f"B={B} C={C}",
        B * C,
        str(dtype)[6:],
        B * C * es + B * 24,
        B * C * es * 2 + 4 * B * 8 * 2,
        B * C * (es * 2 + 12),
        _base_names(),
        build,
    )


def ce_case(B, C, dtype=torch.bfloat16):
    """per_sample_cross_entropy alone on [B, C]: with step_case, what the
    fused update and key (the same launch) add to the cross-entropy."""
    es = torch.finfo(dtype).bits // 8

    def build(dev):
        logits = torch.randn(B, C, device=dev).to(dtype)
        targets = torch.randint(0, C, (B,), device=dev)
        return {
            "mine": lambda: OPS.per_sample_cross_entropy(logits, targets, -100, 0.0),
            "ref": lambda: R.per_sample_cross_entropy(logits, targets),
            "baselines": _ce_baselines(logits, targets),
        }

    n = B * C
    return Case(
        "per_sample_cross_entropy", f"B={B} C={C}", n, str(dtype)[6:], n * es + B * 8, n * es + B * 16,
        n * (es + 12), _base_names(), build,
    )  # fmt: skip


def token_means_case(B, T):
    """es_step_from_losses on token losses [B, T] with a mask: the per-sequence
    means (vectorised over T) plus the update and selection, against the
    masked mean in torch."""

    def build(dev):
        losses = torch.rand(B, T, device=dev) * 3
        mask = torch.rand(B, T, device=dev) < 0.9
        ids = torch.randperm(4 * B, device=dev)[:B]
        st = harness.state_for(4 * B, dev)
        b = max(B // 4, 1)
        return {
            "mine": lambda: OPS.es_step_from_losses(
                losses, ids, st.tensor, st.errors, b, *BETAS, "sample", 0, 1, mask=mask
            ),
            "ref": lambda: R.es_step_from_losses(
                losses, ids, st.tensor, st.errors, b, *BETAS, "sample", 0, 1, mask=mask
            ),
            "baselines": {"masked mean (torch)": lambda: (losses * mask).sum(1) / mask.sum(1).clamp(min=1)},
        }

    return Case(
        "es_step (token losses + mask)", f"B={B} T={T}", B * T, "float32", B * T * 5, B * T * 10, B * T * 40,
        ("masked mean (torch)",), build,
    )  # fmt: skip


def losses_case(B):
    def build(dev):
        losses = torch.rand(B, device=dev)
        ids = torch.randperm(4 * B, device=dev)[:B]
        st = harness.state_for(4 * B, dev)
        return {
            "mine": lambda: OPS.es_step_from_losses(losses, ids, st.tensor, st.errors, B // 4, *BETAS, "sample", 0, 1),
            "ref": lambda: R.es_step_from_losses(losses, ids, st.tensor, st.errors, B // 4, *BETAS, "sample", 0, 1),
            "baselines": {},
        }

    return Case("es_step (losses)", f"B={B} b={B // 4}", B, "float32", B * 20, B * 64, B * 128, (), build)


def select_case(B, mode):
    b = B // 4
    name = {"sample": "torch.multinomial", "topk": "torch.topk"}[mode]

    def build(dev):
        w = torch.rand(B, device=dev) * 3 + 1e-3
        base = (lambda: torch.multinomial(w, b)) if mode == "sample" else (lambda: torch.topk(w, b))
        return {
            "mine": lambda: OPS.weighted_select(w, b, mode, 0, 1),
            "ref": lambda: R.weighted_select(w, b, mode, 0, 1),
            "baselines": {name: base},
        }

    return Case(f"weighted_select ({mode})", f"B={B} b={b}", B, "float32", B * 4, B * 32, B * 64, (name,), build)


def seq_case(B, T, V, dtype=torch.bfloat16):
    es = torch.finfo(dtype).bits // 8

    def build(dev):
        logits = torch.randn(B, T, V, device=dev).to(dtype)
        targets = torch.randint(0, V, (B, T), device=dev)
        return {
            "mine": lambda: OPS.per_sample_cross_entropy(logits, targets, -100, 0.0),
            "ref": lambda: R.per_sample_cross_entropy(logits, targets),
            "baselines": _ce_baselines(
                logits.view(-1, V), targets.view(-1), lambda v: v.view(B, T).float().mean(dim=1)
            ),
        }

    n = B * T * V
    return Case(
        "per_sample_cross_entropy (sequence mean)",
        f"B={B} T={T} V={V}",
        n,
        str(dtype)[6:],
        n * es + B * T * 8,
        n * es * 3 + B * T * 16,
        n * (es * 3 + 12),
        _base_names(),
        build,
    )


def prune_case(n):
    def build(dev):
        st = harness.state_for(n, dev)
        return {
            "mine": lambda: OPS.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True),
            "ref": lambda: R.eswp_prune(st.tensor, 0.5, 0, 1, 10, 0.125, True),
            "baselines": {},
        }

    # ours: state 8 + order 8 + scale 4 + the drop bitmask over the visit domain (< 2N bits) + counts, bytes a
    # sample; the reference: int64 temporaries of Philox over N and of the permutation over the domain (< 2N)
    return Case("eswp_prune", f"N={n:.0e}", n, "float32", n * 8, n * 21, n * 200, (), build)


def plan(quick: bool = False) -> list[Case]:
    """The cases, issue 13's first (see the module docstring)."""
    if quick:
        return [
            step_case(4096, 1000),
            select_case(65536, "sample"),
            select_case(65536, "topk"),
            seq_case(8, 256, 1024),
            token_means_case(8, 256),
            ce_case(256, 1000),
            prune_case(10**6),
        ]
    return [
        # issue 13
        step_case(4096, 32000),
        ce_case(4096, 32000),
        select_case(65536, "sample"),
        select_case(65536, "topk"),
        select_case(10**6, "sample"),
        select_case(10**6, "topk"),
        seq_case(64, 2048, SEQ_V),
        token_means_case(64, 2048),
        prune_case(10**8),
        prune_case(10**9),
        # the rest of the sweep
        step_case(256, 32000),
        step_case(4096, 1000),
        step_case(65536, 1000),
        step_case(16384, 32000),
        losses_case(4096),
        losses_case(65536),
        select_case(4096, "sample"),
        select_case(4096, "topk"),
        prune_case(10**5),
        prune_case(10**6),
        prune_case(10**7),
    ]


def print_plan(cases: list[Case]) -> None:
    rows = [
        {
            "op": c.op,
            "size": c.size,
            "dtype": c.dtype,
            "read_MB": c.bytes_read / 1e6,
            "mine_GB": c.mem_mine / GB,
            "ref_GB": c.mem_ref / GB if c.mem_ref else None,
            "baselines": ", ".join(c.baselines),
        }
        for c in cases
    ]
    print(
        harness.format_table(
            rows,
            [
                ("op", "op"),
                ("size", "size"),
                ("dtype", "dtype"),
                ("read_MB", "MB read once"),
                ("mine_GB", "GB needed (ours, est.)"),
                ("ref_GB", "GB needed (reference, est.)"),
                ("baselines", "baselines"),
            ],
        )
    )


class Timer:
    """do_bench within a total budget of seconds: ``rep_ms`` of repeats per
    measurement while the budget lasts, 20 ms once under a quarter is left."""

    def __init__(self, budget_s: float, rep_ms: float, device: str = "cuda"):
        self.t0, self.budget_s, self.rep_ms, self.device = time.monotonic(), budget_s, rep_ms, device

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def __call__(self, fn) -> dict:
        if self.device == "cpu":  # --device cpu: a smoke test of this script, not a measurement
            return harness.bench_cpu(fn, budget_s=0.05)
        import triton.testing

        rep = self.rep_ms if self.left() > self.budget_s / 4 else 20
        load0 = harness.load_average()
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=10, rep=rep)
        return {
            "median_ms": med,
            "p20_ms": p20,
            "p80_ms": p80,
            "repeats": None,
            "load_start": load0,
            "load_end": harness.load_average(),
        }


def copy_bandwidth(timer, device="cuda") -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus bytes written."""
    x = torch.empty(2**28 if device == "cuda" else 2**22, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    t = timer(lambda: y.copy_(x))["median_ms"]
    return 2 * x.numel() * 4 / (t * 1e-3) / 1e9


def run_case(c: Case, timer: Timer, bw: float, notes: list[str], device: str = "cuda") -> dict | None:
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 16 * GB
    if c.mem_mine > 0.9 * free:
        notes.append(f"skip {c.op} {c.size}: needs ~{c.mem_mine / GB:.0f} GB, {free / GB:.0f} GB free")
        return None
    if timer.left() <= 0:
        notes.append(f"skip {c.op} {c.size}: time budget spent")
        return None
    fns = c.build(device)
    mine = timer(fns["mine"])
    mem = harness.peak_memory(fns["mine"], device=device)
    ref = None
    if fns["ref"] is not None and c.mem_ref is not None and c.mem_ref <= 0.9 * free:
        ref = timer(fns["ref"])
    elif fns["ref"] is not None:
        notes.append(f"{c.op} {c.size}: reference not timed (needs ~{c.mem_ref / GB:.0f} GB)")
    bases = {name: timer(fn) for name, fn in fns["baselines"].items()}
    del fns
    if device == "cuda":
        torch.cuda.empty_cache()
    backend = "triton" if device == "cuda" else "cpp"
    r = harness.make_row(c.op, c.size, c.n, c.dtype, backend, mine, ref, bases, mem, c.bytes_read, bw)
    r.update(us=r["median_ms"] * 1e3, ref_us=ref["median_ms"] * 1e3 if ref else None)
    return r


COLUMNS = harness.table_columns(
    "us ref_us x_ref baseline x_baseline baseline2 x_baseline2 GBps x_read_once",
    us="Triton µs (median)",
    ref_us="reference µs",
)


# Llama 3.2 1B's shape and the narrow 2-layer copy of llama_1b_case(quick=True):
# vocabulary, hidden size, intermediate size, layers, attention heads, key-value heads
LLAMA_SHAPES = {"1b": (128256, 2048, 8192, 16, 32, 8), "quick": (1000, 64, 128, 2, 4, 2)}


def llama_1b_case(device: str, quick: bool = False):
    """(model, inputs, targets, estimate_cost options): a Llama-style LM of
    about 1.2B parameters (Llama 3.2 1B's shape, random weights, no download),
    bf16, scored from the hidden states; ``quick``: a 2-layer, narrow copy to
    test the path on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from es_kernels import per_sample_losses_from_hidden

    vocab, hidden, inter, layers, heads, kv_heads = LLAMA_SHAPES["quick" if quick else "1b"]
    conf = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    B, T = (4, 32) if quick else (8, 2048)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(conf).to(device=device, dtype=dtype)
    x = torch.randint(0, conf.vocab_size, (B, T), device=device)

    def forward(m, ids):
        return m(input_ids=ids, use_cache=False).logits

    def loss_fn(logits, y):  # the training loss: token mean per sequence, shifted
        tok = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), reduction="none")
        return tok.view(y.shape[0], -1).mean(1)

    def score(m, ids, y):
        h = m.model(input_ids=ids, use_cache=False).last_hidden_state
        return per_sample_losses_from_hidden(h, m.lm_head.weight, y, shift_labels=True)

    return model, x, x, dict(forward=forward, loss_fn=loss_fn, score=score)


def step_costs(device: str, out: str, quick: bool = False) -> list[dict]:
    """Time a scoring step against a training step (see the module docstring)."""
    import json

    from es_kernels.estimate import SCHEDULES, _demo_case, estimate_cost

    dev = torch.device(device)
    cases = [
        ("demo MLP (mnist1d)", "mnist1d", 512, 171, {}),
        ("demo GPT-2 (lm)", "lm", 64, 16, {}),
        ("Llama-style 1.2B, bf16, hidden-state scoring", "llama", 8, 3, {}),
    ]
    if quick:
        cases = [("demo MLP (mnist1d)", "mnist1d", 64, 21, {"hidden": 64}), ("Llama-style (tiny)", "llama", 4, 2, {})]
    rows = []
    for name, task, B, b, kw in cases:
        if task == "llama":
            model, x, y, extra = llama_1b_case(device, quick)
        else:
            model, x, y, extra = _demo_case(task, B, dev, kw.get("hidden", 1024))
        try:
            est = estimate_cost(model, x, y, b, repeats=3 if quick else 7, **extra)
        except torch.OutOfMemoryError:
            print(f"{name}: out of memory, skipped", flush=True)
            continue
        row = {"model": name, **est._asdict(), "uniform": est.uniform_cost, "score_ratio": est.score_ratio}
        row["schedules"] = {n: est.step_cost(f) for n, f in SCHEDULES}
        rows.append(row)
        print(f"== {name}\n{est.report()}\n", flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    path = Path(out) / f"gpu_step_costs_{time.strftime('%Y-%m-%d')}{'_quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": harness.machine_info(), "device": device, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(harness.RESULTS))
    ap.add_argument("--history", default=None, help="history CSV to append to (default <out>/history.csv)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan of shapes and exit (no CUDA)")
    ap.add_argument("--quick", action="store_true", help="a few small cases")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=180.0,
        help="seconds of timing in all (default 180: the GPU check's 8 minutes include the build "
        "and the tests); cases left when it is spent are skipped",
    )
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's repetition time per measurement")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: run the whole script on the CPU with wall-clock timing, to test it (not a benchmark)",
    )
    ap.add_argument(
        "--step-costs",
        action="store_true",
        help="time a scoring step against a training step on the demo's models and a 1.2B LM, then exit",
    )
    args = ap.parse_args(argv)
    if args.step_costs:
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("bench_gpu.py --step-costs needs CUDA (or --device cpu --quick to test the script)")
        return step_costs(args.device, args.out, args.quick)
    cases = plan(args.quick)
    if args.dry_run:
        print_plan(cases)
        return cases
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs CUDA (use --dry-run to see the plan, --device cpu to test the script)")
    torch.manual_seed(0)
    timer = Timer(args.budget_s, args.rep_ms, args.device)
    bw = copy_bandwidth(timer, args.device)
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    rows, notes = [], []
    for c in cases:
        try:
            r = run_case(c, timer, bw, notes, args.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            notes.append(f"skip {c.op} {c.size}: out of memory")
            r = None
        if r is not None:
            rows.append(r)
            print(
                f"{c.op} {c.size}: {r['us']:.1f} µs, x read-once {r.get('x_read_once', float('nan')):.2f}", flush=True
            )
        elif notes:
            print(notes[-1], flush=True)
    info = harness.machine_info()
    info["copy_GBps"] = bw
    table = harness.format_table(rows, COLUMNS)
    header = f"{harness.header_line(info)}, copy {bw:.0f} GB/s"
    paths = harness.write_results(
        "gpu_ops" if args.device == "cuda" else "gpu_ops_on_cpu",
        rows,
        info,
        out=args.out,
        history=args.history,
        quick=args.quick,
        extra={"notes": notes},
    )
    paths["json"].with_suffix(".md").write_text(f"{header}\n\n{table}\n" + "".join(f"\n- {n}" for n in notes) + "\n")
    print(f"\n{header}\n\n{table}")
    for n in notes:
        print(f"note: {n}")
    print(f"\nwrote {paths['json']} (and .md)\nappended {len(rows)} lines to {paths['history']}")
    return rows


if __name__ == "__main__":
    main()
