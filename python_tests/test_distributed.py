"""ES and ESWP on real gloo process groups of 2 and 3 processes (spawned), against a
single process that applies the same global observations (docs/spec.md section 11.1);
the sharded state (section 11.2) passes the same checks on each rank's own ids.

One spawned group per world size runs every scenario (python_tests/dist_workers.py);
the tests here read what each rank saved."""

from __future__ import annotations

import math
import re

import dist_workers as W
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_state_equal, bad_select_forms

import es_kernels as ek
from es_kernels import reference as R
from es_kernels._spec import DEFAULT_LAM
from es_kernels.distributed import shard_indices, shard_length
from es_kernels.sampler import cat_ids

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)

SHARDED = ("es_sharded", "checked_sharded", "forms_sharded", "schedule")
SCENARIOS = {
    2: ("es", "eswp", "checked", "resume", "forms", *SHARDED, "demo"),
    3: ("es", "eswp", "checked", "resume", "forms", *SHARDED),
}  # demo: the costliest


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def group(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(W.entry, args=(world, str(out / "init"), str(out), SCENARIOS[world]), nprocs=world, join=True)
    return world, {
        (name, r): torch.load(out / f"{name}_{r}.pt", weights_only=False)
        for name in SCENARIOS[world]
        for r in range(world)
    }


def single_process(world: int, select_mode="sample", seed=7, eps=0.0, owned=False):
    """Apply every step's gathered observations to one state (an id seen twice in a step:
    once, at its lowest global position), then each rank's selection from the global keys
    (``owned``: on the sharded mode's inputs, each rank's ids from its own range)."""
    st = ek.ESState(W.N)
    state, errors = st.tensor, st.errors
    picks = []
    for step in range(W.STEPS):
        inputs = W.step_inputs(step, world, owned)
        gids = torch.full((world * W.CAP,), -1, dtype=torch.int64)
        real = torch.zeros(world * W.CAP, dtype=torch.bool)
        glosses = torch.zeros(world * W.CAP)
        for r, (ids, losses) in enumerate(inputs):
            gids[r * W.CAP : r * W.CAP + len(ids)] = ids
            glosses[r * W.CAP : r * W.CAP + len(ids)] = losses
            real[r * W.CAP : r * W.CAP + len(ids)] = True
        first = {}
        for p in range(world * W.CAP):
            if real[p] and int(gids[p]) not in first:
                first[int(gids[p])] = p
        order = sorted(first.values())
        w_first = R.es_update(gids[order], glosses[order], state, errors, 0.2, 0.5, DEFAULT_LAM)
        w_of = {int(gids[p]): w for p, w in zip(order, w_first)}
        w_all = torch.tensor([float(w_of[int(gids[p])]) if real[p] else 0.0 for p in range(world * W.CAP)])
        # keys of every global position p = r * CAP + j, same seed and step
        x0 = R._philox_words(world * W.CAP, seed, step, R.STREAM_SELECT, "cpu")[0]
        E = -torch.log(R.uniform_from_bits(x0).double())
        step_picks = []
        for r, (ids, _) in enumerate(inputs):
            lo, n = r * W.CAP, len(ids)
            own = w_all[lo : lo + n]
            if select_mode == "topk":
                keys = own
            else:
                v = R.exact_mean_weights(own, eps).float() if eps > 0 else own
                keys = (v.double() / E[lo : lo + n]).float()
            b = min(W.MINI, n)
            step_picks.append(torch.sort(torch.sort(keys, descending=True, stable=True).indices[:b]).values)
        picks.append((step_picks, w_all))
    return picks, (state, errors)


def shard_of(x: torch.Tensor, world: int, r: int, sharded: bool) -> torch.Tensor:
    """Rank r's rows of a full state (all of them in the replicated mode)."""
    from es_kernels.sharded import shard_range

    return x[slice(*shard_range(x.shape[0], world, r))] if sharded else x


@pytest.mark.parametrize("mode", ["es", "es_sharded"])
def test_es_replicas_identical_and_equal_to_one_process(group, mode):
    """The replicated mode, and the sharded one on each rank's own ids: every rank's
    picks and weights, and every replica (every shard: its rows), equal the model."""
    world, res = group
    sharded = mode == "es_sharded"
    for kind, kw in {"sample": {}, "eps": dict(eps=0.25), "topk": dict(select_mode="topk", seed=0)}.items():
        want, want_state = single_process(world, owned=sharded, **kw)
        for r in range(world):
            got = res[(mode, r)]
            state, errors, step = got["final"][kind]
            assert step == W.STEPS
            want_errors = want_state[1].clone()
            want_errors.zero_()  # the test cleared the one out-of-range id after step 5
            assert_state_equal((state, errors), (shard_of(want_state[0], world, r, sharded), want_errors))
            if not sharded:
                assert_state_equal((state, errors), res[(mode, 0)]["final"][kind][:2])
            for step, (pos, weights, losses) in enumerate(got["rec"][kind]):
                ids, want_losses = W.step_inputs(step, world, sharded)[r]
                n = len(ids)
                assert torch.equal(pos, want[step][0][r]), (kind, r, step)
                assert torch.equal(weights, want[step][1][r * W.CAP : r * W.CAP + n].float()), (kind, r, step)
                assert torch.equal(losses, want_losses)
    # uneven step 3: rank 1 has 5 ids (and rank 2 none with 3 ranks)
    assert len(res[(mode, 1)]["rec"]["sample"][3][0]) == W.MINI
    if world == 3:
        assert len(res[(mode, 2)]["rec"]["sample"][3][0]) == 0
    # step 5's out-of-range id (rank 0's): errors[0] == 1 on every replica and sampler, padding
    # never counted; in the sharded mode on rank 0's shard only (check() sums them)
    for r in range(world):
        for e in res[(mode, r)]["rec"]["errors"]:
            assert e.tolist() == ([1 if r == 0 else 0, 0] if sharded else [1, 0])


@pytest.mark.parametrize("mode", ["es", "es_sharded"])
def test_es_resume_equals_uninterrupted(group, mode):
    world, res = group
    for r in range(world):
        got = res[(mode, r)]
        assert all(torch.equal(a[0], b) for a, b in zip(got["rec"]["sample"], got["rec"]["resumed"]))
        assert_state_equal(got["final"]["resumed"][:2], got["final"]["sample"][:2])
        assert got["final"]["resumed"][2] == W.STEPS


def test_eswp_shards_cover_the_kept_set(group):
    world, res = group
    n = 53
    es = ek.EvolvedSampler(n, 4, seed=11)
    ek.es_update(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(1)), es.state)
    for drop_last in (False, True):
        for epoch in (0, 3):
            pr = ek.ESWPSampler(es, num_epochs=4, prune_ratio=0.5)
            pr.set_epoch(epoch)
            kept = list(pr)
            if epoch == 3:
                assert sorted(kept) == list(range(n))
            per = shard_length(len(kept), world, drop_last)
            shards = [res[("eswp", r)][(drop_last, epoch)] for r in range(world)]
            for r, (length, shard, scale, next_epoch) in enumerate(shards):
                assert length == len(shard) == per and next_epoch == epoch + 1
                assert shard == shard_indices(kept, world, r, drop_last)
                assert torch.equal(scale, es.scale)  # every rank: the single-process scales
            flat = [i for s in shards for i in s[1]]
            if drop_last:  # disjoint, the kept set less fewer than `world` ids
                assert len(set(flat)) == len(flat) and set(flat) <= set(kept)
                assert len(kept) - len(flat) < world
            else:  # covers the kept set; the padding repeats the first ids
                assert set(flat) == set(kept)
                assert len(flat) - len(kept) == per * world - len(kept) < world


