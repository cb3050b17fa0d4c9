"""The fused step (docs/spec.md section 6) on every backend."""

import math
from fractions import Fraction

import pytest
import torch
from conftest import assert_state_equal, clone_all, new_state
from hypothesis import given
from hypothesis import strategies as st

from es_kernels import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@given(
    batch=st.integers(0, 64),
    c=st.integers(1, 200),
    n_extra=st.integers(0, 100),
    dtype=st.sampled_from(DTYPES),
    mode=st.sampled_from(["sample", "topk"]),
    frac=st.floats(0, 1),
    seq=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_step_from_logits(backend, batch, c, n_extra, dtype, mode, frac, seq, seed):
    g = torch.Generator().manual_seed(seed)
    n = batch + n_extra
    shape = (batch, 5, c) if seq else (batch, c)
    logits = (torch.randn(shape, generator=g) * 2).to(dtype)
    targets = torch.randint(0, c, shape[:-1], generator=g)
    targets[torch.rand(shape[:-1], generator=g) < 0.2] = -100
    ids = torch.randperm(n, generator=g)[:batch]
    b = int(frac * batch)
    state = new_state(n, seed=seed)
    mine, ref = clone_all(state), clone_all(state)
    pos, losses, w = backend.es_step(
        logits, targets, ids, *mine, b, 0.3, 0.7, mode, seed, 17, ignore_index=-100, label_smoothing=0.0, w_min=1e-8
    )
    r_pos, r_losses, r_w = R.es_step(logits, targets, ids, *ref, b, 0.3, 0.7, mode, seed, 17)
    torch.testing.assert_close(losses, r_losses, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(w, r_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine[0], ref[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(mine[1], ref[1])
    # the selection is exact given the weights the kernel computed
    assert torch.equal(pos, R.weighted_select(w, b, mode, seed, 17))


@given(
    batch=st.integers(0, 200),
    n_extra=st.integers(0, 50),
    mode=st.sampled_from(["sample", "topk"]),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    step=st.integers(0, 2**33),
    lam=st.sampled_from([0.0, 1.0, 2.5]),
    eps=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_step_from_losses_exact(backend, batch, n_extra, mode, frac, seed, step, lam, eps):
    eps = eps if mode == "sample" else 0.0
    g = torch.Generator().manual_seed(seed)
    n = batch + n_extra
    ids = torch.randperm(n, generator=g)[:batch]
    losses = torch.rand(batch, generator=g) * 3
    b = int(frac * batch)
    state = new_state(n, seed=seed)
    mine, ref = clone_all(state), clone_all(state)
    pos, out_losses, w = backend.es_step_from_losses(
        losses, ids, *mine, b, 0.2, 0.9, mode, seed, step, lam=lam, eps=eps
    )
    r = R.es_step_from_losses(losses, ids, *ref, b, 0.2, 0.9, mode, seed, step, lam=lam, eps=eps)
    assert torch.equal(pos, r[0]) and torch.equal(out_losses, r[1])
    torch.testing.assert_close(w, r[2], rtol=0, atol=0)
    assert_state_equal(mine, ref)


def test_losses_output_does_not_alias_input(backend):
    losses = torch.rand(8)
    st, e = new_state(8)
    _, out, _ = backend.es_step_from_losses(losses, torch.arange(8), st, e, 4, 0.2, 0.9, "sample", 0, 0)
    assert out.data_ptr() != losses.data_ptr()


def test_repeated_steps_track_reference(backend):
    """Several epochs over a small dataset: the state stays bit-exact."""
    n, batch, b = 64, 16, 4
    state, ref = new_state(n, observed=0.0), new_state(n, observed=0.0)
    g = torch.Generator().manual_seed(9)
    step = 0
    for epoch in range(5):
        perm = torch.randperm(n, generator=g)
        for k in range(0, n, batch):
            ids = perm[k : k + batch]
            losses = torch.rand(batch, generator=g) / (epoch + 1)
            p1 = backend.es_step_from_losses(losses, ids, *state, b, 0.2, 0.9, "sample", 3, step)[0]
            p2 = R.es_step_from_losses(losses, ids, *ref, b, 0.2, 0.9, "sample", 3, step)[0]
            assert torch.equal(p1, p2)
            step += 1
    assert_state_equal(state, ref)
    assert not torch.isnan(state[0]).any()


def test_device_step_counter_equals_host_ints(backend):
    """A 0-d int64 step tensor, advanced by the op, gives the positions of
    host ints step = 5, 6, 7, ...; a seed tensor equals the host seed."""
    n, batch, b = 50, 20, 6
    host, dev = new_state(n, seed=1), new_state(n, seed=1)
    step_t, seed_t = torch.tensor(5), torch.tensor(2**40 + 3)
    g = torch.Generator().manual_seed(2)
    for k in range(4):
        ids = torch.randperm(n, generator=g)[:batch]
        losses = torch.rand(batch, generator=g)
        want = backend.es_step_from_losses(losses, ids, *host, b, 0.2, 0.5, "sample", 2**40 + 3, 5 + k, eps=0.2)[0]
        got = backend.es_step_from_losses(
            losses, ids, *dev, b, 0.2, 0.5, "sample", 0, 0, seed_t, step_t, True, eps=0.2
        )[0]
        assert torch.equal(got, want)
        assert int(step_t) == 6 + k and int(seed_t) == 2**40 + 3
    assert_state_equal(dev, host)
    # an empty meta-batch still counts as a call
    backend.es_step_from_losses(
        torch.empty(0), torch.empty(0, dtype=torch.long), *dev, 0, 0.2, 0.5, "sample", 0, 0, None, step_t, True
    )
    assert int(step_t) == 10


def test_step_tensor_without_advance_is_read_only(backend):
    st, e = new_state(30, seed=3)
    step_t = torch.tensor(9)
    w = torch.rand(30)
    got = backend.weighted_select(w, 7, "sample", 4, 0, None, step_t)
    assert torch.equal(got, backend.weighted_select(w, 7, "sample", 4, 9)) and int(step_t) == 9
    backend.es_step_from_losses(w, torch.arange(30), st, e, 7, 0.2, 0.5, "sample", 4, 0, None, step_t, False)
    assert int(step_t) == 9


@given(
    batch=st.integers(0, 40),
    T=st.integers(0, 9),
    n_extra=st.integers(0, 30),
    frac=st.floats(0, 1),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["sample", "topk"]),
)
def test_token_losses_with_mask_exact(backend, batch, T, n_extra, frac, masked, seed, mode):
    """[B, T] token losses: per-row means inside the op (the fixed-point mean
    of spec section 6), a row with no token skipped; bit-exact with the
    reference."""
    g = torch.Generator().manual_seed(seed)
    n = batch + n_extra
    ids = torch.randperm(n, generator=g)[:batch]
    losses = torch.rand(batch, T, generator=g) * 3
    mask = torch.rand(batch, T, generator=g) < 0.6 if masked else None
    if masked and batch > 0:
        mask[0] = False  # a row with nothing to score
        losses[~mask] = float("nan")  # never read where masked out
    b = int(frac * batch)
    state = new_state(n, seed=seed)
    mine, ref = clone_all(state), clone_all(state)
    got = backend.es_step_from_losses(losses, ids, *mine, b, 0.2, 0.9, mode, seed, 3, mask=mask)
    want = R.es_step_from_losses(losses, ids, *ref, b, 0.2, 0.9, mode, seed, 3, mask=mask)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert_state_equal(mine, ref)
    if masked and batch > 0:
        assert got[1][0].item() == 0.0 and got[2][0].item() == 0.0  # skipped: loss 0, weight 0
        assert torch.equal(mine[0][ids[0]].nan_to_num(-1), state[0][ids[0]].nan_to_num(-1))


def _hard_token_losses(g, B, T, dtype):
    """Magnitudes from 1e-30 to 1e30 and both signs in one row: where a float
    sum's order would show."""
    mag = 10.0 ** (torch.randint(-30, 31, (B, T), generator=g).double())
    sign = torch.where(torch.rand(B, T, generator=g) < 0.3, -1.0, 1.0)
    return (torch.rand(B, T, generator=g, dtype=torch.float64) * mag * sign).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sequence_means_do_not_depend_on_token_order(backend, dtype):
    """The fixed-point mean is order-independent: permuting each row's tokens
    (and its mask) gives the same bits, equal to the reference's."""
    g = torch.Generator().manual_seed(5)
    B, T = 6, 37
    losses = _hard_token_losses(g, B, T, dtype)
    mask = torch.rand(B, T, generator=g) < 0.8
    perm = torch.randperm(T, generator=g)
    out = []
    for lo, ma in ((losses, mask), (losses[:, perm], mask[:, perm])):
        state = new_state(B, seed=1)
        out.append(backend.es_step_from_losses(lo, torch.arange(B), *state, 0, 0.2, 0.9, "topk", mask=ma)[1])
    want = R.sequence_means(losses, mask)[0]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], want)


def test_sequence_means_non_finite_tokens(backend):
    """NaN, or +inf with -inf, gives NaN; +inf alone +inf; -inf alone -inf;
    masked-out non-finite tokens are not read; all zero gives 0."""
    inf, nan = math.inf, math.nan
    losses = torch.tensor(
        [[1.0, nan, 2.0], [1.0, inf, -inf], [inf, 3.0, 1.0], [-inf, 3.0, 1.0], [0.0, 0.0, 0.0], [nan, inf, 4.0]]
    )
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[5, :2] = False
    state = new_state(6, seed=1)
    got = backend.es_step_from_losses(losses, torch.arange(6), *state, 0, 0.2, 0.9, "topk", mask=mask)[1]
    want = torch.tensor([nan, nan, inf, -inf, 0.0, 4.0])
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])
    assert torch.equal(got.nan_to_num(7.0), R.sequence_means(losses, mask)[0].nan_to_num(7.0))


