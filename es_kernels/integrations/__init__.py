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
* Packed batches (a packing collator such as transformers'
  ``DataCollatorWithFlattening``: the meta-batch's documents end to end in one
  row): :func:`packed_documents` finds the documents (``cu_seq_lens_q`` or
  ``position_ids``), :func:`select_batch` observes and selects documents and
  returns the packed row of the picks (:func:`take_documents`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable, NamedTuple

import torch
from torch.utils.data import Dataset, Sampler

from .. import _checks, lm
from ..sampler import MAX_EPOCH, ESWPSampler, EvolvedSampler, cat_ids, saved_ids, saved_scales

ID_KEY = "es_id"
SCALE_KEY = "es_scale"
PICKS_KEY = "es_picks"  # the picks' ids after a selection from the state: observe their training losses
DOC_KEY = "es_doc"  # packed rows: int64 [1, T], each token's document (its position in the batch's es_id)
LENGTHS_KEY = "es_lengths"  # packed rows: the documents' token counts, a tuple of ints (stays on the host)
CU_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k")  # flash-attention kwargs of a packing collator
MAX_LENGTH_KEYS = ("max_length_q", "max_length_k")


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

    With ``packed=True``, a dict batch that :func:`packed_documents` finds
    packed also gets ``es_doc`` (int64 ``[1, T]``, each token's document) and
    ``es_lengths`` (the documents' token counts, a tuple of ints, so it stays
    on the host when a loader moves the batch to a device).

    Parameters
    ----------
    collate_fn : callable or None
        The collate function of the items (``None``: ``default_collate``).
    keep_keys : iterable of str or None
        Keep only these keys of dict items (``None``: all).
    packed : bool
        Find the documents of packed batches (one row of several items).

    Raises
    ------
    ValueError
        Naming the argument: ``packed`` not a bool; in a call, a packed batch
        whose documents are not the items (:func:`packed_documents`).
    """

    def __init__(
        self, collate_fn: Callable | None = None, keep_keys: Iterable[str] | None = None, packed: bool = False
    ) -> None:
        if collate_fn is None:
            from torch.utils.data import default_collate

            collate_fn = default_collate
        self.collate_fn = collate_fn
        self.keep_keys = None if keep_keys is None else frozenset(keep_keys)
        self.packed = _checks.flag(packed, "packed")

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
            docs = packed_documents(batch, len(features)) if self.packed else None
            if docs is not None:
                batch[DOC_KEY], batch[LENGTHS_KEY] = docs
            return batch
        return {ID_KEY: ids, SCALE_KEY: scales, "batch": batch}


def check_samplers(es: Any, eswp: Any, name: str) -> None:
    """``ValueError`` unless ``es`` is an :class:`EvolvedSampler` and ``eswp``
    None or an :class:`ESWPSampler` built on it (``name``: ``es``'s argument
    name in the caller): an integration's setup."""
    if not isinstance(es, EvolvedSampler):
        raise ValueError(f"{name} must be an EvolvedSampler, got {type(es).__name__}")
    if eswp is not None and not isinstance(eswp, ESWPSampler):
        raise ValueError(f"eswp must be an ESWPSampler or None, got {type(eswp).__name__}")
    if eswp is not None and eswp.es is not es:
        raise ValueError(f"eswp must be built on {name}")


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


# -- packed batches -----------------------------------------------------------------------
def _grid_width(batch: dict, name: str, rows: int) -> int:
    """The token count of a packed batch's ``[1, T]`` tensors (``name``'s)."""
    x = batch[name]
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != rows:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} of a packed batch must be a tensor [1, T] (one row of documents), got {shape}")
    return x.shape[1]


def packed_documents(batch: dict, size: int) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """The documents of a packed batch: ``size`` samples end to end in one row.

    A batch is packed when it has ``cu_seq_lens_q`` (a packing collator's
    flash-attention kwargs), or ``position_ids`` of one row while ``size > 1``
    (transformers' ``DataCollatorWithFlattening``). Document ``k`` is the
    ``k``-th sample. Its boundaries are ``cu_seq_lens_q`` when given, else
    where ``position_ids`` do not increase by 1 (transformers' own rule for
    packed attention masks).

    Parameters
    ----------
    batch : dict
        A collated batch, on the host.
    size : int
        The number of samples collated.

    Returns
    -------
    (Tensor, tuple of int) or None
        int64 ``[1, T]``: each token's document (its position among the
        samples), and the documents' token counts; None when the batch is
        not packed. Reads the batch's boundary tensors (on the host in a
        collator).

    Raises
    ------
    ValueError
        Naming the tensor: boundaries not of one row of ``T`` tokens, a
        ``cu_seq_lens_q`` that is not ``[size + 1]`` non-decreasing from 0 to
        ``T``, or a number of documents other than ``size``.
    """
    cu = batch.get(CU_KEYS[0])
    pos = batch.get("position_ids")
    if cu is None and not (isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[0] == 1 and size > 1):
        return None
    names = [k for k in ("position_ids", "input_ids", "labels") if k in batch]
    if not names:
        raise ValueError("a packed batch needs position_ids, input_ids or labels [1, T]")
    width = _grid_width(batch, names[0], 1)
    if cu is not None:
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point or cu.is_complex():
            raise ValueError(f"{CU_KEYS[0]} must be an integer tensor [documents + 1]")
        cu = cu.detach().to("cpu", torch.int64)
        if cu.shape[0] != size + 1:
            raise ValueError(
                f"{CU_KEYS[0]} holds {cu.shape[0] - 1} documents, the batch {size} samples: a packing collator "
                "must keep every sample as one document, in order"
            )
        lengths = cu.diff()
        if int(cu[0]) != 0 or int(cu[-1]) != width or bool((lengths < 0).any()):
            raise ValueError(f"{CU_KEYS[0]} must rise from 0 to the row's {width} tokens, got {cu.tolist()}")
    else:
        assert isinstance(pos, torch.Tensor)  # without cu, the guard above returned unless pos is a [1, T] tensor
        _grid_width(batch, "position_ids", 1)
        p = pos[0].detach().to("cpu", torch.int64)
        start = torch.ones(width, dtype=torch.bool)
        start[1:] = p[1:] != p[:-1] + 1
        n = int(start.sum())
        if n != size:
            raise ValueError(
                f"position_ids hold {n} documents (a document starts where they do not increase by 1), the "
                f"batch {size} samples: a packing collator must keep every sample as one document, in order "
                "(DataCollatorWithFlattening drops empty samples: remove them from the dataset)"
            )
        lengths = torch.diff(torch.nonzero(start).flatten(), append=torch.tensor([width]))
    doc = torch.repeat_interleave(torch.arange(size), lengths).view(1, width)
    return doc, tuple(lengths.tolist())


def take_documents(data: dict, positions: torch.Tensor, lengths) -> dict:
    """The packed batch of the documents ``positions`` of a packed batch.

    Parameters
    ----------
    data : dict
        A packed batch (its ``[1, T]`` tensors hold the documents end to end).
    positions : Tensor
        int64 ``[b]``, ascending: the documents to keep, on the host.
    lengths : sequence of int
        Every document's token count (:func:`packed_documents`).

    Returns
    -------
    dict
        The ``[1, T]`` tensors restricted to those documents' tokens (in
        the order of ``positions``), ``cu_seq_lens_q`` / ``_k``,
        ``max_length_q`` / ``_k`` and ``seq_idx`` recomputed for them,
        ``[len(lengths)]`` tensors indexed, other values kept; and ``es_doc``,
        int64 ``[1, t]``: each kept token's document as its index in
        ``positions``. No host synchronisation.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    size, width = lengths.shape[0], int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    kept = lengths[positions]
    offsets = torch.cumsum(kept, 0) - kept
    total = int(kept.sum())
    token = torch.repeat_interleave(starts[positions] - offsets, kept) + torch.arange(total)  # kept tokens' columns
    doc = torch.repeat_interleave(torch.arange(positions.shape[0]), kept).view(1, total)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(kept, 0)])
    out = {}
    for k, v in data.items():
        if k in CU_KEYS and isinstance(v, torch.Tensor):
            v = cu.to(v.device, v.dtype)
        elif k in MAX_LENGTH_KEYS:
            v = int(kept.max()) if kept.numel() else 0
        elif k == "seq_idx" and isinstance(v, torch.Tensor):
            v = doc.to(v.device, v.dtype)
        elif isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (1, width):
            v = v[:, token.to(v.device)]
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == size:
            v = v[positions.to(v.device)]
        out[k] = v
    out[DOC_KEY] = doc
    return out


def document_grid(doc: torch.Tensor, width: int, shift_labels: bool) -> tuple[torch.Tensor, bool]:
    """The documents of the targets of a packed row.

    Parameters
    ----------
    doc : Tensor
        int64 ``[1, T]``: each token's document.
    width : int
        The targets' length: ``T`` (the labels) or ``T - 1`` (``labels[:, 1:]``).
    shift_labels : bool
        The scoring's ``shift_labels`` (with ``width == T``).

    Returns
    -------
    (Tensor, bool)
        ``(segment_ids, shift_labels)`` for the targets: ``doc`` and
        ``shift_labels`` unchanged when ``width == T``; for shifted targets,
        each target's document (-1 across a document boundary, as
        :func:`es_kernels.lm.token_documents`) and False. No host
        synchronisation.

    Raises
    ------
    ValueError
        For another ``width``.
    """
    if width == doc.shape[1]:
        return doc, shift_labels
    if width == doc.shape[1] - 1 and not shift_labels:
        return lm.token_documents(doc, True)[:, :width], False
    raise ValueError(
        f"targets of {width} tokens do not fit a packed row of {doc.shape[1]} "
        "(give the labels, or labels[:, 1:] for a causal LM)"
    )


def document_losses(kw: dict, doc: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document losses of a packed row from ``es.select`` keyword arguments.

    Parameters
    ----------
    kw : dict
        ``{"losses"}`` (float ``[size]``: the documents' losses), or
        ``{"logits", "targets"}`` / ``{"hidden", "weight", "targets"}`` of the
        packed row (with ``bias``, ``ignore_index``, ``label_smoothing``,
        ``shift_labels``, ``workspace_bytes`` as ``es.select`` takes them).
    doc : Tensor
        int64 ``[1, T]``: each token's document in ``[0, size)``.
    size : int
        The number of documents.

    Returns
    -------
    (Tensor, Tensor)
        float32 ``[size]``: each document's mean loss over its scored tokens
        (:func:`es_kernels.lm.per_document_cross_entropy`, or
        :func:`~es_kernels.lm.per_document_losses_from_hidden`), and bool
        ``[size]``: the documents with a scored token. No host synchronisation.
    """
    kw = dict(kw)
    if kw.get("losses") is not None:
        losses = kw["losses"]
        return losses.float(), torch.ones(losses.shape, dtype=torch.bool, device=losses.device)
    targets = kw.pop("targets")
    seg, shift = document_grid(doc.to(targets.device), targets.shape[-1], bool(kw.pop("shift_labels", False)))
    if kw.get("hidden") is not None:
        d = lm.per_document_losses_from_hidden(
            kw.pop("hidden"), kw.pop("weight"), targets, seg, kw.pop("bias", None), shift_labels=shift, **kw
        )
    else:
        d = lm.per_document_cross_entropy(kw.pop("logits"), targets, seg, shift_labels=shift, **kw)
    losses, counts = document_slots(d, size)
    return losses, counts > 0


