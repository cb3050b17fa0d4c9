"""Launchers of the Triton kernels with the op schemas' signatures, and their
registration for the CUDA dispatch key of ``torch.ops.es_kernels.*``.

No launcher reads a device value on the host: every branch is on metadata
(shapes, dtypes) or host scalars, outputs have sizes known from the inputs,
and counts stay on the device.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import torch
import triton

from .. import _spec
from .._ops import ARGS, NAMESPACE, binds, checked
from . import cross_entropy
from ._launch import launch
from .es_step import (
    SCRATCH,
    mix_keys_kernel,
    mix_sum_kernel,
    observe_args,
    observe_config,
    observe_kernel,
    radix_hist_kernel,
    select_count_kernel,
    select_write_kernel,
    state_weights_kernel,
)
from .prune import (
    prune_count_kernel,
    prune_decide_kernel,
    prune_max_kernel,
    prune_sum_kernel,
    prune_threshold_kernel,
    prune_write_dropped_kernel,
    prune_write_kept_kernel,
)

PRUNE_BLOCK = 1024


def _meta(device: torch.device, **kw) -> dict:
    """Launch options: bit-exact arithmetic (no FMA contraction) on the GPU."""
    if device.type == "cuda":
        kw.update(num_warps=kw.pop("num_warps", 4), enable_fp_fusion=False)
    else:
        kw.pop("num_warps", None)
    return kw


def _block(device: torch.device) -> int:
    """Positions per program of the update/selection launches."""
    return 1024


def _float32_state(state: torch.Tensor) -> None:
    if state.dtype != torch.float32:
        raise ValueError(f"state must be float32 for the Triton kernels, got {state.dtype}")


def _f64_bits(x: float) -> int:
    """The bit pattern of a float64 as an int64 (float arguments reach a kernel as float32)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


class _Contiguous:
    """Contiguous buffers for in-place state; copied back on exit if needed."""

    def __init__(self, *tensors):
        self.orig = tensors
        self.work = tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)

    def __enter__(self):
        return self.work

    def __exit__(self, *exc):
        for o, w in zip(self.orig, self.work):
            if o is not w:
                o.copy_(w)
        return False


def _token_losses(logits, targets, ignore_index, label_smoothing):
    return cross_entropy.token_losses(logits, targets, ignore_index, label_smoothing, _meta)


