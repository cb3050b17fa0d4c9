"""State update (docs/spec.md section 3) and selection (section 4) over many
programs, with no host round-trip.

The launchers run a short, fixed sequence of launches, each a grid of
programs over blocks of positions; what one launch finds for the next (the
errors, the exploration mix's max and sum, the radix histograms, the per-block
counts) goes through a small zeroed scratch buffer on the device, by integer
atomics (so the result does not depend on the programs' order):

1. ``observe_kernel``: per position j the loss (the exact fixed-point mean of
   the row's scored token losses when targets, or token losses, are given,
   vectorised over the tokens; a row with none is skipped by the update), the
   update of the (s, d) pair of ids[j] (one 8-byte load and store of the
   pair), the weight and, without the exploration mix, the selection key (an
   order-preserving uint32, stored in int64) and the histogram of its top 8
   bits. From [B, C] logits, cross_entropy.ce_kernel does the same in its
   per-row epilogue (``observe``), so the losses cost no launch of their own;
2. with the exploration mix (eps > 0): ``mix_sum_kernel`` (the exact
   fixed-point sum of the weights, after step 1 found their max), then
   ``mix_keys_kernel`` (the keys and the top-8-bit histogram);
3. ``radix_hist_kernel`` for bits 23..16, 15..8 and 7..0: every program
   derives the prefix of the b-th largest key from the histograms so far and
   histograms the next 8 bits of the keys that share it;
4. ``select_count_kernel``: each block's count of keys above the threshold
   and equal to it;
5. ``select_write_kernel``: each block's offset from the counts of the blocks
   before it, then the selected positions in ascending order (the keys equal
   to the threshold taken lowest position first); program 0 advances the
   step counter when asked.

``seed`` and ``step`` come as host ints or are loaded from 0-d device
tensors; float64 constants come as their bit patterns (a Python float
argument would reach the kernel as float32).
"""

import triton
import triton.language as tl

from .. import _spec
from .philox import philox_words, uniform

SELECT_BITS = tl.constexpr(_spec.SELECT_MEAN_BITS)
STREAM_SELECT = tl.constexpr(_spec.STREAM_SELECT)
RADIX = 256  # bins of one 8-bit digit
SCRATCH = 4 * RADIX + 2  # int64: four histograms, the mix's max bits and fixed-point sum
MIX_MAX = tl.constexpr(4 * RADIX)
MIX_SUM = tl.constexpr(4 * RADIX + 1)


