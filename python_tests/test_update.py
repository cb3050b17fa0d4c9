"""State update (ES_SPEC section 3) on every backend, bit-exact against the reference."""

import pytest
import torch
from hypothesis import assume, given, strategies as st

from conftest import assert_state_equal, clone3, new_state
from es_kernels import reference as R


def run_both(backend, ids, losses, state, beta1, beta2, w_min=1e-8):
    mine, ref = clone3(state), clone3(state)
    w = backend.es_update(ids, losses, *mine, beta1, beta2, w_min)
    w_ref = R.es_update(ids, losses, *ref, beta1, beta2, w_min)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0, equal_nan=True)
    assert_state_equal(mine, ref)
    return mine, w


@given(n=st.integers(1, 300), frac=st.floats(0.0, 1.0), beta1=st.sampled_from([0.0, 0.2, 0.9, 1.0]),
       beta2=st.sampled_from([0.0, 0.5, 1.0]), dtype=st.sampled_from([torch.float32, torch.float64]),
       id_dtype=st.sampled_from([torch.int64, torch.int32]), seed=st.integers(0, 2**16))
def test_random_against_reference(backend, n, frac, beta1, beta2, dtype, id_dtype, seed):
    assume(dtype in backend.state_dtypes)
    g = torch.Generator().manual_seed(seed)
    state = new_state(n, dtype, observed=0.5, seed=seed)
    k = int(frac * n)
    ids = torch.randperm(n, generator=g)[:k].to(id_dtype)
    losses = torch.rand(k, generator=g) * 5
    run_both(backend, ids, losses, state, beta1, beta2)


def test_first_observation_and_update(backend):
    s = torch.tensor([float("nan"), 2.0, 1.0])
    d = torch.tensor([0.0, 0.5, -0.25])
    state = (s, d, torch.zeros(2, dtype=torch.int64))
    (s1, d1, e1), w = run_both(backend, torch.tensor([0, 1]), torch.tensor([3.0, 1.0]), state, 0.25, 0.5)
    assert s1[0].item() == 3.0 and d1[0].item() == 0.0 and w[0].item() == 3.0  # first observation
    want_s = 0.25 * 2.0 + 0.75 * 1.0
    want_d = 0.5 * 0.5 + 0.5 * (1.0 - 2.0)
    assert s1[1].item() == pytest.approx(want_s) and d1[1].item() == pytest.approx(want_d)
    assert w[1].item() == pytest.approx(want_s + want_d)
    assert s1[2].item() == 1.0 and d1[2].item() == -0.25  # not in the batch: untouched


def test_special_cases(backend):
    """beta2=1: w = s; beta1=0, beta2=1: w = l; beta1=beta2=0: w = 2 l - l_prev."""
    n = 50
    g = torch.Generator().manual_seed(1)
    l_prev, l = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    ids = torch.arange(n)
    for beta1, beta2, want in [(0.3, 1.0, None), (0.0, 1.0, l), (0.0, 0.0, 2 * l - l_prev)]:
        state = (torch.full((n,), float("nan")), torch.zeros(n), torch.zeros(2, dtype=torch.int64))
        backend.es_update(ids, l_prev, *state, beta1, beta2, 1e-8)
        w = backend.es_update(ids, l, *state, beta1, beta2, 1e-8)
        torch.testing.assert_close(w, (state[0] if want is None else want).clamp(min=1e-8))


def test_trend_forecast_settles(backend):
    """On a loss that falls by c per visit, s + d settles at l - c."""
    state = (torch.full((1,), float("nan")), torch.zeros(1), torch.zeros(2, dtype=torch.int64))
    c, loss = 0.01, 5.0
    for _ in range(400):
        w = backend.es_update(torch.tensor([0]), torch.tensor([loss]), *state, 0.7, 0.6, 1e-8)
        loss -= c
    assert w.item() == pytest.approx(loss, abs=1e-4)  # loss is now the next visit's: l_last - c


def test_bad_values_are_counted_not_written(backend):
    state = new_state(10, seed=3)
    ids = torch.tensor([0, 11, -1, 3, 4, 5])
    losses = torch.tensor([1.0, 2.0, 3.0, float("nan"), float("inf"), 0.5])
    (s, d, errors), w = run_both(backend, ids, losses, state, 0.5, 0.5)
    assert errors.tolist() == [2, 2]
    for i in (3, 4):  # non-finite losses: untouched
        assert torch.equal(s[i : i + 1].isnan(), state[0][i : i + 1].isnan())
    assert w[1:5].tolist() == [pytest.approx(1e-8)] * 4


def test_w_min_floor(backend):
    state = (torch.full((3,), float("nan")), torch.zeros(3), torch.zeros(2, dtype=torch.int64))
    _, w = run_both(backend, torch.arange(3), torch.tensor([0.0, -1.0, 2.0]), state, 0.5, 0.5, 1e-3)
    assert w.tolist() == [pytest.approx(1e-3), pytest.approx(1e-3), 2.0]


def test_duplicates_do_not_corrupt(backend):
    s, d, e = new_state(8, seed=2)
    before = s.clone()
    ids = torch.tensor([1, 1, 1, 2])
    w = backend.es_update(ids, torch.tensor([1.0, 2.0, 3.0, 4.0]), s, d, e, 0.5, 0.5, 1e-8)
    assert w.shape == (4,) and torch.isfinite(w).all()
    others = torch.tensor([0, 3, 4, 5, 6, 7])
    assert torch.equal(s[others].isnan(), before[others].isnan())
    assert e.tolist() == [0, 0]


def test_noncontiguous_state_and_inputs(backend):
    s0, d0, e0 = new_state(40, seed=5)
    big_s = torch.zeros(80)
    big_d = torch.zeros(80)
    big_s[::2], big_d[::2] = s0, d0
    s, d = big_s[::2], big_d[::2]
    ids = torch.randperm(40)[:30]
    wide_ids = torch.stack([ids, ids], 1)[:, 0]
    losses = torch.rand(60)[::2]
    ref = (s0.clone(), d0.clone(), e0.clone())
    w = backend.es_update(wide_ids, losses, s, d, e0, 0.3, 0.6, 1e-8)
    w_ref = R.es_update(ids, losses.contiguous(), *ref, 0.3, 0.6)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    assert_state_equal((s, d, e0), ref)
    assert torch.equal(big_s[1::2], torch.zeros(40))  # the interleaved memory is untouched


def test_empty_batch_leaves_state(backend):
    state = new_state(5, seed=1)
    mine = clone3(state)
    w = backend.es_update(torch.empty(0, dtype=torch.long), torch.empty(0), *mine, 0.5, 0.5, 1e-8)
    assert w.shape == (0,)
    assert_state_equal(mine, state)
