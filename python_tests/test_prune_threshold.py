"""ESWP's threshold (docs/spec.md section 7) at every magnitude a state can
hold: float64 scores from the smallest subnormal to the float64 maximum,
float32 subnormals, zero scores, one scored sample, nothing scored. Every
backend (the reference, the C++ op, Triton interpreted, the sharded mode's
collective-free pieces) against the spec's text written here on Python ints
and fractions, and the threshold against the exact mean."""

import math
from fractions import Fraction

import pytest
import torch
from conftest import DEVICE
from hypothesis import example, given
from hypothesis import strategies as st

from es_kernels import reference as R
from es_kernels import sharded

try:
    import triton
    import triton.language as tl

    from es_kernels._triton import prune as TP
except ImportError:  # no Triton: its checks are skipped
    triton = None

if triton is not None:

    @triton.jit
    def _tau_kernel(acc_ptr, out_ptr):
        tl.store(out_ptr, TP._threshold(acc_ptr))


def triton_tau(state):
    """tau of the Triton launches on ``state`` (float32 or float64: the launcher
    takes float32 states only, the kernels any; the float64 path covers the
    exponents only a float64 state reaches)."""
    n = state.shape[0]
    st_dev = state.contiguous().to(DEVICE)
    acc = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    grid = (max(triton.cdiv(n, 1024), 1),)
    TP.prune_max_kernel[grid](st_dev, n, acc, BLOCK=1024)
    TP.prune_sum_kernel[grid](st_dev, n, acc, BLOCK=1024)
    out = torch.empty(1, dtype=torch.float64, device=DEVICE)
    _tau_kernel[(1,)](acc, out)
    return float(out)


DBL_MAX = 1.7976931348623157e308
TINY = 2.0**-1074  # the smallest float64 subnormal
R_DROP = 0.5  # below-mean samples get scale 0 or 2: "below" is scale != 1


def spec_tau(scores):
    """Section 7's tau from the spec's text, on Python floats, ints and fractions."""
    scored = [x for x in scores if math.isfinite(x)]
    if not scored:
        return math.nan
    a = max(abs(x) for x in scored)
    if a == 0.0:
        return 0.0
    e = math.frexp(a)[1]
    p = min(30 - e, 1074)
    q = [math.floor(float(Fraction(x) * Fraction(2) ** p)) for x in scored]  # f64 of the exact product, floored
    assert all(-(2**30) <= v < 2**30 for v in q)
    total = float(sum(q))
    if p >= 0:
        return float(Fraction(total) / 2**p / len(scored))  # the ldexp exact: one rounding
    return float(Fraction(total) / len(scored)) * 2.0**-p  # one rounding, then an exact scaling


def scores_of(state):
    return [float(x) for x in state[:, 0].double() + state[:, 1].double()]


def below_of(scale):
    """The below-mean samples of a plan made with prune_ratio R_DROP and rescale."""
    return (scale != 1).tolist()


def check_all(backend, state, expect_tau=None):
    """The plan of every backend equals the reference's; the reference's and the
    sharded mode's tau equal the spec's bit for bit; the plan's below-mean set is
    the spec's. Returns the spec's tau."""
    scores = scores_of(state)
    tau = spec_tau(scores)
    if expect_tau is not None:
        assert tau == expect_tau or (math.isnan(tau) and math.isnan(expect_tau))
    _, _, r_tau = R.prune_threshold(state)
    assert r_tau == tau or (math.isnan(tau) and math.isnan(r_tau)), (r_tau, tau)
    amax = float(sharded._score_max(state))
    s_tau = sharded._threshold(amax, sharded._fixed_point(state, amax).tolist())
    assert s_tau == tau or (math.isnan(tau) and math.isnan(s_tau)), (s_tau, tau)
    if backend.name == "triton" and state.shape[0] > 0:
        t_tau = triton_tau(state)
        assert t_tau == tau or (math.isnan(tau) and math.isnan(t_tau)), (t_tau, tau)
    below = [math.isfinite(x) and x < tau for x in scores]
    r_order, r_kept, r_scale = R.eswp_prune(state, R_DROP, 3, 0, 10, 0.125, True)
    assert below_of(r_scale) == below
    try:  # the Triton launcher prunes float64 states too (its other ops take float32 only)
        order, kept, scale = backend.eswp_prune(state, R_DROP, 3, 0, 10, 0.125, True)
    except ValueError:
        assert state.dtype not in backend.state_dtypes
    else:
        assert int(kept) == int(r_kept) and torch.equal(order, r_order) and torch.equal(scale, r_scale)
    return tau


