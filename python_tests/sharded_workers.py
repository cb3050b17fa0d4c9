"""Bodies of the processes that python_tests/test_sharded.py spawns: one gloo group of
three processes, whose scenarios run on it (W = 3) and on the subgroup of ranks 0
and 1 (W = 2). Each rank saves what it saw to ``out/<name>_<rank>.pt``; the test
process checks it against single-process computations."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist_workers import no_host_sync

N, CAP, MINI, STEPS = 50, 8, 3, 6
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all_single",
    "broadcast",
    "barrier",
    "reduce_scatter_tensor",
)


def entry(rank: int, world: int, init_file: str, out: str, scenarios: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pair = dist.new_group([0, 1])  # every rank creates it; ranks 0 and 1 use it
        for name in scenarios:
            res = globals()[name](rank, pair, out)
            torch.save(res, os.path.join(out, f"{name}_{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def step_inputs(step: int, world: int):
    """Every rank's (ids, losses) of a step: ids of the rank's own range only. Step 3 is
    uneven (rank 1 short, rank 2 empty); step 4 repeats an id within the last rank (a
    wrap-around padding); step 5 has a NaN loss on rank 0 (rejected: errors[1])."""
    from es_kernels.sharded import shard_range

    g = torch.Generator().manual_seed(200 + step)
    out = []
    for r in range(world):
        lo, hi = shard_range(N, world, r)
        size = CAP if step != 3 else (5 if r == 1 else 0 if r == 2 else CAP)
        ids = lo + torch.randperm(hi - lo, generator=g)[:size]
        if step == 4 and r == world - 1:
            ids[-1] = ids[0]
        losses = torch.rand(size, generator=g, dtype=torch.float64).float() * 3
        if step == 5 and r == 0:
            losses[1] = float("nan")
        out.append((ids, losses))
    return out


@contextlib.contextmanager
def no_collective():
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def guard(name):
        def wrapper(*a, **k):
            raise AssertionError(f"collective dist.{name} on the sharded step path")

        return wrapper

    try:
        for n in saved:
            setattr(dist, n, guard(n))
        with no_host_sync():
            yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


@contextlib.contextmanager
def logged_collectives(log: list):
    """Record (name, shape, dtype) of every all_reduce."""
    real = dist.all_reduce

    def wrapper(t, *a, **k):
        log.append(("all_reduce", tuple(t.shape), str(t.dtype)))
        return real(t, *a, **k)

    dist.all_reduce = wrapper
    try:
        yield
    finally:
        dist.all_reduce = real


def groups(rank: int, pair):
    """The groups this rank belongs to: (W, group) for W = 3 (the default) and W = 2."""
    out = [(3, None)]
    if rank < 2:
        out.append((2, pair))
    return out


# --------------------------------------------------------------------------- ES steps
def es(rank, pair, out):
    """The sharded and the replicated sampler on the same own-range inputs, three kinds."""
    from es_kernels.distributed import DistributedEvolvedSampler as D
    from es_kernels.sharded import ShardedEvolvedSampler as S

    res = {}
    for world, g in groups(rank, pair):
        r = dist.get_rank(g)
        for kind, kw in {
            "sample": dict(seed=7),
            "eps": dict(seed=7, eps=0.25),
            "topk": dict(select_mode="topk"),
        }.items():
            sh = S(N, MINI, process_group=g, meta_batch=CAP, **kw)
            rp = D(N, MINI, process_group=g, meta_batch=CAP, **kw)
            steps = []
            for step in range(STEPS):
                ids, losses = step_inputs(step, world)[r]
                with no_collective() if step in (1, 4) else contextlib.nullcontext():
                    a = sh.select(ids, losses=losses)
                b = rp.select(ids, losses=losses)
                steps.append((a.positions, a.weights, a.losses, b.positions, b.weights))
            got = dict(steps=steps, shard=sh.state.tensor.clone(), replica=rp.state.tensor.clone())
            got.update(counts=sh.error_counts(), replica_errors=rp.state.errors.clone(), step=sh.step)
            try:
                sh.check()
            except RuntimeError as e:
                got["check"] = str(e)
            sh.state.reset_errors()
            sh.check()  # cleared on every rank: passes everywhere
            # an id of another rank: counted on this rank only, summed by check()
            other = torch.tensor([sh.hi % N, sh.lo])
            w = sh.observe(other, torch.tensor([1.0, 2.0]))
            got["observe_other"] = (w, sh.state.errors.clone(), sh.error_counts())
            res[(world, kind)] = got
    # the first call without meta_batch agrees on it (one all_reduce), then no collective
    sh = S(N, MINI, seed=7)
    ids, losses = step_inputs(0, 3)[rank]
    log = []
    with logged_collectives(log):
        sh.select(ids, losses=losses)
    res["first_call"] = (log, sh.meta_batch)
    return res


# --------------------------------------------------------------------------- ESWP plans
EN = 53


def filled(es, world: int, r: int) -> None:
    """Observe every id of the rank's range with a loss of the id (the same in every run)."""
    from es_kernels.sharded import shard_range

    lo, hi = shard_range(EN, world, r)
    ids = torch.arange(lo, hi)
    es.observe(ids, torch.rand(EN, generator=torch.Generator().manual_seed(1))[lo:hi])