def test_reference_sequence_mean_within_its_bound():
    """The reference's fixed-point mean against the exact rational mean of the
    float32 values: within 2**(e - K) before rounding (spec section 6), plus
    the float32 rounding of the result."""
    g = torch.Generator().manual_seed(9)
    for T in (1, 7, 300):
        losses = _hard_token_losses(g, 20, T, torch.float32)
        got = R.sequence_means(losses, None)[0]
        K = 62 - T.bit_length()
        for r in range(20):
            xs = [Fraction(float(v)) for v in losses[r]]
            exact = sum(xs) / T
            e = math.frexp(max(abs(float(v)) for v in losses[r]))[1]
            bound = Fraction(2) ** (e - K) + abs(exact) * Fraction(2) ** -23
            assert abs(Fraction(float(got[r])) - exact) <= bound + Fraction(2) ** -149, (T, r)


def test_rows_without_targets_are_skipped(backend):
    """es_step: a sequence (or a [B, C] row) with no target to score leaves its
    state untouched, counts nothing and gets weight 0 (not w_min forever)."""
    logits = torch.randn(4, 3, 5)
    targets = torch.randint(0, 5, (4, 3))
    targets[1] = -100
    ids = torch.tensor([0, 1, 2, 3])
    st, e = new_state(4, observed=1.0, seed=2)
    before = st.clone()
    _, losses, w = backend.es_step(logits, targets, ids, st, e, 4, 0.2, 0.9, "sample", 0, 0)
    assert losses[1].item() == 0.0 and w[1].item() == 0.0 and e.tolist() == [0, 0]
    assert torch.equal(st[1], before[1]) and not torch.equal(st[0], before[0])
    flat_targets = targets[:, 0].clone()
    flat_targets[2] = -100
    _, losses, w = backend.es_step(logits[:, 0], flat_targets, ids, st, e, 2, 0.2, 0.9, "topk", 0, 0)
    assert w[2].item() == 0.0 and e.tolist() == [0, 0]
