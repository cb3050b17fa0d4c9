"""Bodies of the processes that python_tests/test_distributed.py spawns (a module of
its own, light to import: each spawned process imports it). Each scenario runs on
every rank of a gloo group and saves what it saw to ``out/<name>_<rank>.pt``; the test
process then checks it against a single-process computation."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

N, CAP, MINI, STEPS = 64, 8, 3, 6


def entry(rank: int, world: int, init_file: str, out: str, scenarios: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in scenarios:
            res = globals()[name](rank, world, out)
            torch.save(res, os.path.join(out, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def owned_perm(g: torch.Generator, n: int, world: int, r: int) -> torch.Tensor:
    """A random order of the ids rank ``r`` owns in the sharded mode (docs/spec.md section 11.2)."""
    from es_kernels.sharded import shard_range

    lo, hi = shard_range(n, world, r)
    return lo + torch.randperm(hi - lo, generator=g)


def step_inputs(step: int, world: int, owned: bool = False):
    """Every rank's (ids, losses) of a step, from one generator (the same on every rank).
    Step 3 is uneven (one rank short, one empty with 3 ranks); step 4 holds an id
    on two ranks (DistributedSampler's wrap-around padding; ``owned``: twice on the
    last rank); step 5 an id out of range. ``owned``: each rank's ids from its own
    range, the sharded mode's contract."""
    g = torch.Generator().manual_seed(100 + step)
    perm = torch.randperm(N, generator=g)
    perms = [owned_perm(g, N, world, r) for r in range(world)] if owned else None
    sizes = [CAP] * world
    if step == 3:
        sizes[1] = 5
        if world > 2:
            sizes[2] = 0
    out, at = [], 0
    for r in range(world):
        ids = perms[r][: sizes[r]].clone() if owned else perm[at : at + sizes[r]].clone()
        at += sizes[r]
        if step == 4 and r == world - 1:
            ids[-1] = ids[0] if owned else out[0][0][0]  # rank 0's (or this rank's) first id again
        if step == 5 and r == 0:
            ids[2] = N  # out of range: counted once in errors[0] on every rank
        out.append((ids, torch.rand(sizes[r], generator=g, dtype=torch.float64).float() * 3))
    return out


