"""ESWP pruning (ES_SPEC section 7) on the device: block partial sums of the
observed scores, then one program per block that derives the mean (every
program sums the partials in the same order), decides the drops, writes the
scales and the sort key that orders kept ids by their Philox word and puts
dropped ids after them. torch.sort on the device finishes the order."""
import triton
import triton.language as tl

from .philox import philox_words


@triton.jit
def prune_partials_kernel(s_ptr, d_ptr, N, psum_ptr, pcnt_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(s_ptr + i, mask=i < N, other=float("nan"))
    d = tl.load(d_ptr + i, mask=i < N, other=0.0)
    observed = s == s
    score = (s + d).to(tl.float64)
    tl.store(psum_ptr + pid, tl.sum(tl.where(observed, score, 0.0), 0))
    tl.store(pcnt_ptr + pid, tl.sum(observed.to(tl.int64), 0))


@triton.jit(do_not_specialize=["N", "P", "seed", "epoch_lo", "drop_below"])
def prune_decide_kernel(s_ptr, d_ptr, N, psum_ptr, pcnt_ptr, P, seed, epoch_lo, drop_below,
                        kept_scale, scale_ptr, sort_key_ptr, ANNEALING: tl.constexpr,
                        BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    total = tl.zeros((), tl.float64)
    count = tl.zeros((), tl.int64)
    for start in range(0, P, PBLOCK):
        q = start + tl.arange(0, PBLOCK)
        total += tl.sum(tl.load(psum_ptr + q, mask=q < P, other=0.0), 0)
        count += tl.sum(tl.load(pcnt_ptr + q, mask=q < P, other=0), 0)
    tau = total / count.to(tl.float64)  # NaN when nothing is observed: nothing is below it
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = i < N
    s = tl.load(s_ptr + i, mask=inb, other=float("nan"))
    d = tl.load(d_ptr + i, mask=inb, other=0.0)
    below = (s == s) & ((s + d).to(tl.float64) < tau)
    if ANNEALING:
        below = below & False
    x0, x1 = philox_words(seed, i, epoch_lo, 1)
    # u < r exactly <=> (x0 >> 9) < drop_below, drop_below computed on the host
    dropped = below & ((x0 >> 9).to(tl.int64) < drop_below)
    scale = tl.where(dropped, 0.0, tl.where(below, kept_scale, 1.0))
    tl.store(scale_ptr + i, scale, mask=inb)
    key = tl.where(dropped, 4294967296 + i, x1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(sort_key_ptr + i, key, mask=inb)
