"""ES and ESWP with the per-sample state split over the ranks of a process group
(docs/spec.md section 11.2; the replicated mode is :mod:`es_kernels.distributed`).

Rank ``r`` owns the ids ``[r * P, (r + 1) * P)`` (``P = ceil(N / W)``, the last
range cut at ``N``) and holds only their state: ``8 N / W`` bytes per rank
instead of ``8 N``. Each rank's loader reads only the ids it owns
(:class:`ShardedESWPSampler` is such a loader), so a step needs no exchange:

1. rank ``r`` scores its meta-batch in any form ``EvolvedSampler.select``
   takes (losses, logits, hidden states, packed rows) as the replicated
   sampler does, and updates the state of its ids in its shard (an id
   repeated in the meta-batch is observed once, at its first scored position,
   as :func:`es_kernels.distributed.gathered_update` does; a packed document
   once, with its token-weighted loss; an id or document it does not own is
   counted in ``errors`` and changes nothing);
2. it selects ``min(mini_batch, B_r)`` of its positions exactly as the
   replicated sampler does (:func:`es_kernels.distributed.rank_selection`:
   the noise of global position ``r * cap + j``);
3. the step counter advances on every rank.

A scoring schedule's steps without scores select from the shard, and its
counters (``last_seen``, ``picks``) are sharded with the state. No collective
and no host read per step. With the same inputs the replicated sampler
computes the same state bits, counters, weights and positions.

An ESWP epoch is planned with three collectives of fixed size (the threshold's
maximum and fixed-point sum, and the longest rank's length); each rank then
visits its own kept ids in its own order. Checkpoints go through
``torch.distributed.checkpoint``: the per-sample tensors are ``Shard(0)``
DTensors of global shape ``[N]``, so a checkpoint loads on any number of ranks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import _checks, _spec
from ._ops import ops
from ._packed import _document_sums, _row_means
from ._spec import (
    DEFAULT_ANNEAL_FRAC,
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_EPS,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_LABEL_SMOOTHING,
    DEFAULT_LAM,
    DEFAULT_W_MIN,
    INT64_MAX,
)
from .distributed import PAD_ID, _select_own, document_update, first_occurrence, row_scores
from .functional import checked_mode
from .lm import DEFAULT_WORKSPACE_BYTES, packed_tokens
from .reference import prune_scores
from .sampler import MAX_EPOCH, ESWPSampler, EvolvedSampler, Selection, _Plan
from .schedule import ScoringSchedule
from .state import ESState

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "ShardedEvolvedSampler",
    "ShardedESWPSampler",
    "shard_range",
    "shard_prune_plan",
]


def shard_range(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """The ids rank ``rank`` owns (docs/spec.md section 11.2).

    Parameters
    ----------
    num_samples : int >= 0
        ``N``.
    world_size : int >= 1
        ``W``.
    rank : int in [0, world_size)

    Returns
    -------
    tuple of int
        ``(lo, hi)``: the rank owns ``[lo, hi)``, ``lo = min(rank * P, N)``,
        ``hi = min(lo + P, N)``, ``P = ceil(N / W)`` (the split of
        ``torch.chunk``). No host synchronisation.
    """
    num_samples = _checks.integer(num_samples, "num_samples", 0)
    world_size = _checks.integer(world_size, "world_size", 1)
    rank = _checks.integer(rank, "rank", 0, world_size - 1)
    per = -(-num_samples // world_size)
    lo = min(rank * per, num_samples)
    return lo, min(lo + per, num_samples)


# --------------------------------------------------------------------------- ESWP on a shard
# ids per chunk of the threshold's two passes: their temporaries stay O(chunk), 2 MiB of
# float64 a tensor, which a CPU's cache holds (3x faster than 32 MiB chunks at N = 4e6)
PLAN_CHUNK = 1 << 18
FIXED_LO_BITS = 15  # the fixed-point sum's low word (section 11.2)


def _chunks(n: int):
    return ((a, min(a + PLAN_CHUNK, n)) for a in range(0, n, PLAN_CHUNK))


def _score_max(state: torch.Tensor) -> torch.Tensor:
    """float64 ``[1]``: ``max |score_i|`` over the scored rows (0 when none)."""
    out = torch.zeros(1, dtype=torch.float64, device=state.device)
    for a, b in _chunks(state.shape[0]):
        score = prune_scores(state[a:b])[0]  # not scored: NaN or infinite, here 0
        out = torch.maximum(out, score.nan_to_num_(0.0, 0.0, 0.0).abs_().max())
    return out


def _threshold(amax: float, words: list[int]) -> float:
    """Section 7's ``tau`` from ``A`` and the summed words of :func:`_fixed_point`."""
    hi, lo, count = words
    if count == 0:
        return math.nan
    if amax == 0.0:
        return 0.0
    return _spec.prune_mean(hi * 2**FIXED_LO_BITS + lo, count, math.frexp(amax)[1])


