"""Per-sample cross-entropy at the edges (issues 8 and 11): masked (-inf)
logits, logits near the float32 / bfloat16 / float16 maxima, NaN / +inf rows,
and strided logits read without a copy.

The oracle is F.cross_entropy(reduction="none") in float32 on the same
(upcast) logits: every backend, and the reference, must give the same
finiteness class (finite / +inf / -inf / NaN) per row, and values within
tolerance where finite.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from es_kernels import reference as R

# The Triton interpreter (CPU) warns on inf - inf and log(0) inside masked lanes.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

INF, NAN = math.inf, math.nan
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FMAX = {dt: torch.finfo(dt).max for dt in DTYPES}
# class counts around the chunk sizes (C++: 2048, Triton on the CPU: 1024)
SIZES = [1, 2, 3, 17, 1000, 1025, 2049, 5000]
ROW_KINDS = [
    "normal",
    "masked",
    "masked_prefix",
    "target_masked",
    "huge",
    "huge_pos",
    "mixed",
    "all_masked",
    "nan",
    "posinf",
]


def finiteness(v: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 +inf, -1 -inf, 2 NaN."""
    cls = torch.zeros(v.shape, dtype=torch.int64)
    cls[torch.isposinf(v)] = 1
    cls[torch.isneginf(v)] = -1
    cls[torch.isnan(v)] = 2
    return cls


def assert_like_torch(got, want, rtol=1e-4, atol=5e-5, what=""):
    assert got.dtype == torch.float32 and got.shape == want.shape, what
    g, w = finiteness(got), finiteness(want)
    assert torch.equal(g, w), f"{what}: finiteness {g.tolist()} != torch {w.tolist()}\n{got}\n{want}"
    fin = w == 0
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=atol, msg=what)


def torch_tokens(logits, targets, ignore_index, smoothing):
    v = logits.shape[-1]
    return F.cross_entropy(
        logits.float().reshape(-1, v),
        targets.reshape(-1),
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=smoothing,
    ).reshape(targets.shape)


def fill_row(x, kind, target, dtype, g):
    """Overwrite the float32 row ``x`` (in place) with logits of ``kind``."""
    c = x.shape[0]
    big = FMAX[dtype]
    u = lambda lo, hi: torch.empty(c).uniform_(lo, hi, generator=g)  # noqa: E731
    if kind == "masked":  # a random share of masked classes, the target among them or not
        frac = [0.1, 0.5, 0.99][int(torch.randint(3, (1,), generator=g))]
        x[torch.rand(c, generator=g) < frac] = -INF
    elif kind == "masked_prefix":  # whole chunks masked, then finite logits
        k = [1, 1024, 2048, c - 1][int(torch.randint(4, (1,), generator=g))]
        x[: min(k, c - 1)] = -INF
    elif kind == "target_masked":
        x[target] = -INF
    elif kind == "huge":  # near the dtype's maximum, both signs
        x.copy_(u(0.5, 1.0) * big * torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0))
    elif kind == "huge_pos":
        x.copy_(u(0.5, 1.0) * big)
    elif kind == "mixed":  # ordinary logits and a few at +-max
        for _ in range(3):
            x[int(torch.randint(c, (1,), generator=g))] = big if torch.rand(1, generator=g) < 0.5 else -big
    elif kind == "all_masked":
        x.fill_(-INF)
    elif kind == "nan":
        x[int(torch.randint(c, (1,), generator=g))] = NAN
    elif kind == "posinf":
        x[int(torch.randint(c, (1,), generator=g))] = INF


def make_case(shape, dtype, kinds, seed, ignore_index, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = torch.randn(shape, generator=g) * 3.0
    targets = torch.randint(0, c, shape[:-1], generator=g)
    rows, trows = x.view(-1, c), targets.view(-1)
    for r in range(rows.shape[0]):
        fill_row(rows[r], kinds[r % len(kinds)], int(trows[r]), dtype, g)
    targets[torch.rand(shape[:-1], generator=g) < ignore_frac] = ignore_index
    return x.to(dtype), targets


# ------------------------------------------------------------- fixed cases
CASES = [  # (logits, target); torch's answers for eps = 0, 0.1, 1.0 checked below
    ([[0.0, 1.0, -INF]], 1),  # masked class:           0.3133 | inf | inf
    ([[0.0, 1.0, -INF]], 2),  # masked target:          inf    | inf | nan (0 * inf)
    ([[3e38, 3e38]], 0),  # near the float32 max:   0.6931 (all three)
    ([[3.4e38, -3.4e38]], 0),  # max - (-max) overflows: 0      | inf | inf
    ([[3.4e38, -3.4e38]], 1),  #                         inf    | inf | nan
    ([[2e38, -1e38, -1e38]], 0),  # smoothing sum overflows: 0     | inf | inf
    ([[-INF, -INF]], 0),  # all masked:             nan
    ([[INF, 0.0]], 0),  # +inf:                   nan
    ([[NAN, 0.0]], 1),  # NaN:                    nan
    ([[-INF]], 0),  # C = 1, masked:          nan
    ([[5.0]], 0),  # C = 1:                  0
]


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("logits,target", CASES)
def test_extreme_rows_like_torch(backend, logits, target, smoothing):
    x, t = torch.tensor(logits), torch.tensor([target])
    want = F.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)
    assert_like_torch(backend.per_sample_cross_entropy(x, t, -100, smoothing), want, what=backend.name)
    assert_like_torch(R.per_sample_cross_entropy(x, t, -100, smoothing), want, what="reference")


