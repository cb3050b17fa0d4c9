"""The functional API: validate (metadata only), then call the op of the
inputs' device through ``torch.ops.es_kernels`` (C++ on CPU, Triton on CUDA,
the reference elsewhere). docs/spec.md defines what each op computes.

Set ``ES_KERNELS_CHECKED=1`` for the checked mode (spec section 8): every
step then also refuses duplicate ids and calls ``state.check()`` afterwards
(both read device values: for debugging, not for speed).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import _checks, _packed
from ._ops import ARGS, OpArgs, bind, ops
from ._spec import (
    DEFAULT_ANNEAL_FRAC,
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_EPS,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_LABEL_SMOOTHING,
    DEFAULT_LAM,
    DEFAULT_SELECT_MODE,
    DEFAULT_W_MIN,
)
from .state import ESState

__all__ = [
    "StepResult",
    "PruneResult",
    "checked_mode",
    "per_sample_cross_entropy",
    "es_update",
    "weighted_select",
    "es_step",
    "es_step_from_losses",
    "eswp_prune",
    "es_select_from_state",
]


class StepResult(NamedTuple):
    """What a fused step returns, on the state's device.

    Attributes
    ----------
    positions : Tensor
        int64 ``[b]``, ascending positions into the meta-batch.
    losses : Tensor
        float32 ``[B]``, the per-sample losses.
    weights : Tensor
        float32 ``[B]``, the weights of the update (``w_min`` for a counted,
        skipped observation; 0 for a position with nothing to score).
    """

    positions: torch.Tensor  # int64 [b], ascending positions into the meta-batch
    losses: torch.Tensor  # float32 [B], per-sample losses
    weights: torch.Tensor  # float32 [B], the weights of the update (w_min for a skipped observation)


class PruneResult(NamedTuple):
    """What :func:`eswp_prune` returns, on the state's device.

    Attributes
    ----------
    order : Tensor
        int64 ``[N]``: the kept ids in the epoch's random order, then the
        dropped ids ascending.
    num_kept : Tensor
        int64 0-d: how many ids ``order`` starts with are kept.
    scale : Tensor
        float32 ``[N]``: the loss scale of each sample (0 if dropped).
    """

    order: torch.Tensor  # int64 [N]: kept ids in the epoch's random order, then dropped ids
    num_kept: torch.Tensor  # int64 0-d, on the device
    scale: torch.Tensor  # float32 [N]: loss scale of each sample (0 if dropped)

    @property
    def kept_ids(self) -> torch.Tensor:
        """The kept ids (reads ``num_kept`` to the host: one synchronisation)."""
        return self.order[: int(self.num_kept)]


def checked_mode() -> bool:
    """Whether the checked mode is on (spec section 8).

    Returns
    -------
    bool
        True when the environment variable ``ES_KERNELS_CHECKED`` is 1 /
        true / yes / on: every step then also refuses duplicate ids and calls
        ``state.check()`` afterwards (both read device values: host
        synchronisations, for debugging).
    """
    return os.environ.get("ES_KERNELS_CHECKED", "").lower() in ("1", "true", "yes", "on")


def _state(state: object) -> ESState:
    if not isinstance(state, ESState):
        raise ValueError(f"state must be an es_kernels.ESState, got {type(state).__name__}")
    return state


def _op_args(name: str, values: dict) -> OpArgs:
    """The arguments of op ``name`` from a public function's ``locals()``:
    an :class:`ESState` becomes the schema's ``state`` (and ``errors``)
    tensors, names the schema lacks (``shift_labels``) stay out. ``seed`` and
    ``step`` stay as given (an int or a tensor) for the checks."""
    fields = ARGS[name]._fields
    v = {k: x for k, x in values.items() if k in fields}
    if "state" in v:
        st = _state(v["state"])
        v["state"] = st.tensor
        if "errors" in fields:
            v["errors"] = st.errors
    return bind(name, **v)


def _run_checked(state: ESState, ids: torch.Tensor, op, args: OpArgs):
    if not checked_mode():
        return op(*args)
    if ids.numel() != torch.unique(ids).numel():
        raise RuntimeError("es_kernels checked mode: ids within one call must be distinct")
    out = op(*args)
    state.check()
    return out


def _shift(logits, targets, shift_labels):
    """Causal-LM scoring: logits[:, t] against targets[:, t + 1], as views (no copy)."""
    _checks.flag(shift_labels, "shift_labels")
    if not shift_labels:
        return logits, targets
    if logits.dim() != 3:
        raise ValueError(
            f"shift_labels=True needs logits [B, T, V] and targets [B, T], got logits {tuple(logits.shape)}"
        )
    return logits[:, :-1], targets[:, 1:]


# --------------------------------------------------------------------------- packed rows (segment_ids)
def packed_step(tok, scored, doc, state, b, *, beta1, beta2, lam, select_mode, eps, seed, step, advance_step, w_min):
    """The ES step of packed rows (docs/spec.md section 6.1) from token losses,
    the scored mask and each token's document (arguments validated by the caller).

    One observation per document (section 3, through the ``es_step_from_losses``
    op on the ``B * T`` document slots, the empty slots masked: not read, not
    counted), then each row's weight, the mean of its scored tokens' document
    weights, and the selection of ``b`` rows (section 4). No host read."""
    st = _state(state)
    docs, slot = _packed._group(tok, scored, doc)
    n = docs.ids.shape[0]
    has = docs.counts > 0
    # distinct ids in every slot (checked mode refuses duplicates); the empty slots are masked out
    upd = torch.where(has, docs.ids, -1 - torch.arange(n, device=doc.device))
    # the update alone: b = 0, no noise, the schema's defaults for the selection
    update = bind("es_step_from_losses", docs.losses.unsqueeze(1), upd, st.tensor, st.errors, 0, beta1, beta2)
    update = update._replace(lam=lam, w_min=w_min, mask=has.unsqueeze(1)).for_op()
    _, _, w_docs = _run_checked(st, upd, ops.es_step_from_losses, update)
    weights = _packed._row_means(w_docs[slot], scored)
    seed_i, step_i, seed_t, step_t = _checks.split_noise(seed, step)
    positions = ops.weighted_select(weights, b, select_mode, seed_i, step_i, seed_t, step_t, float(eps))
    if advance_step:
        step.add_(1)
    return StepResult(positions, _packed._row_means(tok, scored), weights)


def packed_step_from_logits(
    logits, targets, ids, state, b, segment_ids, *, ignore_index, label_smoothing, shift_labels, **kw
) -> StepResult:
    """:func:`es_kernels.es_step` with ``segment_ids`` (validates, then :func:`packed_step`)."""
    st = _state(state)
    ce = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, shift_labels=shift_labels)
    return packed_step(
        *_packed.packed_tokens(ids, segment_ids, st, b, kw, logits=logits, targets=targets, **ce), st, b, **kw
    )


def packed_step_from_losses(losses, ids, state, b, segment_ids, *, mask, **kw) -> StepResult:
    """:func:`es_kernels.es_step_from_losses` with ``segment_ids``."""
    st = _state(state)
    return packed_step(*_packed.packed_tokens(ids, segment_ids, st, b, kw, losses=losses, mask=mask), st, b, **kw)


def per_sample_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    *,
    shift_labels: bool = False,
) -> torch.Tensor:
    """Per-sample cross-entropy (spec section 5).

    Parameters
    ----------
    logits : Tensor
        ``[B, C]`` or ``[B, T, V]``, float32 / bfloat16 / float16, any strides.
    targets : Tensor
        int64 or int32, ``[B]`` or ``[B, T]``; ``ignore_index`` marks a token not scored.
    ignore_index : int
    label_smoothing : float in [0, 1]
    shift_labels : bool
        Causal-LM convention (Hugging Face: ``labels`` equal ``input_ids``,
        -100 at padding): score ``logits[:, t]`` against ``targets[:, t + 1]``.
        Pass the full ``[B, T, V]`` logits and ``[B, T]`` labels; the op gets
        the views ``logits[:, :-1]`` and ``targets[:, 1:]`` (no copy). Each
        sequence's loss is the mean over its ``T - 1`` scored positions.

    Returns
    -------
    Tensor
        float32 ``[B]``: the row's cross-entropy, or the mean over a
        sequence's scored tokens (0 when it has none). Arithmetic in float32.
        Differentiable with respect to ``logits`` on every backend (a fused
        backward kernel, spec section 5.1): ``(loss * scales).mean().backward()``
        gives the gradient of ``F.cross_entropy``. No host synchronisation,
        forward or backward.

    Raises
    ------
    ValueError
        naming the argument, for a wrong shape, dtype or value.
    """
    _checks.logits_targets(logits, targets, ignore_index, label_smoothing)
    logits, targets = _shift(logits, targets, shift_labels)
    return ops.per_sample_cross_entropy(logits, targets, ignore_index, float(label_smoothing))


def es_update(
    ids: torch.Tensor,
    losses: torch.Tensor,
    state: ESState,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    *,
    lam: float = DEFAULT_LAM,
    w_min: float = DEFAULT_W_MIN,
) -> torch.Tensor:
    """Update ``state`` with one observation per position (spec section 3).

    Parameters
    ----------
    ids : Tensor
        int64 / int32 ``[B]`` sample ids on the state's device (distinct).
    losses : Tensor
        floating ``[B]``, the observed loss of each id.
    state : ESState
        Mutated in place: ``state.tensor`` and ``state.errors``.
    beta1, beta2 : float in [0, 1]
        Smoothing of the level ``s`` and of the trend ``d``.
    lam : float >= 0
        Trend gain of the weight ``w = max(s + lam * d, w_min)``.
    w_min : float > 0

    Returns
    -------
    Tensor
        float32 ``[B]`` weights on the state's device (``w_min`` where an
        observation was skipped and counted).

    Raises
    ------
    ValueError
        Naming the argument, before anything is written. Ids out of range
        and non-finite losses are counted in ``state.errors`` instead.

    Notes
    -----
    No host synchronisation (except in the checked mode).
    """
    a = _op_args("es_update", locals())
    _checks.update(a)
    return _run_checked(state, ids, ops.es_update, a.for_op())


def weighted_select(
    weights: torch.Tensor,
    b: int,
    select_mode: str = DEFAULT_SELECT_MODE,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    *,
    eps: float = DEFAULT_EPS,
    offset: int = 0,
) -> torch.Tensor:
    """Positions of ``b`` of the ``B`` weights (spec section 4).

    Parameters
    ----------
    weights : Tensor
        floating ``[B]``; NaN counts as never selected.
    b : int in [0, B]
    select_mode : {"sample", "topk"}
        ``"sample"``: without replacement, in proportion to the weights
        (exponential race on counter-based Philox noise); ``"topk"``: the
        ``b`` largest, ties to the lower position.
    seed, step : int in [0, 2**63) or 0-d int64 tensor on the weights' device
        The noise is a function of (seed, step, position) alone: the same
        values give the same positions on every run and backend. A tensor is
        read on the device (no synchronisation; CUDA-graph friendly).
    eps : float in [0, 1]
        Exploration mix (``"sample"`` only): selection by
        ``(1 - eps) w / mean(w) + eps``.
    offset : int in [0, 2**48)
        Position ``j`` draws the noise of position ``offset + j``: the
        selection among a slice ``weights[lo:hi]`` of a larger batch with
        ``offset=lo`` keys each position as the whole batch would (a rank's
        own positions in a gathered batch). A host int (not read on the device).

    Returns
    -------
    Tensor
        int64 ``[b]`` positions, ascending, on the weights' device.

    Raises
    ------
    ValueError
        Naming the argument (``b > B``, ``eps`` with ``"topk"``, ...).

    Notes
    -----
    No host synchronisation.
    """
    a = _op_args("weighted_select", locals())
    _checks.select(a)
    return ops.weighted_select(*a.for_op())


def es_select_from_state(
    ids: torch.Tensor,
    state: ESState,
    b: int,
    *,
    lam: float = DEFAULT_LAM,
    w_min: float = DEFAULT_W_MIN,
    select_mode: str = DEFAULT_SELECT_MODE,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    advance_step: bool = False,
    eps: float = DEFAULT_EPS,
    last_seen: torch.Tensor | None = None,
    max_age: int = -1,
    picks: torch.Tensor | None = None,
    cap: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``b`` of a meta-batch's ids from their stored state, without
    scoring them (spec section 12.2).

    Parameters
    ----------
    ids : Tensor
        int64 / int32 ``[B]`` sample ids on the state's device.
    state : ESState
        Read; only ``state.errors`` is written (ids out of range are counted).
    b : int in [0, B]
    lam, w_min, select_mode, eps
        As in :func:`es_step`: each id's weight is ``max(s + lam d, w_min)``
        of its stored ``(s, d)``, selected as :func:`weighted_select` does.
    seed, step : int in [0, 2**63) or 0-d int64 tensor on the state's device
        The noise (as :func:`weighted_select`); ``step`` is also ``now``, the
        step the ages are measured at.
    advance_step : bool
        Add 1 to ``step`` (a tensor) on the device after reading it.
    last_seen, max_age
        int64 ``[N]``, each id's step of last observation, and the age in
        steps beyond which an id is a priority (``-1``: off; then
        ``last_seen`` may be None).
    picks, cap
        int64 ``[N]``, each id's picks from the state since its last
        refresh, and the cap beyond which its weight is 0 (``-1``: off).

    Returns
    -------
    tuple of Tensor
        ``(positions int64 [b] ascending, weights float32 [B])``: ``+inf`` for
        a priority (never observed, or due), 0 for a capped id, ``w_min`` for
        an id out of range.

    Raises
    ------
    ValueError
        Naming the argument, before anything is written.

    Notes
    -----
    No host synchronisation (except in the checked mode).
    """
    a = _op_args("es_select_from_state", locals())
    _checks.select_from_state(a)
    return _run_checked(state, ids, ops.es_select_from_state, a.for_op())


