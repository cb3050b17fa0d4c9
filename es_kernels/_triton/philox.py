"""Philox noise of the project's counter layout (see es_kernels.reference):
key = seed, counter = (j mod 2**32, j >> 32, step mod 2**32, stream)."""

import triton
import triton.language as tl


@triton.jit
def philox_words(seed, j, step_lo, stream: tl.constexpr):
    """The first two 32-bit Philox words for positions or sample ids ``j``
    (int64 >= 0: ids reach 2**48, so the high word counts)."""
    c0 = j.to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + step_lo.to(tl.uint32)
    x0, x1, _, _ = tl.philox(seed, c0, c1, c2, zero + stream)
    return x0, x1


@triton.jit
def uniform(x):
    """(x >> 9) * 2**-23 + 2**-24 in (0, 1), exact in float32."""
    return (x >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08
