"""Evolved Sampling in Lightning: a LightningModule mixin.

Use::

    from es_kernels.integrations.lightning import ESLightningMixin

    class Model(ESLightningMixin, L.LightningModule):
        def __init__(self, n):
            super().__init__()
            self.net = ...
            self.es_setup(EvolvedSampler(n, mini_batch=16))           # or es_setup(es, eswp=ESWPSampler(es, ...))
        def es_sample_losses(self, batch):                           # per-sample losses [B]
            return F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")
        def training_step(self, batch, i):                           # batch: the selected rows
            return self.es_loss(batch)                                # mean of losses * ESWP scales
        def train_dataloader(self):
            return self.es_dataloader(train_set, batch_size=64)       # items: dicts of tensors

Hooks (tested with lightning 2.6.6): ``on_after_batch_transfer`` (public, returns
the batch training_step gets: the scoring pass without autograd in eval mode,
under the trainer's precision context as the training step, and the selection
run there, during training only; validation/test/predict batches pass untouched),
``on_save_checkpoint`` / ``on_load_checkpoint`` (the ES state, and torch's
generator states, restored before the next training batch is scored, so a
resume with dropout is exact: Lightning restores none),
and a stateful DataLoader (:class:`ESDataLoader`, ``state_dict`` /
``load_state_dict``, which Lightning saves in the checkpoint's loop state) whose
:class:`~es_kernels.integrations.ESStream` records the samples trained in the
epoch: a mid-epoch resume continues after them, with the plans of the
interrupted run. Each epoch is the unpruned dataset size (ESWP's pruned epochs
follow each other inside it), so ``max_steps``, ``estimated_stepping_batches``
and LR schedules are what runs.

DDP: pass ``use_distributed_sampler=False`` (the stream must not be replaced
by a DistributedSampler) and shard batches yourself; the ES state must be
identical on every rank (gather ids and losses before ``select``: not done here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from .. import _checks
from ..sampler import ESWPSampler, EvolvedSampler
from ..scoring import scoring
from . import ID_KEY, PICKS_KEY, SCALE_KEY, ESCollator, ESDataset, ESStream, check_samplers, observe_batch, select_batch

RNG_KEY = "es_rng"  # the checkpoint's entry of torch's generator states

if TYPE_CHECKING:  # the mixin goes before a LightningModule, whose hooks and attributes it uses
    from lightning.pytorch import LightningModule as _Module
else:
    _Module = object


def _get_rng_state(device: torch.device) -> dict:
    """torch's default generators: the CPU's and, on a CUDA ``device``, that device's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`_get_rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ESDataLoader(DataLoader):
    """A DataLoader over an :class:`ESStream` whose position Lightning saves and restores.

    Parameters
    ----------
    *args, **kwargs
        Those of ``torch.utils.data.DataLoader``, with an :class:`ESStream` as ``sampler``.
    """

    sampler: ESStream

    def state_dict(self) -> dict:
        """The stream's position (``ESStream.state_dict``)."""
        return self.sampler.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.sampler.load_state_dict(sd)


