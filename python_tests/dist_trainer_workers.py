"""Bodies of the processes that python_tests/test_integrations_ddp.py spawns: the
Hugging Face ESTrainer under DDP (gloo, CPU, 2 ranks) and a hand-written DDP loop
with the same data, sampler, loss and optimizer. Each rank saves what it saw to
``out/<name>_<rank>.pt``; the test compares the ranks and the two runs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_integrations import LR, N, V, collate, hand_select, make_data, make_model, trainer_args
from test_integrations import record_selections as record

B, b = 4, 2  # per rank; N = 32 samples: 4 steps an epoch on 2 ranks
STEPS = 6


def entry(rank: int, world: int, port: int, out: str, scenarios: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        for name in scenarios:
            res = globals()[name](rank, world, out)
            torch.save(res, os.path.join(out, f"{name}_{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def make_es(eswp: bool):
    from es_kernels.distributed import DistributedESWPSampler, DistributedEvolvedSampler

    es = DistributedEvolvedSampler(N, mini_batch=b, seed=5, meta_batch=B)
    return es, (DistributedESWPSampler(es, num_epochs=6, prune_ratio=0.5) if eswp else None)


def make_trainer(out, eswp=False, dropout=0.0, es_kw=None, **kw):
    from es_kernels.integrations.transformers import ESTrainer

    es, pruner = make_es(eswp)
    args = dict(per_device_train_batch_size=B, ddp_backend="gloo", max_steps=STEPS)
    args.update(kw)
    tr = ESTrainer(
        model=make_model(dropout=dropout),
        args=trainer_args(Path(out), **args),
        train_dataset=make_data(),
        data_collator=collate,
        es_sampler=es,
        eswp=pruner,
        **(es_kw or {}),
    )
    return tr, es


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trainer_run(rank, world, out):
    from es_kernels import EvolvedSampler
    from es_kernels.integrations.transformers import ESTrainer

    try:  # a plain sampler under DDP: refused (its replicas would drift apart)
        ESTrainer(model=make_model(), args=trainer_args(Path(out) / "plain"), es_sampler=EvolvedSampler(N, b))
        refused = ""
    except ValueError as e:
        refused = str(e)
    tr, es = make_trainer(os.path.join(out, "trainer"))
    seen = record(es)
    tr.train()
    res = {"seen": seen, "state": es.state.tensor.clone(), "step": es.step, "params": params(tr.model)}
    return {**res, "refused": refused}


def hand_loop(rank, world, out):
    """The README's DDP loop: every rank reads the same ES stream, takes the
    meta-batches rank, rank + world, ... (accelerate's batch sharding), scores
    and selects with the distributed sampler, and trains on the selection with
    the Trainer's loss (token sum over the tokens of both ranks' selections)
    and gradients summed over the ranks (DDP's mean times the token share)."""
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from es_kernels.integrations import ESCollator, ESDataset, ESStream

    model = make_model()
    es, _ = make_es(False)
    stream = ESStream(es=es)
    loader = DataLoader(ESDataset(make_data()), batch_size=B, sampler=stream, collate_fn=ESCollator(collate))
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
        pos = hand_select(model, es, batch, seen)
        x, y = batch["input_ids"][pos], batch["labels"][pos]
        count = (y[:, 1:] != -100).sum()
        dist.all_reduce(count)
        logits = model(x).logits[:, :-1]
        tok = F.cross_entropy(logits.reshape(-1, V).float(), y[:, 1:].reshape(-1), reduction="none")
        (tok.sum() / count).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        sched.step()
        opt.zero_grad()
    return {"seen": seen, "state": es.state.tensor.clone(), "step": es.step, "params": params(model)}


def resume(rank, world, out, name="resume", **kw):
    """ESWP under DDP: 10 steps with a checkpoint at step 6 (the middle of loader
    epoch 1, whose ESWP plan is pruned), then a fresh trainer resumed from it;
    both must end bit-identical."""
    root = os.path.join(out, name)
    tr, es = make_trainer(root, eswp=True, max_steps=10, save_strategy="steps", save_steps=6, **kw)
    seen = record(es)
    tr.train()
    full = {"state": es.state.tensor.clone(), "step": es.step, "params": params(tr.model), "seen": seen[6:]}
    pruned = es.scale is not None and bool((es.scale != 1).any())
    dist.barrier()
    tr2, es2 = make_trainer(root, eswp=True, max_steps=10, **kw)
    seen2 = record(es2)
    torch.manual_seed(100 + rank)  # another RNG state on each rank: each rank's checkpointed one must be restored
    tr2.train(resume_from_checkpoint=os.path.join(root, "checkpoint-6"))
    return {
        "full": full,
        "resumed": {"state": es2.state.tensor.clone(), "step": es2.step, "params": params(tr2.model), "seen": seen2},
        "global_step": tr2.state.global_step,
        "pruned": pruned,
        "plans": [(p.epoch, p.ids.tolist()) for p in tr.es_stream._plans],
        "plans2": [(p.epoch, p.ids.tolist()) for p in tr2.es_stream._plans],
    }


def resume_dropout(rank, world, out):
    """:func:`resume` with dropout, in the training step and in the scoring pass
    (``es_score_in_eval_mode=False``): each rank's dropout masks must be drawn
    from its checkpointed RNG state."""
    return resume(rank, world, out, name="resume_dropout", dropout=0.5, es_kw={"es_score_in_eval_mode": False})
