"""The ops' contract when called directly (docs/spec.md section 8): every
``torch.ops.es_kernels.*`` op, on every backend present, refuses bad input
with a ValueError naming the argument before anything is written; and the
edge cases whose results must agree between entry points (a row with nothing
to score from hidden states, empty logits, the prune score's overflow, a
rank's selection)."""

import math

import pytest
import torch
from conftest import assert_state_equal, new_state

import es_kernels as ek
from es_kernels import _ops
from es_kernels import reference as R
from es_kernels.distributed import rank_selection

NAN = float("nan")


def base_call(name, dtype=torch.float32):
    """Valid arguments of op ``name`` (positional, schema order): an
    ``OpArgs`` whose fields the cases below replace one at a time."""
    g = torch.Generator().manual_seed(3)
    st, er = new_state(12, dtype=dtype, seed=1)
    ids = torch.tensor([3, 0, 7, 11, 5])
    losses = torch.rand(5, generator=g) * 3
    logits, targets = torch.randn(5, 6, generator=g), torch.randint(0, 6, (5,), generator=g)
    args = {
        "per_sample_cross_entropy": (logits, targets, -100, 0.0),
        "per_sample_cross_entropy_backward": (torch.rand(5, generator=g), logits, targets, -100, 0.0),
        "es_update": (ids, losses, st, er, 0.2, 0.5, 1.0, 1e-8),
        "weighted_select": (losses, 2, "sample", 1, 2),
        "es_step_from_losses": (losses, ids, st, er, 2, 0.2, 0.5, "sample", 1, 2),
        "es_step": (logits, targets, ids, st, er, 2, 0.2, 0.5, "sample", 1, 2),
        "eswp_prune": (st, 0.5, 1, 0, 4, 0.125, True),
        "es_select_from_state": (ids, st, er, 2, 1.0, 1e-8, "sample", 1, 2),
    }[name]
    return _ops.bind(name, *args)


_SETTINGS = [
    ("beta1", 1.5),
    ("beta1", -0.1),
    ("beta2", 1.01),
    ("beta2", NAN),
    ("lam", -1.0),
    ("lam", math.inf),
    ("lam", 1e39),
    ("w_min", 1e39),  # f32(w_min) = inf: every weight inf
    ("w_min", 1e-50),  # f32(w_min) = 0: weights 0
    ("w_min", 0.0),
    ("w_min", -1e-8),
]
_STEP = [
    ("b", -1),
    ("b", 6),
    ("select_mode", "top"),
    ("seed", -1),
    ("step", -5),
    ("eps", 1.5),
    ("eps", -0.5),
    ({"seed": 0, "seed_tensor": torch.tensor([1])}, "seed"),  # 1-D
    ({"step": 0, "step_tensor": torch.tensor([1, 2])}, "step"),
    ({"seed": 0, "seed_tensor": torch.tensor(1.0)}, "seed"),  # not int64
    ({"step": 0, "step_tensor": torch.tensor(1, dtype=torch.int32)}, "step"),
    ({"seed": 3, "seed_tensor": torch.tensor(4)}, "seed"),  # both: the tensor would win silently
    ({"step": 2, "step_tensor": torch.tensor(4)}, "step"),
    ({"select_mode": "topk", "eps": 0.5}, "eps"),
    ({"step": 0, "advance_step": True}, "advance_step"),  # no step tensor to advance
]
_LOGITS = [
    ("label_smoothing", 1.5),
    ("label_smoothing", -0.1),
    ("logits", lambda a: a.logits.double()),
    ("logits", lambda a: a.logits.to(torch.int32)),
    ("logits", lambda a: a.logits.to(torch.int64)),
    ("logits", lambda a: a.logits.to(torch.complex64)),
    ("logits", lambda a: a.logits[:, :0]),  # C = 0 with B > 0
    ("targets", lambda a: a.targets.float()),
    ("targets", lambda a: a.targets[:3]),
]
_IN_PLACE = [
    ("errors", lambda a: torch.zeros(1, dtype=torch.int64).expand(2)),
    ("state", lambda a: a.state[:1].expand(a.state.shape[0], 2)),
    ("errors", lambda a: a.errors.to(torch.int32)),
    ("state", lambda a: a.state[:, :1]),
    ("ids", lambda a: a.ids.float()),
    ("ids", lambda a: a.ids[:3]),
]


