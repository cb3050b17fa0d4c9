"""Plain-PyTorch reference of every es-kernels op.

This module is the oracle of the tests and the baseline of the benchmarks. It
favours clarity over speed, runs on any device PyTorch supports, and follows
``ES_SPEC.md`` line by line. Nothing here validates arguments: the public API
(:mod:`es_kernels.functional`) does that before any backend runs.

The noise of every random decision is counter-based Philox 4x32-10 (the
generator behind Triton's ``tl.rand``), so that the reference, the C++ kernels
and the Triton kernels draw bit-identical noise:

* key       = the 64-bit ``seed`` as (low 32 bits, high 32 bits)
* counter   = (j mod 2**32, j >> 32, step mod 2**32, stream)
  where ``stream`` is 0 for ES selection (``step`` = the training step) and
  1 for ESWP pruning (``step`` = the epoch).
* a uniform in (0, 1) is ``(x >> 9) * 2**-23 + 2**-24`` from a 32-bit word
  ``x``: 2**23 levels, never 0 or 1.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "philox4x32",
    "uniform_from_bits",
    "per_sample_cross_entropy",
    "es_update",
    "selection_keys",
    "weighted_select",
    "es_step",
    "es_step_from_losses",
    "eswp_prune",
    "STREAM_SELECT",
    "STREAM_PRUNE",
]

STREAM_SELECT = 0
STREAM_PRUNE = 1

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product ``a * x`` for 32-bit
    ``a`` and a tensor ``x`` of 32-bit values held in int64, without overflow."""
    xh = x >> 16
    xl = x & 0xFFFF
    p_l = a * xl  # < 2**48
    p_h = a * xh  # < 2**48
    lo = (((p_h & 0xFFFF) << 16) + p_l) & _M32
    hi = (p_h + (p_l >> 16)) >> 16
    return hi, lo


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox 4x32 with the 64-bit key ``seed``, on int64 tensors holding
    32-bit counter words. Returns the four 32-bit output words (int64)."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _philox_words(n: int, seed: int, step: int, stream: int, device):
    j = torch.arange(n, dtype=torch.int64, device=device)
    full = lambda v: torch.full_like(j, v)  # noqa: E731
    return philox4x32(seed, j & _M32, j >> 32, full(step & _M32), full(stream))


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 uniform in (0, 1) from 32-bit words: (x >> 9) * 2**-23 + 2**-24."""
    return (x >> 9).to(torch.float32) * (2.0**-23) + (2.0**-24)


# --------------------------------------------------------------------------
# Section 5: per-sample losses
# --------------------------------------------------------------------------
def per_sample_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """float32 ``[B]``: the row's cross-entropy for ``[B, C]`` logits, the
    mean token cross-entropy over non-ignored tokens for ``[B, T, V]`` logits
    (0 for a row or sequence with nothing to score). A target outside
    ``[0, C)`` that is not ``ignore_index`` gives NaN (counted later as a
    non-finite loss) instead of reading out of bounds.

    Non-finite logits follow ``F.cross_entropy``: a -inf logit (a masked
    class) is allowed, and a -inf target logit gives +inf; with label
    smoothing any -inf logit gives +inf (its log-probability enters the
    smoothing term), or NaN where ``(1 - eps) * inf`` is ``0 * inf``. A row
    with a NaN or +inf logit, or of -inf only, gives NaN. Huge finite logits
    (up to the float32 maximum) are fine: the loss is +inf only where it, or
    with smoothing ``sum_c -log p_c``, exceeds the float32 range."""
    num_classes = logits.shape[-1]
    x = logits.float().reshape(-1, num_classes)
    t = targets.reshape(-1).long()
    ignored = t == ignore_index
    valid = (t >= 0) & (t < num_classes)
    logp = torch.log_softmax(x, dim=-1)
    nll = -logp.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    if label_smoothing > 0.0:  # F.cross_entropy's form: eps / C * sum_c -log p_c
        smooth = -logp.sum(dim=-1)
        nll = (1.0 - label_smoothing) * nll + smooth * (label_smoothing / num_classes)
    nll = torch.where(valid, nll, torch.full_like(nll, float("nan")))
    tok = torch.where(ignored, torch.zeros_like(nll), nll)
    if logits.dim() == 2:
        return tok
    tok = tok.reshape(targets.shape)
    count = (~ignored).reshape(targets.shape).sum(dim=1)
    return torch.where(count > 0, tok.sum(dim=1) / count.clamp(min=1), 0.0)


# --------------------------------------------------------------------------
# Section 3: state update
# --------------------------------------------------------------------------
def es_update(
    ids: torch.Tensor,
    losses: torch.Tensor,
    s: torch.Tensor,
    d: torch.Tensor,
    errors: torch.Tensor,
    beta1: float,
    beta2: float,
    w_min: float = 1e-8,
) -> torch.Tensor:
    """Apply one observation ``(ids[j], losses[j])`` per position, in place on
    ``s``, ``d``, ``errors``; return the float32 weights ``[B]``."""
    n = s.shape[0]
    ids = ids.long()
    l = losses.to(s.dtype)
    in_range = (ids >= 0) & (ids < n)
    finite = torch.isfinite(l)
    good = in_range & finite
    errors[0] += (~in_range).sum()
    errors[1] += (in_range & ~finite).sum()

    gid = ids[good]
    lg = l[good]
    s_old = s[gid]
    d_old = d[gid]
    unseen = torch.isnan(s_old)
    delta = lg - s_old
    s_new = torch.where(unseen, lg, beta1 * s_old + (1.0 - beta1) * lg)
    d_new = torch.where(unseen, torch.zeros_like(lg), beta2 * d_old + (1.0 - beta2) * delta)
    s[gid] = s_new
    d[gid] = d_new

    w = torch.full(ids.shape, w_min, dtype=s.dtype, device=s.device)
    w[good] = torch.clamp(s_new + d_new, min=w_min)
    return w.float()


# --------------------------------------------------------------------------
# Section 4: selection
# --------------------------------------------------------------------------
def selection_keys(weights: torch.Tensor, mode: str, seed: int, step: int) -> torch.Tensor:
    """The float32 key of each position; the ``b`` largest keys are selected.

    ``topk``: the weight. ``sample``: ``w / E`` with ``E = -log(u)`` a standard
    exponential (the exponential race: ranking by ``w / E`` is ranking by
    ``log w + Gumbel``, which draws successively without replacement in
    proportion to ``w``). Computed in float64 and rounded to float32 so that
    every backend's libm gives the same key. A NaN key counts as -inf.
    """
    w = weights.float()
    if mode == "sample":
        x0, _, _, _ = _philox_words(w.shape[0], seed, step, STREAM_SELECT, w.device)
        w = (w.double() / -torch.log(uniform_from_bits(x0).double())).float()
    return torch.nan_to_num(w, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _top_positions(keys: torch.Tensor, b: int) -> torch.Tensor:
    """Positions of the ``b`` largest keys, ties to the lower position, ascending."""
    order = torch.sort(keys, descending=True, stable=True).indices
    return torch.sort(order[:b]).values


def weighted_select(weights: torch.Tensor, b: int, mode: str = "sample", seed: int = 0, step: int = 0):
    """int64 ascending positions of ``b`` of the ``B`` weights."""
    return _top_positions(selection_keys(weights, mode, seed, step), b)


# --------------------------------------------------------------------------
# Section 6: the fused step
# --------------------------------------------------------------------------
def es_step_from_losses(losses, ids, s, d, errors, b, beta1, beta2, mode="sample", seed=0, step=0, w_min=1e-8):
    weights = es_update(ids, losses, s, d, errors, beta1, beta2, w_min)
    return weighted_select(weights, b, mode, seed, step), losses.float(), weights


def es_step(
    logits, targets, ids, s, d, errors, b, beta1, beta2, mode="sample", seed=0, step=0,
    ignore_index=-100, label_smoothing=0.0, w_min=1e-8,
):
    losses = per_sample_cross_entropy(logits, targets, ignore_index, label_smoothing)
    return es_step_from_losses(losses, ids, s, d, errors, b, beta1, beta2, mode, seed, step, w_min)


# --------------------------------------------------------------------------
# Section 7: ESWP pruning
# --------------------------------------------------------------------------
def annealing(epoch: int, num_epochs: int, anneal_frac: float) -> bool:
    """True in the last ``anneal_frac`` of the epochs, where nothing is pruned."""
    return epoch >= (1.0 - anneal_frac) * num_epochs


def eswp_prune(s, d, prune_ratio, seed=0, epoch=0, num_epochs=1, anneal_frac=0.125, rescale=True):
    """Returns ``(order[N], num_kept, scale[N])``: the kept ids first, in the
    random order of ``(seed, epoch)``, then the dropped ones in ascending
    order; ``num_kept`` a
    0-d int64 tensor; ``scale`` float32 per sample (0 for a dropped one)."""
    n = s.shape[0]
    observed = ~torch.isnan(s)
    score = (s + d).double()
    count = observed.sum()
    tau = torch.where(observed, score, 0.0).sum() / count  # NaN when nothing is observed
    below = observed & (score < tau)
    x0, x1, _, _ = _philox_words(n, seed, epoch, STREAM_PRUNE, s.device)
    if annealing(epoch, num_epochs, anneal_frac):
        below = torch.zeros_like(below)
    dropped = below & (uniform_from_bits(x0).double() < prune_ratio)
    kept_scale = 1.0 / (1.0 - prune_ratio) if rescale else 1.0
    scale = torch.ones(n, dtype=torch.float32, device=s.device)
    scale[below] = float(kept_scale)
    scale[dropped] = 0.0
    # kept ids ordered by (x1, id); dropped ids after them, ascending
    sort_key = torch.where(dropped, (1 << 32) + torch.arange(n, device=s.device), x1)
    order = torch.sort(sort_key, stable=True).indices
    return order, (~dropped).sum(), scale
