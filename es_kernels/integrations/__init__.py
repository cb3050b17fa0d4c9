"""Framework integrations: the pieces shared by the Hugging Face Trainer
(:mod:`es_kernels.integrations.transformers`) and Lightning
(:mod:`es_kernels.integrations.lightning`) integrations. Neither framework is
imported here.

* :class:`ESStream`: the training sampler. It concatenates ESWP epochs into a
  stream and cuts it into *loader epochs* of a fixed length (the unpruned
  dataset size), so a framework's ``len(train_dataloader)``, ``max_steps`` and
  LR schedule are what actually runs; it yields ``(id, scale)`` keys so each
  sample carries the ESWP scale of the plan it was drawn from (prefetching
  across a plan boundary cannot mix scales up); its ``state_dict`` makes a
  resume exact (the plans made since the loader epoch started are kept).
* :class:`ESDataset` / :class:`ESCollator`: carry the id and scale of each
  sample through a collator as ``es_id`` / ``es_scale``.
* :func:`select_batch`: the selection step on a collated batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from .. import _checks
from ..sampler import MAX_EPOCH, ESWPSampler, EvolvedSampler, cat_ids, saved_ids, saved_scales

ID_KEY = "es_id"
SCALE_KEY = "es_scale"
PICKS_KEY = "es_picks"  # the picks' ids after a selection from the state: observe their training losses


class ESItem(NamedTuple):
    """One sample with its dataset id and ESWP scale (``None``: 1). Not a dict,
    so column-removing collators (the HF Trainer's ``RemoveColumnsCollator``)
    pass it through untouched."""

    id: int
    scale: float | None
    item: Any


class ESDataset(Dataset):
    """``dataset[key]`` as :class:`ESItem`; ``key`` is an index or the
    ``(index, scale)`` pair that :class:`ESStream` yields.

    Parameters
    ----------
    dataset : Dataset
        Any map-style dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__

    def __getitem__(self, key) -> ESItem:
        if isinstance(key, tuple):
            i, scale = key
        else:
            i, scale = key, None
        i = int(i)
        return ESItem(i, scale, self.dataset[i])


class ESCollator:
    """Collates :class:`ESItem` features: the wrapped ``collate_fn`` gets the
    items (after ``keep_keys`` filtered dict items), and the batch gets
    ``es_id`` (int64 ``[B]``) and ``es_scale`` (float32 ``[B]``).

    A dict batch gets the two keys; any other batch becomes
    ``{"es_id", "es_scale", "batch": batch}``. Features that are not
    :class:`ESItem` (evaluation) go to ``collate_fn`` unchanged.

    Parameters
    ----------
    collate_fn : callable or None
        The collate function of the items (``None``: ``default_collate``).
    keep_keys : iterable of str or None
        Keep only these keys of dict items (``None``: all).
    """

    def __init__(self, collate_fn: Callable | None = None, keep_keys: Iterable[str] | None = None) -> None:
        if collate_fn is None:
            from torch.utils.data import default_collate

            collate_fn = default_collate
        self.collate_fn = collate_fn
        self.keep_keys = None if keep_keys is None else frozenset(keep_keys)

    def __call__(self, features):
        if not features or not isinstance(features[0], ESItem):
            return self.collate_fn(features)
        ids = torch.tensor([f.id for f in features], dtype=torch.int64)
        scales = torch.tensor([1.0 if f.scale is None else f.scale for f in features], dtype=torch.float32)
        items = [f.item for f in features]
        if self.keep_keys is not None:
            items = [{k: v for k, v in x.items() if k in self.keep_keys} if isinstance(x, dict) else x for x in items]
        batch = self.collate_fn(items)
        if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__setitem__")):
            batch = dict(batch)
            batch[ID_KEY], batch[SCALE_KEY] = ids, scales
            return batch
        return {ID_KEY: ids, SCALE_KEY: scales, "batch": batch}


def take(data: Any, positions: torch.Tensor, size: int) -> Any:
    """The rows ``positions`` of a batch.

    Parameters
    ----------
    data : Tensor, dict, list, tuple or any
        A batch; dicts, lists and tuples (named ones too) are walked.
    positions : Tensor
        int64 ``[b]`` rows to keep (moved to each tensor's device).
    size : int
        The batch size ``B``: only tensors whose first dimension is ``size`` are indexed.

    Returns
    -------
    The same structure with those tensors indexed, other values kept. No
    host synchronisation.
    """
    if isinstance(data, torch.Tensor):
        return data[positions.to(data.device)] if data.dim() >= 1 and data.shape[0] == size else data
    if isinstance(data, dict):
        return {k: take(v, positions, size) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(take(v, positions, size) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(take(v, positions, size) for v in data)
    return data


def select_batch(es: EvolvedSampler, batch: dict, score: Callable[[Any], dict]) -> dict:
    """Score a collated meta-batch and keep the selected rows.

    Parameters
    ----------
    es : EvolvedSampler
    batch : dict
        A batch of :class:`ESCollator`, with ``es_id`` (and ``es_scale``).
    score : callable
        ``score(batch)`` returns the keyword arguments of ``es.select``
        (``{"logits": ..., "targets": ...}`` or ``{"losses": ...}``); it
        should run without autograd.

    Returns
    -------
    dict
        The batch with the ``mini_batch`` selected rows (``es_scale`` of
        those rows, ``es_id`` removed). On a step the sampler's schedule
        does not score (``es.needs_scores`` False) ``score`` is not called:
        the rows are selected from the state, and ``es_picks`` holds their
        ids, whose training losses go to :func:`observe_batch`. No host
        synchronisation beyond ``score``'s.
    """
    batch = dict(batch)
    ids = batch.pop(ID_KEY)
    scales = batch.pop(SCALE_KEY, None)
    from_state = not es.needs_scores
    sel = es.select(ids) if from_state else es.select(ids, **score(batch))
    out = take(batch, sel.positions, ids.shape[0])
    if scales is not None:
        out[SCALE_KEY] = scales.to(sel.positions.device)[sel.positions]
    if from_state:
        out[PICKS_KEY] = ids.to(sel.positions.device)[sel.positions]
    return out


def observe_batch(es: EvolvedSampler, batch: dict, losses: torch.Tensor) -> None:
    """Observe the training losses of rows selected from the state.

    Parameters
    ----------
    es : EvolvedSampler
    batch : dict
        The selected rows from :func:`select_batch`; its ``es_picks`` (if
        any: only after a selection from the state) is removed.
    losses : Tensor
        floating ``[b]``: the rows' per-sample training losses, before the
        ESWP scale and the mean (detached here).

    Returns
    -------
    None
        No host synchronisation.
    """
    picks = batch.pop(PICKS_KEY, None) if isinstance(batch, dict) else None
    if picks is not None:
        es._observe(picks, losses.detach())


class _Plan(NamedTuple):
    epoch: int  # the ESWP epoch
    ids: torch.Tensor  # int64 [kept], in the epoch's order
    scales: torch.Tensor  # float32 [kept]


class ESStream(Sampler):
    """ESWP epochs as one stream, cut into loader epochs of ``length`` samples.

    ``ESStream(pruner)`` with an :class:`ESWPSampler`, or ``ESStream(es=es)``
    for ES alone (then the order of each pass is a seeded shuffle: an
    ``ESWPSampler`` with ``prune_ratio=0``). A loader epoch is ``length``
    samples (default: the dataset size), whatever ESWP pruned: a pruned ESWP
    epoch is followed by the next one inside the same loader epoch, so the
    number of steps a framework plans (``len(loader)``, ``max_steps``, the LR
    schedule) is the number that runs. ESWP saves compute by needing fewer
    loader epochs for the same number of passes over the kept data: choose
    ``max_steps`` / the epoch count for the budget you want; ``pruner.num_epochs``
    (its annealing schedule) counts ESWP epochs.

    Yields ``(id, scale)``: the ESWP scale is taken from the plan the id was
    drawn from (use with :class:`ESDataset`).

    Exact resume: ``state_dict()`` keeps the position where the current loader
    epoch started and every plan made since (the plans depend on the ES state
    at the time they were made, which a resumed run no longer has). Then:

    * ``set_epoch(e)`` before ``iter``: the loader epoch ``e`` is replayed from
      its start (what the HF Trainer needs: it skips the trained batches);
    * with ``resume_mid_epoch=True`` and ``mark_consumed(n)`` called for every
      trained meta-batch of ``n`` samples, the loader epoch in progress at the
      checkpoint continues after its consumed samples (what a Lightning
      stateful loader needs).

    Several processes: every rank holds a replica of the ES state and of this
    stream, and must make each ESWP plan (which depends on the state) at the
    same training step. accelerate's ``BatchSamplerShard`` (rank ``r`` takes
    batches ``r, r + W, ...``) reads each group of ``W`` batches whole before
    yielding its own, so every rank reads the stream at the same steps.

    Parameters
    ----------
    pruner : ESWPSampler or None
        The ESWP epochs to stream.
    es : EvolvedSampler or None
        Without ``pruner``: ES alone (a seeded shuffle per pass).
    length : int >= 1 or None
        Samples per loader epoch (``None``: the dataset size).
    resume_mid_epoch : bool
        Resume inside the loader epoch in progress (with :meth:`mark_consumed`).

    Raises
    ------
    ValueError
        Naming the argument: a missing sampler, ``pruner`` not an
        ``ESWPSampler`` or of another ``es``, ``es`` not an ``EvolvedSampler``,
        ``length`` not an int ``>= 1``, ``resume_mid_epoch`` not a bool.

    Notes
    -----
    Each new ESWP epoch costs :class:`ESWPSampler`'s one host synchronisation.
    """

    def __init__(
        self,
        pruner: ESWPSampler | None = None,
        *,
        es: EvolvedSampler | None = None,
        length: int | None = None,
        resume_mid_epoch: bool = False,
    ) -> None:
        if pruner is not None and not isinstance(pruner, ESWPSampler):
            raise ValueError(f"pruner must be an ESWPSampler or None, got {type(pruner).__name__}")
        if es is not None and not isinstance(es, EvolvedSampler):
            raise ValueError(f"es must be an EvolvedSampler or None, got {type(es).__name__}")
        if pruner is None:
            if es is None:
                raise ValueError("ESStream needs an ESWPSampler or es=EvolvedSampler")
            pruner = ESWPSampler(es, num_epochs=1, prune_ratio=0.0)
        elif es is not None and es is not pruner.es:
            raise ValueError("es must be the pruner's EvolvedSampler")
        self.length = _checks.integer(pruner.es.state.num_samples if length is None else length, "length", 1)
        self.resume_mid_epoch = _checks.flag(resume_mid_epoch, "resume_mid_epoch")
        self.pruner = pruner
        self.es = pruner.es
        self._epoch = 0  # the loader epoch the next iter runs
        self._k: int | None = None  # the loader epoch whose start is the snapshot
        self._plans: list[_Plan] = []  # plans[0]: the plan in force at the snapshot, then every plan since
        self._start = 0  # position in plans[0] at the snapshot
        self._first_eswp = pruner.epoch  # the ESWP epoch of the first plan
        self._consumed = 0  # samples of loader epoch k trained (mark_consumed)
        self._resume_consumed = 0  # consumed to skip at the next iter (resume_mid_epoch)

    # -- plans -----------------------------------------------------------------
    def _new_plan(self) -> None:
        epoch = self._plans[-1].epoch + 1 if self._plans else self._first_eswp
        self.pruner.set_epoch(epoch)
        # the whole plan, also of a DistributedESWPSampler (every rank makes the same one from its
        # replica): the framework's loader shards the batches (accelerate, Lightning), not the plan
        ids = cat_ids(ESWPSampler.chunks(self.pruner))
        scales = self.es.scales_of(ids.to(self.es.device)).to("cpu", torch.float32)
        self._plans.append(_Plan(epoch, ids, scales))

    def _advance(self, pi: int, pos: int, n: int) -> tuple[int, int]:
        """The cursor ``n`` samples after ``(pi, pos)``, making plans as needed."""
        empty = 0
        while True:
            while pi >= len(self._plans):
                self._new_plan()
            size = self._plans[pi].ids.shape[0]
            if n <= size - pos:
                return pi, pos + n
            n -= size - pos
            empty = empty + 1 if size == 0 else 0
            if empty > 1:
                raise RuntimeError("ESWP kept no sample in two epochs in a row")
            pi, pos = pi + 1, 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """The loader epoch the next ``iter`` runs (frameworks call it).

        Parameters
        ----------
        epoch : int >= 0
        """
        self._epoch = _checks.integer(epoch, "epoch", 0)

    @property
    def current_epoch(self) -> int | None:
        """The loader epoch whose iteration started last (None before the first)."""
        return self._k

    def mark_consumed(self, n: int) -> None:
        """``n`` more samples of the current loader epoch were trained.

        Parameters
        ----------
        n : int
            Samples trained, on all ranks together when a loader shards the stream.
        """
        self._consumed += _checks.integer(n, "n", 0)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        e = self._epoch
        if self._k is not None and e < self._k:
            raise ValueError(f"cannot go back to loader epoch {e}: the stream is at epoch {self._k}")
        skip = 0
        if self._k is None:
            pi, pos = 0, 0
        else:
            pi, pos = self._advance(0, self._start, (e - self._k) * self.length)
            if e == self._k and self.resume_mid_epoch:
                skip = self._resume_consumed
        # the snapshot: the start of loader epoch e
        self._plans, self._start, self._k = self._plans[pi:], pos, e
        self._consumed = skip
        self._resume_consumed = 0
        self._epoch = e + 1
        pi, pos = self._advance(0, self._start, skip)
        empty = 0
        for _ in range(self.length - skip):
            while True:
                while pi >= len(self._plans):
                    self._new_plan()
                size = self._plans[pi].ids.shape[0]
                if pos < size:
                    break
                empty = empty + 1 if size == 0 else 0
                if empty > 1:
                    raise RuntimeError("ESWP kept no sample in two epochs in a row")
                pi, pos = pi + 1, 0
            plan = self._plans[pi]
            yield int(plan.ids[pos]), float(plan.scales[pos])
            pos += 1

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position and the pruner's state.

        Returns
        -------
        dict
            The snapshot of the current loader epoch's start, the plans made
            since, the samples consumed, and ``pruner.state_dict()``.
        """
        return {
            "epoch": self._epoch,
            "k": self._k,
            "start": self._start,
            "first_eswp": self._first_eswp,
            "consumed": self._consumed,
            "length": self.length,
            "plans": [(p.epoch, p.ids.clone(), p.scales.clone()) for p in self._plans],
            "pruner": self.pruner.state_dict(),
        }

    STATE_KEYS = ("epoch", "k", "start", "first_eswp", "consumed", "length", "plans", "pruner")

    def load_state_dict(self, sd: dict) -> None:
        """Restore from :meth:`state_dict` (with the pruner's state): all or nothing.

        Parameters
        ----------
        sd : dict

        Raises
        ------
        ValueError
            Naming the bad entry (a missing or unexpected key, a loader epoch
            length other than this stream's, an epoch or position out of
            range, a plan id outside ``[0, N)``, the pruner's state); nothing
            is written on failure.
        """
        self._write_state(self._validated_state(sd))

    def _validated_state(self, sd: dict, name: str = "state_dict") -> tuple:
        """Validate a :meth:`state_dict` without writing anything (the pruner's
        state too); :meth:`_write_state` then loads the result."""
        _checks.keys(sd, name, self.STATE_KEYS)
        length = _checks.integer(sd["length"], f"{name}['length']", 1)
        if length != self.length:
            raise ValueError(f"{name}['length']: loader epochs of {length} samples, not {self.length}")
        epoch = _checks.integer(sd["epoch"], f"{name}['epoch']", 0)
        k = None if sd["k"] is None else _checks.integer(sd["k"], f"{name}['k']", 0)
        start = _checks.integer(sd["start"], f"{name}['start']", 0)
        first_eswp = _checks.integer(sd["first_eswp"], f"{name}['first_eswp']", 0, MAX_EPOCH + 1)  # a pruner.epoch
        consumed = _checks.integer(sd["consumed"], f"{name}['consumed']", 0)
        saved = sd["plans"]
        if not isinstance(saved, (list, tuple)):
            raise ValueError(f"{name}['plans'] must be a list, got {type(saved).__name__}")
        n = self.es.state.num_samples
        plans: list[_Plan] = []
        for j, p in enumerate(saved):
            at = f"{name}['plans'][{j}]"
            if not isinstance(p, (list, tuple)) or len(p) != 3:
                raise ValueError(f"{at} must be an (epoch, ids, scales) triple")
            e = _checks.integer(p[0], f"{at}[0]", 0, MAX_EPOCH)
            if plans and e != plans[-1].epoch + 1:
                raise ValueError(
                    f"{at}[0] must be {plans[-1].epoch + 1} (the plans' epochs follow each other), got {e}"
                )
            ids = saved_ids(p[1], f"{at}[1]", n)
            plans.append(_Plan(e, ids, saved_scales(p[2], f"{at}[2]", ids.shape[0]).to("cpu")))
        if k is None and (plans or start):
            raise ValueError(f"{name}['plans'] must be empty and {name}['start'] 0 when {name}['k'] is None")
        if k is not None:
            if not plans:
                raise ValueError(f"{name}['plans'] must hold the plan of loader epoch {name}['k'] = {k}")
            if start > plans[0].ids.shape[0]:
                raise ValueError(
                    f"{name}['start'] must be in [0, {plans[0].ids.shape[0]}] (the ids of its plan), got {start}"
                )
        pruner = self.pruner._validated_state(sd["pruner"], f"{name}['pruner']")
        return epoch, k, start, first_eswp, consumed, plans, pruner

    def _write_state(self, valid: tuple) -> None:
        """Load what :meth:`_validated_state` returned (never raises)."""
        epoch, k, start, first_eswp, consumed, plans, pruner = valid
        self.pruner._write_state(pruner)
        self._epoch, self._k, self._start, self._first_eswp = epoch, k, start, first_eswp
        self._plans = plans
        self._consumed = self._resume_consumed = consumed
        if k is not None and self.resume_mid_epoch and consumed < self.length:
            self._epoch = k  # continue the loader epoch in progress


__all__ = [
    "ESCollator",
    "ESDataset",
    "ESItem",
    "ESStream",
    "ID_KEY",
    "PICKS_KEY",
    "SCALE_KEY",
    "observe_batch",
    "select_batch",
    "take",
]
