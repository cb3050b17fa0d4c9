"""Packed rows (``segment_ids``, docs/spec.md section 6.1): token losses
grouped by document without a host read, the token grid of a packed step from
logits or token losses, and the validation of a packed call.

The entry points are the ``segment_ids`` paths of :func:`es_kernels.es_step` /
:func:`es_kernels.es_step_from_losses` (:mod:`es_kernels.functional`) and the
per-document functions of :mod:`es_kernels.lm` (which adds the hidden states);
this module imports neither.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _checks, _spec
from ._ops import ops
from ._spec import DEFAULT_IGNORE_INDEX


def shifted_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 ``[B, T]``: ``targets[:, t + 1]`` at position ``t``, ``ignore_index``
    at the last position (the causal shift applied to the targets, so that the
    logits or hidden states are read whole, in place)."""
    out = torch.full(targets.shape, ignore_index, dtype=torch.int64, device=targets.device)
    out[:, :-1] = targets[:, 1:]
    return out


class DocumentLosses(NamedTuple):
    """Per-document losses of a packed meta-batch (docs/spec.md section 6.1), in
    ``S = B * T`` fixed-size slots (no shape depends on the values)."""

    ids: torch.Tensor  # int64 [S]: the documents with a scored token, ascending, then -1
    losses: torch.Tensor  # float32 [S]: each document's mean over its scored tokens (0 in the -1 slots)
    counts: torch.Tensor  # int64 [S]: its scored tokens in the meta-batch, over every row (0 in the -1 slots)


def token_documents(segment_ids: torch.Tensor, shift_labels: bool) -> torch.Tensor:
    """int64 ``[B, T]``: the document whose token position ``t`` scores (negative:
    none). Without the shift, ``segment_ids`` itself; with it, position ``t``
    predicts token ``t + 1``, which counts for its document only when tokens
    ``t`` and ``t + 1`` belong to the same one (the last position: none)."""
    seg = segment_ids.long()
    if not shift_labels:
        return seg
    doc = torch.full_like(seg, -1)
    doc[:, :-1] = torch.where(seg[:, :-1] == seg[:, 1:], seg[:, 1:], -1)
    return doc


def _group(tok, scored, doc):
    """Group the scored tokens by document id without a host read: sort the ids
    (unscored tokens last), number the runs of equal ids, and sum per number.
    Returns the :class:`DocumentLosses` and each token's slot (int64 ``[B, T]``)."""
    ids, sums, counts, slot = _document_sums(tok, scored, torch.where(scored, doc, _spec.INT64_MAX))
    has = counts > 0
    losses = torch.where(has, sums / counts.clamp(min=1), 0.0).float()
    return DocumentLosses(torch.where(has, ids, -1), losses, torch.where(has, counts, 0)), slot


def _document_sums(tok, scored, key):
    """The per-key sums of the scored tokens' losses, in ``S = B * T`` slots.

    ``key`` int64 ``[B, T]`` groups the tokens (every scored token's key is its
    document; a key may also hold unscored tokens). Sort the keys, number the
    runs of equal keys, and sum per number: returns ``(keys int64 [S]``, the
    distinct keys ascending then -1; ``sums`` float64 ``[S]``, the sum of
    ``f64(tok)`` over each key's scored tokens (index_add in token order on a
    CPU); ``counts`` int64 ``[S]``, their number; ``slot`` int64 ``[B, T]``,
    each token's slot). No host read."""
    n = key.numel()
    dev = key.device
    sorted_key, perm = torch.sort(key.reshape(-1))
    start = torch.ones(n, dtype=torch.bool, device=dev)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    slot_sorted = torch.cumsum(start, 0) - 1
    slot = torch.empty_like(slot_sorted)
    slot[perm] = slot_sorted
    flat = scored.reshape(-1)
    sums = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(
        0, slot, torch.where(flat, tok.reshape(-1).double(), 0.0)
    )
    counts = torch.zeros(n, dtype=torch.int64, device=dev).index_add_(0, slot, flat.long())
    keys = torch.full((n,), -1, dtype=torch.int64, device=dev).scatter_(0, slot_sorted, sorted_key)
    return keys, sums, counts, slot.view(key.shape)


def _row_means(x, scored) -> torch.Tensor:
    """float32 ``[B]``: each row's mean of ``x`` over its scored tokens (float64 sum), 0 when none."""
    count = scored.sum(1)
    total = torch.where(scored, x.double(), 0.0).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0).float()


