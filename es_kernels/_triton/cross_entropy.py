"""Per-sample cross-entropy (docs/spec.md section 5), and es_step's first
launch from [B, C] logits: the loss of each token row with, in the same
program, the row's state update, weight and selection key (section 6).

One program handles ROWS token rows (several when the class count is small)
and walks their class axis in chunks of BLOCK_V columns, read once and in
place: token row r starts at (r // T) * stride_b + (r % T) * stride_t (the
class stride is 1). A chunk is a [ROWS, BLOCK_V // G, G] tile whose last axis
is G contiguous columns held by one thread (one 16-byte load when the rows
are 16-byte aligned, else G loads of one column, joined): each such group
keeps its own running max m and sum of exp(x - m) (and, with label
smoothing, the sum of (m - x); its count is the same for every group until
the tail, a scalar) in registers. The chunk's group max and sums are
reductions inside a thread, the sums in one fixed order (:func:`_group_sum`)
on both load paths, so the hot loop has no shuffle and no barrier and a view
gives the bits of its contiguous copy; the groups are combined once per row
after the loop (one CTA reduction per row). Exponentials are exp2((x - m) log2(e)): the max is
subtracted first (exact for the largest logits, where x log2(e) would
overflow float32 near its maximum), then one multiply feeds ex2; a group
rescales its sum by one ex2 per chunk. Full chunks are read unmasked; the
one tail chunk masks the columns past V.

Non-finite logits, as F.cross_entropy treats them: a -inf logit (masked
class) adds nothing to the sum of exponentials and +inf to the smoothing sum
(its log-probability is -inf), a -inf target logit gives +inf; a NaN or +inf
logit makes the group's sum NaN (exp2 of NaN or of inf - inf), so the loss is
NaN; a row of -inf only gives NaN. A row whose target is ignore_index is not
read (its loads are masked off; a program whose rows are all ignored runs no
chunk).

The launch parameters come from a fixed table (:func:`config`) keyed on the
class count and the element size, not from ``triton.autotune``: autotuning
times each candidate on the first call of every new key, which synchronises
with the host (the ops promise none), cannot run inside CUDA-graph capture,
and would apply es_step's in-place state update once per candidate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch
from .es_step import observe, observe_args

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _column(rowp, first, V, live, k: tl.constexpr, MASKED: tl.constexpr):
    """Column k of every group (first column ``first`` [1, NG]) of the rows
    at ``rowp`` [ROWS, 1]: [ROWS, NG], -inf where masked off."""
    if MASKED:
        inside = live & (first + k < V)
    else:
        inside = live
    return tl.load(rowp + (first + k), mask=inside, other=float("-inf"))


@triton.jit
def _tile(rowp, first, V, live, MASKED: tl.constexpr, ALIGNED: tl.constexpr, G: tl.constexpr):
    """The float32 [ROWS, NG, G] tile of the groups starting at columns
    ``first`` [1, NG] (G contiguous columns each) of the rows at ``rowp``
    [ROWS, 1]; -inf past V when MASKED. With ALIGNED (every row 16-byte
    aligned) one load of the tile, a 16-byte vector per group. Else G loads
    of one column of every group, joined so that each thread holds whole
    groups: one load of the tile let Triton spread a group over threads
    (shuffles per element, up to 255 registers and spills on sm_80)."""
    if ALIGNED or G == 1:
        cols = first[:, :, None] + tl.arange(0, G)[None, None, :]
        if MASKED:
            inside = live[:, :, None] & (cols < V)
        else:
            inside = live[:, :, None]
        x = tl.load(rowp[:, :, None] + cols, mask=inside, other=float("-inf"))
    else:
        shape: tl.constexpr = (live.shape[0], first.shape[1], G)
        if G == 2:
            x = tl.join(_column(rowp, first, V, live, 0, MASKED), _column(rowp, first, V, live, 1, MASKED))
        elif G == 4:  # join(E, O): E[i] = column 2i, O[i] = column 2i + 1
            e = tl.join(_column(rowp, first, V, live, 0, MASKED), _column(rowp, first, V, live, 2, MASKED))
            o = tl.join(_column(rowp, first, V, live, 1, MASKED), _column(rowp, first, V, live, 3, MASKED))
            x = tl.reshape(tl.join(e, o), shape)
        else:  # G == 8: [i, j, l] = column 4i + 2j + l
            e0 = tl.join(_column(rowp, first, V, live, 0, MASKED), _column(rowp, first, V, live, 4, MASKED))
            e1 = tl.join(_column(rowp, first, V, live, 2, MASKED), _column(rowp, first, V, live, 6, MASKED))
            o0 = tl.join(_column(rowp, first, V, live, 1, MASKED), _column(rowp, first, V, live, 5, MASKED))
            o1 = tl.join(_column(rowp, first, V, live, 3, MASKED), _column(rowp, first, V, live, 7, MASKED))
            x = tl.reshape(tl.join(tl.join(e0, e1), tl.join(o0, o1)), shape)
    return x.to(tl.float32)


@triton.jit
def _group_sum(y, G: tl.constexpr):
    """The sum over the group axis of y [ROWS, NG, G] in one fixed order,
    whatever the layout: ((y0 + y1) + y2) + y3 up to G = 4, pairwise
    ((y0 + y1) + (y2 + y3)) + ((y4 + y5) + (y6 + y7)) for G = 8 (NumPy's
    order, so the interpreter's results are those of ``tl.sum``)."""
    R: tl.constexpr = y.shape[0]
    NG: tl.constexpr = y.shape[1]
    if G == 1:
        out = tl.reshape(y, (R, NG))
    elif G == 2:
        a, b = tl.split(y)
        out = a + b
    elif G == 4:
        e, o = tl.split(tl.reshape(y, (R, NG, 2, 2)))  # e[i] = y[2i], o[i] = y[2i + 1]
        y0, y2 = tl.split(e)
        y1, y3 = tl.split(o)
        out = ((y0 + y1) + y2) + y3
    else:
        e, o = tl.split(tl.reshape(y, (R, NG, 4, 2)))
        p = e + o  # p[i] = y[2i] + y[2i + 1]
        e, o = tl.split(tl.reshape(p, (R, NG, 2, 2)))
        a, b = tl.split(e + o)
        out = a + b
    return out


@triton.jit
def _chunk(rowp, start, V, live, m, s, d, MASKED: tl.constexpr, SMOOTH: tl.constexpr, ALIGNED: tl.constexpr,
           G: tl.constexpr):  # fmt: skip
    """Fold the columns start .. start + NG G - 1 of the rows at ``rowp``
    [ROWS, 1] into the groups' running (max, sum of exp(x - max)) and, with
    SMOOTH, the sum of (max - x): per thread, no cross-thread reduction (a
    [ROWS, NG, G] tile, G contiguous columns per group). The count of
    columns already in d is the same for every group before the tail chunk
    (start / NG), a scalar: no [ROWS, NG] counter crosses the loop."""
    first = start + tl.arange(0, m.shape[1])[None, :] * G  # [1, NG]: each group's first column
    x = _tile(rowp, first, V, live, MASKED, ALIGNED, G)
    new_m = tl.maximum(m, tl.max(x, 2))
    safe = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: nothing to rescale
    s = s * tl.exp2((m - safe) * LOG2E) + _group_sum(tl.exp2((x - safe[:, :, None]) * LOG2E), G)
    if SMOOTH:
        # the earlier terms shift by new_m - m; a -inf logit adds +inf
        n = tl.cast(start // m.shape[1], tl.float32)
        d += tl.where(n == 0.0, 0.0, tl.where(m == new_m, 0.0, n * (new_m - m)))
        if MASKED:
            cols = first[:, :, None] + tl.arange(0, G)[None, None, :]
            d += _group_sum(tl.where(live[:, :, None] & (cols < V), safe[:, :, None] - x, 0.0), G)
        else:
            d += _group_sum(safe[:, :, None] - x, G)
    return new_m, s, d


@triton.jit
def _row_offset(r, R, T, stride_b, stride_t):
    """The offset of token row r: (r // T) stride_b + (r % T) stride_t. A
    32-bit division when the rows fit in int32 (then so does T): a 64-bit
    division is a subroutine call, around which ptxas kept a stack frame on
    sm_80. A row past R (masked off, never read) may wrap (clamping it to
    R - 1 cost 8 registers in the hot loop on sm_90a)."""
    if R.dtype == tl.int32:
        rr = r.to(tl.int32)
        q = rr // T
        p = rr - q * T
    else:
        q = r // T
        p = r - q * T
    return q.to(tl.int64) * stride_b + p.to(tl.int64) * stride_t


@triton.jit
def _rows(logits_ptr, targets_ptr, R, T, stride_b, stride_t, ignore_index, ROWS: tl.constexpr):
    """This program's ROWS token rows: ``(r, inr, live, rowp)``, the row
    indices, which are below R, which are scored (in range, target not
    ``ignore_index``) and their pointers. Only the live flag crosses the
    loops: a 64-bit target kept there spilled to the stack on sm_80 (the AOT
    test); a kernel reloads the target after them."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    inr = r < R
    live = inr & (tl.load(targets_ptr + r, mask=inr, other=0).to(tl.int64) != ignore_index)
    return r, inr, live, logits_ptr + _row_offset(r, R, T, stride_b, stride_t)


@triton.jit
def _max_sum(rowp, V, live, SMOOTH: tl.constexpr, BLOCK_V: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr):
    """The pass over the live rows at ``rowp`` [ROWS]: ``(m, d, full_end, mx,
    safe, total)``, each group's running max m and (with SMOOTH) sum d of
    (m - x) [ROWS, BLOCK_V // G], the end of the full chunks, each row's max
    mx, ``safe`` (mx, 0 for a row of -inf) and ``total``, the row's sum of
    exp(x - mx). ce_kernel's one pass, which ce_grad_kernel repeats."""
    NG: tl.constexpr = BLOCK_V // G
    m = tl.full((live.shape[0], NG), float("-inf"), tl.float32)
    s = tl.zeros((live.shape[0], NG), tl.float32)  # sum of exp(x - m)
    d = tl.zeros((live.shape[0], NG), tl.float32)  # sum of (m - x), smoothing only: no cancellation
    any_live = tl.max(live.to(tl.int32), 0) > 0
    full_end = tl.where(any_live, (V // BLOCK_V) * BLOCK_V, 0)
    for start in range(0, full_end, BLOCK_V):
        m, s, d = _chunk(rowp[:, None], start, V, live[:, None], m, s, d, False, SMOOTH, ALIGNED, G)
    for start in range(full_end, tl.where(any_live, V, 0), BLOCK_V):  # the tail: 0 or 1 chunk
        m, s, d = _chunk(rowp[:, None], start, V, live[:, None], m, s, d, True, SMOOTH, ALIGNED, G)
    # once per row: combine the groups
    mx = tl.max(m, 1)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return m, d, full_end, mx, safe, tl.sum(s * tl.exp2((m - safe[:, None]) * LOG2E), 1)


@triton.jit(do_not_specialize=["R", "T", "ignore_index"])
def ce_kernel(
    logits_ptr,
    targets_ptr,
    out_ptr,
    R,
    V,
    T,
    stride_b,
    stride_t,
    ignore_index,
    one_minus_eps,
    eps_over_v,
    upd,  # es_step.observe's values (es_step.UPDATE)
    SMOOTH: tl.constexpr,
    MODE: tl.constexpr,  # es_step.observe's flags: with MODE[0] (DO_UPDATE), es_step's update in the epilogue
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    G: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    r, inr, live, rowp = _rows(logits_ptr, targets_ptr, R, T, stride_b, stride_t, ignore_index, ROWS)
    m, d, full_end, mx, safe, total = _max_sum(rowp, V, live, SMOOTH, BLOCK_V, G, ALIGNED)
    log_s = tl.log(total)
    t = tl.load(targets_ptr + r, mask=inr, other=0).to(tl.int64)
    valid = (t >= 0) & (t < V)
    x_t = tl.load(rowp + tl.where(valid, t, 0), mask=valid & live, other=0.0).to(tl.float32)
    loss = (mx - x_t) + log_s
    if SMOOTH:  # as F.cross_entropy: (1 - eps) nll + eps / V * sum_c -log p_c
        # columns in each group's d: NG per full chunk, then the tail's columns below V
        NG: tl.constexpr = BLOCK_V // G
        first = full_end + tl.arange(0, NG)[None, :] * G
        n = (full_end // NG).to(tl.float32) + tl.minimum(tl.maximum(V - first, 0), G).to(tl.float32)
        shift = tl.where((n == 0.0) | (m == mx[:, None]), 0.0, n * (mx[:, None] - m))
        loss = one_minus_eps * loss + eps_over_v * (tl.sum(d + shift, 1) + V * log_s)
    loss = tl.where(valid & (mx != float("-inf")), loss, float("nan"))
    loss = tl.where(live, loss, 0.0)
    tl.store(out_ptr + r, loss, mask=inr)
    if MODE[0]:
        observe(loss, live, r, inr, upd, MODE, False)


@triton.jit(do_not_specialize=["R", "T", "ignore_index"])
def ce_grad_kernel(
    logits_ptr,
    targets_ptr,
    scale_ptr,
    out_ptr,
    R,
    V,
    T,
    stride_b,
    stride_t,
    ignore_index,
    one_minus_eps,
    eps_over_v,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    G: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """The gradient of per_sample_cross_entropy (docs/spec.md section 5.1)
    for ROWS token rows: ce_kernel's pass (_max_sum) recomputes each row's max m
    and sum s of exp(x - m), then one more pass over the row writes
    ``g exp(x - m) / s - g eps / V`` (less ``g (1 - eps)`` at the target) to
    the contiguous ``out`` in its dtype, ``g = scale[r // T]``. An ignored row
    is not read and gets zeros; a bad target, a NaN or +inf logit or a row of
    -inf only give a row of NaN."""
    r, inr, live, rowp = _rows(logits_ptr, targets_ptr, R, T, stride_b, stride_t, ignore_index, ROWS)
    _, _, _, mx, safe, total = _max_sum(rowp, V, live, False, BLOCK_V, G, ALIGNED)
    live3 = live[:, None, None]
    t = tl.load(targets_ptr + r, mask=inr, other=0).to(tl.int64)
    g = tl.load(scale_ptr + r // T, mask=live, other=0.0)
    ok = (t >= 0) & (t < V) & (mx != float("-inf"))
    coef = tl.where(live, tl.where(ok, g / total, float("nan")), 0.0)
    shift = tl.where(live, g * eps_over_v, 0.0)
    hit = tl.where(live, g * one_minus_eps, 0.0)
    outp = (out_ptr + r * V)[:, None, None]
    first = tl.arange(0, BLOCK_V // G)[None, :, None] * G + tl.arange(0, G)[None, None, :]
    for start in range(0, V, BLOCK_V):  # every row is written, an ignored one with zeros
        cols = start + first
        inside = inr[:, None, None] & (cols < V)
        x = tl.load(rowp[:, None, None] + cols, mask=inside & live3, other=float("-inf")).to(tl.float32)
        e = tl.exp2((x - safe[:, None, None]) * LOG2E)
        grad = e * coef[:, None, None] - shift[:, None, None]
        grad = grad - tl.where(cols == t[:, None, None], hit[:, None, None], 0.0)
        tl.store(outp + cols, grad.to(out_ptr.dtype.element_ty), mask=inside)


def config(V: int, element_size: int, on_gpu: bool, group: int | None = None) -> dict:
    """Launch parameters of ce_kernel for V classes of ``element_size`` bytes.

    - G: columns one thread loads at once (16 bytes: 8 bf16/fp16, 4 fp32)
      when V is a multiple of 16 (contiguous rows are then 16-byte aligned
      and Triton, which specialises strides divisible by 16, loads vectors);
      else 1 (scalar loads: with G > 1 each group's max and sum took shuffles
      across threads, 28 instead of 15 instructions per element at V = 50257
      bf16 on sm_90a). G depends on V alone, not on the strides: a strided
      view must give the bits of its contiguous copy (the summation order
      follows G). A view whose rows are not 16-byte aligned (``launch_ce``
      sets ALIGNED) loads its groups column by column, summed in the same
      order;
    - BLOCK_V: the chunk, the row rounded up to a power of two, at most 4096
      on a GPU (1024 under the interpreter, whose cost grows with the tile);
    - ROWS: rows per program, 1024 // BLOCK_V (at most 16) when a row is
      short, so a program still reads about 1024 columns (with 2048, 16 rows
      of 128 unaligned float32 took 251 registers on sm_90a);
    - num_warps: 64 bytes (four 16-byte loads) per thread and chunk, or 8
      scalar loads when G = 1; 1 to 8 (a tile smaller than the threads, e.g.
      16 rows of 2 classes on 4 warps, left ptxas an 8-byte stack frame on
      sm_90a); 2 where one warp would hold more than 2 rows per thread of a
      tile of vector groups (a warp spreads its 32 lanes over the groups
      first, then over the rows: 16 rows of 8 groups, float32 V = 32 or
      16-bit V = 64, give each thread 4 rows, their pointers, masks and sums
      live across the loop). On one warp ptxas, free to trade registers for
      occupancy, kept float32 V = 32 (es_step, sample mode) at 80 registers
      with a 4-byte spill on sm_80; on 2 warps it takes 48 and none. The
      second warp takes rows, not groups: each row's reductions keep their
      lanes and order, so the results are those of one warp.
    """
    if group is None:
        group = 16 // element_size if V % 16 == 0 else 1
    g = max(1, min(group, triton.next_power_of_2(max(V, 1))))
    block = min(max(triton.next_power_of_2(max(V, 1)), g), 4096 if on_gpu else 1024)
    rows = max(1, min(16, 1024 // block))
    per_thread = 64 // element_size if g > 1 else 8  # scalar loads: 8, fewer registers than 16 or 32
    warps = max(1, min(8, rows * block // (per_thread * 32)))
    if g > 1 and warps == 1 and rows * min(block // g, 32) > 2 * 32:  # > 2 rows per thread on one warp
        warps = 2
    return dict(ROWS=rows, BLOCK_V=block, G=g, num_warps=warps)


def _config(logits: torch.Tensor, stride_t: int) -> dict:
    """:func:`config` for these logits, with ALIGNED: rows 16-byte aligned as
    Triton sees it (a pointer divisible by 16 bytes, strides by 16 elements):
    each group one vector load; else column by column (G = 1: one path)."""
    cfg = config(logits.shape[-1], logits.element_size(), logits.device.type == "cuda")
    cfg["ALIGNED"] = cfg["G"] == 1 or (
        logits.data_ptr() % 16 == 0 and logits.stride(0) % 16 == 0 and stride_t % 16 == 0
    )
    return cfg


def launch_ce(logits, targets, out, ignore_index, label_smoothing, meta, fused=None):
    """One launch of ce_kernel over the token rows: ``logits`` [B, V] or
    [B, T, V] with class stride 1 (read in place), ``targets`` flat and
    contiguous, ``out`` float32 [rows]. ``fused``: es_step.observe_args(...)
    for es_step's update in the same launch; without, the loss alone. ``meta``
    turns launch options into the device's (es_kernels._triton.ops._meta)."""
    V = logits.shape[-1]
    T, stride_t = (logits.shape[1], logits.stride(1)) if logits.dim() == 3 else (1, 0)
    rows = targets.shape[0]
    eps = float(label_smoothing)
    cfg = _config(logits, stride_t)
    if fused is None:  # the loss alone
        fused = observe_args(out)
    launch(
        ce_kernel,
        (triton.cdiv(rows, cfg["ROWS"]),),
        logits.device,
        logits,
        targets,
        out,
        rows,
        V,
        T,
        logits.stride(0),
        stride_t,
        ignore_index,
        1.0 - eps,
        eps / V,
        SMOOTH=eps > 0.0,
        **fused,
        **meta(logits.device, **cfg),
    )


def launch_ce_grad(logits, targets, scale, out, ignore_index, label_smoothing, meta):
    """One launch of ce_grad_kernel over the token rows: ``logits`` as in
    :func:`launch_ce`, ``targets`` flat and contiguous, ``scale`` float32
    ``[B]`` (the factor of each sample's rows), ``out`` contiguous, the
    logits' shape and dtype."""
    V = logits.shape[-1]
    T, stride_t = (logits.shape[1], logits.stride(1)) if logits.dim() == 3 else (1, 0)
    rows = targets.shape[0]
    eps = float(label_smoothing)
    cfg = _config(logits, stride_t)
    launch(
        ce_grad_kernel,
        (triton.cdiv(rows, cfg["ROWS"]),),
        logits.device,
        logits,
        targets,
        scale,
        out,
        rows,
        V,
        T,
        logits.stride(0),
        stride_t,
        ignore_index,
        1.0 - eps,
        eps / V,
        **meta(logits.device, **cfg),
    )


def in_place(logits: torch.Tensor) -> torch.Tensor:
    """The logits as ce_kernel reads them: the caller's tensor (any batch and
    sequence strides), copied only when the class stride is not 1."""
    return logits if logits.shape[-1] <= 1 or logits.stride(-1) == 1 else logits.contiguous()


def token_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index, label_smoothing, meta) -> torch.Tensor:
    """float32 loss of every token row, ``[B]`` or ``[B * T]``. The logits are
    read in place with their batch (and sequence) strides, so that a view such
    as ``logits[:, :-1]`` costs no copy; only a class stride other than 1 is
    copied."""
    x = in_place(logits)
    t = targets.reshape(-1).contiguous()
    out = torch.empty(t.shape[0], dtype=torch.float32, device=logits.device)
    if t.shape[0] > 0:
        launch_ce(x, t, out, ignore_index, label_smoothing, meta)
    return out


def token_grads(grad, logits, targets, ignore_index, label_smoothing, meta) -> torch.Tensor:
    """The gradient of per_sample_cross_entropy with respect to ``logits``
    (contiguous, their shape and dtype) for ``grad`` ``[B]``: the factor of a
    sequence's tokens is ``grad_b`` over its scored tokens, counted on the
    device (no host read)."""
    x = in_place(logits)
    t = targets.reshape(-1).contiguous()
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if t.shape[0] == 0:
        return out
    scale = grad.to(torch.float32)
    if logits.dim() == 3:
        count = (targets != ignore_index).sum(dim=1)
        scale = torch.where(count > 0, scale / count.clamp(min=1), 0.0)
    launch_ce_grad(x, t, scale.contiguous(), out, ignore_index, label_smoothing, meta)
    return out
