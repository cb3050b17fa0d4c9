"""The bundled samplers: what a training loop uses.

* :class:`EvolvedSampler` (ES): owns the per-sample state; ``select`` runs the
  fused step on a meta-batch and returns the positions to train on with their
  loss scales.
* :class:`ESWPSampler` (ESWP): a ``torch.utils.data.Sampler`` that prunes
  well-learned samples at the start of each epoch and yields the kept ids.
* :class:`IndexedDataset`: wraps a dataset so that items come with their index.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from . import _checks
from ._spec import DEFAULT_ANNEAL_FRAC, DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_EPS, DEFAULT_LAM, DEFAULT_W_MIN
from .functional import es_step, es_step_from_losses, eswp_prune
from .lm import DEFAULT_WORKSPACE_BYTES, es_step_from_hidden
from .state import ESState


class Selection(NamedTuple):
    positions: torch.Tensor  # int64 [b]: ascending positions into the meta-batch
    scales: torch.Tensor  # float32 [b]: loss scale of each selected sample (ESWP), else 1
    losses: torch.Tensor  # float32 [B]: per-sample losses of the meta-batch
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
    device : the state's device (``None``: the CPU).
    """

    SETTINGS = ("mini_batch", "beta1", "beta2", "lam", "select_mode", "eps", "seed", "w_min")

    def __init__(self, num_samples: int, mini_batch: int, beta1: float = DEFAULT_BETA1,
                 beta2: float = DEFAULT_BETA2, select_mode: str = "sample", seed: int = 0, device=None,
                 w_min: float = DEFAULT_W_MIN, *, lam: float = DEFAULT_LAM, eps: float = DEFAULT_EPS):
        self.state = ESState(num_samples, device=device)
        self._configure(dict(mini_batch=mini_batch, beta1=beta1, beta2=beta2, lam=lam,
                             select_mode=select_mode, eps=eps, seed=seed, w_min=w_min))
        self._step = torch.zeros((), dtype=torch.int64, device=self.state.device)
        self.epoch = 0
        self.scale: torch.Tensor | None = None  # per-sample loss scale, set by ESWPSampler

    @staticmethod
    def _validate(cfg: dict) -> dict:
        _checks.integer(cfg["mini_batch"], "mini_batch", 1)
        _checks.hyper(cfg["beta1"], cfg["beta2"], cfg["lam"], cfg["w_min"])
        _checks.selection(0, 0, cfg["select_mode"], cfg["seed"], 0, cfg["eps"], None)
        return dict(mini_batch=int(cfg["mini_batch"]), beta1=float(cfg["beta1"]), beta2=float(cfg["beta2"]),
                    lam=float(cfg["lam"]), select_mode=cfg["select_mode"], eps=float(cfg["eps"]),
                    seed=int(cfg["seed"]), w_min=float(cfg["w_min"]))

    def _configure(self, cfg: dict) -> None:
        for k, v in self._validate(cfg).items():
            setattr(self, k, v)

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def step(self) -> int:
        """Calls of :meth:`select` so far (reads the device counter: one synchronisation)."""
        return int(self._step)

    @property
    def step_tensor(self) -> torch.Tensor:
        """The device step counter (0-d int64) that :meth:`select` advances."""
        return self._step

    def select(self, ids, logits=None, targets=None, losses=None, *, ignore_index: int = -100,
               label_smoothing: float = 0.0, shift_labels: bool = False, hidden=None, weight=None, bias=None,
               workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> Selection:
        """Score a meta-batch, update its state, pick ``mini_batch`` of it.

        Parameters
        ----------
        ids : Tensor
            int64 / int32 ``[B]`` dataset ids of the meta-batch.
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

        Returns
        -------
        Selection
            ``positions`` int64 ``[b]`` ascending into the meta-batch,
            ``scales`` float32 ``[b]`` (ESWP's loss scale, else 1), ``losses``
            and ``weights`` float32 ``[B]``. No host synchronisation.
        """
        given = [name for name, x in (("logits", logits), ("losses", losses), ("hidden", hidden)) if x is not None]
        if len(given) != 1:
            raise ValueError("select takes either logits (with targets), hidden (with weight and targets) "
                             f"or losses, exactly one; got {given or 'none'}")
        if logits is not None and targets is None:
            raise ValueError("targets must be given with logits")
        if hidden is not None and (weight is None or targets is None):
            raise ValueError("weight and targets must be given with hidden")
        if hidden is None and (weight is not None or bias is not None):
            raise ValueError("weight and bias go with hidden")
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dim() != 1:
            raise ValueError(f"ids must have 1 dimensions, got shape {tuple(ids.shape)}")
        if ids.device.type == "meta":
            raise ValueError("ids is a meta tensor: it holds no values")
        ids = ids.to(self.device, non_blocking=True)
        b = min(self.mini_batch, ids.shape[0])  # the last meta-batch of an epoch may be short
        kw = dict(beta1=self.beta1, beta2=self.beta2, lam=self.lam, select_mode=self.select_mode, eps=self.eps,
                  seed=self.seed, step=self._step, advance_step=True, w_min=self.w_min)
        if losses is not None:
            res = es_step_from_losses(losses, ids, self.state, b, **kw)
        elif hidden is not None:
            res = es_step_from_hidden(hidden, weight, targets, ids, self.state, b, bias=bias,
                                      ignore_index=ignore_index, label_smoothing=label_smoothing,
                                      shift_labels=shift_labels, workspace_bytes=workspace_bytes, **kw)
        else:
            res = es_step(logits, targets, ids, self.state, b, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, shift_labels=shift_labels, **kw)
        return Selection(res.positions, self.scales_of(ids[res.positions]), res.losses, res.weights)

    def scales_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Loss scale of each id: ESWP's rescale where it pruned, else 1."""
        if self.scale is None:
            return torch.ones(ids.shape[0], dtype=torch.float32, device=self.device)
        n = self.state.num_samples
        inside = (ids >= 0) & (ids < n)
        return torch.where(inside, self.scale[ids.clamp(0, max(n - 1, 0))], 1.0)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: checks the state once (raises on bad values seen)."""
        epoch = _checks.integer(epoch, "epoch", 0)
        self.state.check()
        self.epoch = epoch

    def state_dict(self) -> dict:
        """Everything a resume needs: the state, step, epoch, settings and the
        current ESWP scale. Checks the state first (one synchronisation)."""
        self.state.check()
        out = {"state": self.state.state_dict(), "step": self.step, "epoch": self.epoch,
               "scale": None if self.scale is None else self.scale.clone()}
        out.update({k: getattr(self, k) for k in self.SETTINGS})
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Restore from :meth:`state_dict`: all or nothing (every entry is
        validated before anything is written)."""
        if not isinstance(sd, dict):
            raise ValueError(f"state_dict must be a dict, got {type(sd).__name__}")
        for key in ("state", "step", "epoch", "scale") + self.SETTINGS:
            if key not in sd:
                raise ValueError(f"state_dict is missing {key!r}")
        cfg = self._validate({k: sd[k] for k in self.SETTINGS})
        step = _checks.integer(sd["step"], "state_dict['step']", 0)
        epoch = _checks.integer(sd["epoch"], "state_dict['epoch']", 0)
        scale = sd["scale"]
        if scale is not None:
            n = self.state.num_samples
            _checks.tensor(scale, "state_dict['scale']", dim=1, dtypes=(torch.float32,))
            if scale.shape[0] != n:
                raise ValueError(f"state_dict['scale'] must have length {n}, got {scale.shape[0]}")
            if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
                raise ValueError("state_dict['scale'] must be finite and >= 0")
        s, d, errors = self.state.validate_state_dict(sd["state"], "state_dict['state']")
        # everything is valid: write
        self.state._load_validated(s, d, errors)
        self._configure(cfg)
        self._step.fill_(step)
        self.epoch = epoch
        self.scale = None if scale is None else scale.to(self.device, copy=True)


class ESWPSampler(Sampler[int]):
    """ES with pruning: at the start of each epoch, samples whose score
    ``s + d`` is below the mean are dropped with probability ``prune_ratio``
    (kept ones get loss scale ``1/(1-prune_ratio)`` when ``rescale``); the last
    ``anneal_frac`` of the epochs prune nothing. Yields the kept ids in a
    random order drawn from ``(seed, epoch)``.

    Use it as a DataLoader's ``sampler`` with an :class:`IndexedDataset`, and
    give the meta-batches to ``es.select``. Iterating once advances the epoch;
    ``set_epoch`` sets it explicitly.
    """

    def __init__(self, es: EvolvedSampler, num_epochs: int, prune_ratio: float = 0.5,
                 anneal_frac: float = DEFAULT_ANNEAL_FRAC, rescale: bool = True, seed: int | None = None):
        self.es = es
        self._configure(num_epochs, prune_ratio, anneal_frac, rescale, es.seed if seed is None else seed)
        self.epoch = 0
        self._kept: list[int] | None = None

    def _configure(self, num_epochs, prune_ratio, anneal_frac, rescale, seed) -> None:
        """Validate and set the settings (from the constructor or a state_dict)."""
        self.num_epochs = _checks.integer(num_epochs, "num_epochs", 1)
        self.prune_ratio = _checks.real(prune_ratio, "prune_ratio", 0.0, 1.0, hi_open=True)
        self.anneal_frac = _checks.real(anneal_frac, "anneal_frac", 0.0, 1.0)
        self.rescale = _checks.flag(rescale, "rescale")
        self.seed = _checks.integer(seed, "seed", 0)

    @property
    def scale(self) -> torch.Tensor:
        """Per-sample loss scale of the current epoch (float32 ``[N]``)."""
        self._prune()
        return self.es.scale

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _checks.integer(epoch, "epoch", 0)
        self._kept = None

    def _prune(self) -> list[int]:
        if self._kept is None:
            self.es.set_epoch(self.epoch)  # the once-an-epoch check of the state
            res = eswp_prune(self.es.state, self.prune_ratio, seed=self.seed, epoch=self.epoch,
                             num_epochs=self.num_epochs, anneal_frac=self.anneal_frac,
                             rescale=self.rescale)
            self.es.scale = res.scale
            self._kept = res.kept_ids.tolist()  # one read at the start of the epoch
        return self._kept

    def __iter__(self) -> Iterator[int]:
        kept = self._prune()
        yield from kept
        self.set_epoch(self.epoch + 1)

    def __len__(self) -> int:
        return len(self._prune())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "num_epochs": self.num_epochs,
                "prune_ratio": self.prune_ratio, "anneal_frac": self.anneal_frac, "rescale": self.rescale}

    def load_state_dict(self, sd: dict) -> None:
        self._configure(sd["num_epochs"], sd["prune_ratio"], sd["anneal_frac"], sd["rescale"], sd["seed"])
        self.set_epoch(sd["epoch"])


class IndexedDataset(Dataset):
    """``dataset[i]`` as ``(i, *item)``: the ids the samplers need."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return (i, *item) if isinstance(item, tuple) else (i, item)
