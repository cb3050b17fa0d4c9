"""Plain-PyTorch reference of every es-kernels op.

This module is the oracle of the tests and the baseline of the benchmarks. It
favours clarity over speed, runs on any device PyTorch supports, and follows
``docs/spec.md`` section by section. Nothing here validates arguments: the
public API (:mod:`es_kernels.functional`) and the fake implementations do
that before any kernel runs. Each op takes the positional arguments of its
schema (:mod:`es_kernels._schema`), so the reference is also the fallback kernel
of every device without a native one (it reads ``seed_tensor`` and
``step_tensor`` on the host there).

The noise of every random decision is counter-based Philox 4x32-10 (the
generator behind Triton's ``tl.rand``), so that the reference, the C++ kernels
and the Triton kernels draw bit-identical noise:

* key       = the 64-bit ``seed`` as (low 32 bits, high 32 bits)
* counter   = (j mod 2**32, j >> 32, step mod 2**32, stream)
  where ``stream`` is 0 for ES selection (``step`` = the training step),
  1 for ESWP's drops and 2 for the keys of ESWP's visit order (``step`` = the
  epoch).
* a uniform in (0, 1) is ``(x >> 9) * 2**-23 + 2**-24`` from a 32-bit word
  ``x``: 2**23 levels, never 0 or 1.
"""

from __future__ import annotations

import math

import torch

from . import _schema, _spec

__all__ = [
    "philox4x32",
    "uniform_from_bits",
    "per_sample_cross_entropy",
    "per_sample_cross_entropy_backward",
    "es_update",
    "selection_keys",
    "weighted_select",
    "es_step",
    "es_step_from_losses",
    "eswp_prune",
    "es_select_from_state",
    "state_weights",
    "exact_mean_weights",
    "sequence_means",
    "packed_tokens",
    "per_document_losses",
    "packed_step",
    "prune_threshold",
    "prune_perm_keys",
    "prune_permute",
    "prune_visit_order",
    "STREAM_SELECT",
    "STREAM_PRUNE",
]

STREAM_SELECT = _spec.STREAM_SELECT
STREAM_PRUNE = _spec.STREAM_PRUNE
STREAM_PRUNE_ORDER = _spec.STREAM_PRUNE_ORDER

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


def _philox_words(n: int, seed: int, step: int, stream: int, device, offset: int = 0):
    """The four words of counters ``j = offset, ..., offset + n - 1``."""
    j = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
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
    ignore_index: int = _spec.DEFAULT_IGNORE_INDEX,
    label_smoothing: float = _spec.DEFAULT_LABEL_SMOOTHING,
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
    x = logits.float().reshape(targets.numel(), num_classes)  # not -1: C may be 0 (when B = 0)
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


def per_sample_cross_entropy_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = _spec.DEFAULT_IGNORE_INDEX,
    label_smoothing: float = _spec.DEFAULT_LABEL_SMOOTHING,
) -> torch.Tensor:
    """The gradient of :func:`per_sample_cross_entropy` with respect to the
    logits (spec section 5.1), given ``grad`` ``[B]``, the gradient of the
    per-sample losses: the logits' shape and dtype, arithmetic in float32.

    For a scored token with target ``t``, ``g * (p_c - eps / C - (1 - eps)
    [c == t])`` with ``p = softmax(x)``, ``eps = label_smoothing`` and ``g =
    grad_b`` (``[B, C]``) or ``grad_b / count_b`` (``[B, T, V]``, ``count_b``
    the scored tokens of sequence ``b``); 0 for an ignored token, NaN for a
    bad target. A -inf logit gets 0; a row with NaN or +inf logits, or of
    -inf only, gets NaN."""
    num_classes = logits.shape[-1]
    x = logits.float().reshape(-1, num_classes)
    t = targets.reshape(-1).long()
    ignored = t == ignore_index
    valid = (t >= 0) & (t < num_classes)
    g = grad.float()
    if logits.dim() == 3:
        count = (~ignored).reshape(targets.shape).sum(dim=1)
        g = (g / count.clamp(min=1)).repeat_interleave(targets.shape[1])
    p = torch.softmax(x, dim=-1)
    if label_smoothing > 0.0:
        p = p - label_smoothing / num_classes
    onehot = torch.zeros_like(p).scatter_(1, torch.where(valid, t, 0).unsqueeze(1), 1.0 - label_smoothing)
    dx = (p - onehot) * g.unsqueeze(1)
    dx = torch.where(valid.unsqueeze(1), dx, float("nan"))
    dx = torch.where(ignored.unsqueeze(1), 0.0, dx)
    return dx.to(logits.dtype).reshape(logits.shape)


