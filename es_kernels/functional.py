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

from . import _checks
from ._ops import ops
from ._spec import (
    DEFAULT_ANNEAL_FRAC,
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_EPS,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_LAM,
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
]


class StepResult(NamedTuple):
    positions: torch.Tensor  # int64 [b], ascending positions into the meta-batch
    losses: torch.Tensor  # float32 [B], per-sample losses
    weights: torch.Tensor  # float32 [B], the weights of the update (w_min for a skipped observation)


class PruneResult(NamedTuple):
    order: torch.Tensor  # int64 [N]: kept ids in the epoch's random order, then dropped ids
    num_kept: torch.Tensor  # int64 0-d, on the device
    scale: torch.Tensor  # float32 [N]: loss scale of each sample (0 if dropped)

    @property
    def kept_ids(self) -> torch.Tensor:
        """The kept ids (reads ``num_kept`` to the host: one synchronisation)."""
        return self.order[: int(self.num_kept)]


def checked_mode() -> bool:
    """True when ``ES_KERNELS_CHECKED`` is set to 1 / true / yes / on."""
    return os.environ.get("ES_KERNELS_CHECKED", "").lower() in ("1", "true", "yes", "on")


def _state(state) -> ESState:
    if not isinstance(state, ESState):
        raise ValueError(f"state must be an es_kernels.ESState, got {type(state).__name__}")
    return state


def _run_checked(state: ESState, ids: torch.Tensor, call):
    if not checked_mode():
        return call()
    if ids.numel() != torch.unique(ids).numel():
        raise RuntimeError("es_kernels checked mode: ids within one call must be distinct")
    out = call()
    state.check()
    return out


STEP_KEYS = ("beta1", "beta2", "lam", "select_mode", "eps", "seed", "step", "advance_step", "w_min")


def step_kw(scope: dict) -> dict:
    """The step's settings (``STEP_KEYS``) from a step function's ``locals()``, to pass on."""
    return {k: scope[k] for k in STEP_KEYS}


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


