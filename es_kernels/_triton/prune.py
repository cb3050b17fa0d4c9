"""ESWP pruning (docs/spec.md section 7) on the device, in three launches
over blocks of samples, with no host round-trip:

1. ``prune_max_kernel``: the largest |score| (score = float64(s) + float64(d))
   and the count of observed samples, by integer atomics (the float64 bits of
   a non-negative number order like int64);
2. ``prune_sum_kernel``: the exact fixed-point sum of trunc(score 2**(30 - e))
   by an int64 atomic add (order-independent, so the mean's bits are the same
   on every backend);
3. ``prune_decide_kernel``: the mean, the drops, the scales and the sort key
   that orders kept ids by their Philox word and puts dropped ids after them.

torch.sort on the device finishes the order.
"""

import triton
import triton.language as tl

from .. import _spec
from .philox import philox_words

PRUNE_BITS = tl.constexpr(_spec.PRUNE_MEAN_BITS)
STREAM_PRUNE = tl.constexpr(_spec.STREAM_PRUNE)


@triton.jit
def _scores(state_ptr, i, N):
    pair = tl.arange(0, 2)
    s, d = tl.split(tl.load(state_ptr + i[:, None] * 2 + pair[None, :], mask=(i < N)[:, None], other=float("nan")))
    score = s.to(tl.float64) + d.to(tl.float64)
    observed = (i < N) & (score == score) & (tl.abs(score) < float("inf"))
    return score, observed


@triton.jit
def _exponent(bits):
    """frexp exponent of a positive float64 given by its bits (2**(e-1) <= x < 2**e)."""
    return ((bits >> 52) & 0x7FF) - 1022


@triton.jit
def _pow2(e):
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit(do_not_specialize=["N"])
def prune_max_kernel(state_ptr, N, acc_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    score, observed = _scores(state_ptr, i, N)
    big = tl.max(tl.where(observed, tl.abs(score), 0.0), 0)
    tl.atomic_max(acc_ptr, big.to(tl.int64, bitcast=True))
    tl.atomic_add(acc_ptr + 1, tl.sum(observed.to(tl.int64), 0))


@triton.jit(do_not_specialize=["N"])
def prune_sum_kernel(state_ptr, N, acc_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    score, observed = _scores(state_ptr, i, N)
    bits = tl.load(acc_ptr)
    up = _pow2(-_exponent(bits) + PRUNE_BITS)
    q = tl.where(observed & (bits > 0), (score * up).to(tl.int64), 0)  # the cast truncates
    tl.atomic_add(acc_ptr + 2, tl.sum(q, 0))


@triton.jit(do_not_specialize=["N", "seed", "epoch_lo", "drop_below"])
def prune_decide_kernel(
    state_ptr,
    N,
    acc_ptr,
    seed,
    epoch_lo,
    drop_below,
    kept_scale,
    scale_ptr,
    sort_key_ptr,
    ANNEALING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bits = tl.load(acc_ptr)
    count = tl.load(acc_ptr + 1)
    total = tl.load(acc_ptr + 2)
    mean = total.to(tl.float64) * _pow2(_exponent(bits) - PRUNE_BITS) / count.to(tl.float64)
    tau = tl.where(count == 0, float("nan"), tl.where(bits == 0, 0.0, mean))
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    score, observed = _scores(state_ptr, i, N)
    below = observed & (score < tau)
    if ANNEALING:
        below = below & False
    x0, x1 = philox_words(seed, i, epoch_lo, STREAM_PRUNE)
    # u < r exactly <=> (x0 >> 9) < drop_below, drop_below computed on the host
    dropped = below & ((x0 >> 9).to(tl.int64) < drop_below)
    scale = tl.where(dropped, 0.0, tl.where(below, kept_scale, 1.0))
    tl.store(scale_ptr + i, scale, mask=inb)
    key = tl.where(dropped, 4294967296 + i, x1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(sort_key_ptr + i, key, mask=inb)