# ------------------------------------------------------------ the fused step
# The settings of a fused step: the keyword-only arguments that es_step,
# es_step_from_losses and lm.es_step_from_hidden share (each spells them out
# in its signature), with their defaults; an EvolvedSampler holds them (with
# its step counter). A test keeps the three signatures equal to this.
STEP_SETTINGS = {
    "beta1": DEFAULT_BETA1,
    "beta2": DEFAULT_BETA2,
    "lam": DEFAULT_LAM,
    "select_mode": DEFAULT_SELECT_MODE,
    "eps": DEFAULT_EPS,
    "seed": 0,
    "step": 0,
    "advance_step": False,
    "w_min": DEFAULT_W_MIN,
}


def step_kw(scope: dict) -> dict:
    """The step's settings (:data:`STEP_SETTINGS`) from a step function's ``locals()``, to pass on."""
    return {k: scope[k] for k in STEP_SETTINGS}


def es_step(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ids: torch.Tensor | None,
    state: ESState,
    b: int,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    shift_labels: bool = False,
    segment_ids: torch.Tensor | None = None,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    lam: float = DEFAULT_LAM,
    select_mode: str = DEFAULT_SELECT_MODE,
    eps: float = DEFAULT_EPS,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    advance_step: bool = False,
    w_min: float = DEFAULT_W_MIN,
) -> StepResult:
    """The fused ES step from logits, in one op (spec section 6).

    Per-sample losses (section 5), the update of the state of ``ids``
    (section 3) and the selection of ``b`` positions (section 4). A row
    (``[B, C]``) whose target is ``ignore_index``, or a sequence
    (``[B, T, V]``) with no target to score, is skipped by the update: its
    state is untouched, nothing is counted and its weight is 0.

    Parameters
    ----------
    logits, targets, ignore_index, label_smoothing, shift_labels
        As in :func:`per_sample_cross_entropy`.
    ids : Tensor
        int64 / int32 ``[B]`` sample ids in ``[0, N)``, on the state's device.
    state : ESState
        Mutated in place (``state.tensor``, ``state.errors``); every tensor
        argument must be on its device.
    b : int in [0, B]
        How many positions to select.
    segment_ids : Tensor or None
        Packed rows: int64 / int32 ``[B, T]``, each token's document id in
        the state, negative for padding; ``ids`` must then be None. The state
        is per document and ``b`` rows are selected by the token-weighted
        mean of their documents' weights (docs/spec.md section 6.1);
        ``shift_labels=True`` also drops the positions whose next token
        starts another document. The returned ``losses`` and ``weights`` are
        per row.
    beta1, beta2 : float in [0, 1]
        Smoothing of the level ``s`` and of the trend ``d`` (spec section 3).
    lam : float >= 0
        Trend gain of the weight ``w = max(s + lam * d, w_min)``.
    select_mode : {"sample", "topk"}
        As in :func:`es_kernels.weighted_select`.
    eps : float in [0, 1]
        Exploration mix (``"sample"`` only).
    seed, step : int in [0, 2**63) or 0-d int64 tensor on the state's device
        The selection noise is a function of ``(seed, step, position)``
        alone (spec section 9): the same inputs, seed and step select the
        same positions on every run and backend. A tensor is read on the
        device (no synchronisation; a captured CUDA graph replays with the
        tensor's current value).
    advance_step : bool
        Add one to the ``step`` tensor after reading it (needs ``step`` as a
        tensor): a training loop's counter, advanced without a host round-trip.
    w_min : float > 0
        Floor of the weight.

    Returns
    -------
    StepResult
        ``positions`` int64 ``[b]`` ascending, ``losses`` float32 ``[B]``,
        ``weights`` float32 ``[B]``, on the state's device.

    Raises
    ------
    ValueError
        Naming the argument (wrong shape, dtype, device or value), before
        anything is written; also for logits that require grad while grad
        mode is on (the step is not differentiable: score under
        ``torch.no_grad()`` or ``torch.inference_mode()``). Ids out of range
        and non-finite losses are not errors: they are counted in
        ``state.errors`` (``state.check()``).

    Notes
    -----
    No host synchronisation (except in the checked mode,
    ``ES_KERNELS_CHECKED=1``); CUDA-graph and ``torch.compile`` friendly.
    One C++ call on the CPU; a fixed sequence of Triton launches on CUDA.
    """
    _checks.no_grad_inputs(logits=logits)
    if segment_ids is not None:
        shift = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, shift_labels=shift_labels)
        return packed_step_from_logits(logits, targets, ids, state, b, segment_ids, **shift, **step_kw(locals()))
    a = _op_args("es_step", locals())
    _checks.step_from_logits(a)
    logits, targets = _shift(logits, targets, shift_labels)
    a = a._replace(logits=logits, targets=targets).for_op()
    return StepResult(*_run_checked(state, a.ids, ops.es_step, a))


