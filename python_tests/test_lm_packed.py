"""Packed rows (segment_ids, docs/spec.md section 6.1) against the reference's
plain per-document loop: random packings (hypothesis), documents split over
rows, padding, empty rows, every dtype, the logits / hidden / token-loss paths."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_state_equal, triton_ops
from hypothesis import given
from hypothesis import strategies as st

import es_kernels as ek
from es_kernels import _packed, functional, lm
from es_kernels import reference as R
from es_kernels._spec import DEFAULT_LAM

LOSS_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOGIT_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),  # the reference reads the same rounded logits
    torch.float16: dict(rtol=1e-5, atol=1e-5),
}


@st.composite
def packings(draw, max_b=4, max_t=9):
    """(segment_ids int64 [B, T], N): rows of contiguous runs of document ids,
    negative = padding; a document may recur in other rows (split) or later
    in the same row; N sometimes leaves the largest ids out of range."""
    B, T = draw(st.integers(0, max_b)), draw(st.integers(0, max_t))
    docs = draw(st.integers(1, 6))
    rows = []
    for _ in range(B):
        row = []
        while len(row) < T:
            row += [draw(st.integers(-2, docs - 1))] * draw(st.integers(1, max(1, T)))
        rows.append(row[:T])
    n = draw(st.integers(max(0, docs - 2), docs + 1))
    return torch.tensor(rows, dtype=torch.int64).reshape(B, T), n


def token_losses(shape, dtype, seed, nonfinite=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 5
    if nonfinite and x.numel():
        x.view(-1)[torch.randint(0, x.numel(), (1,), generator=g)] = float("nan")
    return x.to(dtype)


def observed_state(n, seed):
    st_ = ek.ESState(n)
    g = torch.Generator().manual_seed(seed)
    seen = torch.rand(n, generator=g) < 0.5
    st_.tensor[seen, 0] = torch.rand(int(seen.sum()), generator=g) * 4
    st_.tensor[seen, 1] = torch.randn(int(seen.sum()), generator=g) * 0.3
    return st_


def assert_documents(got: lm.DocumentLosses, tok, scored, doc):
    ids, losses, counts = R.per_document_losses(tok, scored, doc)
    d = ids.shape[0]
    assert got.ids.shape == got.losses.shape == got.counts.shape == (doc.numel(),)
    assert torch.equal(got.ids[:d], ids) and bool((got.ids[d:] == -1).all())
    assert torch.equal(got.counts[:d], counts) and bool((got.counts[d:] == 0).all())
    torch.testing.assert_close(got.losses[:d], losses, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert bool((got.losses[d:] == 0).all())


def run_reference(tok, scored, doc, state, b, **kw):
    s, e = state.tensor.clone(), state.errors.clone()
    pos, losses, weights, _ = R.packed_step(
        tok,
        scored,
        doc,
        s,
        e,
        b,
        kw.get("beta1", 0.2),
        kw.get("beta2", 0.5),
        kw.get("select_mode", "sample"),
        kw.get("seed", 0),
        kw.get("step", 0),
        lam=kw.get("lam", DEFAULT_LAM),  # the API's default (the reference's own is the ops' 1.0)
        eps=kw.get("eps", 0.0),
    )
    return pos, losses, weights, (s, e)


def assert_step(res, ref, state):
    pos, losses, weights, ref_state = ref
    torch.testing.assert_close(res.weights, weights, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(res.losses, losses, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(res.positions, pos)
    assert_state_equal((state.tensor, state.errors), ref_state)


# ------------------------------------------------------------------ token losses
@pytest.mark.parametrize("dtype", LOSS_DTYPES)
@given(p=packings(), seed=st.integers(0, 2**16), masked=st.booleans(), bad=st.booleans())
def test_token_losses_against_document_loop(dtype, p, seed, masked, bad):
    seg, n = p
    tok = token_losses(seg.shape, dtype, seed, nonfinite=bad)
    g = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(seg.shape, generator=g) < 0.8) if masked else None
    scored = (seg >= 0) if mask is None else (seg >= 0) & mask
    assert_documents(lm.per_document_losses(tok, seg, mask), tok, scored, seg)
    state = observed_state(n, seed)
    b = seed % (seg.shape[0] + 1)
    kw = dict(select_mode=("sample", "topk")[seed % 2], seed=seed, step=3)
    ref = run_reference(tok, scored, seg, state, b, **kw)
    res = ek.es_step_from_losses(tok, None, state, b, mask=mask, segment_ids=seg.int() if seed % 3 else seg, **kw)
    assert_step(res, ref, state)


def test_document_split_over_rows_is_one_observation():
    seg = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 2, 2, -1], [-1, -1, -1, -1, -1]])
    tok = torch.tensor([[1.0, 3, 2, 2, 2], [5, 5, 7, 9, 100], [100, 100, 100, 100, 100]])
    docs = lm.per_document_losses(tok, seg)
    assert docs.ids[:3].tolist() == [0, 1, 2] and docs.counts[:3].tolist() == [2, 5, 2]
    assert docs.losses[:3].tolist() == pytest.approx([2.0, 16 / 5, 8.0])
    state = ek.ESState(3)
    res = ek.es_step_from_losses(tok, None, state, 3, segment_ids=seg, select_mode="topk")
    # first observations: s = the document's loss, d = 0; w = s
    assert state.s.tolist() == pytest.approx([2.0, 3.2, 8.0]) and state.d.tolist() == [0, 0, 0]
    # row weights: token-weighted means of the documents' weights; the padding row is not scored
    assert res.weights.tolist() == pytest.approx([(2 * 2 + 3 * 3.2) / 5, (2 * 3.2 + 2 * 8) / 4, 0.0])
    assert res.losses.tolist() == pytest.approx([2.0, 6.5, 0.0])
    assert res.positions.tolist() == [0, 1, 2]  # the unscored row comes last (weight 0)
    assert int(state.errors.sum()) == 0


def test_out_of_range_document_counted_once_and_empty_inputs():
    seg = torch.tensor([[4, 4, 0], [4, 4, 4]])
    state = ek.ESState(2)
    ek.es_step_from_losses(torch.ones(2, 3), None, state, 1, segment_ids=seg)
    assert state.errors.tolist() == [1, 0]  # document 4 is one observation, out of range
    for shape in ((0, 5), (3, 0)):
        s = ek.ESState(2)
        res = ek.es_step_from_losses(torch.ones(shape), None, s, 0, segment_ids=torch.zeros(shape, dtype=torch.int64))
        assert res.weights.shape == res.losses.shape == (shape[0],) and res.positions.numel() == 0
        assert bool(s.s.isnan().all()) and s.errors.tolist() == [0, 0]
        assert lm.per_document_losses(torch.ones(shape), torch.zeros(shape, dtype=torch.int64)).ids.numel() == 0


# ------------------------------------------------------------------ logits and hidden states
def logits_batch(seg, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = seg.shape
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    if targets.numel():
        targets.view(-1)[torch.randint(0, targets.numel(), (2,), generator=g)] = -100  # ignored
    return logits, targets


def reference_tokens(logits, targets, seg, shift, ls=0.0):
    tgt, doc = R.packed_tokens(targets, seg, shift)
    tok = R.per_sample_cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), -100, ls)
    return tok.view(tgt.shape), (tgt != -100) & (doc >= 0), doc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(p=packings(), seed=st.integers(0, 2**16), shift=st.booleans(), ls=st.sampled_from([0.0, 0.1]))
def test_logits_against_document_loop(dtype, p, seed, shift, ls):
    seg, n = p
    logits, targets = logits_batch(seg, 11, dtype, seed)
    tok, scored, doc = reference_tokens(logits, targets, seg, shift, ls)
    got = lm.per_document_cross_entropy(logits, targets.int(), seg, label_smoothing=ls, shift_labels=shift)
    ids, losses, counts = R.per_document_losses(tok, scored, doc)
    d = ids.shape[0]
    assert torch.equal(got.ids[:d], ids) and torch.equal(got.counts[:d], counts)
    torch.testing.assert_close(got.losses[:d], losses, **LOGIT_TOL[dtype])
    state = observed_state(n, seed)
    b = seed % (seg.shape[0] + 1)
    ref = run_reference(tok, scored, doc, state, b, seed=seed, select_mode="topk")
    res = ek.es_step(
        logits,
        targets,
        None,
        state,
        b,
        segment_ids=seg,
        shift_labels=shift,
        label_smoothing=ls,
        seed=seed,
        select_mode="topk",
    )
    torch.testing.assert_close(res.losses, ref[1], **LOGIT_TOL[dtype])
    torch.testing.assert_close(res.weights, ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.tensor, ref[3][0], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(state.errors, ref[3][1])


def test_shift_drops_positions_that_cross_a_document_boundary():
    # documents 3 | 5 in one row; position 1 predicts token 2 (document 5): dropped
    seg = torch.tensor([[3, 3, 5, 5, 5, -1]])
    logits, targets = logits_batch(seg, 7, torch.float32, 0)
    targets = torch.tensor([[1, 2, 3, 4, 5, 6]])
    got = lm.per_document_cross_entropy(logits, targets, seg, shift_labels=True)
    tok = F.cross_entropy(logits[0], torch.tensor([2, 0, 4, 5, 0, 0]), reduction="none")
    assert got.ids[:2].tolist() == [3, 5] and got.counts[:2].tolist() == [1, 2]
    torch.testing.assert_close(got.losses[:2], torch.stack([tok[0], (tok[2] + tok[3]) / 2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift", [False, True])
def test_hidden_equals_materialised_logits(dtype, shift):
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 3, 7, 16, 300
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 2, 2, 2, -1, -1], [4, 4, 4, 4, 4, 4, 4]])
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[1, 3] = -100
    want = lm.per_document_cross_entropy(F.linear(hidden, weight, bias), targets, seg, shift_labels=shift)
    got = lm.per_document_losses_from_hidden(
        hidden, weight, targets, seg, bias, shift_labels=shift, workspace_bytes=T * B * 4 * 130
    )  # 3 chunks of the vocabulary
    assert torch.equal(got.ids, want.ids) and torch.equal(got.counts, want.counts)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.losses, want.losses, **tol)
    a, c = ek.ESState(5), ek.ESState(5)
    r1 = ek.es_step_from_hidden(
        hidden, weight, targets, None, a, 2, bias=bias, segment_ids=seg, shift_labels=shift, select_mode="topk"
    )
    r2 = ek.es_step(
        F.linear(hidden, weight, bias), targets, None, c, 2, segment_ids=seg, shift_labels=shift, select_mode="topk"
    )
    torch.testing.assert_close(r1.weights, r2.weights, **tol)
    torch.testing.assert_close(a.tensor, c.tensor, equal_nan=True, **tol)


# ------------------------------------------------------------------ the sampler, the Triton ops, bad input
def test_sampler_select_packed_and_scales():
    es = ek.EvolvedSampler(6, mini_batch=2, seed=1)
    es.scale = torch.tensor([1.0, 2.0, 1.0, 4.0, 1.0, 1.0])
    seg = torch.tensor([[0, 0, 1, 1], [3, 3, 3, -1], [5, 5, 5, 5]])
    tok = token_losses(seg.shape, torch.float32, 0)
    sel = es.select(losses=tok, segment_ids=seg)
    assert sel.positions.shape == (2,) and sel.scales.shape == (2, 4)
    assert torch.equal(sel.scales, es.scales_of(seg[sel.positions]))
    assert torch.equal(es.scales_of(seg[1]), torch.tensor([4.0, 4.0, 4.0, 1.0]))
    assert es.step == 1 and int(es.state.s.isnan().sum()) == 2  # documents 2 and 4 unseen


@pytest.mark.skipif(triton_ops is None, reason="Triton is not installed")
def test_packed_step_on_the_triton_ops(monkeypatch, backend):
    """The composition runs on whichever ops the device dispatches to: here each backend's."""
    for module in (_packed, functional):  # the token losses, the update and the selection
        monkeypatch.setattr(module, "ops", backend)
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [2, 2, -1, 3, 3, 3], [1, 1, 1, 1, 4, 4]])
    logits, targets = logits_batch(seg, 13, torch.float32, 3)
    state = observed_state(5, 2)
    tok, scored, doc = reference_tokens(logits, targets, seg, True)
    ref = run_reference(tok, scored, doc, state, 2, seed=9, step=4)
    res = ek.es_step(logits, targets, None, state, 2, segment_ids=seg, shift_labels=True, seed=9, step=4)
    assert torch.equal(res.positions, ref[0])
    torch.testing.assert_close(state.tensor, ref[3][0], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_bad_input_raises_before_writing():
    seg = torch.zeros(2, 3, dtype=torch.int64)
    logits, targets = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64)
    state = ek.ESState(4)
    before = state.tensor.clone()
    cases = [
        (lambda: ek.es_step(logits, targets, torch.arange(2), state, 1, segment_ids=seg), "ids"),
        (lambda: ek.es_step(logits, targets, None, state, 1, segment_ids=seg[:, :2]), "segment_ids"),
        (lambda: ek.es_step(logits, targets, None, state, 1, segment_ids=seg.float()), "segment_ids"),
        (lambda: ek.es_step(logits, targets, None, state, 1, segment_ids=seg[0]), "segment_ids"),
        (lambda: ek.es_step(logits, targets, None, state, 3, segment_ids=seg), "b"),
        (lambda: ek.es_step(logits[:, 0], targets[:, 0], None, state, 1, segment_ids=seg), "logits"),
        (lambda: ek.es_step_from_losses(torch.ones(2, 3), None, state, 1, segment_ids=seg, mask=seg.int()), "mask"),
        (lambda: ek.es_step_from_losses(torch.ones(2, 4), None, state, 1, segment_ids=seg), "segment_ids"),
        (
            lambda: ek.es_step_from_losses(torch.ones(2, 3, dtype=torch.int64), None, state, 1, segment_ids=seg),
            "losses",
        ),
        (lambda: ek.EvolvedSampler(4, 1).select(torch.arange(2), losses=torch.ones(2, 3), segment_ids=seg), "ids"),
        (lambda: lm.per_document_losses(torch.ones(2, 3), seg[:1]), "segment_ids"),
        (lambda: lm.per_document_cross_entropy(logits, targets, seg, shift_labels=1), "shift_labels"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
    assert torch.equal(state.tensor.nan_to_num(-1), before.nan_to_num(-1)) and state.errors.tolist() == [0, 0]


@pytest.mark.skipif(triton_ops is None, reason="the guard needs es_kernels._triton")
def test_packed_paths_make_no_host_round_trip():
    from test_triton import no_host_sync

    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [2, 2, -1, 3, 3, 3], [1, 1, 1, 1, 4, 4]])
    logits, targets = logits_batch(seg, 13, torch.float32, 3)
    weight = torch.randn(13, 5)
    hidden = torch.randn(3, 6, 5)
    es = ek.EvolvedSampler(6, 2, seed=1, eps=0.1)
    with no_host_sync():
        lm.per_document_cross_entropy(logits, targets, seg, shift_labels=True)
        lm.per_document_losses_from_hidden(hidden, weight, targets, seg, workspace_bytes=64)
        lm.per_document_losses(token_losses(seg.shape, torch.float32, 1), seg)
        es.select(logits=logits, targets=targets, segment_ids=seg, shift_labels=True)
        es.select(hidden=hidden, weight=weight, targets=targets, segment_ids=seg)
        es.select(losses=token_losses(seg.shape, torch.bfloat16, 2), segment_ids=seg)
    assert es.step == 3
