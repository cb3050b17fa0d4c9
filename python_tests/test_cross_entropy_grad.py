"""The gradient of per_sample_cross_entropy (docs/spec.md section 5.1) on
every backend, against F.cross_entropy's autograd gradient; and the fused
ES step, which is not differentiable, refusing inputs that require grad."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import es_kernels as ek
from es_kernels import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# both sides compute in float32 and round to the logits' dtype once; the
# Triton interpreter rounds float32 to bfloat16 toward zero (a GPU to nearest)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.bfloat16: dict(rtol=2**-6, atol=1e-6),
    torch.float16: dict(rtol=2**-9, atol=1e-7),
}
OPS = torch.ops.es_kernels


def make(shape, dtype, seed, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * scale).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_frac:
        targets[torch.rand(shape[:-1], generator=g) < ignore_frac] = ignore_index
    grad = torch.rand(shape[0], generator=g) * 2 - 0.5
    return logits, targets, grad


def torch_grad(grad, logits, targets, ignore_index=-100, label_smoothing=0.0):
    """F.cross_entropy's autograd gradient of sum(grad * per-sample loss), in
    float32 (the per-sample loss of a sequence: the mean over its scored tokens)."""
    x = logits.detach().float().requires_grad_()
    v = logits.shape[-1]
    tok = F.cross_entropy(
        x.reshape(-1, v),
        targets.reshape(-1).long(),
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    if logits.dim() == 3:
        tok = tok.reshape(targets.shape)
        count = (targets != ignore_index).sum(1)
        tok = torch.where(count > 0, tok.sum(1) / count.clamp(min=1), 0.0)
    (tok * grad).sum().backward()
    return x.grad


def check(got, logits, want):
    assert got.dtype == logits.dtype and got.shape == logits.shape
    torch.testing.assert_close(got.float(), want.to(logits.dtype).float(), **GRAD_TOL[logits.dtype])


SHAPES = [(1, 1), (7, 3), (33, 1000), (5, 4099), (3, 2048 * 2 + 17), (4, 32), (3, 5, 70), (2, 3, 2049), (2, 1, 16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch(backend, dtype, shape, smoothing):
    logits, targets, grad = make(shape, dtype, seed=sum(shape), ignore_frac=0.2)
    want = torch_grad(grad, logits, targets, label_smoothing=smoothing)
    check(backend.per_sample_cross_entropy_backward(grad, logits, targets, -100, smoothing), logits, want)
    check(R.per_sample_cross_entropy_backward(grad, logits, targets, -100, smoothing), logits, want)


@given(
    b=st.integers(1, 20),
    t=st.sampled_from([0, 1, 4]),
    c=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    ignore=st.sampled_from([-100, 0, 5]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_random(backend, b, t, c, dtype, smoothing, ignore, scale, seed):
    shape = (b, t, c) if t else (b, c)
    logits, targets, grad = make(shape, dtype, seed, scale, ignore_frac=0.3, ignore_index=ignore)
    want = torch_grad(grad, logits, targets, ignore, smoothing)
    check(backend.per_sample_cross_entropy_backward(grad, logits, targets, ignore, smoothing), logits, want)


def test_strided_inputs(backend):
    logits, targets, grad = make((6, 4, 50), torch.float32, 3, ignore_frac=0.3)
    want = torch_grad(grad, logits, targets)
    run = backend.per_sample_cross_entropy_backward
    wide = torch.randn(6, 4, 100)
    wide[..., ::2] = logits  # class stride 2
    got = run(grad, wide[..., ::2], targets.int(), -100, 0.0)
    check(got, logits, want)
    longer = torch.randn(6, 5, 50)
    longer[:, :-1] = logits  # a causal LM's logits[:, :-1]: batch stride, read in place
    check(run(grad, longer[:, :-1], targets, -100, 0.0), logits, want)
    check(run(grad, logits.transpose(0, 1).contiguous().transpose(0, 1), targets, -100, 0.0), logits, want)
    wide_t = torch.full((6, 8), -100)
    wide_t[:, ::2] = targets
    check(run(grad, logits, wide_t[:, ::2], -100, 0.0), logits, want)
    one = torch.tensor(0.7)  # the gradient of a mean: an expanded [B]
    check(run(one.expand(6), logits, targets, -100, 0.0), logits, torch_grad(one.expand(6), logits, targets))


def test_edge_values(backend):
    """Masked classes get 0; an ignored row 0 without reading it; a bad
    target, a NaN or +inf logit and a row of -inf only give NaN rows; a
    sequence with nothing scored gets zeros."""
    logits, targets, grad = make((7, 10), torch.float32, 1)
    logits[0, 3:] = float("-inf")
    targets[0] = 1
    targets[1] = -100
    logits[1] = float("nan")  # ignored: not read
    targets[2] = 10
    targets[3] = -7
    logits[4, 2] = float("nan")
    logits[5, 4] = float("inf")
    logits[6] = float("-inf")
    got = backend.per_sample_cross_entropy_backward(grad, logits, targets, -100, 0.0)
    want = torch_grad(grad[:1], logits[:1], targets[:1])
    assert torch.equal(got[0, 3:], torch.zeros(7)) and torch.allclose(got[0], want[0])
    assert torch.equal(got[1], torch.zeros(10))
    assert torch.isnan(got[2:]).all()
    torch.testing.assert_close(got, R.per_sample_cross_entropy_backward(grad, logits, targets), equal_nan=True)
    seq, seq_t, g = make((2, 3, 9), torch.bfloat16, 2)
    seq_t[0] = -100
    got = backend.per_sample_cross_entropy_backward(g, seq, seq_t, -100, 0.1)
    assert torch.equal(got[0], torch.zeros(3, 9, dtype=torch.bfloat16))
    check(got, seq, torch_grad(g, seq, seq_t, label_smoothing=0.1))


def test_empty(backend):
    for shape in [(0, 5), (0, 3, 5), (2, 0, 5)]:
        logits, targets = torch.empty(shape), torch.empty(shape[:-1], dtype=torch.long)
        got = backend.per_sample_cross_entropy_backward(torch.ones(shape[0]), logits, targets, -100, 0.0)
        assert got.shape == shape


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(grad=torch.ones(4)), "grad"),
        (dict(grad=torch.ones(3, 1)), "grad"),
        (dict(grad=torch.ones(3, dtype=torch.long)), "grad"),
        (dict(logits=torch.randn(3, 5).double()), "logits"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), "targets"),
        (dict(label_smoothing=1.5), "label_smoothing"),
    ],
)
def test_bad_input(backend, change, match):
    args = dict(grad=torch.ones(3), logits=torch.randn(3, 5), targets=torch.zeros(3, dtype=torch.long))
    args.update(ignore_index=-100, label_smoothing=0.0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        backend.per_sample_cross_entropy_backward(**args)


# ------------------------------------------------------------------ autograd through the op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 37), (3, 6, 33)])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_autograd_matches_torch(dtype, shape, smoothing):
    logits, targets, grad = make(shape, dtype, 11, ignore_frac=0.3)
    x = logits.clone().requires_grad_()
    loss = ek.per_sample_cross_entropy(x, targets, label_smoothing=smoothing)
    assert loss.requires_grad
    (loss * grad).sum().backward()
    check(x.grad, logits, torch_grad(grad, logits, targets, label_smoothing=smoothing))


def test_autograd_shift_labels():
    logits, labels, grad = make((3, 7, 40), torch.float32, 5, ignore_frac=0.2)
    x = logits.clone().requires_grad_()
    (ek.per_sample_cross_entropy(x, labels, shift_labels=True) * grad).sum().backward()
    y = logits.clone().requires_grad_()
    want = torch_grad(grad, y[:, :-1], labels[:, 1:])
    assert torch.equal(x.grad[:, -1], torch.zeros(3, 40))
    check(x.grad[:, :-1], logits[:, :-1], want)


@pytest.mark.parametrize("shape", [(4, 7), (3, 4, 5)])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_gradcheck(shape, smoothing):
    """Finite differences in float64 of the op on the float32 logits it takes
    (its arithmetic is float32: step and tolerances sized for that)."""
    logits, targets, _ = make(shape, torch.float32, 2, scale=1.0, ignore_frac=0.25)
    targets.view(-1)[0] = 1

    def fn(x):
        return OPS.per_sample_cross_entropy(x.float(), targets, -100, smoothing).double()

    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_opcheck():
    logits, targets, grad = make((5, 3, 17), torch.float32, 4, ignore_frac=0.2)
    for args in [
        (logits.clone().requires_grad_(), targets, -100, 0.1),
        (logits[:, 0].clone().requires_grad_(), targets[:, 0].clamp(min=3), 3, 0.0),  # no bad target: no NaN
        (logits.bfloat16().requires_grad_(), targets, -100, 0.0),
    ]:
        torch.library.opcheck(OPS.per_sample_cross_entropy, args)
    torch.library.opcheck(OPS.per_sample_cross_entropy_backward, (grad, logits, targets, -100, 0.1))
    torch.library.opcheck(
        OPS.per_sample_cross_entropy_backward, (grad, logits.half(), targets.clamp(min=0).int(), 2, 0.0)
    )


def test_training_pattern_same_parameter_grads():
    """The training pass of an ES loop: the scaled mean of the per-sample
    losses of the selected rows gives F.cross_entropy's parameter gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    x, y = torch.randn(64, 12), torch.randint(0, 10, (64,))
    es = ek.EvolvedSampler(64, 16, seed=3)
    with torch.no_grad():
        sel = es.select(torch.arange(64), logits=model(x), targets=y)
    pos = sel.positions
    grads = []
    for loss_fn in (ek.per_sample_cross_entropy, lambda z, t: F.cross_entropy(z, t, reduction="none")):
        model.zero_grad()
        loss = (loss_fn(model(x[pos]), y[pos]) * sel.scales).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the step is not differentiable