@pytest.mark.parametrize("mode", ["checked", "checked_sharded"])
def test_checked_mode_catches_duplicates_and_divergence(group, mode):
    world, res = group
    for r in range(world):
        msgs = res[(mode, r)]
        assert len(msgs) == 2, msgs
        assert "rank 0 passed duplicate ids" in msgs[0]
        diverged = (
            "step counters of the ranks diverged" if mode == "checked_sharded" else "replicas of the ranks diverged"
        )
        assert diverged in msgs[1]


def test_shard_indices_matches_distributed_sampler():
    from torch.utils.data import DistributedSampler

    for n in (0, 1, 2, 5, 7, 12):
        kept = list(range(100, 100 + n))
        for world in (1, 2, 3, 5):
            for drop_last in (False, True):
                for r in range(world):
                    ds = DistributedSampler(kept, num_replicas=world, rank=r, shuffle=False, drop_last=drop_last)
                    want = [kept[i] for i in ds] if n else []
                    assert shard_indices(kept, world, r, drop_last) == want, (n, world, drop_last, r)
                    assert shard_length(n, world, drop_last) == (len(ds) if n else 0)


def test_gathered_update_pads_and_duplicates():
    """In one process: PAD_ID positions are skipped uncounted; a repeated id is observed
    once; an id out of range is counted at each position (as es_update counts it)."""
    from es_kernels.distributed import PAD_ID, first_observation, gathered_update

    ids = torch.tensor([5, 3, PAD_ID, 5, 9, PAD_ID, 3, 12, 12])
    st = ek.ESState(10)
    assert first_observation(ids, st).tolist() == [0, 1, 2, 0, 4, 5, 1, 7, 8]
    w = gathered_update(ids, torch.tensor([1.0, 2, 7, 4, 3, 7, 8, 1, 1], dtype=torch.float64), st, 0.2, 0.5, 1.0, 1e-8)
    assert st.errors.tolist() == [2, 0]
    wm = float(torch.tensor(1e-8, dtype=torch.float32))
    assert w.tolist() == [1.0, 2.0, wm, 1.0, 3.0, wm, 2.0, wm, wm]
    assert st.s[[5, 3, 9]].tolist() == [1.0, 2.0, 3.0]