@contextlib.contextmanager
def no_host_sync():
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def guard(name):
        def wrapper(self, *a, **k):
            raise AssertionError(f"host round-trip: Tensor.{name} on the distributed step path")

        return wrapper

    try:
        for n in names:
            setattr(torch.Tensor, n, guard(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def es(rank, world, out, sharded: bool = False):
    """ES: three samplers (sample, sample with eps, topk) on the same inputs, and one
    checkpointed after step 2 on rank 0 and resumed on every rank from that file.
    ``sharded``: the same with the sharded state on each rank's own ids, checkpointed
    with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    from es_kernels.distributed import DistributedEvolvedSampler
    from es_kernels.sharded import ShardedEvolvedSampler

    D = ShardedEvolvedSampler if sharded else DistributedEvolvedSampler
    kinds = {
        "sample": D(N, MINI, seed=7),  # meta_batch agreed on the first call
        "eps": D(N, MINI, seed=7, eps=0.25, meta_batch=CAP),
        "topk": D(N, MINI, select_mode="topk", meta_batch=CAP),
    }
    resumed = D(N, MINI, seed=7, meta_batch=CAP)
    rec = {k: [] for k in list(kinds) + ["resumed"]}
    ckpt = os.path.join(out, "es_sharded_ckpt" if sharded else "es_ckpt.pt")
    for step in range(STEPS):
        ids, losses = step_inputs(step, world, owned=sharded)[rank]
        for k, s in kinds.items():
            guard = no_host_sync() if (k == "sample" and step == 1) else contextlib.nullcontext()
            with guard:  # the step's whole path: pack, all_gather, update, select
                sel = s.select(ids, losses=losses)
            rec[k].append((sel.positions, sel.weights, sel.losses))
        rec["resumed"].append(resumed.select(ids, losses=losses).positions)
        if step == 5:  # the out-of-range id of step 5: counted once, then cleared
            rec["errors"] = [s.state.errors.clone() for s in (*kinds.values(), resumed)]
            for s in (*kinds.values(), resumed):
                s.state.reset_errors()
        if step == 2 and sharded:  # checkpoint every shard; every rank loads into a sampler of other settings
            dcp.save(resumed.state_dict(), checkpoint_id=ckpt)
            resumed = D(N, 1, seed=99, beta1=0.9)
            sd = resumed.state_dict()
            dcp.load(sd, checkpoint_id=ckpt)
            resumed.load_state_dict(sd)
        elif step == 2:  # checkpoint on rank 0; every rank loads it into a sampler of other settings
            if rank == 0:
                torch.save(resumed.state_dict(), ckpt)
            dist.barrier()
            resumed = D(N, 1, seed=99, beta1=0.9)
            resumed.load_state_dict(torch.load(ckpt))
    final = {k: (s.state.tensor.clone(), s.state.errors.clone(), s.step) for k, s in kinds.items()}
    final["resumed"] = (resumed.state.tensor.clone(), resumed.state.errors.clone(), resumed.step)
    return {"rec": rec, "final": final}


def es_sharded(rank, world, out):
    """:func:`es` on the sharded state."""
    return es(rank, world, out, sharded=True)


def eswp(rank, world, out):
    """ESWP shards, with and without drop_last, at a pruning epoch and an annealing one."""
    import es_kernels as ek
    from es_kernels.distributed import DistributedESWPSampler, DistributedEvolvedSampler

    n = 53  # not a multiple of 2 or 3
    res = {}
    for drop_last in (False, True):
        es = DistributedEvolvedSampler(n, 4, seed=11, meta_batch=CAP)
        ek.es_update(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(1)), es.state)
        pr = DistributedESWPSampler(es, num_epochs=4, prune_ratio=0.5, drop_last=drop_last)
        for epoch in (0, 3):  # 3 >= anneal_stop(4, 0.125) = 3: nothing pruned
            pr.set_epoch(epoch)
            length = len(pr)
            shard = list(pr)
            res[(drop_last, epoch)] = (length, shard, es.scale.clone(), pr.epoch)
    return res


def checked(rank, world, out, sharded: bool = False):
    """Checked mode: a duplicate id on one rank and an injected divergence raise on every
    rank (``sharded``: a step counter drifts, the one value the ranks share)."""
    from es_kernels.distributed import DistributedEvolvedSampler
    from es_kernels.sharded import ShardedEvolvedSampler

    os.environ["ES_KERNELS_CHECKED"] = "1"
    try:
        es = (ShardedEvolvedSampler if sharded else DistributedEvolvedSampler)(N, MINI, seed=3, meta_batch=CAP)
        msgs = []
        ids, losses = step_inputs(0, world, owned=sharded)[rank]
        es.select(ids, losses=losses)  # fine: the digests agree
        bad = ids.clone()
        if rank == 0:
            bad[1] = bad[0]
        try:
            es.select(bad, losses=losses)
        except RuntimeError as e:
            msgs.append(str(e))
        if rank == world - 1 and sharded:  # one rank's step counter drifts
            es.step_tensor.add_(1)
        elif rank == world - 1:  # one replica drifts by one ulp
            i = int(ids[0])
            es.state.tensor[i, 0] = torch.nextafter(es.state.tensor[i, 0], torch.tensor(1e9))
        ids, losses = step_inputs(1, world, owned=sharded)[rank]
        try:
            es.select(ids, losses=losses)
        except RuntimeError as e:
            msgs.append(str(e))
        return msgs
    finally:
        del os.environ["ES_KERNELS_CHECKED"]


def checked_sharded(rank, world, out):
    """:func:`checked` on the sharded state."""
    return checked(rank, world, out, sharded=True)


def demo(rank, world, out):
    """The demo's train() under DDP on digits, one small epoch per method."""
    from es_kernels.demo import Config, load_dataset, train

    cfg = Config(datasets=("digits",), epochs=1, hidden=64, seeds=1)
    data = load_dataset("digits", cfg)
    return {m: train(m, data, cfg, seed=0) for m in ("es", "eswp", "infobatch")}


# --------------------------------------------------------------------------- mid-epoch resume
RN, RB, RMINI, REPOCHS = 37, 4, 2, 3  # 37: the shards are padded on 2 and 3 ranks


def resume_losses(ids: torch.Tensor, step: int) -> torch.Tensor:
    """A loss for each id at a step, the same in every run (a stand-in for training)."""
    return ((ids * 7919 + step * 104729) % 1009).to(torch.float32) / 300


def resume_run(prune_ratio: float, ckpt: str, stop: int | None = None, load: bool = False) -> dict:
    """The README's loop: ESWP over a DataLoader (num_workers=0), ES on each meta-batch.
    ``stop``: after training on step ``stop``, save on rank 0 and return. ``load``:
    fresh samplers of other settings restore the checkpoint first, then the loop goes on."""
    from torch.utils.data import DataLoader

    from es_kernels.distributed import DistributedESWPSampler as P
    from es_kernels.distributed import DistributedEvolvedSampler as D

    if load:
        es = D(RN, 1, seed=99, beta1=0.9)
        pr = P(es, num_epochs=9, prune_ratio=0.1, seed=5)
        sd = torch.load(ckpt)
        es.load_state_dict(sd["es"])
        pr.load_state_dict(sd["pr"])
    else:
        es = D(RN, RMINI, seed=3, meta_batch=RB)
        pr = P(es, num_epochs=REPOCHS, prune_ratio=prune_ratio)
    rec, saved = [], None
    for epoch in range(pr.epoch, REPOCHS):
        pr.set_epoch(epoch)
        for ids in DataLoader(range(RN), batch_size=RB, sampler=pr):
            step = es.step
            sel = es.select(ids, losses=resume_losses(ids, step))
            rec.append((epoch, ids, sel.positions, sel.scales, sel.weights))
            if step == stop:
                saved = {"es": es.state_dict(), "pr": pr.state_dict()}
                if dist.get_rank() == 0:
                    torch.save(saved, ckpt)
                dist.barrier()
                return {"rec": rec, "saved": saved}
    return {"rec": rec, "final": {"es": es.state_dict(), "pr": pr.state_dict()}}


def resume_everywhere(ckpt: str) -> dict:
    """With pruning and without: the uninterrupted run, and for every step a run
    saved after it and its resumed continuation."""
    res = {}
    for prune_ratio in (0.5, 0.0):
        full = resume_run(prune_ratio, ckpt)
        runs = []
        for stop in range(len(full["rec"])):
            before = resume_run(prune_ratio, ckpt, stop=stop)
            runs.append((before, resume_run(prune_ratio, ckpt, load=True)))
        res[prune_ratio] = {"full": full, "runs": runs}
    return res


def resume(rank, world, out):
    """Mid-epoch resume at every step, with and without pruning; then checkpoints of
    another world size, refused on every rank at load (before any collective)."""
    from es_kernels.distributed import DistributedESWPSampler as P
    from es_kernels.distributed import DistributedEvolvedSampler as D

    ckpt = os.path.join(out, "resume_ckpt.pt")
    res = resume_everywhere(ckpt)
    # a checkpoint of one rank (a group of rank 0 alone), loaded on `world` ranks
    solo = dist.new_group([0])
    if rank == 0:
        es = D(RN, RMINI, seed=3, process_group=solo)
        pr = P(es, num_epochs=REPOCHS)
        it = iter(pr)
        ids = torch.tensor([next(it) for _ in range(RB)])
        es.select(ids, losses=resume_losses(ids, 0))
        torch.save({"es": es.state_dict(), "pr": pr.state_dict()}, ckpt)
    dist.barrier()
    sd = torch.load(ckpt)
    es = D(RN, RMINI, seed=3, meta_batch=RB)
    pr = P(es, num_epochs=REPOCHS)
    refused = []
    for s, part in ((es, "es"), (pr, "pr")):
        try:
            s.load_state_dict(sd[part])
        except ValueError as e:
            refused.append(str(e))
    ids = torch.arange(rank * RB, (rank + 1) * RB)
    es.select(ids, losses=resume_losses(ids, 0))  # every rank reaches the collective: nothing hangs
    res["refused"] = refused
    res["after_refusal"] = (es.step, pr.epoch, pr.position, es.state.tensor.clone())
    return res


# --------------------------------------------------------------------------- every form of select
FN, FCAP, FMINI, FSTEPS, FT, FV, FH = 48, 5, 2, 4, 6, 7, 4
FORMS = ("losses", "logits", "hidden", "packed_logits", "packed_hidden", "packed_losses")


def form_rows(step: int, world: int) -> list:
    """Rows per rank: uneven at step 1 (rank 1 short; rank 2 empty with 3 ranks)."""
    sizes = [FCAP] * world
    if step == 1:
        sizes[1] = 2
        if world > 2:
            sizes[2] = 0
    return sizes


def form_inputs(step: int, world: int, form: str, owned: bool = False) -> list:
    """Every rank's select() keyword arguments of a form at a step (one generator, the
    same on every rank). Unpacked: ids distinct within a rank, step 2 holds an id on
    two ranks, rows with nothing to score. Packed: several documents a row, padding,
    a document split over rank 0's and rank 1's rows, one out of range at step 3.
    ``owned`` (the sharded mode's contract): each rank's ids and documents from its
    own range; step 2 holds an id twice on the last rank, and a document is split
    over the first and the last row of a rank."""
    g = torch.Generator().manual_seed(1000 * step + FORMS.index(form))
    sizes = form_rows(step, world)
    perm = torch.randperm(FN, generator=g)
    out, at = [], 0
    for r, n in enumerate(sizes):
        if owned:
            perm, at = owned_perm(g, FN, world, r), 0
        tgt = torch.randint(0, FV, (n, FT), generator=g)
        if n > 1:
            tgt[1] = -100  # nothing to score in this row
        kw = {}
        if form.startswith("packed"):
            seg = torch.empty((n, FT), dtype=torch.int64)
            for row in range(n):
                cut = int(torch.randint(1, FT, (1,), generator=g))
                seg[row, :cut], seg[row, cut:] = perm[at], perm[at + 1]
                at += 2
            if n:
                seg[0, -1] = -1  # padding
            if owned and n > 2:  # the document that ends the rank's first row starts its last
                seg[-1, :2] = seg[0, -2]
            elif r == 1 and n and not owned:  # the document that ends rank 0's first row starts rank 1's
                seg[0, :2] = out[0]["segment_ids"][0, -2]
            if step == 3 and r == 0:
                seg[-1, -1] = FN + 1  # out of range: counted once
            kw["segment_ids"] = seg
        else:
            ids = perm[at : at + n].clone()
            at += n
            if step == 2 and r == world - 1 and n:
                ids[-1] = ids[0] if owned else out[0]["ids"][0]  # rank 0's (this rank's) first id again
            kw["ids"] = ids
        if form == "losses":
            kw["losses"] = torch.rand(n, generator=g) * 3
        elif form in ("logits", "packed_logits"):
            kw.update(logits=torch.randn(n, FT, FV, generator=g), targets=tgt, shift_labels=True)
        elif form in ("hidden", "packed_hidden"):
            w = torch.randn(FV, FH, generator=torch.Generator().manual_seed(5))  # the model's: one for all ranks
            kw.update(hidden=torch.randn(n, FT, FH, generator=g), weight=w, targets=tgt, workspace_bytes=40)
        else:
            kw["losses"] = torch.rand(n, FT, generator=g, dtype=torch.float64)
        out.append(kw)
    return out


def forms(rank, world, out, sharded: bool = False):
    """Every form of select on every rank, FSTEPS steps each: the selections and the state
    (``sharded``: the sharded state, on each rank's own ids and documents)."""
    from es_kernels.distributed import DistributedEvolvedSampler
    from es_kernels.sharded import ShardedEvolvedSampler

    D = ShardedEvolvedSampler if sharded else DistributedEvolvedSampler
    res = {}
    for form in FORMS:
        es = D(FN, FMINI, seed=7, meta_batch=FCAP)  # meta_tokens: agreed on the first packed call
        rec = []
        for step in range(FSTEPS):
            kw = form_inputs(step, world, form, owned=sharded)[rank]
            guard = no_host_sync() if step == 2 else contextlib.nullcontext()
            with guard:  # meta_tokens is agreed: the step's whole path, no host read
                sel = es.select(**kw)
            rec.append(tuple(getattr(sel, k) for k in ("positions", "scales", "losses", "weights")))
        res[form] = {"rec": rec, "final": (es.state.tensor.clone(), es.state.errors.clone(), es.step)}
    if sharded:  # a document of the next rank, over two rows: counted once, nothing else changes
        es = D(FN, FMINI, seed=7, meta_batch=FCAP)
        other, own = es.hi % FN, es.lo
        seg = torch.tensor([[other, other, own], [other, -1, own]])
        sel = es.select(segment_ids=seg, losses=torch.rand(2, 3, generator=torch.Generator().manual_seed(rank)))
        res["foreign"] = (es.state.tensor.clone(), es.state.errors.clone(), sel.weights, es.lo)
    return res


def forms_sharded(rank, world, out):
    """:func:`forms` on the sharded state."""
    return forms(rank, world, out, sharded=True)


# --------------------------------------------------------------------------- scoring schedules
SCHEDULES = ("fraction:0.5", "stale:2,cap=1")
SSTEPS = 8


def schedule(rank, world, out):
    """A scoring schedule on the sharded and the replicated sampler with the same inputs
    (each rank's own ids, uneven at step 3): scoring steps, steps from the state, and
    the picks' training losses observed; the selections, shards, replicas and counters."""
    from es_kernels.distributed import DistributedEvolvedSampler as D
    from es_kernels.sharded import ShardedEvolvedSampler as S

    res = {}
    for sch in SCHEDULES:
        sh, rp = (cls(N, MINI, seed=7, meta_batch=CAP, schedule=sch) for cls in (S, D))
        rec = []
        for step in range(SSTEPS):
            if step == 3:  # stale: epoch 0 scores, then from the state
                sh.set_epoch(1)
                rp.set_epoch(1)
            ids, losses = step_inputs(step % 4, world, owned=True)[rank]  # no id out of range
            scores = sh.needs_scores
            assert scores == rp.needs_scores
            kw = dict(losses=losses) if scores else {}
            with no_host_sync() if step in (1, 2) else contextlib.nullcontext():
                a = sh.select(ids, **kw)
            b = rp.select(ids, **kw)
            picked = ids[a.positions]
            train = resume_losses(picked, step)
            with no_host_sync() if step in (1, 2) else contextlib.nullcontext():
                oa = sh.observe(picked, train)
            ob = rp.observe(ids[b.positions], train)
            rec.append((scores, a, b, oa, ob))
        res[sch] = dict(
            rec=rec,
            shard=(sh.state.tensor.clone(), sh._counters.clone(), sh.lo, sh.hi),
            replica=(rp.state.tensor.clone(), rp._counters.clone()),
            sd={
                k: (type(v).__name__, tuple(v.shape), v.to_local().clone())
                for k, v in sh.state_dict()["counters"].items()
            },
        )
    return res
