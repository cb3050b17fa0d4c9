"""The ``torch.ops.es_kernels`` ops, ready to call: their schemas
(:mod:`es_kernels._schema`, docs/spec.md section 10) with their checks, fake
(meta) implementations and kernels registered. Import the ops from here.

The fakes let the ops trace under ``torch.compile`` and
``torch.library.opcheck``. ``(a!)``
marks what an op mutates: the per-sample ``state`` ``[N, 2]``, the ``errors``
counters and, when ``advance_step`` is set, the ``step_tensor`` counter.
``seed`` and ``step`` come as a host int and an optional 0-d int64 tensor; the
tensor, when given, wins (and is read on the device).

Kernels, by device:

* CPU: the C++ library ``es_kernels._C`` (``TORCH_LIBRARY_IMPL`` only), when built;
* CUDA: the Triton kernels (:mod:`es_kernels._triton.ops`), when Triton imports;
* anything else (and CPU without the C++ build, CUDA without Triton): the
  plain-PyTorch reference :mod:`es_kernels.reference`, registered as the
  ``CompositeExplicitAutograd`` kernel, with a one-time warning: correct, slow.

Before any of them, a kernel at the ``BackendSelect`` dispatch key runs the
op's validation (:data:`CHECKS`, docs/spec.md section 8) on every call with
real tensors, whatever the device: one validation per op for every backend.

(The selection mode is called ``select_mode`` everywhere: an argument named
``mode`` collides with torch's auto-functionalization of mutating ops.)
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from . import _checks, reference
from ._schema import ARGS, NAMESPACE, OP_NAMES, SCHEMAS, OpArgs, bind, binds, ops

# the schemas' names too: the package imports the ops from here, registered
__all__ = ["ARGS", "CHECKS", "HAS_CPP", "NAMESPACE", "OP_NAMES", "SCHEMAS", "OpArgs", "bind", "binds", "checked", "ops"]

# ------------------------------------------------------------------ checks
# The one validation of each op (docs/spec.md section 8), on its bound
# arguments: the fakes, the dispatcher's check layer below (every backend)
# and the Triton launchers called directly run it.
CHECKS = {
    "per_sample_cross_entropy": lambda a: _checks.logits_targets(
        a.logits, a.targets, a.ignore_index, a.label_smoothing
    ),
    "per_sample_cross_entropy_backward": _checks.cross_entropy_grad,
    "es_update": _checks.update,
    "weighted_select": _checks.select,
    "es_step_from_losses": _checks.step_from_losses,
    "es_step": _checks.step_from_logits,
    "eswp_prune": _checks.prune,
    "es_select_from_state": _checks.select_from_state,
}


def checked(name: str, fn):
    """``fn(args)`` preceded by op ``name``'s validation (for a kernel called
    without the dispatcher, as the tests call the Triton launchers)."""
    check = CHECKS[name]

    @functools.wraps(fn)
    def call(a):
        check(a)
        return fn(a)

    return call


# ------------------------------------------------------------------ fakes
def _empty(n, like: torch.Tensor, dtype) -> torch.Tensor:
    return torch.empty((n,), dtype=dtype, device=like.device)


def _fake(name):
    """register_fake of ``fn(args)`` bound to the schema, after the op's checks."""

    def deco(fn):
        return torch.library.register_fake(f"{NAMESPACE}::{name}")(binds(name)(checked(name, fn)))

    return deco


@_fake("per_sample_cross_entropy")
def _(a):
    return _empty(a.logits.shape[0], a.logits, torch.float32)


@_fake("per_sample_cross_entropy_backward")
def _(a):
    return torch.empty(a.logits.shape, dtype=a.logits.dtype, device=a.logits.device)


@_fake("es_update")
def _(a):
    return _empty(a.ids.shape[0], a.state, torch.float32)


@_fake("weighted_select")
def _(a):
    return _empty(a.b, a.weights, torch.int64)


def _step_outputs(a):
    n = a.ids.shape[0]
    return _empty(a.b, a.state, torch.int64), _empty(n, a.state, torch.float32), _empty(n, a.state, torch.float32)


