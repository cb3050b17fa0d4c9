"""The ``torch.ops.es_kernels`` ops, defined once, here (docs/spec.md section 10).

Each schema is defined next to its fake (meta) implementation, which lets the
ops trace under ``torch.compile`` and ``torch.library.opcheck``. ``(a!)``
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

(The selection mode is called ``select_mode`` everywhere: an argument named
``mode`` collides with torch's auto-functionalization of mutating ops.)
"""

from __future__ import annotations

import os
import warnings

import torch

from . import _checks, reference

NAMESPACE = "es_kernels"

_NOISE = "int seed=0, int step=0, Tensor? seed_tensor=None"
SCHEMAS = {
    "per_sample_cross_entropy": "(Tensor logits, Tensor targets, int ignore_index=-100, "
    "float label_smoothing=0.0) -> Tensor",
    "es_update": "(Tensor ids, Tensor losses, Tensor(a!) state, Tensor(b!) errors, float beta1, float beta2, "
    "float lam=1.0, float w_min=1e-08) -> Tensor",
    "weighted_select": f'(Tensor weights, int b, str select_mode="sample", {_NOISE}, Tensor? step_tensor=None, '
    "float eps=0.0) -> Tensor",
    "es_step_from_losses": "(Tensor losses, Tensor ids, Tensor(a!) state, Tensor(b!) errors, int b, "
    "float beta1, float beta2, "
    f'str select_mode="sample", {_NOISE}, Tensor(c!)? step_tensor=None, bool advance_step=False, '
    "float lam=1.0, float eps=0.0, float w_min=1e-08, Tensor? mask=None) -> (Tensor, Tensor, Tensor)",
    "es_step": "(Tensor logits, Tensor targets, Tensor ids, Tensor(a!) state, Tensor(b!) errors, int b, "
    f'float beta1, float beta2, str select_mode="sample", {_NOISE}, Tensor(c!)? step_tensor=None, '
    "bool advance_step=False, int ignore_index=-100, float label_smoothing=0.0, float lam=1.0, "
    "float eps=0.0, float w_min=1e-08) -> (Tensor, Tensor, Tensor)",
    "eswp_prune": "(Tensor state, float prune_ratio, int seed=0, int epoch=0, int num_epochs=1, "
    "float anneal_frac=0.125, bool rescale=True) -> (Tensor, Tensor, Tensor)",
}
OP_NAMES = tuple(SCHEMAS)

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

ops = getattr(torch.ops, NAMESPACE)


def _noise_arg(value, tensor):
    return value if tensor is None else tensor


# ------------------------------------------------------------------ fakes
def _empty(n, like: torch.Tensor, dtype) -> torch.Tensor:
    return torch.empty((n,), dtype=dtype, device=like.device)


FAKES = {}


def _fake(name):
    """register_fake, and keep the function: the reference fallback runs the
    same argument checks before it writes anything."""

    def deco(fn):
        FAKES[name] = fn
        return torch.library.register_fake(f"{NAMESPACE}::{name}")(fn)

    return deco


@_fake("per_sample_cross_entropy")
def _(logits, targets, ignore_index=-100, label_smoothing=0.0):
    _checks.logits_targets(logits, targets, ignore_index, label_smoothing)
    return _empty(logits.shape[0], logits, torch.float32)


@_fake("es_update")
def _(ids, losses, state, errors, beta1, beta2, lam=1.0, w_min=1e-8):
    _checks.update(ids, losses, state, errors, beta1, beta2, lam, w_min)
    return _empty(ids.shape[0], state, torch.float32)


@_fake("weighted_select")
def _(weights, b, select_mode="sample", seed=0, step=0, seed_tensor=None, step_tensor=None, eps=0.0):
    _checks.select(weights, b, select_mode, _noise_arg(seed, seed_tensor), _noise_arg(step, step_tensor), eps)
    return _empty(b, weights, torch.int64)


@_fake("es_step_from_losses")
def _(
    losses,
    ids,
    state,
    errors,
    b,
    beta1,
    beta2,
    select_mode="sample",
    seed=0,
    step=0,
    seed_tensor=None,
    step_tensor=None,
    advance_step=False,
    lam=1.0,
    eps=0.0,
    w_min=1e-8,
    mask=None,
):
    _checks.step_from_losses(
        losses,
        ids,
        state,
        errors,
        b,
        beta1,
        beta2,
        select_mode,
        _noise_arg(seed, seed_tensor),
        _noise_arg(step, step_tensor),
        advance_step,
        lam,
        eps,
        w_min,
        mask,
    )
    n = ids.shape[0]
    return _empty(b, state, torch.int64), _empty(n, state, torch.float32), _empty(n, state, torch.float32)


@_fake("es_step")
def _(
    logits,
    targets,
    ids,
    state,
    errors,
    b,
    beta1,
    beta2,
    select_mode="sample",
    seed=0,
    step=0,
    seed_tensor=None,
    step_tensor=None,
    advance_step=False,
    ignore_index=-100,
    label_smoothing=0.0,
    lam=1.0,
    eps=0.0,
    w_min=1e-8,
):
    _checks.step_from_logits(
        logits,
        targets,
        ids,
        state,
        errors,
        b,
        beta1,
        beta2,
        select_mode,
        _noise_arg(seed, seed_tensor),
        _noise_arg(step, step_tensor),
        advance_step,
        ignore_index,
        label_smoothing,
        lam,
        eps,
        w_min,
    )
    n = ids.shape[0]
    return _empty(b, state, torch.int64), _empty(n, state, torch.float32), _empty(n, state, torch.float32)


@_fake("eswp_prune")
def _(state, prune_ratio, seed=0, epoch=0, num_epochs=1, anneal_frac=0.125, rescale=True):
    _checks.prune(state, prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale)
    n = state.shape[0]
    return (_empty(n, state, torch.int64), state.new_empty((), dtype=torch.int64), _empty(n, state, torch.float32))


# ------------------------------------------------------------------ kernels
_warned: set = set()
_WHY = {"cpu": "C++ library not built", "cuda": "CUDA needs Triton"}


def _fallback(name: str):
    fn, check = getattr(reference, name), FAKES[name]

    def kernel(*args, **kwargs):
        check(*args, **kwargs)
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
        return fn(*args, **kwargs)

    return kernel


for _name in OP_NAMES:
    _lib.impl(_name, _fallback(_name), "CompositeExplicitAutograd")

try:
    if os.environ.get("ES_KERNELS_NO_CPP", "") not in ("", "0"):  # tests of a pure-Python install
        raise ImportError("ES_KERNELS_NO_CPP is set")
    from . import _C  # noqa: F401  (registers the CPU kernels: TORCH_LIBRARY_IMPL(es_kernels, CPU))

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
