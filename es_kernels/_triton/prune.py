"""ESWP pruning (docs/spec.md section 7) on the device in O(N) work and
memory, with no host round-trip and no sort:

1. ``prune_max_kernel``: the largest |score| (score = float64(s) + float64(d))
   and the count of observed samples, by integer atomics (the float64 bits of
   a non-negative number order like int64);
2. ``prune_sum_kernel``: the exact fixed-point sum of floor(score 2**p),
   p = min(30 - e, 1074) (2**p applied as two finite factors)
   by int64 atomic adds into two words (a block's sum split at bit SUM_SPLIT:
   exact for N up to 2**48, where one int64 would overflow; order-independent,
   so the mean's bits are the same on every backend); ``prune_threshold_kernel``
   turns the words into the threshold (float64). A given threshold (a shard's
   plan, spec section 11.2) skips these three;
3. ``prune_decide_kernel``: per id the drop and the scale (the drop noise of
   row i is that of the id ``id_offset + i``); the drops as a
   bitmask ``skip`` over the visit domain ``[0, 2**k)`` (a set bit: dropped, or
   ``>= N``; N/8 bytes) and the dropped count of each block of ids;
4. ``prune_count_kernel``: per block of ``q`` in ``[0, 2**k)``, how many
   ``perm(q)`` are kept (``perm``: the keyed Feistel bijection of section 7);
5. an exclusive scan (``torch.cumsum``) of the counts of 4 followed by those
   of 3 gives every block its first output slot: the kept ids fill
   ``order[:num_kept]`` in the visit order, the dropped ones follow ascending;
6. ``prune_write_kept_kernel`` and ``prune_write_dropped_kernel``: ordered
   writes from those slots (a block-local exclusive scan places each id).

No atomics decide a position and nothing waits on another program, so the
result is the same on every run, backend and block split.
"""

import triton
import triton.language as tl

from .. import _spec
from .philox import philox_words

PRUNE_BITS = tl.constexpr(_spec.PRUNE_MEAN_BITS)
PRUNE_MAX_SHIFT = tl.constexpr(_spec.PRUNE_MAX_SHIFT)
# A block's sum s (|s| <= BLOCK 2**30) adds s >> SUM_SPLIT to one word and
# s mod 2**SUM_SPLIT to the other: the low word stays below 2**62 for up to
# 2**38 blocks (N = 2**48 at BLOCK = 1024), the high one below 2**55.
SUM_SPLIT = tl.constexpr(24)
SUM_LOW = tl.constexpr((1 << 24) - 1)  # mod 2**SUM_SPLIT
SUM_HI_SHIFT = tl.constexpr(32 - 24)  # hi 2**SUM_SPLIT = (hi >> 8) 2**32 + (hi mod 2**8) 2**SUM_SPLIT
SUM_HI_LOW = tl.constexpr((1 << (32 - 24)) - 1)
STREAM_PRUNE = tl.constexpr(_spec.STREAM_PRUNE)
STREAM_PRUNE_ORDER = tl.constexpr(_spec.STREAM_PRUNE_ORDER)
PERM_MUL0 = tl.constexpr(_spec.PRUNE_PERM_MUL[0])
PERM_MUL1 = tl.constexpr(_spec.PRUNE_PERM_MUL[1])
PERM_SHIFT0 = tl.constexpr(_spec.PRUNE_PERM_SHIFT[0])
PERM_SHIFT1 = tl.constexpr(_spec.PRUNE_PERM_SHIFT[1])


@triton.jit
def _scores(state_ptr, i, N):
    pair = tl.arange(0, 2)
    s, d = tl.split(tl.load(state_ptr + i[:, None] * 2 + pair[None, :], mask=(i < N)[:, None], other=float("nan")))
    score = s.to(tl.float64) + d.to(tl.float64)
    observed = (i < N) & (score == score) & (tl.abs(score) < float("inf"))
    return score, observed


@triton.jit
def _exponent(bits):
    """frexp exponent of a positive float64 given by its bits (2**(e-1) <= x < 2**e);
    a subnormal's from x 2**64 (normal), less 64."""
    sub = bits < 0x0010000000000000
    x = bits.to(tl.float64, bitcast=True)
    y = tl.where(sub, x * 18446744073709551616.0, x).to(tl.int64, bitcast=True)
    return ((y >> 52) & 0x7FF) - 1022 - tl.where(sub, 64, 0)


