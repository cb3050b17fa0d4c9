"""Per-sample cross-entropy (docs/spec.md section 5): one program per token row,
online log-sum-exp over chunks of the class axis, float32 accumulation, the
logits read once, in place: token row r starts at
(r // T) * stride_b + (r % T) * stride_t (the class stride is 1).

Non-finite logits, as F.cross_entropy treats them: a -inf logit (masked
class) adds nothing to the sum of exponentials and +inf to the smoothing sum
(its log-probability is -inf), a -inf target logit gives +inf; a NaN or +inf
logit, or a row of -inf only, gives NaN. An ignored row is not read."""

import triton
import triton.language as tl


@triton.jit
def ce_token_kernel(
    logits_ptr,
    targets_ptr,
    out_ptr,
    V,
    T,
    stride_b,
    stride_t,
    ignore_index,
    one_minus_eps,
    eps_over_v,
    SMOOTH: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # only the ignored flag lives across the loop: a 64-bit target kept there
    # spilled to the stack on sm_80 (the AOT test); the target is reloaded after
    ignored = tl.load(targets_ptr + row).to(tl.int64) == ignore_index
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    n_read = tl.where(ignored, 0, V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)  # sum of exp(x - m)
    d = tl.zeros((), tl.float32)  # sum of (m - x), smoothing only: no cancellation, no overflow
    bad = tl.zeros((), tl.int32)  # NaN or +inf logits
    seen = tl.zeros((), tl.float32)  # classes before this chunk
    for start in range(0, n_read, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        bad += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)
        new_m = tl.maximum(m, tl.max(x, 0))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: nothing to rescale
        s = s * tl.exp(m - safe_m) + tl.sum(tl.where(inside, tl.exp(x - safe_m), 0.0), 0)
        if SMOOTH:
            # the earlier terms shift by new_m - m; a -inf logit adds +inf
            shift = tl.where((seen == 0.0) | (m == new_m), 0.0, seen * (new_m - m))
            d += shift + tl.sum(tl.where(inside, safe_m - x, 0.0), 0)
            seen += BLOCK_V
        m = new_m
    t = tl.load(targets_ptr + row).to(tl.int64)
    valid = (t >= 0) & (t < V)
    x_t = tl.load(base + tl.where(valid, t, 0), mask=valid & ~ignored, other=0.0).to(tl.float32)
    log_s = tl.log(s)
    loss = (m - x_t) + log_s
    if SMOOTH:  # as F.cross_entropy: (1 - eps) nll + eps / V * sum_c -log p_c
        loss = one_minus_eps * loss + eps_over_v * (d + V * log_s)
    loss = tl.where(valid & (bad == 0) & (m != float("-inf")), loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(out_ptr + row, loss)
