"""Launchers of the Triton kernels with the op schemas' signatures, and their
registration for the CUDA dispatch key of ``torch.ops.es_kernels.*``.

No launcher reads a device value on the host: every branch is on metadata
(shapes, dtypes) or host scalars, outputs have sizes known from the inputs,
and counts stay on the device.
"""
from __future__ import annotations

import math

import torch
import triton

from .. import _checks
from ..reference import annealing
from ._launch import launch
from .cross_entropy import ce_token_kernel
from .es_step import update_select_kernel
from .prune import prune_decide_kernel, prune_partials_kernel



def _meta(device: torch.device, **kw) -> dict:
    """Launch options: bit-exact arithmetic (no FMA contraction) on the GPU."""
    if device.type == "cuda":
        kw.update(num_warps=kw.pop("num_warps", 4), enable_fp_fusion=False)
    else:
        kw.pop("num_warps", None)
    return kw


def _select_block(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 1024


def _float32_state(s: torch.Tensor) -> None:
    if s.dtype != torch.float32:
        raise ValueError(f"s must be float32 for the Triton kernels, got {s.dtype}")


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
    """float32 loss of every token row, ``[B]`` or ``[B * T]``. The logits are
    read in place with their batch (and sequence) strides, so that a view such
    as ``logits[:, :-1]`` costs no copy; only a class stride other than 1 is
    copied."""
    V = logits.shape[-1]
    x = logits if V <= 1 or logits.stride(-1) == 1 else logits.contiguous()
    T, stride_t = (x.shape[1], x.stride(1)) if x.dim() == 3 else (1, 0)
    t = targets.reshape(-1).contiguous()
    out = torch.empty(t.shape[0], dtype=torch.float32, device=logits.device)
    if t.shape[0] > 0:
        eps = float(label_smoothing)
        block_v = min(triton.next_power_of_2(V), 4096 if logits.device.type == "cuda" else 1024)
        launch(ce_token_kernel, (t.shape[0],), x, t, out, V, T, x.stride(0), stride_t, ignore_index,
               1.0 - eps, eps / V, SMOOTH=eps > 0.0, BLOCK_V=block_v,
               **_meta(logits.device, num_warps=8 if block_v >= 2048 else 4))
    return out


def _update_select(B, tok, targets, T, ignore_index, ids, s, d, errors, beta1, beta2, w_min,
                   b, mode, seed, step, *, store_losses, do_update, do_select):
    """Launches update_select_kernel over B positions (tok holds B * T token
    losses when targets are given, else B losses or weights)."""
    dev = tok.device
    losses = torch.empty(B, dtype=torch.float32, device=dev) if store_losses else tok
    weights = torch.empty(B, dtype=torch.float32, device=dev) if do_update else tok
    positions = torch.empty(b if do_select else 0, dtype=torch.int64, device=dev)
    if B == 0:
        return positions, losses, weights
    keys = torch.empty(B if do_select else 1, dtype=torch.int64, device=dev)
    dummy = positions if targets is None else targets
    launch(update_select_kernel, (1,), tok, dummy, T, ignore_index,
           ids if ids is not None else positions, B,
           s if s is not None else tok, d if d is not None else tok,
           errors if errors is not None else keys, s.shape[0] if s is not None else 0,
           float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(w_min),
           losses, weights, keys, positions, b, seed, step & 0xFFFFFFFF,
           HAS_TARGETS=targets is not None, STORE_LOSSES=store_losses, DO_UPDATE=do_update,
           DO_SELECT=do_select and b > 0, SAMPLE=mode == "sample", BLOCK=_select_block(dev),
           **_meta(dev, num_warps=16))
    return positions, losses, weights


# ---------------------------------------------------------------- the ops
def per_sample_cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0):
    _checks.logits_targets(logits, targets, ignore_index, label_smoothing)
    tok = _token_losses(logits, targets, ignore_index, label_smoothing)
    if logits.dim() == 2:
        return tok
    t = targets.contiguous()
    _, losses, _ = _update_select(logits.shape[0], tok, t, t.shape[1], ignore_index, None, None, None, None, 0.0, 0.0,
                                  1.0, 0, "topk", 0, 0, store_losses=True, do_update=False,
                                  do_select=False)
    return losses


