"""ESWP pruning (docs/spec.md section 7) on every backend."""

import math

import torch
from conftest import new_state
from hypothesis import given
from hypothesis import strategies as st

from es_kernels import reference as R


def check_against_reference(backend, st, *args):
    order, num_kept, scale = backend.eswp_prune(st, *args)
    r_order, r_kept, r_scale = R.eswp_prune(st, *args)
    assert order.dtype == torch.int64 and num_kept.dtype == torch.int64 and num_kept.dim() == 0
    assert int(num_kept) == int(r_kept)
    assert torch.equal(order, r_order)
    assert torch.equal(scale, r_scale)
    return order, int(num_kept), scale


@given(
    n=st.integers(0, 3000),
    observed=st.floats(0, 1),
    r=st.sampled_from([0.0, 0.3, 0.7, 0.999]),
    epoch=st.integers(0, 12),
    rescale=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**62),
)
def test_against_reference(backend, n, observed, r, epoch, rescale, dtype, seed):
    st, _ = new_state(n, dtype, observed, seed=seed % 997)
    check_against_reference(backend, st, r, seed, epoch, 10, 0.125, rescale)


def test_semantics(backend):
    n, r = 20000, 0.6
    st, _ = new_state(n, observed=0.8, seed=4)
    order, kept, scale = check_against_reference(backend, st, r, 5, 0, 10, 0.125, True)
    s, d = st[:, 0], st[:, 1]
    observed = ~torch.isnan(s)
    score = s.double() + d.double()
    tau = score[observed].mean()
    assert abs(R.prune_threshold(st)[2] - float(tau)) < 1e-8 * float(score[observed].abs().max())
    below = observed & (score < tau)
    assert sorted(order.tolist()) == list(range(n))  # a permutation
    kept_ids = order[:kept]
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept_ids] = False
    assert not (dropped & ~below).any()  # only below-mean samples are dropped
    assert torch.all(scale[dropped] == 0)
    assert torch.allclose(scale[below & ~dropped], torch.tensor(1 / (1 - r)))
    assert torch.all(scale[~below] == 1)
    # drop frequency among below-mean samples: binomial z-score < 5 (false failure < 6e-7)
    m = int(below.sum())
    z = (int(dropped.sum()) - r * m) / math.sqrt(m * r * (1 - r))
    assert abs(z) < 5
    # kept order is random, not ascending; dropped ids follow in ascending order
    assert not torch.all(kept_ids[1:] > kept_ids[:-1])
    assert torch.all(order[kept + 1 :] > order[kept:-1])


def test_annealing_keeps_everything(backend):
    st, _ = new_state(500, observed=1.0, seed=2)
    for epoch in (8, 9, 10, 15):  # stop = floor((1 - 0.125) * 10) = 8
        order, kept, scale = check_against_reference(backend, st, 0.9, 1, epoch, 10, 0.125, True)
        assert kept == 500 and torch.all(scale == 1)
    _, kept, _ = check_against_reference(backend, st, 0.9, 1, 7, 10, 0.125, True)
    assert kept < 500
    _, kept, _ = check_against_reference(backend, st, 0.9, 1, 2**62 - 2**11, 2**62, 0.0, True)  # huge ints
    assert kept < 500


def test_no_rescale_and_nothing_observed(backend):
    st, _ = new_state(300, observed=1.0, seed=3)
    _, kept, scale = check_against_reference(backend, st, 0.5, 0, 0, 4, 0.125, False)
    assert kept < 300 and set(scale.unique().tolist()) <= {0.0, 1.0}
    st, _ = new_state(300, observed=0.0)
    _, kept, scale = check_against_reference(backend, st, 0.5, 0, 0, 4, 0.125, True)
    assert kept == 300 and torch.all(scale == 1)


def test_other_epoch_other_order(backend):
    st, _ = new_state(1000, observed=1.0, seed=8)
    a = backend.eswp_prune(st, 0.5, 3, 1, 10, 0.125, True)[0]
    assert torch.equal(a, backend.eswp_prune(st, 0.5, 3, 1, 10, 0.125, True)[0])
    assert not torch.equal(a, backend.eswp_prune(st, 0.5, 3, 2, 10, 0.125, True)[0])


@given(mag=st.sampled_from([1e-40, 1e-3, 1.0, 1e30, 3e38]), n=st.integers(1, 2500), seed=st.integers(0, 99))
def test_threshold_is_exact_at_any_magnitude(backend, mag, n, seed):
    """The fixed-point mean (spec section 7) is the same bits on every
    backend whatever the magnitudes, signs and block split."""
    g = torch.Generator().manual_seed(seed)
    st = torch.stack([torch.randn(n, generator=g) * mag, torch.randn(n, generator=g) * mag], 1).float()
    st[torch.rand(n, generator=g) < 0.3, 0] = float("nan")
    check_against_reference(backend, st, 0.5, seed, 0, 10, 0.125, True)