def document_slots(d: lm.DocumentLosses, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses of documents ``0 .. size - 1`` by document.

    Parameters
    ----------
    d : DocumentLosses
        Of documents numbered ``0 .. size - 1`` (:mod:`es_kernels.lm`).
    size : int
        The number of documents.

    Returns
    -------
    (Tensor, Tensor)
        float32 ``[size]`` losses and int64 ``[size]`` scored-token counts
        (0 for a document without a scored token). No host synchronisation.
    """
    slot = torch.where(d.ids >= 0, d.ids, size)  # ascending distinct documents, then -1 slots (to a spare one)
    dev = d.ids.device
    losses = torch.zeros(size + 1, dtype=torch.float32, device=dev).index_put_((slot,), d.losses)
    counts = torch.zeros(size + 1, dtype=torch.int64, device=dev).index_put_((slot,), d.counts)
    return losses[:size], counts[:size]


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

        A packed batch (with ``es_doc``: :class:`ESCollator` with
        ``packed=True``) is scored per document (``score`` returns the
        packed row's logits and labels, or hidden states, or the documents'
        losses ``[B]``: :func:`document_losses`): each document is one
        observation, the ``mini_batch`` picks are documents, and the result
        is the packed row of the picks (:func:`take_documents`), with
        ``es_scale`` per token (float32 ``[1, t]``, its document's scale)
        and ``es_doc``. That row's length depends on the picks: the packed
        path reads the ``b`` positions to the host, once.
    """
    batch = dict(batch)
    ids = batch.pop(ID_KEY)
    scales = batch.pop(SCALE_KEY, None)
    doc, lengths = batch.pop(DOC_KEY, None), batch.pop(LENGTHS_KEY, None)
    from_state = not es.needs_scores
    if doc is not None:
        return _select_packed(es, batch, ids, scales, doc, lengths, score, from_state)
    sel = es.select(ids) if from_state else es.select(ids, **score(batch))
    out = take(batch, sel.positions, ids.shape[0])
    if scales is not None:
        out[SCALE_KEY] = scales.to(sel.positions.device)[sel.positions]
    if from_state:
        out[PICKS_KEY] = ids.to(sel.positions.device)[sel.positions]
    return out


def _select_packed(es, batch, ids, scales, doc, lengths, score, from_state) -> dict:
    """:func:`select_batch` of a packed batch: observe and select documents."""
    if lengths is None:
        raise ValueError(f"a packed batch needs {LENGTHS_KEY!r} with {DOC_KEY!r} (ESCollator(packed=True) adds both)")
    size = ids.shape[0]
    if from_state:
        sel = es.select(ids)
    else:
        losses, scored = document_losses(score(batch), doc, size)
        # one row per document: packed-row selection (docs/spec.md section 6.1) of [B, 1] rows observes
        # each document once (an id twice in the meta-batch too) and skips those with no scored token
        segments = torch.where(scored, ids.to(scored.device), -1).unsqueeze(1)
        sel = es.select(losses=losses.unsqueeze(1), segment_ids=segments)
    picks = sel.positions.cpu()  # the one host read: the picks' packed row has a length that depends on them
    out = take_documents(batch, picks, lengths)
    if scales is not None:  # each token's document's scale
        kept = torch.as_tensor(lengths, dtype=torch.int64)[picks].to(scales.device)
        total = out[DOC_KEY].shape[1]
        out[SCALE_KEY] = torch.repeat_interleave(scales[picks.to(scales.device)], kept, output_size=total).view(1, -1)
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
    "DOC_KEY",
    "ESCollator",
    "ESDataset",
    "ESItem",
    "ESStream",
    "ID_KEY",
    "LENGTHS_KEY",
    "PICKS_KEY",
    "SCALE_KEY",
    "document_losses",
    "observe_batch",
    "packed_documents",
    "select_batch",
    "take",
    "take_documents",
]
