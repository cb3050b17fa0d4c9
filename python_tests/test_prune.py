"""ESWP pruning (docs/spec.md section 7) on every backend."""

import math

import pytest
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


# -- the visit order (spec section 7) ------------------------------------------
M32 = 0xFFFFFFFF


def spec_visit_order(n, seed, epoch):
    """Section 7's visit order written from the spec's text, on Python ints."""
    k = max((n - 1).bit_length(), 8)
    keys = [int(w) for w in R.philox4x32(seed, *(torch.tensor([v]) for v in (0, 0, epoch & M32, 2)))]

    def f(v, key):
        h = ((v ^ key) * 0xD2511F53) & M32
        h ^= h >> 15
        h = (h * 0xCD9E8D57) & M32
        return h ^ (h >> 16)

    def perm(q):
        lo = k // 2
        a, wa, b, wb = q >> lo, k - lo, q & ((1 << lo) - 1), lo
        for key in keys:
            a, wa, b, wb = b, wb, a ^ (f(b, key) & ((1 << wa) - 1)), wa
        return (a << wb) | b

    return [x for x in map(perm, range(1 << k)) if x < n]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 255, 256, 257, 1000])
def test_visit_order_follows_the_spec(n):
    for seed, epoch in [(0, 0), (7, 3), (2**63 - 1, 2**40 + 9)]:
        visit = R.prune_visit_order(n, seed, epoch)
        assert visit.tolist() == spec_visit_order(n, seed, epoch)
        assert torch.equal(visit.sort().values, torch.arange(n))  # a permutation of the ids


def test_visit_order_is_uniform_on_small_sets():
    """Over 3000 epochs, every id of a 5-sample set takes every place about
    equally often (chi-square over the 25 cells: fixed seeds, so deterministic;
    a biased permutation, e.g. 2-round Feistel or tiny halves, gives > 200)."""
    n, epochs = 5, 3000
    counts = torch.zeros(n, n)
    for epoch in range(epochs):
        counts[R.prune_visit_order(n, 11, epoch), torch.arange(n)] += 1
    expect = epochs / n
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 50  # 16 degrees of freedom: P(chi2 > 50) ~ 2e-5 for a uniform order


@pytest.mark.parametrize("n", [1, 2, 3, 257, 1023, 1025, 2049, 40000])
def test_edge_sizes(backend, n):
    """Odd N, N = 1, sizes around the block sizes; the C++ kernel splits work
    into chunks of 32768 ids, so 40000 runs its parallel path (2 chunks of
    ids, 2 of the visit domain 65536)."""
    st, _ = new_state(n, observed=0.9, seed=n)
    for epoch in (0, 9):  # 9: annealing
        check_against_reference(backend, st, 0.7, 3, epoch, 10, 0.125, True)


def test_all_kept_is_the_visit_order(backend):
    st, _ = new_state(3001, observed=1.0, seed=5)
    order, kept, _ = check_against_reference(backend, st, 0.0, 9, 4, 10, 0.125, True)
    assert kept == 3001 and torch.equal(order, R.prune_visit_order(3001, 9, 4))


def test_nearly_all_dropped(backend):
    """One huge score puts every other sample below the mean: with r near 1
    almost all are dropped, whole blocks of ids and of the visit domain keep
    nothing, and the dropped ids fill the tail ascending."""
    n = 2500
    st = torch.zeros(n, 2)
    st[:, 0] = torch.rand(n, generator=torch.Generator().manual_seed(1))
    st[1234, 0] = 1e9
    order, kept, scale = check_against_reference(backend, st, 0.999, 2, 0, 10, 0.125, True)
    assert 1 <= kept < 10 and 1234 in order[:kept].tolist()
    tail = order[kept:]
    assert torch.all(tail[1:] > tail[:-1]) and int((scale == 0).sum()) == n - kept