def per_sample_cross_entropy(
    logits,
    targets,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = 0.0,
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
        No host synchronisation.

    Raises
    ------
    ValueError
        naming the argument, for a wrong shape, dtype or value.
    """
    _checks.logits_targets(logits, targets, ignore_index, label_smoothing)
    logits, targets = _shift(logits, targets, shift_labels)
    return ops.per_sample_cross_entropy(logits, targets, ignore_index, float(label_smoothing))


def es_update(
    ids, losses, state, beta1=DEFAULT_BETA1, beta2=DEFAULT_BETA2, *, lam=DEFAULT_LAM, w_min=DEFAULT_W_MIN
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
        float32 ``[B]`` weights (``w_min`` where an observation was skipped and counted).
        No host synchronisation (except in the checked mode).
    """
    st = _state(state)
    _checks.update(ids, losses, st.tensor, st.errors, beta1, beta2, lam, w_min)
    return _run_checked(
        st,
        ids,
        lambda: ops.es_update(ids, losses, st.tensor, st.errors, float(beta1), float(beta2), float(lam), float(w_min)),
    )


def weighted_select(
    weights, b: int, select_mode: str = "sample", seed=0, step=0, *, eps: float = DEFAULT_EPS
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

    Returns
    -------
    Tensor
        int64 ``[b]``, ascending. No host synchronisation.
    """
    _checks.select(weights, b, select_mode, seed, step, eps)
    seed_i, step_i, seed_t, step_t = _checks.split_noise(seed, step)
    return ops.weighted_select(weights, b, select_mode, seed_i, step_i, seed_t, step_t, float(eps))


def es_step(
    logits,
    targets,
    ids,
    state,
    b,
    *,
    beta1=DEFAULT_BETA1,
    beta2=DEFAULT_BETA2,
    lam=DEFAULT_LAM,
    select_mode="sample",
    eps=DEFAULT_EPS,
    seed=0,
    step=0,
    advance_step=False,
    ignore_index=DEFAULT_IGNORE_INDEX,
    label_smoothing=0.0,
    w_min=DEFAULT_W_MIN,
    shift_labels=False,
    segment_ids=None,
) -> StepResult:
    """The fused ES step from logits: per-sample losses (section 5), the state
    update (section 3) and the selection of ``b`` positions (section 4), in
    one op (two launches on a GPU). Arguments as in
    :func:`per_sample_cross_entropy`, :func:`es_update` and
    :func:`weighted_select`; with ``advance_step=True`` the op adds one to the
    ``step`` tensor after reading it; ``shift_labels=True`` scores a causal
    LM's full ``[B, T, V]`` logits against its ``[B, T]`` labels shifted by
    one (see :func:`per_sample_cross_entropy`). A row (``[B, C]``) whose
    target is ``ignore_index``, or a sequence (``[B, T, V]``) with no target
    to score, is skipped by the update: state untouched, nothing counted,
    weight 0.

    Packed rows: with ``segment_ids`` (int64 / int32 ``[B, T]``, each token's
    document id in the state, negative for padding; ``ids`` must be None) the
    state is per document and ``b`` rows are selected by the token-weighted
    mean of their documents' weights (docs/spec.md section 6.1);
    ``shift_labels=True`` also drops the positions whose next token starts
    another document. The returned ``losses`` and ``weights`` are per row.

    Returns
    -------
    StepResult
        ``(positions int64 [b], losses float32 [B], weights float32 [B])``.
        No host synchronisation (except in the checked mode).
    """
    if segment_ids is not None:
        from .lm import packed_step_from_logits  # lm builds on this module

        return packed_step_from_logits(
            logits,
            targets,
            ids,
            state,
            b,
            segment_ids,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            shift_labels=shift_labels,
            **step_kw(locals()),
        )
    st = _state(state)
    _checks.step_from_logits(
        logits,
        targets,
        ids,
        st.tensor,
        st.errors,
        b,
        beta1,
        beta2,
        select_mode,
        seed,
        step,
        advance_step,
        ignore_index,
        label_smoothing,
        lam,
        eps,
        w_min,
    )
    logits, targets = _shift(logits, targets, shift_labels)
    seed_i, step_i, seed_t, step_t = _checks.split_noise(seed, step)
    return StepResult(
        *_run_checked(
            st,
            ids,
            lambda: ops.es_step(
                logits,
                targets,
                ids,
                st.tensor,
                st.errors,
                b,
                float(beta1),
                float(beta2),
                select_mode,
                seed_i,
                step_i,
                seed_t,
                step_t,
                advance_step,
                ignore_index,
                float(label_smoothing),
                float(lam),
                float(eps),
                float(w_min),
            ),
        )
    )


def es_step_from_losses(
    losses,
    ids,
    state,
    b,
    *,
    mask=None,
    beta1=DEFAULT_BETA1,
    beta2=DEFAULT_BETA2,
    lam=DEFAULT_LAM,
    select_mode="sample",
    eps=DEFAULT_EPS,
    seed=0,
    step=0,
    advance_step=False,
    w_min=DEFAULT_W_MIN,
    segment_ids=None,
) -> StepResult:
    """The ES step from precomputed losses (any loss); see :func:`es_step`.

    ``losses`` is ``[B]`` (one loss per sample), or token losses ``[B, T]``
    whose per-row means over the tokens where ``mask`` (bool ``[B, T]``;
    None: every token) holds are taken inside the op (an exact fixed-point
    mean of the float32 token losses, spec section 6: the same bits on every
    backend, summed in parallel on a GPU). A row with no token to score is skipped: its state is
    untouched, nothing is counted and its weight is 0. The returned
    ``losses`` are the per-row values ``[B]``.

    With ``segment_ids`` (int ``[B, T]``, packed rows; ``ids`` must be None),
    ``losses`` are token losses ``[B, T]`` and the state is per document
    (docs/spec.md section 6.1), as in :func:`es_step`.
    """
    if segment_ids is not None:
        from .lm import packed_step_from_losses  # lm builds on this module

        return packed_step_from_losses(
            losses,
            ids,
            state,
            b,
            segment_ids,
            mask=mask,
            **step_kw(locals()),
        )
    st = _state(state)
    _checks.step_from_losses(
        losses, ids, st.tensor, st.errors, b, beta1, beta2, select_mode, seed, step, advance_step, lam, eps, w_min, mask
    )
    seed_i, step_i, seed_t, step_t = _checks.split_noise(seed, step)
    return StepResult(
        *_run_checked(
            st,
            ids,
            lambda: ops.es_step_from_losses(
                losses,
                ids,
                st.tensor,
                st.errors,
                b,
                float(beta1),
                float(beta2),
                select_mode,
                seed_i,
                step_i,
                seed_t,
                step_t,
                advance_step,
                float(lam),
                float(eps),
                float(w_min),
                mask,
            ),
        )
    )


def eswp_prune(
    state,
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
        ``scale`` float32 ``[N]``. No host synchronisation; ``.kept_ids`` reads
        ``num_kept`` (one).
    """
    st = _state(state)
    _checks.prune(st.tensor, prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale)
    return PruneResult(
        *ops.eswp_prune(st.tensor, float(prune_ratio), seed, epoch, num_epochs, float(anneal_frac), rescale)
    )
