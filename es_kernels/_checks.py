"""Argument validation shared by every backend (ES_SPEC section 8).

Every check reads metadata only (shapes, dtypes, devices, host scalars), never
a tensor's values, so it costs no host round-trip on a GPU. Each failure is a
``ValueError`` that names the argument. The public API, the fake (meta)
implementations and the Triton launchers all call these, before anything is
written to the per-sample state.
"""
from __future__ import annotations

import math
import numbers

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
STATE_DTYPES = (torch.float32, torch.float64)
MODES = ("sample", "topk")
_U63 = 1 << 63


def _names(dtypes) -> str:
    return ", ".join(str(t).replace("torch.", "") for t in dtypes)


def tensor(x, name: str, *, dim=None, dtypes=None, device=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dim is not None and x.dim() not in ((dim,) if isinstance(dim, int) else dim):
        want = dim if isinstance(dim, int) else " or ".join(map(str, dim))
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in ({_names(dtypes)}), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} (where the state is), got {x.device}")


def integer(x, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """A host integer in [lo, hi]; a tensor is refused, reading it would sync."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise ValueError(f"{name} must be a Python int, got {type(x).__name__}")
    x = int(x)
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        if hi is None:
            raise ValueError(f"{name} must be >= {lo}, got {x}")
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
    return x


def real(x, name: str, lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a Python float, got {type(x).__name__}")
    x = float(x)
    bad = not math.isfinite(x) or x < lo or x > hi or (hi_open and x == hi) or (lo_open and x == lo)
    if bad:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {x}")
    return x


def state_pair(s, d) -> None:
    tensor(s, "s", dim=1, dtypes=STATE_DTYPES)
    tensor(d, "d", dim=1, dtypes=STATE_DTYPES, device=s.device)
    if d.shape != s.shape or d.dtype != s.dtype:
        raise ValueError(f"d must match s ({tuple(s.shape)}, {s.dtype}), got ({tuple(d.shape)}, {d.dtype})")


def state(s, d, errors) -> None:
    state_pair(s, d)
    tensor(errors, "errors", dim=1, dtypes=(torch.int64,), device=s.device)
    if errors.shape[0] != 2:
        raise ValueError(f"errors must have shape (2,), got {tuple(errors.shape)}")


def hyper(beta1, beta2, w_min) -> None:
    real(beta1, "beta1", 0.0, 1.0)
    real(beta2, "beta2", 0.0, 1.0)
    real(w_min, "w_min", 0.0, math.inf, lo_open=True)


def selection(b, batch: int, mode, seed, step) -> None:
    integer(b, "b", 0, batch)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    integer(seed, "seed", 0, _U63 - 1)
    integer(step, "step", 0, _U63 - 1)


def logits_targets(logits, targets, ignore_index, label_smoothing, device=None) -> None:
    tensor(logits, "logits", dim=(2, 3), dtypes=LOGIT_DTYPES, device=device)
    tensor(targets, "targets", dtypes=INDEX_DTYPES, device=logits.device)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if logits.shape[-1] == 0 and logits.shape[0] > 0:
        raise ValueError("logits must have at least one class")
    integer(ignore_index, "ignore_index")
    real(label_smoothing, "label_smoothing", 0.0, 1.0)


def ids_losses(ids, losses, s) -> None:
    tensor(ids, "ids", dim=1, dtypes=INDEX_DTYPES, device=s.device)
    tensor(losses, "losses", dim=1, device=s.device)
    if not losses.dtype.is_floating_point:
        raise ValueError(f"losses must be floating point, got {losses.dtype}")
    if losses.shape[0] != ids.shape[0]:
        raise ValueError(f"ids and losses must have the same length, got {ids.shape[0]} and {losses.shape[0]}")


def step_from_logits(logits, targets, ids, s, d, errors, b, beta1, beta2, mode, seed, step,
                     ignore_index, label_smoothing, w_min) -> None:
    state(s, d, errors)
    logits_targets(logits, targets, ignore_index, label_smoothing, device=s.device)
    tensor(ids, "ids", dim=1, dtypes=INDEX_DTYPES, device=s.device)
    if ids.shape[0] != logits.shape[0]:
        raise ValueError(f"ids must have the batch size of logits ({logits.shape[0]}), got {ids.shape[0]}")
    hyper(beta1, beta2, w_min)
    selection(b, ids.shape[0], mode, seed, step)


def step_from_losses(losses, ids, s, d, errors, b, beta1, beta2, mode, seed, step, w_min) -> None:
    state(s, d, errors)
    ids_losses(ids, losses, s)
    hyper(beta1, beta2, w_min)
    selection(b, ids.shape[0], mode, seed, step)


def update(ids, losses, s, d, errors, beta1, beta2, w_min) -> None:
    state(s, d, errors)
    ids_losses(ids, losses, s)
    hyper(beta1, beta2, w_min)


def select(weights, b, mode, seed, step) -> None:
    tensor(weights, "weights", dim=1)
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {weights.dtype}")
    selection(b, weights.shape[0], mode, seed, step)


def prune(s, d, prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale) -> None:
    state_pair(s, d)
    if s.shape[0] >= 1 << 32:
        raise ValueError(f"s: at most 2**32 - 1 samples, got {s.shape[0]}")
    real(prune_ratio, "prune_ratio", 0.0, 1.0, hi_open=True)
    integer(seed, "seed", 0, _U63 - 1)
    integer(num_epochs, "num_epochs", 1)
    integer(epoch, "epoch", 0)
    real(anneal_frac, "anneal_frac", 0.0, 1.0)
    if not isinstance(rescale, bool):
        raise ValueError(f"rescale must be a bool, got {type(rescale).__name__}")
