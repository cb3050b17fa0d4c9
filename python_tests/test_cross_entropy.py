"""Per-sample cross-entropy (ES_SPEC section 5) on every backend."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from es_kernels import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = dict(rtol=2e-5, atol=2e-5)  # both sides upcast the same inputs to float32


def make(shape, dtype, seed, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_frac:
        targets[torch.rand(shape[:-1], generator=g) < ignore_frac] = ignore_index
    return logits, targets


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 1000), (5, 4099), (3, 2048 * 2 + 17)])
def test_2d_matches_torch(backend, dtype, shape):
    logits, targets = make(shape, dtype, seed=shape[0] * 7 + shape[1])
    got = backend.per_sample_cross_entropy(logits, targets, -100, 0.0)
    want = F.cross_entropy(logits.float(), targets, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got, R.per_sample_cross_entropy(logits, targets), **TOL)


@given(
    b=st.integers(1, 40),
    c=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    ignore=st.sampled_from([-100, 0, 5]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_2d_random(backend, b, c, dtype, smoothing, ignore, scale, seed):
    logits, targets = make((b, c), dtype, seed, scale, ignore_frac=0.3, ignore_index=ignore)
    got = backend.per_sample_cross_entropy(logits, targets, ignore, smoothing)
    want = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=ignore, label_smoothing=smoothing)
    torch.testing.assert_close(got, want, rtol=3e-5, atol=3e-5 * scale)


@given(
    b=st.integers(1, 6),
    t=st.integers(1, 9),
    v=st.integers(1, 70),
    dtype=st.sampled_from(DTYPES),
    smoothing=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_3d_random(backend, b, t, v, dtype, smoothing, seed):
    logits, targets = make((b, t, v), dtype, seed, ignore_frac=0.4)
    targets[0] = -100  # a fully ignored sequence gives 0
    got = backend.per_sample_cross_entropy(logits, targets, -100, smoothing)
    tok = F.cross_entropy(
        logits.float().reshape(-1, v), targets.reshape(-1), reduction="none", label_smoothing=smoothing
    ).reshape(b, t)
    count = (targets != -100).sum(1)
    want = torch.where(count > 0, tok.sum(1) / count.clamp(min=1), 0.0)
    assert got[0].item() == 0.0
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got, R.per_sample_cross_entropy(logits, targets, -100, smoothing), **TOL)


def test_int32_targets_and_noncontiguous(backend):
    logits, targets = make((20, 50), torch.float32, 3)
    wide = torch.randn(20, 100)
    wide[:, ::2] = logits  # a strided view with the same values
    got = backend.per_sample_cross_entropy(wide[:, ::2], targets.int(), -100, 0.0)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets, reduction="none"), **TOL)
    t_logits = logits.t().contiguous().t()  # column-major
    torch.testing.assert_close(backend.per_sample_cross_entropy(t_logits, targets, -100, 0.0), got, **TOL)


def test_extreme_logits(backend):
    logits = torch.tensor([[1e4, 0.0, -1e4], [-80.0, -90.0, -100.0], [88.0, 88.0, 88.0]])
    targets = torch.tensor([1, 0, 2])
    got = backend.per_sample_cross_entropy(logits, targets, -100, 0.0)
    torch.testing.assert_close(got, F.cross_entropy(logits, targets, reduction="none"), **TOL)


def test_bad_values_give_nan_not_reads(backend):
    logits, targets = make((4, 10), torch.float32, 1)
    targets[1] = 10  # out of range, not ignored
    targets[2] = -7
    logits[3, 4] = float("nan")
    got = backend.per_sample_cross_entropy(logits, targets, -100, 0.0)
    assert torch.isfinite(got[0]) and torch.isnan(got[1:]).all()
    torch.testing.assert_close(got, R.per_sample_cross_entropy(logits, targets), **TOL, equal_nan=True)


def test_empty_batch(backend):
    got = backend.per_sample_cross_entropy(torch.empty(0, 10), torch.empty(0, dtype=torch.long), -100, 0.0)
    assert got.shape == (0,) and got.dtype == torch.float32