def _update_select(src, a, *, tokens=False, T=1, token_mask=None, store_losses=False, logits=None):
    """The launches of es_step.py over the B positions of ``src``, for the
    op arguments ``a`` (an ``OpArgs``; its tensors contiguous): B * T token
    losses when ``a`` has ``targets`` or ``tokens`` is set (with an optional
    bool ``token_mask``), else B losses or weights. It updates where the op
    has a ``state`` and selects ``a.b`` where it has ``b``; an argument the
    op lacks reads as off (no targets, no update, no selection). With
    ``logits`` ([B, C], class stride 1) ``src`` is the targets [B]: the first
    launch computes the losses too (cross_entropy.ce_kernel with the update
    in its epilogue)."""

    def arg(name, absent=None):
        return getattr(a, name, absent)

    targets, ids, state, errors, seed_tensor, step_tensor = map(
        arg, ("targets", "ids", "state", "errors", "seed_tensor", "step_tensor")
    )
    beta1, beta2, lam, w_min = (float(arg(k, 1.0)) for k in ("beta1", "beta2", "lam", "w_min"))
    b, select_mode, eps = arg("b", 0), arg("select_mode", "topk"), arg("eps", 0.0)
    seed, step, advance_step = arg("seed", 0), arg("step", 0), arg("advance_step", False)
    ignore_index, do_select = arg("ignore_index", 0), "b" in a._fields
    label_smoothing = arg("label_smoothing", 0.0)
    dev = src.device
    B = ids.shape[0] if ids is not None else (targets.shape[0] if targets is not None else src.shape[0])
    if B > 0 and T == 0:  # rows without tokens: nothing to score, nothing to read
        T, tokens, targets, token_mask = 1, True, None, torch.zeros(B, 1, dtype=torch.bool, device=dev)
        src = torch.zeros(B, dtype=torch.float32, device=dev)
    do_update = state is not None
    losses = torch.empty(B, dtype=torch.float32, device=dev) if store_losses else src
    weights = torch.empty(B, dtype=torch.float32, device=dev) if do_update else src
    positions = torch.empty(b if do_select else 0, dtype=torch.int64, device=dev)
    advance = advance_step and step_tensor is not None
    do_select = do_select and b > 0 and B > 0
    if B > 0:
        block = _block(dev)
        grid = (triton.cdiv(B, block),)
        keys = torch.empty(B if do_select else 1, dtype=torch.int64, device=dev)
        scratch = torch.zeros(SCRATCH if do_select else 1, dtype=torch.int64, device=dev)
        any_ptr = keys  # stands in for the pointers a variant does not read
        noise = dict(
            seed=seed,
            step_lo_arg=step & 0xFFFFFFFF,
            seed_ptr=seed_tensor if seed_tensor is not None else any_ptr,
            step_ptr=step_tensor if step_tensor is not None else any_ptr,
            noise_offset=arg("offset", 0),  # weighted_select's: position j draws the noise of offset + j
        )
        flags = dict(SEED_FROM_PTR=seed_tensor is not None, STEP_FROM_PTR=step_tensor is not None)
        eps_mix = do_select and eps > 0.0
        rule = dict(beta1=beta1, one_m_beta1=1.0 - beta1, beta2=beta2, one_m_beta2=1.0 - beta2, lam=lam, w_min=w_min)
        outs = dict(weights_out_ptr=weights, keys_ptr=keys, scratch_ptr=scratch, state_ptr=src)
        if ids is not None:
            outs.update(ids_ptr=ids)
        if do_update:  # without it: err_ptr a stand-in and N = 0 (observe_args)
            outs.update(state_ptr=state, err_ptr=errors, N=state.shape[0])
        modes = dict(
            DO_UPDATE=do_update, DO_SELECT=do_select, SAMPLE=do_select and select_mode == "sample", EPS_MIX=eps_mix
        )
        obs = observe_args(any_ptr, **rule, **outs, **noise, **modes, **flags)  # es_step.observe's values and flags
        if logits is not None:  # es_step from [B, C] logits: the loss, update and key in one launch
            cross_entropy.launch_ce(logits, src, losses, ignore_index, label_smoothing, _meta, obs)
        else:
            ogrid, ometa = observe_config(B, T, targets is not None or tokens)
            launch(
                observe_kernel,
                ogrid,
                dev,
                tok_ptr=src,
                targets_ptr=targets if targets is not None else any_ptr,
                mask_ptr=token_mask if token_mask is not None else any_ptr,
                T=T,
                ignore_index=ignore_index,
                mean_bits=_spec.seq_mean_bits(T),
                B=B,
                losses_out_ptr=losses,
                HAS_TARGETS=targets is not None,
                TOKENS=tokens,
                HAS_MASK=token_mask is not None,
                STORE_LOSSES=store_losses,
                **obs,
                **ometa,
                **_meta(dev),
            )
        if eps_mix:
            launch(mix_sum_kernel, grid, dev, weights, B, scratch, BLOCK=block, **_meta(dev))
            launch(
                mix_keys_kernel,
                grid,
                dev,
                weights,
                B,
                scratch,
                keys,
                _f64_bits(eps),
                _f64_bits(1.0 - eps),
                **noise,
                **flags,
                BLOCK=block,
                **_meta(dev),
            )
        if do_select:
            for p in (1, 2, 3):
                launch(radix_hist_kernel, grid, dev, keys, B, scratch, b, PASS=p, BLOCK=block, **_meta(dev))
            counts = torch.empty(2 * grid[0], dtype=torch.int64, device=dev)
            launch(select_count_kernel, grid, dev, keys, B, scratch, b, counts, grid[0], BLOCK=block, **_meta(dev))
            launch(
                select_write_kernel,
                grid,
                dev,
                keys,
                B,
                scratch,
                b,
                counts,
                grid[0],
                positions,
                noise["step_ptr"],
                ADVANCE_STEP=advance,
                BLOCK=block,
                PBLOCK=1024,
                **_meta(dev),
            )
            return positions, losses, weights
    if advance:  # no selection launch to advance it in
        step_tensor.add_(1)
    return positions, losses, weights