def eswp(rank, pair, out):
    """Plans at a pruning epoch and an annealing one; the collectives of an epoch start
    (their sizes) for two different states."""
    from es_kernels.sharded import ShardedESWPSampler, ShardedEvolvedSampler

    res = {}
    for world, g in groups(rank, pair):
        r = dist.get_rank(g)
        es = ShardedEvolvedSampler(EN, 4, seed=11, meta_batch=CAP, process_group=g)
        filled(es, world, r)
        pr = ShardedESWPSampler(es, num_epochs=4, prune_ratio=0.5)
        for epoch in (0, 3):  # 3 >= anneal_stop(4, 0.125) = 3: nothing pruned
            pr.set_epoch(epoch)
            log = []
            with logged_collectives(log):
                length = len(pr)
                ids = list(pr)
            res[(world, epoch)] = dict(length=length, ids=ids, scale=es.scale.clone(), log=log, next=pr.epoch)
        res[(world, "shard")] = es.state.tensor.clone()
        es2 = ShardedEvolvedSampler(EN, 4, seed=11, meta_batch=CAP, process_group=g)  # nothing observed
        pr2 = ShardedESWPSampler(es2, num_epochs=4, prune_ratio=0.5)
        log = []
        with logged_collectives(log):
            res[(world, "empty")] = (list(pr2), es2.scale.clone())
        res[(world, "empty_log")] = log
    return res


# --------------------------------------------------------------------------- checkpoints
RN, RB, RMINI, REPOCHS = 37, 4, 2, 3


def resume_losses(ids: torch.Tensor, step: int) -> torch.Tensor:
    return ((ids * 7919 + step * 104729) % 1009).to(torch.float32) / 300


def template(group, num_samples=RN):
    """Fresh samplers of other settings, and their state dicts (the load's template)."""
    from es_kernels.sharded import ShardedESWPSampler as P
    from es_kernels.sharded import ShardedEvolvedSampler as S

    es = S(num_samples, 1, seed=99, beta1=0.9, process_group=group)
    pr = P(es, num_epochs=9, prune_ratio=0.1, seed=5)
    return es, pr, {"es": es.state_dict(), "pr": pr.state_dict()}


def loaded(path: str, group):
    es, pr, sd = template(group)
    dcp.load(sd, checkpoint_id=path, process_group=group)
    es.load_state_dict(sd["es"])
    pr.load_state_dict(sd["pr"])
    return es, pr