# --------------------------------------------------------------------------
# Section 3: state update
# --------------------------------------------------------------------------
def es_update(
    ids,
    losses,
    state,
    errors,
    beta1=_spec.DEFAULT_BETA1,
    beta2=_spec.DEFAULT_BETA2,
    lam=_spec.DEFAULT_LAM,
    w_min=_spec.DEFAULT_W_MIN,
):
    """Apply one observation ``(ids[j], losses[j])`` per position, in place on
    ``state`` ``[N, 2]`` (columns s, d) and ``errors``; return the float32
    weights ``[B]``. An observation whose new s, d or weight would not be
    finite is counted in ``errors[1]`` and leaves the state as it was."""
    return _update(ids, losses, state, errors, beta1, beta2, lam, w_min, None)


def _update(ids, losses, state, errors, beta1, beta2, lam, w_min, scored):
    """es_update where only the positions with ``scored`` (bool ``[B]``, None:
    all) are observations; the others (sequences with nothing to score) are
    skipped: no read, no write, no count, weight 0."""
    n = state.shape[0]
    ids = ids.long()
    l = losses.to(state.dtype)
    active = torch.ones_like(ids, dtype=torch.bool) if scored is None else scored
    in_range = (ids >= 0) & (ids < n)
    finite = torch.isfinite(l)
    cand = active & in_range & finite

    gid = ids[cand]
    lg = l[cand]
    s_old = state[gid, 0]
    d_old = state[gid, 1]
    unseen = torch.isnan(s_old)
    delta = lg - s_old
    s_new = torch.where(unseen, lg, beta1 * s_old + (1.0 - beta1) * lg)
    d_new = torch.where(unseen, torch.zeros_like(lg), beta2 * d_old + (1.0 - beta2) * delta)
    w_new = torch.clamp(s_new + lam * d_new, min=w_min).float()
    ok = torch.isfinite(s_new) & torch.isfinite(d_new) & torch.isfinite(w_new)
    state[gid[ok]] = torch.stack([s_new[ok], d_new[ok]], dim=1)

    good = cand.clone()
    good[cand] = ok
    errors[0] += (active & ~in_range).sum()
    errors[1] += (active & in_range & ~good).sum()
    w = torch.full(ids.shape, w_min, dtype=torch.float32, device=state.device)
    w[~active] = 0.0
    w[good] = w_new[ok]
    return w


def sequence_means(losses, mask):
    """float32 ``[B]`` mean of each row's token losses where ``mask`` (bool
    ``[B, T]``, None: every token) is true: the exact fixed-point mean of
    spec section 6 (independent of the summation order); 0 for a row with
    none. Also returns ``scored`` (bool ``[B]``)."""
    keep = torch.ones_like(losses, dtype=torch.bool) if mask is None else mask
    x = losses.float().double()  # f32(loss), exact in float64
    count = keep.sum(dim=1)
    finite = keep & x.isfinite()
    big = torch.where(finite, x.abs(), 0.0).amax(dim=1) if x.shape[1] > 0 else torch.zeros(x.shape[0])
    bits = _spec.seq_mean_bits(x.shape[1])
    mean = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for r in range(x.shape[0]):  # plain Python per row: the rule as written
        a = float(big[r])
        if a == 0.0:
            continue
        e = math.frexp(a)[1]
        q = torch.where(finite[r], torch.trunc(x[r] * 2.0 ** (bits - e)), 0.0).to(torch.int64)
        mean[r] = math.ldexp(float(int(q.sum())), e - bits) / max(int(count[r]), 1)
    nan = (keep & x.isnan()).any(dim=1)
    pinf = (keep & (x == math.inf)).any(dim=1)
    ninf = (keep & (x == -math.inf)).any(dim=1)
    mean = torch.where(ninf, -math.inf, torch.where(pinf, math.inf, mean))
    mean = torch.where(nan | (pinf & ninf), math.nan, mean)
    return torch.where(count > 0, mean, 0.0).float(), count > 0


