"""The demo's scoring-schedule prototype (es_kernels.demo.schedule): which
steps score, the picks from the stored state, the observation of the
training losses, the loop breaker; and a tiny end-to-end demo run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from es_kernels import EvolvedSampler, es_update
from es_kernels.demo.schedule import AGE_SHARE, CAP, POLICIES, Schedule, policy_of
from es_kernels.state import ESState


def test_policy_of_names_the_schedule_methods():
    assert policy_of("es-epoch3") == "epoch3" and policy_of("eswp-epoch3s") == "epoch3s"
    assert policy_of("es") is None and policy_of("uniform-time") is None and policy_of("es-nope") is None
    with pytest.raises(ValueError, match="policy"):
        Schedule(EvolvedSampler(4, 2), "nope")


def test_which_steps_score():
    es = EvolvedSampler(10, 2)
    frac = Schedule(es, "frac")
    assert [frac.scores(0) for _ in range(9)] == [k % 3 == 2 for k in range(9)]  # floor((k+1)/3) > floor(k/3)
    every3 = Schedule(es, "epoch3")
    assert [every3.scores(e) for e in range(7)] == [True, False, False, True, False, False, True]
    stale = Schedule(es, "stale")
    assert [stale.scores(e) for e in range(4)] == [True, False, False, False]
    assert set(POLICIES) == {"epoch3", "frac", "epoch3s", "stale"}


def test_unseen_ids_are_picked_first_and_the_training_losses_observed():
    es = EvolvedSampler(20, 3, seed=5)
    sch = Schedule(es, "epoch3")
    ids = torch.arange(10, 18)
    es.state.s[ids[:5]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # seen, high weights
    es.state.d[ids[:5]] = 0.0
    assert not sch.scores(1)
    pos = sch.select(ids)
    assert pos.tolist() == [5, 6, 7]  # the three never-observed ids, despite the others' weights
    assert es.step == 1  # the step counter advances as a fused step's would
    losses = torch.tensor([0.5, 0.25, 2.0])
    before = es.state.tensor.clone()
    sch.observe(ids[pos], losses)
    ref = ESState(20)
    ref.tensor.copy_(before)
    es_update(ids[pos], losses, ref, es.beta1, es.beta2, lam=es.lam)
    assert torch.allclose(es.state.tensor, ref.tensor, rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(es.state.tensor, before, equal_nan=True)
    assert es.state.s[ids[pos]].tolist() == losses.tolist()  # a first observation: s = l
    assert sch.last[ids[pos]].tolist() == [1, 1, 1] and sch.streak[ids[pos]].tolist() == [0, 0, 0]  # fresh


def test_the_loop_breaker_refreshes_the_oldest_and_caps_weight_picks():
    n, B, b = 64, 16, 8
    es = EvolvedSampler(n, b, select_mode="topk", seed=1)
    sch = Schedule(es, "epoch3s")
    ids = torch.arange(B)
    es.state.s[:] = 1.0
    es.state.d[:] = 0.0
    es.state.s[:4] = 100.0  # a stale high weight: the loop's candidates
    sch.last[:4] = 50  # the high ones were observed recently
    sch.last[4:B] = torch.arange(B - 4) - 100  # the others longest ago, 4 the oldest
    n_age = int(b * AGE_SHARE)
    assert n_age == 2
    picks = []
    for _ in range(CAP + 1):
        assert not sch.scores(1)  # epoch 1 does not score; the step count advances
        pos = sch.select(ids)
        assert pos.shape[0] == b and torch.all(pos[1:] > pos[:-1])
        picks.append(set(pos.tolist()))
        sch.observe(ids[pos], torch.where(ids[pos] < 4, 100.0, 1.0))  # high training losses keep them high
    assert [{4, 5} <= picks[0], {8, 9} <= picks[1], {10, 11} <= picks[2]] == [True] * 3  # the oldest, by age
    assert {0, 1, 2, 3} <= picks[0] and {0, 1, 2, 3} <= picks[1]  # picked by their weight CAP times
    assert not ({0, 1, 2, 3} & picks[CAP])  # then barred until a fresh observation
    assert sch.streak[:4].tolist() == [CAP] * 4
    sch.scored(ids)  # a scoring pass frees them
    assert sch.streak[:4].tolist() == [0] * 4


def test_too_few_allowed_ids_are_filled_by_the_barred_ones():
    es = EvolvedSampler(8, 6, select_mode="topk")
    sch = Schedule(es, "stale")
    ids = torch.arange(8)
    es.state.s[:] = 1.0
    es.state.d[:] = 0.0
    sch.streak[:6] = CAP  # six barred, two allowed
    pos = sch.select(ids)
    assert pos.shape[0] == 6 and len(set(pos.tolist())) == 6


@pytest.mark.slow
def test_demo_runs_the_schedule_methods(tmp_path):
    from es_kernels.demo import main
    from es_kernels.demo.run import SCHEDULE_METHODS

    methods = ",".join(("full", "es") + SCHEDULE_METHODS + ("uniform-time",))
    args = ["--quick", "--datasets", "digits", "--epochs", "4", "--seeds", "1", "--threads", "1"]
    rc = main(args + ["--methods", methods, "--clock", "process", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    ds = json.loads((tmp_path / "demo.json").read_text())["datasets"]["digits"]
    for m in SCHEDULE_METHODS:
        r = ds["runs"][m][0]
        assert len(r["curve"]) == 5 and not math.isnan(r["test_acc"])
        assert r["backward_samples"] <= ds["runs"]["es"][0]["backward_samples"]
        assert 0 < ds["summary"][m]["scoring_share"]["mean"] < 1
