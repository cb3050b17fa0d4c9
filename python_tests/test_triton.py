"""The Triton path: the same positions as the C++ path, no host round-trip,
and the CUDA registration. Runs under TRITON_INTERPRET=1 on CPU tensors."""

import contextlib

import pytest
import torch
from conftest import BACKENDS, DEVICE, aot_harness, clone_all, new_state, triton_ops

pytestmark = pytest.mark.skipif(triton_ops is None, reason="Triton is not installed")
CPP = torch.ops.es_kernels
T = BACKENDS["triton"]() if triton_ops is not None else None  # CPU tensors in, CPU tensors out


@pytest.mark.parametrize("seed,step", [(0, 0), (7, 123), (2**40 + 3, 2**33 + 5)])
@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_same_positions_as_cpp(seed, step, mode):
    g = torch.Generator().manual_seed(seed % 1000)
    n, batch, b = 500, 300, 77
    ids = torch.randperm(n, generator=g)[:batch]
    losses = torch.rand(batch, generator=g) * 4
    state = new_state(n, seed=3)
    a, c = clone_all(state), clone_all(state)
    pos_t, _, w_t = T.es_step_from_losses(losses, ids, *a, b, 0.3, 0.8, mode, seed, step)
    pos_c, _, w_c = CPP.es_step_from_losses(losses, ids, *c, b, 0.3, 0.8, mode, seed, step)
    assert torch.equal(pos_t, pos_c) and torch.equal(w_t, w_c)
    assert torch.equal(T.weighted_select(w_t, b, mode, seed, step), CPP.weighted_select(w_c, b, mode, seed, step))