# ---------------------------------------------------------------- the ops
# Each launcher takes its op's schema arguments, bound by _schema.binds. The
# CUDA kernel is the launcher itself: the dispatcher's check layer
# (_ops.CHECKS) has validated the call. The module's functions (and OPS), for
# direct calls, run the same checks first.
KERNELS: dict[str, Callable[..., Any]] = {}


def _op(name):
    def deco(fn):
        KERNELS[name] = binds(name)(fn)
        return binds(name)(checked(name, fn))

    return deco


@_op("per_sample_cross_entropy")
def per_sample_cross_entropy(a):
    tok = _token_losses(a.logits, a.targets, a.ignore_index, a.label_smoothing)
    if a.logits.dim() == 2:
        return tok
    t = a.targets.contiguous()
    _, losses, _ = _update_select(tok, a._replace(targets=t), T=t.shape[1], store_losses=True)
    return losses


@_op("per_sample_cross_entropy_backward")
def per_sample_cross_entropy_backward(a):
    return cross_entropy.token_grads(a.grad, a.logits, a.targets, a.ignore_index, a.label_smoothing, _meta)


@_op("es_update")
def es_update(a):
    _float32_state(a.state)
    with _Contiguous(a.state, a.errors) as (st, er):
        _, _, w = _update_select(a.losses.to(torch.float32).contiguous(), _in_place(a, st, er))
    return w


def _in_place(a, state, errors):
    """``a`` with its state and errors replaced by their contiguous buffers, and ``ids`` contiguous."""
    return a._replace(ids=a.ids.contiguous(), state=state, errors=errors)


@_op("weighted_select")
def weighted_select(a):
    pos, _, _ = _update_select(a.weights.to(torch.float32).contiguous(), a)
    return pos


def _fused_step(src, a, **src_kw):
    """The update + selection launches of es_step_from_losses and of es_step's
    second launch: ``src`` and ``src_kw`` say what the per-position losses
    come from, ``a`` holds the schema's arguments."""
    _float32_state(a.state)
    with _Contiguous(a.state, a.errors) as (st, er):
        return _update_select(src, _in_place(a, st, er), store_losses=True, **src_kw)


@_op("es_step_from_losses")
def es_step_from_losses(a):
    tokens = a.losses.dim() == 2
    src = a.losses.to(torch.float32).contiguous()  # token losses too: the means take f32(loss) (spec section 6)
    mask = a.mask.contiguous() if a.mask is not None else None
    return _fused_step(src, a, tokens=tokens, T=a.losses.shape[1] if tokens else 1, token_mask=mask)


@_op("es_step")
def es_step(a):
    _float32_state(a.state)
    t = a.targets.contiguous()
    if a.logits.dim() == 2:  # the losses in the update's launch; src is the targets
        return _fused_step(t, a._replace(targets=None), logits=cross_entropy.in_place(a.logits))
    tok = _token_losses(a.logits, a.targets, a.ignore_index, a.label_smoothing)  # launch 1
    return _fused_step(tok, a._replace(targets=t), T=t.shape[1])


