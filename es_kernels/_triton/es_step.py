"""State update (docs/spec.md section 3) and selection (section 4) in one program.

One kernel serves es_update, weighted_select, es_step_from_losses and the
second launch of es_step (after the cross-entropy kernel):

1. per position j: the loss (the mean of the row's scored token losses when
   targets, or token losses with an optional mask, are given; a row with
   none is skipped by the update), the update of the (s, d) pair of ids[j]
   (one 8-byte load and store of the pair), the weight, and, without the
   exploration mix, the selection key as an order-preserving uint32 (in int64);
2. with the exploration mix (eps > 0): the exact fixed-point mean of the
   weights (section 4), then the keys;
3. a radix select (four 8-bit histogram passes) finds the b-th largest key
   and how many of the keys equal to it to take, lowest positions first;
4. a compaction pass writes the selected positions in ascending order.

All of it in a single program, so no grid-wide synchronisation and no host
round-trip is needed; the errors counters and the step counter are written
once at the end. ``seed`` and ``step`` come as host ints or are loaded from
0-d device tensors; float64 constants come as their bit patterns (a Python
float argument would reach the kernel as float32).
"""
import triton
import triton.language as tl

from .. import _spec
from .philox import philox_words, uniform

SELECT_BITS = tl.constexpr(_spec.SELECT_MEAN_BITS)
STREAM_SELECT = tl.constexpr(_spec.STREAM_SELECT)


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
def _key(w, v, j, seed, step_lo, SAMPLE: tl.constexpr):
    """The selection key of positions j: w (topk) or v / E (sample), float64 -> float32."""
    if SAMPLE:
        x0, _ = philox_words(seed, j, step_lo, STREAM_SELECT)
        e = -tl.log(uniform(x0).to(tl.float64))
        key = (v / e).to(tl.float32)
    else:
        key = w
    return _ordered_key(key)


@triton.jit(do_not_specialize=["T", "B", "N", "b", "seed", "step_lo_arg", "ignore_index", "eps_bits",
                               "one_m_eps_bits"])
