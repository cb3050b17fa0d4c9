"""Shared fixtures: the backends under test, random inputs, hypothesis profile.

Each backend exposes the six ops with the schema's positional signature (see
csrc/register.cpp). Every op test runs on every backend present here and
compares against es_kernels.reference.
"""
from __future__ import annotations

import os
import types

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import es_kernels  # noqa: E402
from es_kernels import reference as R  # noqa: E402

try:
    from es_kernels._triton import ops as triton_ops
except ImportError:  # Triton not installed: the C++ backend alone is tested
    triton_ops = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

OP_NAMES = ("per_sample_cross_entropy", "es_update", "weighted_select", "es_step_losses",
            "es_step", "eswp_prune")


def _torch_ops_backend():
    return types.SimpleNamespace(name="cpp", device="cpu", state_dtypes=(torch.float32, torch.float64),
                                 **{n: getattr(torch.ops.es_kernels, n) for n in OP_NAMES})


def _on_device(fn, device):
    """Run an op on ``device`` for tests written with CPU tensors: inputs are
    copied there, in-place arguments copied back, outputs returned on the CPU."""
    if device == "cpu":
        return fn

    def call(*args):
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*moved)
        for a, m in zip(args, moved):  # the state the op mutated (inputs copy back unchanged)
            if isinstance(a, torch.Tensor):
                a.copy_(m.cpu())
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    return call


def _triton_backend():
    ops = {n: _on_device(f, DEVICE) for n, f in triton_ops.OPS.items()}
    return types.SimpleNamespace(name="triton", device=DEVICE, state_dtypes=(torch.float32,), **ops)


BACKENDS = {"cpp": _torch_ops_backend}
if triton_ops is not None:
    BACKENDS["triton"] = _triton_backend


@pytest.fixture(params=sorted(BACKENDS), scope="session")
def backend(request):
    return BACKENDS[request.param]()


def new_state(n, dtype=torch.float32, observed=0.5, seed=0):
    """An ESState-like triple (s, d, errors) with a fraction of observed samples."""
    g = torch.Generator().manual_seed(seed)
    s = torch.full((n,), float("nan"), dtype=dtype)
    seen = torch.rand(n, generator=g) < observed
    s[seen] = (torch.rand(int(seen.sum()), generator=g) * 4).to(dtype)
    d = torch.zeros(n, dtype=dtype)
    d[seen] = (torch.randn(int(seen.sum()), generator=g) * 0.3).to(dtype)
    return s, d, torch.zeros(2, dtype=torch.int64)


def clone3(t):
    return tuple(x.clone() for x in t)


def assert_state_equal(a, b):
    """Bit-exact equality of (s, d, errors), NaN == NaN."""
    for x, y, name in zip(a, b, ("s", "d", "errors")):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(x, y), name


@pytest.fixture
def reference():
    return R


@pytest.fixture
def api():
    return es_kernels