@_op("eswp_prune")
def eswp_prune(a):
    state, seed, epoch, prune_ratio = a.state, a.seed, a.epoch, a.prune_ratio
    n = state.shape[0]
    dev = state.device
    scale = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev), scale
    st = state.contiguous()
    grid = (triton.cdiv(n, PRUNE_BLOCK),)
    if a.threshold is None:
        tau = torch.empty(1, dtype=torch.float64, device=dev)
        acc = torch.zeros(4, dtype=torch.int64, device=dev)  # max |score| bits, count, fixed-point sum (2 words)
        launch(prune_max_kernel, grid, dev, st, n, acc, BLOCK=PRUNE_BLOCK, **_meta(dev))
        launch(prune_sum_kernel, grid, dev, st, n, acc, BLOCK=PRUNE_BLOCK, **_meta(dev))
        launch(prune_threshold_kernel, (1,), dev, acc, tau, **_meta(dev))
    else:  # a shard's plan: the whole state's threshold (a fill, no host transfer)
        tau = torch.full((1,), a.threshold, dtype=torch.float64, device=dev)
    k = _spec.prune_perm_bits(n)
    domain, blocks = 1 << k, grid[0]
    visits = triton.cdiv(domain, PRUNE_BLOCK)
    skip = torch.full((domain // 32,), -1, dtype=torch.int32, device=dev)  # bit set: dropped or >= n
    counts = torch.empty(visits + blocks, dtype=torch.int64, device=dev)  # kept per block of q, dropped per block
    epoch_lo = epoch & 0xFFFFFFFF
    launch(
        prune_decide_kernel,
        grid,
        dev,
        st,
        n,
        a.id_offset,
        tau,
        seed,
        epoch_lo,
        _spec.drop_levels(prune_ratio),
        _spec.kept_scale(prune_ratio, a.rescale),
        scale,
        skip,
        k,
        counts[visits:],
        ANNEALING=epoch >= _spec.anneal_stop(a.num_epochs, a.anneal_frac),
        BLOCK=PRUNE_BLOCK,
        **_meta(dev),
    )
    visit = (skip, k, seed, epoch_lo, a.order_key & 0xFFFFFFFF, a.order_key >> 32)
    launch(prune_count_kernel, (visits,), dev, *visit, counts, BLOCK=PRUNE_BLOCK, **_meta(dev))
    start = torch.zeros(visits + blocks + 1, dtype=torch.int64, device=dev)  # exclusive scan: first slots
    torch.cumsum(counts, 0, out=start[1:])
    order = torch.empty(n, dtype=torch.int64, device=dev)
    launch(prune_write_kept_kernel, (visits,), dev, *visit, start, order, BLOCK=PRUNE_BLOCK, **_meta(dev))
    launch(prune_write_dropped_kernel, grid, dev, skip, n, start[visits:], order, BLOCK=PRUNE_BLOCK, **_meta(dev))
    return order, start[visits].clone(), scale


@_op("es_select_from_state")
def es_select_from_state(a):
    _float32_state(a.state)
    dev, B = a.state.device, a.ids.shape[0]
    w = torch.empty(B, dtype=torch.float32, device=dev)
    if B > 0:
        block = _block(dev)
        with _Contiguous(a.errors) as (er,):
            launch(
                state_weights_kernel,
                (triton.cdiv(B, block),),
                dev,
                a.ids.contiguous(),
                a.state.contiguous(),
                er,
                B,
                a.state.shape[0],
                float(a.lam),
                float(a.w_min),
                a.step,
                a.step_tensor if a.step_tensor is not None else w,
                a.last_seen.contiguous() if a.max_age >= 0 else w,
                a.max_age,
                a.picks.contiguous() if a.cap >= 0 else w,
                a.cap,
                w,
                NOW_FROM_PTR=a.step_tensor is not None,
                AGE=a.max_age >= 0,
                CAP=a.cap >= 0,
                BLOCK=block,
                **_meta(dev),
            )
    select = ARGS["weighted_select"](w, a.b, a.select_mode, a.seed, a.step, a.seed_tensor, a.step_tensor, a.eps)
    positions, _, _ = _update_select(w, select)  # section 4 on the weights, as weighted_select
    if a.advance_step and a.step_tensor is not None:
        a.step_tensor.add_(1)
    return positions, w


OPS = {
    "per_sample_cross_entropy": per_sample_cross_entropy,
    "per_sample_cross_entropy_backward": per_sample_cross_entropy_backward,
    "es_update": es_update,
    "weighted_select": weighted_select,
    "es_step_from_losses": es_step_from_losses,
    "es_step": es_step,
    "eswp_prune": eswp_prune,
    "es_select_from_state": es_select_from_state,
}

for _name, _fn in KERNELS.items():
    torch.library.register_kernel(f"{NAMESPACE}::{_name}", "cuda", _fn)
