"""Constants and small rules of the spec (docs/spec.md) that every backend shares.

Nothing here imports a backend or the reference: the reference, the C++
launch path, the Triton launchers, the samplers and the checks all take these
from here, so a rule changes in one place (and in the spec).
"""

from __future__ import annotations

import math

# The defaults (spec sections 3, 4, 5 and 7), defined once, here: the op
# schemas (es_kernels/_ops.py), the reference, the functional API, ESState and
# the samplers all take them from here; ``es_kernels`` exports them.
# beta2 = 0.5 comes from the demo's first ablation; lam = 2 from the fixed
# rule's grid (README, "How the defaults are chosen"; bench/results/demo_ablation_rule).
DEFAULT_BETA1 = 0.2
DEFAULT_BETA2 = 0.5
DEFAULT_LAM = 2.0
DEFAULT_EPS = 0.0
DEFAULT_W_MIN = 1e-8
DEFAULT_SELECT_MODE = "sample"
DEFAULT_IGNORE_INDEX = -100
DEFAULT_LABEL_SMOOTHING = 0.0
DEFAULT_ANNEAL_FRAC = 0.125
DEFAULT_PRUNE_RATIO = 0.5  # ESWPSampler's (eswp_prune takes it without a default)

SELECT_MODES = ("sample", "topk")

# Philox streams (spec section 9): the fourth counter word.
STREAM_SELECT = 0
STREAM_PRUNE = 1  # j = sample id: x0 decides the drop
STREAM_PRUNE_ORDER = 2  # j = 0: the four words are the keys of the visit order's rounds

# Fixed-point exponents of the order-independent means (spec sections 4 and 7).
SELECT_MEAN_BITS = 31  # weights: q_j = floor(w_j * 2**(31 - e)) < 2**31
PRUNE_MEAN_BITS = 30  # scores: q_i = floor(score_i * 2**p), p = prune_shift(e), -2**30 <= q_i < 2**30
PRUNE_MAX_SHIFT = 1074  # every float64 is a multiple of 2**-1074: a larger p adds zero bits only


def seq_mean_bits(T: int) -> int:
    """K of the fixed-point sequence means (spec section 6): token values
    q_t = trunc(x_t * 2**(K - e)), |q_t| < 2**K, so that the sum of up to T of
    them stays below 2**62 whatever the order."""
    return 62 - int(T).bit_length()


# The visit order of pruning (spec section 7): a 4-round Feistel permutation of
# [0, 2**k), k = max(bit length of N - 1, PRUNE_PERM_MIN_BITS) <= 48, filtered to
# [0, N); its halves (at most 24 bits) are uint32 words.
PRUNE_PERM_MIN_BITS = 8  # a domain of at least 256: halves of >= 4 bits mix well
PRUNE_PERM_MUL = (0xD2511F53, 0xCD9E8D57)  # the round function's multipliers (Philox's)
PRUNE_PERM_SHIFT = (15, 16)  # and its xor-shifts

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
MAX_POSITIONS = (1 << 32) - 1  # positions of a batch enter Philox as one 32-bit word
# N, the samples of a state (spec section 2): ids in [0, 2**48). The ids enter
# Philox as two words (j mod 2**32, j >> 32); the visit order's domain is at most
# 2**48; pruning's exact sum of |q_i| <= 2**30 over N samples stays below 2**78.
MAX_SAMPLES = (1 << 48) - 1


def anneal_stop(num_epochs: int, anneal_frac: float) -> int:
    """First epoch of the annealing phase, where nothing is pruned (spec section 7):
    ``floor((1 - anneal_frac) * num_epochs)`` in float64, computed once on the host;
    backends then compare ``epoch >= stop`` as integers."""
    return int(math.floor((1.0 - anneal_frac) * float(num_epochs)))


def prune_perm_bits(n: int) -> int:
    """``k``: the visit order of ``n`` samples permutes ``[0, 2**k)`` (spec section 7)."""
    return max((n - 1).bit_length(), PRUNE_PERM_MIN_BITS)


def prune_shift(e: int) -> int:
    """``p`` of spec section 7: ``q_i = floor(score_i * 2**p)``, ``e`` the frexp
    exponent of the largest |score| (``-994 <= p <= 1074``)."""
    return min(PRUNE_MEAN_BITS - e, PRUNE_MAX_SHIFT)


def prune_scale(p: int) -> tuple[float, float]:
    """``2**p`` as two finite float64 factors ``(2**p1, 2**p2)``, ``p2 = max(p -
    1023, 0)``: ``x * 2**p1 * 2**p2`` is section 7's ``f64(ldexp(x, p))`` for
    every float64 ``x`` with ``|x * 2**p| < 2**30`` (``2**p`` itself overflows
    float64 from ``p = 1024``)."""
    p2 = max(p - 1023, 0)
    return 2.0 ** (p - p2), 2.0**p2


def prune_mean(total: int, count: int, e: int) -> float:
    """``tau`` of spec section 7 from the exact integer sum of the ``count``
    fixed-point scores ``q_i`` (``e``: the exponent of the largest |score|,
    ``p = prune_shift(e)``): ``f64(total) * 2**-p / count`` for ``p >= 0`` (the
    product exact: ``2**-p >= 2**-1074``), ``f64(total) / count * 2**-p`` for
    ``p < 0`` (no overflow); ``f64(total)`` the correctly rounded float64 of the
    exact sum (Python's int-to-float conversion)."""
    p = prune_shift(e)
    if p >= 0:
        return float(total) * 2.0**-p / count
    return float(total) / count * 2.0**-p


def drop_levels(prune_ratio: float) -> int:
    """The number of 23-bit levels k with ``(2k + 1) * 2**-24 < prune_ratio``: a
    below-mean sample is dropped iff ``(x0 >> 9) < drop_levels(r)``, which is
    exactly ``u < r`` for ``u = (x0 >> 9) * 2**-23 + 2**-24``."""
    return int(min(max(math.ceil((prune_ratio * 2.0**24 - 1.0) / 2.0), 0), 2**23))


def kept_scale(prune_ratio: float, rescale: bool) -> float:
    """Loss scale of a below-mean sample that pruning kept."""
    return float(1.0 / (1.0 - prune_ratio)) if rescale else 1.0