def _cases(name):
    step = [c for c in _STEP if name != "weighted_select" or "advance_step" not in str(c)]
    table = {
        "per_sample_cross_entropy": _LOGITS,
        "per_sample_cross_entropy_backward": _LOGITS
        + [("grad", lambda a: a.grad[:3]), ("grad", lambda a: a.grad.long())],
        "es_update": _SETTINGS + _IN_PLACE + [("losses", lambda a: a.losses.long())],
        "weighted_select": step + [("weights", lambda a: a.weights.long()), ("offset", -1), ("offset", 2**48)],
        "es_step_from_losses": _SETTINGS + step + _IN_PLACE + [("mask", lambda a: torch.ones(5, 1, dtype=torch.bool))],
        "es_step": _SETTINGS + step + [c for c in _LOGITS if c[0] != "targets"] + _IN_PLACE[:2],
        "eswp_prune": [
            ("prune_ratio", 1.0),
            ("prune_ratio", -0.1),
            ("seed", -1),
            ("epoch", -1),
            ("num_epochs", 0),
            ("anneal_frac", 1.5),
            ("anneal_frac", -0.1),
            ("state", lambda a: a.state[:, :1]),
            ("id_offset", -1),
            ("id_offset", 2**48 - 12),  # the last of the 12 ids would be 2**48 - 1
            ("order_key", -1),
            ("threshold", math.inf),
        ],
        "es_select_from_state": [c for c in _SETTINGS if c[0] in ("lam", "w_min")]
        + step
        + [c for c in _IN_PLACE if c[0] != "ids" or "float" in str(c)]
        + [("ids", lambda a: a.ids.float()), ("max_age", -2), ("cap", -2)],
    }[name]
    for change in table:
        if isinstance(change[0], dict):
            shown = "+".join(f"{k}={v.tolist() if isinstance(v, torch.Tensor) else v}" for k, v in change[0].items())
            yield pytest.param(name, change[0], change[1], id=f"{name}-{shown}")
        else:
            key, value = change
            shown = "fn" if callable(value) else repr(value)
            yield pytest.param(name, {key: value}, key, id=f"{name}-{key}={shown}")


CASES = [case for name in _ops.OP_NAMES for case in _cases(name)]


def _snapshot(a):
    return {k: v.clone() for k, v in a._asdict().items() if isinstance(v, torch.Tensor)}


def _unchanged(before, a):
    for k, v in before.items():
        now = getattr(a, k)
        assert v.shape == now.shape and v.dtype == now.dtype, k
        assert (
            torch.equal(v, now) or torch.equal(v.isnan(), now.isnan()) and torch.equal(v.nan_to_num(), now.nan_to_num())
        ), k


@pytest.mark.parametrize("name,change,arg", CASES)
def test_raw_op_refuses_bad_input_before_writing(backend, name, change, arg):
    a = base_call(name)
    getattr(backend, name)(*a)  # the valid call runs on this backend (the cases change one thing)
    a = base_call(name)
    a = a._replace(**{k: v(a) if callable(v) else v for k, v in change.items()})
    before = _snapshot(a)
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        getattr(backend, name)(*a)
    _unchanged(before, a)


def test_float64_state_is_refused_by_triton_only(backend):
    a = base_call("es_update", torch.float64)
    before = _snapshot(a)
    if backend.name == "triton":
        with pytest.raises(ValueError, match="state"):
            backend.es_update(*a)
        _unchanged(before, a)
    else:
        backend.es_update(*a)


def test_the_check_layer_runs_in_inference_mode():
    a = base_call("es_update")._replace(beta1=2.0)
    before = _snapshot(a)
    with torch.inference_mode(), pytest.raises(ValueError, match="beta1"):
        torch.ops.es_kernels.es_update(*a)
    _unchanged(before, a)


