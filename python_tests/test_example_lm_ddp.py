"""examples/train_lm_ddp.py runs under torchrun (2 gloo processes, --tiny: a tiny
GPT-2 on synthetic documents, packed rows, hidden-state scoring, ESWP) and
resumes from a checkpoint in the middle of a pruned epoch to the same model
and ES state, bit for bit."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_lm_ddp.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
    ),
    pytest.mark.skipif(
        not all(importlib.util.find_spec(m) for m in ("transformers", "accelerate", "safetensors")),
        reason="transformers / accelerate not installed (pip install -e '.[integrations]')",
    ),
]

# 32 documents, 4 a meta-batch on each of 2 ranks: 4 steps a loader epoch; ESWP prunes from epoch 1
ARGS = ["--tiny", "--max-steps", "10", "--save-steps", "5", "--prune-ratio", "0.5", "--eswp-epochs", "6"]


def torchrun(out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT)]
    run = subprocess.run([*cmd, *ARGS, "--output-dir", str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)), where
    else:
        assert a == b, where


def test_example_runs_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    log = torchrun(full)  # 10 steps, checkpoints at 5 and 10
    assert log.count("'loss':") == 10 and "resuming" not in log
    shutil.copytree(full / "checkpoint-5", resumed / "checkpoint-5")
    log = torchrun(resumed)  # the same command: resumes from the last checkpoint, 5, to 10
    assert f"resuming from {resumed / 'checkpoint-5'}" in log and log.count("'loss':") == 5
    es_full = torch.load(full / "checkpoint-10" / "es_sampler.pt", weights_only=False)
    es_resumed = torch.load(resumed / "checkpoint-10" / "es_sampler.pt", weights_only=False)
    same(es_full, es_resumed)
    assert es_full["es"]["step"] == 10 and not bool(es_full["es"]["state"]["s"].isnan().all())
    assert bool((es_full["es"]["scale"] != 1).any())  # in a pruned ESWP epoch
    p_full, p_resumed = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    same(p_full, p_resumed)