def test_issue_8_examples(backend):
    got = backend.per_sample_cross_entropy(torch.tensor([[0.0, 1.0, -INF]]), torch.tensor([1]), -100, 0.0)
    assert got.item() == pytest.approx(0.31326, abs=1e-5)
    got = backend.per_sample_cross_entropy(torch.tensor([[3e38, 3e38]]), torch.tensor([0]), -100, 0.0)
    assert got.item() == pytest.approx(math.log(2), abs=1e-6)
    got = backend.per_sample_cross_entropy(torch.tensor([[3e38, 3e38]]), torch.tensor([0]), -100, 0.1)
    assert got.item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ignored_row_is_not_needed(backend, dtype):
    x = torch.tensor([[NAN, 0.0, 1.0], [INF, INF, -INF], [-INF, -INF, -INF], [0.0, 1.0, 2.0]]).to(dtype)
    t = torch.tensor([-100, -100, -100, 2])
    for eps in (0.0, 0.3):
        got = backend.per_sample_cross_entropy(x, t, -100, eps)
        assert torch.equal(got[:3], torch.zeros(3))
        assert_like_torch(got, F.cross_entropy(x.float(), t, reduction="none", label_smoothing=eps))


def test_out_of_range_target_still_nan(backend):
    x = torch.tensor([[0.0, 1.0, -INF], [3e38, 3e38, 0.0]])
    for eps in (0.0, 0.1):
        got = backend.per_sample_cross_entropy(x, torch.tensor([3, -1]), -100, eps)
        assert torch.isnan(got).all()


# ------------------------------------------------------------- properties
@st.composite
def cases_2d(draw):
    c = draw(st.sampled_from(SIZES))
    b = draw(st.integers(1, 4 if c > 1000 else 8))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=b, max_size=b))
    return dict(
        shape=(b, c),
        dtype=draw(st.sampled_from(DTYPES)),
        kinds=kinds,
        seed=draw(st.integers(0, 2**16)),
        ignore_index=draw(st.sampled_from([-100, 0])),
        smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),  # and 0.0 for every case
        layout=draw(st.sampled_from(["contiguous", "row_padded", "class_strided"])),
    )


def lay_out_2d(x, layout):
    """The same values in another memory layout."""
    if layout == "row_padded":  # row stride > C: a slice of a wider buffer
        wide = torch.full((x.shape[0], x.shape[1] + 5), 7.0, dtype=x.dtype)
        wide[:, 2 : 2 + x.shape[1]] = x
        return wide[:, 2 : 2 + x.shape[1]]
    if layout == "class_strided":  # column-major: copied by the op
        return x.t().contiguous().t()
    return x


@settings(max_examples=40)
@given(case=cases_2d())
def test_2d_like_torch(backend, case):
    x, t = make_case(case["shape"], case["dtype"], case["kinds"], case["seed"], case["ignore_index"])
    ign = case["ignore_index"]
    for eps in sorted({0.0, case["smoothing"]}):
        want = torch_tokens(x, t, ign, eps)
        got = backend.per_sample_cross_entropy(lay_out_2d(x, case["layout"]), t, ign, eps)
        assert_like_torch(got, want, what=f"{backend.name} eps={eps} {case}")
        assert_like_torch(R.per_sample_cross_entropy(x, t, ign, eps), want, what=f"reference eps={eps} {case}")


@st.composite
def cases_3d(draw):
    v = draw(st.sampled_from(SIZES))
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 3 if v > 1000 else 6))
    kinds = draw(st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=4))
    return dict(
        shape=(b, t + 1, v),
        dtype=draw(st.sampled_from(DTYPES)),
        kinds=kinds,
        seed=draw(st.integers(0, 2**16)),
        ignore_index=draw(st.sampled_from([-100, 0])),
        smoothing=draw(st.sampled_from([0.0, 0.1])),  # and 0.0 for every case
        layout=draw(st.sampled_from(["shifted", "contiguous", "seq_major"])),
    )


