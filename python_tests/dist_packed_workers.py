"""Bodies of the processes that test_integrations_packed.py spawns for packed
batches under DDP (gloo, CPU, 2 ranks): ESTrainer with DataCollatorWithFlattening
and a DistributedEvolvedSampler, and a hand-written DDP loop with the same data,
sampler, loss and optimizer. Each rank saves what it saw to ``out/<name>_<rank>.pt``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from test_integrations_packed import LR, N, collator, hand_documents, make_docs, make_model, trainer_args

B, b = 4, 2  # per rank; N = 32 documents: 4 steps an epoch on 2 ranks
STEPS = 6


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


def make_es():
    from es_kernels.distributed import DistributedEvolvedSampler

    return DistributedEvolvedSampler(N, mini_batch=b, seed=5, meta_batch=B)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def packed_trainer_run(rank, world, out):
    from es_kernels.integrations.transformers import ESTrainer

    es = make_es()
    args = trainer_args(Path(out) / "packed", per_device_train_batch_size=B, ddp_backend="gloo", max_steps=STEPS)
    tr = ESTrainer(model=make_model(), args=args, train_dataset=make_docs(), data_collator=collator(), es_sampler=es)
    seen = []
    select = es.select

    def sel(ids=None, **kw):
        s = select(ids, **kw)
        seen.append(kw["segment_ids"][:, 0][s.positions].tolist())
        return s

    es.select = sel
    tr.train()
    return {"seen": seen, "state": es.state.tensor.clone(), "step": es.step, "params": params(tr.model)}


def packed_hand_loop(rank, world, out):
    """Every rank reads the same ES stream and takes the meta-batches rank,
    rank + world, ... (accelerate's sharding); documents are scored, observed
    and selected as in test_integrations_packed.hand_loop; the training pass is
    the model's loss on the picks' packed row over the tokens of every rank's
    picks, the gradients summed over the ranks."""
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    import es_kernels as ek
    from es_kernels.integrations import ESCollator, ESDataset, ESStream

    model = make_model()
    es = make_es()
    loader = DataLoader(
        ESDataset(make_docs()), batch_size=B, sampler=ESStream(es=es), collate_fn=ESCollator(collator())
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, 0, STEPS)
    seen = []

    def batches():
        while True:
            for i, batch in enumerate(loader):
                if i % world == rank:
                    yield batch

    it = batches()
    for _ in range(STEPS):
        batch = next(it)
        ids, y = batch.pop("es_id"), batch["labels"]
        docs = hand_documents(batch["position_ids"])
        seg = torch.cat([torch.full((1, n), k) for k, (_, n) in enumerate(docs)], 1)
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            d = ek.lm.per_document_cross_entropy(logits, y, seg, shift_labels=True)
        model.train()
        doc_loss, doc_seg = torch.zeros(B, 1), torch.full((B, 1), -1)
        for k, loss, c in zip(d.ids.tolist(), d.losses.tolist(), d.counts.tolist()):
            if k >= 0 and c > 0:
                doc_loss[k], doc_seg[k] = loss, ids[k]
        pos = es.select(losses=doc_loss, segment_ids=doc_seg).positions
        seen.append(doc_seg[pos, 0].tolist())  # -1: a pick without a scored token
        pos = pos.tolist()
        picked = [docs[k] for k in pos]
        row = {k: torch.cat([batch[k][:, s : s + n] for s, n in picked], 1) for k in ("input_ids", "labels")}
        row["position_ids"] = torch.cat([torch.arange(n) for _, n in picked]).view(1, -1)
        count = (row["labels"][..., 1:] != -100).sum()
        dist.all_reduce(count)
        model(**row, num_items_in_batch=count / 1).loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        sched.step()
        opt.zero_grad()
    return {"seen": seen, "state": es.state.tensor.clone(), "step": es.step, "params": params(model)}
