"""Per-sample cross-entropy (ES_SPEC section 5): one program per token row,
online log-sum-exp over chunks of the class axis, float32 accumulation, the
logits read once."""
import triton
import triton.language as tl


@triton.jit
def ce_token_kernel(logits_ptr, targets_ptr, out_ptr, V, stride_row, ignore_index, eps,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sx = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, 0))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: nothing to rescale
        s = s * tl.exp(m - safe_m) + tl.sum(tl.where(inside, tl.exp(x - safe_m), 0.0), 0)
        sx += tl.sum(tl.where(inside, x, 0.0), 0)
        m = new_m
    # read after the loop: an int64 target live across it spills on sm_80 (BLOCK_V 4096)
    t = tl.load(targets_ptr + row).to(tl.int64)
    valid = (t >= 0) & (t < V)
    x_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
    lse = m + tl.log(s)
    nll = lse - x_t
    loss = tl.where(eps == 0.0, nll, (1.0 - eps) * nll + eps * (lse - sx / V))
    finite = (sx == sx) & (tl.abs(sx) < float("inf"))
    loss = tl.where(valid & finite, loss, float("nan"))
    loss = tl.where(t == ignore_index, 0.0, loss)
    tl.store(out_ptr + row, loss)