def _fixed_point(state: torch.Tensor, amax: float) -> torch.Tensor:
    """int64 ``[3]``: the sums of ``q_i >> 15`` and ``q_i & (2**15 - 1)`` over the
    scored rows, and their count (section 11.2): each word's sum over all ranks stays
    below ``2**63`` for ``N < 2**48`` (``|q_i| <= 2**30``), where one int64 sum of
    ``q_i`` would overflow from ``N`` about ``2**33``."""
    out = torch.zeros(3, dtype=torch.int64, device=state.device)
    f1, f2 = _spec.prune_scale(_spec.prune_shift(math.frexp(amax)[1])) if amax > 0.0 else (0.0, 0.0)
    for a, b in _chunks(state.shape[0]):
        score, scored = prune_scores(state[a:b])
        q = score.nan_to_num_(0.0, 0.0, 0.0).mul_(f1).mul_(f2).floor_().to(torch.int64)  # 0 where not scored
        out += torch.stack([(q >> FIXED_LO_BITS).sum(), (q & (2**FIXED_LO_BITS - 1)).sum(), scored.sum()])
    return out


def _visit(state: torch.Tensor, lo: int, rank: int, seed: int, epoch: int, scale: torch.Tensor | None) -> torch.Tensor:
    """int64 CPU: the rank's ids ``lo + perm_r(q)`` in its visit order of ``epoch``, those
    whose scale is not 0 (all of them when ``scale`` is None). The prune op with nothing
    below the threshold (NaN) drops nothing: its order is the visit order itself."""
    order = ops.eswp_prune(state, 0.0, seed, epoch, id_offset=lo, order_key=rank, threshold=math.nan)[0]
    if scale is not None:
        order = order[scale[order] != 0]
    return (order + lo).cpu()


