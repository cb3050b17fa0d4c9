"""The scoring schedule (docs/spec.md section 12): es_select_from_state on every
backend against the reference, the +inf priority of section 4, validation,
torch.compile, the policies' decisions, the sampler's loop (starvation rule,
the cap on the feedback loop, observation only on non-scoring steps) and a
bit-exact resume at a non-scoring step."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import es_kernels as ek
from es_kernels import ScoringSchedule
from es_kernels import reference as R

INF = math.inf


def random_case(n, batch, seed, dtype, ids_dtype, unobserved=0.2, out_of_range=0.05):
    """A state with unobserved samples, ids with some out of range, counters."""
    g = torch.Generator().manual_seed(seed)
    state = torch.stack([torch.rand(n, generator=g) * 4, torch.randn(n, generator=g) * 0.5], 1).to(dtype)
    state[torch.rand(n, generator=g) < unobserved, 0] = math.nan
    state[torch.isnan(state[:, 0]), 1] = 0.0
    ids = torch.randperm(max(n, batch), generator=g)[:batch]
    ids[torch.rand(batch, generator=g) < out_of_range] = -3
    last_seen = torch.randint(0, 40, (n,), generator=g)
    picks = torch.randint(0, 4, (n,), generator=g)
    return state, ids.to(ids_dtype), last_seen, picks


def call(fn, ids, state, b, *, mode="sample", seed=0, step=0, step_tensor=None, advance=False, eps=0.0,
         last_seen=None, max_age=-1, picks=None, cap=-1, lam=2.0, w_min=1e-8):  # fmt: skip
    errors = torch.zeros(2, dtype=torch.int64)
    pos, w = fn(ids, state, errors, b, lam, w_min, mode, seed, step, None, step_tensor, advance, eps,
                last_seen, max_age, picks, cap)  # fmt: skip
    return pos, w, errors


@given(
    n=st.integers(1, 300),
    batch=st.integers(0, 200),
    frac=st.floats(0, 1),
    mode_eps=st.sampled_from([("sample", 0.0), ("topk", 0.0), ("sample", 0.1), ("sample", 1.0)]),
    counters=st.sampled_from([(-1, -1), (10, -1), (-1, 1), (20, 2), (0, 0)]),
    ids_dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=st.integers(0, 2**62),
    step=st.integers(0, 2**40),
    as_tensor=st.booleans(),
)
def test_against_reference(backend, n, batch, frac, mode_eps, counters, ids_dtype, seed, step, as_tensor):
    mode, eps = mode_eps
    max_age, cap = counters
    b = int(frac * batch)
    for dtype in backend.state_dtypes:
        state, ids, last_seen, picks = random_case(n, batch, seed % 1000, dtype, ids_dtype)
        kw = dict(mode=mode, seed=seed, eps=eps, last_seen=last_seen, max_age=max_age, picks=picks, cap=cap)
        if as_tensor:
            kw.update(step_tensor=torch.tensor(step), advance=True)
        else:
            kw.update(step=step)
        want_state = state.clone()
        want = call(R.es_select_from_state, ids, want_state, b, **dict(kw, step_tensor=_copy(kw.get("step_tensor"))))
        got = call(backend.es_select_from_state, ids, state, b, **kw)
        for x, y in zip(got, want):
            assert x.dtype == y.dtype and torch.equal(x, y), (x, y)
        assert torch.equal(state, want_state) or torch.equal(state.isnan(), want_state.isnan())  # read only
        if as_tensor:
            assert int(kw["step_tensor"]) == step + 1


def _copy(t):
    return None if t is None else t.clone()


def test_weights_follow_the_rules(backend):
    """Section 12.2 by hand: priority (+inf) for unobserved and due ids, 0 for
    capped ones, section 3's weight otherwise, w_min and a count out of range."""
    state = torch.tensor([[1.0, 0.5], [math.nan, 0.0], [2.0, -3.0], [4.0, 1.0], [3.0, 0.0]])
    ids = torch.tensor([0, 1, 2, 3, 4, 9])
    last_seen = torch.tensor([10, 0, 10, 2, 10])
    picks = torch.tensor([0, 0, 0, 0, 1])
    pos, w, errors = call(backend.es_select_from_state, ids, state, 3, mode="topk", step=10,
                          last_seen=last_seen, max_age=5, picks=picks, cap=1)  # fmt: skip
    assert w.tolist() == [2.0, INF, pytest.approx(1e-8), INF, 0.0, pytest.approx(1e-8)]
    assert errors.tolist() == [1, 0]
    assert pos.tolist() == [0, 1, 3]  # the priorities, then the largest weight


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
def test_unobserved_ids_come_first(backend, eps):
    """The starvation rule: never-observed ids are picked before any observed
    one, with or without the exploration mix, whatever their positions."""
    n = 200
    state = torch.zeros(n, 2)
    state[:, 0] = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 100
    fresh = torch.tensor([5, 17, 101, 150, 199])
    state[fresh, 0] = math.nan
    for step in range(10):
        pos, _, _ = call(backend.es_select_from_state, torch.arange(n), state, 8, step=step, eps=eps)
        assert set(fresh.tolist()) <= set(pos.tolist())


