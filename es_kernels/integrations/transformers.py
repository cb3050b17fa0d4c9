"""Evolved Sampling in the Hugging Face ``transformers.Trainer``.

Use::

    from es_kernels import EvolvedSampler, ESWPSampler
    from es_kernels.integrations.transformers import ESTrainer

    es = EvolvedSampler(len(train_set), mini_batch=8)        # b of each meta-batch of per_device_train_batch_size
    trainer = ESTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                        es_sampler=es, eswp=ESWPSampler(es, num_epochs=4))   # eswp: optional
    trainer.train()                                          # or train(resume_from_checkpoint=True)

``per_device_train_batch_size`` is the meta-batch ``B``; each optimizer
micro-step trains ``es.mini_batch`` of it.

How it hooks in (tested with transformers 5.24.0; :func:`check_version`
refuses versions without the hooks):

* ``get_batch_samples`` (public): the Trainer fetches the micro-batches of one
  optimizer step here and counts ``num_items_in_batch`` over them. ESTrainer
  runs the scoring pass (no autograd, eval mode; the unwrapped model under the
  run's autocast, so ``bf16=True`` gives bfloat16 logits, not accelerate's
  float32 copy; or from the hidden states with ``es_score_from_hidden``) and
  the selection on each meta-batch first, then lets the Trainer count over the
  *selected* rows. So
  the loss is normalised by the tokens actually trained (overriding
  ``compute_loss`` instead would divide by the whole meta-batch's count: a loss
  ``b/B`` too small), and gradient accumulation over several meta-batches is
  normalised once over all of them, as without ES.
* ``compute_loss`` (public): with ESWP, the per-token (per-sample)
  cross-entropy times the sample's scale, summed, over ``num_items_in_batch``
  (or the micro-batch's count), as the Trainer's own causal-LM / classification
  loss; without ESWP the Trainer's loss unchanged.
* ``_get_train_sampler`` (private, no public hook sets the training sampler):
  returns an :class:`~es_kernels.integrations.ESStream`. Each Trainer epoch is
  the unpruned dataset size, the pruned ESWP epochs following each other
  inside it, so ``len(train_dataloader)``, ``max_steps``, the epoch count and
  the LR schedule are what runs; ESWP's saving is taken by training fewer
  steps for the same passes over the kept data.
* The train dataset is wrapped in :class:`~es_kernels.integrations.ESDataset`
  and the collator in :class:`~es_kernels.integrations.ESCollator`: items are
  non-dict ``ESItem`` s, which the Trainer's ``RemoveColumnsCollator`` passes
  through, and ``ESCollator`` removes the unused columns itself (the Trainer's
  ``_signature_columns``) before collating, then adds ``es_id`` and ``es_scale``.
* A ``TrainerCallback`` writes ``es_sampler.pt`` (the ES state and the stream's
  position and plans) into every checkpoint folder; ``train(resume_from_checkpoint=...)``
  loads it, so a resume draws exactly what the uninterrupted run would.
* ``_load_rng_state`` (private): in a mid-epoch resume the Trainer restores
  the checkpoint's RNG state after ``get_batch_samples``, that is after the
  scoring pass; ESTrainer restores it before the scoring pass and skips the
  Trainer's second restore, so the dropout masks of both passes are the
  uninterrupted run's.
* Evaluation and ``prediction_step`` are unchanged: no scoring, no selection.

Packed batches (``DataCollatorWithFlattening``: the meta-batch's documents end
to end in one row, ``position_ids`` restarting at each, optionally the
flash-attention kwargs ``cu_seq_lens_q`` / ``_k``): each item of the data set
is a document, and ES observes and selects documents. The scoring pass scores
the packed row and takes each document's mean loss over its scored tokens
(:func:`es_kernels.lm.per_document_cross_entropy`, or from the hidden
states); the selection picks ``es.mini_batch`` documents; the training step
gets the packed row of the picks (``input_ids``, ``labels``, ``position_ids``,
``cu_seq_lens``, ``max_length`` and ``seq_idx`` rebuilt for them), and the
Trainer counts ``num_items_in_batch`` over that row as over any batch. The
picks' row is built, not the others' labels masked: a masked row would cost
the whole meta-batch's forward and backward, the cost ES saves. Its length
depends on the picks, so the packed path reads the ``b`` positions to the
host once a meta-batch. docs/packing.md has the details.

Distributed (DDP, ``torchrun`` or ``accelerate launch``): pass a
:class:`~es_kernels.distributed.DistributedEvolvedSampler` (built after the
process group is initialised, ``meta_batch=per_device_train_batch_size``) and,
for ESWP, a :class:`~es_kernels.distributed.DistributedESWPSampler` (or a plain
:class:`~es_kernels.ESWPSampler` on it). accelerate shards the stream's batches
(rank ``r`` trains batches ``r, r + W, ...``; the stream takes each ESWP plan
whole, the same on every rank); each rank scores and selects in its own
meta-batch, and the sampler's exchange applies every rank's observations to
every replica, so the replicas, the plans and the stream stay bit-identical.
``num_items_in_batch`` is the Trainer's count over every rank's selected rows
(``average_tokens_across_devices``). ``es_sampler.pt`` is written by the main
process and read by every rank on resume. A plain ``EvolvedSampler`` on several
processes is refused (ValueError). Tested on 2 gloo processes against a
hand-written DDP loop (bit-identical selections, state and parameters) and for
a bit-exact resume in the middle of a pruned ESWP epoch
(``python_tests/test_integrations_ddp.py``).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:  # pragma: no cover
    raise ImportError(
        "es_kernels.integrations.transformers needs transformers: pip install 'es-kernels[integrations]'"
    ) from e

from .. import _checks, lm
from ..distributed import DistributedEvolvedSampler
from ..sampler import ESWPSampler, EvolvedSampler
from ..scoring import scoring
from . import (
    DOC_KEY,
    ID_KEY,
    PICKS_KEY,
    SCALE_KEY,
    ESCollator,
    ESDataset,
    ESStream,
    check_samplers,
    document_grid,
    document_slots,
    observe_batch,
    select_batch,
)

CHECKPOINT_FILE = "es_sampler.pt"
TESTED_VERSION = "5.24.0"
MIN_VERSION = (4, 52)  # _get_train_sampler(train_dataset) (pyproject.toml: tested floors)
MAX_MAJOR = 5


def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_version(version: str | None = None) -> None:
    """Check that a transformers version has the hooks ESTrainer relies on.

    Parameters
    ----------
    version : str or None
        The version to check (``None``: the installed one).

    Raises
    ------
    RuntimeError
        Outside the supported range, or when the Trainer lacks a hook.
    """
    v = transformers.__version__ if version is None else version
    t = _version_tuple(v)
    missing = []
    params = list(inspect.signature(Trainer.get_batch_samples).parameters)
    if params[1:4] != ["epoch_iterator", "num_batches", "device"]:
        missing.append("get_batch_samples(epoch_iterator, num_batches, device)")
    if "train_dataset" not in inspect.signature(Trainer._get_train_sampler).parameters:
        missing.append("_get_train_sampler(train_dataset)")
    if not hasattr(Trainer, "_set_signature_columns_if_needed"):
        missing.append("_set_signature_columns_if_needed")
    if list(inspect.signature(Trainer._load_rng_state).parameters)[1:] != ["checkpoint"]:
        missing.append("_load_rng_state(checkpoint)")
    if t[:2] < MIN_VERSION or t[0] > MAX_MAJOR or missing:
        raise RuntimeError(
            f"es_kernels.integrations.transformers supports transformers >= {'.'.join(map(str, MIN_VERSION))}, "
            f"< {MAX_MAJOR + 1} (tested with {TESTED_VERSION}); found {v}"
            + (f", whose Trainer lacks {', '.join(missing)}" if missing else "")
        )


class ESCheckpointCallback(TrainerCallback):
    """Writes the samplers' state into each checkpoint folder (``es_sampler.pt``).

    Parameters
    ----------
    trainer : ESTrainer
    """

    def __init__(self, trainer: ESTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """The Trainer's hook: save ``trainer.es_state_dict()`` on the main process."""
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.trainer.es_state_dict(), os.path.join(folder, CHECKPOINT_FILE))
        return control