def update_select_kernel(
    tok_ptr, targets_ptr, mask_ptr, T, ignore_index,  # token losses [B * T] (or losses / weights [B])
    ids_ptr, B, state_ptr, err_ptr, N,
    beta1, one_m_beta1, beta2, one_m_beta2, lam, w_min,
    losses_out_ptr, weights_out_ptr, keys_ptr, pos_out_ptr, b,
    seed, step_lo_arg, seed_ptr, step_ptr, eps_bits, one_m_eps_bits,
    HAS_TARGETS: tl.constexpr, TOKENS: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_LOSSES: tl.constexpr, DO_UPDATE: tl.constexpr,
    DO_SELECT: tl.constexpr, SAMPLE: tl.constexpr, EPS_MIX: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, STEP_FROM_PTR: tl.constexpr, ADVANCE_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    step_lo = step_lo_arg  # the host int step mod 2**32
    if STEP_FROM_PTR:
        step_val = tl.load(step_ptr)
        step_lo = step_val & 0xFFFFFFFF
    bad_ids = tl.zeros((), tl.int64)
    bad_obs = tl.zeros((), tl.int64)
    big = tl.zeros((), tl.float32)
    pair = tl.arange(0, 2)
    # ---- 1. losses, update, weights (and keys without the mix) ----
    for start in range(0, B, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        inb = j < B
        if HAS_TARGETS or TOKENS:  # per-row means of token losses over the scored tokens
            if TOKENS:
                acc = tl.zeros((BLOCK,), tl.float64)
            else:
                acc = tl.zeros((BLOCK,), tl.float32)
            cnt = tl.zeros((BLOCK,), tl.int32)
            for t in range(0, T):
                if TOKENS:
                    if HAS_MASK:
                        keep = inb & (tl.load(mask_ptr + j * T + t, mask=inb, other=0) != 0)
                    else:
                        keep = inb
                else:
                    keep = tl.load(targets_ptr + j * T + t, mask=inb, other=ignore_index) != ignore_index
                x = tl.load(tok_ptr + j * T + t, mask=inb & keep, other=0.0)
                acc += tl.where(keep, x.to(acc.dtype), 0.0)
                cnt += keep.to(tl.int32)
            loss = tl.where(cnt > 0, (acc / tl.maximum(cnt, 1).to(acc.dtype)).to(tl.float32), 0.0)
            scored = cnt > 0
        else:
            loss = tl.load(tok_ptr + j, mask=inb, other=0.0).to(tl.float32)
            scored = inb
        if STORE_LOSSES:
            tl.store(losses_out_ptr + j, loss, mask=inb)
        if DO_UPDATE:
            i = tl.load(ids_ptr + j, mask=inb, other=0).to(tl.int64)
            active = inb & scored  # a row with no token to score is skipped
            in_range = (i >= 0) & (i < N)
            finite = (loss == loss) & (tl.abs(loss) < float("inf"))
            cand = active & in_range & finite
            offs = i[:, None] * 2 + pair[None, :]
            s_old, d_old = tl.split(tl.load(state_ptr + offs, mask=cand[:, None], other=0.0))
            unseen = s_old != s_old
            s_upd = beta1 * s_old + one_m_beta1 * loss
            d_upd = beta2 * d_old + one_m_beta2 * (loss - s_old)
            s_new = tl.where(unseen, loss, s_upd)
            d_new = tl.where(unseen, 0.0, d_upd)
            w_raw = s_new + lam * d_new
            w_new = tl.where(w_raw < w_min, w_min, w_raw)  # NaN stays NaN
            ok = ((tl.abs(s_new) < float("inf")) & (tl.abs(d_new) < float("inf"))
                  & (tl.abs(w_new) < float("inf")))  # False for NaN too
            good = cand & ok
            tl.store(state_ptr + offs, tl.join(s_new, d_new), mask=good[:, None])
            bad_ids += tl.sum((active & ~in_range).to(tl.int64), 0)
            bad_obs += tl.sum((active & in_range & ~good).to(tl.int64), 0)
            w = tl.where(good, w_new, tl.where(active, w_min, 0.0))
            tl.store(weights_out_ptr + j, w, mask=inb)
        else:
            w = loss  # weighted_select: the input is the weights
        if DO_SELECT:
            if EPS_MIX:
                big = tl.maximum(big, tl.max(tl.where(inb, _positive(w), 0.0), 0))
            else:
                tl.store(keys_ptr + j, _key(w, w.to(tl.float64), j, seed, step_lo, SAMPLE), mask=inb)
    if DO_UPDATE:
        tl.store(err_ptr, tl.load(err_ptr) + bad_ids)
        tl.store(err_ptr + 1, tl.load(err_ptr + 1) + bad_obs)
    if DO_SELECT:
        if EPS_MIX:
            # ---- 2. the exploration mix with the exact fixed-point mean ----
            w_src = weights_out_ptr if DO_UPDATE else tok_ptr
            eps = (tl.zeros((), tl.int64) + eps_bits).to(tl.float64, bitcast=True)
            one_m_eps = (tl.zeros((), tl.int64) + one_m_eps_bits).to(tl.float64, bitcast=True)
            e = ((big.to(tl.float64).to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022
            up = _pow2(-e + SELECT_BITS)  # tensor first: the interpreter would wrap constexpr - tensor
            q = tl.zeros((), tl.int64)
            for start in range(0, B, BLOCK):
                j = start + tl.arange(0, BLOCK).to(tl.int64)
                wp = _positive(tl.load(w_src + j, mask=j < B, other=0.0).to(tl.float32)).to(tl.float64)
                q += tl.sum((wp * up).to(tl.int64), 0)  # wp * up >= 0: the cast is floor
            mean = q.to(tl.float64) * _pow2(e - SELECT_BITS) / B
            for start in range(0, B, BLOCK):
                j = start + tl.arange(0, BLOCK).to(tl.int64)
                w = tl.load(w_src + j, mask=j < B, other=0.0).to(tl.float32)
                v = (one_m_eps * _positive(w).to(tl.float64)) / mean + eps
                v = tl.where(big == 0.0, 1.0, v)
                tl.store(keys_ptr + j, _key(w, v, j, seed, step_lo, SAMPLE), mask=j < B)
        # ---- 3. radix select of the b-th largest key ----
        bins = tl.arange(0, 256)
        prefix = tl.zeros((), tl.int64)
        remaining = tl.zeros((), tl.int64) + b
        for p in tl.static_range(4):
            shift = 24 - 8 * p
            hist = tl.zeros((256,), tl.int32)
            for start in range(0, B, BLOCK):
                j = start + tl.arange(0, BLOCK).to(tl.int64)
                k = tl.load(keys_ptr + j, mask=j < B, other=0)
                match = (j < B) & ((k >> (shift + 8)) == (prefix >> (shift + 8)))
                hist += tl.histogram(((k >> shift) & 255).to(tl.int32), 256, mask=match)
            from_top = tl.cumsum(hist, 0, reverse=True)
            digit = tl.max(tl.where(from_top >= remaining, bins, -1), 0)
            remaining -= tl.sum(tl.where(bins > digit, hist, 0), 0).to(tl.int64)
            prefix = prefix | (digit.to(tl.int64) << shift)
        # ---- 4. compaction: keys above the threshold, then the lowest
        # positions among the keys equal to it ----
        n_sel = tl.zeros((), tl.int64)
        n_eq = tl.zeros((), tl.int64)
        for start in range(0, B, BLOCK):
            j = start + tl.arange(0, BLOCK).to(tl.int64)
            k = tl.load(keys_ptr + j, mask=j < B, other=0)
            gt = (j < B) & (k > prefix)
            eq = (j < B) & (k == prefix)
            eq_rank = n_eq + tl.cumsum(eq.to(tl.int64), 0) - eq.to(tl.int64)
            sel = gt | (eq & (eq_rank < remaining))
            out = n_sel + tl.cumsum(sel.to(tl.int64), 0) - 1
            tl.store(pos_out_ptr + out, j, mask=sel)
            n_sel += tl.sum(sel.to(tl.int64), 0)
            n_eq += tl.sum(eq.to(tl.int64), 0)
    if ADVANCE_STEP:
        tl.store(step_ptr, step_val + 1)
