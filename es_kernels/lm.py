"""Language-model scoring: per-sample losses from the last hidden states and
the ``lm_head`` weight, without materialising the ``[B, T, V]`` logits.

A language model's scoring pass (no autograd) usually ends in
``logits = hidden @ weight.T (+ bias)``: for ``B = 8`` sequences of
``T = 4096`` tokens and a 128k vocabulary that is 16 GiB of float32. ES only
needs one float per sequence, so :func:`per_sample_losses_from_hidden` loops
over chunks of the vocabulary instead: each chunk's logits (at most
``workspace_bytes`` of float32) come from one ``torch.mm`` (cuBLAS on a GPU,
in the input dtype, like the model's own ``lm_head``), and an online
log-sum-exp per token row (running max and sum of exponentials, float32)
folds them in. What it computes is ``per_sample_cross_entropy(hidden @
weight.T + bias, targets, ...)`` (docs/spec.md section 5).

Precision: each chunk of logits is a ``torch.mm`` / ``torch.addmm`` in the
dtype of ``hidden`` and ``weight`` (float32, bfloat16 or float16: the GEMM
accumulates as the backend does, float32 for the half types on CPU and
cuBLAS defaults; float32 on a GPU honours ``allow_tf32`` as the model
would), so the logits are rounded to that dtype exactly like a real
``lm_head``'s. Everything after (max, exponentials, sums, log, label
smoothing, per-sequence means) is float32. The target's logit is gathered
from the same chunk of logits the log-sum-exp reads, so it is the value
``F.cross_entropy`` on the materialised logits would see.

No host synchronisation: chunk sizes depend on shapes alone, and no tensor
value is read into Python.
"""

from __future__ import annotations

import torch

from . import _checks, _packed
from ._packed import (
    DocumentLosses,
    _check_packed_logits,
    _check_packed_step,
    _check_segments,
    _check_token_losses,
    _group,
    _packed_tokens_from_logits,
    _packed_tokens_from_losses,
    shifted_targets,
    token_documents,
)
from ._spec import (
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_EPS,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_LABEL_SMOOTHING,
    DEFAULT_LAM,
    DEFAULT_SELECT_MODE,
    DEFAULT_W_MIN,
)
from .functional import StepResult, _state, es_step_from_losses, packed_step, step_kw
from .state import ESState

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "DocumentLosses",
    "per_sample_losses_from_hidden",
    "es_step_from_hidden",
    "per_document_losses",
    "per_document_cross_entropy",
    "per_document_losses_from_hidden",
]

DEFAULT_WORKSPACE_BYTES = 256 * 2**20
_ALIGN = 128  # chunk widths above this are rounded down to a multiple of it (GEMM-friendly)


def _on(x, name: str, hidden: torch.Tensor) -> None:
    if isinstance(x, torch.Tensor) and x.device != hidden.device:
        raise ValueError(f"{name} must be on hidden's device ({hidden.device}), got {x.device}")