def sorted_first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """The lowest position of each position's id, by a stable sort (the rule, plainly)."""
    first = {}
    return torch.tensor([first.setdefault(int(i), p) for p, i in enumerate(ids.tolist())], dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_observation_equals_the_sort_and_restores_the_state(dtype):
    """The scatter dedup gives the lowest position of every in-range id (as a sort
    would), each out-of-range or padding position itself, and leaves the state's
    bits as they were (NaN payloads included), on random inputs with repeats."""
    from es_kernels.distributed import PAD_ID, first_observation

    g = torch.Generator().manual_seed(3)
    for n, N in ((1, 1), (50, 7), (300, 100), (2000, 5000)):
        st = ek.ESState(N, dtype=dtype)
        ek.es_update(torch.arange(0, N, 2), torch.rand((N + 1) // 2, generator=g, dtype=dtype), st)
        st.tensor[-1, 1] = float("nan")
        before = st.tensor.clone()
        ids = torch.randint(-3, N + 3, (n,), generator=g)
        ids[torch.rand(n, generator=g) < 0.1] = PAD_ID
        got = first_observation(ids, st)
        want = torch.where((ids >= 0) & (ids < N), sorted_first_occurrence(ids), torch.arange(n))
        assert torch.equal(got, want), (n, N)
        width = torch.int32 if dtype == torch.float32 else torch.int64
        assert torch.equal(st.tensor.view(width), before.view(width))
    assert first_observation(torch.tensor([0, 1]), ek.ESState(0)).tolist() == [0, 1]


def test_demo_trains_under_ddp(group):
    """The demo's train() on a process group (what es-kernels demo --nproc runs): DDP
    keeps the models identical, backward samples add up over the ranks."""
    world, res = group
    if ("demo", 0) not in res:
        pytest.skip("the demo runs in the group of 2 only")
    per_rank = math.ceil(1437 / world)  # digits: 1437 train samples, DistributedSampler's share
    from es_kernels.demo.run import Config

    B, b = Config().meta_batch // world, Config().mini_batch // world
    steps = math.ceil(per_rank / B)
    for r in range(world):
        got = res[("demo", r)]
        for m in ("es", "eswp", "infobatch"):
            assert got[m]["test_acc"] == res[("demo", 0)][m]["test_acc"]  # the same model on every rank
            assert got[m]["wall_s"] == res[("demo", 0)][m]["wall_s"]  # the slowest rank's, agreed
        assert got["es"]["backward_samples"] == world * steps * b
        assert got["infobatch"]["backward_samples"] == world * per_rank  # epoch 0: nothing scored yet


def test_world_of_one_equals_the_single_process_sampler(tmp_path):
    """W = 1, cap = B, eps = 0: the same positions, weights, state and step as EvolvedSampler."""
    from es_kernels.distributed import DistributedEvolvedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        for mode in ("sample", "topk"):
            a = ek.EvolvedSampler(100, 7, seed=5, select_mode=mode)
            d = DistributedEvolvedSampler(100, 7, seed=5, select_mode=mode)
            g = torch.Generator().manual_seed(0)
            for _ in range(10):
                ids, losses = torch.randperm(100, generator=g)[:30], torch.rand(30, generator=g)
                x, y = a.select(ids, losses=losses), d.select(ids, losses=losses)
                assert torch.equal(x.positions, y.positions) and torch.equal(x.weights, y.weights)
            assert_state_equal((a.state.tensor, a.state.errors), (d.state.tensor, d.state.errors))
            assert a.step == d.step == 10
    finally:
        dist.destroy_process_group()


def check_resume(res: dict, world: int, rank: int) -> None:
    """Every mid-epoch resume of the resume scenario (python_tests/dist_workers.py) trains
    exactly what the uninterrupted run trains: ids, picks, scales, weights, final state."""
    from es_kernels.distributed import shard_indices

    for prune_ratio in (0.5, 0.0):
        full, runs = res[prune_ratio]["full"], res[prune_ratio]["runs"]
        want = full["rec"]
        assert len(runs) == len(want) >= 3 * W.REPOCHS  # several batches an epoch
        for stop, (before, after) in enumerate(runs):
            got = before["rec"] + after["rec"]
            assert len(got) == len(want), (prune_ratio, stop)
            for k, (a, b) in enumerate(zip(got, want)):
                assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:])), (prune_ratio, stop, k)
            for part in ("es", "pr"):
                fa, fb = after["final"][part], full["final"][part]
                assert fa.keys() == fb.keys()
                for key in fa:
                    assert_equal_entry(fa[key], fb[key])
            # the position is this rank's position in its shard; kept is the whole plan (any rank's)
            epoch, sd = want[stop][0], before["saved"]["pr"]
            drawn = [r[1] for r in want if r[0] == epoch]
            done = sum(len(r[1]) for r in want[: stop + 1] if r[0] == epoch)
            if done < sum(len(ids) for ids in drawn):
                assert (sd["epoch"], sd["position"]) == (epoch, done), (prune_ratio, stop)
                assert shard_indices(sd["kept"], world, rank, False).tolist() == torch.cat(drawn).tolist()
            else:  # the epoch's last batch: complete
                assert (sd["epoch"], sd["position"], sd["kept"]) == (epoch + 1, 0, None), (prune_ratio, stop)


