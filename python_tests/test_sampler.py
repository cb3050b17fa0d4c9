"""The bundled samplers: against the reference ops, resume, ESWP annealing
and rescale, DataLoader use; the demo's label noise (the demo end to end:
test_demo.py)."""

import pytest
import torch
from conftest import assert_state_equal
from torch.utils.data import DataLoader, TensorDataset

import es_kernels as ek
from es_kernels import reference as R
from es_kernels._spec import DEFAULT_LAM


def ref_state(n):
    return ek.ESState(n).tensor, torch.zeros(2, dtype=torch.int64)


def test_select_matches_reference_ops():
    n, B, b = 200, 40, 10
    es = ek.EvolvedSampler(n, b, beta1=0.3, beta2=0.8, seed=5)
    ref = ref_state(n)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        ids = torch.randperm(n, generator=g)[:B]
        logits, targets = torch.randn(B, 7, generator=g), torch.randint(0, 7, (B,), generator=g)
        if step % 2:
            sel = es.select(ids, logits=logits, targets=targets)
            losses = R.per_sample_cross_entropy(logits, targets)
            want = R.es_step_from_losses(sel.losses, ids, *ref, b, 0.3, 0.8, "sample", 5, step, lam=DEFAULT_LAM)
            torch.testing.assert_close(sel.losses, losses, rtol=2e-5, atol=2e-5)
        else:
            losses = torch.rand(B, generator=g)
            sel = es.select(ids, losses=losses)
            want = R.es_step_from_losses(losses, ids, *ref, b, 0.3, 0.8, "sample", 5, step, lam=DEFAULT_LAM)
        assert torch.equal(sel.positions, want[0]) and torch.equal(sel.weights, want[2])
        assert torch.equal(sel.scales, torch.ones(b))
    assert es.step == 12
    assert_state_equal((es.state.tensor, es.state.errors), ref)


def test_short_last_meta_batch_and_bad_calls():
    es = ek.EvolvedSampler(10, 8)
    sel = es.select(torch.arange(5), losses=torch.rand(5))
    assert sel.positions.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="either logits"):
        es.select(torch.arange(3), losses=torch.rand(3), logits=torch.randn(3, 2), targets=torch.zeros(3).long())
    with pytest.raises(ValueError, match="targets"):
        es.select(torch.arange(3), logits=torch.randn(3, 2))
    with pytest.raises(ValueError, match="mini_batch"):
        ek.EvolvedSampler(10, 0)
    with pytest.raises(ValueError, match="beta2"):
        ek.EvolvedSampler(10, 2, beta2=2.0)


def run(es, pruner, epochs, start_epoch=0, g_seed=0):
    """A tiny training-free loop: meta-batches of the pruner's order, losses from ids."""
    picks = []
    for epoch in range(start_epoch, epochs):
        pruner.set_epoch(epoch)
        order = torch.tensor(list(pruner))
        for k in range(0, len(order), 16):
            ids = order[k : k + 16]
            losses = torch.sin(ids.float() * 0.37 + epoch) ** 2 + 0.1 / (epoch + 1)
            sel = es.select(ids, losses=losses)
            picks.append((ids[sel.positions].tolist(), sel.scales.tolist()))
    return picks


def test_resume_is_bit_exact(tmp_path):
    n, E = 120, 6
    es_a = ek.EvolvedSampler(n, 4, seed=3)
    pr_a = ek.ESWPSampler(es_a, num_epochs=E, prune_ratio=0.5)
    full = run(es_a, pr_a, E)

    es_b = ek.EvolvedSampler(n, 4, seed=3)
    pr_b = ek.ESWPSampler(es_b, num_epochs=E, prune_ratio=0.5)
    first = run(es_b, pr_b, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"es": es_b.state_dict(), "pruner": pr_b.state_dict()}, path)

    es_c = ek.EvolvedSampler(n, 4, seed=99, beta1=0.9)  # settings come from the checkpoint
    pr_c = ek.ESWPSampler(es_c, num_epochs=1)
    ck = torch.load(path)
    es_c.load_state_dict(ck["es"])
    pr_c.load_state_dict(ck["pruner"])
    rest = run(es_c, pr_c, E, start_epoch=3)
    assert first + rest == full
    assert_state_equal((es_a.state.tensor, es_a.state.errors), (es_c.state.tensor, es_c.state.errors))


