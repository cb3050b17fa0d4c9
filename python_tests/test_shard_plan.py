"""One rank's ESWP plan (docs/spec.md section 11.2) from the prune op with
``id_offset``, ``order_key`` and ``threshold``: bit for bit the plan of a
plain-PyTorch model (python_tests/shard_plan_model.py), on every backend, at
ids past 2**32, and the op's new arguments against the reference."""

import math

import pytest
import shard_plan_model as M
import torch
from conftest import new_state
from hypothesis import given
from hypothesis import strategies as st

from es_kernels import _spec, sharded
from es_kernels import reference as R

try:
    from es_kernels import _C
except ImportError:
    _C = None

NEARLY_ONE = 1.0 - 2.0**-30  # drops every below-mean sample
RATIOS = [0.0, 0.5, NEARLY_ONE]
OFFSETS = [0, 7, 2**32 - 5, 2**32, 2**40 + 3, _spec.MAX_SAMPLES - 3000]


def thresholds(state):
    """The shard's own mean, a quantile, 0 and NaN (nothing below)."""
    score, seen = R.prune_scores(state)
    out = [R.prune_threshold(state)[2], 0.0, math.nan]
    if bool(seen.any()):
        out.append(float(score[seen].quantile(0.3)))
    return out


def same_plan(backend, state, lo, rank, tau, r, seed, epoch, rescale=True, num_epochs=10):
    kept, scale = M.plan(state, lo, rank, tau, r, seed, epoch, num_epochs, 0.125, rescale)
    args = (state, r, seed, epoch, num_epochs, 0.125, rescale, lo, rank, tau)
    order, num_kept, got_scale = backend.eswp_prune(*args)
    k = int(num_kept)
    assert torch.equal(order[:k] + lo, kept), (lo, rank, tau, r, epoch)
    assert torch.equal(got_scale, scale)
    ref = R.eswp_prune(*args)  # the op's whole output: the reference's, bit for bit
    assert torch.equal(order, ref[0]) and k == int(ref[1]) and torch.equal(got_scale, ref[2])
    return kept, scale


@given(
    n=st.integers(1, 2500),
    observed=st.floats(0, 1),
    lo=st.sampled_from(OFFSETS),
    rank=st.sampled_from([0, 1, 3, 2**32 + 1]),
    r=st.sampled_from(RATIOS),
    epoch=st.integers(0, 10),
    rescale=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**63 - 1),
)
def test_op_gives_the_models_plan(backend, n, observed, lo, rank, r, epoch, rescale, dtype, seed):
    if dtype not in backend.state_dtypes:
        dtype = torch.float32
    state, _ = new_state(n, dtype, observed, seed=seed % 997)
    for tau in thresholds(state):
        same_plan(backend, state, lo, rank, tau, r, seed, epoch, rescale)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 5000])