@triton.jit
def _ordered_key(k):
    """float32 key -> order-preserving uint32 in int64; NaN as -inf, -0 as +0."""
    k = tl.where(k != k, float("-inf"), k)
    k = tl.where(k == 0.0, 0.0, k)
    u = k.to(tl.uint32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(u >= 0x80000000, 0xFFFFFFFF - u, u + 0x80000000)


@triton.jit
def _pow2(e):
    """2**e as float64, for an int64 e in the normal range."""
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _positive(w):
    return tl.where((w == w) & (tl.abs(w) < float("inf")) & (w > 0.0), w, 0.0)


@triton.jit
def _noise(seed, step_lo_arg, seed_ptr, step_ptr, SEED_FROM_PTR: tl.constexpr, STEP_FROM_PTR: tl.constexpr):
    """(seed, step mod 2**32): the host ints, or the 0-d device tensors."""
    step_lo = step_lo_arg
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    if STEP_FROM_PTR:
        step_lo = tl.load(step_ptr) & 0xFFFFFFFF
    return seed, step_lo


@triton.jit
def _store_keys(
    w, v, j, inb, seed, step_lo, noise_offset, keys_ptr, scratch_ptr, SAMPLE: tl.constexpr, HIST: tl.constexpr
):
    """The selection key of positions j: w (topk) or v / E (sample, E of the
    noise of counter noise_offset + j), float64 ->
    float32; stored, and its top 8 bits counted into the first histogram: with
    HIST by a 256-bin histogram of the block (its non-zero bins added), else
    (a few positions per program, the cross-entropy epilogue) one atomic per key."""
    if SAMPLE:
        x0, _ = philox_words(seed, j + noise_offset, step_lo, STREAM_SELECT)
        e = -tl.log(uniform(x0).to(tl.float64))
        key = (v / e).to(tl.float32)
    else:
        key = w
    k = _ordered_key(key)
    tl.store(keys_ptr + j, k, mask=inb)
    if HIST:
        hist = tl.histogram((k >> 24).to(tl.int32), 256, mask=inb)
        tl.atomic_add(scratch_ptr + tl.arange(0, 256), hist.to(tl.int64), mask=hist != 0)
    else:
        tl.atomic_add(scratch_ptr + (k >> 24), tl.full(k.shape, 1, tl.int64), mask=inb)


@triton.jit
def _threshold(scratch_ptr, b, PASSES: tl.constexpr):
    """(prefix, remaining) after PASSES 8-bit digits of the b-th largest key:
    the bits found so far, and how many of the keys sharing them to take."""
    bins = tl.arange(0, 256)
    prefix = tl.zeros((), tl.int64)
    remaining = tl.zeros((), tl.int64) + b
    for p in tl.static_range(PASSES):
        hist = tl.load(scratch_ptr + p * 256 + bins)
        from_top = tl.cumsum(hist, 0, reverse=True)
        digit = tl.max(tl.where(from_top >= remaining, bins, -1), 0).to(tl.int64)
        remaining -= tl.sum(tl.where(bins > digit, hist, 0), 0)
        prefix = prefix | (digit << (24 - 8 * p))
    return prefix, remaining


# The arguments of ``observe`` that kernels pass through: UPDATE, one tuple of
# runtime values (Triton binds a tuple argument element by element), and MODE,
# one constexpr tuple of flags. ``observe_args`` builds both on the host.
UPDATE = ("ids_ptr", "state_ptr", "err_ptr", "N", "beta1", "one_m_beta1", "beta2", "one_m_beta2", "lam", "w_min",
          "weights_out_ptr", "keys_ptr", "scratch_ptr", "seed", "step_lo_arg", "seed_ptr", "step_ptr",
          "noise_offset")  # fmt: skip
MODE = ("DO_UPDATE", "DO_SELECT", "SAMPLE", "EPS_MIX", "SEED_FROM_PTR", "STEP_FROM_PTR")


def observe_args(stand_in, **values) -> dict:
    """``upd`` and ``MODE`` for a kernel that calls ``observe``: the given
    values by name; a pointer not given is ``stand_in`` (any tensor, not
    read), a number 0, a flag False."""
    upd = tuple(values.get(f, stand_in if f.endswith("_ptr") else 0) for f in UPDATE)
    return dict(upd=upd, MODE=tuple(bool(values.get(f, False)) for f in MODE))


@triton.jit
def observe(loss, scored, j, inb, upd, MODE: tl.constexpr, HIST: tl.constexpr):
    """Per position j (those with inb) of one program, from its float32 loss:
    the update of section 3 (positions without ``scored`` skipped, weight 0),
    the weight, and the selection key with its first histogram (or, with the
    exploration mix, the weights' max). Shared by observe_kernel and the
    cross-entropy kernel's epilogue (es_step from [B, C] logits in one launch).
    ``upd`` holds the values named in UPDATE, ``MODE`` the flags named in MODE."""
    (ids_ptr, state_ptr, err_ptr, N, beta1, one_m_beta1, beta2, one_m_beta2, lam, w_min,
     weights_out_ptr, keys_ptr, scratch_ptr, seed, step_lo_arg, seed_ptr, step_ptr, noise_offset) = upd  # fmt: skip
    DO_UPDATE: tl.constexpr = MODE[0]
    DO_SELECT: tl.constexpr = MODE[1]
    SAMPLE: tl.constexpr = MODE[2]
    EPS_MIX: tl.constexpr = MODE[3]
    SEED_FROM_PTR: tl.constexpr = MODE[4]
    STEP_FROM_PTR: tl.constexpr = MODE[5]
    if DO_UPDATE:
        i = tl.load(ids_ptr + j, mask=inb, other=0).to(tl.int64)
        active = inb & scored  # a row with no token to score is skipped
        in_range = (i >= 0) & (i < N)
        finite = (loss == loss) & (tl.abs(loss) < float("inf"))
        cand = active & in_range & finite
        pair = tl.arange(0, 2)
        offs = i[:, None] * 2 + pair[None, :]
        s_old, d_old = tl.split(tl.load(state_ptr + offs, mask=cand[:, None], other=0.0))
        unseen = s_old != s_old
        s_upd = beta1 * s_old + one_m_beta1 * loss
        d_upd = beta2 * d_old + one_m_beta2 * (loss - s_old)
        s_new = tl.where(unseen, loss, s_upd)
        d_new = tl.where(unseen, 0.0, d_upd)
        w_raw = s_new + lam * d_new
        w_new = tl.where(w_raw < w_min, w_min, w_raw)  # NaN stays NaN
        ok = (
            (tl.abs(s_new) < float("inf")) & (tl.abs(d_new) < float("inf")) & (tl.abs(w_new) < float("inf"))
        )  # False for NaN too
        good = cand & ok
        tl.store(state_ptr + offs, tl.join(s_new, d_new), mask=good[:, None])
        n_out = tl.sum((active & ~in_range).to(tl.int64), 0)
        n_bad = tl.sum((active & in_range & ~good).to(tl.int64), 0)
        tl.atomic_add(err_ptr, n_out, mask=n_out != 0)  # most programs add nothing: no atomic
        tl.atomic_add(err_ptr + 1, n_bad, mask=n_bad != 0)
        w = tl.where(good, w_new, tl.where(active, w_min, 0.0))
        tl.store(weights_out_ptr + j, w, mask=inb)
    else:
        w = loss  # weighted_select: the input is the weights
    if DO_SELECT:
        if EPS_MIX:  # the max of the positive weights (float32 bits of non-negatives order as ints)
            big = tl.max(tl.where(inb, _positive(w), 0.0), 0)
            tl.atomic_max(scratch_ptr + MIX_MAX, big.to(tl.int32, bitcast=True).to(tl.int64))
        else:
            seed, step_lo = _noise(seed, step_lo_arg, seed_ptr, step_ptr, SEED_FROM_PTR, STEP_FROM_PTR)
            _store_keys(w, w.to(tl.float64), j, inb, seed, step_lo, noise_offset, keys_ptr, scratch_ptr, SAMPLE, HIST)


@triton.jit
def _kept_tokens(tok_ptr, targets_ptr, mask_ptr, row, t, inb, T, ignore_index,
                 HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """(keep, float32 value) of the tokens t of the rows at offsets ``row``."""
    keep = inb[:, None] & (t < T)
    if HAS_TARGETS:
        keep = keep & (tl.load(targets_ptr + (row + t), mask=keep, other=0) != ignore_index)
    elif HAS_MASK:
        keep = keep & (tl.load(mask_ptr + (row + t), mask=keep, other=0) != 0)
    return keep, tl.load(tok_ptr + (row + t), mask=keep, other=0.0).to(tl.float32)


@triton.jit
def _sequence_means(tok_ptr, targets_ptr, mask_ptr, j, inb, T, ignore_index, mean_bits,
                    HAS_TARGETS: tl.constexpr, HAS_MASK: tl.constexpr, TBLOCK: tl.constexpr):  # fmt: skip
    """(mean, scored) of the rows j of token values [B, T] over the tokens kept
    (targets != ignore_index, or the mask, or all): the exact fixed-point mean
    of docs/spec.md section 6, vectorised over T (tiles of [rows, TBLOCK]; the
    integer sum does not depend on the order): a pass for the max |x| and the
    non-finite flags, a pass for the sum of trunc(x 2**(K - e))."""
    row = j[:, None] * T  # one 64-bit offset per row; the tiles add t
    tt = tl.arange(0, TBLOCK)[None, :]
    big = tl.zeros(row.shape, tl.float32) + tl.zeros((1, TBLOCK), tl.float32)
    flags = tl.zeros(big.shape, tl.int32)  # 1: NaN, 2: +inf, 4: -inf
    cnt = tl.zeros(big.shape, tl.int32)
    for t0 in range(0, T, TBLOCK):
        keep, x = _kept_tokens(
            tok_ptr, targets_ptr, mask_ptr, row, t0 + tt, inb, T, ignore_index, HAS_TARGETS, HAS_MASK
        )
        big = tl.maximum(big, tl.where(keep & (tl.abs(x) < float("inf")), tl.abs(x), 0.0))
        flags |= tl.where(keep & (x != x), 1, 0) | tl.where(keep & (x == float("inf")), 2, 0)
        flags |= tl.where(keep & (x == float("-inf")), 4, 0)
        cnt += keep.to(tl.int32)
    a = tl.max(big, 1)
    f = tl.reduce_or(flags, 1)
    count = tl.sum(cnt, 1)
    # frexp exponent (a < 2**e; a float32 >= 2**-149 has e >= -148, the clamp only serves a == 0)
    e = tl.maximum(((a.to(tl.float64).to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022, -148)
    up = _pow2(mean_bits - e)
    q = tl.zeros(big.shape, tl.int64)
    for t0 in range(0, T, TBLOCK):
        keep, x = _kept_tokens(
            tok_ptr, targets_ptr, mask_ptr, row, t0 + tt, inb, T, ignore_index, HAS_TARGETS, HAS_MASK
        )
        fin = keep & (tl.abs(x) < float("inf"))
        q += (tl.where(fin, x, 0.0).to(tl.float64) * up[:, None]).to(tl.int64)  # toward zero; |q| < 2**K
    mean = (tl.sum(q, 1).to(tl.float64) * _pow2(e - mean_bits) / tl.maximum(count, 1).to(tl.float64)).to(tl.float32)
    mean = tl.where(a == 0.0, 0.0, mean)
    mean = tl.where((f & 4) != 0, float("-inf"), mean)
    mean = tl.where((f & 2) != 0, float("inf"), mean)
    mean = tl.where(((f & 1) != 0) | ((f & 6) == 6), float("nan"), mean)
    return tl.where(count > 0, mean, 0.0), count > 0


@triton.jit(do_not_specialize=["T", "B", "ignore_index", "mean_bits"])
def observe_kernel(
    tok_ptr,  # token values [B * T] (or losses / weights [B])
    targets_ptr,
    mask_ptr,
    T,
    ignore_index,
    mean_bits,
    B,
    losses_out_ptr,
    upd,  # observe's values (UPDATE)
    HAS_TARGETS: tl.constexpr,
    TOKENS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STORE_LOSSES: tl.constexpr,
    MODE: tl.constexpr,  # observe's flags (MODE)
    BLOCK: tl.constexpr,
    TBLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = j < B
    if HAS_TARGETS or TOKENS:  # per-row means of token values over the kept tokens
        loss, scored = _sequence_means(
            tok_ptr, targets_ptr, mask_ptr, j, inb, T, ignore_index, mean_bits, HAS_TARGETS, HAS_MASK, TBLOCK
        )
    else:
        loss = tl.load(tok_ptr + j, mask=inb, other=0.0).to(tl.float32)
        scored = inb
    if STORE_LOSSES:
        tl.store(losses_out_ptr + j, loss, mask=inb)
    observe(loss, scored, j, inb, upd, MODE, BLOCK > 16)


def observe_config(B: int, T: int, tokens: bool) -> tuple[tuple[int], dict]:
    """(grid, block constexprs) of observe_kernel: BLOCK positions per program
    (at most 128, and 64 with tokens), and with token values TBLOCK tokens
    of each per tile (at least 16), so a tile holds at most 1024 values (a
    sequence of 2048 tokens: one row per program, two tiles per pass). Tiles
    of 128 or 64 rows of 4 tokens, and 1024 rows, left ptxas a stack frame
    or a 4-byte spill in some sm_90a variants (the AOT test)."""
    tblock = max(16, min(triton.next_power_of_2(max(T, 1)), 1024)) if tokens else 1
    block = max(1, min(64 if tokens else 128, 1024 // tblock))
    return (triton.cdiv(B, block),), dict(BLOCK=block, TBLOCK=tblock)


@triton.jit
def _mix_exponent(scratch_ptr):
    """e with 2**(e-1) <= M < 2**e for the max positive weight M (from its float32 bits)."""
    big = tl.load(scratch_ptr + MIX_MAX).to(tl.int32).to(tl.float32, bitcast=True)
    return ((big.to(tl.float64).to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022, big


@triton.jit(do_not_specialize=["B"])
def mix_sum_kernel(w_ptr, B, scratch_ptr, BLOCK: tl.constexpr):
    """The exploration mix's exact fixed-point sum of floor(w+ 2**(31 - e))."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    e, big = _mix_exponent(scratch_ptr)
    up = _pow2(-e + SELECT_BITS)  # tensor first: the interpreter would wrap constexpr - tensor
    wp = _positive(tl.load(w_ptr + j, mask=j < B, other=0.0).to(tl.float32)).to(tl.float64)
    q = tl.where(big > 0.0, (wp * up).to(tl.int64), 0)  # wp * up >= 0: the cast is floor
    tl.atomic_add(scratch_ptr + MIX_SUM, tl.sum(q, 0))


@triton.jit(do_not_specialize=["B", "seed", "step_lo_arg", "eps_bits", "one_m_eps_bits", "noise_offset"])
def mix_keys_kernel(
    w_ptr,
    B,
    scratch_ptr,
    keys_ptr,
    eps_bits,
    one_m_eps_bits,
    seed,
    step_lo_arg,
    seed_ptr,
    step_ptr,
    noise_offset,
    SEED_FROM_PTR: tl.constexpr,
    STEP_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Keys of the exploration mix v = ((1 - eps) w+) / mean + eps (v = 1 when
    every w+ is 0; v = +inf for a +inf weight, a priority)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = j < B
    e, big = _mix_exponent(scratch_ptr)
    eps = (tl.zeros((), tl.int64) + eps_bits).to(tl.float64, bitcast=True)
    one_m_eps = (tl.zeros((), tl.int64) + one_m_eps_bits).to(tl.float64, bitcast=True)
    mean = tl.load(scratch_ptr + MIX_SUM).to(tl.float64) * _pow2(e - SELECT_BITS) / B
    w = tl.load(w_ptr + j, mask=inb, other=0.0).to(tl.float32)
    v = tl.where(big == 0.0, 1.0, (one_m_eps * _positive(w).to(tl.float64)) / mean + eps)
    v = tl.where(w == float("inf"), float("inf"), v)
    seed, step_lo = _noise(seed, step_lo_arg, seed_ptr, step_ptr, SEED_FROM_PTR, STEP_FROM_PTR)
    _store_keys(w, v, j, inb, seed, step_lo, noise_offset, keys_ptr, scratch_ptr, True, True)


@triton.jit(do_not_specialize=["B", "N", "now_arg", "max_age", "cap"])
def state_weights_kernel(
    ids_ptr,
    state_ptr,
    err_ptr,
    B,
    N,
    lam,
    w_min,
    now_arg,
    step_ptr,
    last_seen_ptr,
    max_age,
    picks_ptr,
    cap,
    w_out_ptr,
    NOW_FROM_PTR: tl.constexpr,
    AGE: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The weight of each id from its stored (s, d), without an update
    (docs/spec.md section 12.2): +inf when never observed or due (AGE: not
    observed for more than max_age steps), 0 when capped (CAP: picked cap
    times since its last refresh), else max(s + lam d, w_min); an id out of
    range gets w_min and is counted in errors[0]."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = j < B
    i = tl.load(ids_ptr + j, mask=inb, other=0).to(tl.int64)
    in_range = (i >= 0) & (i < N)
    ok = inb & in_range
    pair = tl.arange(0, 2)
    s, d = tl.split(tl.load(state_ptr + (i[:, None] * 2 + pair[None, :]), mask=ok[:, None], other=0.0))
    w_raw = s + lam * d
    w = tl.where(w_raw < w_min, w_min, w_raw)
    due = s != s
    if AGE:
        if NOW_FROM_PTR:
            now = tl.load(step_ptr)
        else:
            now = tl.zeros((), tl.int64) + now_arg
        seen = tl.load(last_seen_ptr + i, mask=ok, other=0)
        due = due | ((now - seen) > max_age)  # int64, wrapping
    if CAP:
        w = tl.where(tl.load(picks_ptr + i, mask=ok, other=0) >= cap, 0.0, w)
    w = tl.where(due, float("inf"), w)
    tl.store(w_out_ptr + j, tl.where(ok, w, w_min), mask=inb)
    n_out = tl.sum((inb & ~in_range).to(tl.int64), 0)
    tl.atomic_add(err_ptr, n_out, mask=n_out != 0)


@triton.jit(do_not_specialize=["B", "b"])
def radix_hist_kernel(keys_ptr, B, scratch_ptr, b, PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of digit PASS (bits 31 - 8 PASS .. 24 - 8 PASS) of the keys
    that share the prefix of the b-th largest key found by the passes before."""
    prefix, _ = _threshold(scratch_ptr, b, PASS)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(keys_ptr + j, mask=j < B, other=0)
    shift = 24 - 8 * PASS
    match = (j < B) & ((k >> (shift + 8)) == (prefix >> (shift + 8)))
    hist = tl.histogram(((k >> shift) & 255).to(tl.int32), 256, mask=match)
    tl.atomic_add(scratch_ptr + PASS * 256 + tl.arange(0, 256), hist.to(tl.int64))


@triton.jit(do_not_specialize=["B", "b", "P"])
def select_count_kernel(keys_ptr, B, scratch_ptr, b, counts_ptr, P, BLOCK: tl.constexpr):
    """Per block: how many keys lie above the threshold (the b-th largest key) and on it."""
    prefix, _ = _threshold(scratch_ptr, b, 4)
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(keys_ptr + j, mask=j < B, other=0)
    tl.store(counts_ptr + pid, tl.sum(((j < B) & (k > prefix)).to(tl.int64), 0))
    tl.store(counts_ptr + P + pid, tl.sum(((j < B) & (k == prefix)).to(tl.int64), 0))


@triton.jit(do_not_specialize=["B", "b", "P"])
def select_write_kernel(
    keys_ptr,
    B,
    scratch_ptr,
    b,
    counts_ptr,
    P,
    pos_out_ptr,
    step_ptr,
    ADVANCE_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    """The selected positions in ascending order: keys above the threshold,
    then the lowest positions among the keys equal to it."""
    prefix, remaining = _threshold(scratch_ptr, b, 4)
    pid = tl.program_id(0)
    gt_before = tl.zeros((), tl.int64)
    eq_before = tl.zeros((), tl.int64)
    for start in range(0, P, PBLOCK):
        q = start + tl.arange(0, PBLOCK)
        before = q < pid
        gt_before += tl.sum(tl.load(counts_ptr + q, mask=before, other=0), 0)
        eq_before += tl.sum(tl.load(counts_ptr + P + q, mask=before, other=0), 0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(keys_ptr + j, mask=j < B, other=0)
    gt = (j < B) & (k > prefix)
    eq = (j < B) & (k == prefix)
    eq_rank = eq_before + tl.cumsum(eq.to(tl.int64), 0) - eq.to(tl.int64)
    sel = gt | (eq & (eq_rank < remaining))
    out = gt_before + tl.minimum(eq_before, remaining) + tl.cumsum(sel.to(tl.int64), 0) - 1
    tl.store(pos_out_ptr + out, j, mask=sel)
    if ADVANCE_STEP:
        if pid == 0:  # every program of the earlier launches has read the step
            tl.store(step_ptr, tl.load(step_ptr) + 1)