def test_step_from_logits_close_to_cpp():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 3, 37, generator=g).bfloat16()
    targets = torch.randint(0, 37, (40, 3), generator=g)
    targets[0] = -100
    ids = torch.randperm(90, generator=g)[:40]
    state = new_state(90, seed=1)
    a, c = clone_all(state), clone_all(state)
    kw = dict(ignore_index=-100, label_smoothing=0.1)
    pos_t, l_t, w_t = T.es_step(logits, targets, ids, *a, 10, 0.2, 0.9, "sample", 1, 2, **kw)
    pos_c, l_c, w_c = CPP.es_step(logits, targets, ids, *c, 10, 0.2, 0.9, "sample", 1, 2, **kw)
    torch.testing.assert_close(l_t, l_c, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(w_t, w_c, rtol=2e-5, atol=2e-5)
    assert len(set(pos_t.tolist()) ^ set(pos_c.tolist())) <= 2  # equal up to a near-tie the rounding may flip


def test_prune_same_as_cpp():
    st, _ = new_state(5000, observed=0.7, seed=9)
    for epoch in (0, 3, 9):
        t = T.eswp_prune(st, 0.4, 11, epoch, 10, 0.125, True)
        c = CPP.eswp_prune(st, 0.4, 11, epoch, 10, 0.125, True)
        assert torch.equal(t[0], c[0]) and int(t[1]) == int(c[1]) and torch.equal(t[2], c[2])


def test_float64_state_is_refused_by_name():
    st, e = new_state(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="state must be float32"):
        T.es_update(torch.arange(3), torch.rand(3), st, e, 0.2, 0.9)


@contextlib.contextmanager
def no_host_sync():
    """Fail on anything that reads a device value into Python outside a kernel
    launch (the Triton interpreter itself runs kernels through the host)."""
    from es_kernels._triton._launch import in_kernel

    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_sync = torch.cuda.synchronize

    def guard(name, orig):
        def wrapper(self, *args, **kwargs):
            if not in_kernel():
                raise AssertionError(f"host round-trip: Tensor.{name} called by the op path")
            return orig(self, *args, **kwargs)

        return wrapper

    def sync(*args, **kwargs):
        raise AssertionError("host round-trip: torch.cuda.synchronize called by the op path")

    try:
        for n, f in saved.items():
            setattr(torch.Tensor, n, guard(n, f))
        torch.cuda.synchronize = sync
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.cuda.synchronize = saved_sync


def test_the_guard_catches_a_sync():
    x = torch.ones(3)
    with no_host_sync(), pytest.raises(AssertionError, match="item"):
        x.sum().item()
    with no_host_sync(), pytest.raises(AssertionError, match="__bool__"):
        if x.sum() > 0:
            pass


def test_op_paths_make_no_host_round_trip():
    g = torch.Generator().manual_seed(0)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    logits, targets = dev(torch.randn(16, 9, generator=g)), dev(torch.randint(0, 9, (16,), generator=g))
    seq_logits = dev(torch.randn(4, 3, 9, generator=g))
    seq_targets = dev(torch.randint(0, 9, (4, 3), generator=g))
    ids = dev(torch.randperm(40, generator=g)[:16])
    st, e = (dev(x) for x in new_state(40, seed=2))
    losses, weights = dev(torch.rand(16)), dev(torch.rand(16))
    seed_t, step_t = dev(torch.tensor(5)), dev(torch.tensor(9))
    with no_host_sync():
        triton_ops.per_sample_cross_entropy(logits, targets, -100, 0.0)
        triton_ops.per_sample_cross_entropy(seq_logits, seq_targets, -100, 0.0)
        triton_ops.es_update(ids, losses, st, e, 0.2, 0.9, 1.5, 1e-8)
        triton_ops.weighted_select(weights, 4, "sample", 0, 1)
        triton_ops.weighted_select(weights, 4, "sample", 0, 0, seed_t, step_t, 0.3)
        triton_ops.es_step_from_losses(losses, ids, st, e, 4, 0.2, 0.9, "sample", 0, 1)
        triton_ops.es_step_from_losses(
            losses, ids, st, e, 4, 0.2, 0.9, "sample", 0, 0, seed_t, step_t, True, 1.0, 0.2, 1e-8
        )
        triton_ops.es_step(logits, targets, ids, st, e, 4, 0.2, 0.9, "topk", 0, 1)
        triton_ops.es_step(seq_logits, seq_targets, ids[:4], st, e, 2, 0.2, 0.9, "sample", 0, 0, None, step_t, True)
        triton_ops.eswp_prune(st, 0.5, 0, 1, 10, 0.125, True)
    assert int(step_t) == 11


def test_sampler_path_makes_no_host_round_trip():
    """The device-step path a training loop runs: EvolvedSampler.select."""
    es = __import__("es_kernels").EvolvedSampler(64, 4, seed=1, device=DEVICE, eps=0.1)
    ids = torch.randperm(64)[:16].to(DEVICE)
    with no_host_sync():
        for _ in range(3):
            es.select(ids, losses=torch.rand(16, device=DEVICE))
    assert es.step == 3


def test_registered_for_cuda():
    for name in triton_ops.OPS:
        op = getattr(torch.ops.es_kernels, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name


@pytest.mark.parametrize("B", [1025, 3000])
@pytest.mark.parametrize("mode,eps", [("topk", 0.0), ("sample", 0.0), ("sample", 0.3)])
def test_many_programs_same_as_cpp(B, mode, eps):
    """Selections across several programs (1024 positions each): the radix
    histograms, the per-block counts and the ordered write agree with C++,
    ties across blocks included (quantised weights give many equal keys)."""
    g = torch.Generator().manual_seed(B)
    w = (torch.rand(B, generator=g) * 8).floor() + 1.0  # 8 distinct values: ties everywhere for topk
    for b in (1, B // 3, B - 1):
        got = T.weighted_select(w, b, mode, 5, 9, eps=eps)
        want = CPP.weighted_select(w, b, mode, 5, 9, eps=eps)
        assert torch.equal(got, want), (b, mode)
    n = B + 100
    ids = torch.randperm(n, generator=g)[:B]
    losses = torch.rand(B, generator=g) * 3
    a, c = new_state(n, seed=4), new_state(n, seed=4)
    step_a, step_c = torch.tensor(3), torch.tensor(3)
    ra = T.es_step_from_losses(losses, ids, *a, B // 4, 0.2, 0.5, mode, 1, 0, None, step_a, True, eps=eps)
    rc = CPP.es_step_from_losses(losses, ids, *c, B // 4, 0.2, 0.5, mode, 1, 0, None, step_c, True, eps=eps)
    assert all(torch.equal(x, y) for x, y in zip(ra, rc))
    assert torch.equal(a[0].nan_to_num(-1), c[0].nan_to_num(-1)) and torch.equal(a[1], c[1])
    assert int(step_a) == int(step_c) == 4


@pytest.mark.parametrize(
    "logits_shape,eps,launches",
    [((5, 40), 0.0, 6), ((5, 40), 0.1, 8), ((5, 3, 40), 0.0, 7)],
)
def test_es_step_launches(logits_shape, eps, launches):
    """es_step from [B, C] logits: the cross-entropy kernel runs the update,
    the weight, the key and the first histogram in its epilogue, so the
    losses take no launch of their own (6 launches; 7 before issue 13's
    fusion; the exploration mix adds two); [B, T, V] keeps a launch for the
    per-sequence means."""
    aot = aot_harness()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(logits_shape, generator=g)
    targets = torch.randint(0, logits_shape[-1], logits_shape[:-1], generator=g)
    state, errors = new_state(8, seed=1)
    calls = []
    with aot.recording(calls):
        triton_ops.es_step(logits, targets, torch.arange(5), state, errors, 2, 0.2, 0.9, "sample", eps=eps)
    names = [c.name for c in calls]
    assert len(names) == launches and names[0] == "ce_kernel", names
    assert ("observe_kernel" in names) == (len(logits_shape) == 3), names