class ESLightningMixin(_Module):
    """Mix into a ``LightningModule`` (before it) to train on ES's pick of each meta-batch.

    Call :meth:`es_setup` in ``__init__``, define :meth:`es_sample_losses`,
    return :meth:`es_dataloader` from ``train_dataloader`` and
    :meth:`es_loss` from ``training_step``; see the module docstring.

    Attributes
    ----------
    es_score_in_eval_mode : bool
        The scoring pass runs with dropout off (default True).

    Notes
    -----
    The scoring and the selection make no host synchronisation of their
    own; each new ESWP epoch makes one.
    """

    es_score_in_eval_mode = True

    def es_setup(self, es: EvolvedSampler, eswp: ESWPSampler | None = None) -> None:
        """Attach the samplers (``eswp`` optional, built on ``es``).

        Parameters
        ----------
        es : EvolvedSampler
        eswp : ESWPSampler or None

        Raises
        ------
        ValueError
            For ``es`` not an ``EvolvedSampler``, ``eswp`` not an
            ``ESWPSampler`` or built on another sampler.
        """
        check_samplers(es, eswp, "es")
        self.es_sampler = es
        self.es_eswp = eswp
        self.es_stream = ESStream(eswp, es=es, resume_mid_epoch=True)

    def es_dataloader(
        self, dataset: Dataset, batch_size: int, collate_fn: Callable | None = None, **kwargs: Any
    ) -> ESDataLoader:
        """The training loader: meta-batches of ``batch_size`` with ``es_id`` / ``es_scale``.

        Parameters
        ----------
        dataset : Dataset
            The train set, of ``es.state.num_samples`` samples.
        batch_size : int
            The meta-batch ``B``.
        collate_fn : callable or None
        **kwargs
            More ``DataLoader`` arguments. Without workers and ``generator``,
            the loader gets a private generator for its (unused) worker seed,
            so a new epoch draws nothing from torch's global generator.

        Returns
        -------
        ESDataLoader

        Raises
        ------
        ValueError
            For a dataset of another size, or a ``batch_size`` below ``es.mini_batch``.
        """
        n = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__
        if n != self.es_sampler.state.num_samples:
            raise ValueError(f"dataset has {n} samples, es_sampler {self.es_sampler.state.num_samples}")
        batch_size = _checks.integer(batch_size, "batch_size", 1)
        if self.es_sampler.mini_batch > batch_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be >= es.mini_batch ({self.es_sampler.mini_batch}): "
                "it is the meta-batch ES selects from"
            )
        if not kwargs.get("num_workers") and kwargs.get("generator") is None:
            # each iter() of a DataLoader draws a worker seed from its generator (torch's global one
            # by default), unused without workers: a private one keeps the global draws of an
            # epoch boundary out of the resumed run's dropout masks
            kwargs["generator"] = torch.Generator()
        return ESDataLoader(
            ESDataset(dataset),
            batch_size=batch_size,
            sampler=self.es_stream,
            collate_fn=ESCollator(collate_fn),
            **kwargs,
        )

    def es_sample_losses(self, batch: Any) -> torch.Tensor:  # pragma: no cover - the user's
        """Define it: the per-sample losses ``[B]`` of a batch (scoring and training)."""
        raise NotImplementedError("define es_sample_losses(batch) -> per-sample losses [B]")

    def es_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of the selected rows.

        Parameters
        ----------
        batch : dict
            The selected rows, with ``es_scale`` under ESWP.

        Returns
        -------
        Tensor
            The mean over the rows of :meth:`es_sample_losses` times the ESWP
            scale. After a selection from the state (the sampler's schedule)
            the losses, detached, are observed first.
        """
        picks = {PICKS_KEY: batch.pop(PICKS_KEY)} if isinstance(batch, dict) and PICKS_KEY in batch else {}
        losses = self.es_sample_losses(batch)
        observe_batch(self.es_sampler, picks, losses)
        scale = batch.get(SCALE_KEY) if isinstance(batch, dict) else None
        return (losses * scale).mean() if scale is not None else losses.mean()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's hook: in training, score the meta-batch and keep the selected rows."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.training:
            return batch
        if not (isinstance(batch, dict) and ID_KEY in batch):
            raise ValueError(
                f"the training batch has no {ID_KEY!r} key, so ES cannot select in it: "
                "return self.es_dataloader(...) from train_dataloader"
            )
        rng = getattr(self, "_es_rng_to_restore", None)
        if rng is not None:
            # the first training batch after a resume: the state the uninterrupted run had here
            self._es_rng_to_restore = None
            _set_rng_state(rng, self.device)
        n = batch[ID_KEY].shape[0]
        with scoring(self, eval_mode=self.es_score_in_eval_mode), trainer.precision_plugin.train_step_context():
            batch = select_batch(self.es_sampler, batch, lambda b: {"losses": self.es_sample_losses(b)})
        self.es_stream.mark_consumed(n)
        if self.es_eswp is None:
            batch.pop(SCALE_KEY, None)
        return batch

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Lightning's hook: store the sampler's state under ``es_sampler``."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["es_sampler"] = self.es_sampler.state_dict()
        checkpoint[RNG_KEY] = _get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Lightning's hook: restore the sampler's state, all or nothing: the
        loader's position, which Lightning restores later, is validated first."""
        super().on_load_checkpoint(checkpoint)
        if "es_sampler" not in checkpoint:
            raise ValueError("the checkpoint has no 'es_sampler' entry: ESLightningMixin did not write it")
        fit = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        for i, sd in enumerate(fit.get("combined_loader", [])):  # the ESDataLoader's ESStream state
            self.es_stream._validated_state(sd, f"the checkpoint's train loader state [{i}]")
        self.es_sampler.load_state_dict(checkpoint["es_sampler"])
        self._es_rng_to_restore = checkpoint.get(RNG_KEY)  # set before the next training batch is scored


__all__ = ["ESDataLoader", "ESLightningMixin"]
