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
from .functional import (DEFAULT_BETA1, DEFAULT_BETA2, DEFAULT_W_MIN, es_step, es_step_from_losses,
                         eswp_prune)
from .state import ESState


class Selection(NamedTuple):
    positions: torch.Tensor  # int64 [b]: ascending positions into the meta-batch
    scales: torch.Tensor  # float32 [b]: loss scale of each selected sample (ESWP), else 1
    losses: torch.Tensor  # float32 [B]: per-sample losses of the meta-batch
    weights: torch.Tensor  # float32 [B]: the ES weights the selection used


class EvolvedSampler:
    """Evolved Sampling: picks ``mini_batch`` of each meta-batch by loss history.

    ``select(ids, logits=..., targets=...)`` (or ``losses=...``) updates the
    state of ``ids`` and returns a :class:`Selection`; one fused op, no host
    round-trip on a GPU. The step counter advances by one per call and, with
    ``seed``, fixes the noise: a resumed run draws exactly what an
    uninterrupted one would.
    """

    def __init__(self, num_samples: int, mini_batch: int, beta1: float = DEFAULT_BETA1,
                 beta2: float = DEFAULT_BETA2, mode: str = "sample", seed: int = 0, device=None,
                 w_min: float = DEFAULT_W_MIN):
        _checks.integer(mini_batch, "mini_batch", 1)
        _checks.hyper(beta1, beta2, w_min)
        _checks.selection(0, 0, mode, seed, 0)
        self.state = ESState(num_samples, device=device)
        self.mini_batch, self.beta1, self.beta2 = int(mini_batch), float(beta1), float(beta2)
        self.mode, self.seed, self.w_min = mode, int(seed), float(w_min)
        self.step = 0
        self.epoch = 0
        self.scale: torch.Tensor | None = None  # per-sample loss scale, set by ESWPSampler

    @property
    def device(self) -> torch.device:
        return self.state.device

    def select(self, ids, logits=None, targets=None, losses=None, *, ignore_index: int = -100,
               label_smoothing: float = 0.0) -> Selection:
        if (losses is None) == (logits is None):
            raise ValueError("select takes either logits (with targets) or losses")
        if logits is not None and targets is None:
            raise ValueError("targets must be given with logits")
        ids = torch.as_tensor(ids).to(self.device, non_blocking=True)
        b = min(self.mini_batch, ids.shape[0])  # the last meta-batch of an epoch may be short
        kw = dict(beta1=self.beta1, beta2=self.beta2, mode=self.mode, seed=self.seed, step=self.step,
                  w_min=self.w_min)
        if losses is not None:
            res = es_step_from_losses(losses, ids, self.state, b, **kw)
        else:
            res = es_step(logits, targets, ids, self.state, b, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, **kw)
        self.step += 1
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
        self.state.check()
        self.epoch = _checks.integer(epoch, "epoch", 0)

    def state_dict(self) -> dict:
        self.state.check()
        return {
            "state": self.state.state_dict(), "step": self.step, "epoch": self.epoch,
            "seed": self.seed, "mini_batch": self.mini_batch, "beta1": self.beta1,
            "beta2": self.beta2, "mode": self.mode, "w_min": self.w_min,
            "scale": None if self.scale is None else self.scale.clone(),
        }

    def load_state_dict(self, sd: dict) -> None:
        for key in ("state", "step", "epoch", "seed", "mini_batch", "beta1", "beta2", "mode", "w_min"):
            if key not in sd:
                raise ValueError(f"state_dict is missing {key!r}")
        _checks.hyper(sd["beta1"], sd["beta2"], sd["w_min"])
        _checks.selection(0, 0, sd["mode"], sd["seed"], sd["step"])
        self.state.load_state_dict(sd["state"])  # validates before writing
        self.step, self.epoch, self.seed = int(sd["step"]), int(sd["epoch"]), int(sd["seed"])
        self.mini_batch, self.beta1, self.beta2 = int(sd["mini_batch"]), float(sd["beta1"]), float(sd["beta2"])
        self.mode, self.w_min = sd["mode"], float(sd["w_min"])
        scale = sd.get("scale")
        self.scale = None if scale is None else scale.to(self.device)


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
                 anneal_frac: float = 0.125, rescale: bool = True, seed: int | None = None):
        self.es = es
        self._configure(num_epochs, prune_ratio, anneal_frac, rescale, es.seed if seed is None else seed)
        self.epoch = 0
        self._kept: list[int] | None = None

    def _configure(self, num_epochs, prune_ratio, anneal_frac, rescale, seed) -> None:
        """Validate and set the settings (from the constructor or a state_dict)."""
        self.num_epochs = _checks.integer(num_epochs, "num_epochs", 1)
        self.prune_ratio = _checks.real(prune_ratio, "prune_ratio", 0.0, 1.0, hi_open=True)
        self.anneal_frac = _checks.real(anneal_frac, "anneal_frac", 0.0, 1.0)
        if not isinstance(rescale, bool):
            raise ValueError(f"rescale must be a bool, got {type(rescale).__name__}")
        self.rescale = rescale
        self.seed = _checks.integer(seed, "seed", 0, 2**63 - 1)

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
