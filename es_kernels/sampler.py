"""The bundled samplers: what a training loop uses.

* :class:`EvolvedSampler` (ES): owns the per-sample state; ``select`` runs the
  fused step on a meta-batch and returns the positions to train on with their
  loss scales.
* :class:`ESWPSampler` (ESWP): a ``torch.utils.data.Sampler`` that prunes
  well-learned samples at the start of each epoch and yields the kept ids.
* :class:`IndexedDataset`: wraps a dataset so that items come with their index.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from . import _checks, _spec
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
)
from .functional import STEP_SETTINGS, es_select_from_state, es_step, es_step_from_losses, es_update, eswp_prune
from .lm import DEFAULT_WORKSPACE_BYTES, es_step_from_hidden
from .schedule import ScoringSchedule
from .state import ESState


class Selection(NamedTuple):
    """What :meth:`EvolvedSampler.select` returns, on the state's device.

    Attributes
    ----------
    positions : Tensor
        int64 ``[b]``: ascending positions into the meta-batch, the rows to train on.
    scales : Tensor
        float32 ``[b]``: the loss scale of each selected sample (ESWP's
        ``1 / (1 - prune_ratio)`` where it pruned), else 1.
    losses : Tensor or None
        float32 ``[B]``: per-sample losses of the meta-batch (None on a step
        that selected from the state: nothing was scored).
    weights : Tensor
        float32 ``[B]``: the ES weights the selection used (from the state:
        ``+inf`` for a priority, 0 for a capped id; docs/spec.md section 12).
    """

    positions: torch.Tensor  # int64 [b]: ascending positions into the meta-batch
    scales: torch.Tensor  # float32 [b]: loss scale of each selected sample (ESWP), else 1
    losses: torch.Tensor | None  # float32 [B]: per-sample losses of the meta-batch (None: from the state)
    weights: torch.Tensor  # float32 [B]: the ES weights the selection used


class EvolvedSampler:
    """Evolved Sampling: picks ``mini_batch`` of each meta-batch by loss history.

    ``select(ids, logits=..., targets=...)`` (or ``losses=...``) updates the
    state of ``ids`` and returns a :class:`Selection`: one fused op, no host
    round-trip on a GPU. The step counter is a 0-d int64 tensor on the
    state's device that the op advances by one per call, so a captured CUDA
    graph draws fresh noise each replay and ``torch.compile`` does not
    specialise on it. With ``seed`` it fixes the noise: a resumed run draws
    exactly what an uninterrupted one would.

    Parameters
    ----------
    num_samples : int
        Dataset size ``N``; ids are in ``[0, N)``.
    mini_batch : int >= 1
        ``b``, the samples trained on per meta-batch (fewer if a meta-batch is shorter).
    beta1, beta2, lam, select_mode, eps, w_min
        As in :func:`es_kernels.es_step`.
    seed : int in [0, 2**63)
        The noise of the selections: step ``k`` (the ``k``-th call of
        :meth:`select`) draws from ``(seed, k)``, so a run is reproducible
        and a resumed one draws what the uninterrupted one would.
    device : torch.device, str or None
        The state's device (``None``: the CPU); meta-batches are moved there.
    schedule : ScoringSchedule, str or None
        Which steps score their meta-batch (docs/spec.md section 12): ``None``
        or ``"step"`` every step (the default); ``"epoch:3"``,
        ``"fraction:0.25"``, ``"stale:500"`` (``",cap=C"``) or a
        :class:`ScoringSchedule` select from the state on the other steps:
        check :attr:`needs_scores` before the scoring forward, call
        ``select(ids)`` without scores when it is False, and
        :meth:`observe` the picks' training losses.

    Raises
    ------
    ValueError
        Naming the setting, for a bad value.

    Attributes
    ----------
    scale : Tensor or None
        float32 ``[N]`` on the state's device: the loss scale in force, that of
        the epoch being trained (set by :class:`ESWPSampler` when an epoch's
        iteration starts), or ``None`` (every scale 1).

    Notes
    -----
    :meth:`select` makes no host synchronisation; :attr:`step`,
    :meth:`set_epoch`, :meth:`state_dict` and :meth:`load_state_dict` read
    device values (once each).
    """

    SETTINGS: tuple[str, ...] = (
        "mini_batch",
        "beta1",
        "beta2",
        "lam",
        "select_mode",
        "eps",
        "seed",
        "w_min",
        "schedule",
    )
    STATE_KEYS: tuple[str, ...] = ("state", "step", "epoch", "scale", "counters") + SETTINGS
    COUNTER_KEYS: tuple[str, ...] = ("last_seen", "picks")

    # the settings (SETTINGS), validated: set by _configure
    mini_batch: int
    beta1: float
    beta2: float
    lam: float
    select_mode: str
    eps: float
    seed: int
    w_min: float
    schedule: ScoringSchedule

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
    ) -> None:
        cfg = self._validate({k: v for k, v in locals().items() if k in self.SETTINGS})
        self.state = ESState(num_samples, device=device)
        self._counters: torch.Tensor | None = None  # int64 [2, N + 1]: last_seen, picks (+ a spare slot)
        self._configure(cfg)
        self._step = torch.zeros((), dtype=torch.int64, device=self.state.device)
        self._host_step = 0  # the step counter's value, kept on the host (the schedule's decisions)
        self._scored_last = True  # the last select scored: observe() has nothing to do
        self.epoch = 0
        self._scale: torch.Tensor | None = None

    @staticmethod
    def _validate(cfg: dict) -> dict:
        _checks.integer(cfg["mini_batch"], "mini_batch", 1)
        _checks.integer(cfg["seed"], "seed", 0)  # a host int here (the op also takes a tensor)
        _checks.hyper(cfg["beta1"], cfg["beta2"], cfg["lam"], cfg["w_min"])
        _checks.selection(0, 0, cfg["select_mode"], cfg["seed"], 0, cfg["eps"], None)
        schedule = ScoringSchedule.parse(cfg["schedule"])
        return dict(
            schedule=schedule,
            mini_batch=int(cfg["mini_batch"]),
            beta1=float(cfg["beta1"]),
            beta2=float(cfg["beta2"]),
            lam=float(cfg["lam"]),
            select_mode=str(cfg["select_mode"]),
            eps=float(cfg["eps"]),
            seed=int(cfg["seed"]),
            w_min=float(cfg["w_min"]),
        )

    def _configure(self, cfg: dict) -> None:
        for k, v in cfg.items():
            setattr(self, k, v)
        if not self.schedule.selects_from_state:
            self._counters = None
        elif self._counters is None:  # last_seen 0, picks 0 (an unobserved id is a priority anyway)
            self._counters = torch.zeros((2, self.state.num_samples + 1), dtype=torch.int64, device=self.device)

    @property
    def needs_scores(self) -> bool:
        """Whether the next :meth:`select` needs the meta-batch's scores
        (logits, hidden states or losses): the schedule's decision for the
        next step, from host counters (no synchronisation). Always True
        without a schedule."""
        return self.schedule.scores(self._host_step, self.epoch)

    @property
    def device(self) -> torch.device:
        """The state's device."""
        return self.state.device

    @property
    def step(self) -> int:
        """Calls of :meth:`select` so far (reads the device counter: one synchronisation)."""
        return int(self._step)

    @property
    def step_tensor(self) -> torch.Tensor:
        """The device step counter (0-d int64) that :meth:`select` advances."""
        return self._step

    @property
    def scale(self) -> torch.Tensor | None:
        """The per-sample loss scale in force (float32 ``[N]`` on the state's
        device), or ``None``; setting it checks dtype, device, length and
        values (finite, ``>= 0``: one host read)."""
        return self._scale

    @scale.setter
    def scale(self, value: torch.Tensor | None) -> None:
        if value is not None:
            _checks.tensor(value, "scale", dim=1, dtypes=(torch.float32,), device=self.device)
            if value.shape[0] != self.state.num_samples:
                raise ValueError(f"scale must have length {self.state.num_samples}, got {value.shape[0]}")
            if not bool((torch.isfinite(value) & (value >= 0)).all()):
                raise ValueError("scale must be finite and >= 0")
        self._scale = value

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
        """Score a meta-batch, update its state, pick ``mini_batch`` of it.

        With a schedule (``schedule=``), on a step that does not score
        (:attr:`needs_scores` False) ``select(ids)`` alone picks from the
        stored state (docs/spec.md section 12); then :meth:`observe` the
        picks' training losses.

        Parameters
        ----------
        ids : Tensor
            int64 / int32 ``[B]`` dataset ids of the meta-batch. An id outside
            ``[0, N)`` is counted in ``state.errors`` (never raises).
        logits, targets : Tensor
            ``[B, C]`` / ``[B]`` or ``[B, T, V]`` / ``[B, T]``, from a forward
            pass without autograd (or give ``losses``, or ``hidden``).
        losses : Tensor
            floating ``[B]`` per-sample losses, any loss.
        hidden, weight, bias : Tensor
            Instead of logits: the last hidden states ``[B, H]`` / ``[B, T, H]``
            and the ``lm_head`` weight ``[V, H]`` (and bias ``[V]``), with
            ``targets``; scored by :func:`es_kernels.per_sample_losses_from_hidden`
            in vocabulary chunks of at most ``workspace_bytes`` of logits.
        ignore_index, label_smoothing : as in :func:`es_kernels.es_step`.
        shift_labels : bool
            Causal LM (Hugging Face labels): score position ``t`` against
            ``targets[:, t + 1]``; give the full logits (or hidden) and labels.
        segment_ids : Tensor
            Packed rows (``ids`` None): int64 / int32 ``[B, T]``, each token's
            document id (in ``[0, N)``; negative: padding). The state is per
            document (a document split over rows is one observation) and the
            rows are selected by the token-weighted mean of their documents'
            weights (docs/spec.md section 6.1); ``losses`` are then token
            losses ``[B, T]``, and ``scales`` is float32 ``[b, T]``, the scale
            of each selected token's document (1 for padding).

        Returns
        -------
        Selection
            ``positions`` int64 ``[b]`` ascending into the meta-batch,
            ``scales`` float32 ``[b]`` (ESWP's loss scale, else 1), ``losses``
            and ``weights`` float32 ``[B]``. No host synchronisation.

        Raises
        ------
        ValueError
            naming the argument (docs/spec.md section 8), before anything is written.
        """
        given = [name for name, x in (("logits", logits), ("losses", losses), ("hidden", hidden)) if x is not None]
        if not given and segment_ids is None and self.schedule.selects_from_state:
            if self.needs_scores:
                raise ValueError(
                    f"this step scores its meta-batch (schedule {self.schedule}): select takes logits "
                    "(with targets), hidden or losses; check needs_scores before the scoring forward"
                )
            return self._select_from_state(ids)
        if len(given) != 1:
            raise ValueError(
                "select takes either logits (with targets), hidden (with weight and targets) "
                f"or losses, exactly one; got {given or 'none'}"
            )
        if logits is not None and targets is None:
            raise ValueError("targets must be given with logits")
        if hidden is not None and (weight is None or targets is None):
            raise ValueError("weight and targets must be given with hidden")
        if hidden is None and (weight is not None or bias is not None):
            raise ValueError("weight and bias go with hidden")
        packed = segment_ids is not None
        if segment_ids is not None:
            if ids is not None:
                raise ValueError("ids must be None when segment_ids are given (they hold the documents' ids)")
            segment_ids = _checks.tensor(segment_ids, "segment_ids", dim=2, dtypes=_checks.INDEX_DTYPES)
            ids = segment_ids = segment_ids.to(self.device, non_blocking=True)
        else:
            ids = _checks.tensor(ids, "ids", dim=1)  # the dtype: the step's check
            ids = ids.to(self.device, non_blocking=True)
        scoring = dict(
            logits=logits,
            targets=targets,
            losses=losses,
            hidden=hidden,
            weight=weight,
            bias=bias,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            shift_labels=shift_labels,
            workspace_bytes=workspace_bytes,
        )
        return self._scoring_step(ids, packed, scoring)

    def _step_settings(self) -> dict:
        """The step settings: this sampler's values and its device step counter, advanced by the step."""
        return dict(
            step=self._step, advance_step=True, **{k: getattr(self, k) for k in self.SETTINGS if k in STEP_SETTINGS}
        )

    def _scoring_step(self, ids: torch.Tensor, packed: bool, scoring: dict) -> Selection:
        """The scoring step of :meth:`select` once its arguments are checked: ``ids``
        on the device (``segment_ids`` when ``packed``), ``scoring`` the scores'
        keyword arguments (``logits``, ``targets``, ``losses``, ``hidden``, ...)."""
        sc = scoring
        segment_ids = ids if packed else None
        b = min(self.mini_batch, ids.shape[0])  # the last meta-batch of an epoch may be short
        row_ids = None if packed else ids  # the step's ids argument (None: the documents are in segment_ids)
        kw = self._step_settings()
        ce = {k: sc[k] for k in ("ignore_index", "label_smoothing", "shift_labels")}
        if sc["losses"] is not None:
            res = es_step_from_losses(sc["losses"], row_ids, self.state, b, segment_ids=segment_ids, **kw)
        elif sc["hidden"] is not None:
            res = es_step_from_hidden(
                sc["hidden"],
                sc["weight"],
                sc["targets"],
                row_ids,
                self.state,
                b,
                segment_ids=segment_ids,
                bias=sc["bias"],
                workspace_bytes=sc["workspace_bytes"],
                **ce,
                **kw,
            )
        else:
            res = es_step(sc["logits"], sc["targets"], row_ids, self.state, b, segment_ids=segment_ids, **ce, **kw)
        self._refresh(ids)
        return Selection(res.positions, self.scales_of(ids[res.positions]), res.losses, res.weights)

    def _slot(self, ids: torch.Tensor) -> torch.Tensor:
        """Indices into the counters: the id, or the spare slot N for an id out of range."""
        n = self.state.num_samples
        return torch.where((ids >= 0) & (ids < n), ids, n).long()

    def _refresh(self, ids: torch.Tensor) -> None:
        """After a scoring step (section 12.3): its ids were observed now, and refreshed."""
        self._host_step += 1
        self._scored_last = True
        if self._counters is not None:
            slot = self._slot(ids.reshape(-1))
            self._counters[0, slot] = self._host_step - 1
            self._counters[1, slot] = 0

    def _select_from_state(self, ids) -> Selection:
        """A step without scores: es_select_from_state over the ids, then the picks' counters."""
        ids = self._batch_ids(ids)
        n, sch, counters = self.state.num_samples, self.schedule, self._counters
        assert counters is not None  # kept while the schedule selects from the state
        pos, w = es_select_from_state(
            ids,
            self.state,
            min(self.mini_batch, ids.shape[0]),
            lam=self.lam,
            w_min=self.w_min,
            select_mode=self.select_mode,
            seed=self.seed,
            step=self._step,
            advance_step=True,
            eps=self.eps,
            last_seen=counters[0, :n],
            max_age=sch.max_age,
            picks=counters[1, :n],
            cap=sch.cap,
        )
        slot = self._slot(ids[pos])
        picks = counters[1]
        picks[slot] = torch.where(w[pos] == float("inf"), 0, picks[slot] + 1)  # a priority pick refreshes
        self._host_step += 1
        self._scored_last = False
        return Selection(pos, self.scales_of(ids[pos]), None, w)

    def _batch_ids(self, ids) -> torch.Tensor:
        _checks.tensor(ids, "ids", dim=1, dtypes=_checks.INDEX_DTYPES)
        return ids.to(self.device, non_blocking=True)

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor | None:
        """Observe the training pass's per-sample losses of the picks
        (docs/spec.md section 12.1), after a step that selected from the state.

        Parameters
        ----------
        ids : Tensor
            int64 / int32 ``[b]``: the picks' ids, ``ids[selection.positions]``.
        losses : Tensor
            floating ``[b]``: their per-sample training losses, before the
            ESWP scale and the mean (detached here).

        Returns
        -------
        Tensor or None
            float32 ``[b]`` weights after the update; None when the last
            :meth:`select` scored, whose picks were just observed by the
            scoring pass (a second observation would count them twice): the
            loop may call it on every step, once.

        Raises
        ------
        ValueError
            Naming the argument, before anything is written.

        Notes
        -----
        No host synchronisation.
        """
        if self._scored_last:
            return None
        return self._observe(ids, losses)

    def _observe(self, ids, losses) -> torch.Tensor:
        """observe() without the check of the last step (for an integration
        that knows which of its meta-batches selected from the state)."""
        ids = self._batch_ids(ids)
        if not isinstance(losses, torch.Tensor):
            raise ValueError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
        w = es_update(
            ids,
            losses.detach().to(self.device, non_blocking=True),
            self.state,
            self.beta1,
            self.beta2,
            lam=self.lam,
            w_min=self.w_min,
        )
        if self._counters is not None:
            self._counters[0, self._slot(ids)] = self._host_step - 1
        return w

    def scales_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The loss scale of each id.

        Parameters
        ----------
        ids : Tensor
            int64 sample ids of any shape, on the state's device.

        Returns
        -------
        Tensor
            float32, the shape of ``ids``: the scale in force (ESWP's rescale
            where it pruned), 1 where none is in force or the id is out of
            range. No host synchronisation.
        """
        n = self.state.num_samples
        if self._scale is None or n == 0:
            return torch.ones(ids.shape, dtype=torch.float32, device=self.device)
        inside = (ids >= 0) & (ids < n)
        return torch.where(inside, self._scale[ids.clamp(0, n - 1)], 1.0)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``.

        Parameters
        ----------
        epoch : int >= 0

        Raises
        ------
        RuntimeError
            From :meth:`ESState.check`, when bad values were counted.

        Notes
        -----
        Checks the state once (one synchronisation).
        """
        epoch = _checks.integer(epoch, "epoch", 0)
        self.state.check()
        self.epoch = epoch

    def state_dict(self) -> dict:
        """Everything a resume needs.

        Returns
        -------
        dict
            The state, step, epoch, settings and the scale in force (taken
            mid-epoch, with :meth:`ESWPSampler.state_dict` at the same point,
            the resumed run continues the epoch bit for bit).

        Raises
        ------
        RuntimeError
            When the state counted errors (:meth:`ESState.check`).

        Notes
        -----
        Checks the state and reads the step (host synchronisations).
        """
        self.state.check()
        out = {
            "state": self.state.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "scale": None if self._scale is None else self._scale.clone(),
        }
        out.update({k: getattr(self, k) for k in self.SETTINGS})
        out["schedule"] = str(self.schedule)
        n = self.state.num_samples
        out["counters"] = (
            None
            if self._counters is None
            else {k: self._counters[i, :n].clone() for i, k in enumerate(self.COUNTER_KEYS)}
        )
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore from :meth:`state_dict`: all or nothing.

        Parameters
        ----------
        sd : dict
            As :meth:`state_dict` returns it.

        Raises
        ------
        ValueError
            Naming the entry; every entry (keys, types, shapes, dtypes,
            values) is validated first and nothing is written on failure.

        Notes
        -----
        Reads the saved values to validate them (one synchronisation on a GPU).
        """
        if isinstance(sd, dict) and "schedule" not in sd and "counters" not in sd:
            sd = dict(sd, schedule="step", counters=None)  # saved before the scoring schedule existed
        _checks.keys(sd, "state_dict", self.STATE_KEYS)
        cfg = self._validate({k: sd[k] for k in self.SETTINGS})
        step = _checks.integer(sd["step"], "state_dict['step']", 0)
        epoch = _checks.integer(sd["epoch"], "state_dict['epoch']", 0)
        scale = sd["scale"]
        if scale is not None:
            scale = saved_scales(scale, "state_dict['scale']", self.state.num_samples)
        s, d, errors = self.state.validate_state_dict(sd["state"], "state_dict['state']")
        counters = self._validate_counters(sd["counters"], cfg["schedule"])
        # everything is valid: write
        self.state._load_validated(s, d, errors)
        self._configure(cfg)
        if counters is not None and self._counters is not None:  # (_configure made them for the schedule)
            self._counters[:, :-1].copy_(counters)
        self._step.fill_(step)
        self._host_step = step
        self._scored_last = True
        self.epoch = epoch
        self._scale = None if scale is None else scale.to(self.device)

    def _validate_counters(self, counters, schedule: ScoringSchedule) -> torch.Tensor | None:
        """The saved counters (int64 [2, N] on the state's device), or None; nothing written."""
        if not schedule.selects_from_state:
            if counters is not None:
                raise ValueError("state_dict['counters'] must be None with the schedule 'step'")
            return None
        _checks.keys(counters, "state_dict['counters']", self.COUNTER_KEYS)
        out = []
        for k in self.COUNTER_KEYS:
            _checks.saved(counters[k], f"state_dict['counters']['{k}']", torch.int64, self.state.num_samples)
            out.append(counters[k].detach().to(self.device))
        if bool((out[1] < 0).any()):
            raise ValueError("state_dict['counters']['picks'] must be >= 0")
        return torch.stack(out)


MAX_EPOCH = _spec.INT64_MAX - 1  # the epoch after it is still an int64
CHUNK = 65536  # ids per tensor of ESWPSampler.chunks()


def cat_ids(chunks) -> torch.Tensor:
    """The int64 chunks of ids as one tensor (empty when there are none)."""
    return torch.cat([torch.zeros(0, dtype=torch.int64), *chunks])


class _Plan:
    """One epoch's pass: the kept ids (int64, on the CPU) in order, the scales
    (float32 ``[N]``, on the state's device) and how many ids of the epoch
    have been yielded (``pos``, from the epoch's start: a resumed plan starts
    at its checkpoint's position)."""

    __slots__ = ("epoch", "ids", "scale", "pos")

    def __init__(self, epoch: int, ids: torch.Tensor, scale: torch.Tensor, pos: int = 0):
        self.epoch, self.ids, self.scale, self.pos = epoch, ids, scale, pos

    def __len__(self) -> int:
        return self.ids.shape[0]


class ESWPSampler(Sampler[int]):
    """ES with pruning: at the start of each epoch, samples whose score
    ``s + d`` is below the mean are dropped with probability ``prune_ratio``
    (kept ones get loss scale ``1/(1-prune_ratio)`` when ``rescale``); the last
    ``anneal_frac`` of the epochs prune nothing. Yields the kept ids in a
    random order drawn from ``(seed, epoch)``.

    **The share an epoch drops is not** ``prune_ratio``: it is
    ``prune_ratio`` times the share of samples below the mean score (on
    average; the count is binomial). Samples never scored and samples at or
    above the mean are never dropped. Losses are usually skewed (many small,
    a few large), so more than half of the samples lie below the mean: with
    75% below, ``prune_ratio=0.5`` drops about 37% of the epoch. After
    ``set_epoch(e)``, ``1 - len(sampler) / num_samples`` is the share epoch
    ``e`` drops.

    Use it as a DataLoader's ``sampler`` with an :class:`IndexedDataset`, and
    give the meta-batches to ``es.select``.

    **The plan of an epoch** (kept ids, their order, the scales) is computed
    once, when ``iter()`` starts the epoch, from the state at that moment; the
    scales become ``es.scale`` and stay in force until the next ``iter()``.
    Neither ``len()``, nor a DataLoader's workers reading ahead to the end of
    the epoch, changes them. ``epoch`` is the epoch the next ``iter()`` runs:
    starting epoch ``e`` sets it to ``e + 1``; ``set_epoch`` sets it.

    ``len()`` is the number of kept ids of the epoch in progress; when no
    iteration is in progress (at first, after ``set_epoch`` or
    ``load_state_dict``) it is that of the next ``iter()``'s plan, which it
    then computes and keeps, so the iteration yields exactly that many (a
    resumed epoch yields those after the checkpoint's position). A loop
    that wants ``len()`` of the new epoch before iterating calls
    ``set_epoch(epoch)`` first (as with ``DistributedSampler``); otherwise,
    between epochs, ``len()`` still reports the epoch just run.

    **Mid-epoch resume.** :meth:`state_dict` records the epoch in progress,
    the position in it (the ids the sampler has yielded, as torchdata's
    ``StatefulDataLoader`` counts for plain samplers) and its plan (kept ids
    and scales: the state has moved since the epoch started, so the plan
    cannot be recomputed); with ``es.state_dict()`` taken at the same point
    (the state and the step) a resumed run's next ``iter()`` yields the rest
    of that epoch, then continues as the uninterrupted run would, bit for
    bit. A plan that ``len()`` computed for the next epoch is saved the same
    way (position 0). The position counts what the sampler *yielded*: a DataLoader draws
    ids ahead of training (``prefetch_factor * num_workers`` batches with
    workers, and the batch in flight), so either save when no ids are
    drawn ahead (``num_workers=0``, after training on the batch), or pass
    ``state_dict(position=n)`` with ``n`` the ids of this epoch the loop has
    trained on (``skip`` style: the batches consumed times the batch size).

    Parameters
    ----------
    es : EvolvedSampler
        The sampler whose state scores the samples; the epoch's scales become
        ``es.scale``.
    num_epochs : int >= 1
        The planned number of epochs (for the annealing phase).
    prune_ratio : float in [0, 1)
        Probability of dropping a below-mean sample (the share of the epoch
        dropped is this times the share below the mean).
    anneal_frac : float in [0, 1]
        From epoch ``floor((1 - anneal_frac) * num_epochs)`` on nothing is pruned.
    rescale : bool
        Scale a kept below-mean sample's loss by ``1 / (1 - prune_ratio)``.
    seed : int in [0, 2**63) or None
        The noise of the drops and of the order (``None``: ``es.seed``).

    Raises
    ------
    ValueError
        Naming the setting, for a bad value.

    Notes
    -----
    Starting an epoch (``iter()``, or ``len()`` between epochs) runs
    :func:`es_kernels.eswp_prune` and copies the kept ids to the host (one
    synchronisation per epoch); yielding ids makes none.
    """

    STATE_KEYS: tuple[str, ...] = (
        "epoch",
        "position",
        "kept",
        "scale",
        "finished",
        "seed",
        "num_epochs",
        "prune_ratio",
        "anneal_frac",
        "rescale",
    )

    # the settings, validated: set from _settings
    num_epochs: int
    prune_ratio: float
    anneal_frac: float
    rescale: bool
    seed: int

    def __init__(
        self,
        es: EvolvedSampler,
        num_epochs: int,
        prune_ratio: float = DEFAULT_PRUNE_RATIO,
        anneal_frac: float = DEFAULT_ANNEAL_FRAC,
        rescale: bool = True,
        seed: int | None = None,
    ) -> None:
        if not isinstance(es, EvolvedSampler):
            raise ValueError(f"es must be an EvolvedSampler, got {type(es).__name__}")
        cfg = self._settings(num_epochs, prune_ratio, anneal_frac, rescale, es.seed if seed is None else seed)
        self.es = es
        self.__dict__.update(cfg)
        self.epoch = 0
        self._plan: _Plan | None = None  # the plan whose scales are in force (es.scale)
        self._active = False  # _plan is the epoch in progress (no set_epoch / load since its iter())
        self._next: _Plan | None = None  # the plan the next iter() runs: from len() or a checkpoint
        self._finished: int | None = None  # restored: the length of an epoch that was complete, still reported

    @staticmethod
    def _settings(num_epochs, prune_ratio, anneal_frac, rescale, seed) -> dict:
        """Validate the settings (from the constructor or a state_dict) without writing them."""
        return dict(
            num_epochs=_checks.integer(num_epochs, "num_epochs", 1),
            prune_ratio=_checks.real(prune_ratio, "prune_ratio", 0.0, 1.0, hi_open=True),
            anneal_frac=_checks.real(anneal_frac, "anneal_frac", 0.0, 1.0),
            rescale=_checks.flag(rescale, "rescale"),
            seed=_checks.integer(seed, "seed", 0),
        )

    @property
    def scale(self) -> torch.Tensor | None:
        """The per-sample loss scale in force (float32 ``[N]``): that of the
        epoch being trained (``es.scale``); ``None`` before the first epoch."""
        return self.es.scale

    @property
    def position(self) -> int:
        """Ids of the epoch in progress yielded so far (0 when none is in
        progress; a plan restored from a checkpoint counts from its position)."""
        if self._active and self._plan is not None:
            return self._plan.pos
        return self._next.pos if self._next is not None else 0

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the one the next ``iter()`` runs.

        The scales in force stay until then; an iterator of the epoch in
        progress yields nothing more; a plan computed or restored for another
        epoch is dropped (one for ``epoch`` itself is kept, so a resumed loop
        may call ``set_epoch`` as usual). No host synchronisation.

        Parameters
        ----------
        epoch : int in [0, 2**63 - 1)
        """
        epoch = _checks.integer(epoch, "epoch", 0, MAX_EPOCH)
        if self._next is not None and self._next.epoch != epoch:
            self._next = None
        self.epoch = epoch
        self._active, self._finished = False, None

    def _compute(self, epoch: int) -> _Plan:
        if epoch > MAX_EPOCH:
            raise ValueError(f"epoch {epoch} is past the last epoch ({MAX_EPOCH}): its successor is no int64")
        res = eswp_prune(
            self.es.state,
            self.prune_ratio,
            seed=self.seed,
            epoch=epoch,
            num_epochs=self.num_epochs,
            anneal_frac=self.anneal_frac,
            rescale=self.rescale,
        )
        return _Plan(epoch, res.kept_ids.to("cpu", copy=True), res.scale)  # one host read per epoch

    def __iter__(self) -> Iterator[int]:
        return self._yield(self._begin())

    def chunks(self, size: int = CHUNK) -> Iterator[torch.Tensor]:
        """Start the next epoch as ``iter()`` does and yield its kept ids as
        int64 CPU tensors of at most ``size`` ids, in order (never one Python
        int per id): for a loader that takes index tensors, or to collect the
        epoch with ``torch.cat``. A yielded chunk counts as yielded in
        ``position``; ``set_epoch``, ``load_state_dict`` or a newer ``iter()``
        ends the iterator as they end ``iter()``'s.

        Parameters
        ----------
        size : int >= 1
            The most ids per chunk.

        Returns
        -------
        Iterator[Tensor]
            int64 CPU tensors. Starting the epoch makes the one host
            synchronisation of :class:`ESWPSampler`.
        """
        size = _checks.integer(size, "size", 1)
        return self._yield_chunks(self._begin(), size)

    def epoch_ids(self) -> torch.Tensor:
        """Start the next epoch as ``iter()`` does and return all the ids it yields.

        Returns
        -------
        Tensor
            int64 CPU ``[K]``: :meth:`chunks` concatenated.
        """
        return cat_ids(self.chunks())

    def _begin(self) -> _Plan:
        self.es.state.check()  # the once-an-epoch check: raises before anything changes
        plan = self._next if self._next is not None else self._compute(self.epoch)
        self._next, self._finished = None, None
        self.es._scale = plan.scale  # valid by construction (eswp_prune) or load: no host read
        self.es.epoch = plan.epoch
        self._plan, self._active = plan, True
        self.epoch = plan.epoch + 1
        return plan

    def _live(self, plan: _Plan) -> bool:
        """``plan`` is still the epoch in progress (no set_epoch, load_state_dict or newer iter())."""
        return self._active and self._plan is plan

    def _yield(self, plan: _Plan) -> Iterator[int]:
        while self._live(plan) and plan.pos < len(plan):
            for i in plan.ids[plan.pos : plan.pos + 1024].tolist():  # a Python int per id, 1024 at a time
                if not self._live(plan):
                    return
                plan.pos += 1
                yield i

    def _yield_chunks(self, plan: _Plan, size: int) -> Iterator[torch.Tensor]:
        while self._live(plan) and plan.pos < len(plan):
            chunk = plan.ids[plan.pos : plan.pos + size].clone()
            plan.pos += chunk.shape[0]
            yield chunk

    def __len__(self) -> int:
        if self._active and self._plan is not None:
            plan = self._plan
        elif self._finished is not None and self._next is None:
            return self._finished  # a checkpoint taken when its epoch was complete: as the saved sampler did
        else:
            if self._next is None:
                self._next = self._compute(self.epoch)  # kept: the next iter() runs this plan
            plan = self._next
        return len(plan)

    def state_dict(self, position: int | None = None) -> dict:
        """The settings, and where the epochs stand.

        Parameters
        ----------
        position : int or None
            The ids of the epoch in progress the loop has trained on, from 0
            to the ids yielded (``None``: the ids yielded). Pass it with a
            DataLoader that reads ahead (see the class docstring).

        Returns
        -------
        dict
            ``epoch`` (the epoch in progress, else the next one),
            ``position`` and its plan, ``kept`` (int64 ``[K]`` on the CPU)
            and ``scale`` (float32 ``[N]``); ``None`` for both when no plan
            is in progress or pending, or the epoch is complete (then
            ``position`` is 0). Save it with ``es.state_dict()`` taken at the
            same point. No host synchronisation.
        """
        plan = self._plan if self._active else self._next  # _next: from len() or a checkpoint, not started
        hi = 0 if plan is None else plan.pos
        pos = hi if position is None else _checks.integer(position, "position", 0, hi)
        finished = None
        if plan is not None and pos < len(plan):
            epoch, kept, scale = plan.epoch, plan.ids.clone(), plan.scale.clone()
        else:
            epoch, pos, kept, scale = self.epoch, 0, None, None
            if self._active and plan is not None:  # complete: len() still reports it until the next iter()
                finished = len(plan)
            elif not self._active and self._next is None:
                finished = self._finished
        return {
            "epoch": epoch,
            "position": pos,
            "kept": kept,
            "scale": scale,
            "finished": finished,
            "seed": self.seed,
            "num_epochs": self.num_epochs,
            "prune_ratio": self.prune_ratio,
            "anneal_frac": self.anneal_frac,
            "rescale": self.rescale,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore from :meth:`state_dict`: all or nothing.

        With ``kept``, the next ``iter()`` yields ``kept[position:]`` with
        those scales, then epochs go on from ``epoch + 1``; ``epoch`` is then
        the epoch that ``iter()`` continues.

        Parameters
        ----------
        sd : dict
            The settings and the saved plan, from :meth:`state_dict`.

        Raises
        ------
        ValueError
            Naming the bad entry (settings, epoch, position, plan), before
            anything is written.
        """
        self._write_state(self._validated_state(sd))

    def _validated_state(self, sd: dict, name: str = "state_dict") -> tuple:
        """Validate a :meth:`state_dict` (``name``: how errors call it) without
        writing anything; :meth:`_write_state` then loads the result."""
        _checks.keys(sd, name, self.STATE_KEYS)
        cfg = self._settings(sd["num_epochs"], sd["prune_ratio"], sd["anneal_frac"], sd["rescale"], sd["seed"])
        kept, scale = sd["kept"], sd["scale"]
        # without a plan, epoch is the next one: after the last epoch (MAX_EPOCH) it is MAX_EPOCH + 1
        epoch = _checks.integer(sd["epoch"], f"{name}['epoch']", 0, MAX_EPOCH + (kept is None))
        position = _checks.integer(sd["position"], f"{name}['position']", 0)
        finished = sd["finished"]
        if finished is not None:
            finished = _checks.integer(finished, f"{name}['finished']", 0)
            if kept is not None:
                raise ValueError(f"{name}['finished'] must be None with {name}['kept']")
        plan = None
        if kept is None:
            if position != 0:
                raise ValueError(f"{name}['position'] must be 0 without {name}['kept'], got {position}")
            if scale is not None:
                raise ValueError(f"{name}['scale'] must be None without {name}['kept']")
        else:
            n = self.es.state.num_samples
            ids = saved_ids(kept, f"{name}['kept']", n)
            if position >= ids.shape[0]:
                raise ValueError(f"{name}['position'] must be < len({name}['kept']) = {ids.shape[0]}, got {position}")
            scale = saved_scales(scale, f"{name}['scale']", n)
            plan = _Plan(epoch, ids, scale.to(self.es.device), position)
        return cfg, epoch, plan, finished

    def _write_state(self, valid: tuple) -> None:
        """Load what :meth:`_validated_state` returned (never raises)."""
        cfg, epoch, plan, finished = valid
        self.__dict__.update(cfg)
        self.epoch = epoch
        self._plan, self._active, self._next, self._finished = None, False, plan, finished


def saved_ids(x, name: str, n: int) -> torch.Tensor:
    """A saved plan's ids (``load_state_dict``): an int64 1-D tensor of
    distinct ids in ``[0, n)``; returns a CPU copy. Reads the values."""
    _checks.saved(x, name, torch.int64)
    ids = x.detach().to("cpu", copy=True)
    if bool((ids < 0).any()) or bool((ids >= n).any()):
        raise ValueError(f"{name} holds an id outside [0, {n})")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{name} repeats an id")
    return ids


def saved_scales(x, name: str, length: int) -> torch.Tensor:
    """Saved loss scales (``load_state_dict``): a float32 1-D tensor of
    ``length`` finite values ``>= 0``; returns a copy. Reads the values."""
    _checks.saved(x, name, torch.float32, length)
    if not bool((torch.isfinite(x) & (x >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0")
    return x.detach().clone()


class IndexedDataset(Dataset):
    """``dataset[i]`` as ``(i, *item)``: the ids the samplers need.

    Parameters
    ----------
    dataset : Dataset
        Any map-style dataset; an item that is a tuple is unpacked after the
        index, another item follows it as one element.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; a map-style one has it

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        return (i, *item) if isinstance(item, tuple) else (i, item)
