"""Language-model scoring (es_kernels.lm and shift_labels): against
materialised logits and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_ops

import es_kernels as ek
from es_kernels import lm

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def explicit(logits, targets, ignore_index=-100, label_smoothing=0.0, shift=False):
    """Per-sample loss by F.cross_entropy on float32 logits (the spec's definition)."""
    if shift:
        logits, targets = logits[:, :-1], targets[:, 1:]
    x = logits.float()
    tok = F.cross_entropy(
        x.reshape(-1, x.shape[-1]),
        targets.reshape(-1).long(),
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    if logits.dim() == 2:
        return tok
    tok = tok.reshape(targets.shape)
    count = (targets != ignore_index).sum(1)
    return torch.where(count > 0, tok.sum(1) / count.clamp(min=1), 0.0)


def lm_batch(B, T, H, V, dtype=torch.float32, seed=0, bias=True, pad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype) if T else torch.randn(B, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, V, hidden.shape[:-1], generator=g)
    if pad and T:
        targets[0, T // 2 :] = -100  # right padding
        targets[-1, :] = -100  # a sequence with nothing to score
    return hidden, weight, b, targets


# ----------------------------------------------------------------- shift_labels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shift_labels_equals_explicit_shift(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 9, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (5, 9), generator=g)
    labels[1, 6:] = -100
    labels[2, 1:] = -100  # only the first label, which is never a target: loss 0
    for ls in (0.0, 0.1):
        want = explicit(logits, labels, label_smoothing=ls, shift=True)
        got = ek.per_sample_cross_entropy(logits, labels, label_smoothing=ls, shift_labels=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got[2] == 0
        # unshifted use is unchanged
        torch.testing.assert_close(
            ek.per_sample_cross_entropy(logits, labels, label_smoothing=ls),
            explicit(logits, labels, label_smoothing=ls),
            rtol=1e-5,
            atol=1e-5,
        )


def test_es_step_shift_labels_equals_views():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 7, 30, generator=g)
    labels = torch.randint(0, 30, (6, 7), generator=g)
    ids = torch.randperm(20, generator=g)[:6]
    a, c = ek.ESState(20), ek.ESState(20)
    r1 = ek.es_step(logits, labels, ids, a, 3, seed=4, step=1, shift_labels=True)
    r2 = ek.es_step(logits[:, :-1], labels[:, 1:], ids, c, 3, seed=4, step=1)
    assert torch.equal(r1.positions, r2.positions) and torch.equal(r1.losses, r2.losses)
    assert torch.equal(a.tensor.nan_to_num(9), c.tensor.nan_to_num(9))
    torch.testing.assert_close(r1.losses, explicit(logits, labels, shift=True), rtol=1e-5, atol=1e-5)


def test_shift_labels_needs_sequences():
    with pytest.raises(ValueError, match="shift_labels"):
        ek.per_sample_cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), shift_labels=True)
    with pytest.raises(ValueError, match="shift_labels"):
        ek.per_sample_cross_entropy(torch.randn(4, 3, 5), torch.zeros(4, 3, dtype=torch.long), shift_labels=1)


# ----------------------------------------------------------------- hidden states
@pytest.mark.parametrize("V,workspace", [(97, 4 * 40 * 7), (97, 64), (300, 4 * 40 * 130), (300, 2**20), (1, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_hidden_equals_materialised_3d(V, workspace, bias):
    """Chunks that do not divide V, one-column chunks, a single chunk, V = 1."""
    hidden, weight, b, targets = lm_batch(5, 8, 16, V, bias=bias, seed=V)
    logits = F.linear(hidden, weight, b)
    for ls in (0.0, 0.2):
        for shift in (False, True):
            want = explicit(logits, targets, label_smoothing=ls, shift=shift)
            got = ek.per_sample_losses_from_hidden(
                hidden, weight, targets, b, label_smoothing=ls, shift_labels=shift, workspace_bytes=workspace
            )
            assert got.dtype == torch.float32 and got.shape == (5,)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert got[-1] == 0  # no scored token


@pytest.mark.parametrize("bias", [False, True])
def test_hidden_equals_materialised_2d(bias):
    hidden, weight, b, targets = lm_batch(33, 0, 24, 211, bias=bias, seed=3)
    targets[3] = -100
    targets[4] = 7
    logits = F.linear(hidden, weight, b)
    for ws in (4 * 33 * 50, 2**20):
        for ls in (0.0, 0.3):
            got = ek.per_sample_losses_from_hidden(hidden, weight, targets, b, label_smoothing=ls, workspace_bytes=ws)
            torch.testing.assert_close(got, explicit(logits, targets, label_smoothing=ls), rtol=1e-5, atol=1e-5)
            assert got[3] == 0


def test_ignore_index_inside_vocab_and_bad_targets():
    hidden, weight, b, targets = lm_batch(4, 6, 8, 40, seed=5, pad=False)
    targets[0, :2] = 3  # ignore_index=3 is a valid class: checked first
    targets[1, 4] = 40  # outside [0, V): NaN
    targets[2, 0] = -1
    got = ek.per_sample_losses_from_hidden(hidden, weight, targets, b, ignore_index=3, workspace_bytes=4 * 24 * 7)
    want = ek.per_sample_cross_entropy(F.linear(hidden, weight, b), targets, ignore_index=3)
    assert torch.isnan(got[1]) and torch.isnan(got[2]) and torch.isnan(want[1])
    torch.testing.assert_close(got[[0, 3]], want[[0, 3]], rtol=1e-5, atol=1e-5)


def test_masked_vocabulary_by_bias():
    """-inf logits (a bias masking part of the vocabulary) stay finite, as in F.cross_entropy."""
    hidden, weight, b, targets = lm_batch(3, 4, 8, 50, seed=6, pad=False)
    b[:20] = float("-inf")
    targets = targets.clamp(min=20)
    got = ek.per_sample_losses_from_hidden(hidden, weight, targets, b, workspace_bytes=4 * 12 * 8)
    want = explicit(F.linear(hidden, weight, b), targets)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hidden_dtypes(dtype):
    """Matmul in the input dtype (the lm_head's logits), float32 after: compared
    to F.cross_entropy on the materialised logits of the same dtype."""
    hidden, weight, b, targets = lm_batch(4, 10, 32, 123, dtype=dtype, seed=7)
    logits = F.linear(hidden, weight, b)
    assert logits.dtype == dtype
    for shift in (False, True):
        got = ek.per_sample_losses_from_hidden(
            hidden, weight, targets, b, shift_labels=shift, label_smoothing=0.1, workspace_bytes=4 * 40 * 50
        )
        torch.testing.assert_close(got, explicit(logits, targets, label_smoothing=0.1, shift=shift), **TOL[dtype])


def test_no_grad_and_inference_mode():
    hidden, weight, b, targets = lm_batch(3, 5, 8, 29, seed=8)
    want = explicit(F.linear(hidden, weight, b), targets).detach()
    hidden.requires_grad_(True)
    got = ek.per_sample_losses_from_hidden(hidden, weight, targets, b)
    assert not got.requires_grad
    torch.testing.assert_close(got, want)
    with torch.inference_mode():
        torch.testing.assert_close(ek.per_sample_losses_from_hidden(hidden.detach(), weight, targets, b), want)


def test_empty():
    hidden, weight, _, _ = lm_batch(2, 3, 4, 9, seed=9)
    assert ek.per_sample_losses_from_hidden(hidden[:0], weight, torch.zeros(0, 3, dtype=torch.long)).shape == (0,)
    got = ek.per_sample_losses_from_hidden(hidden[:, :0], weight, torch.zeros(2, 0, dtype=torch.long))
    assert torch.equal(got, torch.zeros(2))
    got = ek.per_sample_losses_from_hidden(
        hidden[:, :1], weight, torch.zeros(2, 1, dtype=torch.long), shift_labels=True
    )
    assert torch.equal(got, torch.zeros(2))


def test_chunk_width_depends_on_shapes_only():
    assert lm.chunk_width(100, 1000, 4 * 100 * 1000) == 1000
    assert lm.chunk_width(100, 1000, 4 * 100 * 300) == 256  # aligned down to 128
    assert lm.chunk_width(100, 1000, 4 * 100 * 100) == 100
    assert lm.chunk_width(10**6, 1000, 1) == 1
    assert lm.chunk_width(0, 1000, 1) == 1


# ----------------------------------------------------------------- the step and the sampler
def test_es_step_from_hidden_equals_es_step():
    hidden, weight, b, targets = lm_batch(12, 9, 16, 101, seed=10)
    ids = torch.randperm(50, generator=torch.Generator().manual_seed(0))[:12]
    kw = dict(seed=3, step=5, label_smoothing=0.1, select_mode="sample", eps=0.1)
    a, c, d = ek.ESState(50), ek.ESState(50), ek.ESState(50)
    r_h = ek.es_step_from_hidden(
        hidden, weight, targets, ids, a, 4, bias=b, shift_labels=True, workspace_bytes=4 * 96 * 30, **kw
    )
    r_l = ek.es_step(F.linear(hidden, weight, b), targets, ids, c, 4, shift_labels=True, **kw)
    torch.testing.assert_close(r_h.losses, r_l.losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_h.weights, r_l.weights, rtol=1e-5, atol=1e-5)
    kw.pop("label_smoothing")
    scored = (targets[:, 1:] != -100).any(1, keepdim=True)  # the last sequence has nothing to score: skipped
    assert not scored[-1] and r_h.weights[-1] == 0 and torch.isnan(a.s[ids[-1]])
    # the same losses: the same positions, bit for bit
    r_f = ek.es_step_from_losses(r_h.losses.unsqueeze(1), ids, d, 4, mask=scored, **kw)
    assert torch.equal(r_h.positions, r_f.positions) and torch.equal(r_h.weights, r_f.weights)
    assert torch.equal(a.tensor.nan_to_num(9), d.tensor.nan_to_num(9))


def test_sampler_select_with_hidden():
    hidden, weight, b, labels = lm_batch(8, 6, 16, 77, seed=11)
    ids = torch.arange(8) * 3
    e1, e2 = ek.EvolvedSampler(30, 3, seed=2), ek.EvolvedSampler(30, 3, seed=2)
    s1 = e1.select(
        ids, hidden=hidden, weight=weight, bias=b, targets=labels, shift_labels=True, workspace_bytes=4 * 40 * 20
    )
    s2 = e2.select(ids, logits=F.linear(hidden, weight, b), targets=labels, shift_labels=True)
    torch.testing.assert_close(s1.losses, s2.losses, rtol=1e-5, atol=1e-5)
    assert s1.positions.shape == (3,) and e1.step == 1
    with pytest.raises(ValueError, match="either logits"):
        e1.select(ids, hidden=hidden, weight=weight, logits=hidden, targets=labels)
    with pytest.raises(ValueError, match="weight and targets"):
        e1.select(ids, hidden=hidden, targets=labels)
    with pytest.raises(ValueError, match="weight and bias go with hidden"):
        e1.select(ids, losses=torch.rand(8), weight=weight)


@pytest.mark.skipif(triton_ops is None, reason="the guard needs es_kernels._triton")
def test_hidden_path_makes_no_host_round_trip():
    from test_triton import no_host_sync

    hidden, weight, b, labels = lm_batch(6, 7, 16, 90, seed=12)
    es = ek.EvolvedSampler(40, 2, seed=1, eps=0.1)
    ids = torch.arange(6)
    with no_host_sync():
        ek.per_sample_losses_from_hidden(
            hidden, weight, labels, b, label_smoothing=0.1, shift_labels=True, workspace_bytes=4 * 42 * 9
        )
        ek.es_step_from_hidden(hidden, weight, labels, ids, es.state, 2, bias=b, workspace_bytes=100)
        es.select(ids, hidden=hidden, weight=weight, targets=labels, shift_labels=True)
        es.select(ids, logits=F.linear(hidden, weight), targets=labels, shift_labels=True)
    assert es.step == 2


# ----------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    hidden, weight, b, targets = lm_batch(2, 3, 4, 9, seed=13)
    f = ek.per_sample_losses_from_hidden
    cases = [
        (dict(hidden=hidden[0, 0]), "hidden must have 2 or 3"),
        (dict(hidden=hidden.double()), "hidden must have dtype"),
        (dict(hidden=hidden.long()), "hidden must have dtype"),
        (dict(weight=weight.bfloat16()), "weight must have the dtype"),
        (dict(weight=weight[:, :3]), r"weight must have shape \[V, 4\]"),
        (dict(weight=weight[:0]), "weight must have at least one row"),
        (dict(weight=weight[0]), "weight must have 2"),
        (dict(weight=weight.to("meta")), "weight must be on hidden.s device"),
        (dict(bias=b[:5]), r"bias must have shape \[9\]"),
        (dict(bias=b.half()), "bias must have the dtype"),
        (dict(bias=b[None]), "bias must have 1"),
        (dict(targets=targets.float()), "targets must have dtype"),
        (dict(targets=targets[:, :2]), r"targets must have shape \(2, 3\)"),
        (dict(workspace_bytes=0), "workspace_bytes"),
        (dict(workspace_bytes=2.0), "workspace_bytes"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(ignore_index=1.0), "ignore_index"),
        (dict(shift_labels=None), "shift_labels"),
        (dict(hidden=hidden[:, 0], targets=targets[:, 0], shift_labels=True), "shift_labels"),
    ]
    for change, msg in cases:
        args = dict(hidden=hidden, weight=weight, targets=targets, bias=b)
        args.update(change)
        with pytest.raises(ValueError, match=msg):
            f(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("bias"), **args)


def test_step_from_hidden_validates_before_writing():
    hidden, weight, b, targets = lm_batch(4, 3, 4, 9, seed=14)
    st = ek.ESState(10)
    before = st.tensor.clone()
    with pytest.raises(ValueError, match="ids must have the batch size"):
        ek.es_step_from_hidden(hidden, weight, targets, torch.arange(3), st, 2)
    with pytest.raises(ValueError, match="b must be"):
        ek.es_step_from_hidden(hidden, weight, targets, torch.arange(4), st, 5)
    with pytest.raises(ValueError, match="beta1"):
        ek.es_step_from_hidden(hidden, weight, targets, torch.arange(4), st, 2, beta1=2.0)
    with pytest.raises(ValueError, match="state must be"):
        ek.es_step_from_hidden(hidden, weight, targets, torch.arange(4), st.tensor, 2)
    assert torch.equal(st.tensor.nan_to_num(9), before.nan_to_num(9))
