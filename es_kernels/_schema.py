"""The ``torch.ops.es_kernels`` schemas, defined once, here (docs/spec.md
section 10), and the binding of a call's arguments to them.

This module defines the ops (``torch.library.define``) and nothing else:
:mod:`es_kernels._ops` registers their checks, fakes and kernels, and the
code that takes an op's arguments (the fakes, the Triton launchers, the
reference's fused steps, the functional API) binds them by the schema's
names with :func:`bind` / :func:`binds` instead of restating the list.
"""

from __future__ import annotations

import collections
import functools
import inspect
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
    "weighted_select": f"(Tensor weights, int b, {_MODE}, {_NOISE}, Tensor? step_tensor=None, {_EPS}, int offset=0) "
    "-> Tensor",
    "es_step_from_losses": f"(Tensor losses, Tensor ids, Tensor(a!) state, Tensor(b!) errors, int b, {_BETAS}, "
    f"{_MODE}, {_NOISE}, Tensor(c!)? step_tensor=None, bool advance_step=False, "
    f"{_LAM}, {_EPS}, {_W_MIN}, Tensor? mask=None) -> (Tensor, Tensor, Tensor)",
    "es_step": f"(Tensor logits, Tensor targets, Tensor ids, Tensor(a!) state, Tensor(b!) errors, int b, {_BETAS}, "
    f"{_MODE}, {_NOISE}, Tensor(c!)? step_tensor=None, bool advance_step=False, {_CE}, {_LAM}, {_EPS}, {_W_MIN}) "
    "-> (Tensor, Tensor, Tensor)",
    "eswp_prune": "(Tensor state, float prune_ratio, int seed=0, int epoch=0, int num_epochs=1, "
    f"float anneal_frac={_spec.DEFAULT_ANNEAL_FRAC!r}, bool rescale=True, int id_offset=0, int order_key=0, "
    "float? threshold=None) -> (Tensor, Tensor, Tensor)",
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