def resume_run(group, path, prune_ratio, stop=None, load=False, epochs=REPOCHS):
    """The README's loop on ShardedESWPSampler; ``stop``: save after that step and return;
    ``load``: restore the checkpoint into fresh samplers first."""
    from torch.utils.data import DataLoader

    from es_kernels.sharded import ShardedESWPSampler as P
    from es_kernels.sharded import ShardedEvolvedSampler as S

    if load:
        es, pr = loaded(path, group)
    else:
        es = S(RN, RMINI, seed=3, meta_batch=RB, process_group=group)
        pr = P(es, num_epochs=REPOCHS, prune_ratio=prune_ratio)
    rec = []
    for epoch in range(pr.epoch, epochs):
        pr.set_epoch(epoch)
        for ids in DataLoader(range(RN), batch_size=RB, sampler=pr):
            step = es.step
            sel = es.select(ids, losses=resume_losses(ids, step))
            rec.append((epoch, ids, sel.positions, sel.scales, sel.weights))
            if step == stop:
                dcp.save({"es": es.state_dict(), "pr": pr.state_dict()}, checkpoint_id=path, process_group=group)
                return {"rec": rec}
    return {"rec": rec, "final": (es.state.tensor.clone(), es.step, es.epoch, pr.epoch, es.scale)}


def resume(rank, pair, out):
    """Mid-epoch resume after every step of the pruning run (W = 3), and a few (W = 2)."""
    res = {}
    for world, g in groups(rank, pair):
        for prune_ratio in (0.5,):
            full = resume_run(g, None, prune_ratio)
            stops = range(len(full["rec"])) if world == 3 else (0, 4, 9)
            runs = {}
            for stop in stops:
                path = os.path.join(out, f"resume_w{world}_s{stop}")
                before = resume_run(g, path, prune_ratio, stop=stop)
                runs[stop] = (before, resume_run(g, path, prune_ratio, load=True))
            res[world] = {"full": full, "runs": runs}
    return res


def _shard_view(es, pr):
    return dict(
        state=es.state.tensor.clone(),
        lo=es.lo,
        step=es.step,
        epoch=es.epoch,
        scale=None if es.scale is None else es.scale.clone(),
        pr_epoch=pr.epoch,
        meta_batch=es.meta_batch,
    )


def reshard(rank, pair, out):
    """2 -> 3 and 3 -> 2 ranks, at an epoch boundary (loads) and mid-epoch (the ES state
    loads, the ESWP epoch in progress is refused on every rank)."""
    from torch.utils.data import DataLoader

    from es_kernels.sharded import ShardedESWPSampler as P
    from es_kernels.sharded import ShardedEvolvedSampler as S

    res = {}
    b2, m2, b3 = (os.path.join(out, f"reshard_{k}") for k in ("b2", "m2", "b3"))
    if rank < 2:  # train one epoch on 2 ranks, save; two batches more, save again
        es = S(RN, RMINI, seed=3, meta_batch=RB, process_group=pair)
        pr = P(es, num_epochs=REPOCHS, prune_ratio=0.5)
        for ids in DataLoader(range(RN), batch_size=RB, sampler=pr):
            es.select(ids, losses=resume_losses(ids, es.step))
        dcp.save({"es": es.state_dict(), "pr": pr.state_dict()}, checkpoint_id=b2, process_group=pair)
        res["saved_b2"] = _shard_view(es, pr)
        for k, ids in enumerate(DataLoader(range(RN), batch_size=RB, sampler=pr)):
            es.select(ids, losses=resume_losses(ids, es.step))
            if k == 1:
                break
        dcp.save({"es": es.state_dict(), "pr": pr.state_dict(position=2 * RB)}, checkpoint_id=m2, process_group=pair)
        res["saved_m2"] = _shard_view(es, pr)
    dist.barrier()
    es, pr = loaded(b2, None)  # on 3 ranks
    res["loaded_b2"] = _shard_view(es, pr)
    steps = 0
    for ids in DataLoader(range(RN), batch_size=RB, sampler=pr):  # the next epoch, planned on 3 ranks
        es.select(ids, losses=resume_losses(ids, es.step))
        steps += 1
    res["epoch_on_3"] = (steps, len(pr), es.step)
    dcp.save({"es": es.state_dict(), "pr": pr.state_dict()}, checkpoint_id=b3)
    res["saved_b3"] = _shard_view(es, pr)
    es, pr, sd = template(None)
    dcp.load(sd, checkpoint_id=m2)
    es.load_state_dict(sd["es"])
    try:
        pr.load_state_dict(sd["pr"])
        res["m2_refused"] = None
    except ValueError as e:
        res["m2_refused"] = str(e)
    res["loaded_m2"] = _shard_view(es, pr)
    dist.barrier()
    if rank < 2:
        es, pr = loaded(b3, pair)
        res["loaded_b3"] = _shard_view(es, pr)
    return res