def state_of(scores, dtype=torch.float64, d=None):
    st = torch.zeros(len(scores), 2, dtype=dtype)
    st[:, 0] = torch.tensor(scores, dtype=torch.float64).to(dtype)
    if d is not None:
        st[:, 1] = torch.tensor(d, dtype=torch.float64).to(dtype)
    return st


def assert_near_exact_mean(scores, tau):
    """tau <= the exact mean (floor), above it by less than 2**-p before its one
    rounding; equal scores leave none below."""
    scored = [Fraction(x) for x in scores if math.isfinite(x)]
    mean = sum(scored) / len(scored)
    e = math.frexp(float(max(abs(x) for x in scored)))[1]
    unit = Fraction(2) ** -min(30 - e, 1074)
    slack = abs(mean) * Fraction(2) ** -51 + Fraction(2) ** -1074  # the roundings of f64(sum) and the quotient
    assert mean - unit - slack <= Fraction(tau) <= mean + slack


# -- the magnitudes where 2**(30 - e) is no float64 -----------------------------------
@pytest.mark.parametrize(
    "unit",
    [2.0**-990, 2.0**-994, 2.0**-1000, 2.0**-1022, 2.0**-1040, 2.0**-1060, TINY],
    ids=lambda u: f"2**{math.frexp(u)[1] - 1}",
)
def test_tiny_scores(backend, unit):
    """float64 scores that are multiples of a tiny unit (normal to the
    smallest subnormal): the mean of 1..6 units is 3.5 units, so 1, 2, 3 are
    below it whatever the unit (the scale 2**(30 - e) overflows float64 when
    the largest |score| is below 2**-994)."""
    scores = [k * unit for k in (1, 2, 3, 4, 5, 6)] + [math.nan]
    tau = check_all(backend, state_of(scores))
    assert tau == 3.5 * unit  # the exact mean, rounded (to 4 units at the smallest subnormal)
    assert_near_exact_mean(scores, tau)
    neg = [-x for x in scores]
    tau = check_all(backend, state_of(neg))
    assert tau == -3.5 * unit
    expect = [False, False, False, unit != TINY, True, True]  # -3.5 units rounds to -4 at the smallest
    assert [x < tau for x in neg[:6]] == expect


def test_huge_scores(backend):
    """float64 scores near the maximum: their sum overflows, their mean does not."""
    big = 1.5e308
    for scores in ([big] * 4, [-big] * 4, [big, big, 1.0e308, big], [DBL_MAX, -DBL_MAX, DBL_MAX, 0.0]):
        tau = check_all(backend, state_of(scores))
        assert math.isfinite(tau)
        assert_near_exact_mean(scores, tau)
    assert check_all(backend, state_of([big] * 4)) <= big  # equal scores: none below
    # every fixed-point value at -2**30 at e = 1024: tau = -inf, nothing is below it
    tau = check_all(backend, state_of([-DBL_MAX, -DBL_MAX]))
    assert tau == -math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_scores_none_below(backend, dtype):
    """One scored sample, or many equal ones, positive or negative, with more
    than 30 significant bits in s + d: none is below its own mean (truncation
    toward zero would put a negative score below it)."""
    for s, d in [(1.0, -(2.0**-40)), (-1.0, -(2.0**-40)), (-3.0, 2.0**-45), (0.25, -0.75 - 2.0**-50)]:
        for n in (1, 5):
            st = state_of([s] * n, dtype, d=[d] * n)
            st_nan = torch.cat([st, state_of([math.nan], dtype)])
            for state in (st, st_nan):
                tau = check_all(backend, state)
                assert not any(x < tau for x in scores_of(state))