class ESTrainer(Trainer):
    """``transformers.Trainer`` that trains on ES's pick of each meta-batch.

    ``per_device_train_batch_size`` is the meta-batch ``B``; each step trains
    ``es_sampler.mini_batch`` of it, with the ESWP scales in the loss.

    Parameters
    ----------
    *args, **kwargs
        Those of ``transformers.Trainer``.
    es_sampler : EvolvedSampler
        Its ``num_samples`` is the train set's size.
    eswp : ESWPSampler or None
        Optional, on the same ``es_sampler``.
    es_shift_labels : bool or None
        ``None``: as the Trainer decides for its loss (True for causal LMs).
    es_score_in_eval_mode : bool
        The scoring pass runs with dropout off and draws no random numbers.
    es_score_from_hidden : bool
        Score from the base model's last hidden states and the ``lm_head``
        weight (:func:`es_kernels.per_sample_losses_from_hidden`) instead of
        the ``[B, T, V]`` logits, for a causal LM whose logits are exactly
        ``lm_head(hidden)``.

    Raises
    ------
    ValueError
        Naming the argument: ``es_sampler`` not an ``EvolvedSampler``,
        ``eswp`` not an ``ESWPSampler`` or on another sampler, a train set of
        another size, ``es_sampler.mini_batch`` above
        ``per_device_train_batch_size``; in training, a batch without
        ``es_id`` (from a loader other than ESTrainer's); with
        ``es_score_from_hidden``, a model without a linear output layer or
        with scaled or soft-capped logits, or under FSDP or DeepSpeed.
        A packed training batch whose documents are not its items
        (:func:`es_kernels.integrations.packed_documents`).
    RuntimeError
        For an unsupported transformers version (:func:`check_version`).

    Notes
    -----
    The scoring pass and the selection make no host synchronisation of their
    own (the Trainer's loop may); each new ESWP epoch makes one; a packed
    meta-batch makes one (its picks' positions, to build their packed row). The scoring
    pass calls the unwrapped model under the run's autocast (``bf16=True``:
    bfloat16 logits, read in place, not accelerate's float32 copy of them).
    """

    def __init__(
        self,
        *args: Any,
        es_sampler: EvolvedSampler,
        eswp: ESWPSampler | None = None,
        es_shift_labels: bool | None = None,
        es_score_in_eval_mode: bool = True,
        es_score_from_hidden: bool = False,
        **kwargs: Any,
    ) -> None:
        check_version()
        check_samplers(es_sampler, eswp, "es_sampler")
        if es_shift_labels is not None:
            _checks.flag(es_shift_labels, "es_shift_labels")
        _checks.flag(es_score_in_eval_mode, "es_score_in_eval_mode")
        super().__init__(*args, **kwargs)
        if es_sampler.mini_batch > self.args.per_device_train_batch_size:
            raise ValueError(
                f"es_sampler.mini_batch ({es_sampler.mini_batch}) must be <= per_device_train_batch_size "
                f"({self.args.per_device_train_batch_size}), the meta-batch it selects from "
                "(a larger one trains every row: no selection)"
            )
        if self.args.world_size > 1 and not isinstance(es_sampler, DistributedEvolvedSampler):
            raise ValueError(
                f"es_sampler must be an es_kernels.distributed.DistributedEvolvedSampler when the Trainer runs "
                f"on {self.args.world_size} processes: the replicas of a plain EvolvedSampler would drift apart"
            )
        self.es_sampler = es_sampler
        self.es_eswp = eswp
        self.es_stream = ESStream(eswp, es=es_sampler)
        self.es_score_in_eval_mode = bool(es_score_in_eval_mode)
        self.es_score_from_hidden = bool(es_score_from_hidden)
        self._es_rng_checkpoint: str | None = None  # a resume's checkpoint, until its RNG state is restored
        self._es_rng_restored = False  # restored before the scoring pass: skip the Trainer's restore
        if self.es_score_from_hidden:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                raise ValueError(
                    "es_score_from_hidden calls the base model and reads lm_head.weight directly, "
                    "which FSDP and DeepSpeed shard: score from the logits there"
                )
            self._es_head()  # refuse a model without a plain lm_head now
        self._es_shift = es_shift_labels
        if self.train_dataset is not None:
            n = len(self.train_dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__
            if n != es_sampler.state.num_samples:
                raise ValueError(f"train_dataset has {n} samples, es_sampler {es_sampler.state.num_samples}")
            self.train_dataset = ESDataset(self.train_dataset)
        keep: list[str] | None = None
        if self.args.remove_unused_columns:
            self._set_signature_columns_if_needed()
            keep = list(self._signature_columns or ())  # set by the call above
        self.data_collator = ESCollator(self.data_collator, keep_keys=keep, packed=True)
        self.add_callback(ESCheckpointCallback(self))

    # -- sampler and checkpoints ---------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        return self.es_stream

    ES_STATE_KEYS = ("es", "stream")  # the entries of es_state_dict

    def es_state_dict(self) -> dict:
        """The sampler's and the stream's state (what a checkpoint stores)."""
        return {"es": self.es_sampler.state_dict(), "stream": self.es_stream.state_dict()}

    def es_load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`es_state_dict`: all or nothing (ValueError naming the
        bad entry, nothing loaded)."""
        _checks.keys(sd, "es_state_dict", self.ES_STATE_KEYS)
        stream = self.es_stream._validated_state(sd["stream"], "es_state_dict['stream']")
        self.es_sampler.load_state_dict(sd["es"])  # all or nothing itself; the last check
        self.es_stream._write_state(stream)
        if self.es_stream.current_epoch is not None:
            # A resume replays the epoch in progress and skips its trained batches. The Trainer's
            # set_epoch does not reach the stream then under DDP (accelerate's skip_first_batches
            # wraps the sharded batch sampler once more), so the stream starts there by itself;
            # at an epoch boundary the Trainer's set_epoch(next) does reach it and overrides this.
            self.es_stream.set_epoch(self.es_stream.current_epoch)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, restoring the ES state of ``resume_from_checkpoint`` first."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = os.path.join(resume_from_checkpoint, CHECKPOINT_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: this checkpoint was not written by ESTrainer, "
                    "so the ES state cannot be restored"
                )
            self.es_load_state_dict(torch.load(path, weights_only=False))
        self._es_rng_checkpoint = (
            os.fspath(resume_from_checkpoint) if isinstance(resume_from_checkpoint, (str, os.PathLike)) else None
        )
        self._es_rng_restored = False
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._es_rng_checkpoint, self._es_rng_restored = None, False

    def _load_rng_state(self, checkpoint):
        # The Trainer restores the checkpoint's RNG state at an epoch boundary before the epoch's
        # first batch, but in the middle of an epoch only after get_batch_samples, which runs the
        # scoring pass here: get_batch_samples then restores it before scoring and this skips the
        # Trainer's second restore, so the scoring pass and the training step draw what the
        # uninterrupted run drew (dropout with es_score_in_eval_mode=False).
        self._es_rng_checkpoint = None
        if self._es_rng_restored:
            self._es_rng_restored = False
            return
        super()._load_rng_state(checkpoint)

    # -- scoring and selection -------------------------------------------------------
    def _es_shifts(self) -> bool:
        if self._es_shift is not None:
            return bool(self._es_shift)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model = self.accelerator.unwrap_model(self.model)
        return model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def _es_logits_targets(self, logits, batch):
        if "shift_labels" in batch:
            return logits[:, : batch["shift_labels"].shape[1]], batch["shift_labels"]
        labels = batch["labels"]
        if labels.dim() == 2 and self._es_shifts():
            return logits[:, :-1], labels[:, 1:]
        return logits, labels

    def _es_scoring_model(self):
        """The model the scoring pass calls: the unwrapped one (no DDP wrapper, no
        collective; FSDP and DeepSpeed keep theirs, which own the parameters)."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return self.model_wrapped
        return self.accelerator.unwrap_model(self.model_wrapped)

    def _es_forward(self, module, inputs: dict):
        """``module(**inputs)`` under the run's autocast, without accelerate's
        float32 conversion of the outputs (its ``_original_forward``), and the
        dtype of the autocast's matmuls (``None`` without autocast)."""
        forward = getattr(getattr(module, "_orig_mod", module), "_original_forward", module)
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            dev = self.args.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            return forward(**inputs), dtype

    def _es_head(self):
        """(base model, lm_head) for ``es_score_from_hidden``."""
        model = self.accelerator.unwrap_model(self.model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base = getattr(model, "base_model", None)
        if not isinstance(head, torch.nn.Linear) or base is None or base is model:
            raise ValueError(
                "es_score_from_hidden needs a model with a base model (model.base_model) and a linear "
                f"output layer (model.get_output_embeddings()); {type(model).__name__} has not"
            )
        cfg = getattr(model, "config", None)
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
            if getattr(cfg, name, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"es_score_from_hidden: {type(model).__name__}'s logits are not lm_head(hidden) "
                    f"(config.{name}={getattr(cfg, name)}); score from the logits"
                )
        return base, head

    def es_score(self, model: torch.nn.Module, batch: dict) -> dict:
        """Keyword arguments of ``es.select`` for a meta-batch (no autograd): the
        model's logits and the labels (shifted for causal LMs), or with
        ``es_score_from_hidden`` the base model's last hidden states, the
        ``lm_head`` weight and bias and the labels. The forward runs under the
        run's autocast, its outputs in the dtype it computed them in. Override
        for another per-sample loss (return ``{"losses": [B]}``)."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
        if self.es_score_from_hidden:
            return self._es_score_hidden(inputs, batch)
        outputs, _ = self._es_forward(model, inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits, targets = self._es_logits_targets(logits, batch)
        return {"logits": logits, "targets": targets.to(logits.device)}

    def _es_score_hidden(self, inputs: dict, batch: dict) -> dict:
        base, head = self._es_head()
        outputs, dtype = self._es_forward(base, {**inputs, "use_cache": False})
        hidden = outputs["last_hidden_state"] if isinstance(outputs, dict) else outputs[0]
        weight, bias = head.weight, head.bias
        dtype = weight.dtype if dtype is None else dtype  # the dtype the lm_head's matmul would run in
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        kw = {"hidden": hidden, "weight": weight, "bias": bias}
        if "shift_labels" in batch:
            targets = batch["shift_labels"]
            kw["hidden"] = hidden[:, : targets.shape[1]]
        else:
            targets = batch["labels"]
            kw["shift_labels"] = targets.dim() == 2 and self._es_shifts()
        kw["targets"] = targets.to(hidden.device)
        return kw

    def es_select(self, batch: dict) -> dict:
        """The scoring pass and the selection on one collated meta-batch."""
        device = self.args.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) and k != ID_KEY else v for k, v in batch.items()}
        model = self._es_scoring_model()
        with scoring(model, eval_mode=self.es_score_in_eval_mode):
            out = select_batch(self.es_sampler, batch, lambda b: self.es_score(model, b))
        self.es_stream.mark_consumed(batch[ID_KEY].shape[0] * self.args.world_size)  # every rank's batch
        if PICKS_KEY in out:  # selected from the state: compute_loss observes the training losses
            if self.es_eswp is None:  # per row, or per token of a packed row
                shape = out[SCALE_KEY].shape if SCALE_KEY in out else out[PICKS_KEY].shape
                out[SCALE_KEY] = torch.ones(shape, dtype=torch.float32, device=device)
        elif self.es_eswp is None:
            out.pop(SCALE_KEY, None)
            out.pop(DOC_KEY, None)  # packed rows: the Trainer's own loss, on the picks' packed row
        return out

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        """Fetch the step's meta-batches, select in each, then count
        ``num_items_in_batch`` over the selected rows (the Trainer's own code)."""
        selected = []
        for _ in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            if not (isinstance(batch, dict) and ID_KEY in batch):
                raise ValueError(
                    f"the training batch has no {ID_KEY!r} column, so ES cannot select in it: ESTrainer's own "
                    "train loader adds it (get_train_dataloader: the ESStream sampler, ESDataset items, the "
                    "ESCollator); a loader of your own must be built from those pieces"
                )
            if self._es_rng_checkpoint is not None and not self.args.ignore_data_skip:
                # a mid-epoch resume: the Trainer would restore the RNG state after this scoring pass
                super()._load_rng_state(self._es_rng_checkpoint)
                self._es_rng_checkpoint, self._es_rng_restored = None, True
            selected.append(self.es_select(batch))
        return super().get_batch_samples(iter(selected), len(selected), device)

    # -- the loss ------------------------------------------------------------------------
    def compute_loss(
        self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The Trainer's loss on the selected rows, each sample's loss times its
        ESWP scale (in a packed row, each token's loss times its document's);
        after a selection from the state (the sampler's schedule) the rows'
        per-sample losses (per document in a packed row), detached, are
        observed."""
        picks = inputs.pop(PICKS_KEY, None) if isinstance(inputs, dict) else None
        scale = inputs.pop(SCALE_KEY, None) if isinstance(inputs, dict) else None
        doc = inputs.pop(DOC_KEY, None) if isinstance(inputs, dict) else None  # packed rows
        if scale is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        shift = inputs.pop("shift_labels", None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        batch = {"labels": labels} if shift is None else {"labels": labels, "shift_labels": shift}
        logits, targets = self._es_logits_targets(logits, batch)
        targets = targets.to(logits.device)
        token = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="none",
            label_smoothing=self.args.label_smoothing_factor,
        ).view(targets.shape)
        if picks is not None:  # the scoring pass's loss (section 5: unsmoothed, a mean per sequence), detached
            with torch.no_grad():
                plain = token
                if self.args.label_smoothing_factor:
                    plain = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
                    ).view(targets.shape)
                if doc is not None:  # a packed row: each document's mean over its scored tokens (0: none)
                    seg, _ = document_grid(doc.to(targets.device), targets.shape[1], False)
                    d = lm.per_document_losses(plain, seg, mask=targets != -100)
                    plain = document_slots(d, picks.shape[0])[0]
                elif plain.dim() == 2:
                    plain = plain.sum(dim=1) / (targets != -100).sum(dim=1).clamp(min=1)
            observe_batch(self.es_sampler, {PICKS_KEY: picks}, plain)
        if doc is not None:  # a packed row: each token's loss times its document's scale (aligned as the labels)
            total = (token * scale.to(token.device)[:, scale.shape[1] - targets.shape[1] :]).sum()
        else:
            per_sample = token.sum(dim=1) if token.dim() == 2 else token
            total = (per_sample * scale.to(per_sample.device)).sum()
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / (targets != -100).sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss


__all__ = ["CHECKPOINT_FILE", "ESCheckpointCallback", "ESTrainer", "check_version"]
