"""State update (docs/spec.md section 3) on every backend, bit-exact against the reference."""

import pytest
import torch
from conftest import assert_state_equal, clone_all, new_state
from hypothesis import assume, given
from hypothesis import strategies as st

from es_kernels import reference as R


def run_both(backend, ids, losses, state, beta1, beta2, w_min=1e-8, lam=1.0):
    mine, ref = clone_all(state), clone_all(state)
    w = backend.es_update(ids, losses, *mine, beta1, beta2, lam, w_min)
    w_ref = R.es_update(ids, losses, *ref, beta1, beta2, lam, w_min)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0, equal_nan=True)
    assert_state_equal(mine, ref)
    return mine, w


@given(
    n=st.integers(1, 300),
    frac=st.floats(0.0, 1.0),
    beta1=st.sampled_from([0.0, 0.2, 0.9, 1.0]),
    beta2=st.sampled_from([0.0, 0.5, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    id_dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=st.integers(0, 2**16),
    lam=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
)
def test_random_against_reference(backend, n, frac, beta1, beta2, dtype, id_dtype, seed, lam):
    assume(dtype in backend.state_dtypes)
    g = torch.Generator().manual_seed(seed)
    state = new_state(n, dtype, observed=0.5, seed=seed)
    k = int(frac * n)
    ids = torch.randperm(n, generator=g)[:k].to(id_dtype)
    losses = torch.rand(k, generator=g) * 5
    run_both(backend, ids, losses, state, beta1, beta2, lam=lam)


def test_first_observation_and_update(backend):
    s = torch.tensor([float("nan"), 2.0, 1.0])
    d = torch.tensor([0.0, 0.5, -0.25])
    state = (torch.stack([s, d], 1), torch.zeros(2, dtype=torch.int64))
    (st1, e1), w = run_both(backend, torch.tensor([0, 1]), torch.tensor([3.0, 1.0]), state, 0.25, 0.5)
    s1, d1 = st1[:, 0], st1[:, 1]
    assert s1[0].item() == 3.0 and d1[0].item() == 0.0 and w[0].item() == 3.0  # first observation
    want_s = 0.25 * 2.0 + 0.75 * 1.0
    want_d = 0.5 * 0.5 + 0.5 * (1.0 - 2.0)
    assert s1[1].item() == pytest.approx(want_s) and d1[1].item() == pytest.approx(want_d)
    assert w[1].item() == pytest.approx(want_s + want_d)
    assert s1[2].item() == 1.0 and d1[2].item() == -0.25  # not in the batch: untouched


def test_special_cases(backend):
    """lam=1 (the paper's s + d): beta2=1: w = s; beta1=0, beta2=1: w = l; beta1=beta2=0: w = 2 l - l_prev."""
    n = 50
    g = torch.Generator().manual_seed(1)
    l_prev, l = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    ids = torch.arange(n)
    for beta1, beta2, want in [(0.3, 1.0, None), (0.0, 1.0, l), (0.0, 0.0, 2 * l - l_prev)]:
        state = new_state(n, observed=0.0)
        backend.es_update(ids, l_prev, *state, beta1, beta2, 1.0)
        w = backend.es_update(ids, l, *state, beta1, beta2, 1.0)
        torch.testing.assert_close(w, (state[0][:, 0] if want is None else want).clamp(min=1e-8))


def test_trend_forecast_settles(backend):
    """On a loss that falls by c per visit, s + d (lam=1) settles at l - c."""
    state = new_state(1, observed=0.0)
    c, loss = 0.01, 5.0
    for _ in range(400):
        w = backend.es_update(torch.tensor([0]), torch.tensor([loss]), *state, 0.7, 0.6, 1.0)
        loss -= c
    assert w.item() == pytest.approx(loss, abs=1e-4)  # loss is now the next visit's: l_last - c


def test_bad_values_are_counted_not_written(backend):
    state = new_state(10, seed=3)
    ids = torch.tensor([0, 11, -1, 3, 4, 5])
    losses = torch.tensor([1.0, 2.0, 3.0, float("nan"), float("inf"), 0.5])
    (st1, errors), w = run_both(backend, ids, losses, state, 0.5, 0.5)
    assert errors.tolist() == [2, 2]
    for i in (3, 4):  # non-finite losses: untouched
        assert torch.equal(st1[i].nan_to_num(-1), state[0][i].nan_to_num(-1))
    assert w[1:5].tolist() == [pytest.approx(1e-8)] * 4


@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_overflow_is_counted_and_not_written(backend, lam):
    """A finite loss whose update would overflow (s, d or w not finite) counts
    as a bad observation and leaves the pair as it was (spec section 3)."""
    st0 = torch.tensor([[-3.0e38, 0.0], [3.0e38, 0.0], [1.0, 0.0], [float("nan"), 0.0]])
    state = (st0, torch.zeros(2, dtype=torch.int64))
    ids = torch.tensor([0, 1, 2, 3])
    losses = torch.tensor([3.0e38, -3.0e38, 2.0, 3.0e38])
    (st1, errors), w = run_both(backend, ids, losses, state, 0.5, 0.0, lam=lam)
    assert torch.equal(st1[:2], st0[:2])  # delta = +-6e38 overflows d: untouched
    assert errors.tolist() == [0, 2]
    assert torch.isfinite(st1[2]).all() and st1[3, 0] == torch.tensor(3.0e38) and torch.isfinite(w).all()


def test_w_min_floor(backend):
    state = new_state(3, observed=0.0)
    _, w = run_both(backend, torch.arange(3), torch.tensor([0.0, -1.0, 2.0]), state, 0.5, 0.5, 1e-3)
    assert w.tolist() == [pytest.approx(1e-3), pytest.approx(1e-3), 2.0]


def test_duplicates_do_not_corrupt(backend):
    st, e = new_state(8, seed=2)
    before = st.clone()
    ids = torch.tensor([1, 1, 1, 2])
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = backend.es_update(ids, losses, st, e, 0.5, 0.5)
    assert w.shape == (4,) and torch.isfinite(w).all()
    others = torch.tensor([0, 3, 4, 5, 6, 7])
    assert torch.equal(st[others].nan_to_num(-1), before[others].nan_to_num(-1))
    assert e.tolist() == [0, 0]
    # the duplicated id holds a pair that one observation produced: from the
    # old state (kernels that update in parallel) or after the ones before it
    # (kernels that update in order), never s from one and d from another
    z = lambda: torch.zeros(2, dtype=torch.int64)  # noqa: E731
    candidates, seq = [], before.clone()
    for k in range(3):
        one = before.clone()
        R.es_update(ids[k : k + 1], losses[k : k + 1], one, z(), 0.5, 0.5)
        R.es_update(ids[k : k + 1], losses[k : k + 1], seq, z(), 0.5, 0.5)
        candidates += [one[1], seq[1].clone()]
    assert any(torch.equal(st[1], c) for c in candidates), (st[1], candidates)


def test_noncontiguous_state_and_inputs(backend):
    st0, e0 = new_state(40, seed=5)
    big = torch.zeros(80, 2)
    big[::2] = st0
    st = big[::2]
    ids = torch.randperm(40)[:30]
    wide_ids = torch.stack([ids, ids], 1)[:, 0]
    losses = torch.rand(60)[::2]
    ref = (st0.clone(), e0.clone())
    w = backend.es_update(wide_ids, losses, st, e0, 0.3, 0.6)
    w_ref = R.es_update(ids, losses.contiguous(), *ref, 0.3, 0.6)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    assert_state_equal((st.contiguous(), e0), ref)
    assert torch.equal(big[1::2], torch.zeros(40, 2))  # the interleaved memory is untouched


def test_empty_batch_leaves_state(backend):
    state = new_state(5, seed=1)
    mine = clone_all(state)
    w = backend.es_update(torch.empty(0, dtype=torch.long), torch.empty(0), *mine, 0.5, 0.5)
    assert w.shape == (0,)
    assert_state_equal(mine, state)
