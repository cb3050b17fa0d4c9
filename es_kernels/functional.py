"""The functional API: validate (metadata only), then call the op of the
inputs' device (C++ on CPU, Triton on CUDA) through ``torch.ops.es_kernels``.

Set ``ES_KERNELS_CHECKED=1`` for the checked mode of ES_SPEC section 8: every
step then also refuses duplicate ids and calls ``state.check()`` afterwards
(both read device values: for debugging, not for speed).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import _checks
from ._ops import ops
from .state import ESState

DEFAULT_BETA1 = 0.2
DEFAULT_BETA2 = 0.5  # from the demo ablation (bench/results/demo_ablation/ablation.json)
DEFAULT_W_MIN = 1e-8


class StepResult(NamedTuple):
    positions: torch.Tensor  # int64 [b], ascending positions into the meta-batch
    losses: torch.Tensor  # float32 [B], per-sample losses
    weights: torch.Tensor  # float32 [B], the weights the selection used


class PruneResult(NamedTuple):
    order: torch.Tensor  # int64 [N]: kept ids in the epoch's random order, then dropped ids
    num_kept: torch.Tensor  # int64 0-d, on the device
    scale: torch.Tensor  # float32 [N]: loss scale of each sample (0 if dropped)

    @property
    def kept_ids(self) -> torch.Tensor:
        """The kept ids (reads ``num_kept`` to the host: one synchronisation)."""
        return self.order[: int(self.num_kept)]


def checked_mode() -> bool:
    return os.environ.get("ES_KERNELS_CHECKED", "").lower() in ("1", "true", "yes", "on")


def _state(state) -> ESState:
    if not isinstance(state, ESState):
        raise ValueError(f"state must be an es_kernels.ESState, got {type(state).__name__}")
    return state


def _refuse_duplicates(ids: torch.Tensor) -> None:
    if ids.numel() != torch.unique(ids).numel():
        raise RuntimeError("es_kernels checked mode: ids within one call must be distinct")


def _run_checked(state: ESState, ids: torch.Tensor, call):
    if not checked_mode():
        return call()
    _refuse_duplicates(ids)
    out = call()
    state.check()
    return out


def per_sample_cross_entropy(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0):
    """float32 ``[B]`` per-sample cross-entropy of ``[B, C]`` logits, or the mean
    token cross-entropy of each sequence of ``[B, T, V]`` logits."""
    _checks.logits_targets(logits, targets, ignore_index, label_smoothing)
    return ops.per_sample_cross_entropy(logits, targets, ignore_index, label_smoothing)


def es_update(ids, losses, state, beta1=DEFAULT_BETA1, beta2=DEFAULT_BETA2, w_min=DEFAULT_W_MIN):
    """Update ``state`` with one observation per position; return the weights ``[B]``."""
    st = _state(state)
    _checks.update(ids, losses, st.s, st.d, st.errors, beta1, beta2, w_min)
    return _run_checked(st, ids, lambda: ops.es_update(ids, losses, st.s, st.d, st.errors,
                                                         float(beta1), float(beta2), float(w_min)))


def weighted_select(weights, b: int, mode: str = "sample", seed: int = 0, step: int = 0):
    """int64 ascending positions of ``b`` of the weights: sampled without
    replacement in proportion to the weights (``"sample"``) or the largest
    (``"topk"``)."""
    _checks.select(weights, b, mode, seed, step)
    return ops.weighted_select(weights, b, mode, seed, step)


def es_step(logits, targets, ids, state, b, *, beta1=DEFAULT_BETA1, beta2=DEFAULT_BETA2,
            mode="sample", seed=0, step=0, ignore_index=-100, label_smoothing=0.0,
            w_min=DEFAULT_W_MIN) -> StepResult:
    """The fused ES step from logits: per-sample losses, state update, selection."""
    st = _state(state)
    _checks.step_from_logits(logits, targets, ids, st.s, st.d, st.errors, b, beta1, beta2, mode,
                             seed, step, ignore_index, label_smoothing, w_min)
    return StepResult(*_run_checked(st, ids, lambda: ops.es_step(
        logits, targets, ids, st.s, st.d, st.errors, b, float(beta1), float(beta2), mode, seed,
        step, ignore_index, float(label_smoothing), float(w_min))))


def es_step_from_losses(losses, ids, state, b, *, beta1=DEFAULT_BETA1, beta2=DEFAULT_BETA2,
                        mode="sample", seed=0, step=0, w_min=DEFAULT_W_MIN) -> StepResult:
    """The ES step from precomputed per-sample losses (any loss)."""
    st = _state(state)
    _checks.step_from_losses(losses, ids, st.s, st.d, st.errors, b, beta1, beta2, mode, seed, step, w_min)
    return StepResult(*_run_checked(st, ids, lambda: ops.es_step_losses(
        losses, ids, st.s, st.d, st.errors, b, float(beta1), float(beta2), mode, seed, step,
        float(w_min))))


def eswp_prune(state, prune_ratio: float, *, seed: int = 0, epoch: int = 0, num_epochs: int = 1,
               anneal_frac: float = 0.125, rescale: bool = True) -> PruneResult:
    """ESWP set-level pruning at the start of ``epoch`` (ES_SPEC section 7)."""
    st = _state(state)
    _checks.prune(st.s, st.d, prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale)
    return PruneResult(*ops.eswp_prune(st.s, st.d, float(prune_ratio), seed, epoch, num_epochs,
                                       float(anneal_frac), rescale))