def test_weighted_select_infinite_weight_is_a_priority_with_eps(backend):
    """Section 4: a +inf weight is selected first with the exploration mix too
    (before, eps > 0 turned it into the uniform share eps)."""
    w = torch.rand(300, generator=torch.Generator().manual_seed(2)) + 0.5
    w[[7, 123, 250]] = INF
    for step in range(10):
        for eps in (0.0, 0.5, 1.0):
            assert {7, 123, 250} <= set(backend.weighted_select(w, 5, "sample", 3, step, eps=eps).tolist())
    zeros = torch.zeros(50)
    zeros[40] = INF
    assert 40 in backend.weighted_select(zeros, 1, "sample", 3, 0, eps=0.5).tolist()  # all other weights 0


def test_determinism_from_seed_and_step(backend):
    state, ids, last_seen, picks = random_case(500, 400, 3, torch.float32, torch.int64, unobserved=0.0)
    a = call(backend.es_select_from_state, ids, state, 50, seed=4, step=7)[0]
    assert torch.equal(a, call(backend.es_select_from_state, ids, state, 50, seed=4, step=7)[0])
    assert not torch.equal(a, call(backend.es_select_from_state, ids, state, 50, seed=4, step=8)[0])
    assert not torch.equal(a, call(backend.es_select_from_state, ids, state, 50, seed=5, step=7)[0])


BAD = [
    (dict(b=11), "b"),
    (dict(mode="topk", eps=0.1), "eps"),
    (dict(mode="nope"), "select_mode"),
    (dict(max_age=3), "last_seen"),
    (dict(cap=1), "picks"),
    (dict(cap=-2, picks=torch.zeros(20, dtype=torch.int64)), "cap"),
    (dict(max_age=-5, last_seen=torch.zeros(20, dtype=torch.int64)), "max_age"),
    (dict(max_age=1, last_seen=torch.zeros(19, dtype=torch.int64)), "last_seen"),
    (dict(cap=1, picks=torch.zeros(20, dtype=torch.int32)), "picks"),
    (dict(lam=-1.0), "lam"),
    (dict(w_min=0.0), "w_min"),
]


@pytest.mark.parametrize("bad,name", BAD)
def test_raw_op_validates_before_writing(backend, bad, name):
    state = torch.rand(20, 2)
    ids = torch.tensor([1, 2, 3, 50, 4, 5, 6, 7, 8, 9])  # one out of range: would be counted
    kw = dict(dict(b=4), **bad)
    b = kw.pop("b")
    errors = torch.zeros(2, dtype=torch.int64)
    args = dict(mode="sample", eps=0.0, last_seen=None, max_age=-1, picks=None, cap=-1, lam=1.0, w_min=1e-8)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        backend.es_select_from_state(ids, state, errors, b, args["lam"], args["w_min"], args["mode"], 0, 0, None,
                                     None, False, args["eps"], args["last_seen"], args["max_age"], args["picks"],
                                     args["cap"])  # fmt: skip
    assert errors.tolist() == [0, 0]