def test_eswp_prunes_rescales_and_anneals():
    n, E, r = 2000, 8, 0.6
    es = ek.EvolvedSampler(n, 8, seed=1)
    ek.es_update(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(0)), es.state)
    pr = ek.ESWPSampler(es, num_epochs=E, prune_ratio=r, anneal_frac=0.25)
    kept = list(pr)
    want = R.eswp_prune(es.state.tensor, r, 1, 0, E, 0.25, True)
    assert kept == want[0][: int(want[1])].tolist() and torch.equal(es.scale, want[2])
    assert 0.6 * n < len(kept) < 0.8 * n  # about half below the mean, 60% of those dropped
    assert int((es.scale == 1 / (1 - r)).sum()) > 0 and set(es.scale.unique().tolist()) <= {
        0.0,
        1.0,
        float(torch.tensor(1 / (1 - r))),
    }
    assert pr.epoch == 1  # one pass advanced the epoch
    sel = es.select(torch.tensor(kept[:20]), losses=torch.rand(20))
    assert torch.equal(sel.scales, es.scale[torch.tensor(kept[:20])[sel.positions]])
    for epoch in (6, 7):  # floor((1 - 0.25) * 8) = 6: annealing keeps everything at scale 1
        pr.set_epoch(epoch)
        assert sorted(pr) == list(range(n)) and torch.all(pr.scale == 1)


def test_with_a_dataloader():
    x, y = torch.randn(100, 3), torch.randint(0, 4, (100,))
    es = ek.EvolvedSampler(100, 5)
    ek.es_update(torch.arange(100), torch.rand(100), es.state)
    pr = ek.ESWPSampler(es, num_epochs=4, prune_ratio=0.5)
    loader = DataLoader(ek.IndexedDataset(TensorDataset(x, y)), batch_size=20, sampler=pr)
    seen = []
    for ids, xb, yb in loader:
        assert torch.equal(xb, x[ids]) and torch.equal(yb, y[ids])
        sel = es.select(ids, logits=torch.randn(len(ids), 4), targets=yb)
        assert sel.positions.shape[0] == min(5, len(ids))
        seen += ids.tolist()
    assert len(seen) == len(set(seen)) < 100
    assert pr.epoch == 1


def test_state_dict_checks_the_state():
    es = ek.EvolvedSampler(10, 2)
    es.select(torch.tensor([3, 11]), losses=torch.rand(2))
    with pytest.raises(RuntimeError, match="out of range"):
        es.state_dict()


def test_label_noise_is_symmetric():
    from es_kernels.demo import corrupt_labels

    y = torch.arange(10).repeat(2000)
    z = corrupt_labels(y, 0.4, 10, seed=0)
    flipped = z != y
    assert abs(flipped.float().mean().item() - 0.4) < 0.02
    counts = torch.bincount(z[flipped], minlength=10).float()
    assert counts.min() > 0.8 * counts.mean()


