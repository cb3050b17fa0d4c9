"""The ``torch.ops.es_kernels`` ops: loads the C++ library (which defines the
schemas and the CPU kernels) and registers the fake (meta) implementations
that let the ops trace under ``torch.compile`` and ``opcheck``. (The schema
calls the selection mode ``select_mode``: an argument named ``mode`` collides
with torch's auto-functionalization of mutating ops.) The Triton
module registers the CUDA kernels of the same ops when Triton is present."""
from __future__ import annotations

import torch

from . import _checks

try:
    from . import _C  # noqa: F401  (registers torch.ops.es_kernels.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "es_kernels' C++ library is not built. From a checkout run "
        "`pip install --no-build-isolation -e .` (or `make install`)."
    ) from exc

ops = torch.ops.es_kernels


def _empty(n, like: torch.Tensor, dtype) -> torch.Tensor:
    return torch.empty((n,), dtype=dtype, device=like.device)


@torch.library.register_fake("es_kernels::per_sample_cross_entropy")
def _(logits, targets, ignore_index=-100, label_smoothing=0.0):
    _checks.logits_targets(logits, targets, ignore_index, label_smoothing)
    return _empty(logits.shape[0], logits, torch.float32)


@torch.library.register_fake("es_kernels::es_update")
def _(ids, losses, s, d, errors, beta1, beta2, w_min=1e-8):
    _checks.update(ids, losses, s, d, errors, beta1, beta2, w_min)
    return _empty(ids.shape[0], s, torch.float32)


@torch.library.register_fake("es_kernels::weighted_select")
def _(weights, b, select_mode="sample", seed=0, step=0):
    _checks.select(weights, b, select_mode, seed, step)
    return _empty(b, weights, torch.int64)


@torch.library.register_fake("es_kernels::es_step_losses")
def _(losses, ids, s, d, errors, b, beta1, beta2, select_mode="sample", seed=0, step=0, w_min=1e-8):
    _checks.step_from_losses(losses, ids, s, d, errors, b, beta1, beta2, select_mode, seed, step, w_min)
    n = ids.shape[0]
    return _empty(b, s, torch.int64), _empty(n, s, torch.float32), _empty(n, s, torch.float32)


@torch.library.register_fake("es_kernels::es_step")
def _(logits, targets, ids, s, d, errors, b, beta1, beta2, select_mode="sample", seed=0, step=0,
      ignore_index=-100, label_smoothing=0.0, w_min=1e-8):
    _checks.step_from_logits(logits, targets, ids, s, d, errors, b, beta1, beta2, select_mode, seed, step,
                             ignore_index, label_smoothing, w_min)
    n = ids.shape[0]
    return _empty(b, s, torch.int64), _empty(n, s, torch.float32), _empty(n, s, torch.float32)


@torch.library.register_fake("es_kernels::eswp_prune")
def _(s, d, prune_ratio, seed=0, epoch=0, num_epochs=1, anneal_frac=0.125, rescale=True):
    _checks.prune(s, d, prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale)
    n = s.shape[0]
    return _empty(n, s, torch.int64), s.new_empty((), dtype=torch.int64), _empty(n, s, torch.float32)
