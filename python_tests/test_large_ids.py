"""Sample ids and dataset sizes past 2**32, up to 2**48 - 1 (docs/spec.md
sections 2, 7 and 9), on every backend, without N-sized tensors: the states
of those sizes are fake tensors (no memory), the visit order is checked at
sampled positions, the threshold's exact sum at a virtual N (its words preset
as if 2**40 samples had been added), and the ids' arithmetic through large
ids in small states."""

import math
import random

import pytest
import torch
from conftest import new_state
from torch._subclasses.fake_tensor import FakeTensorMode

import es_kernels
from es_kernels import ESState, _spec
from es_kernels import functional as F
from es_kernels import reference as R

try:
    import triton
    import triton.language as tl

    from es_kernels._triton import prune as TP
    from es_kernels._triton.philox import philox_words
except ImportError:  # no Triton: its checks are skipped
    triton = None

try:
    from es_kernels import _C
except ImportError:  # a pure-Python install: the C++ checks are skipped
    _C = None

M32 = 0xFFFFFFFF
MAX_N = 2**48 - 1
needs_cpp = pytest.mark.skipif(_C is None, reason="the C++ extension is not built")
needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")

if triton is not None:

    @triton.jit
    def _perm_kernel(q_ptr, out_ptr, n, k, seed, epoch_lo, key_lo, key_hi, BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        q = tl.load(q_ptr + j, mask=j < n, other=0)
        tl.store(out_ptr + j, TP._visit_perm(q, k, seed, epoch_lo, key_lo, key_hi), mask=j < n)

    @triton.jit
    def _drop_words_kernel(ids_ptr, out_ptr, n, seed, epoch_lo, BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        i = tl.load(ids_ptr + j, mask=j < n, other=0)
        x0, x1 = philox_words(seed, i, epoch_lo, TP.STREAM_PRUNE)
        tl.store(out_ptr + 2 * j, x0.to(tl.int64), mask=j < n)
        tl.store(out_ptr + 2 * j + 1, x1.to(tl.int64), mask=j < n)

    @triton.jit
    def _tau_kernel(acc_ptr, out_ptr):
        tl.store(out_ptr, TP._threshold(acc_ptr))


def _triton_call(kernel, n, *args):
    block = 1024
    kernel[(max(triton.cdiv(n, block), 1),)](*args, BLOCK=block)


# -- the size limit, at every entry point ------------------------------------------
@pytest.mark.parametrize("n", [2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, MAX_N])
def test_states_past_2_32_samples_are_accepted(n):
    """ESState, the functional API and the raw ops take N up to 2**48 - 1
    (fake tensors: shapes without memory); the outputs have N entries."""
    with FakeTensorMode():
        state = ESState(n)
        assert state.num_samples == n
        order, num_kept, scale = F.eswp_prune(state, 0.3, seed=1, epoch=2, num_epochs=4)
        assert order.shape == (n,) and scale.shape == (n,) and num_kept.shape == ()
        ids = torch.tensor([n - 1, 0, 2**32 + 1, n])
        w = F.es_update(ids, torch.tensor([1.0, 2.0, 3.0, 4.0]), state)
        assert w.shape == (4,)
        out = torch.ops.es_kernels.eswp_prune(state.tensor, 0.5, 3, 1, 4, 0.125, True)
        assert out[0].shape == (n,)


def test_more_than_2_48_samples_are_refused():
    with FakeTensorMode():
        with pytest.raises(ValueError, match="num_samples"):
            ESState(MAX_N + 1)
        big = torch.empty(MAX_N + 1, 2)
        with pytest.raises(ValueError, match="state"):
            torch.ops.es_kernels.eswp_prune(big, 0.5, 3, 1, 4, 0.125, True)
        with pytest.raises(ValueError, match="state"):
            torch.ops.es_kernels.es_update(torch.tensor([0]), torch.tensor([1.0]), big, torch.zeros(2).long(), 0.2, 0.5)


# -- the visit order (section 7) at sampled positions ------------------------------
def _round(v, key):
    h = ((v ^ key) * 0xD2511F53) & M32
    h ^= h >> 15
    h = (h * 0xCD9E8D57) & M32
    return h ^ (h >> 16)


def spec_perm(q, k, keys):
    """perm(q) as section 7 writes it, on Python ints."""
    lo = k // 2
    a, wa, b, wb = q >> lo, k - lo, q & ((1 << lo) - 1), lo
    for key in keys:
        a, wa, b, wb = b, wb, a ^ (_round(b, key) & ((1 << wa) - 1)), wa
    return (a << wb) | b


def spec_perm_inverse(x, k, keys):
    """The inverse of perm: each Feistel round undone, last key first."""
    lo = k // 2
    a, wa, b, wb = x >> lo, k - lo, x & ((1 << lo) - 1), lo
    for key in reversed(keys):
        a, wa, b, wb = b ^ (_round(a, key) & ((1 << wb) - 1)), wb, a, wa
    return (a << wb) | b


def sampled_domain(n, count, seed):
    """``count`` random q of [0, 2**k) and the edges: 0, 2**k - 1, the halves'
    boundaries, N - 1, N."""
    k = _spec.prune_perm_bits(n)
    rng = random.Random(seed)
    lo = k // 2
    edges = [0, 1, (1 << k) - 1, (1 << lo) - 1, 1 << lo, n - 1, min(n, (1 << k) - 1)]
    return k, edges + [rng.randrange(1 << k) for _ in range(count)]


SIZES = [2**32, 2**32 + 1, 2**32 + 2**20 + 7, 2**40 - 3, 2**40, 2**40 + 1, MAX_N]
EPOCHS = [(0, 0), (7, 3), (2**63 - 1, 2**40 + 9)]


@pytest.mark.parametrize("n", SIZES)
def test_visit_permutation_at_sampled_positions(n):
    """The reference's perm equals the spec's text on sampled q, maps [0, 2**k)
    into itself and is undone by the inverse Feistel network (so it is a
    bijection: no two q share a value); k = bit length of N - 1, up to 48."""
    for s, (seed, epoch) in enumerate(EPOCHS):
        k, q = sampled_domain(n, 4000, s)
        assert k == max((n - 1).bit_length(), 8) and k <= 48
        keys = R.prune_perm_keys(seed, epoch)
        x = R.prune_permute(torch.tensor(q), k, keys).tolist()
        assert x == [spec_perm(v, k, keys) for v in q]
        assert all(0 <= v < 2**k for v in x)
        assert [spec_perm_inverse(v, k, keys) for v in x] == q


@needs_cpp
@pytest.mark.parametrize("n", SIZES + [1, 255, 1000, 3000])
def test_cpp_visit_permutation_agrees_at_sampled_positions(n):
    for s, (seed, epoch) in enumerate(EPOCHS):
        k, q = sampled_domain(n, 20000, s)
        keys = R.prune_perm_keys(seed, epoch)
        assert _C._prune_visit_perm(n, seed, epoch, q) == R.prune_permute(torch.tensor(q), k, keys).tolist()


@needs_triton
@pytest.mark.parametrize("n", SIZES + [1, 255, 1000, 3000])
def test_triton_visit_permutation_agrees_at_sampled_positions(n):
    for s, (seed, epoch) in enumerate(EPOCHS):
        k, q = sampled_domain(n, 5000, s)
        keys = R.prune_perm_keys(seed, epoch)
        qt = torch.tensor(q)
        out = torch.empty_like(qt)
        _triton_call(_perm_kernel, len(q), qt, out, len(q), k, seed, epoch & M32, 0, 0)
        assert torch.equal(out, R.prune_permute(qt, k, keys))
        key = 2**32 + 7 + s  # a shard's order (order_key = its rank): both words of j count
        _triton_call(_perm_kernel, len(q), qt, out, len(q), k, seed, epoch & M32, key & M32, key >> 32)
        assert torch.equal(out, R.prune_permute(qt, k, R.prune_perm_keys(seed, epoch, key)))


# -- the drops (section 9, stream 1) at ids past 2**32 ------------------------------
LARGE_IDS = [0, 5, M32, 2**32, 2**32 + 1, 2**33 + 12345, 2**40 - 1, 2**40, 2**47 + 3, MAX_N - 1]


def reference_words(seed, ids, step, stream):
    j = torch.tensor(ids)
    z = torch.zeros_like(j)
    return torch.stack(R.philox4x32(seed, j & M32, j >> 32, z + (step & M32), z + stream), 1)


@needs_cpp
def test_cpp_noise_of_large_ids():
    """The counter's second word is j >> 32: ids j and j + 2**32 draw different noise."""
    for seed, epoch in EPOCHS:
        words = torch.tensor(_C._philox_words(seed, LARGE_IDS, epoch, _spec.STREAM_PRUNE))
        assert torch.equal(words, reference_words(seed, LARGE_IDS, epoch, _spec.STREAM_PRUNE))
    assert not torch.equal(words[2 + 1], words[0])  # 2**32 and 0


@needs_triton
def test_triton_noise_of_large_ids():
    ids = torch.tensor(LARGE_IDS)
    for seed, epoch in EPOCHS:
        out = torch.empty(len(LARGE_IDS), 2, dtype=torch.int64)
        _triton_call(_drop_words_kernel, len(LARGE_IDS), ids, out, len(LARGE_IDS), seed, epoch & M32)
        expect = reference_words(seed, LARGE_IDS, epoch, _spec.STREAM_PRUNE)[:, :2]
        assert torch.equal(out, expect)


# -- the threshold's exact sum (section 7) at a virtual N ---------------------------
def test_prune_mean_is_the_correctly_rounded_mean():
    """tau = f64(sum) 2**(e - 30) / count with f64 the correctly rounded float of
    the exact sum, for sums past 2**63 (N = 2**40 samples at the largest q)."""
    n = 2**40
    for total in (n * (2**30 - 1), -n * (2**30 - 1), 2**70 + 2**17 + 1, 2**70 + 2**17, -(2**75) - 3):
        for e in (1, -20, 40):
            assert _spec.prune_mean(total, n, e) == float(total) * 2.0 ** (e - 30) / n
    # f64(2**70 + 2**17 + 1): above the halfway point 2**70 + 2**17, rounds up
    assert float(2**70 + 2**17 + 1) == 2.0**70 + 2.0**18 and float(2**70 + 2**17) == 2.0**70


@needs_cpp
def test_cpp_exact_sum_past_int64():
    """The C++ threshold adds its chunks' int64 sums exactly in two words: here
    256 parts of 2**32 samples at the largest |q| (a virtual N = 2**40), and
    mixed signs and magnitudes whose running sum leaves int64 and comes back."""
    part = 2**32 * (2**30 - 1)
    rng = random.Random(3)
    cases = [
        [part] * 256,
        [-part] * 256,
        [2**62, 2**62, 2**62, -5],
        [2**63 - 1] * 7 + [-(2**63)] * 7 + [1],
        [rng.randrange(-(2**63), 2**63) for _ in range(5000)],
        [rng.randrange(-(2**45), 2**45) for _ in range(5000)] + [part] * 64,
        [],
    ]
    for terms in cases:
        hi, lo, value = _C._prune_exact_sum(terms)
        total = sum(terms)
        assert 0 <= lo < 2**32 and hi * 2**32 + lo == total
        assert value == float(total)  # correctly rounded


def _virtual_words(blocks, q, split=24):
    """prune_sum_kernel's two words after ``blocks`` blocks of 1024 samples at fixed-point value q."""
    part = 1024 * q
    return blocks * (part >> split), blocks * (part & ((1 << split) - 1)), blocks * part


@needs_triton
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("blocks", [2**30, 2**32 + 7, 2**38 - 1])
def test_triton_threshold_at_a_virtual_n(sign, blocks):
    """The Triton threshold's words preset as if ``blocks`` blocks of 1024
    samples (N up to 2**48) at the largest |q| had been added, then the max
    and sum kernels run on a real small state on top: tau is the correctly
    rounded mean of the exact sum (one int64 word would have wrapped)."""
    st, _ = new_state(3000, observed=0.8, seed=5)
    st[:, 0] = st[:, 0] * sign
    score, observed, _ = R.prune_threshold(st)
    big = float(score[observed].abs().max())
    e = math.frexp(big)[1]
    small = int(torch.floor(score[observed] * 2.0 ** (30 - e)).long().sum())
    hi, lo, virtual = _virtual_words(blocks, sign * (2**30 - 1))
    count = blocks * 1024
    acc = torch.tensor([0, count, hi, lo], dtype=torch.int64)
    _triton_call(TP.prune_max_kernel, 3000, st, 3000, acc)
    assert acc[0].view(torch.float64) == big and int(acc[1]) == count + int(observed.sum())
    _triton_call(TP.prune_sum_kernel, 3000, st, 3000, acc)
    tau = torch.empty(1, dtype=torch.float64)
    _tau_kernel[(1,)](acc, tau)
    total = virtual + small
    assert abs(total) > 2**63
    assert float(tau) == _spec.prune_mean(total, count + int(observed.sum()), e)


# -- ids past 2**32 in a small state: out of range, never wrapped -------------------
BAD_IDS = [2**32, 2**32 + 1, 2**33 + 2, 2**40, 2**48, MAX_N, 2**63 - 1, -1, -(2**32) + 1, -(2**63)]


def test_large_ids_are_out_of_range_on_every_backend(backend):
    """An id congruent to a valid one modulo 2**32 (or 2**48) is out of range:
    counted in errors[0], the state untouched, weight w_min; the valid ids of
    the same batch are updated as the reference does."""
    n = 7
    ids = torch.tensor([1, *BAD_IDS, 4, 6])
    losses = torch.rand(len(ids), generator=torch.Generator().manual_seed(0)) + 0.5
    st, err = new_state(n, observed=0.5, seed=1)
    before = st.clone()
    r_st, r_err = st.clone(), err.clone()
    w = backend.es_update(ids, losses, st, err, 0.2, 0.5, 0.0, 1e-8)
    r_w = R.es_update(ids, losses, r_st, r_err, 0.2, 0.5, 0.0, 1e-8)
    assert torch.equal(w, r_w) and same(st, r_st) and torch.equal(err, r_err)
    assert err.tolist() == [len(BAD_IDS), 0]
    assert torch.all(w[1 : 1 + len(BAD_IDS)] == torch.tensor(1e-8, dtype=torch.float32))
    assert torch.all(w[[0, -2, -1]] > 0.1)  # lam = 0: w = s >= 0.5
    changed = ~(same_rows(st, before))
    assert changed.nonzero().view(-1).tolist() == [1, 4, 6]
    # selection from the state: the same ids, weights w_min and counted
    err2, r_err2 = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    pos, w2 = backend.es_select_from_state(ids, st, err2, 3, 2.0, 1e-8, "sample", 5, 9)
    r_pos, r_w2 = R.es_select_from_state(ids, st, r_err2, 3, 2.0, 1e-8, "sample", 5, 9)
    assert torch.equal(pos, r_pos) and torch.equal(w2, r_w2) and torch.equal(err2, r_err2)
    assert err2.tolist() == [len(BAD_IDS), 0]


def same_rows(a, b):
    """bool [N]: rows equal, NaN equal to NaN."""
    return ((a == b) | (a.isnan() & b.isnan())).all(dim=1)


def same(a, b):
    return bool(same_rows(a, b).all())


def test_sampler_scales_of_large_ids():
    """A plan's scales: an id past N (also past 2**32) has scale 1."""
    sampler = es_kernels.EvolvedSampler(num_samples=5, mini_batch=2)
    sampler.scale = torch.tensor([0.0, 2.0, 2.0, 0.0, 1.0])
    ids = torch.tensor([1, 2**32 + 1, 2**40 + 3, 3])
    assert sampler.scales_of(ids).tolist() == [2.0, 1.0, 1.0, 0.0]