def test_zero_and_unscored(backend):
    for dtype in (torch.float32, torch.float64):
        assert check_all(backend, state_of([0.0, 0.0, math.nan], dtype), expect_tau=0.0) == 0.0
        assert check_all(backend, state_of([0.0, -0.0], dtype, d=[0.0, 0.0])) == 0.0
        assert math.isnan(check_all(backend, state_of([math.nan] * 3, dtype)))
        assert math.isnan(check_all(backend, state_of([], dtype)))
    # a float64 s + d that overflows is unscored: the others' mean
    tau = check_all(backend, state_of([DBL_MAX, 1.0, 3.0], d=[DBL_MAX, 0.0, 0.0]))
    assert tau == 2.0


def test_float32_subnormals(backend):
    """float32 states at the bottom of float32 (subnormal s and d)."""
    u = 2.0**-149
    scores = [k * u for k in (1, 2, 3, 4, 5, 6)]
    tau = check_all(backend, state_of(scores, torch.float32, d=[u, 0.0, -u, 0.0, u, -u]))
    assert_near_exact_mean(scores_of(state_of(scores, torch.float32, d=[u, 0.0, -u, 0.0, u, -u])), tau)


# -- any magnitudes ------------------------------------------------------------------
def _float64_score():
    """Scores from the smallest subnormal to the float64 maximum, either sign."""
    return st.one_of(
        st.floats(-DBL_MAX, DBL_MAX, allow_nan=False, allow_infinity=False),
        st.integers(-(2**40), 2**40).map(lambda k: k * TINY),
        st.tuples(st.integers(-1074, 1023), st.floats(-2, 2)).map(lambda t: math.ldexp(t[1], t[0])),
    )


def _scaled(x, exp):
    try:
        return math.ldexp(x, exp)
    except OverflowError:
        return x


@given(
    s=st.lists(st.one_of(_float64_score(), st.just(math.nan)), min_size=1, max_size=40),
    exp=st.integers(-1080, 1030),
    data=st.data(),
)
def test_float64_any_magnitude(backend, s, exp, data):
    """Random float64 states: s anywhere, d near s's scale or independent
    (s + d may overflow: unscored); plans and thresholds agree everywhere."""
    d = data.draw(st.lists(_float64_score(), min_size=len(s), max_size=len(s)))
    d = [_scaled(x, exp) for x in d]
    state = state_of(s, d=d)
    tau = check_all(backend, state)
    if any(math.isfinite(x) for x in scores_of(state)) and math.isfinite(tau):
        assert_near_exact_mean(scores_of(state), tau)


@given(
    s=st.lists(st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False), st.just(math.nan)), max_size=40),
    d=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=40, max_size=40),
)
@example(s=[2.0**30, 0.0], d=[0.0, -1.0] + [0.0] * 38)  # q = -0.5 floors to -1 (truncates to 0)
def test_float32_any_magnitude(backend, s, d):
    state = state_of(s, torch.float32, d=d[: len(s)])
    tau = check_all(backend, state)
    if any(math.isfinite(x) for x in scores_of(state)):
        assert_near_exact_mean(scores_of(state), tau)


@given(
    m=st.lists(st.one_of(st.floats(-2, 2), st.just(math.nan)), min_size=1, max_size=40),
    dm=st.lists(st.floats(-2, 2), min_size=40, max_size=40),
    exp=st.integers(-1110, 1024),
    dexp=st.integers(-60, 2),
)
def test_float64_scores_in_one_band(backend, m, dm, exp, dexp):
    """Every score within a few binades of one exponent, anywhere from the
    subnormals to the float64 maximum (the largest |score| decides p)."""
    s = [_scaled(x, exp) if math.isfinite(x) else x for x in m]
    d = [_scaled(x, exp + dexp) for x in dm[: len(m)]]
    d = [x if math.isfinite(x) and abs(x) <= DBL_MAX else 0.0 for x in d]
    s = [x if abs(x) <= DBL_MAX or math.isnan(x) else math.nan for x in s]
    state = state_of(s, d=d)
    tau = check_all(backend, state)
    if any(math.isfinite(x) for x in scores_of(state)) and math.isfinite(tau):
        assert_near_exact_mean(scores_of(state), tau)