# ---------------------------------------------------------------- empty logits (C >= 1 only when B > 0)
@pytest.mark.parametrize("shape", [(0, 0), (0, 3, 0), (0, 0, 0)])
def test_empty_logits_without_classes(backend, shape, api):
    logits, targets = torch.zeros(shape), torch.zeros(shape[:-1], dtype=torch.int64)
    for fn in (backend.per_sample_cross_entropy, R.per_sample_cross_entropy, api.per_sample_cross_entropy):
        out = fn(logits, targets, -100, 0.0) if fn is not api.per_sample_cross_entropy else fn(logits, targets)
        assert out.shape == (0,) and out.dtype == torch.float32
    st, er = new_state(4)
    before = (st.clone(), er.clone())
    pos, losses, w = backend.es_step(logits, targets, torch.zeros(0, dtype=torch.int64), st, er, 0, 0.2, 0.5)
    assert pos.shape == losses.shape == w.shape == (0,)
    assert_state_equal(before, (st, er))


# ---------------------------------------------------------------- w_min rounding to 0 or inf in float32
@pytest.mark.parametrize("w_min", [1e-50, 1e39, 0.0])
def test_w_min_is_checked_in_float32(w_min):
    st = ek.ESState(8)
    with pytest.raises(ValueError, match="w_min"):
        ek.es_update(torch.arange(3), torch.rand(3), st, w_min=w_min)
    with pytest.raises(ValueError, match="w_min"):
        ek.EvolvedSampler(8, 2, w_min=w_min)
    assert torch.isnan(st.s).all()


def test_w_min_in_range_is_the_weight_floor():
    st = ek.ESState(4, dtype=torch.float64)
    w = ek.es_update(torch.arange(2), torch.tensor([-5.0, 1.0]), st, w_min=1e-40)  # float32 subnormal: allowed
    assert w[0] == torch.tensor(1e-40, dtype=torch.float32) > 0 and w[1] == 1.0


# ---------------------------------------------------------------- a rank's selection stays in its rows
@pytest.mark.parametrize("select_mode", ["topk", "sample"])
@pytest.mark.parametrize("fill", [0.0, NAN, -math.inf, 1e-45])
def test_rank_selection_never_leaves_the_rank(select_mode, fill):
    W, cap, n = 3, 6, 5
    g = torch.Generator().manual_seed(2)
    weights = torch.rand(W * cap, generator=g) + 1
    for rank in range(W):
        w = weights.clone()
        w[rank * cap : rank * cap + 3] = fill  # three of the rank's five positions
        for b in range(n + 1):
            pos = rank_selection(w, rank, cap, n, b, select_mode, 4, 7)
            assert pos.dtype == torch.int64 and pos.shape == (b,)
            assert ((pos >= 0) & (pos < n)).all() and (pos[1:] > pos[:-1]).all(), (rank, b, pos)
            if b <= 2:  # the two real weights (> fill) come first
                assert set(pos.tolist()) <= {3, 4}
            elif fill != fill or fill == -math.inf:  # -inf keys: ties go to the lowest own positions
                assert pos.tolist() == sorted([3, 4] + list(range(b - 2)))


def test_rank_selection_unchanged_for_positive_weights():
    """Real weights (>= f32(w_min) > 0) select what a weighted_select with the
    rank's positions at their global noise index selects."""
    g = torch.Generator().manual_seed(5)
    w = torch.rand(4 * 8, generator=g) + 1e-3
    for rank in range(4):
        for mode in ("sample", "topk"):
            want = R.weighted_select(torch.cat([torch.zeros(rank * 8), w[rank * 8 : rank * 8 + 7]]), 3, mode, 9, 2)
            assert torch.equal(rank_selection(w, rank, 8, 7, 3, mode, 9, 2), want - rank * 8)


