"""The scoring pass's mode: eval mode and no autograd, the training mode restored after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _checks


@contextlib.contextmanager
def scoring(model: torch.nn.Module, *, eval_mode: bool = True) -> Iterator[torch.nn.Module]:
    """Run ES's scoring forward as a measurement: eval mode, no autograd.

    Inside the block the model is in eval mode (dropout off, BatchNorm reads
    its running statistics and does not update them) and autograd is off
    (``torch.no_grad()``); on leaving it, each of the model's modules gets
    back the training mode it had (a submodule frozen in eval mode stays so),
    also on an exception. In train mode a scoring pass would update BatchNorm's running
    statistics with every meta-batch (the training step sees them a second
    time) and draw dropout masks into the scores. ``ESTrainer`` and the
    Lightning mixin score the same way.

    ``torch.no_grad()``, not ``torch.inference_mode()``: the selection's
    tensors (``positions``, ``scales``) feed the training loss, which autograd
    records.

    Parameters
    ----------
    model : torch.nn.Module
        The model the block scores with.
    eval_mode : bool
        ``False`` keeps the training mode (dropout on) and only turns autograd
        off, as ``es_score_in_eval_mode=False`` does in the integrations.

    Returns
    -------
    contextlib.AbstractContextManager
        Entering it yields ``model``.

    Raises
    ------
    ValueError
        ``model`` is not a ``torch.nn.Module``, or ``eval_mode`` not a bool.

    Notes
    -----
    No host synchronisation: it sets module flags and the grad mode.

    Examples
    --------
    >>> with scoring(model):
    ...     sel = es.select(ids, logits=model(x), targets=y)  # doctest: +SKIP
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _checks.flag(eval_mode, "eval_mode")
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes:
            m.training = training