def es_step_from_losses(
    losses: torch.Tensor,
    ids: torch.Tensor | None,
    state: ESState,
    b: int,
    *,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    lam: float = DEFAULT_LAM,
    select_mode: str = DEFAULT_SELECT_MODE,
    eps: float = DEFAULT_EPS,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    advance_step: bool = False,
    w_min: float = DEFAULT_W_MIN,
) -> StepResult:
    """The fused ES step from precomputed losses (any loss; spec section 6).

    Parameters
    ----------
    losses : Tensor
        floating ``[B]`` (one loss per sample), or token losses ``[B, T]``
        whose per-row means over the tokens where ``mask`` holds are taken
        inside the op (an exact fixed-point mean of the float32 token
        losses, spec section 6: the same bits on every backend, summed in
        parallel on a GPU). A row with no token to score is skipped: its
        state is untouched, nothing is counted and its weight is 0.
    ids, state, b
        As in :func:`es_step`.
    mask : Tensor or None
        bool ``[B, T]`` with token losses: the tokens that count (None: all).
    segment_ids : Tensor or None
        Packed rows, as in :func:`es_step` (``ids`` None): ``losses`` are
        then token losses ``[B, T]`` and the state is per document.
    beta1, beta2, lam, select_mode, eps, seed, step, advance_step, w_min
        The step's settings, as in :func:`es_step`.

    Returns
    -------
    StepResult
        As in :func:`es_step`; ``losses`` are the per-row values ``[B]``.

    Raises
    ------
    ValueError
        As in :func:`es_step`.

    Notes
    -----
    No host synchronisation (except in the checked mode).
    """
    if segment_ids is not None:
        return packed_step_from_losses(losses, ids, state, b, segment_ids, mask=mask, **step_kw(locals()))
    a = _op_args("es_step_from_losses", locals())
    _checks.step_from_losses(a)
    return StepResult(*_run_checked(state, a.ids, ops.es_step_from_losses, a.for_op()))