def test_shard_prune_plan_is_the_models(n):
    """shard_prune_plan itself (the CPU op), including annealing epochs (9 of 10),
    where nothing is dropped: its kept ids are then the whole visit order."""
    state, _ = new_state(n, observed=0.7, seed=n)
    for lo, rank in ((0, 0), (n, 1), (2**32 - n // 2, 5), (2**40, 2**20)):
        for tau in thresholds(state):
            for r in RATIOS:
                for epoch in (0, 3, 9):
                    got = sharded.shard_prune_plan(state, lo, rank, tau, r, 11, epoch, 10)
                    want = M.plan(state, lo, rank, tau, r, 11, epoch, 10)
                    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                    if epoch == 9:
                        assert torch.equal(got[0], M.visit(n, lo, rank, 11, epoch))


def test_plan_past_the_chunk_of_the_model():
    """A shard larger than the model's chunk (the op has none): the same plan."""
    n = 3000
    state, _ = new_state(n, observed=0.8, seed=2)
    tau = R.prune_threshold(state)[2]
    got = sharded.shard_prune_plan(state, 2**33, 2, tau, 0.5, 4, 1, 10)
    want = M.plan(state, 2**33, 2, tau, 0.5, 4, 1, 10, chunk=37)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_visit_of_the_sampler_is_the_models():
    """The visit order the sampler recomputes at load (from saved scales) and
    when a rank keeps nothing (all of its ids)."""
    n = 1000
    state, _ = new_state(n, observed=0.9, seed=5)
    for lo, rank in ((0, 0), (5000, 3), (2**35 + 1, 7)):
        tau = R.prune_threshold(state)[2]
        kept, scale = M.plan(state, lo, rank, tau, 0.6, 9, 2, 10)
        assert torch.equal(sharded._visit(state, lo, rank, 9, 2, scale), kept)
        assert torch.equal(sharded._visit(state, lo, rank, 9, 2, None), M.visit(n, lo, rank, 9, 2))


def test_defaults_are_the_replicated_plan(backend):
    """id_offset = 0, order_key = 0 and the state's own threshold: section 7's
    plan, and the model's with lo = 0, rank = 0."""
    state, _ = new_state(700, observed=0.6, seed=3)
    plain = backend.eswp_prune(state, 0.5, 8, 1, 10, 0.125, True)
    tau = R.prune_threshold(state)[2]
    given_ = backend.eswp_prune(state, 0.5, 8, 1, 10, 0.125, True, 0, 0, tau)
    assert all(torch.equal(a, b) for a, b in zip(plain, given_))
    kept, scale = M.plan(state, 0, 0, tau, 0.5, 8, 1, 10)
    assert torch.equal(plain[0][: int(plain[1])], kept) and torch.equal(plain[2], scale)


def test_offset_and_key_change_the_plan(backend):
    """The new arguments reach the noise and the order (a test that cannot pass
    if either were ignored)."""
    state, _ = new_state(2000, observed=1.0, seed=6)
    tau = R.prune_threshold(state)[2]
    base = backend.eswp_prune(state, 0.5, 1, 0, 10, 0.125, True, 0, 0, tau)
    shifted = backend.eswp_prune(state, 0.5, 1, 0, 10, 0.125, True, 2**32, 0, tau)
    keyed = backend.eswp_prune(state, 0.5, 1, 0, 10, 0.125, True, 0, 2**32, tau)
    assert not torch.equal(base[2], shifted[2])  # other drops: j's high word counts
    assert torch.equal(base[2], keyed[2]) and not torch.equal(base[0], keyed[0])  # same drops, other order


@pytest.mark.skipif(_C is None, reason="C++ library not built")
@pytest.mark.parametrize("n", [1, 300, 2**32 + 5, 2**40 + 3])
def test_cpp_keyed_permutation_at_sampled_positions(n):
    k = _spec.prune_perm_bits(n)
    g = torch.Generator().manual_seed(n % 1000)
    q = torch.randint(0, 1 << k, (2000,), generator=g)
    for seed, epoch, key in ((0, 0, 1), (2**40 + 1, 7, 2**32 + 9), (5, 2**31 + 3, 3)):
        want = R.prune_permute(q, k, R.prune_perm_keys(seed, epoch, key)).tolist()
        assert _C._prune_visit_perm(n, seed, epoch, q.tolist(), key) == want


def _call(name, **change):
    state, _ = new_state(12, seed=1)
    a = dict(state=state, prune_ratio=0.5, seed=1, epoch=0, num_epochs=4, anneal_frac=0.125, rescale=True)
    return torch.ops.es_kernels.eswp_prune(**{**a, **change})


@pytest.mark.parametrize(
    "change",
    [
        {"id_offset": -1},
        {"id_offset": _spec.MAX_SAMPLES - 11},  # the last id would be 2**48 - 1
        {"order_key": -1},
        {"threshold": math.inf},
        {"threshold": -math.inf},
    ],
    ids=str,
)
def test_bad_new_arguments_are_refused(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        _call("eswp_prune", **change)


def test_largest_offset_is_accepted():
    assert _call("eswp_prune", id_offset=_spec.MAX_SAMPLES - 12)[0].shape == (12,)


def test_opcheck_with_the_new_arguments():
    state, _ = new_state(40, seed=2)
    op = torch.ops.es_kernels.eswp_prune.default
    torch.library.opcheck(op, (state, 0.5, 1, 0, 4, 0.125, True, 2**40, 3, 0.25))
    torch.library.opcheck(op, (state, 0.5, 1, 0, 4, 0.125, True), {"threshold": math.nan})


@pytest.mark.parametrize("chunk", [1 << 18, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_passes_add_up_to_the_whole_states(chunk, dtype, monkeypatch):
    """The ranks' max and fixed-point sums give section 7's threshold of the whole
    state, with unobserved rows and (float64) scores that overflow to infinity."""
    monkeypatch.setattr(sharded, "PLAN_CHUNK", chunk)
    n = 1000
    state, _ = new_state(n, dtype, observed=0.7, seed=9)
    if dtype == torch.float64:
        state[5] = torch.tensor([1.7e308, 1.7e308], dtype=dtype)  # s + d = inf: not scored
        state[6] = torch.tensor([-1.7e308, -1.7e308], dtype=dtype)
    for world in (1, 3, 7):
        parts = [state[a : min(a + -(-n // world), n)] for a in range(0, n, -(-n // world))]
        amax = max(float(sharded._score_max(p)) for p in parts)
        words = [sum(v) for v in zip(*(sharded._fixed_point(p, amax).tolist() for p in parts))]
        assert sharded._threshold(amax, words) == R.prune_threshold(state)[2]
        assert words[2] == int(R.prune_scores(state)[1].sum())
