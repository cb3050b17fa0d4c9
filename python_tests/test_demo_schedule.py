"""The demo's scoring-schedule methods (bench/results/demo_schedule): each
``es-<policy>`` / ``eswp-<policy>`` runs EvolvedSampler(schedule=...)."""

from __future__ import annotations

import json
import math

import pytest

from es_kernels.demo.run import SCHEDULE_METHODS, policy_of, schedule_of
from es_kernels.schedule import ScoringSchedule


def test_policy_of_names_the_schedule_methods():
    assert policy_of("es-epoch3") == "epoch3" and policy_of("eswp-stale3") == "stale3"
    assert policy_of("es") is None and policy_of("uniform-time") is None and policy_of("es-nope") is None
    assert set(SCHEDULE_METHODS) == {f"{k}-{p}" for k in ("es", "eswp") for p in ("epoch3", "frac", "stale3")}


def test_each_method_is_a_schedule_the_sampler_takes():
    assert schedule_of("es", 40) == "step" and schedule_of("uniform-time", 40) == "step"
    assert schedule_of("es-epoch3", 40) == "epoch:3"
    assert schedule_of("es-stale3", 40) == "stale:120"  # 3 epochs of 40 steps
    frac = ScoringSchedule.parse(schedule_of("eswp-frac", 40))
    assert frac.kind == "fraction" and frac.fraction == 1 / 3 and frac.cap == 1  # the sampler's default cap
    for m in SCHEDULE_METHODS:
        assert ScoringSchedule.parse(schedule_of(m, 7)).selects_from_state


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
    for p in ("epoch3", "frac", "stale3"):  # fewer scoring passes than ES's every step
        assert ds["runs"][f"es-{p}"][0]["score_s"] < ds["runs"]["es"][0]["score_s"]
