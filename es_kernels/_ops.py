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

Before any of them, a kernel at the ``BackendSelect`` dispatch key runs the
op's validation (:data:`CHECKS`, docs/spec.md section 8) on every call with
real tensors, whatever the device: one validation per op for every backend.

(The selection mode is called ``select_mode`` everywhere: an argument named
``mode`` collides with torch's auto-functionalization of mutating ops.)
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import inspect
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from . import _checks, _spec

NAMESPACE = "es_kernels"

# The schemas' defaults are the package's (es_kernels/_spec.py): one value per setting.
_BETAS = f"float beta1={_spec.DEFAULT_BETA1!r}, float beta2={_spec.DEFAULT_BETA2!r}"
_LAM = f"float lam={_spec.DEFAULT_LAM!r}"
_EPS = f"float eps={_spec.DEFAULT_EPS!r}"
_W_MIN = f"float w_min={_spec.DEFAULT_W_MIN!r}"
_MODE = f'str select_mode="{_spec.DEFAULT_SELECT_MODE}"'
_CE = f"int ignore_index={_spec.DEFAULT_IGNORE_INDEX}, float label_smoothing={_spec.DEFAULT_LABEL_SMOOTHING!r}"
_NOISE = "int seed=0, int step=0, Tensor? seed_tensor=None"
SCHEMAS = {
    "per_sample_cross_entropy": f"(Tensor logits, Tensor targets, {_CE}) -> Tensor",
    "per_sample_cross_entropy_backward": f"(Tensor grad, Tensor logits, Tensor targets, {_CE}) -> Tensor",
    "es_update": f"(Tensor ids, Tensor losses, Tensor(a!) state, Tensor(b!) errors, {_BETAS}, {_LAM}, {_W_MIN}) "
    "-> Tensor",
    "weighted_select": f"(Tensor weights, int b, {_MODE}, {_NOISE}, Tensor? step_tensor=None, {_EPS}) -> Tensor",
    "es_step_from_losses": f"(Tensor losses, Tensor ids, Tensor(a!) state, Tensor(b!) errors, int b, {_BETAS}, "
    f"{_MODE}, {_NOISE}, Tensor(c!)? step_tensor=None, bool advance_step=False, "
    f"{_LAM}, {_EPS}, {_W_MIN}, Tensor? mask=None) -> (Tensor, Tensor, Tensor)",
    "es_step": f"(Tensor logits, Tensor targets, Tensor ids, Tensor(a!) state, Tensor(b!) errors, int b, {_BETAS}, "
    f"{_MODE}, {_NOISE}, Tensor(c!)? step_tensor=None, bool advance_step=False, {_CE}, {_LAM}, {_EPS}, {_W_MIN}) "
    "-> (Tensor, Tensor, Tensor)",
    "eswp_prune": "(Tensor state, float prune_ratio, int seed=0, int epoch=0, int num_epochs=1, "
    f"float anneal_frac={_spec.DEFAULT_ANNEAL_FRAC!r}, bool rescale=True) -> (Tensor, Tensor, Tensor)",
    "es_select_from_state": f"(Tensor ids, Tensor state, Tensor(a!) errors, int b, {_LAM}, {_W_MIN}, {_MODE}, "
    f"{_NOISE}, Tensor(b!)? step_tensor=None, bool advance_step=False, {_EPS}, Tensor? last_seen=None, "
    "int max_age=-1, Tensor? picks=None, int cap=-1) -> (Tensor, Tensor)",
}
OP_NAMES = tuple(SCHEMAS)

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

ops = getattr(torch.ops, NAMESPACE)


# ------------------------------------------------------------------ binding
_CASTS = {"float": float, "int": int}


class OpArgs(tuple):
    """The arguments of one op call, named as in its schema (the base of the
    classes in :data:`ARGS`). ``tuple(args)`` is the positional call."""

    __slots__ = ()

    # set by _args_class for each op (the schema's names are the fields)
    _fields: ClassVar[tuple[str, ...]]
    _casts: ClassVar[list[tuple[int, Callable[[Any], Any]]]]
    _noise_at: ClassVar[list[int] | None]
    signature: ClassVar[inspect.Signature]

    if TYPE_CHECKING:  # what the namedtuple base of each op's class provides

        def __new__(cls, *args: Any, **kwargs: Any) -> OpArgs: ...

        def __getattr__(self, name: str) -> Any: ...

        def _replace(self, **values: Any) -> OpArgs: ...

    @property
    def noise(self) -> tuple[Any, Any]:
        """``(seed, step)`` as the user gave them: the schema's tensor, where
        given, else its int (``seed_tensor`` / ``step_tensor`` win)."""
        seed_t, step_t = getattr(self, "seed_tensor", None), getattr(self, "step_tensor", None)
        return (self.seed if seed_t is None else seed_t, self.step if step_t is None else step_t)

    def for_op(self) -> OpArgs:
        """The call as the op takes it: a ``seed`` / ``step`` given as a
        tensor moved to ``seed_tensor`` / ``step_tensor``, ``float`` and
        ``int`` arguments as Python floats and ints (a numpy scalar passes
        the checks but not the dispatcher). For a checked call."""
        values = list(self)
        if self._noise_at is not None:
            for i, v in zip(self._noise_at, _checks.split_noise(*self.noise)):
                values[i] = v
        for i, cast in self._casts:
            values[i] = cast(values[i])
        return tuple.__new__(type(self), values)


def _args_class(name: str) -> type[OpArgs]:
    schema = getattr(ops, name).default._schema
    fields = [a.name for a in schema.arguments]
    defaults = [a.default_value for a in schema.arguments if a.has_default_value()]
    if any(not a.has_default_value() for a in schema.arguments[len(fields) - len(defaults) :]):
        raise TypeError(f"{name}: arguments with defaults must come last")
    base = collections.namedtuple(f"{name}_args", fields, defaults=defaults)  # type: ignore[misc]  # from the schema
    params = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=a.default_value if a.has_default_value() else inspect.Parameter.empty,
        )
        for a in schema.arguments
    ]
    noise = ("seed", "step", "seed_tensor", "step_tensor")
    namespace = {
        "__slots__": (),
        "_casts": [(i, _CASTS[str(a.type)]) for i, a in enumerate(schema.arguments) if str(a.type) in _CASTS],
        "_noise_at": [fields.index(k) for k in noise] if set(noise) <= set(fields) else None,
        "signature": inspect.Signature(params),
    }
    return type(f"{name}_args", (base, OpArgs), namespace)


ARGS = {name: _args_class(name) for name in OP_NAMES}


def bind(name: str, *args, **kwargs) -> OpArgs:
    """Map a call of op ``name`` (positional and keyword arguments, schema
    defaults filled in) to its named arguments; ``TypeError`` as a Python
    call would raise it."""
    return ARGS[name](*args, **kwargs)


def binds(name: str):
    """Decorate ``fn(args: OpArgs)`` into a function with op ``name``'s
    signature (``inspect.signature`` shows the schema's): the fakes, the
    Triton launchers and the reference take their arguments this way."""

    def deco(fn):
        cls = ARGS[name]

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return fn(cls(*args, **kwargs))

        call.__signature__ = cls.signature  # type: ignore[attr-defined]  # what inspect.signature shows
        return call

    return deco


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
        from . import reference  # here: the reference binds its ops' arguments with this module

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