def test_functional_validates():
    es = ek.ESState(10)
    with pytest.raises(ValueError, match="ids"):
        ek.es_select_from_state(torch.zeros(3), es, 1)
    with pytest.raises(ValueError, match="max_age"):
        ek.es_select_from_state(torch.arange(3), es, 1, max_age=-2)
    pos, w = ek.es_select_from_state(torch.arange(3), es, 2, step=torch.zeros((), dtype=torch.int64))
    assert pos.tolist() == [0, 1] and torch.isinf(w).all()


def test_opcheck_and_compile():
    st_ = ek.ESState(64)
    st_.tensor[:60, 0] = torch.rand(60)
    st_.tensor[:60, 1] = 0.0
    counters = torch.zeros(64, dtype=torch.int64)
    step = torch.zeros((), dtype=torch.int64)
    args = (torch.arange(40), st_.tensor, st_.errors, 8, 2.0, 1e-8, "sample", 0, 0, None, step, True, 0.1,
            counters, 5, counters.clone(), 1)  # fmt: skip
    torch.library.opcheck(torch.ops.es_kernels.es_select_from_state.default, args)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(ids, state, errors, last_seen, picks, step):
        return torch.ops.es_kernels.es_select_from_state(
            ids, state, errors, 8, 2.0, 1e-8, "sample", 0, 0, None, step, True, 0.1, last_seen, 5, picks, 1
        )

    s0 = step.clone()
    pos, w = fn(torch.arange(40), st_.tensor, st_.errors, counters, counters.clone(), step)
    want = R.es_select_from_state(*args[:10], s0.clone(), True, 0.1, counters, 5, counters.clone(), 1)
    assert torch.equal(pos, want[0]) and torch.equal(w, want[1]) and int(step) == int(s0) + 1


# ------------------------------------------------------------------ policies
def test_policy_decisions():
    assert all(ScoringSchedule.every_step().scores(k, e) for k in range(50) for e in range(5))
    every3 = ScoringSchedule.every_epochs(3)
    assert [every3.scores(0, e) for e in range(7)] == [True, False, False, True, False, False, True]
    quarter = ScoringSchedule.fraction_of_steps(0.25)
    assert [k for k in range(12) if quarter.scores(k, 0)] == [0, 4, 8]
    third = ScoringSchedule.fraction_of_steps(1 / 3)
    picks = [k for k in range(3000) if third.scores(k, 0)]
    assert picks[0] == 0 and len(picks) == 1000
    stale = ScoringSchedule.stale(100)
    assert stale.scores(5, 0) and not stale.scores(5, 1) and stale.max_age == 100 and stale.cap == 1


@pytest.mark.parametrize(
    "text,want",
    [
        ("step", ScoringSchedule()),
        ("epoch:3", ScoringSchedule("epoch", every=3, cap=1)),
        ("epoch:1", ScoringSchedule()),
        ("fraction:0.25,cap=2", ScoringSchedule("fraction", fraction=0.25, cap=2)),
        ("stale:500,cap=none", ScoringSchedule("stale", max_age=500, cap=-1)),
    ],
)
def test_parse_and_str(text, want):
    s = ScoringSchedule.parse(text)
    assert s == want and ScoringSchedule.parse(str(s)) == s


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "epoch",
        "epoch:0",
        "epoch:x",
        "fraction:0",
        "fraction:1.5",
        "stale:-1",
        "epoch:3,cap=-1",
        "epoch:3,foo=1",
        "step,cap=1",
        3,
        ScoringSchedule("nope"),
    ],  # fmt: skip
)
def test_bad_schedules_name_schedule(bad):
    with pytest.raises(ValueError, match="schedule"):
        ScoringSchedule.parse(bad)
    with pytest.raises(ValueError, match="schedule"):
        ek.EvolvedSampler(10, 2, schedule=bad)


