"""State update (ES_SPEC section 3) and selection (section 4) in one program.

One kernel serves es_update, weighted_select, es_step_losses and the second
launch of es_step (after the cross-entropy kernel):

1. per position j: the loss (the mean of the sequence's non-ignored token
   losses when targets are given), the update of s, d for ids[j], the weight,
   and the selection key as an order-preserving uint32 (stored as int64);
2. a radix select (four 8-bit histogram passes) finds the b-th largest key
   and how many of the keys equal to it to take, lowest positions first;
3. a compaction pass writes the selected positions in ascending order.

All of it in a single program, so no grid-wide synchronisation and no host
round-trip is needed; the errors counters are written once at the end.
"""
import triton
import triton.language as tl

from .philox import philox_words, uniform


@triton.jit
def _ordered_key(k):
    """float32 key -> order-preserving uint32 in int64; NaN as -inf, -0 as +0."""
    k = tl.where(k != k, float("-inf"), k)
    k = tl.where(k == 0.0, 0.0, k)
    u = k.to(tl.uint32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(u >= 0x80000000, 0xFFFFFFFF - u, u + 0x80000000)


@triton.jit(do_not_specialize=["T", "B", "N", "b", "seed", "step_lo", "ignore_index"])
def update_select_kernel(
    tok_ptr, targets_ptr, T, ignore_index,  # token losses [B * T] (or losses / weights [B])
    ids_ptr, B, s_ptr, d_ptr, err_ptr, N,
    beta1, one_m_beta1, beta2, one_m_beta2, w_min,
    losses_out_ptr, weights_out_ptr, keys_ptr, pos_out_ptr, b, seed, step_lo,
    HAS_TARGETS: tl.constexpr, STORE_LOSSES: tl.constexpr, DO_UPDATE: tl.constexpr, DO_SELECT: tl.constexpr,
    SAMPLE: tl.constexpr, BLOCK: tl.constexpr,
):
    bad_ids = tl.zeros((), tl.int64)
    bad_losses = tl.zeros((), tl.int64)
    # ---- 1. losses, update, weights, keys ----
    for start in range(0, B, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        inb = j < B
        if HAS_TARGETS:
            acc = tl.zeros((BLOCK,), tl.float32)
            cnt = tl.zeros((BLOCK,), tl.int32)
            for t in range(0, T):
                tg = tl.load(targets_ptr + j * T + t, mask=inb, other=ignore_index)
                keep = tg != ignore_index
                acc += tl.where(keep, tl.load(tok_ptr + j * T + t, mask=inb & keep, other=0.0), 0.0)
                cnt += keep.to(tl.int32)
            loss = tl.where(cnt > 0, acc / tl.maximum(cnt, 1).to(tl.float32), 0.0)
        else:
            loss = tl.load(tok_ptr + j, mask=inb, other=0.0).to(tl.float32)
        if STORE_LOSSES:
            tl.store(losses_out_ptr + j, loss, mask=inb)
        if DO_UPDATE:
            i = tl.load(ids_ptr + j, mask=inb, other=0).to(tl.int64)
            in_range = (i >= 0) & (i < N)
            finite = (loss == loss) & (tl.abs(loss) < float("inf"))
            good = inb & in_range & finite
            bad_ids += tl.sum((inb & ~in_range).to(tl.int64), 0)
            bad_losses += tl.sum((inb & in_range & ~finite).to(tl.int64), 0)
            s_old = tl.load(s_ptr + i, mask=good, other=0.0)
            d_old = tl.load(d_ptr + i, mask=good, other=0.0)
            unseen = s_old != s_old
            s_upd = beta1 * s_old + one_m_beta1 * loss
            d_upd = beta2 * d_old + one_m_beta2 * (loss - s_old)
            s_new = tl.where(unseen, loss, s_upd)
            d_new = tl.where(unseen, 0.0, d_upd)
            tl.store(s_ptr + i, s_new, mask=good)
            tl.store(d_ptr + i, d_new, mask=good)
            w_raw = s_new + d_new
            w = tl.where(good, tl.where(w_raw < w_min, w_min, w_raw), w_min)  # NaN stays NaN
            tl.store(weights_out_ptr + j, w, mask=inb)
        else:
            w = loss  # weighted_select: the input is the weights
        if DO_SELECT:
            if SAMPLE:
                x0, _ = philox_words(seed, j, step_lo, 0)
                e = -tl.log(uniform(x0).to(tl.float64))
                key = (w.to(tl.float64) / e).to(tl.float32)
            else:
                key = w
            tl.store(keys_ptr + j, _ordered_key(key), mask=inb)
    if DO_UPDATE:
        tl.store(err_ptr, tl.load(err_ptr) + bad_ids)
        tl.store(err_ptr + 1, tl.load(err_ptr + 1) + bad_losses)
    if DO_SELECT:
        # ---- 2. radix select of the b-th largest key ----
        bins = tl.arange(0, 256)
        prefix = tl.zeros((), tl.int64)
        remaining = tl.zeros((), tl.int64) + b
        for p in tl.static_range(4):
            shift = 24 - 8 * p  # a constexpr (p is); annotating it fails to compile: reassigned per unrolled step
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
        # ---- 3. compaction: keys above the threshold, then the lowest
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