@triton.jit
def _pow2(e):
    """2**e as float64, for -1022 <= e <= 1023."""
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _shift(bits):
    """p of spec section 7 from the bits of the largest |score|."""
    return tl.minimum(PRUNE_BITS - _exponent(bits), PRUNE_MAX_SHIFT)


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
    p = _shift(bits)
    p2 = tl.maximum(p - 1023, 0)  # 2**p = 2**(p - p2) 2**p2, both finite
    q = tl.where(observed & (bits > 0), tl.floor(score * _pow2(p - p2) * _pow2(p2)).to(tl.int64), 0)
    total = tl.sum(q, 0)
    tl.atomic_add(acc_ptr + 2, total >> SUM_SPLIT)  # arithmetic shift: floor
    tl.atomic_add(acc_ptr + 3, total & SUM_LOW)


@triton.jit
def _sum_as_float64(acc_ptr):
    """The exact sum of prune_sum_kernel's words, hi 2**SUM_SPLIT + lo, correctly
    rounded to float64: rewritten as h 2**32 + l with 0 <= l < 2**32, h and l
    are exact doubles (|h| < 2**53), and their one addition rounds once."""
    hi = tl.load(acc_ptr + 2)
    lo = tl.load(acc_ptr + 3)
    h = (hi >> SUM_HI_SHIFT) + (lo >> 32)
    l = ((hi & SUM_HI_LOW) << SUM_SPLIT) + (lo & 0xFFFFFFFF)  # < 2**33
    h = h + (l >> 32)
    l = l & 0xFFFFFFFF
    return h.to(tl.float64) * 4294967296.0 + l.to(tl.float64)


@triton.jit
def _threshold(acc_ptr):
    """tau of spec section 7 from the words of prune_max_kernel and prune_sum_kernel."""
    bits = tl.load(acc_ptr)
    count = tl.load(acc_ptr + 1).to(tl.float64)
    total = _sum_as_float64(acc_ptr)
    p = _shift(bits)
    # p >= 0: total 2**-p, exact (in two steps: 2**-p is subnormal from p = 1023), then / count;
    # p < 0: / count first, then 2**-p (exact; no overflow: a sum of scores near the float64 maximum)
    down = tl.maximum(p, 0)
    d2 = tl.maximum(down - 1022, 0)
    small = total * _pow2(d2 - down) * _pow2(-d2) / count
    large = total / count * _pow2(tl.maximum(-p, 0))
    mean = tl.where(p >= 0, small, large)
    return tl.where(count == 0, float("nan"), tl.where(bits == 0, 0.0, mean))


@triton.jit
def prune_threshold_kernel(acc_ptr, tau_ptr):
    """tau_ptr[0] = the threshold (float64) of the words of prune_max_kernel and prune_sum_kernel."""
    tl.store(tau_ptr, _threshold(acc_ptr))


@triton.jit
def _domain(k):
    """2**k as int64 (k <= 48)."""
    return tl.full((), 1, tl.int64) << k