def bad_value(rank, pair, out):
    """A checkpoint whose values are bad on one rank only: every rank raises, none loads."""
    from es_kernels.sharded import ShardedEvolvedSampler as S

    es = S(RN, RMINI, seed=3, meta_batch=RB)
    ids = torch.arange(es.lo, es.lo + 3)
    es.select(ids, losses=resume_losses(ids, 0))
    sd = es.state_dict()
    if rank == 2:
        sd["state"]["d"].to_local()[0] = float("inf")
    fresh = S(RN, RMINI, seed=3, meta_batch=RB)
    before = fresh.state.tensor.clone()
    try:
        fresh.load_state_dict(sd)
        msg = None
    except ValueError as e:
        msg = str(e)
    try:
        S(4, 1)  # ceil(4 / 3) = 2 ids per rank: rank 2 would own none
        empty = None
    except ValueError as e:
        empty = str(e)
    unchanged = torch.equal(before.view(torch.int32), fresh.state.tensor.view(torch.int32))
    return dict(msg=msg, unchanged=unchanged, empty=empty)


# --------------------------------------------------------------------------- scoring schedules
def schedule_run(es, world: int, r: int, steps: range) -> list:
    """A schedule's loop on the rank's own ids: scores when asked, the picks' losses observed."""
    rec = []
    for step in steps:
        ids, losses = step_inputs(step % 4, world)[r]  # no NaN loss
        sel = es.select(ids, losses=losses) if es.needs_scores else es.select(ids)
        es.observe(ids[sel.positions], resume_losses(ids[sel.positions], step))
        rec.append((sel.positions, sel.weights))
    return rec


def schedule_reshard(rank, pair, out):
    """A scoring schedule's counters in the checkpoint: saved on 2 ranks mid-run, resumed
    on 2 (bit for bit) and loaded on 3 (resharded with the state)."""
    from es_kernels.sharded import ShardedEvolvedSampler as S

    path = os.path.join(out, "schedule_ckpt")
    res = {}
    if rank < 2:
        es = S(N, MINI, seed=7, meta_batch=CAP, schedule="fraction:0.5", process_group=pair)
        schedule_run(es, 2, rank, range(4))
        dcp.save(es.state_dict(), checkpoint_id=path, process_group=pair)
        saved = (es.state.tensor.clone(), es._counters[:, :-1].clone())
        rest = schedule_run(es, 2, rank, range(4, 9))
        again = S(N, 1, seed=99, schedule="stale:9", process_group=pair)  # other settings, counters kept
        sd = again.state_dict()
        dcp.load(sd, checkpoint_id=path, process_group=pair)
        again.load_state_dict(sd)
        resumed = schedule_run(again, 2, rank, range(4, 9))
        res["pair"] = dict(
            saved=saved,
            rest=rest,
            resumed=resumed,
            final=[(s.state.tensor.clone(), s._counters.clone(), s.step) for s in (es, again)],
        )
    dist.barrier()
    three = S(N, 1, seed=99, schedule="stale:9")
    sd = three.state_dict()
    dcp.load(sd, checkpoint_id=path)
    three.load_state_dict(sd)
    res["three"] = (three.state.tensor.clone(), three._counters[:, :-1].clone(), str(three.schedule), three.step)
    return res
