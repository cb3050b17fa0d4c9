"""Issue 8, the sampler side: no input corrupts the state or derails training.

* loading (ESState, EvolvedSampler, ESWPSampler) is all-or-nothing: corrupt
  dicts (hypothesis) raise ValueError naming the key and change nothing;
* the plan of an epoch is fixed when its iteration starts: len() calls and a
  DataLoader's workers reading ahead change neither its ids nor its scales;
* a run resumed from a mid-epoch checkpoint continues bit for bit;
* argument errors are ValueErrors naming the argument, before any write.
(docs/spec.md sections 8 and 11.)
"""

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import es_kernels as ek

N = 40


# ----------------------------------------------------------------- snapshots


def bits(t):
    """A tensor's exact content (NaN payloads and -0 included), or None."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype)
    return (t.dtype, tuple(t.shape), (t.view(view) if view else t).clone())


def same_bits(a, b):
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def es_snapshot(es):
    return {
        "state": bits(es.state.tensor),
        "errors": bits(es.state.errors),
        "step": es.step,
        "epoch": es.epoch,
        "scale": bits(es.scale),
        "scale_obj": id(es.scale),
        "settings": tuple(getattr(es, k) for k in es.SETTINGS),
    }


def plan_snapshot(plan):
    if plan is None:
        return None
    return (id(plan), plan.epoch, bits(plan.ids), id(plan.scale), plan.pos)


def pr_snapshot(pr):
    return {
        "settings": (pr.seed, pr.num_epochs, pr.prune_ratio, pr.anneal_frac, pr.rescale),
        "epoch": pr.epoch,
        "active": pr._active,
        "plan": plan_snapshot(pr._plan),
        "next": plan_snapshot(pr._next),
        "es": es_snapshot(pr.es),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple) and len(a[k]) == 3 and isinstance(a[k][0], torch.dtype):
            assert same_bits(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same(a[k], b[k])
        elif k in ("plan", "next") and a[k] is not None:
            assert b[k] is not None and a[k][:2] == b[k][:2] and same_bits(a[k][2], b[k][2]), k
            assert a[k][3:] == b[k][3:], k
        else:
            assert a[k] == b[k], k


# ------------------------------------------------------------- setups


def trained(mid=True, seed=3):
    """An ES + ESWP pair after some training, mid-epoch (or between epochs)."""
    g = torch.Generator().manual_seed(seed)
    es = ek.EvolvedSampler(N, 4, seed=seed)
    pr = ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5)
    es.select(torch.arange(N), losses=torch.rand(N, generator=g))
    it = iter(pr)
    for _ in range(2 if mid else 10**9):
        ids = torch.tensor([i for _, i in zip(range(8), it)], dtype=torch.int64)
        if ids.numel() == 0:
            break
        es.select(ids, losses=torch.rand(ids.numel(), generator=g))
    return es, pr


def good_dicts():
    es, pr = trained()
    return {"es": es.state_dict(), "pr": pr.state_dict(), "st": es.state.state_dict()}


# ------------------------------------------------------- corrupt dicts

HUGE = st.sampled_from([2**63, 2**64, 10**30, -(2**63) - 1, -1, -2])
NOT_INT = st.sampled_from([1.5, float("nan"), "3", None, True, [1], torch.tensor(3), b"1"])
NOT_REAL = st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), -0.5, 10**400, "0.5", None, torch.tensor(0.5), [0.5], True]
)
ODD_TENSOR = st.sampled_from(["shape+1", "2d", "0d", "dtype", "list", "numpy", "meta", "sparse", "empty"])


def odd_tensor(t, kind):
    if kind == "shape+1":
        return torch.cat([t, t[:1]])
    if kind == "2d":
        return t.reshape(-1, 1)
    if kind == "0d":
        return t[0]
    if kind == "dtype":
        return t.double() if t.dtype == torch.float32 else t.int()
    if kind == "list":
        return t.tolist()
    if kind == "numpy":
        return t.numpy()
    if kind == "meta":
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    if kind == "sparse":
        return t.to_sparse()
    return t[:0]


def set_values(t, idx, value):
    t = t.clone()
    t[idx % t.shape[0]] = value
    return t


# (object, path, strategy of a bad value or of a function of the good value, the name the error must hold)
def mutations():
    m = []
    ints = {"es": ["step", "epoch", "mini_batch", "seed"], "pr": ["epoch", "position", "seed", "num_epochs"]}
    for obj, keys in ints.items():
        for k in keys:
            m.append((obj, (k,), st.one_of(HUGE, NOT_INT), k))
    m += [
        ("es", ("mini_batch",), st.just(0), "mini_batch"),
        ("pr", ("num_epochs",), st.just(0), "num_epochs"),
        ("pr", ("epoch",), st.just(2**63 - 1), "epoch"),
    ]
    reals = {"es": ["beta1", "beta2", "eps", "w_min", "lam"], "pr": ["prune_ratio", "anneal_frac"]}
    for obj, keys in reals.items():
        for k in keys:
            m.append((obj, (k,), NOT_REAL, k))
    m += [
        ("es", ("beta1",), st.just(1.5), "beta1"),
        ("pr", ("prune_ratio",), st.just(1.0), "prune_ratio"),
        ("es", ("w_min",), st.just(0.0), "w_min"),
        ("es", ("lam",), st.just(-1.0), "lam"),
        ("es", ("select_mode",), st.sampled_from(["greedy", 3, None, b"sample", ["sample"]]), "select_mode"),
        ("pr", ("rescale",), st.sampled_from([1, 0, "True", None, np.float64(1.0)]), "rescale"),
    ]
    for obj, path, name in [
        ("es", ("scale",), "scale"),
        ("pr", ("scale",), "scale"),
        ("es", ("state", "s"), "'s'"),
        ("es", ("state", "d"), "'d'"),
        ("es", ("state", "errors"), "'errors'"),
        ("st", ("s",), "'s'"),
        ("st", ("d",), "'d'"),
        ("st", ("errors",), "'errors'"),
        ("pr", ("kept",), "kept"),
    ]:
        m.append((obj, path, ODD_TENSOR.map(lambda kind: lambda t: odd_tensor(t, kind)), name))
    vals = st.integers(0, 10**6)
    for obj, path, values, name in [
        ("es", ("scale",), [float("nan"), float("inf"), -1.0, -0.0 - 1e-30], "scale"),
        ("pr", ("scale",), [float("nan"), -float("inf"), -2.0], "scale"),
        ("es", ("state", "s"), [float("inf"), -float("inf")], "'s'"),
        ("es", ("state", "d"), [float("nan"), float("inf"), -float("inf")], "'d'"),
        ("es", ("state", "errors"), [-1, -(2**63)], "'errors'"),
        ("st", ("s",), [float("inf")], "'s'"),
        ("st", ("d",), [float("nan")], "'d'"),
        ("st", ("errors",), [-5], "'errors'"),
        ("pr", ("kept",), [-1, N, 2**40], "kept"),
    ]:
        m.append(
            (obj, path, st.tuples(vals, st.sampled_from(values)).map(lambda iv: lambda t: set_values(t, *iv)), name)
        )
    m.append(("pr", ("kept",), st.just(lambda t: torch.cat([t[:-1], t[:1]])), "kept"))  # a repeated id
    m.append(("pr", ("position",), st.just(lambda p: 10**6), "position"))
    m.append(("pr", ("kept",), st.just(lambda t: None), "position"))  # position > 0 without kept
    m.append(("pr", ("scale",), st.just(lambda t: None), "scale"))  # kept without scale
    for obj, keys in {
        "es": ek.EvolvedSampler.STATE_KEYS,
        "pr": ek.ESWPSampler.STATE_KEYS,
        "st": ek.ESState.KEYS,
    }.items():
        for k in keys:
            m.append((obj, (k,), st.just("DELETE"), repr(k)))
    for obj in ("es", "pr", "st"):
        m.append((obj, ("zzz",), st.just(1), "'zzz'"))
    m.append(("es", ("state", "zzz"), st.just(1), "'zzz'"))
    m.append(("es", ("state",), st.sampled_from([None, [], "state", torch.zeros(N, 2)]), "state"))
    return m


MUTATIONS = mutations()


def apply(sd, path, bad):
    sd = dict(sd)
    if len(path) == 2:
        sd[path[0]] = apply(sd[path[0]], path[1:], bad)
        return sd
    if isinstance(bad, str) and bad == "DELETE":
        sd.pop(path[0])
    elif callable(bad):
        sd[path[0]] = bad(sd[path[0]])
    else:
        sd[path[0]] = bad
    return sd


@st.composite
def corrupt(draw, obj):
    """A good dict of ``obj`` with one to three entries corrupted, and the names
    the error may give."""
    good = GOOD[obj]
    cands = [mu for mu in MUTATIONS if mu[0] == obj]
    picks = draw(st.lists(st.sampled_from(range(len(cands))), min_size=1, max_size=3, unique=True))
    sd, names, used = good, [], set()
    for k in picks:
        _, path, strat, name = cands[k]
        if path[0] in used:
            continue
        used.add(path[0])
        sd = apply(sd, path, draw(strat))
        names.append(name)
    return sd, names


GOOD = good_dicts()
PAIR = trained(seed=5)  # shared by the examples: a failed load writes nothing (checked each time)


def load_fails(load, sd, names, snap, before):
    with pytest.raises(ValueError) as exc:
        load(sd)
    assert any(n in str(exc.value) for n in names), (names, str(exc.value))
    assert_same(before, snap())


def _load_is_all_or_nothing(which: str, examples: int):
    """A test: loading a corrupt dict of ``which`` (``es``, ``pr``: the samplers,
    ``st``: the state) raises ValueError naming the entry and changes nothing."""

    @settings(max_examples=examples)
    @given(corrupt(which))
    def test(case):
        es, pr = PAIR
        snap = (lambda: pr_snapshot(pr)) if which == "pr" else (lambda: es_snapshot(es))
        load = {"es": es, "pr": pr, "st": es.state}[which].load_state_dict
        load_fails(load, *case, snap, snap())

    return test


test_evolved_sampler_load_is_all_or_nothing = _load_is_all_or_nothing("es", 300)
test_eswp_sampler_load_is_all_or_nothing = _load_is_all_or_nothing("pr", 300)
test_state_load_is_all_or_nothing = _load_is_all_or_nothing("st", 150)


@pytest.mark.parametrize("obj", ["es", "pr", "st"])
def test_not_a_dict(obj):
    es, pr = trained(seed=5)
    load = {"es": es.load_state_dict, "pr": pr.load_state_dict, "st": es.state.load_state_dict}[obj]
    before = pr_snapshot(pr)
    for bad in (None, [], "sd", torch.zeros(3)):
        with pytest.raises(ValueError, match="must be a dict"):
            load(bad)
    assert_same(before, pr_snapshot(pr))


def test_good_dicts_load_and_equivalent_values_are_accepted():
    es, pr = trained(seed=5)
    es.load_state_dict(GOOD["es"])
    pr.load_state_dict(GOOD["pr"])
    es.state.load_state_dict(GOOD["st"])
    sd = dict(GOOD["es"], step=np.int64(GOOD["es"]["step"]), beta1=np.float32(0.25), lam=3, scale=None, epoch=2**63 - 1)
    es.load_state_dict(sd)
    assert es.beta1 == 0.25 and es.lam == 3.0 and es.scale is None and es.epoch == 2**63 - 1
    pr.load_state_dict(dict(GOOD["pr"], epoch=2**63 - 2, seed=2**63 - 1))
    assert pr.epoch == 2**63 - 2 and pr.seed == 2**63 - 1


def test_errors_may_be_saved_by_the_state_but_not_by_the_sampler():
    es = ek.EvolvedSampler(8, 2)
    es.select(torch.tensor([1, 9]), losses=torch.tensor([1.0, float("nan")]))
    sd = es.state.state_dict()
    assert sd["errors"].tolist() == [1, 0]
    with pytest.raises(RuntimeError, match="out of range"):
        es.state_dict()
    other = ek.ESState(8)
    other.load_state_dict(sd)
    assert other.errors.tolist() == [1, 0]


# ------------------------------------------------- the plan of an epoch


def eswp_pair(n=300, seed=1, prune_ratio=0.6, num_epochs=5):
    es = ek.EvolvedSampler(n, 4, seed=seed)
    ek.es_update(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(seed)), es.state)
    return es, ek.ESWPSampler(es, num_epochs=num_epochs, prune_ratio=prune_ratio)


def losses_of(ids, epoch):
    return torch.sin(ids.double() * 0.37 + epoch).float() ** 2 + 0.05


def train_with_loader(num_workers, epochs=3, len_calls=True, set_epoch=False, n=300):
    es, pr = eswp_pair(n)
    x = torch.randn(n, 2)
    loader = DataLoader(
        ek.IndexedDataset(TensorDataset(x)),
        batch_size=16,
        sampler=pr,
        num_workers=num_workers,
        persistent_workers=False,
    )
    log = []
    for epoch in range(epochs):
        announced = None
        if set_epoch:  # then len() gives the new epoch's length before iterating
            pr.set_epoch(epoch)
            announced = len(loader)
        it = iter(loader)
        scale = n_batches = None
        batches = 0
        for ids, _ in it:
            if scale is None:  # the epoch's iteration has started
                scale, n_batches = es.scale, len(loader)
                assert announced in (None, n_batches)
            if len_calls:
                assert len(loader) == n_batches and len(pr) == len(pr._plan)
            assert es.scale is scale  # nothing swaps the scales mid-epoch
            sel = es.select(ids, losses=losses_of(ids, epoch))
            assert torch.equal(sel.scales, scale[ids[sel.positions]])
            log.append((epoch, ids.tolist(), sel.positions.tolist(), sel.scales.tolist()))
            batches += 1
        assert batches == n_batches
        log.append(("end", epoch, batches, bits(scale)))
    return log, es


def same_log(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x[0] == "end":
            assert x[:3] == y[:3] and same_bits(x[3], y[3])
        else:
            assert x == y


@pytest.mark.parametrize("set_epoch", [False, True])
def test_dataloader_with_workers_keeps_the_epoch_plan(set_epoch):
    """num_workers=2 reads ahead to the end of the epoch while training is
    still on its first batches; len() is called between batches. The run equals
    the one without workers or len() calls, batch for batch."""
    plain, es_a = train_with_loader(0, len_calls=False, set_epoch=set_epoch)
    workers, es_b = train_with_loader(2, set_epoch=set_epoch)
    same_log(plain, workers)
    assert same_bits(bits(es_a.state.tensor), bits(es_b.state.tensor))


def test_len_mid_epoch_and_after_exhaustion_keeps_the_plan():
    es, pr = eswp_pair()
    k0 = len(pr)  # computes epoch 0's plan, kept for the iteration
    assert pr._next is not None and es.scale is None  # nothing installed by len()
    it = iter(pr)
    assert pr._next is None and pr.epoch == 1
    plan_scale = es.scale
    first = [next(it) for _ in range(10)]
    es.select(torch.tensor(first), losses=torch.full((10,), 50.0))  # the state moves mid-epoch
    assert len(pr) == k0
    rest = list(it)  # a loader reading ahead to the end
    assert len(first) + len(rest) == k0 and len(set(first + rest)) == k0
    for _ in range(3):
        assert len(pr) == k0 and es.scale is plan_scale and pr.scale is plan_scale
    assert pr.state_dict()["epoch"] == 1 and pr.state_dict()["kept"] is None
    pr.set_epoch(1)  # announces epoch 1: len() now reports its plan, scales still those of epoch 0
    k1 = len(pr)
    assert es.scale is plan_scale
    assert len(list(pr)) == k1 and es.scale is not plan_scale


def test_len_before_iteration_is_the_iterations_length():
    es, pr = eswp_pair()
    k = len(pr)
    es.select(torch.arange(20), losses=torch.full((20,), 9.0))  # moves the state before iter()
    assert len(list(pr)) == k


def test_a_new_iteration_or_set_epoch_stops_a_stale_iterator():
    es, pr = eswp_pair()
    a = iter(pr)
    next(a)
    b = iter(pr)  # starts epoch 1
    assert list(a) == [] and pr._plan.epoch == 1
    next(b)
    pr.set_epoch(5)
    assert list(b) == []


# ------------------------------------------------- mid-epoch resume


def loop(es, pr, epochs, stop=None, set_epoch=False, bs=7):
    """Train ``epochs`` epochs from the sampler's epoch; with ``stop=(e, k)``
    return a checkpoint after k batches of the e-th epoch run here."""
    picks = []
    epoch0 = pr.epoch  # a loop counter: the epoch in progress after a mid-epoch load
    for r in range(epochs):
        if set_epoch:
            pr.set_epoch(epoch0 + r)  # DistributedSampler style; keeps a resumed epoch
        it = iter(pr)
        epoch = pr.epoch - 1
        k = 0
        while True:
            ids = torch.tensor([i for _, i in zip(range(bs), it)], dtype=torch.int64)
            if ids.numel() == 0:
                break
            sel = es.select(ids, losses=losses_of(ids, epoch))
            picks.append((epoch, ids[sel.positions].tolist(), sel.scales.tolist(), sel.weights.tolist()))
            k += 1
            if stop == (r, k):
                buf = io.BytesIO()
                torch.save({"es": es.state_dict(), "pr": pr.state_dict()}, buf)
                return picks, buf.getvalue()
    return picks, None


@pytest.mark.parametrize("stop", [(0, 1), (1, 3), (2, 5), (3, 1)])
@pytest.mark.parametrize("set_epoch", [False, True])
def test_mid_epoch_resume_is_bit_exact(stop, set_epoch):
    E = 5
    es_a, pr_a = eswp_pair(120, num_epochs=E)
    full, _ = loop(es_a, pr_a, E)

    es_b, pr_b = eswp_pair(120, num_epochs=E)
    first, blob = loop(es_b, pr_b, E, stop=stop)
    ck = torch.load(io.BytesIO(blob))
    assert ck["pr"]["kept"] is not None and ck["pr"]["position"] == 7 * stop[1]
    es_c = ek.EvolvedSampler(120, 9, seed=77, beta2=0.1)  # everything comes from the checkpoint
    pr_c = ek.ESWPSampler(es_c, num_epochs=1, prune_ratio=0.1)
    pr_c.load_state_dict(ck["pr"])  # either order
    es_c.load_state_dict(ck["es"])
    assert pr_c.epoch == stop[0] and len(pr_c) == len(ck["pr"]["kept"]) and pr_c.position == 7 * stop[1]
    rest, _ = loop(es_c, pr_c, E - stop[0], set_epoch=set_epoch)
    assert first + rest == full
    assert same_bits(bits(es_a.state.tensor), bits(es_c.state.tensor))
    assert same_bits(bits(es_a.scale), bits(es_c.scale)) and es_a.step == es_c.step
    assert pr_a.state_dict()["epoch"] == pr_c.state_dict()["epoch"] == E


def test_resume_twice_within_one_epoch():
    es_a, pr_a = eswp_pair(120)
    full, _ = loop(es_a, pr_a, 3)
    es_b, pr_b = eswp_pair(120)
    p1, blob = loop(es_b, pr_b, 3, stop=(1, 2))
    es_c, pr_c = eswp_pair(120)
    es_c.load_state_dict(torch.load(io.BytesIO(blob))["es"])
    pr_c.load_state_dict(torch.load(io.BytesIO(blob))["pr"])
    p2, blob = loop(es_c, pr_c, 2, stop=(0, 3))  # resumed, then saved again in the same epoch
    assert torch.load(io.BytesIO(blob))["pr"]["position"] == 7 * 5
    es_d, pr_d = eswp_pair(120)
    es_d.load_state_dict(torch.load(io.BytesIO(blob))["es"])
    pr_d.load_state_dict(torch.load(io.BytesIO(blob))["pr"])
    p3, _ = loop(es_d, pr_d, 2)
    assert p1 + p2 + p3 == full


def test_resume_with_prefetching_loader_uses_the_consumed_position():
    """With workers the sampler has yielded more than the loop trained on:
    state_dict(position=consumed) makes the checkpoint exact."""
    n, bs = 200, 10
    es_a, pr_a = eswp_pair(n)
    x = torch.arange(n).float()
    mk = lambda pr, w: DataLoader(
        ek.IndexedDataset(TensorDataset(x)), batch_size=bs, sampler=pr, num_workers=w, persistent_workers=False
    )
    ref = []
    for epoch in range(2):
        for ids, _ in mk(pr_a, 0):
            ref.append(es_a.select(ids, losses=losses_of(ids, epoch)).positions.tolist())

    es_b, pr_b = eswp_pair(n)
    got = []
    for ids, _ in mk(pr_b, 2):
        got.append(es_b.select(ids, losses=losses_of(ids, 0)).positions.tolist())
        if len(got) == 4:
            break
    assert pr_b.position > 4 * bs  # the workers read ahead
    with pytest.raises(ValueError, match="position"):
        pr_b.state_dict(position=pr_b.position + 1)
    ck = {"es": es_b.state_dict(), "pr": pr_b.state_dict(position=4 * bs)}
    es_c, pr_c = eswp_pair(n)
    es_c.load_state_dict(ck["es"])
    pr_c.load_state_dict(ck["pr"])
    for epoch in range(2):
        for ids, _ in mk(pr_c, 2):
            got.append(es_c.select(ids, losses=losses_of(ids, epoch)).positions.tolist())
    assert got == ref
    assert same_bits(bits(es_a.state.tensor), bits(es_c.state.tensor))


def test_state_dict_between_epochs_and_before_any():
    es, pr = eswp_pair(50)
    sd = pr.state_dict()
    assert (sd["epoch"], sd["position"], sd["kept"]) == (0, 0, None)
    list(pr)
    sd = pr.state_dict()
    assert (sd["epoch"], sd["position"], sd["kept"]) == (1, 0, None)
    it = iter(pr)
    next(it)
    sd = pr.state_dict()
    assert (sd["epoch"], sd["position"]) == (1, 1) and sd["kept"].dtype == torch.int64
    assert pr.state_dict(position=0)["position"] == 0
    pr.set_epoch(4)
    sd = pr.state_dict()
    assert (sd["epoch"], sd["position"], sd["kept"]) == (4, 0, None)
    with pytest.raises(ValueError, match="position"):
        pr.state_dict(position=1)


def test_resumed_plan_carries_its_scales():
    es, pr = eswp_pair(50)
    it = iter(pr)
    next(it)
    sd = pr.state_dict()
    assert torch.equal(sd["scale"], es.scale) and sd["scale"] is not es.scale
    es2, pr2 = eswp_pair(50)
    pr2.load_state_dict(sd)
    assert es2.scale is None  # installed when the iteration starts, not on load
    assert list(pr2) == sd["kept"][1:].tolist() and torch.equal(es2.scale, sd["scale"])


def test_a_plan_computed_by_len_is_saved():
    es, pr = eswp_pair(50)
    k = len(pr)
    sd = pr.state_dict()
    assert (sd["epoch"], sd["position"], len(sd["kept"])) == (0, 0, k)
    es.select(torch.arange(10), losses=torch.full((10,), 30.0))  # the state moves; the plan does not
    ck = {"es": es.state_dict(), "pr": pr.state_dict()}
    es2, pr2 = eswp_pair(50)
    es2.load_state_dict(ck["es"])
    pr2.load_state_dict(ck["pr"])
    assert list(pr2) == list(pr) == sd["kept"].tolist()
    assert torch.equal(es.scale, es2.scale)


# ------------------------------------------------- argument errors


@pytest.mark.parametrize("bad", [2**63, 2**64, 10**40, -1, -2, 1.0, "1", None, torch.tensor(1)])
def test_epoch_arguments(bad):
    es, pr = eswp_pair(20)
    before = pr_snapshot(pr)
    with pytest.raises(ValueError, match="epoch"):
        pr.set_epoch(bad)
    with pytest.raises(ValueError, match="epoch"):
        es.set_epoch(bad)
    with pytest.raises(ValueError, match="epoch"):
        ek.eswp_prune(es.state, 0.5, epoch=bad)
    assert_same(before, pr_snapshot(pr))
    with pytest.raises(ValueError, match="num_epochs"):
        ek.ESWPSampler(es, num_epochs=bad)
    with pytest.raises(ValueError, match="num_epochs"):
        ek.eswp_prune(es.state, 0.5, num_epochs=bad)
    with pytest.raises(ValueError, match="epoch"):
        pr.set_epoch(2**63 - 1)  # its next epoch would not be an int64


@pytest.mark.parametrize(
    "ids",
    [
        3,
        torch.tensor(3),
        torch.zeros(2, 2, dtype=torch.long),
        torch.arange(4, device="meta"),
        torch.arange(4).float(),
        [1, 2],
        np.arange(4),
    ],
)
def test_select_bad_ids(ids):
    es = ek.EvolvedSampler(10, 2)
    before = es_snapshot(es)
    with pytest.raises(ValueError, match="ids"):
        es.select(ids, losses=torch.rand(4))
    assert_same(before, es_snapshot(es))


def test_empty_dataset_counts_bad_ids():
    es = ek.EvolvedSampler(0, 2)
    pr = ek.ESWPSampler(es, num_epochs=3)
    assert len(pr) == 0 and list(pr) == [] and es.scale.shape == (0,)
    sel = es.select(torch.tensor([0, 5, -1]), losses=torch.rand(3))
    assert sel.positions.shape == (2,) and torch.equal(sel.scales, torch.ones(2))
    assert es.state.errors.tolist() == [3, 0]
    sel = es.select(torch.tensor([0]), logits=torch.randn(1, 3), targets=torch.tensor([1]))
    assert es.state.errors.tolist() == [4, 0]
    with pytest.raises(RuntimeError, match="out of range"):
        list(pr)


def test_settings_and_scale_errors():
    with pytest.raises(ValueError, match="mini_batch"):
        ek.EvolvedSampler(10, 0)
    with pytest.raises(ValueError, match="mini_batch"):
        ek.EvolvedSampler(10, 2**63)
    with pytest.raises(ValueError, match="num_samples"):
        ek.EvolvedSampler(2**64, 2)
    with pytest.raises(ValueError, match="seed"):
        ek.EvolvedSampler(10, 2, seed=torch.tensor(1))
    with pytest.raises(ValueError, match="select_mode"):
        ek.EvolvedSampler(10, 2, select_mode=["sample"])
    with pytest.raises(ValueError, match="es must be"):
        ek.ESWPSampler(None, 3)
    es = ek.EvolvedSampler(10, 2)
    for bad in (torch.ones(9), torch.ones(10).double(), torch.ones(10, 1), [1.0] * 10):
        with pytest.raises(ValueError, match="scale"):
            es.scale = bad
    assert es.scale is None
    sd = es.state_dict()
    with pytest.raises(ValueError, match="scale"):
        es.load_state_dict(dict(sd, scale=torch.ones(11)))
    es.scale = torch.full((10,), 2.0)
    assert es.select(torch.tensor([1, 20]), losses=torch.rand(2)).scales.tolist() == [2.0, 1.0]


def test_eswp_settings_are_all_or_nothing_on_load():
    """The old ESWPSampler.load_state_dict wrote the settings before failing on the epoch."""
    es, pr = trained(seed=2)
    before = pr_snapshot(pr)
    sd = dict(pr.state_dict(), num_epochs=99, prune_ratio=0.9, epoch=-2)
    with pytest.raises(ValueError, match="epoch"):
        pr.load_state_dict(sd)
    assert_same(before, pr_snapshot(pr))
    assert pr.num_epochs == 6 and math.isclose(pr.prune_ratio, 0.5)


def test_checkpoint_after_a_complete_epoch_resumes_len():
    """Found by the stateful fuzz: a checkpoint taken when the epoch's ids were
    all yielded (before the next iter()) resumes with the same len() and the
    same next epoch, although the state moved after the checkpoint."""
    import es_kernels as ek

    def pair():
        es = ek.EvolvedSampler(16, 2, seed=7)
        ek.es_update(torch.arange(16), torch.linspace(0.1, 3.0, 16), es.state)
        return es, ek.ESWPSampler(es, num_epochs=4, prune_ratio=0.5)

    es, pr = pair()
    ids = list(pr)  # the whole epoch
    ck = {"es": es.state_dict(), "pr": pr.state_dict()}
    assert ck["pr"]["finished"] == len(ids) and ck["pr"]["kept"] is None
    es2, pr2 = pair()
    es2.load_state_dict(ck["es"])
    pr2.load_state_dict(ck["pr"])
    for e in (es, es2):  # the state moves after the checkpoint
        e.select(torch.tensor([0, 2]), losses=torch.tensor([50.0, 1.0]))
    assert len(pr2) == len(pr) == len(ids)
    assert list(pr2) == list(pr)
