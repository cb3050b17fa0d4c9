"""Bodies of the processes that test_integrations_packed.py spawns for packed
batches under DDP (gloo, CPU, 2 ranks): ESTrainer with DataCollatorWithFlattening
and the distributed samplers, and a hand-written DDP loop with the same data,
samplers, loss and optimizer; a checkpoint in the middle of an epoch and a
resume from it. Each rank saves what it saw to ``out/<name>_<rank>.pt``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_integrations_packed import (
    LR,
    N,
    V,
    collator,
    hand_document_scores,
    hand_documents,
    make_docs,
    make_model,
    trainer_args,
)

B, b = 4, 2  # per rank; N = 32 documents: 4 steps a loader epoch on 2 ranks
STEPS = 6
# hidden-state scoring, dropout in the training step, ESWP: 10 steps, a checkpoint at step 6 (the
# middle of loader epoch 1, in pruned ESWP epochs), a resume from it
HIDDEN_STEPS, SAVE_AT, DROPOUT = 10, 6, 0.1


def entry(rank: int, world: int, port: int, out: str, scenarios: tuple) -> None:
    """The spawn target: the process group, then each scenario of this module."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        for name in scenarios:
            torch.save(globals()[name](rank, world, out), os.path.join(out, f"{name}_{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def make_es(eswp=False):
    from es_kernels.distributed import DistributedESWPSampler, DistributedEvolvedSampler

    es = DistributedEvolvedSampler(N, mini_batch=b, seed=5, meta_batch=B)
    return es, (DistributedESWPSampler(es, num_epochs=6, prune_ratio=0.5) if eswp else None)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def result(es, model, seen):
    return {"seen": seen, "state": es.state.tensor.clone(), "step": es.step, "params": params(model)}


def make_trainer(out, eswp=False, dropout=0.0, es_kw=None, **kw):
    """ESTrainer on packed rows with the distributed samplers, and the ids it selects in each step."""
    from es_kernels.integrations.transformers import ESTrainer

    es, pruner = make_es(eswp)
    args = trainer_args(Path(out), **{"per_device_train_batch_size": B, "ddp_backend": "gloo", **kw})
    tr = ESTrainer(
        model=make_model(dropout), args=args, train_dataset=make_docs(), data_collator=collator(),
        es_sampler=es, eswp=pruner, **(es_kw or {}),
    )  # fmt: skip
    seen = []
    select = es.select

    def sel(ids=None, **kw):
        s = select(ids, **kw)
        seen.append(kw["segment_ids"][:, 0][s.positions].tolist())
        return s

    es.select = sel
    return tr, es, seen


def packed_trainer_run(rank, world, out):
    tr, es, seen = make_trainer(Path(out) / "packed", max_steps=STEPS)
    tr.train()
    return result(es, tr.model, seen)


def packed_trainer_hidden(rank, world, out, name="hidden", dropout=DROPOUT, es_kw=None):
    """Hidden-state scoring, dropout, DistributedESWPSampler; a checkpoint at
    step SAVE_AT, then a fresh trainer resumed from it (another global RNG
    state on each rank: the checkpoint's must be restored)."""
    root = Path(out) / name
    es_kw = {"es_score_from_hidden": True, **(es_kw or {})}
    kw = dict(eswp=True, dropout=dropout, es_kw=es_kw, max_steps=HIDDEN_STEPS)
    tr, es, seen = make_trainer(root, save_strategy="steps", save_steps=SAVE_AT, **kw)
    tr.train()
    full = result(es, tr.model, seen)
    full["pruned"] = es.scale is not None and bool((es.scale != 1).any())
    full["plans"] = [(p.epoch, p.ids.tolist()) for p in tr.es_stream._plans]
    dist.barrier()
    tr2, es2, seen2 = make_trainer(root, **kw)
    torch.manual_seed(100 + rank)
    tr2.train(resume_from_checkpoint=str(root / f"checkpoint-{SAVE_AT}"))
    resumed = result(es2, tr2.model, seen2)
    resumed["global_step"] = tr2.state.global_step
    resumed["plans"] = [(p.epoch, p.ids.tolist()) for p in tr2.es_stream._plans]
    return {"full": full, "resumed": resumed}


def packed_resume_scoring_dropout(rank, world, out):
    """:func:`packed_trainer_hidden` with dropout in the scoring pass too
    (``es_score_in_eval_mode=False``): a resume restores each rank's RNG state
    before the scoring pass."""
    kw = {"es_score_in_eval_mode": False}
    return packed_trainer_hidden(rank, world, out, name="scoring_dropout", dropout=0.5, es_kw=kw)


def packed_hand_loop(rank, world, out):
    return hand_loop(rank, world, STEPS)


def packed_hand_hidden(rank, world, out):
    return hand_loop(rank, world, HIDDEN_STEPS, eswp=True, dropout=DROPOUT, from_hidden=True)


def hand_loop(rank, world, steps, eswp=False, dropout=0.0, from_hidden=False):
    """What docs/packing.md and docs/distributed.md tell users to do. Every rank
    reads the same ES stream in groups of ``world`` meta-batches and takes
    meta-batch ``rank`` of each group (accelerate's sharding; it reads the
    group whole, and one group ahead); documents are scored, observed and
    selected as in test_integrations_packed.hand_loop; the training pass is
    the model's loss on the picks' packed row (with ESWP, each token's loss
    times its document's scale) over the tokens of every rank's picks, the
    gradients summed over the ranks."""
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from es_kernels.integrations import ESCollator, ESDataset, ESStream

    model = make_model(dropout)
    torch.manual_seed(0)  # the Trainer's set_seed(args.seed), after the model is built: its dropout masks
    es, pruner = make_es(eswp)
    loader = DataLoader(
        ESDataset(make_docs()), batch_size=B, sampler=ESStream(pruner, es=es), collate_fn=ESCollator(collator())
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    seen = []

    def own():  # one loader epoch: this rank's meta-batch of each group, read one group ahead
        group, ahead = [], None
        for batch in loader:
            group.append(batch)
            if len(group) == world:
                if ahead is not None:
                    yield ahead
                ahead, group = group[rank], []
        yield ahead

    def batches():
        while True:
            yield from own()

    it = batches()
    for _ in range(steps):
        batch = next(it)
        ids, scales, y = batch.pop("es_id"), batch.pop("es_scale"), batch["labels"]
        docs = hand_documents(batch["position_ids"])
        seg = torch.cat([torch.full((1, n), k) for k, (_, n) in enumerate(docs)], 1)
        doc_loss, doc_seg = hand_document_scores(model, batch, y, seg, ids, B, from_hidden)
        pos = es.select(losses=doc_loss, segment_ids=doc_seg).positions
        seen.append(doc_seg[pos, 0].tolist())  # -1: a pick without a scored token
        pos = pos.tolist()
        picked = [docs[k] for k in pos]
        row = {k: torch.cat([batch[k][:, s : s + n] for s, n in picked], 1) for k in ("input_ids", "labels")}
        row["position_ids"] = torch.cat([torch.arange(n) for _, n in picked]).view(1, -1)
        count = (row["labels"][..., 1:] != -100).sum()
        dist.all_reduce(count)
        if eswp:  # each token's loss times its document's scale
            scale = torch.cat([torch.full((n,), float(scales[k])) for k, (_, n) in zip(pos, picked)]).view(1, -1)
            yy = row["labels"][:, 1:]
            logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[:, :-1]
            tok = F.cross_entropy(logits.reshape(-1, V).float(), yy.reshape(-1), reduction="none").view(yy.shape)
            loss = (tok * scale[:, 1:]).sum() / count
        else:
            loss = model(**row, num_items_in_batch=count / 1).loss
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        sched.step()
        opt.zero_grad()
    out = result(es, model, seen)
    out["plans"] = [(p.epoch, p.ids.tolist()) for p in loader.sampler._plans]
    return out