@_fake("es_step_from_losses")
def _(a):
    return _step_outputs(a)


@_fake("es_step")
def _(a):
    return _step_outputs(a)


@_fake("eswp_prune")
def _(a):
    n = a.state.shape[0]
    return (
        _empty(n, a.state, torch.int64),
        a.state.new_empty((), dtype=torch.int64),
        _empty(n, a.state, torch.float32),
    )


@_fake("es_select_from_state")
def _(a):
    n = a.ids.shape[0]
    return _empty(a.b, a.state, torch.int64), _empty(n, a.state, torch.float32)


# ------------------------------------------------------------------ kernels
_warned: set = set()
_WHY = {"cpu": "C++ library not built", "cuda": "CUDA needs Triton"}


def _fallback(name: str):
    def kernel(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if dev not in _warned:
            _warned.add(dev)
            warnings.warn(
                f"es_kernels: no native kernel for {dev} tensors "
                f"({_WHY.get(dev, 'no backend')}); "
                "using the plain-PyTorch reference: correct, but slow and it reads device values on the host.",
                RuntimeWarning,
                stacklevel=3,
            )
        return getattr(reference, name)(*args, **kwargs)

    return kernel


# The check layer: a kernel at the BackendSelect key, which the dispatcher
# passes on every call with real tensors (inference mode included) just above
# the device's kernel, validates the arguments and hands the call on to the
# backend (C++, Triton, the reference, or any later one), before anything is
# written. One validation per op, in Python, for every backend; the kernels'
# own guards only keep a direct call memory-safe. (Fake tensors take the fake
# kernels above, which run the same checks.)
_BELOW_CHECKS = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.BackendSelect)


def _check_layer(name: str):
    op, cls, check = getattr(ops, name).default, ARGS[name], CHECKS[name]

    def kernel(keyset, *args, **kwargs):
        check(cls(*args, **kwargs))
        return op.redispatch(keyset & _BELOW_CHECKS, *args, **kwargs)

    return kernel


_lib = torch.library.Library(NAMESPACE, "IMPL")
for _name in OP_NAMES:
    _lib.impl(_name, _fallback(_name), "CompositeExplicitAutograd")
    _lib.impl(_name, _check_layer(_name), "BackendSelect", with_keyset=True)

try:
    if os.environ.get("ES_KERNELS_NO_CPP", "") not in ("", "0"):  # tests of a pure-Python install
        raise ImportError("ES_KERNELS_NO_CPP is set")
    if importlib.util.find_spec(f"{__package__}._C") is None:  # say so plainly, not as Python's import error
        raise ImportError(f"no es_kernels._C library in {os.path.dirname(__file__)}")
    importlib.import_module(f"{__package__}._C")  # registers the CPU kernels: TORCH_LIBRARY_IMPL(es_kernels, CPU)

    HAS_CPP = True
except ImportError as _exc:  # a pure-Python install: the reference serves the CPU
    HAS_CPP = False
    _CPP_ERROR = str(_exc)
    warnings.warn(
        "es_kernels: the C++ CPU kernels are not built (" + _CPP_ERROR + "); CPU tensors use the slow "
        "plain-PyTorch reference. Build them with `pip install --no-build-isolation -e .` from a checkout.",
        RuntimeWarning,
        stacklevel=2,
    )
    _warned.add("cpu")  # said once, here


# ------------------------------------------------------------------ autograd
# per_sample_cross_entropy is differentiable with respect to the logits on
# every backend: its backward is the per_sample_cross_entropy_backward op
# (spec section 5.1), which recomputes each row's log-sum-exp from the saved
# logits (no [B, C] intermediate is kept from the forward). The other ops
# are not differentiable.
def _ce_setup_context(ctx, inputs, output):
    logits, targets, ignore_index, label_smoothing = inputs
    ctx.save_for_backward(logits, targets)
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing


def _ce_backward(ctx, grad):
    logits, targets = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    dx = ops.per_sample_cross_entropy_backward(grad, logits, targets, ctx.ignore_index, ctx.label_smoothing)
    return dx, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::per_sample_cross_entropy", _ce_backward, setup_context=_ce_setup_context)