# ------------------------------------------------------------------ the sampler's loop
def noisy_run(schedule, epochs=9, n=240, B=24, b=6, noisy=(3, 50, 77, 150), seed=0):
    """A synthetic loop: every sample's training loss falls with its picks,
    except the noisy ids' (mislabeled: always high). Returns the sampler and
    the picks of each noisy id per epoch."""
    es = ek.EvolvedSampler(n, b, seed=seed, schedule=schedule)
    picks_of = {i: [0] * epochs for i in noisy}
    trained = torch.zeros(n)
    loss_of = lambda ids: torch.where(  # noqa: E731
        torch.isin(ids, torch.tensor(noisy)), 8.0, 2.0 / (1.0 + trained[ids])
    )
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        es.set_epoch(epoch)
        order = torch.randperm(n, generator=g)
        for k in range(0, n, B):
            ids = order[k : k + B]
            sel = es.select(ids, losses=loss_of(ids)) if es.needs_scores else es.select(ids)
            picked = ids[sel.positions]
            l = loss_of(picked)
            es.observe(picked, l)
            trained[picked] += 1
            for i in picked.tolist():
                if i in picks_of:
                    picks_of[i][epoch] += 1
    return es, picks_of


def test_the_cap_breaks_the_feedback_loop():
    """every 3rd epoch scored: without a cap the noisy ids (stale high weight,
    high training loss again) are picked at most of their from-state visits;
    with cap = 1 at most once between two scoring epochs."""
    _, loop = noisy_run("epoch:3,cap=none")
    from_state = [e for e in range(9) if e % 3]
    visits = len(loop) * len(from_state)
    assert sum(loop[i][e] for i in loop for e in from_state) >= 0.8 * visits  # the loop: picked at most visits
    _, capped = noisy_run("epoch:3,cap=1")
    for i, per_epoch in capped.items():
        for start in (0, 3, 6):
            assert per_epoch[start + 1] + per_epoch[start + 2] <= 1, (i, per_epoch)


def test_stale_policy_refreshes_and_caps():
    es, picks = noisy_run("stale:30,cap=1", epochs=6)
    assert not torch.isnan(es.state.s).any()  # epoch 0 scored everyone
    total = sum(sum(p[1:]) for p in picks.values())
    assert total <= 4 * 5  # no noisy id takes more than one pick per epoch
    last_seen = es.state_dict()["counters"]["last_seen"]
    assert int(last_seen.max()) >= es.step - 10  # observations are recorded


def test_first_epoch_without_scores_observes_the_picks_first():
    """fraction: step 0 scores; later from-state steps pick never-observed ids first."""
    n, B, b = 64, 16, 4
    es = ek.EvolvedSampler(n, b, seed=1, schedule="fraction:0.25,cap=none")
    ids = torch.arange(B)
    assert es.needs_scores
    es.select(ids, losses=torch.rand(B))
    assert es.observe(ids[:b], torch.rand(b)) is None  # after a scoring step: nothing to do
    assert not es.needs_scores
    new = torch.arange(B, 2 * B)
    fresh = torch.tensor([20, 25, 30])
    mixed = torch.cat([ids[: B - 3], fresh])
    sel = es.select(mixed)
    assert set(fresh.tolist()) <= set(mixed[sel.positions].tolist())
    assert sel.losses is None and torch.isinf(sel.weights[-3:]).all()
    w = es.observe(mixed[sel.positions], torch.full((b,), 1.5))
    assert w.shape == (b,) and not torch.isnan(es.state.s[fresh]).any()
    del new


