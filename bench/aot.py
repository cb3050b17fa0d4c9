"""Ahead-of-time compilation of every Triton kernel variant the launchers produce.

The Triton interpreter (``TRITON_INTERPRET=1``, what CI runs) never runs
Triton's code generator, so a kernel can pass every test and still fail to
compile for a GPU. This module compiles, without a GPU, every variant the
launchers in :mod:`es_kernels._triton.ops` can produce, for real GPU targets
(sm_90a and sm_80 by default), and reads the resource use of each cubin.

How the variants are found (nothing is listed by hand but the op inputs):

1. :func:`input_matrix` is a matrix of op inputs (dtypes, shapes, modes,
   seeds, ...): the full product of the knobs in AXES (those that choose code
   paths), and each group of SWEEPS (dtypes, int widths, sizes, alignment)
   crossed within itself, with its own values. Axes that real launches
   combine are crossed in one group, not sampled each alone: ce_kernel's
   group crosses vocabularies (10, 37, 128, 32000, 50257, 128256) x label
   smoothing x plain cross-entropy / es_step's fused update (each select
   mode, b = 0 and b > 0) x aligned / unaligned rows (``logits[..., 1:]``)
   x fp32 / bf16 / fp16. The full product of every knob would be millions
   of launches for a few thousand kernels; what a point changes in the
   compiled kernel is its key in step 2 (the constexprs and tile sizes the
   launcher picks, the dtypes, the ==1 / divisible-by-16 specialisations,
   the options), so each group crosses the knobs that act together on one
   kernel and step 2 compiles each distinct key once. A new kernel is one
   more launcher in ``ops.OPS`` (and, for new inputs, a knob and a
   builder). Every public launcher (``ops.OPS``) is called on
   every point that differs in a knob touching its parameters, with ``launch`` patched
   to record ``(kernel, grid, args, meta)`` instead of running, and with the
   tensors reporting ``device.type == "cuda"`` (:class:`_AsIfOnCuda`), so the
   launchers pick the options, block sizes and warps of a CUDA launch. Inputs
   a launcher refuses (``ValueError``) are counted and skipped.
2. Each recorded call goes through Triton's own JIT binder
   (``triton.runtime.jit.create_function_from_signature`` and
   ``JITFunction._pack_args``) with the CUDA backend of the target: pointer
   dtypes, int widths, the ==1 / divisible-by-16 specialisations (except
   ``do_not_specialize``), constexprs and the compile options come out as a
   real launch would make them. Equal variants are compiled once.
3. Each variant is compiled with ``triton.compile`` (Triton's on-disk cache
   makes a rerun fast); ``cuobjdump -res-usage`` gives registers, shared,
   local and stack per kernel, ``ptxas -v`` (rerun with the flags Triton uses)
   the spill bytes. Spills show as STACK, not LOCAL: :func:`problems` flags a
   compile error, LOCAL > 0, STACK > 0 and spill bytes.

Run ``python bench/aot.py`` for a summary (``--help``). The test is
python_tests/test_aot_compile.py; bench/sass_report.py uses the same harness
(``import aot`` with bench/ on ``sys.path``, as a script in bench/ has it).
The kernels must be real ``JITFunction``s: run without
``TRITON_INTERPRET=1`` (the test starts a subprocess without it). It is
tooling, not part of the installed package: run from a checkout.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the kernels of this checkout (as bench/sass_report.py), installed or not
    sys.path.insert(0, str(ROOT))

TARGETS = {"sm_90a": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32)}
PACKAGE = "es_kernels._triton"


# ------------------------------------------------------------ 1. the op inputs
# Each knob: (values, the launcher parameters it acts on; "*": all). The full
# product of AXES (the knobs that choose code paths: constexprs) is run; each
# SWEEPS group (dtypes, int widths, sizes, alignment) is run as a product of its
# own knobs with every other knob at its first value. A launcher only gets the
# points that differ in a knob touching one of its parameters (the others would
# repeat its calls). To cross a knob with everything, move it into AXES.
_IDX = [torch.int64, torch.int32]
AXES: dict[str, tuple[list, set[str]]] = {
    "batch": ([5, 0], {"*"}),  # 0: empty inputs
    "logits_dim": ([3, 2], {"logits"}),
    "losses_dim": ([1, 2], {"losses"}),  # 2: per-token losses
    "mask": ([False, True], {"mask"}),  # a bool token mask
    "select_mode": (["sample", "topk"], {"select_mode"}),
    "b": ([3, 0], {"b"}),
    "label_smoothing": ([0.0, 0.1], {"label_smoothing"}),
    "seed_as_tensor": ([False, True], {"seed", "step", "seed_tensor", "step_tensor"}),  # 0-d int64 tensors
    "advance_step": ([False, True], {"advance_step"}),
    "eps": ([0.0, 0.05], {"eps"}),
    "epoch": ([0, 9], {"epoch"}),  # of 10: pruning, then annealing
    "counters": ([False, True], {"last_seen", "max_age", "picks", "cap"}),  # selection from the state's rules
}
SWEEPS: dict[tuple[str, ...], dict[str, tuple[list, set[str]]]] = {
    ("logits_dtype", "targets_dtype", "ids_dtype"): {
        "logits_dtype": ([torch.float32, torch.bfloat16, torch.float16], {"logits"}),
        "targets_dtype": (_IDX, {"targets"}),
        "ids_dtype": (_IDX, {"ids"}),
    },
    # every block size of the class axis, V divisible by 16 or not, V == 1; with
    # 2-D logits es_step runs the update in the cross-entropy kernel's epilogue
    ("V", "logits_dtype", "targets_dtype", "logits_dim"): {
        "logits_dim": ([3, 2], {"logits"}),
        "V": (
            [
                37,
                1,
                2,
                3,
                5,
                9,
                16,
                17,
                32,
                33,
                64,
                65,
                128,
                129,
                256,
                257,
                512,
                513,
                1024,
                1025,
                2048,
                2049,
                4096,
                4097,
                32000,
                50257,
            ],
            {"logits"},
        ),
    },
    # the launches of ce_kernel, crossed: vocabularies (small, LM sizes; 32000 and 128256
    # share a variant) x label smoothing x plain cross-entropy (3-D logits) / es_step's
    # update in the epilogue (2-D: each select mode, b = 0 and b > 0) x rows 16-byte
    # aligned or not (logits[..., 1:] of rows of V + 1) x dtype
    ("V", "logits_dtype", "logits_dim", "label_smoothing", "select_mode", "b", "logits_layout"): {
        "V": ([10, 37, 128, 32000, 50257, 128256], {"logits"}),
        "logits_dtype": ([torch.float32, torch.bfloat16, torch.float16], {"logits"}),
        "logits_dim": ([3, 2], {"logits"}),
        "label_smoothing": ([0.0, 0.1], {"label_smoothing"}),
        "select_mode": (["sample", "topk"], {"select_mode"}),
        "b": ([3, 0], {"b"}),
        "logits_layout": (["contiguous", "sliced"], {"logits"}),
    },
    # tokens per row (3-D logits, 2-D losses): T == 1 specialises, T == 0 has no tokens;
    # 100 and 2048 give observe_kernel's other tiles (8 x 128, 1 x 1024 tokens)
    ("T",): {"T": ([3, 1, 0, 100, 2048], {"logits", "targets", "losses", "mask"})},
    # ints past 2**31 reach the kernels as i64 (step and epoch as their low 32 bits)
    ("seed",): {"seed": ([0, 2**40 + 3], {"seed", "seed_tensor"})},
    ("step",): {"step": ([7, 2**31 + 5], {"step", "step_tensor", "epoch"})},
    # weighted_select's noise offset (a rank's first global position): 0, divisible by 16, past 2**32 (i64)
    ("noise_offset", "eps"): {"noise_offset": ([0, 4096, 2**40 + 7], {"offset"}), "eps": ([0.0, 0.05], {"eps"})},
    ("ignore_index",): {"ignore_index": ([-100, 1, 16, 2**40], {"ignore_index"})},
    # the number of samples (N == 1 and N % 16 == 0 specialise) and the state dtype
    ("n_state", "state_dtype"): {
        "n_state": ([40, 1, 16, 3000], {"s", "d", "state"}),
        "state_dtype": ([torch.float32, torch.float64], {"s", "d", "state"}),
    },
    # inputs one element past an aligned address: pointers not divisible by 16
    ("offset",): {"offset": ([0, 1], {"*"})},
    # a shard's ESWP plan (spec section 11.2): ids past 2**32 (i64), an order key past
    # 2**31 in its low word (i64), the whole state's threshold given
    ("shard_plan",): {"shard_plan": ([False, True], {"id_offset", "order_key", "threshold"})},
}


def knobs() -> dict[str, tuple[list, set[str]]]:
    """Every knob of AXES and SWEEPS: its values (where first defined) and the
    parameters it acts on (of all its definitions)."""
    out: dict[str, tuple[list, set[str]]] = {}
    for name, (values, params) in itertools.chain(AXES.items(), *(g.items() for g in SWEEPS.values())):
        out.setdefault(name, (values, set()))[1].update(params)
    return out


def input_matrix() -> list[dict]:
    """The points of the op-input matrix (knob name -> value). Extend AXES,
    SWEEPS and _build_args for new inputs."""
    all_knobs = knobs()
    base = {k: v[0][0] for k, v in all_knobs.items()}
    points = [dict(base, **dict(zip(AXES, values))) for values in itertools.product(*(v[0] for v in AXES.values()))]
    for axes, group in SWEEPS.items():
        for values in itertools.product(*(group.get(a, all_knobs[a])[0] for a in axes)):
            points.append(dict(base, **dict(zip(axes, values))))
    return points


def _build_args(params: list[str], k: dict) -> dict:
    """Keyword arguments for a launcher with parameters ``params`` at matrix
    point ``k`` (tensors on the CPU; :class:`_AsIfOnCuda` reports them on CUDA)."""
    B, T, N = k["batch"], k["T"], k["n_state"]
    g = torch.Generator().manual_seed(0)
    off = k["offset"]

    def t(x):  # the same values one element into a larger buffer when offset
        if not off:
            return x
        buf = torch.empty(x.numel() + off, dtype=x.dtype)
        return buf[off:].view(x.shape).copy_(x)

    V = k["V"]
    lshape = (B, T, V) if k["logits_dim"] == 3 else (B, V)
    sd = k["state_dtype"]
    s = torch.full((N,), float("nan"), dtype=sd)
    s[::2] = torch.rand(len(range(0, N, 2)), generator=g, dtype=sd)
    d = torch.where(s == s, torch.zeros_like(s), s)
    seed, step = k["seed"], k["step"]
    as_tensor = k["seed_as_tensor"]
    builders: dict[str, Callable[[], Any]] = {
        "logits": lambda: _layout(t(torch.randn(lshape, generator=g).to(k["logits_dtype"])), k["logits_layout"]),
        "targets": lambda: t(torch.randint(0, max(V, 1), lshape[:-1], generator=g).to(k["targets_dtype"])),
        "ids": lambda: (
            t(torch.randperm(N, generator=g)[:B].to(k["ids_dtype"]))
            if B <= N
            else t(torch.randint(0, N, (B,), generator=g).to(k["ids_dtype"]))
        ),
        "losses": lambda: t(torch.rand((B, T) if k["losses_dim"] == 2 else (B,), generator=g) * 3),
        "mask": lambda: t(torch.rand(B, T, generator=g) > 0.3) if k["mask"] else None,
        "weights": lambda: t(torch.rand(B, generator=g) + 0.1),
        "grad": lambda: t(torch.rand(B, generator=g)),  # per_sample_cross_entropy_backward's
        "s": lambda: t(s),
        "d": lambda: t(d),
        "state": lambda: t(torch.stack([s, d], 1)),
        "errors": lambda: torch.zeros(2, dtype=torch.int64),
        "b": lambda: min(k["b"], B),
        "beta1": lambda: 0.3,
        "beta2": lambda: 0.5,
        "lam": lambda: 1.0,
        "w_min": lambda: 1e-8,
        "select_mode": lambda: k["select_mode"],
        # with seed_tensor / step_tensor the tensor is the value: the host int stays 0 (else refused)
        "seed": lambda: (torch.tensor(seed) if "seed_tensor" not in params else 0) if as_tensor else seed,
        "step": lambda: (torch.tensor(step) if "step_tensor" not in params else 0) if as_tensor else step,
        "seed_tensor": lambda: torch.tensor(seed) if as_tensor else None,
        "step_tensor": lambda: torch.tensor(step) if as_tensor else None,
        "advance_step": lambda: k["advance_step"],
        "eps": lambda: k["eps"],
        "ignore_index": lambda: k["ignore_index"],
        "label_smoothing": lambda: k["label_smoothing"],
        "prune_ratio": lambda: 0.3,
        "epoch": lambda: k["step"] if k["step"] >= 2**31 else k["epoch"],  # the step sweep: a large epoch
        "num_epochs": lambda: 10,
        "anneal_frac": lambda: 0.125,
        "rescale": lambda: True,
        "id_offset": lambda: 2**40 + 3 if k["shard_plan"] else 0,
        "order_key": lambda: 2**32 + 2**31 + 5 if k["shard_plan"] else 0,
        "threshold": lambda: 0.25 if k["shard_plan"] else None,
        "last_seen": lambda: t(torch.randint(0, 9, (N,), generator=g)) if k["counters"] else None,
        "max_age": lambda: 3 if k["counters"] else -1,
        "picks": lambda: t(torch.randint(0, 3, (N,), generator=g)) if k["counters"] else None,
        "cap": lambda: 1 if k["counters"] else -1,
        "offset": lambda: k["noise_offset"],
    }
    return {p: builders[p]() for p in params if p in builders}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` as a view of the class axis of a wider buffer (rows of V + 1):
    ``sliced`` its columns 1.., ``narrowed`` its columns ..V-1."""
    if layout == "contiguous":
        return x
    wide = torch.empty(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
    view = wide[..., 1:] if layout == "sliced" else wide[..., :-1]
    return view.copy_(x)


# ------------------------------------------------ 2. recording launcher calls
_DEVICE_PROPERTY = torch._C.TensorBase.__dict__["device"]
_IS_CUDA_PROPERTY = torch._C.TensorBase.__dict__["is_cuda"]


class _AsIfOnCuda(torch.overrides.TorchFunctionMode):
    """Tensors report ``device`` cuda:0 (and ``is_cuda``); a cuda device asked
    of a factory or ``.to`` is the CPU. The launchers run their CUDA branch on
    CPU tensors; no kernel runs (``launch`` is patched)."""

    CUDA = torch.device("cuda", 0)

    @classmethod
    def _cpu(cls, a):
        if isinstance(a, torch.device) and a.type == "cuda":
            return torch.device("cpu")
        if isinstance(a, str) and a.startswith("cuda"):
            return "cpu"
        if isinstance(a, (list, tuple)) and any(isinstance(x, (torch.device, str)) for x in a):
            return type(a)(cls._cpu(x) for x in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_PROPERTY:
            return self.CUDA
        if owner is _IS_CUDA_PROPERTY:
            return True
        if func is torch.device:  # torch.device("cuda") stays a cuda device, to compare with .device
            return func(*args, **(kwargs or {}))
        kwargs = {k: self._cpu(v) for k, v in (kwargs or {}).items()}
        return func(*(self._cpu(a) for a in args), **kwargs)


@dataclasses.dataclass(frozen=True)
class Ptr:
    """A tensor argument as Triton's binder sees it: a dtype and an address."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


@dataclasses.dataclass
class Call:
    """One recorded launch: the kernel, its arguments (tensors as :class:`Ptr`),
    its keyword arguments (constexprs and options) and where it came from."""

    module: str
    name: str
    args: tuple
    meta: dict
    grid: Any = None
    origin: str = ""

    @property
    def kernel(self):
        return getattr(importlib.import_module(self.module), self.name)


def _mock(a):
    if isinstance(a, torch.Tensor):
        return Ptr(a.dtype, a.data_ptr())
    if isinstance(a, tuple):  # a tuple argument (Triton binds its elements)
        return tuple(_mock(x) for x in a)
    return a


@contextlib.contextmanager
def recording(calls: list, origin: Callable[[], str] = lambda: ""):
    """Patch ``launch`` (in _launch and every module that imported it) to append a
    :class:`Call` to ``calls`` instead of running the kernel."""
    from es_kernels._triton import _launch

    original = _launch.launch
    sig = inspect.signature(original)
    names = {p.kind: n for n, p in sig.parameters.items()}
    var_pos, var_kw = names[inspect.Parameter.VAR_POSITIONAL], names[inspect.Parameter.VAR_KEYWORD]

    def record(*a, **kw):
        bound = sig.bind(*a, **kw).arguments
        kernel = bound["kernel"]
        fn = kernel.fn
        calls.append(
            Call(
                fn.__module__,
                fn.__name__,
                tuple(_mock(x) for x in bound.get(var_pos, ())),
                {k: _mock(x) for k, x in bound.get(var_kw, {}).items()},  # tensors passed by name too
                bound.get("grid"),
                origin(),
            )
        )

    patched = [m for m in list(sys.modules.values()) if getattr(m, "launch", None) is original]
    for m in patched:
        vars(m)["launch"] = record
    try:
        yield calls
    finally:
        for m in patched:
            vars(m)["launch"] = original


@dataclasses.dataclass
class Recorded:
    calls: list[Call]
    accepted: dict[str, int]  # launcher -> calls that ran
    refused: dict[str, int]  # launcher -> inputs refused with ValueError


def record_calls(launchers: dict[str, Callable] | None = None, matrix: list[dict] | None = None) -> Recorded:
    """Run every launcher over the op-input matrix with ``launch`` recording."""
    if launchers is None:
        from es_kernels._triton import ops

        launchers = dict(ops.OPS)
    matrix = input_matrix() if matrix is None else matrix
    knob_params = {k: params for k, (_, params) in knobs().items()}
    calls: list[Call] = []
    current = [""]
    accepted, refused = {}, {}
    with recording(calls, lambda: current[0]):
        for op, fn in launchers.items():
            params = list(inspect.signature(fn).parameters)
            required = [p for p, v in inspect.signature(fn).parameters.items() if v.default is inspect.Parameter.empty]
            # the knobs that reach one of its parameters: other knobs would repeat a call
            knobs_used = [k for k, ps in knob_params.items() if "*" in ps or ps & set(params)]
            seen = set()
            accepted[op] = refused[op] = 0
            for point in matrix:
                key = tuple(repr(point[k]) for k in knobs_used)
                if key in seen:
                    continue
                seen.add(key)
                kwargs = _build_args(params, point)
                missing = [p for p in required if p not in kwargs]
                if missing:
                    raise TypeError(
                        f"aot.input_matrix: no value for {op}'s parameter(s) {missing}; add them to aot._build_args"
                    )
                current[0] = f"{op}({', '.join(f'{p}={_describe(v)}' for p, v in kwargs.items())})"
                try:
                    with _AsIfOnCuda():
                        fn(**kwargs)
                except ValueError:
                    refused[op] += 1
                    continue
                accepted[op] += 1
    return Recorded(calls, accepted, refused)


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).replace("torch.", "")
        off = v.storage_offset()
        return f"{dt}{list(v.shape)}" + (f"+{off}" if off else "")
    return repr(v)


# --------------------------------------------- 3. variants, as Triton binds them
@dataclasses.dataclass
class Variant:
    module: str
    name: str
    arch: str
    target: tuple
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    origin: str = ""
    label: str = ""

    def key(self):
        opts = {k: v for k, v in self.options.items() if k != "extern_libs"}
        return (
            self.module,
            self.name,
            self.arch,
            repr(sorted(self.signature.items())),
            repr(sorted(self.constexprs.items())),
            repr(sorted(self.attrs.items())),
            repr(sorted(opts.items())),
        )


_BINDERS: dict = {}


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{kernel!r} is not a triton JITFunction (TRITON_INTERPRET=1 is set?): "
            "the ahead-of-time compile needs the kernels imported without the interpreter"
        )
    return kernel


def bind(call: Call, arch: str, target: tuple | None = None) -> Variant:
    """The signature, constexprs, attributes and options a launch of ``call``
    on ``target`` compiles with, from Triton's own binder."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(call.kernel)
    target = tuple(target or TARGETS[arch])
    cache_key = (id(kernel), target)
    if cache_key not in _BINDERS:
        backend = make_backend(GPUTarget(*target))
        _BINDERS[cache_key] = (backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    backend, binder = _BINDERS[cache_key]
    kwargs = dict(call.meta)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug  # as JITFunction.run
    for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, opt):
            kwargs[opt] = getattr(knobs.compilation, opt)
    bound_args, specialization, options = binder(*call.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    v = Variant(call.module, call.name, arch, target, signature, constexprs, attrs, dict(options.__dict__), call.origin)
    return v


def variants(calls: Iterable[Call], archs: Iterable[str] = tuple(TARGETS)) -> list[Variant]:
    """The distinct variants of ``calls`` on every arch, labelled."""
    out: dict = {}
    for call in calls:
        for arch in archs:
            v = bind(call, arch)
            out.setdefault(v.key(), v)
    result = list(out.values())
    _label(result)
    return result


def _label(vs: list[Variant]) -> None:
    """A short label per variant: its constexprs, then each argument whose
    type or specialisation is not the most common one of the kernel."""
    by_kernel: dict = {}
    for v in vs:
        by_kernel.setdefault(v.name, []).append(v)
    for name, group in by_kernel.items():
        params = list(getattr(importlib.import_module(group[0].module), name).arg_names)
        desc = [[_arg_desc(v, i, p) for i, p in enumerate(params)] for v in group]
        common = []
        for i in range(len(params)):
            counts: dict = {}
            for d in desc:
                counts[d[i]] = counts.get(d[i], 0) + 1
            common.append(max(counts, key=lambda x: counts[x]))
        for v, d in zip(group, desc):
            consts = [x for x, p in zip(d, params) if v.signature[p] == "constexpr" and p.isupper()]
            other = [x for i, x in enumerate(d) if x != common[i] and x not in consts]
            v.label = " ".join(consts + other + [f"w{v.options.get('num_warps')}"])


def _arg_desc(v: Variant, i: int, p: str) -> str:
    return _desc(v, (i,), p, v.signature[p])


def _desc(v: Variant, path: tuple, p: str, ty) -> str:
    """One argument (``path``: its index, and inside a tuple argument the
    element's index) as the label shows it."""
    if isinstance(ty, tuple):  # a tuple argument: its elements, named p[k]
        return " ".join(_desc(v, path + (k,), f"{p}[{k}]", t) for k, t in enumerate(ty))
    if ty == "constexpr":
        val = v.constexprs.get(path)
        return f"{p}={int(val) if isinstance(val, bool) else val}"
    div = any(a[0] == "tt.divisibility" for a in v.attrs.get(path, []))
    if ty.startswith("*"):
        return f"{p}:{ty}" + ("" if div else "(unaligned)")
    return f"{p}:{ty}" + ("/16" if div else "")


# ------------------------------------------------------------- 4. compiling
@dataclasses.dataclass
class Result:
    name: str
    arch: str
    label: str
    origin: str
    ok: bool
    error: str = ""
    regs: int | None = None
    shared: int | None = None  # bytes, Triton's metadata (dynamic shared memory)
    shared_static: int | None = None
    local: int | None = None  # bytes per thread, cuobjdump LOCAL
    stack: int | None = None  # bytes per thread, cuobjdump STACK
    spill_stores: int | None = None
    spill_loads: int | None = None
    num_warps: int | None = None
    seconds: float = 0.0
    sass: str | None = None
    ptxas_log: str = ""


def _tool(name: str, arch: int) -> str:
    from triton import knobs

    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(arch).path
        except ImportError:
            return knobs.nvidia.ptxas.path
    return getattr(knobs.nvidia, name).path


def _aux_cache_dir() -> str:
    from triton import knobs

    d = os.path.join(knobs.cache.dir, "es_kernels_aot")
    os.makedirs(d, exist_ok=True)
    return d


def _resources(cubin: bytes, ptx: str, arch: int, options: dict, sass: bool) -> dict:
    """cuobjdump -res-usage of the cubin, ptxas -v of the PTX (rerun with the
    flags Triton compiles with), optionally nvdisasm; cached by content."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    gpu = sm_arch_from_capability(arch)
    flags = (["--fmad=false"] if not options.get("enable_fp_fusion", True) else []) + ["--regAllocOptLevel=2"]
    h = hashlib.sha256(cubin + ptx.encode() + repr((gpu, flags, sass)).encode()).hexdigest()
    path = os.path.join(_aux_cache_dir(), h + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        cub = os.path.join(tmp, "k.cubin")
        src = os.path.join(tmp, "k.ptx")
        with open(cub, "wb") as f:
            f.write(cubin)
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [_tool("cuobjdump", arch), "-res-usage", cub], capture_output=True, text=True, check=True
        ).stdout
        log = subprocess.run(
            [_tool("ptxas", arch), "-v", *flags, f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "v.o")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        dis = None
        if sass:
            dis = subprocess.run(
                [_tool("nvdisasm", arch), "-c", cub], capture_output=True, text=True, check=True
            ).stdout
    out = {"res_usage": res, "ptxas_log": log, "sass": dis}
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def _field(text: str, name: str) -> int | None:
    m = re.search(rf"\b{name}:(\d+)", text)
    return int(m.group(1)) if m else None


def compile_variant(v: Variant, sass: bool = False) -> Result:
    """Compile one variant; never raises (the error is in the result)."""
    t0 = time.perf_counter()
    r = Result(v.name, v.arch, v.label, v.origin, ok=False, num_warps=v.options.get("num_warps"))
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = _jit_function(getattr(importlib.import_module(v.module), v.name))
        src = ASTSource(kernel, v.signature, v.constexprs, v.attrs)
        ck = triton.compile(src, target=GPUTarget(*v.target), options=v.options)
        info = _resources(ck.asm["cubin"], ck.asm["ptx"], v.target[1], v.options, sass)
        res = info["res_usage"]
        r.regs, r.local, r.stack = _field(res, "REG"), _field(res, "LOCAL"), _field(res, "STACK")
        r.shared_static = _field(res, "SHARED")
        r.shared = ck.metadata.shared
        log = info["ptxas_log"]
        r.ptxas_log = log
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if m:
            r.spill_stores, r.spill_loads = int(m.group(1)), int(m.group(2))
        r.sass = info["sass"]
        r.ok = True
    except Exception as e:  # noqa: BLE001 -- every failure is reported
        r.error = f"{type(e).__name__}: {e}"
    r.seconds = time.perf_counter() - t0
    return r


def compile_all(vs: list[Variant], workers: int | None = None, sass: bool = False) -> list[Result]:
    """Compile the variants, in ``workers`` processes (default: one per core;
    spawned, so a script calling this needs the ``if __name__ == "__main__"``
    guard)."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(vs) < 2:
        return [compile_variant(v, sass) for v in vs]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no fork of a threaded torch
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        # the kernels with the most parameters (the slowest to compile) first: no long tail on one worker
        order = sorted(range(len(vs)), key=lambda i: -len(vs[i].signature))
        futs = {i: pool.submit(compile_variant, vs[i], sass) for i in order}
        return [futs[i].result() for i in range(len(vs))]


# ------------------------------------------------------ 5. the kernels defined
def defined_kernels(package: str = PACKAGE) -> list[str]:
    """The Triton kernels defined in the package: the jit functions no other
    jit function of the package calls (those are inlined helpers)."""
    pkg = importlib.import_module(package)
    jit = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{info.name}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if callable(fn) and getattr(fn, "__module__", None) == mod.__name__ and hasattr(obj, "arg_names"):
                jit[name] = fn
    called = set()
    for fn in jit.values():
        for node in ast.walk(ast.parse(inspect.getsource(fn).lstrip())):
            if isinstance(node, ast.Call):
                f = node.func
                called.add(f.id if isinstance(f, ast.Name) else getattr(f, "attr", None))
    return sorted(n for n in jit if n not in called)


# ------------------------------------------------------------- 6. reports
def summary(results: list[Result]) -> dict:
    out: dict = {}
    for r in results:
        s = out.setdefault(r.name, {}).setdefault(
            r.arch, {"variants": 0, "errors": 0, "regs_max": 0, "shared_max": 0, "local_max": 0, "stack_max": 0}
        )
        s["variants"] += 1
        s["errors"] += not r.ok
        if r.ok:
            s["regs_max"] = max(s["regs_max"], r.regs or 0)
            s["shared_max"] = max(s["shared_max"], r.shared or 0)
            s["local_max"] = max(s["local_max"], r.local or 0)
            s["stack_max"] = max(s["stack_max"], r.stack or 0)
    return out


def problems(results: list[Result]) -> list[str]:
    """What makes the check fail: a compile error, local memory, a stack
    frame or spills."""
    out, seen = [], set()
    for r in results:
        where = f"{r.name} [{r.label}] {r.arch}"
        if not r.ok:
            last = r.error.strip().splitlines()[-1] if r.error.strip() else "?"
            full = "" if r.error in seen else "\n  " + r.error.replace("\n", "\n  ")  # the full text once
            seen.add(r.error)
            out.append(f"{where}: compile error {last}\n  from {r.origin}{full}")
            continue
        if r.local:
            out.append(f"{where}: {r.local} bytes of local memory per thread")
        if r.stack:
            out.append(f"{where}: {r.stack} bytes of stack frame per thread")
        if r.spill_stores or r.spill_loads:
            out.append(f"{where}: spills ({r.spill_stores} bytes stores, {r.spill_loads} bytes loads)")
    return out


def write_tables(results: list[Result], md_path: str, json_path: str) -> None:
    rows = sorted(results, key=lambda r: (r.name, _natural(r.label), r.arch))
    data: dict[str, Any] = {
        "triton": _triton_version(),
        "summary": summary(results),
        "variants": [
            {
                k: getattr(r, k)
                for k in (
                    "name",
                    "label",
                    "arch",
                    "regs",
                    "shared",
                    "local",
                    "stack",
                    "spill_stores",
                    "spill_loads",
                    "num_warps",
                    "ok",
                    "error",
                )
            }
            for r in rows
        ],
    }
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    lines = [
        "# Ahead-of-time compile of the Triton kernels",
        "",
        f"Every variant the launchers produce (bench/aot.py), compiled for sm_90a and sm_80 "
        f"with Triton {_triton_version()}; written by python_tests/test_aot_compile.py. Registers, local "
        "memory and stack (where spills go) from `cuobjdump -res-usage`, shared memory (bytes, dynamic) from "
        "Triton's metadata.",
        "",
        "| kernel | arch | variants | max registers | max shared (B) | max local (B) | max stack (B) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, archs in sorted(data["summary"].items()):
        for arch, s in sorted(archs.items()):
            lines.append(
                f"| {name} | {arch} | {s['variants']} | {s['regs_max']} | {s['shared_max']} | "
                f"{s['local_max']} | {s['stack_max']} |"
            )
    lines += [
        "",
        "## Every variant",
        "",
        "Label: the constexprs, then each argument whose type or specialisation is not the kernel's most "
        "common one (`/16`: an int divisible by 16; `(unaligned)`: a pointer not divisible by 16), then "
        "the warps.",
        "",
        "| kernel | variant | arch | registers | shared (B) | local (B) | stack (B) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.label} | {r.arch} | {r.regs if r.ok else 'ERROR'} | "
            f"{r.shared if r.ok else ''} | {r.local if r.ok else ''} | {r.stack if r.ok else ''} |"
        )
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _natural(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def _triton_version() -> str:
    import triton

    return triton.__version__


def run(archs: Iterable[str] = tuple(TARGETS), workers: int | None = None, sass: bool = False):
    """Record, bind, compile: (recorded, variants, results)."""
    rec = record_calls()
    vs = variants(rec.calls, archs)
    return rec, vs, compile_all(vs, workers, sass)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", help="write every result (and the recording counts) here")
    ap.add_argument("--tables", help="write <DIR>/aot_kernels.md and .json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rec, vs, results = run(args.arch or tuple(TARGETS), args.workers)
    wall = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "accepted": rec.accepted,
                    "refused": rec.refused,
                    "calls": len(rec.calls),
                    "defined_kernels": defined_kernels(),
                    "wall_s": wall,
                    "results": [dataclasses.asdict(r) for r in results],
                },
                f,
            )
    if args.tables:
        write_tables(
            results, os.path.join(args.tables, "aot_kernels.md"), os.path.join(args.tables, "aot_kernels.json")
        )
    for name, archs in sorted(summary(results).items()):
        for arch, s in sorted(archs.items()):
            print(
                f"{name:28s} {arch:7s} {s['variants']:4d} variants, {s['errors']} errors, "
                f"regs <= {s['regs_max']}, shared <= {s['shared_max']} B, local <= {s['local_max']} B"
            )
    bad = problems(results)
    print(
        f"{len(rec.calls)} launches recorded ({rec.accepted} accepted, {rec.refused} refused), "
        f"{len(vs)} variants, {wall:.1f} s"
    )
    for p in bad:
        print("PROBLEM:", p)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
