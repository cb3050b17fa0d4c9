"""Argument validation shared by every path (docs/spec.md section 8).

Every check reads metadata only (shapes, dtypes, devices, strides, host
scalars), never a tensor's values, so it costs no host round-trip on a GPU.
Each failure is a ``ValueError`` that names the argument. The public API, the
fake (meta) implementations and the Triton launchers all call these, before
anything is written to the per-sample state.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Any

import torch

from . import _spec

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)
STATE_DTYPES = (torch.float32, torch.float64)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _names(dtypes) -> str:
    return ", ".join(str(t).replace("torch.", "") for t in dtypes)


def tensor(x: object, name: str, *, dim=None, dtypes=None, device=None) -> torch.Tensor:
    """``x``, a tensor of ``dim`` dimensions, one of ``dtypes``, on ``device`` (each optional)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dim is not None and x.dim() not in ((dim,) if isinstance(dim, int) else dim):
        want = dim if isinstance(dim, int) else " or ".join(map(str, dim))
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in ({_names(dtypes)}), got {x.dtype}")
    here = x.device  # (each .device makes a new object: read once; the op check layer runs per call)
    if device is not None and here != (device if isinstance(device, torch.device) else torch.device(device)):
        raise ValueError(f"{name} must be on {device} (where the state is), got {here}")
    if here.type == "meta" and (device is None or torch.device(device).type != "meta"):
        raise ValueError(f"{name} is a meta tensor: it holds no values")
    return x


def integer(x, name: str, lo: int | None = _spec.INT64_MIN, hi: int | None = _spec.INT64_MAX) -> int:
    """A host integer in [lo, hi] (int64 by default); a tensor is refused here,
    reading it would sync."""
    if type(x) is not int and (isinstance(x, bool) or not isinstance(x, numbers.Integral)):
        raise ValueError(f"{name} must be a Python int, got {type(x).__name__}")
    x = int(x)
    lo = _spec.INT64_MIN if lo is None else lo
    hi = _spec.INT64_MAX if hi is None else hi
    if x < lo or x > hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
    return x


def real(x, name: str, lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False) -> float:
    if type(x) is not float and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
        raise ValueError(f"{name} must be a Python float, got {type(x).__name__}")
    try:
        x = float(x)
    except OverflowError:
        raise ValueError(f"{name} must be a finite float, got {x}") from None
    bad = not math.isfinite(x) or x < lo or x > hi or (hi_open and x == hi) or (lo_open and x == lo)
    if bad:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {x}")
    return x


def flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def keys(d, name: str, expected) -> None:
    """A saved dict (``load_state_dict``): a dict with exactly the ``expected`` keys."""
    if not isinstance(d, dict):
        raise ValueError(f"{name} must be a dict, got {type(d).__name__}")
    for key in expected:
        if key not in d:
            raise ValueError(f"{name} is missing {key!r}")
    for key in d:
        if key not in expected:
            raise ValueError(f"{name} has an unexpected key {key!r}")


def saved(x, name: str, dtype: torch.dtype, length: int | None = None) -> None:
    """A saved 1-D tensor (``load_state_dict``): a plain strided tensor holding
    values, of ``dtype`` and, if given, ``length``. Metadata only."""
    tensor(x, name, dim=1)
    if x.layout != torch.strided or x.is_nested or x.is_quantized:
        raise ValueError(f"{name} must be a plain (strided) tensor, got layout {x.layout}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {str(dtype).replace('torch.', '')}, got {x.dtype}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {x.shape[0]}")


def writable(x: torch.Tensor, name: str) -> None:
    """An in-place argument must own distinct memory for every element."""
    if x.numel() > 1 and any(st == 0 and sz > 1 for st, sz in zip(x.stride(), x.shape)):
        raise ValueError(f"{name} is expanded (a stride is 0): it cannot be written in place")


def state(st, errors=None) -> None:
    """The per-sample state: one [N, 2] float tensor (s, d), and int64 [2] errors."""
    tensor(st, "state", dim=2, dtypes=STATE_DTYPES)
    if st.shape[1] != 2:
        raise ValueError(f"state must have shape [N, 2] (s, d), got {tuple(st.shape)}")
    if st.shape[0] > _spec.MAX_SAMPLES:
        raise ValueError(f"state: at most 2**48 - 1 samples, got {st.shape[0]}")
    writable(st, "state")
    if errors is not None:
        tensor(errors, "errors", dim=1, dtypes=(torch.int64,), device=st.device)
        if errors.shape[0] != 2:
            raise ValueError(f"errors must have shape (2,), got {tuple(errors.shape)}")
        writable(errors, "errors")


