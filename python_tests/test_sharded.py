"""The sharded state (docs/spec.md section 11.2) on a real gloo group of three spawned
processes (W = 3, and W = 2 on the subgroup of ranks 0 and 1), against the replicated
sampler and single-process computations; then checks in a group of one process."""

from __future__ import annotations

import math
import re

import pytest
import sharded_workers as SW
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_state_equal, bad_select_forms

import es_kernels as ek
from es_kernels import reference as R
from es_kernels._spec import DEFAULT_LAM
from es_kernels.sharded import shard_prune_plan, shard_range

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)

SCENARIOS = ("es", "eswp", "resume", "reshard", "bad_value", "schedule_reshard")


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(SW.entry, args=(3, str(out / "init"), str(out), SCENARIOS), nprocs=3, join=True)
    return {(name, r): torch.load(out / f"{name}_{r}.pt", weights_only=False) for name in SCENARIOS for r in range(3)}


def members(world: int) -> range:
    return range(world)  # W = 2: ranks 0 and 1 of the group, ranks 0 and 1 of the pair


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# --------------------------------------------------------------------------- ES steps
def single_process_state(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's observations (an id repeated within a rank: once, at its first
    position) applied to one full state."""
    st = ek.ESState(SW.N)
    for step in range(SW.STEPS):
        ids_all, losses_all = [], []
        for ids, losses in SW.step_inputs(step, world):
            seen = set()
            for i, loss in zip(ids.tolist(), losses.tolist()):
                if i not in seen:
                    seen.add(i)
                    ids_all.append(i)
                    losses_all.append(loss)
        R.es_update(torch.tensor(ids_all), torch.tensor(losses_all), st.tensor, st.errors, 0.2, 0.5, DEFAULT_LAM)
    return st.tensor, st.errors


def test_steps_equal_the_replicated_sampler_and_one_process(group):
    for world in (2, 3):
        want_state, want_errors = single_process_state(world)
        for kind in ("sample", "eps", "topk"):
            shards = []
            for r in members(world):
                got = group[("es", r)][(world, kind)]
                lo, hi = shard_range(SW.N, world, r)
                for step, (pos, w, losses, rpos, rw) in enumerate(got["steps"]):
                    ids, want_losses = SW.step_inputs(step, world)[r]
                    assert torch.equal(pos, rpos), (world, kind, r, step)
                    assert torch.equal(bits(w), bits(rw)), (world, kind, r, step)
                    assert torch.equal(bits(losses), bits(want_losses))
                    assert len(pos) == min(SW.MINI, len(ids))
                assert torch.equal(bits(got["shard"]), bits(got["replica"][lo:hi])), (world, kind, r)
                assert got["step"] == SW.STEPS
                # the NaN loss of step 5: one rejected observation, summed over the shards
                assert got["counts"] == tuple(got["replica_errors"].tolist()) == tuple(want_errors.tolist()) == (0, 1)
                assert "0 id(s) outside the ranks' own ranges" in got["check"]
                assert "1 non-finite observation(s)" in got["check"]
                shards.append(got["shard"])
            assert_state_equal((torch.cat(shards), want_errors), (want_state, want_errors))


def test_ids_of_another_rank_are_counted_and_summed(group):
    for world in (2, 3):
        for r in members(world):
            w, local, summed = group[("es", r)][(world, "sample")]["observe_other"]
            assert local.tolist() == [1, 0]  # the other rank's id; its own id observed
            assert summed == (world, 0)
            assert w[0].item() == float(torch.tensor(1e-8, dtype=torch.float32))


def test_first_call_agrees_on_meta_batch_once(group):
    for r in range(3):
        log, cap = group[("es", r)]["first_call"]
        assert log == [("all_reduce", (1,), "torch.int64")] and cap == SW.CAP


# --------------------------------------------------------------------------- ESWP
def test_eswp_plans_partition_the_single_process_plan(group):
    for world in (2, 3):
        full = torch.cat([group[("eswp", r)][(world, "shard")] for r in members(world)])
        st = ek.ESState(SW.EN)
        st.tensor.copy_(full)
        for epoch in (0, 3):
            res = ek.eswp_prune(st, 0.5, seed=11, epoch=epoch, num_epochs=4)
            kept = set(res.kept_ids.tolist())
            got = [group[("eswp", r)][(world, epoch)] for r in members(world)]
            assert torch.equal(torch.cat([g["scale"] for g in got]), res.scale)  # the same drops and scales
            own = [set(g["ids"]) for g in got]
            assert set().union(*own) == kept
            L = max(len(s) for s in own)
            for r, g in enumerate(got):
                lo, hi = shard_range(SW.EN, world, r)
                assert g["length"] == len(g["ids"]) == L and g["next"] == epoch + 1
                assert all(lo <= i < hi for i in g["ids"])
                k = len(own[r])
                assert len(set(g["ids"][:k])) == k and g["ids"][k:] == (g["ids"][:k] * L)[: L - k]
            if epoch == 3:
                assert kept == set(range(SW.EN))
            else:
                assert len(kept) < SW.EN


def test_eswp_epoch_start_collectives_do_not_depend_on_values(group):
    check = [("all_reduce", (2,), "torch.int64")]  # es.check(), when iter() starts the epoch
    plan = [("all_reduce", (1,), "torch.float64"), ("all_reduce", (3,), "torch.int64")]  # threshold
    plan += [("all_reduce", (1,), "torch.int64")]  # the epoch's length
    for world in (2, 3):
        for r in members(world):
            res = group[("eswp", r)]
            assert res[(world, 0)]["log"] == res[(world, 3)]["log"] == plan + check  # len(), then iter()
            assert res[(world, "empty_log")] == check + plan  # iter() alone
            ids, scale = res[(world, "empty")]  # nothing observed: nothing below NaN, all kept
            lo, hi = shard_range(SW.EN, world, r)
            assert sorted(set(ids)) == list(range(lo, hi)) and bool((scale == 1).all())


def test_threshold_sum_over_many_ranks_does_not_overflow():
    """The all_reduce of the fixed-point words over 2**15 virtual ranks of 2**20 ids
    each (N = 2**35, every q_i = -2**29): int64 sums of the words, as the collective
    adds them, give the exact mean; one int64 sum of q_i would reach -2**64."""
    import es_kernels.sharded as sharded

    shard = torch.zeros(1 << 20, 2)
    shard[:, 0] = -1.0  # score -1: e = 1, p = 29, q = -2**29
    amax = float(sharded._score_max(shard))
    words = sharded._fixed_point(shard, amax) * (1 << 15)  # what all_reduce(SUM) of 2**15 equal shards gives
    assert sharded._threshold(amax, words.tolist()) == -1.0


@pytest.mark.parametrize("chunk", [1 << 22, 37])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_plans_in_one_process(world, chunk, monkeypatch):
    """shard_prune_plan over virtual shards, with the threshold of the whole state: the
    union of the plans is eswp_prune's (and W = 1 its visit order), whatever the chunks
    the planning works in."""
    import es_kernels.sharded as sharded

    monkeypatch.setattr(sharded, "PLAN_CHUNK", chunk)
    n = 300
    st = ek.ESState(n)
    g = torch.Generator().manual_seed(world)
    seen = torch.randperm(n, generator=g)[: 2 * n // 3]
    ek.es_update(seen, torch.rand(seen.shape[0], generator=g) * 4, st)
    _, _, tau = R.prune_threshold(st.tensor)
    parts = [st.tensor[slice(*shard_range(n, world, r))] for r in range(world)]
    amax = max(float(sharded._score_max(p)) for p in parts)
    words = [sum(v) for v in zip(*(sharded._fixed_point(p, amax).tolist() for p in parts))]
    assert sharded._threshold(amax, words) == tau  # the ranks' integer sums add up, bit for bit
    for epoch, ratio in ((0, 0.5), (1, 0.9), (5, 0.5)):
        res = ek.eswp_prune(st, ratio, seed=3, epoch=epoch, num_epochs=6)
        kept, scales = [], []
        for r in range(world):
            lo, hi = shard_range(n, world, r)
            k, s = shard_prune_plan(st.tensor[lo:hi], lo, r, tau, ratio, 3, epoch, 6)
            assert k.tolist() == [i for i in k.tolist() if lo <= i < hi]
            kept.append(k)
            scales.append(s)
        assert torch.equal(torch.cat(scales), res.scale)
        assert sorted(torch.cat(kept).tolist()) == sorted(res.kept_ids.tolist())
        if world == 1:
            assert torch.equal(kept[0], res.kept_ids)


# --------------------------------------------------------------------------- checkpoints
def test_resume_mid_epoch_bit_for_bit(group):
    for world in (2, 3):
        for r in members(world):
            res = group[("resume", r)][world]
            want = res["full"]["rec"]
            assert len(want) >= 3 * SW.REPOCHS
            for stop, (before, after) in res["runs"].items():
                got = before["rec"] + after["rec"]
                assert len(got) == len(want), (world, r, stop)
                for k, (a, b) in enumerate(zip(got, want)):
                    assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:])), (world, r, stop, k)
                fa, fb = after["final"], res["full"]["final"]
                assert torch.equal(bits(fa[0]), bits(fb[0])) and fa[1:4] == fb[1:4]
                assert torch.equal(fa[4], fb[4])


def test_reshard_2_to_3_and_3_to_2(group):
    def joined(key, ranks):
        views = [group[("reshard", r)][key] for r in ranks]
        return views, torch.cat([v["state"] for v in views]), torch.cat([v["scale"] for v in views])

    saved, s2, sc2 = joined("saved_b2", (0, 1))
    loaded, s3, sc3 = joined("loaded_b2", (0, 1, 2))
    assert torch.equal(bits(s2), bits(s3)) and torch.equal(sc2, sc3)
    for v in loaded:
        assert (v["step"], v["epoch"], v["pr_epoch"]) == (saved[0]["step"], 0, 1)
        assert v["meta_batch"] is None  # another group: the saved cap is not imposed
    assert [v["lo"] for v in loaded] == [0, 13, 26]
    # the next epoch runs on 3 ranks, in step
    epochs = [group[("reshard", r)]["epoch_on_3"] for r in range(3)]
    assert len(set(epochs)) == 1 and epochs[0][0] == math.ceil(epochs[0][1] / SW.RB)
    saved, s3, sc3 = joined("saved_b3", (0, 1, 2))
    loaded, s2, sc2 = joined("loaded_b3", (0, 1))
    assert torch.equal(bits(s2), bits(s3)) and torch.equal(sc2, sc3)
    assert [v["lo"] for v in loaded] == [0, 19]
    assert all((v["step"], v["epoch"], v["pr_epoch"]) == (saved[0]["step"], 1, 2) for v in loaded)
    # mid-epoch on 2 ranks: the state loads on 3, the ESWP epoch in progress is refused on every rank
    _, sm2, _ = joined("saved_m2", (0, 1))
    views, sm3, _ = joined("loaded_m2", (0, 1, 2))
    assert torch.equal(bits(sm2), bits(sm3))
    for r in range(3):
        msg = group[("reshard", r)]["m2_refused"]
        assert msg and "state_dict['num_replicas'] is 2" in msg and "cannot continue on 3" in msg


def test_a_bad_value_on_one_rank_is_refused_on_every_rank(group):
    for r in range(3):
        got = group[("bad_value", r)]
        assert got["unchanged"]
        assert got["msg"] is not None
    assert "state_dict['state']['d'] holds a non-finite value" in group[("bad_value", 2)]["msg"]
    assert "another rank" in group[("bad_value", 0)]["msg"]
    for r in range(3):  # N = 4 on 3 ranks leaves rank 2 without ids: refused on every rank
        assert "num_samples=4 leaves rank 2 of 3 without ids" in group[("bad_value", r)]["empty"]


def test_schedule_counters_resume_and_reshard(group):
    """A schedule's counters go into the sharded checkpoint: resumed on as many ranks the
    run continues bit for bit; on 3 ranks the state and counters are the saved ones."""
    pair = [group[("schedule_reshard", r)]["pair"] for r in (0, 1)]
    for p in pair:
        for (a, wa), (b, wb) in zip(p["rest"], p["resumed"], strict=True):
            assert torch.equal(a, b) and torch.equal(bits(wa), bits(wb))
        (s1, c1, k1), (s2, c2, k2) = p["final"]
        assert torch.equal(bits(s1), bits(s2)) and torch.equal(c1, c2) and k1 == k2 == 9
    saved_state = torch.cat([p["saved"][0] for p in pair])
    saved_counters = torch.cat([p["saved"][1] for p in pair], dim=1)
    assert bool(saved_counters[1].any())  # picks from the state were counted
    three = [group[("schedule_reshard", r)]["three"] for r in range(3)]
    assert torch.equal(bits(torch.cat([t[0] for t in three])), bits(saved_state))
    assert torch.equal(torch.cat([t[1] for t in three], dim=1), saved_counters)
    assert all(t[2] == "fraction:0.5,cap=1" and t[3] == 4 for t in three)


# --------------------------------------------------------------------------- one process
@pytest.fixture
def solo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        yield tmp_path
    finally:
        dist.destroy_process_group()


def test_world_of_one_equals_the_single_process_samplers(solo):
    from es_kernels.sharded import ShardedESWPSampler, ShardedEvolvedSampler

    a = ek.EvolvedSampler(100, 7, seed=5)
    d = ShardedEvolvedSampler(100, 7, seed=5)
    pa, pd = ek.ESWPSampler(a, num_epochs=3), ShardedESWPSampler(d, num_epochs=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ia, idd = pa.epoch_ids(), pd.epoch_ids()
        assert torch.equal(ia, idd) and torch.equal(a.scale, d.scale)
        for k in range(0, len(ia), 30):
            ids = ia[k : k + 30]
            losses = torch.rand(len(ids), generator=g)
            x, y = a.select(ids, losses=losses), d.select(ids, losses=losses)
            assert torch.equal(x.positions, y.positions) and torch.equal(x.weights, y.weights)
            assert torch.equal(x.scales, y.scales)
    assert_state_equal((a.state.tensor, a.state.errors), (d.state.tensor, d.state.errors))


def test_world_of_one_every_form_and_schedule_equal_the_single_process_sampler(solo):
    """W = 1, cap = B, eps = 0: every form of select (token losses, logits with ignored
    targets and shift_labels, hidden states, packed rows) and a scoring schedule's steps
    (from the state, observe) give the single-process sampler's results bit for bit."""
    from test_distributed import assert_selection_equal, every_form

    from es_kernels.sharded import ShardedEvolvedSampler

    for mode in ("sample", "topk"):
        a = ek.EvolvedSampler(40, 3, seed=5, select_mode=mode)
        s = ShardedEvolvedSampler(40, 3, seed=5, select_mode=mode, meta_batch=6)
        g = torch.Generator().manual_seed(1)
        for rnd in range(2):
            for k, kw in enumerate(every_form(g)):
                assert_selection_equal(a.select(**kw), s.select(**kw), (mode, rnd, k))
                assert_state_equal((a.state.tensor, a.state.errors), (s.state.tensor, s.state.errors))
    for sch in ("fraction:0.5", "stale:3,cap=1"):
        a = ek.EvolvedSampler(40, 3, seed=5, schedule=sch)
        s = ShardedEvolvedSampler(40, 3, seed=5, meta_batch=8, schedule=sch)
        g = torch.Generator().manual_seed(2)
        for step in range(12):
            if step == 4:
                a.set_epoch(1)
                s.set_epoch(1)
            ids = torch.randperm(40, generator=g)[:8]
            kw = dict(losses=torch.rand(8, generator=g)) if a.needs_scores else {}
            x, y = a.select(ids, **kw), s.select(ids, **kw)
            assert_selection_equal(x, y, (sch, step))
            loss = torch.rand(3, generator=g)
            oa, os_ = a.observe(ids[x.positions], loss), s.observe(ids[y.positions], loss)
            assert (oa is None) == (os_ is None) and (oa is None or torch.equal(oa, os_))
            assert torch.equal(a._counters, s._counters)
            assert_state_equal((a.state.tensor, a.state.errors), (s.state.tensor, s.state.errors))