def _check_segments(segment_ids, shape, device) -> None:
    _checks.tensor(segment_ids, "segment_ids", dim=2, dtypes=_checks.INDEX_DTYPES, device=device)
    if tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"segment_ids must have shape {tuple(shape)} (the token grid), got {tuple(segment_ids.shape)}")
    if segment_ids.numel() > _spec.MAX_POSITIONS:
        raise ValueError(f"segment_ids: at most 2**32 - 1 tokens per call, got {segment_ids.numel()}")


def _packed_tokens_from_logits(
    logits, targets, segment_ids, ignore_index, label_smoothing, shift_labels
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token losses float32 [B, T], scored bool [B, T], documents int64 [B, T]) from logits."""
    t = shifted_targets(targets, ignore_index) if shift_labels else targets
    flat = logits.reshape(-1, logits.shape[-1])  # a view for a model's logits (pass them whole: shift_labels)
    tok = ops.per_sample_cross_entropy(flat, t.reshape(-1), ignore_index, float(label_smoothing)).view(t.shape)
    doc = token_documents(segment_ids, shift_labels)
    return tok, (t != ignore_index) & (doc >= 0), doc


def _packed_tokens_from_losses(losses, segment_ids, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    doc = segment_ids.long()
    scored = doc >= 0
    if mask is not None:
        scored = scored & mask
    return losses, scored, doc


def _check_token_losses(losses, segment_ids, mask, device=None) -> None:
    _checks.tensor(losses, "losses", dim=2, device=device)
    if not losses.dtype.is_floating_point:
        raise ValueError(f"losses must be floating point, got {losses.dtype}")
    _check_segments(segment_ids, losses.shape, losses.device)
    if mask is not None:
        _checks.tensor(mask, "mask", dtypes=(torch.bool,), device=losses.device)
        if mask.shape != losses.shape:
            raise ValueError(f"mask must have the shape of losses {tuple(losses.shape)}, got {tuple(mask.shape)}")


def _check_packed_logits(logits, targets, segment_ids, ignore_index, label_smoothing, shift_labels, device=None):
    _checks.logits_targets(logits, targets, ignore_index, label_smoothing, device=device)
    _checks.flag(shift_labels, "shift_labels")
    if logits.dim() != 3:
        raise ValueError(f"segment_ids needs logits [B, T, V] and targets [B, T], got logits {tuple(logits.shape)}")
    _check_segments(segment_ids, targets.shape, logits.device)


def _check_packed_step(ids, segment_ids, st, b, beta1, beta2, lam, select_mode, eps, seed, step, advance_step, w_min):
    if ids is not None:
        raise ValueError(
            "ids must be None when segment_ids are given: segment_ids hold the documents' ids in the state"
        )
    _checks.state(st.tensor, st.errors)
    _checks.tensor(segment_ids, "segment_ids", dim=2, dtypes=_checks.INDEX_DTYPES, device=st.device)
    _checks.hyper(beta1, beta2, lam, w_min)
    _checks.selection(b, segment_ids.shape[0], select_mode, seed, step, eps, st.device)
    _checks.step_tensor(step, advance_step)


def packed_tokens(
    ids,
    segment_ids,
    st,
    b,
    kw,
    *,
    logits=None,
    targets=None,
    losses=None,
    mask=None,
    ignore_index=DEFAULT_IGNORE_INDEX,
    label_smoothing=0.0,
    shift_labels=False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a packed step (docs/spec.md section 6.1; ``kw`` its settings, ``st``
    its state) and return its token grid ``(tok, scored, doc)`` from the
    ``losses`` or the ``logits``, whichever is given (the hidden states:
    :func:`es_kernels.lm.packed_tokens`)."""
    _check_packed_step(ids, segment_ids, st, b, **kw)
    if losses is not None:
        _check_token_losses(losses, segment_ids, mask, device=st.device)
        return _packed_tokens_from_losses(losses, segment_ids, mask)
    ce = (ignore_index, label_smoothing, shift_labels)
    _checks.no_grad_inputs(logits=logits)
    _check_packed_logits(logits, targets, segment_ids, *ce, device=st.device)
    return _packed_tokens_from_logits(logits, targets, segment_ids, *ce)
