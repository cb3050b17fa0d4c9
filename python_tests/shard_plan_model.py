"""A model of one rank's ESWP plan (docs/spec.md section 11.2) in plain PyTorch,
chunk by chunk: the drop noise of each global id through the reference's
Philox, the rank's Feistel visit order through the reference's permutation.
es_kernels.sharded computes the same plan with the prune op
(python_tests/test_shard_plan.py checks it bit for bit; bench/bench_sharded.py
times both)."""

from __future__ import annotations

import math

import torch

from es_kernels import _spec
from es_kernels.reference import philox4x32, prune_permute, uniform_from_bits

M32 = 0xFFFFFFFF


def chunks(n: int, chunk: int):
    return ((a, min(a + chunk, n)) for a in range(0, n, chunk))


def order_keys(rank: int, seed: int, epoch: int) -> tuple[int, ...]:
    """Section 9, stream 2, step = epoch, j = rank."""
    z = torch.zeros(1, dtype=torch.int64)
    words = philox4x32(seed, z + (rank & M32), z + (rank >> 32), z + (epoch & M32), z + _spec.STREAM_PRUNE_ORDER)
    return tuple(int(w) for w in words)


def visit(n, lo, rank, seed, epoch, scale=None, chunk=1 << 22) -> torch.Tensor:
    """The rank's ids ``lo + perm_r(q)`` in its visit order, those whose scale is not 0."""
    k = _spec.prune_perm_bits(n)
    keys = order_keys(rank, seed, epoch)
    out = [torch.zeros(0, dtype=torch.int64)]
    for a, b in chunks(1 << k, chunk):
        x = prune_permute(torch.arange(a, b, dtype=torch.int64), k, keys)
        x = x[x < n]
        if scale is not None:
            x = x[scale[x] != 0]
        out.append(x + lo)
    return torch.cat(out)


def drop_noise(j: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """float64 ``u0_j`` of the global ids ``j`` (section 7: stream 1, j = the id)."""
    full = lambda v: torch.full_like(j, v)  # noqa: E731
    x0 = philox4x32(seed, j & M32, j >> 32, full(epoch & M32), full(_spec.STREAM_PRUNE))[0]
    return uniform_from_bits(x0).double()


def threshold(state, chunk=1 << 22) -> float:
    """Section 11.2's threshold with W = 1 (one shard): the max pass, the fixed-point sum pass."""
    amax = 0.0
    for a, b in chunks(state.shape[0], chunk):
        score = state[a:b, 0].double() + state[a:b, 1].double()
        amax = max(amax, float(torch.where(torch.isfinite(score), score.abs(), 0.0).max()))
    total = count = 0
    e = math.frexp(amax)[1]
    for a, b in chunks(state.shape[0], chunk):
        score = state[a:b, 0].double() + state[a:b, 1].double()
        seen = torch.isfinite(score)
        total += int(torch.trunc(torch.where(seen, score, 0.0) * math.ldexp(1.0, 30 - e)).long().sum())
        count += int(seen.sum())
    if count == 0:
        return math.nan
    return 0.0 if amax == 0.0 else math.ldexp(float(total), e - 30) / count


def plan(state, lo, rank, tau, prune_ratio, seed, epoch, num_epochs, anneal_frac=0.125, rescale=True, chunk=1 << 22):
    """``(kept ids int64 [K_r], scale float32 [n_r])`` of section 11.2, on the CPU."""
    state = state.cpu()
    n = state.shape[0]
    annealing = epoch >= _spec.anneal_stop(num_epochs, anneal_frac)
    scale = torch.ones(n, dtype=torch.float32)
    for a, b in chunks(n, chunk):
        score = state[a:b, 0].double() + state[a:b, 1].double()
        below = (torch.isfinite(score) & (score < tau) & (not annealing)).nonzero().view(-1)
        drop = below[drop_noise(lo + a + below, seed, epoch) < prune_ratio]
        part = scale[a:b]
        part[below] = _spec.kept_scale(prune_ratio, rescale)
        part[drop] = 0.0
    return visit(n, lo, rank, seed, epoch, scale, chunk), scale
