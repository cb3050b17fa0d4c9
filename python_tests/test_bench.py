"""The benchmark machinery (bench/): the CPU bench writes its JSON file and
appends to the history, the GPU bench plans its shapes without CUDA, the
noise check, the history writer and the plot. Tiny sizes: a few seconds."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _history(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_ops_writes_json_and_history(tmp_path, capsys):
    bench_ops = _load("bench_ops")
    paths = bench_ops.main(
        ["--step", "32x10", "--select", "64", "--prune", "1000", "--budget-s", "0.01", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "| op |" in out and "{'op'" not in out  # the table, no raw dicts
    data = json.loads(paths["json"].read_text())
    assert paths["json"].parent == tmp_path and paths["json"].name.startswith("cpu_ops_quick_")
    for key in ("date", "version", "commit", "dirty", "cpu", "cores", "torch", "cuda_device", "run_id"):
        assert key in data["machine"]
    ops = [r["op"] for r in data["rows"]]
    assert ops == ["es_step (logits)", "weighted_select (sample)", "weighted_select (topk)", "eswp_prune"]
    for r in data["rows"]:
        for key in ("median_ms", "p20_ms", "p80_ms", "ref_ms", "x_ref", "peak_mem_mb", "mem_method", "noisy", "n"):
            assert key in r, key
        assert "samples" not in r
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    lines = _history(tmp_path / "history.csv")
    assert len(lines) == 4
    import es_kernels

    for line in lines:
        assert line["bench"] == "cpu_ops" and line["quick"] == "1"
        assert line["version"] == es_kernels.__version__
        assert line["commit"] and line["cpu"] and line["torch"] and line["date"]
        assert float(line["median_ms"]) > 0 and line["peak_mem_mb"] != "" and line["noisy"] in ("True", "False")
    # a second run appends (and the dated JSON file gets a new name)
    paths2 = bench_ops.main(["--select", "64", "--budget-s", "0.01", "--out", str(tmp_path)])
    assert paths2["json"] != paths["json"]
    assert len(_history(tmp_path / "history.csv")) == 6

    plot = _load("plot")
    (png,) = plot.main(["--history", str(tmp_path / "history.csv"), "--out", str(tmp_path)])
    assert png.name == "cpu_ops.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_gpu_dry_run_plans_issue_13_shapes(capsys):
    bench_gpu = _load("bench_gpu")
    cases = bench_gpu.main(["--dry-run"])
    sizes = {(c.op, c.size, c.dtype) for c in cases}
    assert ("es_step (logits)", "B=4096 C=32000", "bfloat16") in sizes
    assert ("weighted_select (sample)", "B=65536 b=16384", "float32") in sizes
    assert ("weighted_select (topk)", "B=1000000 b=250000", "float32") in sizes
    assert ("per_sample_cross_entropy (sequence mean)", f"B=64 T=2048 V={bench_gpu.SEQ_V}", "bfloat16") in sizes
    assert ("eswp_prune", "N=1e+09", "float32") in sizes
    assert ("per_sample_cross_entropy", "B=4096 C=32000", "bfloat16") in sizes
    assert ("es_step (token losses + mask)", "B=64 T=2048", "float32") in sizes
    big = next(c for c in cases if c.size == "N=1e+09")
    assert big.mem_mine > 8e9 and big.bytes_read == 8 * 10**9
    assert "MB read once" in capsys.readouterr().out


def test_noise_check():
    harness = _load("harness")
    quiet = harness.quantiles([5.1, 5.3, 5.2, 6.1, 5.7])
    assert harness.noise_check(quiet, cores=2) == []
    sliced = harness.quantiles([8.01, 7.98, 8.05, 16.1, 5.3, 8.0])
    assert "slices" in harness.noise_check(sliced, cores=2)[0]
    loaded = dict(quiet, load_start=5.0, load_end=1.0)
    assert "load" in harness.noise_check(loaded, cores=2)[0]


def test_history_header_migration(tmp_path):
    harness = _load("harness")
    path = tmp_path / "history.csv"
    path.write_text("run_id,op,old_column\n1,x,kept\n")
    harness.append_history([{"run_id": "2", "op": "y", "median_ms": 1.5}], path)
    lines = _history(path)
    assert [r["run_id"] for r in lines] == ["1", "2"]
    assert lines[0]["old_column"] == "kept" and lines[1]["median_ms"] == "1.5"


def test_peak_memory_cpu():
    torch = pytest.importorskip("torch")
    harness = _load("harness")
    m = harness.peak_memory(lambda: torch.ones(64 * 2**20 // 4))  # 64 MiB, touched
    assert m["mem_method"] in ("vmhwm", "ru_maxrss")
    if m["mem_method"] == "vmhwm":
        assert 60 <= m["peak_mem_mb"] <= 200


def test_bench_gpu_cases_build_and_run_on_cpu():
    """The GPU bench's input builders and callables, at tiny sizes on the CPU."""
    bench_gpu = _load("bench_gpu")
    cases = [
        bench_gpu.step_case(64, 100),
        bench_gpu.losses_case(64),
        bench_gpu.select_case(256, "sample"),
        bench_gpu.select_case(256, "topk"),
        bench_gpu.seq_case(2, 16, 50),
        bench_gpu.prune_case(1000),
        bench_gpu.ce_case(8, 30),
        bench_gpu.token_means_case(4, 9),
    ]
    for c in cases:
        fns = c.build("cpu")
        for fn in [fns["mine"], fns["ref"], *fns["baselines"].values()]:
            fn()
    seq = cases[4].build("cpu")
    mine, ref, base = seq["mine"](), seq["ref"](), seq["baselines"]["F.cross_entropy"]()
    assert mine.shape == ref.shape == base.shape == (2,)
    import torch  # (not torch.testing: its import takes seconds)

    assert torch.allclose(mine, ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(base, ref, rtol=2e-2, atol=2e-2)  # F.cross_entropy on bf16 returns bf16


def test_bench_gpu_step_costs_run_on_cpu(tmp_path):
    """--step-costs (a scoring step against a training step) runs end to end on a CPU, quick."""
    bench_gpu = _load("bench_gpu")
    rows = bench_gpu.main(["--step-costs", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert [r["model"] for r in rows] == ["demo MLP (mnist1d)", "Llama-style (tiny)"]
    for r in rows:
        assert r["train_full"] > 0 and r["score"] > 0 and set(r["schedules"]) >= {"every step", "every 3rd epoch"}
    assert list(tmp_path.glob("gpu_step_costs_*_quick.json"))


def test_bench_rank_select_runs_and_agrees(tmp_path, capsys):
    """bench/bench_rank_select.py: both constructions pick the same positions (it raises otherwise)."""
    mod = _load("bench_rank_select")
    assert mod.main(["--world", "3", "--cap", "64", "--mini", "9", "--steps", "3", "--warmup", "1", "--eps", "0.2",
                     "--json", str(tmp_path / "r.json")]) == 0  # fmt: skip
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["world"] == 3 and data["offset_rank2_ms"] > 0
    assert "| offset |" in capsys.readouterr().out


def test_bench_sharded_plan_runs_and_agrees(capsys):
    """bench/bench_sharded.py --plan: the sharded plan equals its earlier form (it exits 1 otherwise)."""
    mod = _load("bench_sharded")
    threads = torch.get_num_threads()
    try:
        mod.main(["--plan", "--num-samples", "5000", "--rounds", "1"])
    finally:
        torch.set_num_threads(threads)
    assert "plans bit-identical (kept ids in order, scales): True" in capsys.readouterr().out