def _check_hidden(
    hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes, device=None
) -> None:
    """Metadata-only validation; ``ValueError`` naming the argument."""
    _checks.tensor(hidden, "hidden", dim=(2, 3), dtypes=_checks.LOGIT_DTYPES, device=device)
    for x, name in ((weight, "weight"), (bias, "bias"), (targets, "targets")):
        _on(x, name, hidden)
    _checks.tensor(weight, "weight", dim=2)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[0] == 0 and hidden.shape[0] > 0:  # V >= 1 when B > 0, as logits (spec section 5)
        raise ValueError(f"weight must have at least one row (the vocabulary), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, {hidden.shape[-1]}] (hidden's last dimension), got {tuple(weight.shape)}"
        )
    if bias is not None:
        _checks.tensor(bias, "bias", dim=1)
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (weight's rows), got {tuple(bias.shape)}")
    _checks.tensor(targets, "targets", dtypes=_checks.INDEX_DTYPES)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    _checks.integer(ignore_index, "ignore_index")
    _checks.real(label_smoothing, "label_smoothing", 0.0, 1.0)
    _checks.flag(shift_labels, "shift_labels")
    if shift_labels and hidden.dim() != 3:
        raise ValueError(
            f"shift_labels=True needs hidden [B, T, H] and targets [B, T], got hidden {tuple(hidden.shape)}"
        )
    _checks.integer(workspace_bytes, "workspace_bytes", 1)


def chunk_width(rows: int, vocab: int, workspace_bytes: int) -> int:
    """Vocabulary columns per chunk: ``rows * width * 4`` bytes fit the
    workspace (at least one column; widths above 128 are multiples of 128)."""
    width = max(1, min(vocab, workspace_bytes // max(1, rows * 4)))
    if _ALIGN < width < vocab:
        width -= width % _ALIGN
    return width


def _token_losses(h, t, weight, bias, ignore_index, label_smoothing, workspace_bytes):
    """float32 ``[rows]``: spec section 5's ``tok`` of each row of ``h @ weight.T + bias``
    (0 where ignored, NaN for a bad target), under no_grad."""
    vocab = weight.shape[0]
    t = t.long()
    rows, dev = h.shape[0], h.device
    ignored = t == ignore_index
    inside = (t >= 0) & (t < vocab)
    f32 = dict(dtype=torch.float32, device=dev)
    run_max = torch.full((rows,), float("-inf"), **f32)
    run_sum = torch.zeros((rows,), **f32)
    target_logit = torch.zeros((rows,), **f32)
    logit_sum = torch.zeros((rows,), **f32) if label_smoothing > 0.0 else None
    step = chunk_width(rows, vocab, workspace_bytes)
    for c0 in range(0, vocab if rows > 0 else 0, step):
        c1 = min(c0 + step, vocab)
        w = weight[c0:c1]
        x = torch.mm(h, w.t()) if bias is None else torch.addmm(bias[c0:c1], h, w.t())
        x = x.float()  # no copy for float32 (the chunk is ours to overwrite below); frees a half-type chunk
        # the target's logit, from the very values the log-sum-exp reads
        here = inside & (t >= c0) & (t < c1)
        got = x.gather(1, (t - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(here, got, target_logit)
        if logit_sum is not None:
            logit_sum += x.sum(1)
        new_max = torch.maximum(run_max, x.amax(1))
        shift = torch.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: no -inf - -inf
        run_sum = run_sum * torch.exp(run_max - shift) + x.sub_(shift.unsqueeze(1)).exp_().sum(1)
        run_max = new_max
        del x, got  # before the next chunk is allocated: one chunk alive at a time
    shift = torch.where(run_max == float("-inf"), 0.0, run_max)
    lse = torch.log(run_sum) + shift
    tok = lse - target_logit
    if logit_sum is not None:  # spec: skipped at 0 (no 0 * inf)
        tok = (1.0 - label_smoothing) * tok + label_smoothing * (lse - logit_sum / vocab)
    tok = torch.where(inside, tok, float("nan"))
    return torch.where(ignored, 0.0, tok)


def _losses(hidden, weight, targets, bias, ignore_index, label_smoothing, workspace_bytes):
    """float32 ``[B]`` (spec section 5 on ``hidden @ weight.T + bias``), under no_grad."""
    h = hidden.reshape(-1, hidden.shape[-1])  # a view for the model's hidden states
    tok = _token_losses(h, targets.reshape(-1), weight, bias, ignore_index, label_smoothing, workspace_bytes)
    if hidden.dim() == 2:
        return tok
    tok = tok.reshape(targets.shape)
    count = (targets != ignore_index).sum(1)
    return torch.where(count > 0, tok.sum(1) / count.clamp(min=1), 0.0)


def per_sample_losses_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    shift_labels: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> torch.Tensor:
    """Per-sample cross-entropy of ``hidden @ weight.T + bias`` without the logits.

    Equal (to rounding) to ``per_sample_cross_entropy(F.linear(hidden, weight,
    bias), targets, ignore_index, label_smoothing, shift_labels=...)``, with at
    most about ``workspace_bytes`` of logits alive at a time.

    Parameters
    ----------
    hidden : Tensor
        ``[B, H]`` or ``[B, T, H]`` float32 / bfloat16 / float16: the last
        hidden states (the input of the ``lm_head``).
    weight : Tensor
        ``[V, H]``, the dtype and device of ``hidden``: ``lm_head.weight``.
    targets : Tensor
        int64 / int32 ``[B]`` or ``[B, T]``.
    bias : Tensor or None
        ``[V]``, the dtype of ``weight`` (``lm_head.bias``).
    ignore_index, label_smoothing
        As in :func:`es_kernels.per_sample_cross_entropy`.
    shift_labels : bool
        Causal-LM convention (Hugging Face: ``labels`` equal ``input_ids``,
        -100 at padding): position ``t`` is scored against ``targets[:, t + 1]``;
        pass the full ``[B, T, H]`` hidden states and ``[B, T]`` labels.
    workspace_bytes : int > 0
        Bound on one chunk of float32 logits (``rows * chunk * 4`` bytes,
        ``rows = B * T``); the chunk is at least one column wide. Peak extra
        memory is about one chunk in the input dtype plus its float32 copy
        (none for float32 input), plus ``O(rows)`` float32 vectors.

    Returns
    -------
    Tensor
        float32 ``[B]``: the row's loss, or the mean over a sequence's scored
        tokens (0 when none; NaN when a target is outside ``[0, V)`` and not
        ``ignore_index``). No gradient (a score, computed under ``no_grad``);
        works under ``inference_mode``. No host synchronisation.

    Raises
    ------
    ValueError
        naming the argument, for a wrong shape, dtype, device or value.
    """
    _check_hidden(hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes)
    if shift_labels:  # the targets move, the hidden states are read whole (no copy of hidden[:, :-1])
        targets = shifted_targets(targets, ignore_index)
    with torch.no_grad():
        return _losses(hidden, weight, targets, bias, ignore_index, float(label_smoothing), workspace_bytes)


def es_step_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ids: torch.Tensor | None,
    state: ESState,
    b: int,
    *,
    bias: torch.Tensor | None = None,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    lam: float = DEFAULT_LAM,
    select_mode: str = DEFAULT_SELECT_MODE,
    eps: float = DEFAULT_EPS,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    advance_step: bool = False,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    shift_labels: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    w_min: float = DEFAULT_W_MIN,
    segment_ids: torch.Tensor | None = None,
) -> StepResult:
    """The ES step from hidden states: :func:`per_sample_losses_from_hidden`
    then :func:`es_kernels.es_step_from_losses`.

    Parameters
    ----------
    hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes
        As in :func:`per_sample_losses_from_hidden`.
    ids, state, b
        As in :func:`es_kernels.es_step`; ``hidden`` must be on the state's device.
    beta1, beta2, lam, select_mode, eps, seed, step, advance_step, w_min
        The step's settings, as in :func:`es_kernels.es_step`.
    segment_ids : Tensor or None
        Packed rows (int ``[B, T]``; ``ids`` must be None): the state is per
        document and the step selects rows (docs/spec.md section 6.1).

    Returns
    -------
    StepResult
        As in :func:`es_kernels.es_step`.

    Raises
    ------
    ValueError
        Naming the argument; every argument is validated before the losses
        are computed or anything is written. Also for ``hidden``, ``weight``
        or ``bias`` that require grad while grad mode is on: the step is not
        differentiable, score under ``torch.no_grad()`` or
        ``torch.inference_mode()``.

    Notes
    -----
    No host synchronisation (except in the checked mode).
    """
    st = _state(state)
    kw = step_kw(locals())
    _checks.no_grad_inputs(hidden=hidden, weight=weight, bias=bias)
    if segment_ids is not None:
        scoring = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, workspace_bytes=workspace_bytes)
        ce = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, shift_labels=shift_labels)
        return packed_step(*packed_tokens(ids, segment_ids, st, b, kw, **scoring, **ce), st, b, **kw)
    _checks.state(st.tensor, st.errors)
    _check_hidden(
        hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes, device=st.device
    )
    ids = _checks.tensor(ids, "ids", dim=1, dtypes=_checks.INDEX_DTYPES, device=st.device)
    if ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"ids must have the batch size of hidden ({hidden.shape[0]}), got {ids.shape[0]}")
    _checks.hyper(beta1, beta2, lam, w_min)
    _checks.selection(b, ids.shape[0], select_mode, seed, step, eps, st.device)
    _checks.step_tensor(step, advance_step)
    losses, scored = row_losses_from_hidden(
        hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes
    )
    return es_step_from_losses(losses.unsqueeze(1), ids, st, b, mask=scored.unsqueeze(1), **kw)


def row_losses_from_hidden(hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes):
    """The rows' losses and which rows have a target to score (validated
    arguments): ``(float32 [B], bool [B])``, what :func:`es_step_from_hidden`
    observes. A row (sequence) with no target to score is skipped, as from
    logits: one token per row, masked where there is none (the mean of one
    token is that token)."""
    if shift_labels:
        targets = shifted_targets(targets, ignore_index)
    with torch.no_grad():
        losses = _losses(hidden, weight, targets, bias, ignore_index, float(label_smoothing), workspace_bytes)
    scored = targets != ignore_index
    return losses, scored.any(dim=1) if hidden.dim() == 3 else scored


# --------------------------------------------------------------------------- packed rows (segment_ids)
def _packed_tokens_from_hidden(
    hidden, weight, targets, segment_ids, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = shifted_targets(targets, ignore_index) if shift_labels else targets
    with torch.no_grad():
        tok = _token_losses(
            hidden.reshape(-1, hidden.shape[-1]),
            t.reshape(-1),
            weight,
            bias,
            ignore_index,
            float(label_smoothing),
            workspace_bytes,
        ).view(t.shape)
    doc = token_documents(segment_ids, shift_labels)
    return tok, (t != ignore_index) & (doc >= 0), doc


def per_document_losses(
    losses: torch.Tensor, segment_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> DocumentLosses:
    """Per-document means of token losses of packed rows (docs/spec.md section 6.1).

    Parameters
    ----------
    losses : Tensor
        floating ``[B, T]``: any token losses (e.g. ``F.cross_entropy(...,
        reduction="none")``, already aligned with ``segment_ids``).
    segment_ids : Tensor
        int64 / int32 ``[B, T]``: the document (its id in the ES state) of each
        token; negative: padding, never scored.
    mask : Tensor or None
        bool ``[B, T]``: the tokens to score (None: every token with a document).

    Returns
    -------
    DocumentLosses
        ``(ids, losses, counts)`` in ``B * T`` slots: the documents with a
        scored token in ascending id (a document split over several rows is
        one entry), then ``-1`` slots. No host synchronisation.
    """
    _check_token_losses(losses, segment_ids, mask)
    return _group(*_packed_tokens_from_losses(losses, segment_ids, mask))[0]


def per_document_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    *,
    shift_labels: bool = False,
) -> DocumentLosses:
    """Per-document cross-entropy of packed rows: :func:`per_document_losses` of
    the token cross-entropies of ``logits [B, T, V]`` (read in place when they
    flatten to ``[B * T, V]`` without a copy, as a model's logits do) against
    ``targets [B, T]``. With ``shift_labels=True`` position ``t`` is scored
    against ``targets[:, t + 1]`` and only when tokens ``t`` and ``t + 1`` belong
    to the same document (pass the full logits, labels and ``segment_ids``).
    Ignored targets are not scored; a bad target makes its document's loss NaN.

    Parameters
    ----------
    logits : Tensor
        ``[B, T, V]`` float32 / bfloat16 / float16.
    targets : Tensor
        int64 / int32 ``[B, T]``.
    segment_ids : Tensor
        As in :func:`per_document_losses`.
    ignore_index, label_smoothing, shift_labels
        As in :func:`es_kernels.per_sample_cross_entropy`.

    Returns
    -------
    DocumentLosses
        The documents' mean token cross-entropies, laid out as
        :func:`per_document_losses` lays them out; on the logits' device, no
        host synchronisation.

    Raises
    ------
    ValueError
        Naming the argument: logits, targets and segment_ids of other
        shapes, dtypes or devices, a bad ``ignore_index`` or ``label_smoothing``.
    """
    _check_packed_logits(logits, targets, segment_ids, ignore_index, label_smoothing, shift_labels)
    return _group(
        *_packed_tokens_from_logits(logits, targets, segment_ids, ignore_index, label_smoothing, shift_labels)
    )[0]


def per_document_losses_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    shift_labels: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> DocumentLosses:
    """:func:`per_document_cross_entropy` of ``hidden @ weight.T + bias`` without
    the logits (vocabulary chunks, as :func:`per_sample_losses_from_hidden`).

    Parameters
    ----------
    hidden : Tensor
        ``[B, T, H]`` float32 / bfloat16 / float16.
    weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes
        As in :func:`per_sample_losses_from_hidden`.
    segment_ids : Tensor
        As in :func:`per_document_losses`.

    Returns
    -------
    DocumentLosses
        As in :func:`per_document_losses`. No host synchronisation.

    Raises
    ------
    ValueError
        Naming the argument, for a wrong shape, dtype, device or value.
    """
    opts = (ignore_index, label_smoothing, shift_labels, workspace_bytes)
    _check_hidden(hidden, weight, targets, bias, *opts)
    _check_segments(segment_ids, targets.shape, hidden.device)
    if hidden.dim() != 3:
        raise ValueError(f"segment_ids needs hidden [B, T, H], got {tuple(hidden.shape)}")
    return _group(*_packed_tokens_from_hidden(hidden, weight, targets, segment_ids, bias, *opts))[0]


def packed_tokens(
    ids,
    segment_ids,
    st,
    b,
    kw,
    *,
    hidden=None,
    weight=None,
    bias=None,
    targets=None,
    ignore_index=DEFAULT_IGNORE_INDEX,
    label_smoothing=0.0,
    shift_labels=False,
    workspace_bytes=DEFAULT_WORKSPACE_BYTES,
    **given,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a packed step (docs/spec.md section 6.1; ``kw`` its settings, ``st``
    its state) and return its token grid ``(tok, scored, doc)`` from the
    ``hidden`` states, or else (``given``: ``losses`` and ``mask`` or ``logits``)
    as :func:`es_kernels._packed.packed_tokens` does."""
    if hidden is None:
        ce_kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, shift_labels=shift_labels)
        return _packed.packed_tokens(ids, segment_ids, st, b, kw, targets=targets, **ce_kw, **given)
    ce = (ignore_index, label_smoothing, shift_labels)
    _check_packed_step(ids, segment_ids, st, b, **kw)
    _checks.no_grad_inputs(hidden=hidden, weight=weight, bias=bias)
    _check_hidden(hidden, weight, targets, bias, *ce, workspace_bytes, device=st.device)
    if hidden.dim() != 3:
        raise ValueError(f"segment_ids needs hidden [B, T, H], got {tuple(hidden.shape)}")
    _check_segments(segment_ids, targets.shape, st.device)
    return _packed_tokens_from_hidden(hidden, weight, targets, segment_ids, bias, *ce, workspace_bytes)