def test_a_scoring_step_needs_scores():
    es = ek.EvolvedSampler(32, 4, schedule="epoch:2")
    with pytest.raises(ValueError, match="needs_scores"):
        es.select(torch.arange(8))
    es.select(torch.arange(8), losses=torch.rand(8))
    es.set_epoch(1)
    sel = es.select(torch.arange(8, 16))  # from the state: all unobserved, the first 4 positions
    assert sel.positions.tolist() == [0, 1, 2, 3]
    plain = ek.EvolvedSampler(32, 4)
    with pytest.raises(ValueError, match="logits"):
        plain.select(torch.arange(8))


def test_resume_at_a_non_scoring_step_is_bit_exact():
    def loop(es, epochs, start_epoch, g, trained):
        out = []
        for epoch in range(start_epoch, epochs):
            es.set_epoch(epoch)
            order = torch.randperm(120, generator=g)
            for k in range(0, 120, 20):
                ids = order[k : k + 20]
                losses = 1.0 / (1.0 + trained[ids]) + 0.01 * ids.float()
                sel = es.select(ids, losses=losses) if es.needs_scores else es.select(ids)
                picked = ids[sel.positions]
                es.observe(picked, 1.0 / (1.0 + trained[picked]))
                trained[picked] += 1
                out.append(sel.positions)
        return out

    for schedule in ("epoch:2", "fraction:0.3,cap=2", "stale:7"):
        kw = dict(seed=5, schedule=schedule, eps=0.1)
        g, trained = torch.Generator().manual_seed(0), torch.zeros(120)
        full = ek.EvolvedSampler(120, 5, **kw)
        want = loop(full, 5, 0, g, trained)

        g, trained = torch.Generator().manual_seed(0), torch.zeros(120)
        first = ek.EvolvedSampler(120, 5, **kw)
        got = loop(first, 3, 0, g, trained)
        sd = first.state_dict()
        assert not ScoringSchedule.parse(schedule).scores(sd["step"], 3)  # the next step selects from the state
        resumed = ek.EvolvedSampler(120, 5, seed=99)  # settings come from the checkpoint
        resumed.load_state_dict(sd)
        got += loop(resumed, 5, 3, g, trained)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
        assert torch.equal(resumed.state.tensor, full.state.tensor)
        assert resumed.state_dict()["counters"]["picks"].equal(full.state_dict()["counters"]["picks"])


def test_state_dict_counters_validated():
    es = ek.EvolvedSampler(10, 2, schedule="epoch:2")
    sd = es.state_dict()
    assert sd["schedule"] == "epoch:2,cap=1" and sd["counters"]["picks"].shape == (10,)
    bad = dict(sd, counters={"last_seen": torch.zeros(10, dtype=torch.int64), "picks": -torch.ones(10).long()})
    with pytest.raises(ValueError, match="picks"):
        es.load_state_dict(bad)
    with pytest.raises(ValueError, match="counters"):
        es.load_state_dict(dict(sd, counters=None))
    plain = ek.EvolvedSampler(10, 2).state_dict()
    assert plain["counters"] is None and plain["schedule"] == "step"
    with pytest.raises(ValueError, match="counters"):
        es.load_state_dict(dict(plain, counters=sd["counters"]))
    old = {k: v for k, v in plain.items() if k not in ("schedule", "counters")}  # saved by an earlier version
    es.load_state_dict(old)
    assert str(es.schedule) == "step" and es.state_dict()["counters"] is None