def test_chunks_are_the_iteration_as_tensors():
    """ESWPSampler.chunks() yields the ids iter() would, as int64 tensors of at
    most `size` ids; a chunk counts as yielded; a checkpoint after a chunk
    resumes with the rest; set_epoch ends the chunk iterator; epoch_ids() is the
    whole epoch as one tensor."""
    n = 2500

    def make():
        es = ek.EvolvedSampler(n, 8, seed=3)
        ek.es_update(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(2)), es.state)
        return es, ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5)

    _, pr_a = make()
    want = list(pr_a)
    es_b, pr_b = make()
    it = pr_b.chunks(700)
    first = next(it)
    assert first.dtype == torch.int64 and first.shape == (700,) and pr_b.position == 700
    sd = pr_b.state_dict()
    rest = list(it)
    assert all(c.shape[0] <= 700 for c in rest)
    assert torch.cat([first, *rest]).tolist() == want
    es_c, pr_c = make()
    pr_c.load_state_dict(sd)
    assert torch.cat(list(pr_c.chunks(999))).tolist() == want[700:]
    assert torch.equal(pr_c.epoch_ids(), torch.tensor(list(pr_a)))  # epoch 1 on both
    it = pr_c.chunks(10)
    next(it)
    pr_c.set_epoch(5)
    assert list(it) == []  # ended
    with pytest.raises(ValueError, match="size"):
        pr_c.chunks(0)
    es_d = ek.EvolvedSampler(0, 1)
    assert ek.ESWPSampler(es_d, num_epochs=1).epoch_ids().shape == (0,)  # an empty epoch


@pytest.mark.parametrize("r", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("dist", ["uniform", "exponential", "lognormal"])
def test_eswp_drops_prune_ratio_times_the_below_mean_share(r, dist):
    """The documented share (ESWPSampler's docstring, the README): an epoch
    drops prune_ratio times the share of scored samples below the mean, never
    an unscored or an above-mean one; 1 - len / N after set_epoch is it."""
    n, seen = 20000, 15000
    g = torch.Generator().manual_seed(hash((r, dist)) % 2**31)
    losses = {
        "uniform": lambda: torch.rand(seen, generator=g),
        "exponential": lambda: -torch.log(torch.rand(seen, generator=g)),
        "lognormal": lambda: torch.exp(1.5 * torch.randn(seen, generator=g)),
    }[dist]()
    es = ek.EvolvedSampler(n, 8, seed=3)
    ek.es_update(torch.arange(seen), losses, es.state)  # ids >= seen stay unscored
    pr = ek.ESWPSampler(es, num_epochs=10, prune_ratio=r)
    pr.set_epoch(2)
    kept = len(pr)
    list(pr)
    score = (es.state.s.double() + es.state.d.double())[:seen]
    below = score < score.mean()
    dropped = es.scale == 0
    assert not dropped[seen:].any() and not dropped[:seen][~below].any()
    n_below, n_dropped = int(below.sum()), int(dropped.sum())
    assert n_dropped == n - kept
    sd = (n_below * r * (1 - r)) ** 0.5
    assert abs(n_dropped - r * n_below) <= 5 * sd + 1, (n_dropped, r * n_below)
    if dist == "lognormal" and r == 0.5:  # skewed losses: most below the mean, ~37% dropped of the scored
        assert 0.7 < n_below / seen < 0.85 and 0.33 < n_dropped / seen < 0.44


def test_scoring_is_eval_mode_without_autograd_and_restores_each_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    frozen = torch.nn.BatchNorm1d(8).eval()  # a submodule kept in eval mode stays so
    model.append(frozen)
    x = torch.randn(32, 6)
    stats = model[1].running_mean.clone()
    with ek.scoring(model) as m:
        assert m is model and not torch.is_grad_enabled()
        out1, out2 = model(x), model(x)
        assert not any(mod.training for mod in model.modules())
    assert torch.equal(out1, out2) and not out1.requires_grad  # no dropout, no graph
    assert int(model[1].num_batches_tracked) == 0 and torch.equal(model[1].running_mean, stats)
    assert model.training and model[1].training and not frozen.training and torch.is_grad_enabled()
    with pytest.raises(KeyError), ek.scoring(model):
        raise KeyError  # restored on an exception too
    assert model.training and not frozen.training
    with ek.scoring(model, eval_mode=False):  # dropout on, autograd off
        assert model.training and not model(x).requires_grad
    assert int(model[1].num_batches_tracked) == 1
    with pytest.raises(ValueError, match="model"), ek.scoring(lambda x: x):
        pass
    with pytest.raises(ValueError, match="eval_mode"), ek.scoring(model, eval_mode=1):
        pass