def test_every_form_refuses_bad_input_before_writing(solo):
    """The new forms' bad input: ValueError naming the argument, nothing written."""
    from es_kernels.sharded import ShardedEvolvedSampler

    es = ShardedEvolvedSampler(40, 3, seed=5, meta_batch=6, schedule="fraction:0.5")
    bad = bad_select_forms()
    bad["more than meta_batch=6"] = dict(segment_ids=torch.zeros(7, 2, dtype=torch.int64), losses=torch.rand(7, 2))
    bad["this step scores its meta-batch"] = dict(ids=torch.arange(4))
    for want, kw in bad.items():
        with pytest.raises(ValueError, match=re.escape(want)):
            es.select(**kw)
        assert es.step == 0 and es.error_counts() == (0, 0) and bool(es.state.s.isnan().all()), want
        assert not bool(es._counters.any()), want
    es.select(segment_ids=torch.zeros(4, 5, dtype=torch.int64), losses=torch.rand(4, 5))  # a good call goes through
    assert es.step == 1


def test_bad_arguments_raise_value_errors_naming_them(solo):
    import torch.distributed.checkpoint as dcp

    from es_kernels.sharded import ShardedESWPSampler, ShardedEvolvedSampler

    with pytest.raises(ValueError, match="num_samples"):
        ShardedEvolvedSampler(0, 2)
    with pytest.raises(ValueError, match="mini_batch"):
        ShardedEvolvedSampler(10, 0)
    with pytest.raises(ValueError, match="meta_batch"):
        ShardedEvolvedSampler(10, 2, meta_batch=0)
    with pytest.raises(ValueError, match="es must be a ShardedEvolvedSampler"):
        ShardedESWPSampler(ek.EvolvedSampler(10, 2), num_epochs=2)
    es = ShardedEvolvedSampler(10, 2, meta_batch=4)
    with pytest.raises(ValueError, match="more than meta_batch=4"):
        es.select(torch.arange(5), losses=torch.rand(5))
    with pytest.raises(ValueError, match="ids must have dtype"):
        es.select(torch.arange(3.0), losses=torch.rand(3))
    with pytest.raises(ValueError, match="ids and losses must have the same length"):
        es.select(torch.arange(3), losses=torch.rand(2))
    with pytest.raises(ValueError, match="either logits"):
        es.select(torch.arange(3))
    assert es.step == 0 and bool(es.state.s.isnan().all())

    pr = ShardedESWPSampler(es, num_epochs=3)
    it = iter(pr)
    ids = torch.tensor([next(it) for _ in range(4)])
    es.select(ids, losses=torch.rand(4))
    sd = {"es": es.state_dict(), "pr": pr.state_dict()}
    dcp.save(sd, checkpoint_id=str(solo / "ck"))
    fresh = ShardedEvolvedSampler(10, 2, meta_batch=5)
    cases = {
        "state_dict['sharded']['num_samples'] is 10, this sampler has 11": (ShardedEvolvedSampler(11, 2), None),
        "['meta_batch'] is 4, this sampler was given meta_batch=5": (fresh, None),
        "state_dict['step'] must be in": (ShardedEvolvedSampler(10, 2), ("step", -1)),
        "state_dict['scale_set'] must be a bool": (ShardedEvolvedSampler(10, 2), ("scale_set", 1)),
        "state_dict['state']['s'] must be a DTensor": (ShardedEvolvedSampler(10, 2), ("s", torch.zeros(10))),
    }
    for want, (target, edit) in cases.items():
        bad = es.state_dict()
        if edit is not None:
            key, value = edit
            if key == "s":
                bad["state"] = {**bad["state"], "s": value}
            else:
                bad[key] = value
        before = target.state.tensor.clone()
        with pytest.raises(ValueError, match=re.escape(want)):
            target.load_state_dict(bad)
        assert torch.equal(bits(before), bits(target.state.tensor)) and target.step == 0
    pr_sd = pr.state_dict()
    with pytest.raises(ValueError, match=re.escape("state_dict['position'] must be <")):
        ShardedESWPSampler(es, num_epochs=3).load_state_dict({**pr_sd, "position": 10})
    with pytest.raises(ValueError, match=re.escape("state_dict['position'] must be 0 without a plan")):
        ShardedESWPSampler(es, num_epochs=3).load_state_dict({**pr_sd, "plan": False})