def eswp_prune(
    state: ESState,
    prune_ratio: float,
    *,
    seed: int = 0,
    epoch: int = 0,
    num_epochs: int = 1,
    anneal_frac: float = DEFAULT_ANNEAL_FRAC,
    rescale: bool = True,
) -> PruneResult:
    """ESWP set-level pruning at the start of ``epoch`` (spec section 7).

    Parameters
    ----------
    state : ESState
        Read only.
    prune_ratio : float in [0, 1)
        Probability of dropping a sample whose score ``s + d`` is below the mean.
    seed, epoch : int >= 0
        The noise of the drops and of the kept order.
    num_epochs : int >= 1
    anneal_frac : float in [0, 1]
        From epoch ``floor((1 - anneal_frac) * num_epochs)`` on nothing is pruned.
    rescale : bool
        Scale a kept below-mean sample's loss by ``1 / (1 - prune_ratio)``.

    Returns
    -------
    PruneResult
        ``order`` int64 ``[N]`` (kept ids in the epoch's random order, then the
        dropped ids ascending), ``num_kept`` 0-d int64 on the device and
        ``scale`` float32 ``[N]``, on the state's device.

    Raises
    ------
    ValueError
        Naming the argument.

    Notes
    -----
    No host synchronisation; ``.kept_ids`` reads ``num_kept`` (one).
    """
    a = _op_args("eswp_prune", locals())
    _checks.prune(a)
    return PruneResult(*ops.eswp_prune(*a.for_op()))