def assert_equal_entry(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_entry(a[k], b[k])
    elif isinstance(a, torch.Tensor):  # bit for bit (NaN marks an unseen sample)
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    else:
        assert a == b


def test_eswp_resumes_mid_epoch_bit_for_bit(group):
    world, res = group
    for r in range(world):
        check_resume(res[("resume", r)], world, r)
    saved = [res[("resume", r)][0.5]["runs"][1][0]["saved"]["pr"] for r in range(world)]
    for sd in saved[1:]:  # the same checkpoint on every rank: rank 0's resumes them all
        assert_equal_entry(sd, saved[0])


def test_checkpoint_of_another_world_size_is_refused_on_every_rank(group):
    world, res = group
    for r in range(world):
        got = res[("resume", r)]
        assert len(got["refused"]) == 2, got["refused"]
        for msg in got["refused"]:
            assert "saved on 1 rank(s)" in msg and f" {world} rank(s)" in msg, msg
        step, epoch, position, state = got["after_refusal"]
        assert (step, epoch, position) == (1, 0, 0)  # nothing loaded; the select after it ran


def test_resume_in_one_process_group(tmp_path):
    """The resume scenario in a gloo group of one process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        check_resume(W.resume_everywhere(str(tmp_path / "ckpt.pt")), 1, 0)
    finally:
        dist.destroy_process_group()


def test_load_state_dict_refuses_bad_distributed_entries(tmp_path):
    """World size and meta_batch missing, of the wrong type, of another group or
    with extra keys: ValueError naming the entry, nothing loaded (one-process group)."""
    from es_kernels.distributed import DistributedESWPSampler, DistributedEvolvedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        src = DistributedEvolvedSampler(50, 3, seed=4, meta_batch=6)
        src_pr = DistributedESWPSampler(src, num_epochs=3)
        ids = src_pr.epoch_ids()[:6]
        src.select(ids, losses=torch.rand(6))
        good, good_pr = src.state_dict(), src_pr.state_dict(position=6)

        def edited(sd, key, value, sub=None):
            out = {**sd, sub: {**sd[sub]}} if sub else dict(sd)
            d = out[sub] if sub else out
            if value is KeyError:
                del d[key]
            else:
                d[key] = value
            return out

        es_bad = {
            "state_dict is missing 'distributed'": edited(good, "distributed", KeyError),
            "unexpected key 'extra'": edited(good, "extra", 1),
            "['distributed'] must be a dict": edited(good, "distributed", [1, 6]),
            "['distributed'] is missing 'world_size'": edited(good, "world_size", KeyError, "distributed"),
            "['distributed'] has an unexpected key 'rank'": edited(good, "rank", 0, "distributed"),
            "['world_size'] must be a Python int, got float": edited(good, "world_size", 1.0, "distributed"),
            "['world_size'] must be a Python int, got str": edited(good, "world_size", "1", "distributed"),
            "['world_size'] must be a Python int, got bool": edited(good, "world_size", True, "distributed"),
            "saved on 2 rank(s) and cannot resume on this group of 1": edited(good, "world_size", 2, "distributed"),
            "['meta_batch'] must be a Python int": edited(good, "meta_batch", 6.0, "distributed"),
            "state_dict['step'] must be in": edited(good, "step", -1),
        }
        es = DistributedEvolvedSampler(50, 3, seed=4, meta_batch=6)
        lazy = DistributedEvolvedSampler(50, 3, seed=4)  # meta_batch from the checkpoint
        for want, sd in es_bad.items():
            for s in (es, lazy):
                before = s.state_dict()
                with pytest.raises(ValueError, match=re.escape(want)):
                    s.load_state_dict(sd)
                assert_equal_entry(s.state_dict(), before)  # nothing loaded
        assert lazy.meta_batch is None
        before = es.state_dict()
        with pytest.raises(ValueError, match=re.escape("['meta_batch'] is 7, this sampler was given meta_batch=6")):
            es.load_state_dict(edited(good, "meta_batch", 7, "distributed"))  # another noise: refused
        assert_equal_entry(es.state_dict(), before)
        lazy.load_state_dict(good)
        assert lazy.meta_batch == 6 and lazy.step == 1

        pr_bad = {
            "state_dict is missing 'num_replicas'": edited(good_pr, "num_replicas", KeyError),
            "['num_replicas'] must be a Python int, got float": edited(good_pr, "num_replicas", 1.0),
            "saved on 3 rank(s) and cannot resume on 1 rank(s)": edited(good_pr, "num_replicas", 3),
            "state_dict['position'] must be <": edited(good_pr, "position", good_pr["kept"].shape[0]),
        }
        pr = DistributedESWPSampler(es, num_epochs=5, prune_ratio=0.2)
        for want, sd in pr_bad.items():
            with pytest.raises(ValueError, match=re.escape(want)):
                pr.load_state_dict(sd)
            assert (pr.epoch, pr.position, pr.num_epochs, pr.prune_ratio) == (0, 0, 5, 0.2)
        pr.load_state_dict(good_pr)
        assert pr.position == 6 and pr.epoch == 0 and torch.equal(cat_ids(pr.chunks()), good_pr["kept"][6:])
    finally:
        dist.destroy_process_group()


def every_form(g: torch.Generator, n: int = 40) -> list:
    """select() keyword arguments of every form EvolvedSampler.select takes, on random
    inputs: ids with losses [B] and token losses [B, T], logits [B, C] and [B, T, V]
    (ignored targets, rows with nothing to score, shift_labels), hidden states (with a
    bias, shift_labels), and packed rows (segment_ids) from logits, hidden and token losses."""
    B, T, V, H = 6, 7, 11, 5
    ids = torch.randperm(n, generator=g)[:B]
    tgt = torch.randint(0, V, (B, T), generator=g)
    tgt[1] = -100  # a sequence with nothing to score
    tgt[2, ::2] = -100
    hid = torch.randn(B, T, H, generator=g)
    wt, bias = torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    seg = torch.randint(0, 4, (B, T), generator=g) + torch.randint(0, n // 4, (B, 1), generator=g) * 4
    seg[0, -2:] = -1  # padding
    seg[3, :] = seg[4, 0]  # a document over two rows
    seg[5, 3] = n + 2  # out of range: counted
    tc = torch.randint(0, 9, (B,), generator=g)
    tc[4] = -100
    return [
        dict(ids=ids, losses=torch.rand(B, generator=g) * 3),
        dict(ids=ids.int(), losses=torch.rand(B, T, generator=g, dtype=torch.float64)),
        dict(ids=ids, logits=torch.randn(B, 9, generator=g), targets=tc),
        dict(ids=ids, logits=torch.randn(B, T, V, generator=g), targets=tgt, label_smoothing=0.1),
        dict(ids=ids, logits=torch.randn(B, T, V, generator=g), targets=tgt, shift_labels=True),
        dict(ids=ids, hidden=hid, weight=wt, bias=bias, targets=tgt, shift_labels=True, workspace_bytes=64),
        dict(ids=ids, hidden=hid[:, 0], weight=wt, targets=tc),
        dict(segment_ids=seg, logits=torch.randn(B, T, V, generator=g), targets=tgt, shift_labels=True),
        dict(segment_ids=seg, hidden=hid, weight=wt, targets=tgt),
        dict(segment_ids=seg, losses=torch.rand(B, T, generator=g)),
    ]


def assert_selection_equal(x, y, what) -> None:
    for name in ("positions", "scales", "losses", "weights"):
        a, b = getattr(x, name), getattr(y, name)
        assert (a is None) == (b is None), (what, name)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(
                a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
            ), (
                what,
                name,
                a,
                b,
            )


def test_world_of_one_every_form_equals_the_single_process_sampler(tmp_path):
    """W = 1, cap = B, eps = 0: every form of select (losses, token losses, logits with
    ignored targets and shift_labels, hidden states, packed rows) gives the single-process
    sampler's selection, losses, weights, scales, state and errors, bit for bit."""
    from es_kernels.distributed import DistributedEvolvedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        for mode in ("sample", "topk"):
            a = ek.EvolvedSampler(40, 3, seed=5, select_mode=mode)
            d = DistributedEvolvedSampler(40, 3, seed=5, select_mode=mode, meta_batch=6)
            g = torch.Generator().manual_seed(1)
            for rnd in range(3):
                for k, kw in enumerate(every_form(g)):
                    x, y = a.select(**kw), d.select(**kw)
                    assert_selection_equal(x, y, (mode, rnd, k))
                    assert_state_equal((a.state.tensor, a.state.errors), (d.state.tensor, d.state.errors))
            assert a.step == d.step
            assert a.state.errors.tolist() == [6, 0]  # the out-of-range document: once a packed step (not shifted)
    finally:
        dist.destroy_process_group()


def global_keys(world: int, cap: int, step: int, seed: int = 7) -> torch.Tensor:
    """E of every global position p = r * cap + j (spec sections 9 and 11.1)."""
    x0 = R._philox_words(world * cap, seed, step, R.STREAM_SELECT, "cpu")[0]
    return -torch.log(R.uniform_from_bits(x0).double())


def own_picks(weights: torch.Tensor, E: torch.Tensor, lo: int, mini: int) -> torch.Tensor:
    """The rank's picks among its n positions: the b largest f32(w / E_q), ties to the lower."""
    keys = (weights.double() / E[lo : lo + weights.shape[0]]).float()
    b = min(mini, weights.shape[0])
    return torch.sort(torch.sort(keys, descending=True, stable=True).indices[:b]).values


def forms_model(world: int, form: str, owned: bool = False):
    """The single-process model of spec section 11.1 for a form of select.

    Unpacked: each rank's rows scored as the single-process sampler scores them (its
    losses; a row with nothing to score has weight 0 and is not observed), every scored
    id observed once at its lowest global position. Packed: each rank's documents'
    float64 token-loss sums and counts (section 6.1's sums), a document's parts added in
    rank order in float64 and divided by the total count, each document observed once,
    each row's weight the token-weighted mean of its documents' weights."""
    from es_kernels._packed import _document_sums, _packed_tokens_from_logits, _row_means
    from es_kernels.lm import _packed_tokens_from_hidden

    st = ek.ESState(W.FN)
    state, errors = st.tensor, st.errors
    out = []
    for step in range(W.FSTEPS):
        inputs = W.form_inputs(step, world, form, owned)
        E = global_keys(world, W.FCAP, step)
        if not form.startswith("packed"):
            parts = []
            for kw in inputs:
                sel = ek.EvolvedSampler(W.FN, W.FMINI).select(**kw)  # a fresh state: the rows' scores
                parts.append((kw["ids"].long(), sel.losses, sel.weights != 0))
            first = {}
            for ids, losses, scored in parts:
                for j in range(ids.shape[0]):
                    if scored[j] and int(ids[j]) not in first:
                        first[int(ids[j])] = float(losses[j])
            obs = sorted(first)
            w = R.es_update(
                torch.tensor(obs), torch.tensor([first[i] for i in obs]), state, errors, 0.2, 0.5, DEFAULT_LAM
            )
            w_of = dict(zip(obs, w.tolist()))
            rec = []
            for r, (ids, losses, scored) in enumerate(parts):
                weights = torch.tensor([w_of[int(i)] if s else 0.0 for i, s in zip(ids, scored)], dtype=torch.float32)
                rec.append((own_picks(weights, E, r * W.FCAP, W.FMINI), losses, weights))
            out.append(rec)
            continue
        grids, docs = [], {}
        for kw in inputs:
            seg = kw["segment_ids"]
            if "logits" in kw:
                tok, scored, doc = _packed_tokens_from_logits(kw["logits"], kw["targets"], seg, -100, 0.0, True)
            elif "hidden" in kw:
                h = (kw["hidden"], kw["weight"], kw["targets"], seg, None, -100, 0.0, False, kw["workspace_bytes"])
                tok, scored, doc = _packed_tokens_from_hidden(*h)
            else:
                tok, scored, doc = kw["losses"], seg >= 0, seg
            keys, sums, counts, _ = _document_sums(tok, scored, torch.where(scored, doc, 2**63 - 1))
            for i, sm, c in zip(keys.tolist(), sums.tolist(), counts.tolist()):
                if c > 0:  # parts in rank order
                    d = docs.setdefault(i, [0.0, 0])
                    d[0], d[1] = d[0] + sm, d[1] + c
            grids.append((tok, scored, doc))
        obs = sorted(docs)
        losses = torch.tensor([docs[i][0] / docs[i][1] for i in obs], dtype=torch.float64).float()
        w = R.es_update(torch.tensor(obs, dtype=torch.int64), losses, state, errors, 0.2, 0.5, DEFAULT_LAM)
        w_of = dict(zip(obs, w.tolist()))
        rec = []
        for r, (tok, scored, doc) in enumerate(grids):
            wd = torch.tensor([[w_of.get(int(i), 0.0) for i in row] for row in doc], dtype=torch.float32)
            weights = _row_means(wd.reshape(doc.shape), scored)
            rec.append((own_picks(weights, E, r * W.FCAP, W.FMINI), _row_means(tok, scored), weights))
        out.append(rec)
    return out, (state, errors)


@pytest.mark.parametrize("mode", ["forms", "forms_sharded"])
def test_every_form_equals_the_single_process_model(group, mode):
    """Logits (shift_labels, rows with nothing to score), hidden states, losses and packed
    rows (documents split over two ranks' rows, padding, an id out of range) on 2 and 3
    ranks with uneven and empty ranks: every rank's picks, losses and weights, and every
    replica, equal the single-process model bit for bit. The sharded mode on each rank's
    own ids and documents (a document split over two rows of a rank): the same, every
    shard equal to its rows of the model, the error counts summed over the shards."""
    world, res = group
    sharded = mode == "forms_sharded"
    for form in W.FORMS:
        want, (state, errors) = forms_model(world, form, owned=sharded)
        shards = []
        for r in range(world):
            got = res[(mode, r)][form]
            for step, (pos, scales, losses, weights) in enumerate(got["rec"]):
                wpos, wlosses, wweights = want[step][r]
                what = (form, r, step)
                assert torch.equal(pos, wpos), what
                assert torch.equal(losses, wlosses), what
                assert torch.equal(weights, wweights), what
                assert torch.equal(scales, torch.ones(scales.shape)), what
            if sharded:
                shards.append(got["final"][:2])
            else:
                assert_state_equal(got["final"][:2], (state, errors))
            assert got["final"][2] == W.FSTEPS
        if sharded:
            joined = torch.cat([s for s, _ in shards]), sum(e for _, e in shards)
            assert_state_equal(joined, (state, errors))
        # the out-of-range document: counted once; with shift_labels its one token (a row's last) scores nothing
        assert int(errors[0]) == (1 if form in ("packed_hidden", "packed_losses") else 0), form
        assert len(res[(mode, 1)][form]["rec"][1][0]) == min(W.FMINI, 2)  # the short rank
        if world == 3:
            assert len(res[(mode, 2)][form]["rec"][1][0]) == 0  # the empty rank
    for r in range(world if sharded else 0):  # another rank's document: counted once, changes nothing
        state, errors, weights, lo = res[(mode, r)]["foreign"]
        seen = (~state[:, 0].isnan()).nonzero().view(-1).tolist()
        assert errors.tolist() == [1, 0] and seen == [0] and bool((weights > 0).all())


def test_schedule_sharded_equals_replicated(group):
    """A scoring schedule (scoring steps, steps from the state, the picks' training
    losses observed) on each rank's own ids: the sharded sampler's selections, weights,
    observations, shard and counters equal the replicated sampler's, bit for bit; its
    state_dict holds the counters as Shard(0) DTensors of shape [N]."""
    from es_kernels.sharded import shard_range

    world, res = group
    for sch in W.SCHEDULES:
        kinds = set()
        for r in range(world):
            got = res[("schedule", r)][sch]
            for step, (scores, a, b, oa, ob) in enumerate(got["rec"]):
                kinds.add(scores)
                assert_selection_equal(a, b, (sch, r, step))
                assert (oa is None) == (ob is None) == scores, (sch, r, step)
                if oa is not None:
                    assert torch.equal(oa, ob), (sch, r, step)
            state, counters, lo, hi = got["shard"]
            assert (lo, hi) == shard_range(W.N, world, r)
            rstate, rcounters = got["replica"]
            assert_state_equal((state, counters[0, :-1]), (rstate[lo:hi], rcounters[0, lo:hi]))
            assert torch.equal(counters[:, :-1], rcounters[:, lo:hi]), (sch, r)
            for i, k in enumerate(("last_seen", "picks")):
                kind, shape, local = got["sd"][k]
                assert (kind, shape) == ("DTensor", (W.N,)) and torch.equal(local, counters[i, :-1])
        assert kinds == {True, False}, sch  # both kinds of step ran
        if sch.startswith("stale"):  # due ids: priorities from the state
            recs = [x for r in range(world) for x in res[("schedule", r)][sch]["rec"] if not x[0]]
            assert any(bool((a.weights == math.inf).any()) for _, a, _, _, _ in recs), sch
        else:  # picks from the state counted
            assert any(bool(res[("schedule", r)][sch]["shard"][1][1].any()) for r in range(world)), sch


def prefix_selection(own, lo, b, select_mode, seed, step, eps=0.0):
    """The rule of spec section 11.1 plainly: one weighted_select over a prefix of
    lo + n positions whose first lo are -inf, own positions' keys tied to the lower."""
    from es_kernels.distributed import eps_mix

    n = own.shape[0]
    x = torch.full((lo + n,), -math.inf)
    x[lo:] = eps_mix(own, eps) if (eps > 0.0 and n > 0) else own
    keys = R.selection_keys(x, select_mode, seed, step)[lo:]
    return torch.sort(torch.sort(keys, descending=True, stable=True).indices[:b]).values


@pytest.mark.parametrize("select_mode,eps", [("topk", 0.0), ("sample", 0.0), ("sample", 0.3)])
def test_rank_selection_picks_the_rule_on_random_weights(select_mode, eps):
    """rank_selection (topk: over the rank's own positions alone) picks what the rule
    picks on random weights with ties, NaN, -inf, +inf and zeros, at every rank."""
    from es_kernels.distributed import rank_selection

    g = torch.Generator().manual_seed(11)
    for trial in range(30):
        world, cap = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        w_all = torch.rand(world * cap, generator=g) * 3
        special = torch.tensor([math.nan, -math.inf, math.inf, 0.0, 1.0])
        pick = torch.rand(world * cap, generator=g) < 0.3
        w_all[pick] = special[torch.randint(0, 5, (int(pick.sum()),), generator=g)]
        step = int(torch.randint(0, 100, (1,), generator=g))
        for r in range(world):
            n = int(torch.randint(0, cap + 1, (1,), generator=g))
            b = int(torch.randint(0, n + 1, (1,), generator=g))
            got = rank_selection(w_all, r, cap, n, b, select_mode, 9, torch.tensor(step), eps)
            want = prefix_selection(w_all[r * cap : r * cap + n], r * cap, b, select_mode, 9, step, eps)
            assert torch.equal(got, want), (trial, r, got, want)


def test_select_refuses_bad_input_naming_the_argument(tmp_path):
    """Every form's bad input: ValueError naming the argument, before anything is
    written or exchanged (one-process group); a packed meta-batch over meta_tokens too."""
    from es_kernels.distributed import DistributedEvolvedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        d = DistributedEvolvedSampler(40, 3, seed=5, meta_batch=6, meta_tokens=20)
        bad = bad_select_forms()
        bad["25 tokens on rank 0, more than meta_tokens=20"] = dict(
            segment_ids=torch.zeros(5, 5, dtype=torch.int64), losses=torch.rand(5, 5)
        )
        for want, kw in bad.items():
            with pytest.raises(ValueError, match=re.escape(want)):
                d.select(**kw)
            assert d.step == 0 and d.state.errors.tolist() == [0, 0] and bool(d.state.s.isnan().all()), want
        d.select(segment_ids=torch.zeros(4, 5, dtype=torch.int64), losses=torch.rand(4, 5))  # a good call goes through
        assert d.step == 1
    finally:
        dist.destroy_process_group()