def _step_inputs(n=6, c=5):
    logits, targets, _ = make((n, c), torch.float32, 8)
    return logits.requires_grad_(), targets, torch.arange(n)


def test_es_step_refuses_logits_that_require_grad():
    logits, targets, ids = _step_inputs()
    state = ek.ESState(10)
    before = state.tensor.clone()
    calls = [
        lambda: ek.es_step(logits, targets, ids, state, 2),
        lambda: OPS.es_step(logits, targets, ids, state.tensor, state.errors, 2, 0.2, 0.5),
        lambda: ek.es_step(logits[None], targets[None], None, state, 1, segment_ids=ids[None]),
        lambda: ek.EvolvedSampler(10, 2).select(ids, logits=logits, targets=targets),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="logits requires grad.*torch.no_grad"):
            call()
    assert torch.equal(state.tensor.nan_to_num(-1), before.nan_to_num(-1))
    with torch.no_grad():
        ek.es_step(logits, targets, ids, state, 2)
    with torch.inference_mode():
        OPS.es_step(logits, targets, ids, state.tensor, state.errors, 2, 0.2, 0.5)
    ek.es_step(logits.detach(), targets, ids, state, 2)


def test_es_step_from_hidden_refuses_inputs_that_require_grad():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 3, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (4, 3), generator=g)
    state, ids = ek.ESState(10), torch.arange(4)
    for name, h, w in [
        ("hidden", hidden.requires_grad_(), weight),
        ("weight", hidden.detach(), weight.requires_grad_()),
    ]:
        with pytest.raises(ValueError, match=f"{name} requires grad"):
            ek.es_step_from_hidden(h, w, targets, ids, state, 2)
        with pytest.raises(ValueError, match=f"{name} requires grad"):
            ek.EvolvedSampler(10, 2).select(ids, hidden=h, weight=w, targets=targets)
        with torch.no_grad():
            ek.es_step_from_hidden(h, w, targets, ids, state, 2)