@triton.jit(do_not_specialize=["N", "id_offset", "seed", "epoch_lo", "drop_below", "k"])
def prune_decide_kernel(
    state_ptr,
    N,
    id_offset,
    tau_ptr,
    seed,
    epoch_lo,
    drop_below,
    kept_scale,
    scale_ptr,
    skip_ptr,
    k,
    gone_ptr,
    ANNEALING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tau = tl.load(tau_ptr)
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    score, observed = _scores(state_ptr, i, N)
    below = observed & (score < tau)
    if ANNEALING:
        below = below & False
    x0, _ = philox_words(seed, i + id_offset, epoch_lo, STREAM_PRUNE)
    # u < r exactly <=> (x0 >> 9) < drop_below, drop_below computed on the host
    dropped = below & ((x0 >> 9).to(tl.int64) < drop_below)
    scale = tl.where(dropped, 0.0, tl.where(below, kept_scale, 1.0))
    tl.store(scale_ptr + i, scale, mask=inb)
    tl.store(gone_ptr + pid, tl.sum(dropped.to(tl.int64), 0))
    # 32 ids a word, bit i mod 32: set where dropped or outside [0, N)
    flags = tl.reshape((dropped | ~inb).to(tl.uint32), (BLOCK // 32, 32))
    word = tl.sum(flags << tl.arange(0, 32).to(tl.uint32)[None, :], 1)
    w = pid.to(tl.int64) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    tl.store(skip_ptr + w, word.to(tl.int32, bitcast=True), mask=w < _domain(k) // 32)


@triton.jit
def _perm_round(b, key):
    """F(b, K) of spec section 7 on uint32 words."""
    h = (b ^ key) * PERM_MUL0
    h = h ^ (h >> PERM_SHIFT0)
    h = h * PERM_MUL1
    return h ^ (h >> PERM_SHIFT1)


@triton.jit
def _visit_perm(q, k, seed, epoch_lo, key_lo, key_hi):
    """perm(q) of spec section 7: the 4-round Feistel bijection of [0, 2**k)
    keyed by the Philox words of (seed, j = order_key, step = epoch, stream 2)
    (``key_lo``, ``key_hi``: the words of order_key); q, the result: int64 in
    [0, 2**k), k <= 48; the halves (at most 24 bits): uint32."""
    zero = tl.full((1,), 0, tl.uint32)
    c0, c1 = zero + key_lo.to(tl.uint32), zero + key_hi.to(tl.uint32)
    k0, k1, k2, k3 = tl.philox(seed, c0, c1, zero + epoch_lo.to(tl.uint32), zero + STREAM_PRUNE_ORDER)
    lo = (k // 2).to(tl.uint32)
    mask_lo = (tl.full((1,), 1, tl.uint32) << lo) - 1
    mask_hi = (tl.full((1,), 1, tl.uint32) << (k.to(tl.uint32) - lo)) - 1
    a = (q >> lo.to(tl.int64)).to(tl.uint32)
    b = q.to(tl.uint32) & mask_lo
    a, b = b, a ^ (_perm_round(b, k0) & mask_hi)
    a, b = b, a ^ (_perm_round(b, k1) & mask_lo)
    a, b = b, a ^ (_perm_round(b, k2) & mask_hi)
    a, b = b, a ^ (_perm_round(b, k3) & mask_lo)
    return (a.to(tl.int64) << lo.to(tl.int64)) | b.to(tl.int64)


@triton.jit
def _kept_in_visit(skip_ptr, q, k, seed, epoch_lo, key_lo, key_hi):
    """(perm(q), kept) for the q (int64) of one block of the domain."""
    domain = _domain(k)
    x = _visit_perm(q, k, seed, epoch_lo, key_lo, key_hi)
    word = tl.load(skip_ptr + (x >> 5), mask=q < domain, other=-1)
    kept = (q < domain) & (((word >> (x & 31).to(tl.int32)) & 1) == 0)
    return x, kept


@triton.jit(do_not_specialize=["k", "seed", "epoch_lo", "key_lo", "key_hi"])
def prune_count_kernel(skip_ptr, k, seed, epoch_lo, key_lo, key_hi, count_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    q = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _, kept = _kept_in_visit(skip_ptr, q, k, seed, epoch_lo, key_lo, key_hi)
    tl.store(count_ptr + pid, tl.sum(kept.to(tl.int64), 0))


@triton.jit
def _write_compacted(order_ptr, start_ptr, pid, value, keep):
    """order[start[pid] + (the keep before it in the block)] = value where keep."""
    flag = keep.to(tl.int32)
    slot = tl.load(start_ptr + pid) + (tl.cumsum(flag, 0) - flag).to(tl.int64)
    tl.store(order_ptr + slot, value, mask=keep)


@triton.jit(do_not_specialize=["k", "seed", "epoch_lo", "key_lo", "key_hi"])
def prune_write_kept_kernel(skip_ptr, k, seed, epoch_lo, key_lo, key_hi, start_ptr, order_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    q = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x, kept = _kept_in_visit(skip_ptr, q, k, seed, epoch_lo, key_lo, key_hi)
    _write_compacted(order_ptr, start_ptr, pid, x, kept)


@triton.jit(do_not_specialize=["N"])
def prune_write_dropped_kernel(skip_ptr, N, start_ptr, order_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    word = tl.load(skip_ptr + (i >> 5), mask=i < N, other=0)
    dropped = (i < N) & (((word >> (i & 31).to(tl.int32)) & 1) != 0)
    _write_compacted(order_ptr, start_ptr, pid, i, dropped)