@settings(max_examples=25)
@given(case=cases_3d())
def test_3d_sequence_mean_like_torch(backend, case):
    full, full_t = make_case(
        case["shape"], case["dtype"], case["kinds"], case["seed"], case["ignore_index"], ignore_frac=0.3
    )
    ign = case["ignore_index"]
    if case["layout"] == "shifted":  # next-token view: no copy of the logits
        x, t = full[:, :-1], full_t[:, 1:]
    elif case["layout"] == "seq_major":  # stored [T, B, V]
        x, t = full.transpose(0, 1).contiguous().transpose(0, 1), full_t
    else:
        x, t = full, full_t
    count = (t != ign).sum(1)
    for eps in sorted({0.0, case["smoothing"]}):
        tok = torch_tokens(x, t, ign, eps)
        want = torch.where(count > 0, tok.sum(1) / count.clamp(min=1), 0.0)
        got = backend.per_sample_cross_entropy(x, t, ign, eps)
        assert_like_torch(got, want, what=f"{backend.name} eps={eps} {case}")
        assert_like_torch(R.per_sample_cross_entropy(x, t, ign, eps), want, what=f"reference eps={eps} {case}")


# ------------------------------------------------------------- strides, no copies
def strided_views(dtype=torch.float32):
    """Views with unit class stride and other strides of their own."""
    g = torch.Generator().manual_seed(5)
    seq = torch.randn(3, 7, 1100, generator=g)
    seq[0, :, :600] = -INF  # masked classes survive the strides too
    seq = seq.to(dtype)
    seq_t = torch.randint(0, 1100, (3, 7), generator=g)
    seq_t[1, 2] = -100
    wide = torch.randn(6, 40, generator=g).to(dtype)
    tbv = torch.randn(7, 3, 50, generator=g).to(dtype)  # [T, B, V] storage
    return [
        ("next-token [B, T-1, V]", seq[:, :-1], seq_t[:, 1:]),
        ("row slice [B, C]", wide[:, 3:33], torch.randint(0, 30, (6,), generator=g)),
        ("every other row", wide[::2], torch.randint(0, 40, (3,), generator=g)),
        ("[B, T, V] over [T, B, V] storage", tbv.transpose(0, 1), torch.randint(0, 50, (3, 7), generator=g)),
        ("a window of the sequences", seq[1:3, 2:5], seq_t[1:3, 2:5]),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_strided_equals_contiguous(backend, dtype, smoothing):
    for name, x, t in strided_views(dtype):
        assert x.dtype == dtype and x.stride(-1) == 1 and not x.is_contiguous(), name
        got = backend.per_sample_cross_entropy(x, t, -100, smoothing)
        want = backend.per_sample_cross_entropy(x.contiguous(), t.contiguous(), -100, smoothing)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)
        assert_like_torch(got, R.per_sample_cross_entropy(x.contiguous(), t, -100, smoothing), what=name)


def logits_copies(fn, logits):
    """The copy / clone ops the profiler records on a tensor of the logits' shape."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [
        (e.name, e.input_shapes)
        for e in prof.events()
        if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")
        and list(logits.shape) in [list(s) for s in e.input_shapes]
    ]


def test_cpp_reads_strided_logits_without_copy():
    import es_kernels  # noqa: F401  (loads the C++ ops)

    op = torch.ops.es_kernels
    for name, x, t in strided_views():
        assert logits_copies(lambda: op.per_sample_cross_entropy(x, t, -100, 0.1), x) == [], name
    # the check can fail: a class stride other than 1 is copied, and seen
    x = torch.randn(4, 50, 6).transpose(1, 2)
    assert (
        logits_copies(lambda: op.per_sample_cross_entropy(x, torch.zeros(4, 6, dtype=torch.long), -100, 0.0), x) != []
    )


def test_triton_launch_gets_the_callers_logits(monkeypatch):
    ops = pytest.importorskip("es_kernels._triton.ops")
    ce = pytest.importorskip("es_kernels._triton.cross_entropy")
    seen = []
    real = ce.launch

    def spy(kernel, grid, device, *args, **meta):
        if kernel is ce.ce_kernel:
            seen.append(args[0])
        return real(kernel, grid, device, *args, **meta)

    monkeypatch.setattr(ce, "launch", spy)
    for name, x, t in strided_views():
        seen.clear()
        ops.per_sample_cross_entropy(x, t, -100, 0.0)
        assert len(seen) == 1 and seen[0].data_ptr() == x.data_ptr() and seen[0].stride() == x.stride(), name
    x = torch.randn(4, 50, 6).transpose(1, 2)  # class stride 6: the one layout that is copied
    seen.clear()
    ops.per_sample_cross_entropy(x, torch.zeros(4, 6, dtype=torch.long), -100, 0.0)
    assert seen[0].data_ptr() != x.data_ptr() and seen[0].stride(-1) == 1