# ------------------------------------------------------------------ integrations
def test_trainer_with_a_schedule_matches_hand_loop(tmp_path):
    """ESTrainer on a schedule: scoring steps as before; the other steps select
    from the state and observe the training pass's per-sample losses."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch.nn.functional as F
    from test_integrations import (
        LR,
        B,
        N,
        V,
        assert_same_params,
        b,
        collate,
        make_data,
        make_model,
        read_ahead,
        trainer_args,
    )
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from es_kernels.integrations import ESCollator, ESDataset, ESStream
    from es_kernels.integrations.transformers import ESTrainer

    steps, schedule = 8, "fraction:0.5,cap=1"
    es = ek.EvolvedSampler(N, mini_batch=b, seed=0, schedule=schedule)
    seen = []
    orig = es.select
    es.select = lambda ids, **kw: seen.append((bool(kw), orig(ids, **kw))) or seen[-1][1]
    tr = ESTrainer(
        model=make_model(), args=trainer_args(tmp_path, max_steps=steps), train_dataset=make_data(),
        data_collator=collate, es_sampler=es,
    )  # fmt: skip
    tr.train()

    model = make_model()
    ref = ek.EvolvedSampler(N, mini_batch=b, seed=0, schedule=schedule)
    loader = DataLoader(
        ESDataset(make_data()), batch_size=B, sampler=ESStream(None, es=ref), collate_fn=ESCollator(collate)
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    it, kinds = read_ahead(loader), []
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = read_ahead(loader)
            batch = next(it)
        x, y, ids = batch["input_ids"], batch["labels"], batch["es_id"]
        kinds.append(ref.needs_scores)
        if ref.needs_scores:
            model.eval()
            with torch.no_grad():
                sel = ref.select(ids, logits=model(x).logits[:, :-1], targets=y[:, 1:])
            model.train()
        else:
            sel = ref.select(ids)
        pos = sel.positions
        yy = y[pos][:, 1:]
        tok = F.cross_entropy(model(x[pos]).logits[:, :-1].reshape(-1, V).float(), yy.reshape(-1), reduction="none")
        tok = tok.view(yy.shape)
        ref.observe(ids[pos], (tok.sum(1) / (yy != -100).sum(1).clamp(min=1)).detach())
        (tok.sum() / (yy != -100).sum()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert kinds == [k for k, _ in seen] and True in kinds and False in kinds
    assert es.step == ref.step == steps
    torch.testing.assert_close(es.state.tensor, ref.state.tensor, equal_nan=True, atol=1e-6, rtol=1e-5)
    assert torch.equal(es.state_dict()["counters"]["picks"], ref.state_dict()["counters"]["picks"])
    assert_same_params(tr.model, model)


def test_lightning_with_a_schedule_observes_the_training_losses(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from conftest import lit_module, lit_trainer
    from test_integrations import B, N, b

    m = lit_module(pl, N, B, es=ek.EvolvedSampler(N, mini_batch=b, seed=1, schedule="epoch:2"))
    calls = {"scored": 0, "from_state": 0, "observed": 0}
    orig_select, orig_observe = m.es_sampler.select, m.es_sampler._observe
    m.es_sampler.select = lambda ids, **kw: (
        calls.__setitem__("scored" if kw else "from_state", calls["scored" if kw else "from_state"] + 1)
        or orig_select(ids, **kw)
    )
    m.es_sampler._observe = lambda ids, l: calls.__setitem__("observed", calls["observed"] + 1) or orig_observe(ids, l)
    lit_trainer(pl, tmp_path, max_epochs=3).fit(m)  # 4 steps an epoch: epochs 0 and 2 score
    assert calls == {"scored": 8, "from_state": 4, "observed": 4}, calls
    assert not torch.isnan(m.es_sampler.state.s).any()


def test_distributed_world_of_one_equals_the_single_process_sampler(tmp_path):
    """W = 1, cap = B, eps = 0, on a schedule: the same decisions, positions,
    weights, state and counters as EvolvedSampler (scoring and from-state steps)."""
    import torch.distributed as dist

    from es_kernels.distributed import DistributedEvolvedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        for schedule in ("fraction:0.4", "stale:5,cap=2"):
            a = ek.EvolvedSampler(100, 7, seed=5, schedule=schedule)
            d = DistributedEvolvedSampler(100, 7, seed=5, schedule=schedule)
            g = torch.Generator().manual_seed(0)
            for epoch in range(4):
                a.set_epoch(epoch)
                d.set_epoch(epoch)
                for _ in range(4):
                    ids, losses = torch.randperm(100, generator=g)[:30], torch.rand(30, generator=g)
                    assert a.needs_scores == d.needs_scores
                    scores = {"losses": losses} if a.needs_scores else {}
                    x, y = a.select(ids, **scores), d.select(ids, **scores)
                    assert torch.equal(x.positions, y.positions) and torch.equal(x.weights, y.weights)
                    train = torch.rand(7, generator=g)
                    assert (a.observe(ids[x.positions], train) is None) == (d.observe(ids[y.positions], train) is None)
            sa, sd = a.state_dict(), d.state_dict()
            assert torch.equal(sa["state"]["s"].nan_to_num(-1), sd["state"]["s"].nan_to_num(-1))
            assert torch.equal(sa["state"]["errors"], sd["state"]["errors"])
            for k in ("last_seen", "picks"):
                assert torch.equal(sa["counters"][k], sd["counters"][k]), k
            assert a.step == d.step == 16
    finally:
        dist.destroy_process_group()


def _replica_worker(rank, world, init, out, schedule):
    """One rank of test_distributed_replicas_stay_identical: its own meta-batches."""
    import torch.distributed as dist

    from es_kernels.distributed import DistributedEvolvedSampler

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        es = DistributedEvolvedSampler(90, 4, seed=2, eps=0.1, schedule=schedule, meta_batch=12)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own ids and losses
        for epoch in range(4):
            es.set_epoch(epoch)
            for _ in range(3):
                ids = torch.randperm(90, generator=g)[: 12 - rank]  # ranks of different sizes
                sel = (
                    es.select(ids, losses=torch.rand(ids.shape[0], generator=g)) if es.needs_scores else es.select(ids)
                )
                es.observe(ids[sel.positions], torch.rand(sel.positions.shape[0], generator=g))
        torch.save(es.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("schedule", ["fraction:0.4,cap=1", "stale:4"])
def test_distributed_replicas_stay_identical(tmp_path, schedule):
    """Two gloo processes with different meta-batches: every replica ends with
    the same state, errors, step and counters."""
    import torch.multiprocessing as mp

    mp.spawn(_replica_worker, args=(2, str(tmp_path / "init"), str(tmp_path), schedule), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["step"] == b["step"] == 12
    for k in ("s", "d", "errors"):
        assert torch.equal(a["state"][k].nan_to_num(-1), b["state"][k].nan_to_num(-1)), k
    for k in ("last_seen", "picks"):
        assert torch.equal(a["counters"][k], b["counters"][k]), k
    assert int(a["counters"]["last_seen"].max()) >= 8 and not torch.isnan(a["state"]["s"]).all()
    if schedule.startswith("fraction"):
        assert int(a["counters"]["picks"].sum()) > 0


def test_many_programs_and_no_host_round_trip():
    """Triton over several programs (1024 positions each) against the reference,
    and neither the launcher nor the sampler's from-state step reads a device
    value on the host."""
    pytest.importorskip("triton")
    from conftest import BACKENDS
    from test_triton import no_host_sync

    T = BACKENDS["triton"]()
    state, ids, last_seen, picks = random_case(4000, 3000, 7, torch.float32, torch.int64)
    kw = dict(seed=3, eps=0.2, last_seen=last_seen, max_age=15, picks=picks, cap=2)
    step = torch.tensor(30)
    with no_host_sync():
        got = call(T.es_select_from_state, ids, state, 700, step_tensor=step, advance=True, **kw)
    want = call(R.es_select_from_state, ids, state, 700, step=30, **kw)
    assert all(torch.equal(x, y) for x, y in zip(got, want)) and int(step) == 31

    es = ek.EvolvedSampler(64, 4, seed=1, eps=0.1, schedule="fraction:0.5")
    ids = torch.randperm(64)[:16]
    es.select(ids, losses=torch.rand(16))
    with no_host_sync():
        sel = es.select(ids)
        es.observe(ids[sel.positions], torch.rand(4))
