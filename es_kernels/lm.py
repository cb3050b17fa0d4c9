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

from . import _checks
from ._ops import bind
from ._spec import DEFAULT_IGNORE_INDEX
from .functional import StepResult, _state, es_step_from_losses, step_settings, takes_step_settings

__all__ = ["DEFAULT_WORKSPACE_BYTES", "per_sample_losses_from_hidden", "es_step_from_hidden"]

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
    if weight.shape[0] == 0:
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


def _losses(hidden, weight, targets, bias, ignore_index, label_smoothing, workspace_bytes):
    """float32 ``[B]`` (spec section 5 on ``hidden @ weight.T + bias``), under no_grad."""
    vocab, width = weight.shape[0], hidden.shape[-1]
    h = hidden.reshape(-1, width)  # a copy only for a non-viewable hidden (e.g. hidden[:, :-1])
    t = targets.reshape(-1).long()
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
    tok = torch.where(ignored, 0.0, tok)
    if hidden.dim() == 2:
        return tok
    tok = tok.reshape(targets.shape)
    count = (~ignored).reshape(targets.shape).sum(1)
    return torch.where(count > 0, tok.sum(1) / count.clamp(min=1), 0.0)


def per_sample_losses_from_hidden(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    label_smoothing: float = 0.0,
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
    if shift_labels:
        hidden, targets = hidden[:, :-1], targets[:, 1:]
    with torch.no_grad():
        return _losses(hidden, weight, targets, bias, ignore_index, float(label_smoothing), workspace_bytes)


@takes_step_settings
def es_step_from_hidden(
    hidden,
    weight,
    targets,
    ids,
    state,
    b,
    *,
    bias=None,
    ignore_index=DEFAULT_IGNORE_INDEX,
    label_smoothing=0.0,
    shift_labels=False,
    workspace_bytes=DEFAULT_WORKSPACE_BYTES,
    **settings,
) -> StepResult:
    """The ES step from hidden states: :func:`per_sample_losses_from_hidden`
    then :func:`es_kernels.es_step_from_losses`.

    Parameters
    ----------
    hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes
        As in :func:`per_sample_losses_from_hidden`.
    ids, state, b
        As in :func:`es_kernels.es_step`; ``hidden`` must be on the state's device.

    Returns
    -------
    StepResult
        As in :func:`es_kernels.es_step`.

    Raises
    ------
    ValueError
        Naming the argument; every argument is validated before the losses
        are computed or anything is written.

    Notes
    -----
    No host synchronisation (except in the checked mode).
    """
    settings = step_settings(settings, "es_step_from_hidden")
    st = _state(state)
    _checks.state(st.tensor, st.errors)
    _check_hidden(
        hidden, weight, targets, bias, ignore_index, label_smoothing, shift_labels, workspace_bytes, device=st.device
    )
    _checks.batch_ids(ids, hidden.shape[0], "hidden", st.device)
    _checks.step_settings(
        bind("es_step_from_losses", None, ids, st.tensor, st.errors, b, **settings), ids.shape[0], st.device
    )
    losses = per_sample_losses_from_hidden(
        hidden,
        weight,
        targets,
        bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        shift_labels=shift_labels,
        workspace_bytes=workspace_bytes,
    )
    return es_step_from_losses(losses, ids, st, b, **settings)