def float32_of(x: float) -> float:
    """``f32(x)``: ``x`` rounded to float32 (round-to-nearest-even), ``inf`` past its range."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def hyper(beta1, beta2, lam, w_min) -> None:
    real(beta1, "beta1", 0.0, 1.0)
    real(beta2, "beta2", 0.0, 1.0)
    weight_settings(lam, w_min)


def weight_settings(lam, w_min) -> None:
    """``lam`` and ``w_min`` of the weight ``max(s + lam d, w_min)`` (section 3)."""
    real(lam, "lam", 0.0, FLOAT32_MAX)
    w_min = real(w_min, "w_min", 0.0, math.inf, lo_open=True)
    # the weight floor is f32(T(w_min)) = f32(w_min) in every state dtype: it must stay in (0, inf)
    if not 0.0 < float32_of(w_min) < math.inf:
        raise ValueError(f"w_min must round to a float32 in (0, inf) (0 < f32(w_min) < inf), got {w_min!r}")


def noise(value, name: str, device, *, mutable: bool = False) -> None:
    """``seed`` / ``step``: a host int in [0, 2**63) or a 0-d int64 tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        tensor(value, name, dtypes=(torch.int64,), device=device)
        if value.dim() != 0:
            raise ValueError(f"{name} must be a 0-d int64 tensor, got shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad")
    else:
        integer(value, name, 0, _spec.INT64_MAX)


def noise_source(host, given, name: str) -> None:
    """A schema's ``seed`` / ``step`` int and its tensor: with the tensor given
    the int must be left at 0 (the tensor would silently win)."""
    if given is not None and not (isinstance(host, numbers.Integral) and not isinstance(host, bool) and host == 0):
        raise ValueError(f"{name} must be 0 when {name}_tensor is given (the tensor is the value), got {host!r}")


def op_noise(a) -> tuple[Any, Any]:
    """``(seed, step)`` of bound op arguments ``a``, after checking that an
    int and a tensor are not both given."""
    noise_source(a.seed, getattr(a, "seed_tensor", None), "seed")
    noise_source(a.step, getattr(a, "step_tensor", None), "step")
    return a.noise


def split_noise(seed, step):
    """``(seed int, step int, seed tensor or None, step tensor or None)``: how
    the op schemas take ``seed`` and ``step`` (a tensor, when given, wins)."""
    seed_t = seed if isinstance(seed, torch.Tensor) else None
    step_t = step if isinstance(step, torch.Tensor) else None
    return (0 if seed_t is not None else int(seed), 0 if step_t is not None else int(step), seed_t, step_t)


def selection(b, batch: int, select_mode, seed, step, eps, device) -> None:
    integer(b, "b", 0, batch)
    if not isinstance(select_mode, str) or select_mode not in _spec.SELECT_MODES:
        raise ValueError(f"select_mode must be one of {_spec.SELECT_MODES}, got {select_mode!r}")
    noise(seed, "seed", device)
    noise(step, "step", device)
    if isinstance(seed, torch.Tensor) and seed is step:
        raise ValueError("seed and step must be different tensors")
    real(eps, "eps", 0.0, 1.0)
    if eps > 0.0 and select_mode == "topk":
        raise ValueError("eps (the exploration mix) needs select_mode='sample'; topk takes eps=0")
    if batch > _spec.MAX_POSITIONS:
        raise ValueError(f"at most 2**32 - 1 positions per call, got {batch}")


def logits_targets(logits, targets, ignore_index, label_smoothing, device=None) -> None:
    tensor(logits, "logits", dim=(2, 3), dtypes=LOGIT_DTYPES, device=device)
    tensor(targets, "targets", dtypes=INDEX_DTYPES, device=logits.device)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if logits.shape[-1] == 0 and logits.shape[0] > 0:  # C >= 1 when B > 0 (spec section 5)
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    integer(ignore_index, "ignore_index")
    real(label_smoothing, "label_smoothing", 0.0, 1.0)


def cross_entropy_grad(a) -> None:
    """per_sample_cross_entropy_backward: the forward's arguments and ``grad``
    (floating ``[B]``, the gradient of the per-sample losses)."""
    logits_targets(a.logits, a.targets, a.ignore_index, a.label_smoothing)
    tensor(a.grad, "grad", dim=1, device=a.logits.device)
    if not a.grad.dtype.is_floating_point:
        raise ValueError(f"grad must be floating point, got {a.grad.dtype}")
    if a.grad.shape[0] != a.logits.shape[0]:
        raise ValueError(f"grad must have shape ({a.logits.shape[0]},) (one per sample), got {tuple(a.grad.shape)}")


def no_grad_inputs(**tensors) -> None:
    """The fused steps are not differentiable: refuse inputs that require
    grad while grad mode is on (their results would carry no gradient)."""
    if not torch.is_grad_enabled():
        return
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor) and x.requires_grad:
            raise ValueError(
                f"{name} requires grad: the ES step is not differentiable. Score under torch.no_grad() or "
                "torch.inference_mode() (or pass .detach()), and compute the training loss with "
                "es_kernels.per_sample_cross_entropy, which is."
            )


