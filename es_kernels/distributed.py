"""ES and ESWP across the processes of a ``torch.distributed`` process group
(docs/spec.md section 11.1; the sharded-state alternative: docs/design_distributed.md).

Every rank holds a full replica of the per-sample state. Each step:

1. rank ``r`` scores its own meta-batch of ``B_r <= cap`` samples (``cap`` =
   ``meta_batch``, the same on every rank) as the single process does, in
   any form ``EvolvedSampler.select`` takes (losses, logits, hidden states);
2. the ranks exchange ``(id, loss)`` pairs with ONE ``all_gather_into_tensor``
   of an int64 ``[cap, 2]`` buffer per rank (column 0 the id, column 1 the
   loss as the bits of a float64, ``UNSCORED_BITS`` for a row with nothing
   to score): 16 bytes per position, ``world * cap`` positions received; no
   host synchronisation (on NCCL the collective is queued on the device like
   a kernel). Packed rows (``segment_ids``) exchange per-document float64
   loss sums and token counts instead (``document_update``), so that a
   document split over several ranks' rows is observed once;
3. every rank applies ALL observations of the step to its replica with the
   existing ``es_update`` op (the same input on every rank, so the replicas stay
   bit-identical) and selects ``min(mini_batch, B_r)`` of its OWN positions with
   the existing ``weighted_select`` op over its own weights, the noise of its
   position ``j`` being that of the global position ``r * cap + j`` (the op's
   ``offset``);
4. the device step counter advances by one on every rank.

:class:`DistributedEvolvedSampler` does this; :class:`DistributedESWPSampler`
prunes on every rank (same state, seed and epoch: the same plan) and yields
this rank's share of the kept ids the way ``DistributedSampler`` does.

Both are subclasses, so ``es_kernels/sampler.py`` is unchanged (its
``EvolvedSampler`` / ``ESWPSampler`` keep their single-process meaning);
``DistributedESWPSampler`` iterates over this rank's share of the base's plan
(its position counts the share, its checkpoint holds the whole plan), and
``ESWPSampler.chunks(sampler)`` called as such still gives the whole plan.
A checkpoint resumes on a group of the size it was saved on; any other size is
refused at load, on every rank, before any collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import overload

import torch
import torch.distributed as dist

from . import _checks
from ._ops import bind, ops
from ._packed import _document_sums, _row_means
from ._spec import (
    DEFAULT_ANNEAL_FRAC,
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_EPS,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_LABEL_SMOOTHING,
    DEFAULT_LAM,
    DEFAULT_PRUNE_RATIO,
    DEFAULT_SELECT_MODE,
    DEFAULT_W_MIN,
    INT64_MAX,
    INT64_MIN,
    SELECT_MEAN_BITS,
)
from .functional import _shift, checked_mode
from .lm import DEFAULT_WORKSPACE_BYTES, _check_hidden, packed_tokens, row_losses_from_hidden
from .sampler import CHUNK, ESWPSampler, EvolvedSampler, Selection, _Plan
from .schedule import ScoringSchedule
from .state import ESState

__all__ = [
    "PAD_ID",
    "DistributedEvolvedSampler",
    "DistributedESWPSampler",
    "shard_indices",
    "shard_length",
    "gathered_update",
    "document_update",
    "rank_selection",
    "eps_mix",
    "replica_digest",
]

PAD_ID = INT64_MIN  # the id of a padding position: skipped and not counted as an error
# The loss bits of a row with nothing to score (a target of ignore_index, a sequence of
# ignored tokens): a float64 NaN whose low payload bits no float32 loss converts to.
UNSCORED_BITS = 0x7FF0000000000001

# all_gather_into_tensor, under its newer name where torch has it (2.13 deprecates the old one)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# --------------------------------------------------------------------------- the step's pieces
def pack(ids: torch.Tensor, losses: torch.Tensor, cap: int, scored: torch.Tensor | None = None) -> torch.Tensor:
    """int64 ``[cap, 2]``: ``(id, bits of float64(loss))``, padded with ``(PAD_ID, 0)``;
    ``UNSCORED_BITS`` in place of the loss where ``scored`` (bool ``[B]``) is False."""
    n = ids.shape[0]
    buf = torch.empty((cap, 2), dtype=torch.int64, device=ids.device)
    buf[:n, 0] = ids
    bits = losses.to(torch.float64).view(torch.int64)  # float64 holds any float loss exactly
    buf[:n, 1] = bits if scored is None else torch.where(scored, bits, UNSCORED_BITS)
    buf[n:, 0] = PAD_ID
    buf[n:, 1] = 0
    return buf


def unpack(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids int64 [W*cap], losses float64 [W*cap])`` of a gathered buffer."""
    return gathered[:, 0], gathered[:, 1].view(torch.float64)  # strided views: no copy


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """For each position, the lowest position holding the same id, whatever the id
    (device ops only: a stable sort). The sharded sampler's deduplication of a
    rank's own meta-batch (ids of other ranks included); the replicated exchange
    uses :func:`first_observation`, which needs no sort.

    Parameters
    ----------
    ids : Tensor
        int64 ``[P]``.

    Returns
    -------
    Tensor
        int64 ``[P]``. No host synchronisation.
    """
    n = ids.shape[0]
    ar = torch.arange(n, device=ids.device)
    if n == 0:
        return ar
    sorted_ids, perm = torch.sort(ids, stable=True)
    starts = torch.ones(n, dtype=torch.bool, device=ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    lead = torch.cummax(torch.where(starts, ar, 0), 0).values  # sorted index of the group's start
    first = torch.empty_like(perm)
    first[perm] = perm[lead]  # stable sort: the group's start is its lowest position
    return first


def first_observation(ids: torch.Tensor, state) -> torch.Tensor:
    """For each position, the lowest position holding the same id when the id is
    in ``[0, N)``; the position itself for any other id (out of range, ``PAD_ID``).

    O(positions) on the device, no sort: the positions are scattered with
    ``amin`` into the scratch of the state's rows of these ids (the bits of
    their ``d``, saved first and restored after), so no ``[N]`` table is
    allocated. No host synchronisation; the state is unchanged on return.

    Parameters
    ----------
    ids : Tensor
        int64 ``[P]`` on the state's device.
    state : ESState
        Its ``d`` column is the scratch (restored bit for bit).

    Returns
    -------
    Tensor
        int64 ``[P]``.
    """
    n = ids.shape[0]
    t = state.tensor
    width = torch.int32 if t.dtype == torch.float32 else torch.int64
    big = torch.iinfo(width).max
    if n >= big:  # W * cap positions of 16 bytes: 32 GiB gathered per step before this
        raise ValueError(f"{n} gathered positions: at most {big - 1} (the positions are {width} in the scratch)")
    if n == 0 or t.shape[0] == 0:
        return torch.arange(n, device=ids.device)
    idx = ids.clamp(0, t.shape[0] - 1)
    inside = idx == ids  # the others go to row 0 or N - 1 with position `big`: no effect on its minimum
    ar = torch.arange(n, dtype=width, device=ids.device)
    scratch = t.view(width)[:, 1]
    saved = scratch.index_select(0, idx)  # (index_select and scatter_: the fast paths of a gather and a put)
    scratch.index_fill_(0, idx, big)
    scratch.scatter_reduce_(0, idx, torch.where(inside, ar, big), "amin")
    first = torch.where(inside, scratch.index_select(0, idx), ar)
    scratch.scatter_(0, idx, saved)  # duplicates restore the same saved bits
    return first.long()


def gathered_update(
    ids: torch.Tensor, losses: torch.Tensor, state: ESState, beta1: float, beta2: float, lam: float, w_min: float
) -> torch.Tensor:
    """Apply the observations of the gathered batch to ``state`` (spec section 11.1, Update).

    An id in ``[0, N)`` held by several positions is observed once, at its lowest
    position, and every position holding it gets that weight (``DistributedSampler``
    pads by repeating ids); an id out of range is counted at every position holding
    it, as one process's ``es_update`` counts it. ``PAD_ID`` positions are skipped
    and not counted in ``errors``.

    Parameters
    ----------
    ids : Tensor
        int64 ``[W * cap]``, the gathered ids (``PAD_ID`` at padding), on the state's device.
    losses : Tensor
        floating ``[W * cap]``, their losses.
    state : ESState
        Mutated in place.
    beta1, beta2, lam, w_min : float
        As in :func:`es_kernels.es_update`.

    Returns
    -------
    Tensor
        float32 ``[W * cap]``: the weight of every gathered position. No host
        synchronisation.
    """
    first = first_observation(ids, state)
    dup = first != torch.arange(ids.shape[0], device=ids.device)
    upd = torch.where(dup, PAD_ID, ids)
    w = ops.es_update(upd, losses, state.tensor, state.errors, float(beta1), float(beta2), float(lam), float(w_min))
    state.errors[0] -= (upd == PAD_ID).sum()  # es_update counted them as out of range
    return w.index_select(0, first)


def document_update(ids, sums, counts, world: int, state, beta1, beta2, lam, w_min) -> torch.Tensor:
    """Observe the documents of the gathered packed rows (spec section 11.1, Packed rows).

    Each rank sends, for every document of its rows, the float64 sum of its
    scored tokens' losses and their count (in slots ``r * S .. (r + 1) * S``).
    A document is observed once, with ``L = f32((sum of the parts' sums, in
    rank order, float64) / (sum of the counts))``: the token-weighted mean of
    its parts, the loss one process would give it from all the rows.

    Parameters
    ----------
    ids : Tensor
        int64 ``[W * S]``, the documents (``PAD_ID`` at padding; distinct
        within a rank's slots), on the state's device.
    sums : Tensor
        float64 ``[W * S]``, each part's loss sum.
    counts : Tensor
        int64 ``[W * S]``, each part's scored tokens (0: present in the rows,
        not observed).
    world : int
        ``W``, the most parts a document has.
    state : ESState
        Mutated in place.
    beta1, beta2, lam, w_min : float
        As in :func:`es_kernels.es_update`.

    Returns
    -------
    Tensor
        float32 ``[W * S]``: each slot's document weight (0 for padding and
        for a document with no scored token). No host synchronisation.
    """
    n = ids.shape[0]
    ar = torch.arange(n, device=ids.device)
    sk, perm = torch.sort(ids, stable=True)  # a document's parts in rank order
    start = torch.ones(n, dtype=torch.bool, device=ids.device)
    start[1:] = sk[1:] != sk[:-1]
    lead = torch.cummax(torch.where(start, ar, 0), 0).values  # the sorted index of each part's first part
    v, c = sums[perm], counts[perm]
    total, count = v.clone(), c.clone()
    minus_zero = torch.full_like(v, -0.0)  # x + (-0.0) == x for every x: the identity of the sum
    for k in range(1, world):  # at most W parts: add the k-th one to the first (fixed order, no atomics)
        same = lead[k:] == ar[: n - k]
        total[: n - k] += torch.where(same, v[k:], minus_zero[k:])
        count[: n - k] += torch.where(same, c[k:], 0)
    obs = start & (sk != PAD_ID) & (count > 0)
    loss = torch.where(obs, total / count.clamp(min=1), 0.0).float()
    upd = torch.where(obs, sk, -1 - ar)  # distinct; the others masked out: not read, not counted
    a = bind("es_step_from_losses", loss.unsqueeze(1), upd, state.tensor, state.errors, 0, float(beta1), float(beta2))
    _, _, w = ops.es_step_from_losses(*a._replace(lam=float(lam), w_min=float(w_min), mask=obs.unsqueeze(1)).for_op())
    out = torch.empty_like(w)
    out[perm] = w[lead]
    return out


def eps_mix(w: torch.Tensor, eps: float) -> torch.Tensor:
    """The exploration mix of spec section 4 over these positions.

    Parameters
    ----------
    w : Tensor
        floating ``[B]`` weights, ``B >= 1``.
    eps : float in [0, 1]

    Returns
    -------
    Tensor
        float32 ``f32(v)``, ``v = (1 - eps) w / mean(w) + eps`` with the
        fixed-point mean, on ``w``'s device. No host synchronisation.
    """
    wp = torch.where(torch.isfinite(w) & (w > 0), w, 0.0).to(torch.float32)
    big = wp.max().reshape(1)
    e = ((big.view(torch.int32) >> 23) & 0xFF).to(torch.int64) - 126  # M < 2**e
    q = torch.floor(wp.double() * torch.pow(2.0, (SELECT_MEAN_BITS - e).double()))
    mean = q.sum() * torch.pow(2.0, (e - SELECT_MEAN_BITS).double()) / w.shape[0]
    v = ((1.0 - eps) * wp.double()) / mean + eps
    v = torch.where(big == 0, 1.0, v)
    return torch.where(w == math.inf, math.inf, v).to(torch.float32)  # +inf: a priority (section 4)


def rank_selection(
    weights_all: torch.Tensor,
    rank: int,
    cap: int,
    n: int,
    b: int,
    select_mode: str,
    seed: int | torch.Tensor,
    step: int | torch.Tensor,
    eps: float = DEFAULT_EPS,
) -> torch.Tensor:
    """The ``b`` positions that rank ``rank`` selects among its own (spec section 11.1, Selection).

    One ``weighted_select`` over the rank's ``n`` weights alone (O(n) on every
    rank), its position ``j`` drawing the noise of the global position
    ``rank * cap + j`` (the op's ``offset``). The result never holds another
    rank's position, whatever the weights.

    Parameters
    ----------
    weights_all : Tensor
        float ``[W * cap]``, the weights of every gathered position.
    rank, cap, n : int
        This rank, the padded meta-batch per rank and this rank's real
        positions ``rank * cap + j``, ``j < n``.
    b : int in [0, n]
    select_mode, seed, step, eps
        As in :func:`es_kernels.weighted_select`.

    Returns
    -------
    Tensor
        int64 ``[b]``, ascending positions in ``[0, n)``. No host synchronisation.
    """
    _checks.integer(b, "b", 0, n)
    lo = rank * cap
    return _select_own(weights_all[lo : lo + n], lo, b, select_mode, seed, step, eps)


def _select_own(own, lo: int, b: int, select_mode: str, seed, step, eps: float) -> torch.Tensor:
    """:func:`rank_selection` of the ``n`` weights ``own`` of the global positions ``lo + j``."""
    n = own.shape[0]
    own = own.to(torch.float32)
    seed_i, step_i, seed_t, step_t = _checks.split_noise(seed, step)
    # position j draws the noise of global position lo + j (the op's offset; topk draws none)
    x = eps_mix(own, eps) if (select_mode == "sample" and eps > 0.0 and n > 0) else own
    return ops.weighted_select(x, b, select_mode, seed_i, step_i, seed_t, step_t, 0.0, lo)


def row_scores(
    ids: torch.Tensor, sc: dict, scratch: ESState, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's rows scored as the single-process step scores them (spec section 11.1, Scores).

    The step's own op runs on an empty scratch state with ``b = 0`` (every id
    out of its range: nothing read or written but the scratch's error count),
    so the losses and the rows with nothing to score are those of
    :meth:`EvolvedSampler.select`.

    Parameters
    ----------
    ids : Tensor
        int64 / int32 ``[B]`` on the scratch's device.
    sc : dict
        The scores' keyword arguments of ``select`` (``logits``, ``targets``,
        ``losses``, ``hidden``, ``weight``, ``bias``, ``ignore_index``,
        ``label_smoothing``, ``shift_labels``, ``workspace_bytes``).
    scratch : ESState
        An empty state (``N = 0``) on the device.
    beta1, beta2 : float
        The sampler's (validated by the op, unused).

    Returns
    -------
    tuple of Tensor
        ``(losses float32 [B], scored bool [B])``. Raises ValueError naming
        the argument for bad input. No host synchronisation.
    """
    device = scratch.device
    _checks.tensor(ids, "ids", dim=1, dtypes=_checks.INDEX_DTYPES, device=device)
    losses = sc["losses"]
    if losses is not None and isinstance(losses, torch.Tensor) and losses.dim() == 1:
        _checks.ids_losses(ids, losses, device)  # as the step op checks them
        return losses.to(torch.float32, copy=True), torch.ones_like(ids, dtype=torch.bool)  # section 6
    oor = -1 - torch.arange(ids.shape[0], device=device)  # distinct, out of the scratch's range
    common = (scratch.tensor, scratch.errors, 0, beta1, beta2)
    if sc["logits"] is not None:
        _checks.no_grad_inputs(logits=sc["logits"])
        a = bind("es_step", sc["logits"], sc["targets"], oor, *common)
        a = a._replace(ignore_index=sc["ignore_index"], label_smoothing=float(sc["label_smoothing"]))
        _checks.step_from_logits(a)
        logits, targets = _shift(sc["logits"], sc["targets"], sc["shift_labels"])
        _, losses, w = ops.es_step(*a._replace(logits=logits, targets=targets).for_op())
    elif sc["hidden"] is not None:
        hidden, weight, targets, bias = (sc[k] for k in ("hidden", "weight", "targets", "bias"))
        ce = (sc["ignore_index"], sc["label_smoothing"], sc["shift_labels"], sc["workspace_bytes"])
        _checks.no_grad_inputs(hidden=hidden, weight=weight, bias=bias)
        _check_hidden(hidden, weight, targets, bias, *ce, device=device)
        if ids.shape[0] != hidden.shape[0]:
            raise ValueError(f"ids must have the batch size of hidden ({hidden.shape[0]}), got {ids.shape[0]}")
        row, scored = row_losses_from_hidden(hidden, weight, targets, bias, *ce)
        a = bind("es_step_from_losses", row.unsqueeze(1), oor, *common)._replace(mask=scored.unsqueeze(1))
        _, losses, w = ops.es_step_from_losses(*a.for_op())
    else:
        a = bind("es_step_from_losses", sc["losses"], oor, *common)
        _, losses, w = ops.es_step_from_losses(*a.for_op())
    return losses, w != 0  # a scored row's weight: f32(w_min) (out of range); an unscored row's: 0


def replica_digest(state: ESState, step: torch.Tensor) -> torch.Tensor:
    """A digest of a replica, identical on every rank while the replicas are.

    Parameters
    ----------
    state : ESState
    step : Tensor
        The 0-d int64 step counter.

    Returns
    -------
    Tensor
        int64 ``[4]`` on the state's device: a position-weighted sum of the
        state's bits, the two error counts, the step. No host synchronisation.
    """
    t = state.tensor
    bits = t.reshape(-1).view(torch.int32 if t.dtype == torch.float32 else torch.int64).to(torch.int64)
    mult = 2 * torch.arange(bits.shape[0], dtype=torch.int64, device=t.device) + 0x9E3779B1
    h = (bits * mult).sum() & ((1 << 62) - 1)  # int64 wrap-around; kept positive to negate below
    return torch.stack([h, state.errors[0], state.errors[1], step.reshape(())])


# --------------------------------------------------------------------------- ES
class DistributedEvolvedSampler(EvolvedSampler):
    """:class:`EvolvedSampler` on a process group: a full state replica per rank.

    Construct it on every rank with the same arguments, after
    ``torch.distributed.init_process_group``. ``select`` then takes THIS rank's
    meta-batch, in every form :meth:`EvolvedSampler.select` takes (``ids`` with
    ``logits``/``targets``, ``hidden``/``weight``/``targets`` or ``losses``, or
    packed rows with ``segment_ids``), and returns THIS rank's selection; every
    rank's state sees every rank's observations (docs/spec.md section 11.1).

    Parameters
    ----------
    num_samples, mini_batch, beta1, beta2, select_mode, seed, device, w_min, lam, eps, schedule
        As in :class:`EvolvedSampler`.
    process_group : ProcessGroup or None
        The group (``None``: the default, initialised group). Its
        collectives run on the state's device: gloo for a CPU state, NCCL for CUDA.
    meta_batch : int >= 1 or None
        ``cap``, the most positions one rank passes to ``select``; every call is
        padded to it. ``None``: agreed on the first call as the largest ``B`` of
        any rank (one host read, once). A call with more raises ``ValueError`` on
        that rank only (the others then wait in the collective): give it when
        the first meta-batch may be short. With ``segment_ids`` it counts rows.
    meta_tokens : int >= 1 or None
        Packed rows only: the most tokens (``B * T``) one rank passes to
        ``select(segment_ids=...)``, the size of the documents' exchange
        (``None``: agreed on the first packed call as the largest ``B * T`` of
        any rank, one host read, once; more raises ``ValueError`` on that rank
        only, as for ``meta_batch``). The results do not depend on it.

    Every rank must construct it with the same settings and call ``select`` the
    same number of times (one collective per call). The checked mode
    (``ES_KERNELS_CHECKED=1``) compares the replicas after every step.

    Notes
    -----
    ``select`` and ``observe`` make no host synchronisation (but the first
    call when ``meta_batch`` is None); on NCCL the collective queues on the
    device like a kernel.
    """

    def __init__(
        self,
        num_samples: int,
        mini_batch: int,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        select_mode: str = DEFAULT_SELECT_MODE,
        seed: int = 0,
        device: torch.device | str | None = None,
        w_min: float = DEFAULT_W_MIN,
        *,
        lam: float = DEFAULT_LAM,
        eps: float = DEFAULT_EPS,
        schedule: ScoringSchedule | str | None = None,
        process_group: dist.ProcessGroup | None = None,
        meta_batch: int | None = None,
        meta_tokens: int | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedEvolvedSampler needs torch.distributed initialised (init_process_group) on every rank"
            )
        super().__init__(
            num_samples, mini_batch, beta1, beta2, select_mode, seed, device, w_min, lam=lam, eps=eps, schedule=schedule
        )
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.meta_batch = None if meta_batch is None else _checks.integer(meta_batch, "meta_batch", 1)
        self.meta_tokens = None if meta_tokens is None else _checks.integer(meta_tokens, "meta_tokens", 1)
        self._scratch: ESState | None = None  # an empty state: the single-process step's scores, nothing observed

    # ---- the exchange
    @overload
    def _capacity(self, n: int, tokens: None = None) -> int: ...

    @overload
    def _capacity(self, n: int, tokens: int) -> tuple[int, int]: ...

    def _capacity(self, n: int, tokens: int | None = None) -> int | tuple[int, int]:
        """``cap`` (and with ``tokens``, the packed rows' token capacity: returns
        ``(cap, tokens_cap)``), agreed once over the ranks when not given."""
        if self.meta_batch is None or (tokens is not None and self.meta_tokens is None):
            # once: agree on the largest first meta-batch (and token grid)
            t = torch.tensor([n, 0 if tokens is None else tokens], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
            agreed, agreed_tokens = (int(x) for x in t.tolist())
            if self.meta_batch is None and agreed > 0:
                self.meta_batch = agreed
            if tokens is not None and self.meta_tokens is None and agreed_tokens > 0:
                self.meta_tokens = agreed_tokens
        cap = self.meta_batch or 0
        if n > cap:
            raise ValueError(
                f"meta-batch of {n} {'ids' if tokens is None else 'rows'} on rank {self.rank}, more than "
                f"meta_batch={self.meta_batch} (the padded size every rank agreed on)"
            )
        if tokens is None:
            return cap
        tokens_cap = self.meta_tokens or 0
        if tokens > tokens_cap:
            raise ValueError(
                f"packed meta-batch of {tokens} tokens on rank {self.rank}, more than meta_tokens="
                f"{self.meta_tokens} (the padded size every rank agreed on)"
            )
        return cap, tokens_cap

    def _gather(self, ids: torch.Tensor, losses: torch.Tensor, cap: int, scored=None) -> torch.Tensor:
        buf = pack(ids, losses, cap, scored)
        out = torch.empty((self.world_size * cap, 2), dtype=torch.int64, device=self.device)
        _all_gather_single(out, buf, group=self.process_group)
        return out

    def _inputs(self, ids, losses):
        _checks.tensor(ids, "ids", dim=1, dtypes=_checks.INDEX_DTYPES)
        ids = ids.to(self.device, dtype=torch.int64, non_blocking=True)
        _checks.ids_losses(ids, losses, self.device)
        return ids, losses

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor | None:
        """Exchange and apply the observations of every rank without selecting
        (e.g. a full-batch loss that only feeds pruning).

        Parameters
        ----------
        ids, losses : Tensor
            This rank's ``[B]`` ids and losses.

        Returns
        -------
        Tensor or None
            float32 ``[B]``, this rank's weights. One collective, no host
            synchronisation (but the first call when ``meta_batch`` is None).
            None, without a collective, when the sampler's schedule selects
            from the state and the last ``select`` scored (its picks were
            observed by it; docs/spec.md section 12.1).
        """
        if self.schedule.selects_from_state and self._scored_last:
            return None  # the picks of a scoring step were observed by it (docs/spec.md section 12.1)
        return self._observe(ids, losses)

    def _observe(self, ids, losses) -> torch.Tensor:
        ids, losses = self._inputs(ids, losses.detach())
        n = ids.shape[0]
        cap = self._capacity(n)
        gathered = self._gather(ids, losses, cap)
        w = self._apply(gathered)
        if self._counters is not None:  # every rank's observations, on every replica
            self._counters[0, self._slot(unpack(gathered)[0])] = self._host_step - 1
        return w[self.rank * cap : self.rank * cap + n]

    def _apply(self, gathered: torch.Tensor) -> torch.Tensor:
        gids, glosses = unpack(gathered)
        if checked_mode():
            self._check_distinct(gids, gathered.shape[0] // self.world_size)
        scored = gathered[:, 1] != UNSCORED_BITS  # a row with nothing to score: skipped, weight 0
        w = gathered_update(
            torch.where(scored, gids, PAD_ID), glosses, self.state, self.beta1, self.beta2, self.lam, self.w_min
        )
        self._checked()
        return torch.where(scored, w, 0.0)

    def _checked(self) -> None:
        if checked_mode():
            self.check_replicas()
            self.state.check()

    def select(
        self,
        ids: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        losses: torch.Tensor | None = None,
        *,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
        shift_labels: bool = False,
        hidden: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        segment_ids: torch.Tensor | None = None,
    ) -> Selection:
        """As :meth:`EvolvedSampler.select`, on this rank's meta-batch.

        Parameters
        ----------
        ids, logits, targets, losses, ignore_index, label_smoothing, shift_labels
            As in :meth:`EvolvedSampler.select`.
        hidden, weight, bias, workspace_bytes, segment_ids
            As in :meth:`EvolvedSampler.select`, this rank's ``B`` samples
            (or ``B`` packed rows). Each rank scores its rows as the single
            process does; the observations of every rank are then applied
            to every replica (docs/spec.md section 11.1: an id passed by
            several ranks is observed once; with ``segment_ids`` a document
            split over several ranks' rows is one observation, of the
            token-weighted mean of its parts).

        Returns
        -------
        Selection
            This rank's selection (positions into its own meta-batch).

        Raises
        ------
        ValueError
            Naming the argument, before anything is written or exchanged
            (on this rank: the others then wait in the collective).

        Notes
        -----
        One collective (two on a step that selects from the state), no host
        synchronisation (but the first call when ``meta_batch`` or, with
        ``segment_ids``, ``meta_tokens`` is None: one read, to agree on it).
        """
        return super().select(
            ids,
            logits,
            targets,
            losses,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            shift_labels=shift_labels,
            hidden=hidden,
            weight=weight,
            bias=bias,
            workspace_bytes=workspace_bytes,
            segment_ids=segment_ids,
        )

    def _row_scores(self, ids: torch.Tensor, sc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(losses float32 [B], scored bool [B])``: :func:`row_scores` of this rank's rows."""
        if self._scratch is None:
            self._scratch = ESState(0, device=self.device)
        return row_scores(ids, sc, self._scratch, self.beta1, self.beta2)

    def _scoring_step(self, ids: torch.Tensor, packed: bool, scoring: dict) -> Selection:
        if packed:
            return self._packed_step(ids, scoring)
        _checks.tensor(ids, "ids", dim=1, dtypes=_checks.INDEX_DTYPES)  # before the conversion below
        ids = ids.to(torch.int64)
        losses, scored = self._row_scores(ids, scoring)
        n = ids.shape[0]
        b = min(self.mini_batch, n)
        cap = self._capacity(n)
        gathered = self._gather(ids, losses, cap, scored) if cap > 0 else None
        w_all = self._apply(gathered) if gathered is not None else ids.new_empty(0, dtype=torch.float32)
        pos = rank_selection(w_all, self.rank, cap, n, b, self.select_mode, self.seed, self._step, self.eps)
        self._step.add_(1)
        self._refresh(gathered[:, 0] if gathered is not None else ids)  # every rank's ids, on every replica
        weights = w_all[self.rank * cap : self.rank * cap + n]
        return Selection(pos, self.scales_of(ids.index_select(0, pos)), losses, weights)

    # ---- packed rows
    def _packed_step(self, segment_ids: torch.Tensor, scoring: dict) -> Selection:
        """docs/spec.md sections 6.1 and 11.1: this rank's documents' partial sums
        exchanged, every document observed once with the token-weighted mean
        of its parts, this rank's rows selected by their token-weighted weights."""
        rows = segment_ids.shape[0]
        b = min(self.mini_batch, rows)
        tok, scored, _ = packed_tokens(None, segment_ids, self.state, b, self._step_settings(), **scoring)
        # every document with a token in the rows (the counters refresh them all), its
        # scored tokens' float64 loss sum and count (0: present, not observed)
        key = torch.where(segment_ids >= 0, segment_ids.long(), INT64_MAX)
        keys, sums, counts, slot = _document_sums(tok, scored, key)
        cap, slots = self._capacity(rows, keys.shape[0])
        weights = torch.zeros(rows, dtype=torch.float32, device=self.device)
        gids = None
        if slots > 0:
            n = keys.shape[0]
            buf = torch.empty((slots, 3), dtype=torch.int64, device=self.device)
            buf[:n, 0] = torch.where((keys >= 0) & (keys != INT64_MAX), keys, PAD_ID)
            buf[:n, 1] = sums.view(torch.int64)
            buf[:n, 2] = counts
            buf[n:, 0] = PAD_ID
            buf[n:, 1:] = 0
            gathered = torch.empty((self.world_size * slots, 3), dtype=torch.int64, device=self.device)
            _all_gather_single(gathered, buf, group=self.process_group)
            gids = gathered[:, 0]
            w_docs = self._apply_documents(gathered)[self.rank * slots : self.rank * slots + n]
            weights = _row_means(w_docs[slot], scored)
        pos = _select_own(weights, self.rank * cap, b, self.select_mode, self.seed, self._step, self.eps)
        self._step.add_(1)
        self._refresh(gids if gids is not None else segment_ids)  # every rank's documents, on every replica
        return Selection(pos, self.scales_of(segment_ids[pos]), _row_means(tok, scored), weights)

    def _apply_documents(self, gathered: torch.Tensor) -> torch.Tensor:
        """Observe every document of the gathered ``(id, float64 sum bits, count)``
        rows once; float32 ``[W * slots]``: each row's document weight (0 when
        the document is not observed)."""
        w_slots = document_update(
            gathered[:, 0],
            gathered[:, 1].view(torch.float64),
            gathered[:, 2],
            self.world_size,
            self.state,
            self.beta1,
            self.beta2,
            self.lam,
            self.w_min,
        )
        self._checked()
        return w_slots

    def _select_from_state(self, ids) -> Selection:
        """A step without scores (docs/spec.md sections 11.1 and 12): the ids of
        every rank gathered, their weights from the state on every replica,
        this rank's selection as a scoring step's, then every rank's picks
        gathered so that every replica updates the same counters."""
        ids = self._batch_ids(ids).to(torch.int64)
        n = ids.shape[0]
        b = min(self.mini_batch, n)
        cap = self._capacity(n)
        sch, num, counters = self.schedule, self.state.num_samples, self._counters
        assert counters is not None  # kept while the schedule selects from the state
        if cap == 0:
            w_all = ids.new_empty(0, dtype=torch.float32)
        else:
            gids, _ = unpack(self._gather(ids, torch.zeros(n, device=self.device), cap))
            _, w_all = ops.es_select_from_state(
                gids, self.state.tensor, self.state.errors, 0, self.lam, self.w_min, self.select_mode, 0, 0, None,
                self._step, False, 0.0, counters[0, :num], sch.max_age, counters[1, :num], sch.cap,
            )  # fmt: skip
            self.state.errors[0] -= (gids == PAD_ID).sum()  # padding, counted as out of range
        pos = rank_selection(w_all, self.rank, cap, n, b, self.select_mode, self.seed, self._step, self.eps)
        self._step.add_(1)
        weights = w_all[self.rank * cap : self.rank * cap + n]
        due = (weights[pos] == math.inf).to(torch.float64)
        pids, pdue = unpack(self._gather(ids[pos], due, self.mini_batch))  # every rank's picks
        slot, picks = self._slot(pids), counters[1]
        picks[slot] = torch.where(pdue != 0, 0, picks[slot] + 1)  # a priority pick refreshes
        self._host_step += 1
        self._scored_last = False
        return Selection(pos, self.scales_of(ids[pos]), None, weights)

    # ---- checks
    def _check_distinct(self, gids: torch.Tensor, cap: int) -> None:
        """Checked mode: every rank's own ids distinct (all ranks see every slice, so all raise)."""
        for r in range(self.world_size):
            part = gids[r * cap : (r + 1) * cap]
            part = part[part != PAD_ID]
            if part.numel() != torch.unique(part).numel():
                raise RuntimeError(f"es_kernels checked mode: rank {r} passed duplicate ids in one step")

    def check_replicas(self) -> None:
        """Compare a digest of every rank's replica (state bits, errors, step)
        with one ``all_reduce``.

        Raises
        ------
        RuntimeError
            On every rank, if any replica differs.

        Notes
        -----
        Reads the digest on the host (one synchronisation).
        """
        h = replica_digest(self.state, self._step)
        both = torch.cat([h, -h])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
        hi, lo = both[:4], -both[4:]
        if bool((hi != lo).any()):
            raise RuntimeError(
                "es_kernels: the state replicas of the ranks diverged "
                f"(digest min {lo.tolist()} vs max {hi.tolist()}: state hash, errors, step)"
            )

    # ---- checkpoints
    STATE_KEYS = EvolvedSampler.STATE_KEYS + ("distributed",)

    def state_dict(self) -> dict:
        """The full state (any rank gives the same).

        Returns
        -------
        dict
            :meth:`EvolvedSampler.state_dict` plus ``distributed``:
            ``{"world_size", "meta_batch"}`` (the noise of position ``j``
            depends on both).

        Notes
        -----
        As :meth:`EvolvedSampler.state_dict`: checks the state and reads the
        step (host synchronisations).
        """
        out = super().state_dict()
        out["distributed"] = {"world_size": self.world_size, "meta_batch": self.meta_batch}
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore on every rank (all or nothing).

        A checkpoint resumes bit for bit on a group of the same size and with
        the same ``meta_batch`` (the noise of a position depends on both); any
        other is refused on every rank, before anything is written or
        exchanged.

        Parameters
        ----------
        sd : dict
            As :meth:`state_dict` returns it; ``meta_batch`` comes from it
            unless this sampler was given one.

        Raises
        ------
        ValueError
            Naming the entry; for a checkpoint of another world size or
            ``meta_batch``, naming both values. Nothing is written on failure.

        Notes
        -----
        As :meth:`EvolvedSampler.load_state_dict` (one synchronisation on a
        GPU); no collective.
        """
        _checks.keys(sd, "state_dict", self.STATE_KEYS)
        extra = sd["distributed"]
        _checks.keys(extra, "state_dict['distributed']", ("world_size", "meta_batch"))
        world = _checks.integer(extra["world_size"], "state_dict['distributed']['world_size']", 1)
        if world != self.world_size:
            raise ValueError(
                f"state_dict['distributed']['world_size'] is {world}: the checkpoint was saved on {world} "
                f"rank(s) and cannot resume on this group of {self.world_size} rank(s) (the noise of each "
                "position depends on the world size)"
            )
        cap = extra["meta_batch"]
        if cap is not None:
            cap = _checks.integer(cap, "state_dict['distributed']['meta_batch']", 1)
            if self.meta_batch is not None and cap != self.meta_batch:
                raise ValueError(
                    f"state_dict['distributed']['meta_batch'] is {cap}, this sampler was given "
                    f"meta_batch={self.meta_batch} (the noise of each position depends on it): "
                    "construct it with the checkpoint's meta_batch or none"
                )
        super().load_state_dict(sd)  # validates the rest before writing anything
        if self.meta_batch is None:
            self.meta_batch = cap


# --------------------------------------------------------------------------- ESWP
def shard_length(n: int, num_replicas: int, drop_last: bool) -> int:
    """Ids per rank for ``n`` kept ids (``DistributedSampler``'s ``num_samples``).

    Parameters
    ----------
    n, num_replicas : int
    drop_last : bool

    Returns
    -------
    int
    """
    if drop_last and n % num_replicas:
        return math.ceil((n - num_replicas) / num_replicas)
    return math.ceil(n / num_replicas)


@overload
def shard_indices(kept: list[int], num_replicas: int, rank: int, drop_last: bool) -> list[int]: ...


@overload
def shard_indices(kept: torch.Tensor, num_replicas: int, rank: int, drop_last: bool) -> torch.Tensor: ...


def shard_indices(
    kept: list[int] | torch.Tensor, num_replicas: int, rank: int, drop_last: bool
) -> list[int] | torch.Tensor:
    """This rank's share of the kept ids, with ``DistributedSampler``'s conventions.

    Pad to a multiple of ``num_replicas`` by wrapping around (or drop the tail
    with ``drop_last``), then take every ``num_replicas``-th id from ``rank`` on.

    Parameters
    ----------
    kept : list of int or Tensor
        The kept ids (a 1-D int tensor: a tensor comes back).
    num_replicas, rank : int
    drop_last : bool

    Returns
    -------
    list of int or Tensor
        ``shard_length(len(kept), num_replicas, drop_last)`` ids, of the kind
        of ``kept``.
    """
    idx = torch.as_tensor(kept, dtype=torch.int64)
    n = idx.shape[0]
    total = shard_length(n, num_replicas, drop_last) * num_replicas
    if total > n and n:
        idx = idx.repeat(math.ceil(total / n))
    share = idx[:total][rank::num_replicas]
    return share if isinstance(kept, torch.Tensor) else share.tolist()


class _Shard(_Plan):
    """This rank's share of an epoch's plan: ``ids`` the shard, ``pos`` the
    position in it, ``kept`` the whole plan (the same on every rank)."""

    __slots__ = ("kept",)

    def __init__(self, plan: _Plan, ids: torch.Tensor):
        super().__init__(plan.epoch, ids, plan.scale, plan.pos)
        self.kept = plan.ids


class DistributedESWPSampler(ESWPSampler):
    """:class:`ESWPSampler` sharded like ``DistributedSampler``: every rank prunes its
    replica (same state, seed, epoch: the same kept order and scales) and yields its
    share of the kept ids (:func:`shard_indices`). ``set_epoch`` and the scales are
    those of :class:`ESWPSampler`; ``len()``, ``position`` and ``state_dict(position)``
    count this rank's share.

    **Mid-epoch resume.** :meth:`state_dict` records the epoch in progress, this
    rank's position in its share (the same on every rank of a loop that trains
    in step) and the whole plan, so the checkpoint of any rank resumes every
    rank bit for bit (with ``es.state_dict()`` taken at the same point), as
    :class:`ESWPSampler` does in one process. It resumes only on as many ranks
    (``num_replicas``): another number is refused at load.

    Parameters
    ----------
    es, num_epochs, prune_ratio, anneal_frac, rescale, seed
        As in :class:`ESWPSampler`.
    num_replicas, rank : int or None
        The number of ranks and this one (``None``: from ``es`` when it is a
        :class:`DistributedEvolvedSampler`, else from the default process group).
    drop_last : bool
        Drop the tail of the kept ids instead of padding by wrapping around.

    Raises
    ------
    ValueError
        Naming the argument, for a bad value.

    Notes
    -----
    As :class:`ESWPSampler`: one host synchronisation per epoch, when it starts.
    """

    STATE_KEYS = ESWPSampler.STATE_KEYS + ("num_replicas",)

    def __init__(
        self,
        es: EvolvedSampler,
        num_epochs: int,
        prune_ratio: float = DEFAULT_PRUNE_RATIO,
        anneal_frac: float = DEFAULT_ANNEAL_FRAC,
        rescale: bool = True,
        seed: int | None = None,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(es, num_epochs, prune_ratio, anneal_frac, rescale, seed)
        es = self.es
        if num_replicas is None:
            num_replicas = es.world_size if isinstance(es, DistributedEvolvedSampler) else dist.get_world_size()
        if rank is None:
            rank = es.rank if isinstance(es, DistributedEvolvedSampler) else dist.get_rank()
        self.num_replicas = _checks.integer(num_replicas, "num_replicas", 1)
        self.rank = _checks.integer(rank, "rank", 0, self.num_replicas - 1)
        self.drop_last = _checks.flag(drop_last, "drop_last")

    def _shard(self, plan: _Plan) -> _Shard:
        """``plan`` as this rank's share (a whole plan's ``pos`` is 0 or already in the share)."""
        if isinstance(plan, _Shard):
            return plan
        ids = torch.as_tensor(shard_indices(plan.ids, self.num_replicas, self.rank, self.drop_last)).contiguous()
        return _Shard(plan, ids)

    def _begin_shard(self) -> _Shard:
        # ESWPSampler.chunks(self), called as such, still gives the whole plan (ESStream's use)
        plan = self._shard(self._begin())
        self._plan = plan  # the iterator's liveness follows the shard
        return plan

    def __iter__(self) -> Iterator[int]:
        return self._yield(self._begin_shard())  # as the base's: the epoch starts here

    def chunks(self, size: int = CHUNK) -> Iterator[torch.Tensor]:
        """This rank's share of the next epoch, started as :meth:`ESWPSampler.chunks` starts it.

        Parameters
        ----------
        size : int >= 1
            Ids per chunk, at most.

        Returns
        -------
        Iterator[Tensor]
            int64 CPU tensors: this rank's share, in order. Starting the epoch
            makes the one host synchronisation of :class:`ESWPSampler`.
        """
        size = _checks.integer(size, "size", 1)
        return self._yield_chunks(self._begin_shard(), size)

    def __len__(self) -> int:
        if not self._active and self._next is None and self._finished is None:
            self._next = self._compute(self.epoch)  # kept: the next iter() runs this plan
        if not self._active and self._next is not None:
            self._next = self._shard(self._next)
        return super().__len__()

    def state_dict(self, position: int | None = None) -> dict:
        """As :meth:`ESWPSampler.state_dict`, with this rank's position.

        Parameters
        ----------
        position : int or None
            The ids of this rank's share of the epoch in progress the loop
            has trained on, from 0 to the ids yielded (``None``: the ids
            yielded).

        Returns
        -------
        dict
            :meth:`ESWPSampler.state_dict`'s entries, ``position`` counting
            this rank's share and ``kept`` the whole plan (the same on every
            rank), plus ``num_replicas``. No host synchronisation.
        """
        out = super().state_dict(position)
        plan = self._plan if self._active else self._next
        if out["kept"] is not None and isinstance(plan, _Shard):
            out["kept"] = plan.kept.clone()
        out["num_replicas"] = self.num_replicas
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore from :meth:`state_dict` (of any rank) on every rank: all or nothing.

        Parameters
        ----------
        sd : dict
            As :meth:`state_dict` returns it, saved on as many ranks.

        Raises
        ------
        ValueError
            Naming the entry, before anything is written; for a checkpoint
            of another number of ranks, naming both. No collective.
        """
        _checks.keys(sd, "state_dict", self.STATE_KEYS)
        world = _checks.integer(sd["num_replicas"], "state_dict['num_replicas']", 1)
        if world != self.num_replicas:
            raise ValueError(
                f"state_dict['num_replicas'] is {world}: the checkpoint was saved on {world} rank(s) and "
                f"cannot resume on {self.num_replicas} rank(s) (the position counts a share of the plan)"
            )
        kept, position = sd["kept"], sd["position"]
        if kept is not None:
            _checks.saved(kept, "state_dict['kept']", torch.int64)
            per = shard_length(kept.shape[0], self.num_replicas, self.drop_last)
            position = _checks.integer(position, "state_dict['position']", 0)
            if position >= per:
                raise ValueError(
                    f"state_dict['position'] must be < {per}, this rank's share of the "
                    f"{kept.shape[0]} ids of state_dict['kept'], got {position}"
                )
        super().load_state_dict(sd)  # validates the rest before writing anything
        if self._next is not None:
            self._next = self._shard(self._next)
