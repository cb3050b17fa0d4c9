"""es_kernels.estimate: the cost model's arithmetic, its report's warnings,
the measurement on a real model, argument checks and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

import es_kernels as ek
from es_kernels import estimate as E


def _est(**kw):
    base = dict(
        meta_batch=512,
        mini_batch=171,
        train_full=30e-3,
        train_mini=12e-3,
        score=9e-3,
        es_step=0.5e-3,
        from_state=0.3e-3,
        clock="process",
    )
    return E.CostEstimate(**(base | kw))


def test_step_cost_formula():
    e = _est()
    assert math.isclose(e.step_cost(1.0), (9.5e-3 + 12e-3) / 30e-3)
    assert math.isclose(e.step_cost(0.0), (0.3e-3 + 12e-3) / 30e-3)
    assert math.isclose(e.step_cost(0.25), (0.25 * 9.5e-3 + 0.75 * 0.3e-3 + 12e-3) / 30e-3)
    assert math.isclose(e.uniform_cost, 0.4)
    assert math.isclose(e.score_ratio, 0.3)
    # cheaper schedules cost less, never less than uniform's step plus the selection
    costs = [e.step_cost(f) for f in (1.0, 0.5, 0.1, 0.0)]
    assert costs == sorted(costs, reverse=True)
    assert costs[-1] > e.uniform_cost
    with pytest.raises(ValueError, match="scoring_fraction"):
        e.step_cost(1.5)


def test_report_warns_where_es_cannot_pay():
    cheap = _est().report()
    assert "WARNING" not in cheap and "ES, every step" in cheap and "uniform" in cheap
    # a small CNN on a CPU: the no-grad forward costs half a training step
    costly = _est(score=16e-3, train_mini=13e-3).report()
    assert "WARNING: scoring every step costs" in costly
    hopeless = _est(score=40e-3, train_mini=29e-3, from_state=2e-3).report()
    assert "no schedule saves 5%" in hopeless


def test_measures_a_real_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(96, 16), torch.randint(0, 5, (96,))
    est = ek.estimate_cost(model, x, y, 32, repeats=2, warmup=1)
    assert (est.meta_batch, est.mini_batch, est.clock) == (96, 32, "wall")
    for k in ("train_full", "train_mini", "score", "es_step", "from_state"):
        assert getattr(est, k) > 0, k
    # the user's model is not touched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "Per meta-batch" in est.report()


def test_sequence_model_and_custom_parts():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 8)
            self.out = torch.nn.Linear(8, 11)

        def forward(self, x):
            return self.out(self.emb(x))

    x = torch.randint(0, 11, (12, 7))
    y = x.clone()
    y[:, :2] = -100
    est = ek.estimate_cost(Tiny(), x, y, 4, repeats=1, warmup=0, clock="process")
    assert est.clock == "process" and est.train_full > 0
    calls = []

    def score(m, xx, yy):
        calls.append(torch.is_grad_enabled())
        return ek.per_sample_cross_entropy(m(xx), yy)

    ek.estimate_cost(Tiny(), x, y, 4, repeats=1, warmup=0, score=score)
    assert calls and not any(calls)  # the scoring pass runs without autograd


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mini_batch=0), "mini_batch"),
        (dict(mini_batch=9), "mini_batch"),
        (dict(repeats=0), "repeats"),
        (dict(warmup=-1), "warmup"),
        (dict(clock="gpu"), "clock"),
    ],
)
def test_bad_arguments(kw, match):
    model = torch.nn.Linear(4, 3)
    args = dict(mini_batch=2) | kw
    with pytest.raises(ValueError, match=match):
        ek.estimate_cost(model, torch.randn(8, 4), torch.randint(0, 3, (8,)), args.pop("mini_batch"), **args)
    with pytest.raises(ValueError, match="model"):
        ek.estimate_cost("net", torch.randn(8, 4), torch.randint(0, 3, (8,)), 2)


def test_cli_on_a_demo_task(capsys):
    from es_kernels.__main__ import main

    assert main(["estimate", "--task", "digits", "--hidden", "32", "--meta-batch", "96", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "B = 96, b = 32" in out and "ES, every 3rd epoch" in out


def test_cli_on_a_user_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "mycase.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(6, 4), torch.randn(30, 6), torch.randint(0, 4, (30,))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from es_kernels.__main__ import main

    assert main(["estimate", "--model", "mycase:make", "--mini-batch", "10", "--repeats", "1"]) == 0
    assert "B = 30, b = 10" in capsys.readouterr().out
    with pytest.raises(ValueError, match="MODULE:FUNCTION"):
        main(["estimate", "--model", "mycase"])