def ids_losses(ids, losses, device, token_losses: bool = False, mask=None) -> None:
    tensor(ids, "ids", dim=1, dtypes=INDEX_DTYPES, device=device)
    tensor(losses, "losses", dim=(1, 2) if token_losses else 1, device=device)
    if mask is not None:
        tensor(mask, "mask", dtypes=(torch.bool,), device=device)
        if losses.dim() != 2 or mask.shape != losses.shape:
            raise ValueError(
                f"mask goes with token losses [B, T] and must have their shape, got mask "
                f"{tuple(mask.shape)} and losses {tuple(losses.shape)}"
            )
    if not losses.dtype.is_floating_point:
        raise ValueError(f"losses must be floating point, got {losses.dtype}")
    if losses.shape[0] != ids.shape[0]:
        raise ValueError(f"ids and losses must have the same length, got {ids.shape[0]} and {losses.shape[0]}")


# The op checks take the call's arguments bound to the op's schema
# (``_schema.bind``); ``seed`` and ``step`` are checked as the user gave them
# (``args.noise``: an int or a 0-d tensor).
def update(a) -> None:
    state(a.state, a.errors)
    ids_losses(a.ids, a.losses, a.state.device)
    hyper(a.beta1, a.beta2, a.lam, a.w_min)


def step_tensor(step, advance_step) -> None:
    flag(advance_step, "advance_step")
    if advance_step and not isinstance(step, torch.Tensor):
        raise ValueError("advance_step=True needs step as a 0-d int64 tensor (the counter to advance)")
    if isinstance(step, torch.Tensor):
        writable(step, "step")


def step_settings(a, batch: int, device) -> None:
    """The update and selection settings of a fused step over ``batch`` positions."""
    seed, step = op_noise(a)
    hyper(a.beta1, a.beta2, a.lam, a.w_min)
    selection(a.b, batch, a.select_mode, seed, step, a.eps, device)
    step_tensor(step, a.advance_step)


def step_from_losses(a) -> None:
    state(a.state, a.errors)
    ids_losses(a.ids, a.losses, a.state.device, token_losses=True, mask=a.mask)
    step_settings(a, a.ids.shape[0], a.state.device)


def batch_ids(ids, batch: int, of: str, device) -> None:
    tensor(ids, "ids", dim=1, dtypes=INDEX_DTYPES, device=device)
    if ids.shape[0] != batch:
        raise ValueError(f"ids must have the batch size of {of} ({batch}), got {ids.shape[0]}")


def step_from_logits(a) -> None:
    state(a.state, a.errors)
    logits_targets(a.logits, a.targets, a.ignore_index, a.label_smoothing, device=a.state.device)
    no_grad_inputs(logits=a.logits)
    batch_ids(a.ids, a.logits.shape[0], "logits", a.state.device)
    step_settings(a, a.ids.shape[0], a.state.device)


def select(a) -> None:
    tensor(a.weights, "weights", dim=1)
    if not a.weights.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {a.weights.dtype}")
    selection(a.b, a.weights.shape[0], a.select_mode, *op_noise(a), a.eps, a.weights.device)
    integer(a.offset, "offset", 0, _spec.MAX_SAMPLES)  # noise positions offset + j, as ids: below 2**48


def prune(a) -> None:
    state(a.state)
    real(a.prune_ratio, "prune_ratio", 0.0, 1.0, hi_open=True)
    integer(a.seed, "seed", 0)
    integer(a.num_epochs, "num_epochs", 1)
    integer(a.epoch, "epoch", 0)
    real(a.anneal_frac, "anneal_frac", 0.0, 1.0)
    flag(a.rescale, "rescale")
    integer(a.id_offset, "id_offset", 0, _spec.MAX_SAMPLES - a.state.shape[0])  # ids below 2**48 - 1
    integer(a.order_key, "order_key", 0)
    if a.threshold is not None:
        finite_or_nan(a.threshold, "threshold")  # NaN: nothing is below it


def finite_or_nan(x, name: str) -> float:
    """A host float, finite or NaN."""
    if type(x) is not float and (isinstance(x, bool) or not isinstance(x, numbers.Real)):
        raise ValueError(f"{name} must be a Python float, got {type(x).__name__}")
    try:
        x = float(x)
    except OverflowError:
        x = math.inf
    if math.isinf(x):
        raise ValueError(f"{name} must be finite or NaN, got {x}")
    return x


def select_from_state(a) -> None:
    """es_select_from_state (docs/spec.md section 12.2): the state, the ids,
    the weight and selection settings, and each counter with its bound."""
    state(a.state, a.errors)
    tensor(a.ids, "ids", dim=1, dtypes=INDEX_DTYPES, device=a.state.device)
    weight_settings(a.lam, a.w_min)
    seed, step = op_noise(a)
    selection(a.b, a.ids.shape[0], a.select_mode, seed, step, a.eps, a.state.device)
    step_tensor(step, a.advance_step)
    n = a.state.shape[0]
    for name, counter, bound in (("last_seen", a.last_seen, "max_age"), ("picks", a.picks, "cap")):
        limit = integer(getattr(a, bound), bound, -1)
        if counter is None:
            if limit >= 0:
                raise ValueError(f"{bound} >= 0 needs {name} (int64 [N])")
            continue
        tensor(counter, name, dim=1, dtypes=(torch.int64,), device=a.state.device)
        if counter.shape[0] != n:
            raise ValueError(f"{name} must have length N = {n} (the state's), got {counter.shape[0]}")