# --------------------------------------------------------------------------
# Section 4: selection
# --------------------------------------------------------------------------
def _noise_value(value: int, tensor) -> int:
    """The host value of ``seed`` / ``step`` (a 0-d tensor wins over the int)."""
    return value if tensor is None else int(tensor) & ((1 << 64) - 1)


def exact_mean_weights(w: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 ``v_j = (1 - eps) w_j / mean(w) + eps`` (section 4) with the
    order-independent fixed-point mean: ``w`` finite and > 0 counts, anything
    else as 0; all-zero weights give ``v = 1``; ``w = +inf`` gives ``v = +inf``."""
    wp = torch.where(torch.isfinite(w) & (w > 0), w, 0.0).double()
    big = float(wp.max()) if wp.numel() else 0.0
    if big == 0.0:
        v = torch.ones_like(wp)
    else:
        e = math.frexp(big)[1]
        bits = _spec.SELECT_MEAN_BITS
        q = torch.floor(wp * 2.0 ** (bits - e)).long()
        mean = float(q.sum()) * 2.0 ** (e - bits) / w.shape[0]
        v = ((1.0 - eps) * wp) / mean + eps
    return torch.where(w == math.inf, math.inf, v)  # a +inf weight is a priority (section 4)


def selection_keys(
    weights, select_mode: str, seed: int, step: int, eps: float = _spec.DEFAULT_EPS, offset: int = 0
) -> torch.Tensor:
    """The float32 key of each position; the ``b`` largest keys are selected.

    ``topk``: the weight. ``sample``: ``v / E`` with ``E = -log(u)`` a standard
    exponential (the exponential race: ranking by ``v / E`` is ranking by
    ``log v + Gumbel``, which draws successively without replacement in
    proportion to ``v``), ``v = w`` when ``eps = 0``, else the exploration mix.
    Computed in float64 and rounded to float32 so that every backend's libm
    gives the same key. A NaN key counts as -inf. Position ``j`` draws the
    noise of counter ``offset + j``.
    """
    w = weights.float()
    if select_mode == "sample":
        x0, _, _, _ = _philox_words(w.shape[0], seed, step, STREAM_SELECT, w.device, offset)
        v = exact_mean_weights(w, eps) if eps > 0.0 else w.double()
        w = (v / -torch.log(uniform_from_bits(x0).double())).float()
    return torch.nan_to_num(w, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _top_positions(keys: torch.Tensor, b: int) -> torch.Tensor:
    """Positions of the ``b`` largest keys, ties to the lower position, ascending."""
    order = torch.sort(keys, descending=True, stable=True).indices
    return torch.sort(order[:b]).values


def weighted_select(
    weights,
    b,
    select_mode=_spec.DEFAULT_SELECT_MODE,
    seed=0,
    step=0,
    seed_tensor=None,
    step_tensor=None,
    eps=_spec.DEFAULT_EPS,
    offset=0,
):
    """int64 ascending positions of ``b`` of the ``B`` weights (position ``j``
    with the noise of ``offset + j``)."""
    seed, step = _noise_value(seed, seed_tensor), _noise_value(step, step_tensor)
    keys = selection_keys(weights, select_mode, seed, step, eps, offset)
    return _top_positions(keys, b)


# --------------------------------------------------------------------------
# Section 6: the fused step
# --------------------------------------------------------------------------
def _step(losses, scored, a):
    """Update with ``losses`` at the ``scored`` positions, then select: the
    rest of a fused step, from its op arguments ``a``."""
    weights = _update(a.ids, losses, a.state, a.errors, a.beta1, a.beta2, a.lam, a.w_min, scored)
    positions = weighted_select(weights, a.b, a.select_mode, a.seed, a.step, a.seed_tensor, a.step_tensor, a.eps)
    if a.advance_step and a.step_tensor is not None:
        a.step_tensor.add_(1)
    return positions, losses.to(torch.float32, copy=True), weights


# The fused steps take their schemas' arguments (``inspect.signature`` shows
# them; es_kernels/_schema.py defines them once).
@_schema.binds("es_step_from_losses")
def es_step_from_losses(a):
    """``losses`` ``[B]``, or token losses ``[B, T]`` (with an optional bool
    ``mask``) whose per-row means are taken inside the op; a row with no
    token to score is skipped (state untouched, not counted, weight 0)."""
    losses, scored = a.losses, None
    if losses.dim() == 2:
        losses, scored = sequence_means(losses, a.mask)
    return _step(losses, scored, a)


@_schema.binds("es_step")
def es_step(a):
    """Per-sample cross-entropy of ``logits`` (section 5), then the step of
    :func:`es_step_from_losses`; a row or sequence with no target to score
    is skipped."""
    losses = per_sample_cross_entropy(a.logits, a.targets, a.ignore_index, a.label_smoothing)
    scored = a.targets != a.ignore_index
    scored = scored.any(dim=1) if a.logits.dim() == 3 else scored
    return _step(losses, scored, a)


# --------------------------------------------------------------------------
# Section 12: selection from the state
# --------------------------------------------------------------------------
def state_weights(ids, state, errors, lam, w_min, now, last_seen=None, max_age=-1, picks=None, cap=-1):
    """float32 ``[B]``: the weight of each id from its stored (s, d) without an
    update (section 12.2): ``+inf`` (a priority) for an id never observed or
    not observed for more than ``max_age`` steps, 0 for one picked ``cap``
    times since its last refresh, else section 3's ``max(s + lam d, w_min)``;
    an id out of range gets ``w_min`` and is counted in ``errors[0]``."""
    n = state.shape[0]
    ids = ids.long()
    in_range = (ids >= 0) & (ids < n)
    gid = ids[in_range]
    s, d = state[gid, 0], state[gid, 1]
    wi = torch.clamp(s + lam * d, min=w_min).float()
    if cap >= 0:
        wi = torch.where(picks[gid] >= cap, 0.0, wi)
    due = torch.isnan(s)
    if max_age >= 0:
        due = due | ((now - last_seen[gid]) > max_age)  # int64, wrapping
    wi = torch.where(due, math.inf, wi)
    errors[0] += (~in_range).sum()
    w = torch.full(ids.shape, w_min, dtype=torch.float32, device=state.device)
    w[in_range] = wi
    return w


@_schema.binds("es_select_from_state")
def es_select_from_state(a):
    """(positions, weights): :func:`state_weights` of the ids, then the
    selection of section 4; the step advanced as in section 6."""
    now = _to_int64(_noise_value(a.step, a.step_tensor))
    w = state_weights(a.ids, a.state, a.errors, a.lam, a.w_min, now, a.last_seen, a.max_age, a.picks, a.cap)
    positions = weighted_select(w, a.b, a.select_mode, a.seed, a.step, a.seed_tensor, a.step_tensor, a.eps)
    if a.advance_step and a.step_tensor is not None:
        a.step_tensor.add_(1)
    return positions, w


def _to_int64(x: int) -> int:
    """A 64-bit pattern as a signed int64."""
    return x - (1 << 64) if x >= (1 << 63) else x


# --------------------------------------------------------------------------
# Section 6.1: packed rows (segment_ids), as a plain loop over tokens and documents
# --------------------------------------------------------------------------
def packed_tokens(targets, segment_ids, shift_labels, ignore_index=_spec.DEFAULT_IGNORE_INDEX):
    """(targets int64 [B, T], documents int64 [B, T]): what position ``t`` is
    scored against and the document it counts for (-1: none). With the shift,
    position ``t`` scores ``targets[b, t + 1]`` when tokens ``t`` and ``t + 1``
    are of the same document; the last position scores nothing."""
    B, T = segment_ids.shape
    tgt = torch.full((B, T), ignore_index, dtype=torch.int64)
    doc = torch.full((B, T), -1, dtype=torch.int64)
    for r in range(B):
        for t in range(T):
            if not shift_labels:
                tgt[r, t], doc[r, t] = int(targets[r, t]), max(int(segment_ids[r, t]), -1)
            elif t + 1 < T and int(segment_ids[r, t]) == int(segment_ids[r, t + 1]) >= 0:
                tgt[r, t], doc[r, t] = int(targets[r, t + 1]), int(segment_ids[r, t + 1])
    return tgt, doc


def per_document_losses(tok, scored, doc):
    """(ids int64 [D], losses float32 [D], counts int64 [D]): the documents with a
    scored token in ascending id, each one's mean over its scored tokens of every
    row (float64 sum in row-major token order)."""
    acc: dict[int, list] = {}
    B, T = doc.shape
    for r in range(B):
        for t in range(T):
            if bool(scored[r, t]) and int(doc[r, t]) >= 0:
                a = acc.setdefault(int(doc[r, t]), [0.0, 0])
                a[0] += float(tok[r, t])
                a[1] += 1
    ids = sorted(acc)
    return (
        torch.tensor(ids, dtype=torch.int64),
        torch.tensor([acc[i][0] / acc[i][1] for i in ids], dtype=torch.float64).float(),
        torch.tensor([acc[i][1] for i in ids], dtype=torch.int64),
    )


def packed_step(
    tok,
    scored,
    doc,
    state,
    errors,
    b,
    beta1,
    beta2,
    select_mode,
    seed,
    step,
    lam=_spec.DEFAULT_LAM,
    eps=_spec.DEFAULT_EPS,
    w_min=_spec.DEFAULT_W_MIN,
):
    """The packed step: one section 3 observation per document, then each row's
    weight (the mean over its scored tokens of their document's weight) and
    loss (the mean of its scored token losses), and section 4 over the rows.
    Returns (positions, row losses, row weights, document weights by id)."""
    ids, losses, _ = per_document_losses(tok, scored, doc)
    w = es_update(ids, losses, state, errors, beta1, beta2, lam, w_min)
    weight_of = {int(i): float(x) for i, x in zip(ids, w)}
    B, T = doc.shape
    row_w, row_l = [], []
    for r in range(B):
        sw, sl, n = 0.0, 0.0, 0
        for t in range(T):
            if bool(scored[r, t]) and int(doc[r, t]) >= 0:
                sw += weight_of[int(doc[r, t])]
                sl += float(tok[r, t])
                n += 1
        row_w.append(sw / n if n else 0.0)
        row_l.append(sl / n if n else 0.0)
    weights = torch.tensor(row_w, dtype=torch.float64).float()
    positions = weighted_select(weights, b, select_mode, seed, step, eps=eps)
    return positions, torch.tensor(row_l, dtype=torch.float64).float(), weights, weight_of


# --------------------------------------------------------------------------
# Section 7: ESWP pruning
# --------------------------------------------------------------------------
def prune_scores(state) -> tuple[torch.Tensor, torch.Tensor]:
    """(score float64 [N], observed [N]): ``f64(s) + f64(d)``, and where it is finite."""
    score = state[:, 0].double() + state[:, 1].double()
    return score, torch.isfinite(score)  # s NaN (unseen) gives a NaN score


def prune_threshold(state) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(score float64 [N], observed [N], tau): the mean score over observed
    samples by the order-independent fixed-point rule (NaN when none), from
    the exact integer sum of the fixed-point scores."""
    score, observed = prune_scores(state)
    sc = score[observed]
    if sc.numel() == 0:
        return score, observed, math.nan
    big = float(sc.abs().max())
    if big == 0.0:
        return score, observed, 0.0
    e = math.frexp(big)[1]
    f1, f2 = _spec.prune_scale(_spec.prune_shift(e))
    q = torch.floor(sc * f1 * f2).long()
    total = sum(int(c.sum()) for c in q.split(1 << 32))  # exact: |q| <= 2**30, a part's sum < 2**63
    return score, observed, _spec.prune_mean(total, sc.numel(), e)


def prune_perm_keys(seed: int, epoch: int, order_key: int = 0) -> tuple[int, int, int, int]:
    """The four round keys of epoch ``epoch``'s visit order: the Philox words of
    ``(seed, j = order_key, step = epoch, stream 2)`` (spec section 7; a shard's
    order, section 11.2: ``order_key`` = the rank)."""
    z = torch.zeros(1, dtype=torch.int64)
    words = philox4x32(seed, z + (order_key & _M32), z + (order_key >> 32), z + (epoch & _M32), z + STREAM_PRUNE_ORDER)
    k0, k1, k2, k3 = (int(w) for w in words)
    return k0, k1, k2, k3


def _perm_round(v: torch.Tensor, key: int) -> torch.Tensor:
    """The Feistel round function F(v, K) of spec section 7 on 32-bit words."""
    (m1, m2), (s1, s2) = _spec.PRUNE_PERM_MUL, _spec.PRUNE_PERM_SHIFT
    h = _mulhilo(m1, v ^ key)[1]
    h = h ^ (h >> s1)
    h = _mulhilo(m2, h)[1]
    return h ^ (h >> s2)


def prune_permute(q: torch.Tensor, k: int, keys) -> torch.Tensor:
    """perm(q): the 4-round Feistel bijection of ``[0, 2**k)``, ``k <= 48``
    (int64 tensors; the halves, at most 24 bits, are 32-bit words)."""
    lo = k // 2
    a, wa, b, wb = q >> lo, k - lo, q & ((1 << lo) - 1), lo
    for key in keys:
        a, wa, b, wb = b, wb, a ^ (_perm_round(b, key) & ((1 << wa) - 1)), wa
    return (a << wb) | b


def prune_visit_order(n: int, seed: int, epoch: int, device=None, order_key: int = 0) -> torch.Tensor:
    """int64 ``[n]``: ``perm(q)`` for ``q = 0, 1, ..., 2**k - 1``, those below ``n``:
    the order in which epoch ``epoch`` visits the samples it keeps."""
    k = _spec.prune_perm_bits(n)
    keys = prune_perm_keys(seed, epoch, order_key)
    x = prune_permute(torch.arange(1 << k, dtype=torch.int64, device=device), k, keys)
    return x[x < n]


def eswp_prune(
    state,
    prune_ratio,
    seed=0,
    epoch=0,
    num_epochs=1,
    anneal_frac=_spec.DEFAULT_ANNEAL_FRAC,
    rescale=True,
    id_offset=0,
    order_key=0,
    threshold=None,
):
    """Returns ``(order[N], num_kept, scale[N])``: the kept ids first, in the
    visit order of ``(seed, epoch, order_key)`` (:func:`prune_visit_order`), then
    the dropped ones in ascending order; ``num_kept`` a 0-d int64 tensor;
    ``scale`` float32 per sample (0 for a dropped one). Row ``i`` draws the
    drop noise of the id ``id_offset + i``; ``threshold``, when given, replaces
    the state's own mean (a shard's plan, spec section 11.2)."""
    n = state.shape[0]
    dev = state.device
    if threshold is None:
        score, observed, tau = prune_threshold(state)
    else:
        (score, observed), tau = prune_scores(state), threshold
    below = observed & (score < tau)
    if epoch >= _spec.anneal_stop(num_epochs, anneal_frac):
        below = torch.zeros_like(below)
    x0 = _philox_words(n, seed, epoch, STREAM_PRUNE, dev, id_offset)[0]
    dropped = below & (uniform_from_bits(x0).double() < prune_ratio)
    scale = torch.ones(n, dtype=torch.float32, device=dev)
    scale[below] = _spec.kept_scale(prune_ratio, rescale)
    scale[dropped] = 0.0
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev), (~dropped).sum(), scale
    visit = prune_visit_order(n, seed, epoch, dev, order_key)
    order = torch.cat([visit[~dropped[visit]], torch.nonzero(dropped).view(-1)])
    return order, (~dropped).sum(), scale