def test_a_rank_without_ids_is_refused(tmp_path):
    """N = 5 on 4 ranks would leave rank 3 empty (ceil(5/4) = 2 ids each)."""
    from es_kernels.sharded import ShardedEvolvedSampler

    assert [shard_range(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert [shard_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    sizes = [len(c) for c in torch.arange(10).chunk(4)]
    assert sizes == [hi - lo for lo, hi in (shard_range(10, 4, r) for r in range(4))]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        ShardedEvolvedSampler(1, 1)  # one rank, one id: fine
    finally:
        dist.destroy_process_group()


def test_checked_mode_refuses_repeated_ids_and_check_raises(solo, monkeypatch):
    from es_kernels.sharded import ShardedEvolvedSampler

    es = ShardedEvolvedSampler(10, 2, meta_batch=4)
    ids = torch.tensor([3, 1, 3])
    w = es.select(ids, losses=torch.tensor([1.0, 2.0, 5.0])).weights  # a repeat: observed once, first position
    assert w.tolist() == [1.0, 2.0, 1.0] and es.state.s[3].item() == 1.0 and es.error_counts() == (0, 0)
    es.select(torch.tensor([10, -1]), losses=torch.tensor([1.0, 2.0]))  # outside [0, N): counted
    assert es.error_counts() == (2, 0)
    with pytest.raises(RuntimeError, match=r"2 id\(s\) outside the ranks' own ranges"):
        es.check()
    with pytest.raises(RuntimeError, match="outside the ranks' own ranges"):
        es.state_dict()
    es.state.reset_errors()
    monkeypatch.setenv("ES_KERNELS_CHECKED", "1")
    before = es.state.tensor.clone()
    with pytest.raises(RuntimeError, match="rank 0 passed duplicate ids"):
        es.select(ids, losses=torch.tensor([1.0, 2.0, 5.0]))
    assert torch.equal(bits(before), bits(es.state.tensor))