# ---------------------------------------------------------------- the prune score s + d is summed in float64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prune_score_overflow(backend, dtype):
    if dtype not in backend.state_dtypes:
        pytest.skip("state dtype not taken by this backend")
    n = 40
    st, _ = new_state(n, dtype=dtype, observed=1.0, seed=4)
    big = torch.finfo(dtype).max / 1.5  # s + d: 1.33 max, finite in float64 only for float32
    st[7] = torch.tensor([big, big], dtype=dtype)
    order, kept, scale = backend.eswp_prune(st, 0.5, 3, 0, 10, 0.125, True)
    r_order, r_kept, r_scale = R.eswp_prune(st, 0.5, 3, 0, 10, 0.125, True)
    assert torch.equal(order, r_order) and int(kept) == int(r_kept) and torch.equal(scale, r_scale)
    others = torch.ones(n, dtype=torch.bool)
    others[7] = False
    assert scale[7] == 1.0  # above the mean (float32) or not scored (float64 overflow): never pruned
    if dtype == torch.float32:  # scored: the mean is about big * 2 / n, every other sample is below it
        assert ((scale[others] == 0) | (scale[others] == 2.0)).all()
    else:  # left out of the mean: the others are split by their own mean
        score = (st[others, 0] + st[others, 1]).double()
        below = score < score.mean()
        assert ((scale[others] != 1) == below).all()


# ---------------------------------------------------------------- from hidden states: rows with nothing to score
def _hidden_case(kind):
    g = torch.Generator().manual_seed(6)
    H, V = 8, 11
    if kind == "all ignored":
        hidden, targets, shift = torch.randn(3, 4, H, generator=g), torch.full((3, 4), -100), False
        targets[1, 2] = 5  # one scored sequence among them
    elif kind == "shift T=1":
        hidden, targets, shift = torch.randn(3, 1, H, generator=g), torch.randint(0, V, (3, 1), generator=g), True
    elif kind == "T=0":
        hidden, targets, shift = torch.randn(3, 0, H, generator=g), torch.zeros(3, 0, dtype=torch.int64), False
    else:  # [B, H] rows, one ignored
        hidden, targets, shift = torch.randn(3, H, generator=g), torch.tensor([4, -100, 2]), False
    return hidden, torch.randn(V, H, generator=g), targets, shift


@pytest.mark.parametrize("kind", ["all ignored", "shift T=1", "T=0", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hidden_path_skips_rows_with_nothing_to_score(kind, dtype):
    hidden, weight, targets, shift = _hidden_case(kind)
    ids = torch.tensor([0, 2, 5])
    kw = dict(seed=3, shift_labels=shift)
    from_logits, from_hidden = ek.ESState(6, dtype=dtype), ek.ESState(6, dtype=dtype)
    ek.es_update(torch.tensor([2]), torch.tensor([1.5]), from_logits)  # one observed sample
    ek.es_update(torch.tensor([2]), torch.tensor([1.5]), from_hidden)
    want = ek.es_step(hidden @ weight.T, targets, ids, from_logits, 2, **kw)
    got = ek.es_step_from_hidden(hidden, weight, targets, ids, from_hidden, 2, **kw)
    torch.testing.assert_close(got.losses, want.losses)
    torch.testing.assert_close(got.weights, want.weights)
    torch.testing.assert_close(from_hidden.tensor, from_logits.tensor, equal_nan=True)
    assert torch.equal(from_hidden.errors, torch.zeros(2, dtype=torch.int64))
    skipped = want.weights == 0
    assert skipped.any() and (got.weights[skipped] == 0).all()
    assert torch.equal(from_hidden.s.isnan(), from_logits.s.isnan())
    assert from_hidden.s[2] == 1.5 or not skipped[1]  # an observed sample's skipped row leaves it alone


def test_sampler_select_hidden_skips_unscored_rows():
    hidden, weight, targets, _ = _hidden_case("all ignored")
    es = ek.EvolvedSampler(6, 2, seed=1)
    sel = es.select(torch.tensor([0, 2, 5]), hidden=hidden, weight=weight, targets=targets)
    assert sel.weights[0] == 0 and sel.weights[2] == 0 and sel.weights[1] > 0
    assert es.state.s.isnan().tolist() == [True, True, False, True, True, True]
    es.state.check()