def _epoch_ids(kept: torch.Tensor, length: int, everything) -> torch.Tensor:
    """``kept`` repeated from its start to ``length`` ids (``everything()``, the rank's
    whole visit order, when nothing is kept: those ids have scale 0)."""
    src = kept if kept.shape[0] > 0 else everything()
    reps = -(-length // src.shape[0])
    return src.repeat(reps)[:length]


def shard_prune_plan(
    state: torch.Tensor,
    lo: int,
    rank: int,
    tau: float,
    prune_ratio: float,
    seed: int,
    epoch: int,
    num_epochs: int,
    anneal_frac: float = DEFAULT_ANNEAL_FRAC,
    rescale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's ESWP plan, given the threshold of the whole state (docs/spec.md section 11.2).

    Parameters
    ----------
    state : Tensor
        float ``[n_r, 2]``, the rank's shard (row ``i - lo`` is id ``i``).
    lo : int >= 0
        The first id the rank owns.
    rank : int >= 0
        The rank (the key of its visit order).
    tau : float
        Section 7's threshold of the whole state (NaN: nothing below it).
    prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale
        As in :func:`es_kernels.eswp_prune`.

    Returns
    -------
    tuple of Tensor
        ``(kept, scale)``: int64 ``[K_r]`` on the CPU, the kept ids (global)
        in the rank's visit order, and float32 ``[n_r]`` their scales (0:
        dropped) on the state's device. Two host synchronisations: the
        count ``K_r`` and the copy of the kept ids.

    Notes
    -----
    One call of the prune op (:func:`es_kernels.eswp_prune` with
    ``id_offset=lo``, ``order_key=rank``, ``threshold=tau``) on the shard:
    its temporaries on the state's device are those of the op, ``8 n_r``
    bytes of ids and an ``n_r / 8``-byte mask.
    """
    order, num_kept, scale = ops.eswp_prune(
        state, prune_ratio, seed, epoch, num_epochs, anneal_frac, rescale, id_offset=lo, order_key=rank, threshold=tau
    )
    return (order[: int(num_kept)] + lo).cpu(), scale


# --------------------------------------------------------------------------- ES
class ShardedEvolvedSampler(EvolvedSampler):
    """:class:`EvolvedSampler` with the state split over a process group by id ranges.

    Rank ``r`` holds the state of the ids :func:`shard_range` gives it and
    must only pass those ids to :meth:`select` (use :class:`ShardedESWPSampler`
    as the loader's sampler, or a loader of the rank's range). ``select``
    takes every form :meth:`EvolvedSampler.select` takes (losses, logits,
    hidden states, packed rows of documents the rank owns, and a scoring
    schedule's steps without scores); with the same inputs it gives the
    replicated sampler's results bit for bit. A step makes no collective.
    Construct it on every rank with the same arguments, after
    ``torch.distributed.init_process_group``.

    Parameters
    ----------
    num_samples : int in [1, 2**32)
        ``N``, the dataset size; every rank must own at least one id
        (``N > (W - 1) * ceil(N / W)``).
    mini_batch : int >= 1
        The samples this rank selects per step (``b_r = min(mini_batch, B_r)``).
    beta1, beta2, select_mode, seed, device, w_min, lam, eps, schedule
        As in :class:`EvolvedSampler`; a schedule's counters (``last_seen``,
        ``picks``) are sharded with the state.
    process_group : ProcessGroup or None
        The group (``None``: the default group).
    meta_batch : int >= 1 or None
        ``cap``, as in :class:`~es_kernels.distributed.DistributedEvolvedSampler`:
        the noise of position ``j`` is that of global position ``rank * cap + j``.
        ``None``: agreed on the first call (one collective and host read, once).

    Raises
    ------
    ValueError
        Naming the argument, for a bad value.
    RuntimeError
        When ``torch.distributed`` is not initialised.

    Attributes
    ----------
    num_samples : int
        ``N``.
    lo, hi : int
        The ids this rank owns, ``[lo, hi)``; ``state`` holds their rows.

    Notes
    -----
    :meth:`select` and :meth:`observe` make no collective and no host
    synchronisation (but the first call when ``meta_batch`` is None, and
    every call in the checked mode: one ``all_reduce``, docs/spec.md section
    11.2). :meth:`check`, :meth:`set_epoch`, :meth:`state_dict` and
    :meth:`load_state_dict` are collectives: call them on every rank.
    """

    SHARDED_KEYS = ("num_samples", "world_size", "meta_batch")
    STATE_KEYS = ("state", "step", "epoch", "scale", "scale_set", "counters", "sharded") + EvolvedSampler.SETTINGS

    def __init__(
        self,
        num_samples: int,
        mini_batch: int,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        select_mode: str = "sample",
        seed: int = 0,
        device=None,
        w_min: float = DEFAULT_W_MIN,
        *,
        lam: float = DEFAULT_LAM,
        eps: float = DEFAULT_EPS,
        schedule: ScoringSchedule | str | None = None,
        process_group=None,
        meta_batch: int | None = None,
    ):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedEvolvedSampler needs torch.distributed initialised (init_process_group) on every rank"
            )
        num_samples = _checks.integer(num_samples, "num_samples", 1, _spec.MAX_POSITIONS)
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        last_lo, _ = shard_range(num_samples, world, world - 1)
        if last_lo >= num_samples:
            raise ValueError(
                f"num_samples={num_samples} leaves rank {world - 1} of {world} without ids "
                f"(each rank owns ceil(N / W) = {-(-num_samples // world)} ids): use fewer ranks"
            )
        lo, hi = shard_range(num_samples, world, rank)
        super().__init__(
            hi - lo, mini_batch, beta1, beta2, select_mode, seed, device, w_min, lam=lam, eps=eps, schedule=schedule
        )
        self.num_samples, self.lo, self.hi = num_samples, lo, hi
        self.process_group, self.world_size, self.rank = process_group, world, rank
        self.meta_batch = None if meta_batch is None else _checks.integer(meta_batch, "meta_batch", 1)
        self._mesh: DeviceMesh | None = None
        self._scratch: ESState | None = None  # an empty state: row_scores' scratch

    # ---- the step
    def _capacity(self, n: int) -> int:
        if self.meta_batch is None:  # once: agree on the largest first meta-batch
            t = torch.tensor([n], dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
            agreed = int(t)
            if agreed == 0:
                return 0
            self.meta_batch = agreed
        if n > self.meta_batch:
            raise ValueError(
                f"meta-batch of {n} ids on rank {self.rank}, more than meta_batch={self.meta_batch} "
                "(the padded size of the noise positions)"
            )
        return self.meta_batch

    def _ids(self, ids) -> torch.Tensor:
        _checks.tensor(ids, "ids", dim=1, dtypes=_checks.INDEX_DTYPES)
        return ids.to(self.device, dtype=torch.int64, non_blocking=True)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """int64: the shard's row of each owned id, -1 for any other id (no overflow)."""
        ids = ids.long()  # int32 ids (packed rows) with a range past 2**31
        owned = (ids >= self.lo) & (ids < self.hi)
        return torch.where(owned, ids, self.lo - 1) - self.lo

    def _slot(self, ids: torch.Tensor) -> torch.Tensor:
        """Indices into the shard's counters: the row, or the spare slot ``n_r`` for another id."""
        rows = self._rows(ids)
        return torch.where(rows >= 0, rows, self.hi - self.lo)

    def _checked_step(self, ids: torch.Tensor | None) -> None:
        """Checked mode (``ES_KERNELS_CHECKED=1``, docs/spec.md section 11.2): one
        ``all_reduce`` before the step writes, so that every rank raises together
        when a rank passed a repeated id (``ids``, when given) or the ranks' step
        counters differ (a rank that skipped a call). Nothing otherwise."""
        if not checked_mode():
            return
        dup = ids is not None and torch.unique(ids).numel() != ids.numel()
        t = torch.stack([torch.tensor(self.rank + 1 if dup else 0, device=self.device), self._step, -self._step])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        bad, hi, lo = t.tolist()
        if bad:
            raise RuntimeError(f"es_kernels checked mode: rank {bad - 1} passed duplicate ids in one step")
        if hi != -lo:
            raise RuntimeError(
                f"es_kernels checked mode: the step counters of the ranks diverged (min {-lo}, max {hi}): "
                "every rank must call select the same number of times"
            )

    def _update(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Section 11.2's update of this rank's shard; float32 ``[B]`` weights
        (``PAD_ID`` positions: skipped, not counted)."""
        n = ids.shape[0]
        first = first_occurrence(ids)
        keep = first == torch.arange(n, device=ids.device)
        upd = torch.where(keep, self._rows(ids), -1)
        w = ops.es_update(
            upd, losses, self.state.tensor, self.state.errors, self.beta1, self.beta2, self.lam, self.w_min
        )
        self.state.errors[0] -= (~keep | (ids == PAD_ID)).sum()  # repeats and padding: not counted
        return w[first]

    def _pick(self, weights: torch.Tensor, cap: int) -> torch.Tensor:
        """Section 11.1's selection of this rank's positions (global ``rank * cap + j``); advances the step."""
        b = min(self.mini_batch, weights.shape[0])
        pos = _select_own(weights, self.rank * cap, b, self.select_mode, self.seed, self._step, self.eps)
        self._step.add_(1)
        return pos

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
        """As :meth:`EvolvedSampler.select`, on this rank's meta-batch of ids it owns.

        Parameters
        ----------
        ids : Tensor
            int64 / int32 ``[B]``, ``B <= meta_batch``: ids this rank owns
            (another id is counted in ``errors`` and changes nothing; an id
            repeated in the meta-batch is observed once, at its first scored
            position). With a schedule, ``select(ids)`` alone on a step that
            does not score (:attr:`needs_scores` False) picks from the shard.
        logits, targets, losses, ignore_index, label_smoothing, shift_labels
            As in :meth:`EvolvedSampler.select`.
        hidden, weight, bias, workspace_bytes
            As in :meth:`EvolvedSampler.select`: hidden-state scoring.
        segment_ids : Tensor
            Packed rows (``ids`` None), as in :meth:`EvolvedSampler.select`:
            ``[B, T]`` document ids, ``B <= meta_batch`` rows. Every document
            must be one this rank owns (another is counted once per step in
            ``errors`` and changes nothing).

        Returns
        -------
        Selection
            Positions into this rank's meta-batch, as the replicated sampler
            selects them for the same inputs (docs/spec.md section 11.2).

        Raises
        ------
        ValueError
            Naming the argument, before anything is written.

        Notes
        -----
        No collective, no host synchronisation (but the first call when
        ``meta_batch`` is None: one ``all_reduce`` and one read; and in the
        checked mode, one ``all_reduce`` and one read per step).
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

    def _scoring_step(self, ids: torch.Tensor, packed: bool, scoring: dict) -> Selection:
        if packed:
            return self._packed_step(ids, scoring)
        ids = self._ids(ids)
        if self._scratch is None:
            self._scratch = ESState(0, device=self.device)
        losses, scored = row_scores(ids, scoring, self._scratch, self.beta1, self.beta2)
        cap = self._capacity(ids.shape[0])
        self._checked_step(ids)
        w = torch.where(scored, self._update(torch.where(scored, ids, PAD_ID), losses), 0.0)
        pos = self._pick(w, cap)
        self._refresh(ids)
        return Selection(pos, self.scales_of(ids[pos]), losses, w)

    def _packed_step(self, segment_ids: torch.Tensor, scoring: dict) -> Selection:
        """Section 11.2's packed step: section 6.1 on the documents this rank owns."""
        rows = segment_ids.shape[0]
        b = min(self.mini_batch, rows)
        tok, scored, _ = packed_tokens(None, segment_ids, self.state, b, self._step_settings(), **scoring)
        keys, sums, counts, slot = _document_sums(
            tok, scored, torch.where(segment_ids >= 0, segment_ids.long(), INT64_MAX)
        )
        cap = self._capacity(rows)
        self._checked_step(None)
        weights = torch.zeros(rows, dtype=torch.float32, device=self.device)
        if keys.shape[0] > 0:
            doc = (keys >= 0) & (keys != INT64_MAX)
            rows_of = self._rows(keys)  # another rank's document: a distinct id outside the shard, counted once
            local = torch.where(doc, torch.where(rows_of >= 0, rows_of, -1 - keys), PAD_ID)
            st = self.state
            w_docs = document_update(local, sums, counts, 1, st, self.beta1, self.beta2, self.lam, self.w_min)
            weights = _row_means(w_docs[slot], scored)
        pos = self._pick(weights, cap)
        self._refresh(segment_ids)
        return Selection(pos, self.scales_of(segment_ids[pos]), _row_means(tok, scored), weights)

    def _select_from_state(self, ids) -> Selection:
        """Section 12's step without scores, on the shard (section 11.2)."""
        ids = self._ids(ids)
        cap = self._capacity(ids.shape[0])
        self._checked_step(None)
        sch, counters, m = self.schedule, self._counters, self.hi - self.lo
        assert counters is not None  # kept while the schedule selects from the state
        _, w = ops.es_select_from_state(
            self._rows(ids), self.state.tensor, self.state.errors, 0, self.lam, self.w_min, self.select_mode, 0, 0,
            None, self._step, False, 0.0, counters[0, :m], sch.max_age, counters[1, :m], sch.cap,
        )  # fmt: skip
        pos = self._pick(w, cap)
        slot, picks = self._slot(ids[pos]), counters[1]
        picks[slot] = torch.where(w[pos] == math.inf, 0, picks[slot] + 1)  # a priority pick refreshes
        self._host_step += 1
        self._scored_last = False
        return Selection(pos, self.scales_of(ids[pos]), None, w)

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor | None:
        """Apply observations to this rank's shard without selecting.

        Parameters
        ----------
        ids, losses : Tensor
            ``[B]`` ids this rank owns and their losses (on the state's device).

        Returns
        -------
        Tensor or None
            float32 ``[B]`` weights. None, doing nothing, when the schedule
            selects from the state and the last :meth:`select` scored (its
            picks were observed by it; docs/spec.md section 12.1). No
            collective, no host synchronisation (but in the checked mode).
        """
        if self.schedule.selects_from_state and self._scored_last:
            return None
        return self._observe(ids, losses)

    def _observe(self, ids, losses) -> torch.Tensor:
        ids = self._ids(ids)
        _checks.ids_losses(ids, losses, self.device)
        self._checked_step(ids)
        w = self._update(ids, losses.detach())
        if self._counters is not None:
            self._counters[0, self._slot(ids)] = self._host_step - 1
        return w

    def scales_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The loss scale of each id (the scale in force for the ids this rank
        owns, 1 for the others).

        Parameters
        ----------
        ids : Tensor
            int64 global ids of any shape, on the state's device.

        Returns
        -------
        Tensor
            float32, the shape of ``ids``. No host synchronisation.
        """
        if self._scale is None:
            return torch.ones(ids.shape, dtype=torch.float32, device=self.device)
        inside = (ids >= self.lo) & (ids < self.hi)
        return torch.where(inside, self._scale[(ids - self.lo).clamp(0, self.hi - self.lo - 1)], 1.0)

    # ---- checks
    def error_counts(self) -> tuple[int, int]:
        """The error counts summed over every rank's shard.

        Returns
        -------
        tuple of int
            ``(ids out of the ranks' ranges, rejected observations)``.

        Notes
        -----
        One ``all_reduce`` and one host read: call it on every rank.
        """
        t = self.state.errors.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        bad_ids, bad_losses = (int(v) for v in t.tolist())
        return bad_ids, bad_losses

    def check(self) -> None:
        """Raise on every rank if any shard counted an error.

        Raises
        ------
        RuntimeError
            With the sums over the ranks, when either is non-zero.

        Notes
        -----
        One ``all_reduce`` and one host read: call it on every rank.
        """
        bad_ids, bad_losses = self.error_counts()
        if bad_ids or bad_losses:
            raise RuntimeError(
                f"es_kernels: {bad_ids} id(s) outside the ranks' own ranges (or outside "
                f"[0, {self.num_samples})) and {bad_losses} non-finite observation(s) were seen and "
                "skipped, summed over the ranks; each rank must pass only the ids it owns "
                "(ShardedESWPSampler's). Fix the loader or the loss, then call state.reset_errors() on every rank."
            )

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` after :meth:`check` (a collective).

        Parameters
        ----------
        epoch : int >= 0

        Raises
        ------
        RuntimeError
            From :meth:`check`.
        """
        epoch = _checks.integer(epoch, "epoch", 0)
        self.check()
        self.epoch = epoch

    # ---- checkpoints
    def _sharded(self, local: torch.Tensor):
        """``local`` (this rank's ``[n_r]``) as a ``Shard(0)`` DTensor of global shape ``[N]``."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            assert group is not None  # the constructor checked that torch.distributed is initialised
            self._mesh = DeviceMesh.from_group(group, self.device.type)
        return DTensor.from_local(
            local, self._mesh, [Shard(0)], run_check=False, shape=torch.Size([self.num_samples]), stride=(1,)
        )

    def _local(self, x, name: str, dtype: torch.dtype) -> torch.Tensor:
        """This rank's part of a saved ``Shard(0)`` DTensor (metadata checks only)."""
        from torch.distributed.tensor import DTensor, Shard

        if not isinstance(x, DTensor):
            raise ValueError(f"{name} must be a DTensor (from state_dict()), got {type(x).__name__}")
        if x.dtype != dtype or tuple(x.shape) != (self.num_samples,):
            raise ValueError(f"{name} must be {dtype} of shape ({self.num_samples},), got {x.dtype} {tuple(x.shape)}")
        if tuple(x.placements) != (Shard(0),) or x.device_mesh.size() != self.world_size:
            raise ValueError(f"{name} must be sharded Shard(0) over this group's {self.world_size} rank(s)")
        local = x.to_local()
        if tuple(local.shape) != (self.hi - self.lo,):
            raise ValueError(
                f"{name} holds {tuple(local.shape)} on rank {self.rank}, not its range [{self.lo}, {self.hi})"
            )
        return local

    def _agree_valid(self, problem: str | None) -> None:
        """Raise on every rank if any rank found a problem (one ``all_reduce``).

        Parameters
        ----------
        problem : str or None
            This rank's verdict on its local values (the message, or None).

        Raises
        ------
        ValueError
            On every rank when any rank's ``problem`` is not None.
        """
        t = torch.tensor([0 if problem is None else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.process_group)
        if int(t):
            raise ValueError(problem or "a saved value is invalid on another rank (its ValueError names it)")

    def state_dict(self) -> dict:
        """The state for ``torch.distributed.checkpoint`` (docs/spec.md section 11.2).

        Returns
        -------
        dict
            ``state`` (``s`` and ``d``: ``Shard(0)`` DTensors ``[N]``;
            ``errors``: int64 ``[2]``, the sum over the ranks), ``step``,
            ``epoch``, ``scale`` (a DTensor ``[N]``, ones when ``scale_set``
            is False), ``scale_set``, the settings (``schedule`` as its
            string), ``counters`` (with a schedule that selects from the
            state: ``last_seen`` and ``picks``, int64 ``Shard(0)`` DTensors
            ``[N]``; else None) and ``sharded`` (``num_samples``,
            ``world_size``, ``meta_batch``).

        Raises
        ------
        RuntimeError
            From :meth:`check`, on every rank.

        Notes
        -----
        A collective (:meth:`check`); reads the step.
        """
        self.check()
        scale = self._scale if self._scale is not None else torch.ones(self.hi - self.lo, device=self.device)
        out = {
            "state": {
                "s": self._sharded(self.state.s.clone()),
                "d": self._sharded(self.state.d.clone()),
                "errors": torch.zeros(2, dtype=torch.int64, device=self.device),  # the sum, 0 after check()
            },
            "step": self.step,
            "epoch": self.epoch,
            "scale": self._sharded(scale.clone()),
            "scale_set": self._scale is not None,
            "counters": None,
            "sharded": {"num_samples": self.num_samples, "world_size": self.world_size, "meta_batch": self.meta_batch},
        }
        out.update({k: getattr(self, k) for k in EvolvedSampler.SETTINGS})
        out["schedule"] = str(self.schedule)
        if self._counters is not None:
            m = self.hi - self.lo
            out["counters"] = {k: self._sharded(self._counters[i, :m].clone()) for i, k in enumerate(self.COUNTER_KEYS)}
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore from a :meth:`state_dict` loaded by ``torch.distributed.checkpoint``,
        on every rank: every rank loads, or every rank raises.

        Parameters
        ----------
        sd : dict
            This sampler's :meth:`state_dict` filled by
            ``torch.distributed.checkpoint.load``, saved on any number of ranks
            (the template's sampler built with a schedule of the same kind: with
            counters or without).

        Raises
        ------
        ValueError
            Naming the entry, on every rank, before anything is written.

        Notes
        -----
        One ``all_reduce`` and host reads of the values.
        """
        if isinstance(sd, dict) and "schedule" not in sd and "counters" not in sd:
            sd = dict(sd, schedule="step", counters=None)  # saved before the sharded schedule existed
        _checks.keys(sd, "state_dict", self.STATE_KEYS)
        cfg = self._validate({k: sd[k] for k in EvolvedSampler.SETTINGS})
        step = _checks.integer(sd["step"], "state_dict['step']", 0)
        epoch = _checks.integer(sd["epoch"], "state_dict['epoch']", 0)
        scale_set = _checks.flag(sd["scale_set"], "state_dict['scale_set']")
        info = sd["sharded"]
        _checks.keys(info, "state_dict['sharded']", self.SHARDED_KEYS)
        num = _checks.integer(info["num_samples"], "state_dict['sharded']['num_samples']", 1)
        if num != self.num_samples:
            raise ValueError(f"state_dict['sharded']['num_samples'] is {num}, this sampler has {self.num_samples}")
        world = _checks.integer(info["world_size"], "state_dict['sharded']['world_size']", 1)
        cap = info["meta_batch"]
        if cap is not None:
            cap = _checks.integer(cap, "state_dict['sharded']['meta_batch']", 1)
            if world == self.world_size and self.meta_batch is not None and cap != self.meta_batch:
                raise ValueError(
                    f"state_dict['sharded']['meta_batch'] is {cap}, this sampler was given meta_batch="
                    f"{self.meta_batch} on as many ranks (the noise of each position depends on it)"
                )
        _checks.keys(sd["state"], "state_dict['state']", ("s", "d", "errors"))
        s = self._local(sd["state"]["s"], "state_dict['state']['s']", self.state.dtype)
        d = self._local(sd["state"]["d"], "state_dict['state']['d']", self.state.dtype)
        scale = self._local(sd["scale"], "state_dict['scale']", torch.float32)
        errors = sd["state"]["errors"]
        _checks.saved(errors, "state_dict['state']['errors']", torch.int64, 2)
        counters = sd["counters"]
        if not cfg["schedule"].selects_from_state:
            if counters is not None:
                raise ValueError("state_dict['counters'] must be None with the schedule 'step'")
        else:
            if counters is None:
                raise ValueError(
                    f"state_dict['counters'] is None with the schedule '{cfg['schedule']}': build the "
                    "template's sampler with a schedule that selects from the state"
                )
            _checks.keys(counters, "state_dict['counters']", self.COUNTER_KEYS)
            counters = [
                self._local(counters[k], f"state_dict['counters']['{k}']", torch.int64) for k in self.COUNTER_KEYS
            ]
        # the values: this rank's part, then one verdict for all
        problem = None
        if bool(torch.isinf(s).any()):
            problem = "state_dict['state']['s'] holds an infinite value (s must be finite, or NaN = unseen)"
        elif not bool(torch.isfinite(d).all()):
            problem = "state_dict['state']['d'] holds a non-finite value"
        elif bool((errors < 0).any()):
            problem = "state_dict['state']['errors'] holds a negative count"
        elif not bool((torch.isfinite(scale) & (scale >= 0)).all()):
            problem = "state_dict['scale'] must be finite and >= 0"
        elif counters is not None and bool((counters[1] < 0).any()):
            problem = "state_dict['counters']['picks'] must be >= 0"
        self._agree_valid(problem)
        # everything is valid: write
        mine = errors if self.rank == 0 else torch.zeros_like(errors)
        self.state._load_validated(s, d, mine)
        self._configure(cfg)
        if counters is not None and self._counters is not None:  # (_configure made them for the schedule)
            self._counters[:, :-1].copy_(torch.stack(counters))
        self._step.fill_(step)
        self._host_step = step
        self._scored_last = True
        self.epoch = epoch
        self._scale = scale.detach().to(self.device, copy=True) if scale_set else None
        if world == self.world_size and self.meta_batch is None:
            self.meta_batch = cap  # another group: the noise changes anyway, the saved cap is not imposed


# --------------------------------------------------------------------------- ESWP
class ShardedESWPSampler(ESWPSampler):
    """:class:`ESWPSampler` on a sharded state: each rank plans and visits its own ids.

    At the start of an epoch (``iter()``, or ``len()`` between epochs) every
    rank computes the threshold of the whole state with two collectives, its
    own drops and scales (those of :func:`es_kernels.eswp_prune` on the whole
    state), and the order of its kept ids; then one more collective sets the
    epoch's length ``L``, the longest rank's: a shorter rank repeats its kept
    ids from the start. So every rank yields ``L`` ids, all its own. Planning
    is a collective: every rank calls ``iter()`` (and ``len()`` between
    epochs) together; a ``len()`` on one rank alone waits for the others.

    **Mid-epoch resume** on as many ranks is bit-exact, as for
    :class:`ESWPSampler`; a checkpoint of an epoch in progress is refused on
    another number of ranks (the orders are per rank), one taken at an epoch
    boundary loads on any.

    Parameters
    ----------
    es : ShardedEvolvedSampler
    num_epochs, prune_ratio, anneal_frac, rescale, seed
        As in :class:`ESWPSampler`.

    Raises
    ------
    ValueError
        Naming the argument, for a bad value.

    Notes
    -----
    Starting an epoch makes four collectives (the error check, the threshold's
    two, the length) and their host synchronisations, once per epoch, on
    every rank; yielding ids makes none.
    """

    es: ShardedEvolvedSampler  # the base class's es, narrowed: the constructor checks it

    STATE_KEYS = (
        "epoch",
        "position",
        "plan",
        "scale",
        "finished",
        "num_replicas",
        "seed",
        "num_epochs",
        "prune_ratio",
        "anneal_frac",
        "rescale",
    )

    def __init__(
        self,
        es: ShardedEvolvedSampler,
        num_epochs: int,
        prune_ratio: float = 0.5,
        anneal_frac: float = DEFAULT_ANNEAL_FRAC,
        rescale: bool = True,
        seed: int | None = None,
    ):
        if not isinstance(es, ShardedEvolvedSampler):
            raise ValueError(f"es must be a ShardedEvolvedSampler, got {type(es).__name__}")
        super().__init__(es, num_epochs, prune_ratio, anneal_frac, rescale, seed)

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        dist.all_reduce(t, op=op, group=self.es.process_group)
        return t

    def _length(self, kept: torch.Tensor) -> int:
        t = torch.tensor([kept.shape[0]], dtype=torch.int64, device=self.es.device)
        return int(self._all_reduce(t, dist.ReduceOp.MAX))

    def _plan_of(self, seed: int, epoch: int, scale: torch.Tensor, pos: int = 0, kept=None) -> _Plan:
        """The plan of ``epoch`` from this rank's scales (0: dropped; ``kept``: their
        visit order when already known); one collective, the epoch's length."""
        es = self.es
        st, lo, rank = es.state.tensor, es.lo, es.rank
        if kept is None:
            kept = _visit(st, lo, rank, seed, epoch, scale)
        ids = _epoch_ids(kept, self._length(kept), lambda: _visit(st, lo, rank, seed, epoch, None))
        return _Plan(epoch, ids, scale, pos)

    def _compute(self, epoch: int) -> _Plan:
        if epoch > MAX_EPOCH:
            raise ValueError(f"epoch {epoch} is past the last epoch ({MAX_EPOCH}): its successor is no int64")
        es = self.es
        amax = float(self._all_reduce(_score_max(es.state.tensor), dist.ReduceOp.MAX))
        tau = _threshold(amax, self._all_reduce(_fixed_point(es.state.tensor, amax), dist.ReduceOp.SUM).tolist())
        kept, scale = shard_prune_plan(
            es.state.tensor, es.lo, es.rank, tau, self.prune_ratio, self.seed, epoch, self.num_epochs,
            self.anneal_frac, self.rescale,
        )  # fmt: skip
        return self._plan_of(self.seed, epoch, scale, kept=kept)

    def _begin(self) -> _Plan:
        self.es.check()  # on every rank together: all raise, or none
        return super()._begin()

    def state_dict(self, position: int | None = None) -> dict:
        """As :meth:`ESWPSampler.state_dict`, for ``torch.distributed.checkpoint``.

        Parameters
        ----------
        position : int or None
            As in :meth:`ESWPSampler.state_dict` (this rank's ids; the same
            on every rank of a loop that trains in step).

        Returns
        -------
        dict
            ``epoch``, ``position``, ``finished`` and the settings as
            :meth:`ESWPSampler.state_dict`; ``plan`` (bool) and ``scale``, the
            plan's scales as a ``Shard(0)`` DTensor ``[N]`` (ones without a
            plan); ``num_replicas``. The plan's ids are recomputed at load.
            No host synchronisation.
        """
        out = super().state_dict(position)
        plan = out.pop("kept") is not None
        scale = out["scale"] if plan else torch.ones(self.es.hi - self.es.lo, device=self.es.device)
        out.update(plan=plan, scale=self.es._sharded(scale), num_replicas=self.es.world_size)
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore on every rank from a :meth:`state_dict` loaded by
        ``torch.distributed.checkpoint``: every rank loads, or every rank raises.

        Parameters
        ----------
        sd : dict
            This sampler's :meth:`state_dict` filled by the load; an epoch in
            progress only from as many ranks.

        Raises
        ------
        ValueError
            Naming the entry, on every rank, before anything is written.

        Notes
        -----
        One or two collectives (the verdict; the plan's length).
        """
        _checks.keys(sd, "state_dict", self.STATE_KEYS)
        cfg = self._settings(sd["num_epochs"], sd["prune_ratio"], sd["anneal_frac"], sd["rescale"], sd["seed"])
        plan = _checks.flag(sd["plan"], "state_dict['plan']")
        epoch = _checks.integer(sd["epoch"], "state_dict['epoch']", 0, MAX_EPOCH + (not plan))
        position = _checks.integer(sd["position"], "state_dict['position']", 0)
        world = _checks.integer(sd["num_replicas"], "state_dict['num_replicas']", 1)
        finished = sd["finished"]
        if finished is not None:
            finished = _checks.integer(finished, "state_dict['finished']", 0)
            if plan:
                raise ValueError("state_dict['finished'] must be None with a plan")
        if not plan and position != 0:
            raise ValueError(f"state_dict['position'] must be 0 without a plan, got {position}")
        if plan and world != self.es.world_size:
            raise ValueError(
                f"state_dict['num_replicas'] is {world}: the epoch in progress was planned on {world} rank(s) "
                f"and cannot continue on {self.es.world_size} (each rank's visit order is its own); "
                "checkpoint at an epoch boundary to change the number of ranks"
            )
        scale = self.es._local(sd["scale"], "state_dict['scale']", torch.float32)
        bad = not bool((torch.isfinite(scale) & (scale >= 0)).all())
        self.es._agree_valid("state_dict['scale'] must be finite and >= 0" if bad else None)
        restored = None
        if plan:
            restored = self._plan_of(cfg["seed"], epoch, scale.detach().to(self.es.device, copy=True), position)
            if position >= len(restored):  # L is the same on every rank: all raise alike
                raise ValueError(
                    f"state_dict['position'] must be < {len(restored)}, the epoch's length, got {position}"
                )
        self._write_state((cfg, epoch, restored, finished))