def es_update(ids, losses, s, d, errors, beta1, beta2, w_min=1e-8):
    _checks.update(ids, losses, s, d, errors, beta1, beta2, w_min)
    _float32_state(s)
    with _Contiguous(s, d, errors) as (sc, dc, ec):
        _, _, w = _update_select(ids.shape[0], losses.to(torch.float32).contiguous(), None, 1, 0, ids.contiguous(),
                                 sc, dc, ec, beta1, beta2, w_min, 0, "topk", 0, 0,
                                 store_losses=False, do_update=True, do_select=False)
    return w


def weighted_select(weights, b, select_mode="sample", seed=0, step=0):
    _checks.select(weights, b, select_mode, seed, step)
    w = weights.to(torch.float32).contiguous()
    pos, _, _ = _update_select(w.shape[0], w, None, 1, 0, None, None, None, None, 0.0, 0.0, 1.0, b, select_mode,
                               seed, step, store_losses=False, do_update=False, do_select=True)
    return pos


def es_step_losses(losses, ids, s, d, errors, b, beta1, beta2, select_mode="sample", seed=0, step=0,
                   w_min=1e-8):
    _checks.step_from_losses(losses, ids, s, d, errors, b, beta1, beta2, select_mode, seed, step, w_min)
    _float32_state(s)
    with _Contiguous(s, d, errors) as (sc, dc, ec):
        return _update_select(ids.shape[0], losses.to(torch.float32).contiguous(), None, 1, 0, ids.contiguous(),
                              sc, dc, ec, beta1, beta2, w_min, b, select_mode, seed, step,
                              store_losses=True, do_update=True, do_select=True)


def es_step(logits, targets, ids, s, d, errors, b, beta1, beta2, select_mode="sample", seed=0, step=0,
            ignore_index=-100, label_smoothing=0.0, w_min=1e-8):
    _checks.step_from_logits(logits, targets, ids, s, d, errors, b, beta1, beta2, select_mode, seed,
                             step, ignore_index, label_smoothing, w_min)
    _float32_state(s)
    tok = _token_losses(logits, targets, ignore_index, label_smoothing)  # launch 1
    t = targets.contiguous()
    T = t.shape[1] if t.dim() == 2 else 1
    with _Contiguous(s, d, errors) as (sc, dc, ec):  # launch 2
        return _update_select(ids.shape[0], tok, t, T, ignore_index, ids.contiguous(), sc, dc, ec, beta1, beta2,
                              w_min, b, select_mode, seed, step, store_losses=True, do_update=True,
                              do_select=True)


def drop_below(prune_ratio: float) -> int:
    """The number of 23-bit levels k with (2k + 1) * 2**-24 < prune_ratio: a
    sample below the mean is dropped iff (x0 >> 9) < this, exactly u < r."""
    return int(min(max(math.ceil((prune_ratio * 2.0**24 - 1.0) / 2.0), 0), 2**23))


def eswp_prune(s, d, prune_ratio, seed=0, epoch=0, num_epochs=1, anneal_frac=0.125, rescale=True):
    _checks.prune(s, d, prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale)
    n = s.shape[0]
    dev = s.device
    scale = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev), scale
    s, d = s.contiguous(), d.contiguous()
    block = 1024
    p = triton.cdiv(n, block)
    psum = torch.empty(p, dtype=torch.float64, device=dev)
    pcnt = torch.empty(p, dtype=torch.int64, device=dev)
    launch(prune_partials_kernel, (p,), s, d, n, psum, pcnt, BLOCK=block, **_meta(dev))
    sort_key = torch.empty(n, dtype=torch.int64, device=dev)
    kept_scale = float(1.0 / (1.0 - prune_ratio)) if rescale else 1.0
    launch(prune_decide_kernel, (p,), s, d, n, psum, pcnt, p, seed, epoch & 0xFFFFFFFF,
           drop_below(prune_ratio), kept_scale, scale, sort_key,
           ANNEALING=annealing(epoch, num_epochs, anneal_frac), BLOCK=block, PBLOCK=1024, **_meta(dev))
    order = torch.sort(sort_key, stable=True).indices
    num_kept = (sort_key < 2**32).sum()
    return order, num_kept, scale


OPS = {
    "per_sample_cross_entropy": per_sample_cross_entropy,
    "es_update": es_update,
    "weighted_select": weighted_select,
    "es_step_losses": es_step_losses,
    "es_step": es_step,
    "eswp_prune": eswp_prune,
}

for _name, _fn in OPS.items():
    torch.library.register_kernel(f"es_kernels::{_name}", "cuda", _fn)
