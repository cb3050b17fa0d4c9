"""The demo: its fair metrics on synthetic curves (fast), the ablation's rule,
and end to end at tiny sizes (marked slow; ``make test`` runs them)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from es_kernels.demo import metrics as M

CURVE = [[0.0, 10.0, 0], [1.0, 50.0, 100], [2.0, 80.0, 200], [3.0, 79.0, 300]]


# ---------------------------------------------------------------- metric helpers
def test_time_to_target_is_the_first_point_reaching_it():
    assert M.time_to_target(CURVE, 80.0) == (2.0, 200)
    assert M.time_to_target(CURVE, 79.5) == (2.0, 200)  # the later dip does not matter
    assert M.time_to_target(CURVE, 50.0) == (1.0, 100)
    assert M.time_to_target(CURVE, 80.0 + 1e-12) == (2.0, 200)  # rounding of a mean over seeds
    assert M.time_to_target(CURVE, 81.0) is None  # not reached is a result


def test_acc_at_holds_the_last_evaluation():
    assert M.acc_at(CURVE, 0.0) == 10.0
    assert M.acc_at(CURVE, 1.5) == 50.0
    assert M.acc_at(CURVE, 2.0) == 80.0
    assert M.acc_at(CURVE, 100.0) == 79.0  # a finished run keeps its final model


def test_auc_is_the_mean_of_the_held_curve_over_the_window():
    assert M.auc(CURVE, 2.0) == pytest.approx((10 + 50) / 2)
    assert M.auc(CURVE, 0.5) == pytest.approx(10.0)
    assert M.auc(CURVE, 2.5) == pytest.approx((10 + 50 + 80 * 0.5) / 2.5)
    assert M.auc(CURVE, 5.0) == pytest.approx((10 + 50 + 80 + 79 * 2) / 5)  # held after the end
    flat = [[0.0, 60.0, 0], [4.0, 60.0, 10]]
    assert M.auc(flat, 3.0) == pytest.approx(60.0)
    with pytest.raises(ValueError):
        M.auc(CURVE, 0.0)


def test_faster_curve_has_larger_auc_and_earlier_target():
    slow = [[0.0, 10.0, 0], [2.0, 60.0, 1], [4.0, 90.0, 2]]
    fast = [[0.0, 10.0, 0], [1.0, 60.0, 1], [2.0, 90.0, 2]]
    assert M.auc(fast, 4.0) > M.auc(slow, 4.0)
    assert M.time_to_target(fast, 90.0)[0] < M.time_to_target(slow, 90.0)[0]


def test_average_ranks_share_ties_and_infinity():
    assert M.average_ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert M.average_ranks([1.0, math.inf, math.inf, 0.5]) == [2.0, 3.5, 3.5, 1.0]
    assert M.median_or_inf([1.0, None, 3.0]) == 3.0
    assert M.median_or_inf([1.0, None, None]) == math.inf


def test_rank_configs_mean_rank_then_accuracy():
    cells = {
        "a": {
            "t1": {"ttt": [1.0, 1.0, 1.0], "final_acc": [80, 80, 80]},
            "t2": {"ttt": [5.0, 5.0, 5.0], "final_acc": [80, 80, 80]},
        },
        "b": {
            "t1": {"ttt": [2.0, 2.0, 2.0], "final_acc": [90, 90, 90]},
            "t2": {"ttt": [4.0, 4.0, 4.0], "final_acc": [90, 90, 90]},
        },  # same mean rank as a, more accurate
        "c": {
            "t1": {"ttt": [None, None, 0.1], "final_acc": [99, 99, 99]},  # median: not reached
            "t2": {"ttt": [None, None, None], "final_acc": [99, 99, 99]},
        },
    }
    ranking = M.rank_configs(cells)
    assert [r[0] for r in ranking] == ["b", "a", "c"]
    assert ranking[0][1] == ranking[1][1] == 1.5 and ranking[2][1] == 3.0


def _run(curve, score_s=0.0):
    return {
        "wall_s": curve[-1][0],
        "test_acc": curve[-1][1],
        "backward_samples": curve[-1][2],
        "curve": curve,
        "epochs": len(curve) - 1,
        "score_s": score_s,
    }


def test_summarize_fair_metrics_on_synthetic_runs():
    from es_kernels.demo.run import fair_reference, summarize

    runs = {
        "full": [_run([[0, 10, 0], [2, 70, 1000], [4, 80, 2000]]), _run([[0, 10, 0], [2, 72, 1000], [4, 82, 2000]])],
        "es": [
            _run([[0, 10, 0], [1, 75, 200], [2, 81, 400]], 0.5),
            _run([[0, 10, 0], [1, 70, 200], [2, 79, 400]], 0.5),
        ],
    }
    ref = fair_reference(runs)
    assert ref == {"target_acc": 81.0, "window_s": 2.0}
    s = summarize(runs)
    assert s["full"]["time_to_target"]["reached"] == 1 and s["full"]["time_to_target"]["wall_s"]["mean"] == 4
    assert s["es"]["time_to_target"]["reached"] == 1 and s["es"]["time_to_target"]["backward_samples"]["mean"] == 400
    assert s["es"]["acc_at_window"]["mean"] == pytest.approx(80.0)
    assert s["full"]["acc_at_window"]["mean"] == pytest.approx(71.0)
    assert s["es"]["auc"]["mean"] == pytest.approx(((10 + 75) + (10 + 70)) / 2 / 2)
    assert s["es"]["scoring_share"]["mean"] == pytest.approx(0.25)
    assert s["es"]["ideal_saving"] == pytest.approx(1 - (0.5 / 4 + 400 / 2000))
    assert s["es"]["wall_saving_vs_full"] == pytest.approx(0.5)


def test_process_clock_times_training(monkeypatch):
    """--clock process: every training time comes from time.process_time
    (a frozen fake here: no training time passes), real time still feeds the
    ETA; an unknown clock is refused before training."""
    from es_kernels.demo import run

    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(64, 5, generator=g),
        torch.randint(0, 3, (64,), generator=g),
        torch.randn(16, 5),
        torch.zeros(16, dtype=torch.int64),
        3,
    )
    cfg = run.Config(epochs=2, meta_batch=32, mini_batch=8, hidden=8, threads=1, clock="process")
    monkeypatch.setitem(run.CLOCKS, "process", lambda: 5.0)
    for method in ("full", "es"):
        r = run.train(method, data, cfg, 0)
        assert r["wall_s"] == 0.0 and r["score_s"] == 0.0 and r["elapsed_s"] > 0
        assert [p[0] for p in r["curve"]] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="clock"):
        run.train("full", data, run.Config(clock="cpu"), 0)


def test_eta_from_measured_epochs_and_the_cost_model():
    from es_kernels.demo.run import Eta, fmt_eta

    eta = Eta(512)
    assert eta.remaining([(("d", "es", 128), 10)]) is None
    eta.record(("d", "full", 512), 2, 4.0)  # 2 s per epoch
    assert eta.estimate(("d", "full", 512), 3) == pytest.approx(6.0)
    assert eta.estimate(("d", "es", 128), 1) == pytest.approx(2.0 * (1 / 3 + 1 / 4))
    eta.record(("d", "es", 128), 1, 1.0)
    assert eta.estimate(("d", "es", 128), 2) == pytest.approx(2.0)
    assert eta.estimate(("d", "es", 64), 1) == pytest.approx((1 / 3 + 1 / 8) / (1 / 3 + 1 / 4))
    assert fmt_eta(125) == "ETA 2 min 05 s" and "unknown" in fmt_eta(None)
    eta.record(("e", "es", 128), 1, 5.0)
    assert eta.remaining_partial([(("d", "full", 512), 1), (("f", "es", 128), 1), (("e", "es", 64), 1)]) == (
        pytest.approx(2.0 + 5.0 * (1 / 3 + 1 / 8) / (1 / 3 + 1 / 4)),
        ["f"],
    )
    assert fmt_eta(3700, ["f"]) == "ETA 1 h 01 min + the runs on f (not measured yet)"


def test_grid_settings_collapse_what_does_not_enter_the_weight():
    from es_kernels.demo.run import grid_settings, parse_grid, parse_tasks

    grid = parse_grid({"beta1": "0.2", "beta2": "0.5,0.9,1", "lam": "0,1", "eps": "0", "ratio": "1/4,0.125"})
    settings = grid_settings(grid)
    # lam=0: one beta2; beta2=1: one lam; so (0.5,0), (0.5,1), (0.9,1), (1,0) per ratio
    assert len(settings) == 2 * 4
    assert {s["ratio"] for s in settings} == {"1/4", "1/8"}
    assert parse_tasks("digits:10:0.4")[0].name == "digits 10ep noise 0.4"


def test_missing_dependencies_message(monkeypatch, capsys):
    import importlib.util

    from es_kernels.demo import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist1d" else real(name, *a))
    assert main(["--quick"]) == 2
    assert 'pip install "es-kernels[demo]"' in capsys.readouterr().err


# ---------------------------------------------------------------- end to end (tiny)
TINY = ["--quick", "--epochs", "2", "--mnist1d-samples", "800", "--no-progress"]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    from es_kernels.demo import METHODS, main

    args = ["--full", "--seeds", "2", "--label-noise", "0.2", "--out", str(tmp_path)]
    rc = main(TINY + args)
    assert rc == 0
    out = capsys.readouterr().out
    assert out.index("runs: ETA ") < out.index("[1/28] ")  # the ETA comes before the first run ends
    assert "\nverdict (process CPU time):\n- mnist1d: ES " in out and "\n- digits: ES " in out
    md = (tmp_path / "demo.md").read_text()
    assert "| method | epochs |" in md and "- digits: ES " in md
    assert "SMOKE TEST" in out and "time to target" in out and "scoring share" in out
    assert "| method | epochs | process CPU time s |" in out
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["complete"] and res["smoke_test"] and res["config"]["threads"] == 1
    assert res["config"]["clock"] == "process"
    assert set(res["datasets"]) == {"mnist1d", "digits"}
    for ds in res["datasets"].values():
        assert set(ds["summary"]) == set(METHODS)
        assert ds["target_acc"] == pytest.approx(ds["summary"]["full"]["test_acc"]["mean"])
        assert ds["window_s"] == pytest.approx(ds["summary"]["es"]["wall_s"]["mean"])
        for m in METHODS:
            s = ds["summary"][m]
            assert s["wall_s"]["mean"] > 0 and 0 <= s["test_acc"]["mean"] <= 100
            assert len(ds["runs"][m]) == 2 and "auc" in s and "time_to_target" in s
            if not m.endswith("-time"):
                assert len(ds["runs"][m][0]["curve"]) == 3  # start + 2 epochs
        for r in ds["runs"]["uniform-time"] + ds["runs"]["full-time"]:
            assert r["time_budget_s"] == pytest.approx(ds["window_s"])
            assert 0.3 * r["time_budget_s"] < r["wall_s"] < 2 * r["time_budget_s"]  # a step's slack (loaded machine)
        es = ds["summary"]["es"]
        assert es["backward_samples"]["mean"] < ds["summary"]["full"]["backward_samples"]["mean"]
        assert 0 < es["scoring_share"]["mean"] < 1 and "ideal_saving" in es
    assert (tmp_path / "demo.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_writes_json_after_each_run_and_keeps_it_on_interrupt(tmp_path, monkeypatch):
    from es_kernels.demo import main, run

    real, seen = run.train, []

    def train(method, data, cfg, seed, progress=None, **kw):
        path = tmp_path / "demo.json"
        done = 0
        if path.exists():  # every finished run is on disk before the next starts
            res = json.loads(path.read_text())
            done = sum(len(rs) for ds in res["datasets"].values() for rs in ds["runs"].values())
            assert not res["complete"]
        assert done == len(seen)
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(method)
        return real(method, data, cfg, seed, progress, **kw)

    monkeypatch.setattr(run, "train", train)
    rc = main(TINY + ["--seeds", "1", "--datasets", "digits", "--out", str(tmp_path)])
    assert rc == 130
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["interrupted"] and not res["complete"]
    assert [m for m, rs in res["datasets"]["digits"]["runs"].items() if rs] == seen == ["full", "uniform", "es"]


@pytest.mark.slow
def test_ablation_tiny_grid(tmp_path, capsys):
    from es_kernels.demo import main

    rc = main(
        [
            "--ablate",
            "--seeds",
            "1",
            "--mnist1d-samples",
            "800",
            "--no-progress",
            "--out",
            str(tmp_path),
            "--tasks",
            "digits:2:0,digits:2:0.4",
            "--grid-beta1",
            "0.2",
            "--grid-beta2",
            "0.5",
            "--grid-lam",
            "0,1",
            "--grid-eps",
            "0",
            "--grid-ratio",
            "1/4,1/8",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "chosen: beta1=" in out and "Rule, fixed before any run" in out and "ETA" in out
    res = json.loads((tmp_path / "ablation.json").read_text())
    assert res["complete"] and len(res["settings"]) == 4 and len(res["ranking"]) == 4
    assert set(res["targets"]) == set(res["tasks"])
    assert res["chosen"] is not None
    assert (tmp_path / "ablation.md").read_text().count("\n| ") >= 5


def test_scoring_pass_runs_without_autograd():
    """The scoring pass in inference_mode feeds the fused step (inference tensors in, normal state out)."""
    from es_kernels import EvolvedSampler

    model = torch.nn.Linear(4, 3)
    es = EvolvedSampler(8, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with torch.inference_mode():
        logits = model(x)
    sel = es.select(torch.arange(8), logits=logits, targets=y)
    loss = torch.nn.functional.cross_entropy(model(x[sel.positions]), y[sel.positions])
    loss.backward()
    assert model.weight.grad is not None and not es.state.tensor.is_inference()


def test_ablation_keeps_partial_results_on_interrupt(tmp_path, monkeypatch):
    """A fake train (synthetic curves, no training): the JSON is on disk after
    every run, and an interrupt leaves a ranking over the finished tasks only."""
    from es_kernels.demo import ablation, run

    calls = []

    def train(method, data, cfg, seed, progress=None, **kw):
        path = tmp_path / "ablation.json"
        if calls:
            res = json.loads(path.read_text())
            done = sum(len(v) for v in res["full"].values()) + sum(
                len(c["final_acc"]) for cells in res["cells"].values() for c in cells.values()
            )
            assert done == len(calls) and not res["complete"]
        if len(calls) == 7:  # task 1: 1 full + 4 settings; task 2: full + 1 setting, then ^C
            raise KeyboardInterrupt
        calls.append(method)
        acc = 90.0 if method == "full" else 80.0 + cfg.mini_batch / 10  # larger b reaches more
        curve = [[0.0, 10.0, 0], [1.0, acc, 100]]
        return {
            "wall_s": 1.0,
            "test_acc": acc,
            "curve": curve,
            "epochs": 1,
            "elapsed_s": 1.0,
            "backward_samples": 100,
            "score_s": 0.1,
        }

    monkeypatch.setattr(ablation, "train", train)
    cfg = run.Config(seeds=1, mnist1d_samples=800)
    grid = {"beta1": "0.2", "beta2": "0.5", "lam": "0,1", "eps": "0", "ratio": "1/4,1/8"}
    res = run.run_ablation(
        cfg, tmp_path, grid=grid, tasks=run.parse_tasks("digits:1:0,digits:1:0.4"), show_progress=False
    )
    assert res["interrupted"] and not res["complete"] and res["chosen"] is None
    on_disk = json.loads((tmp_path / "ablation.json").read_text())
    assert on_disk["ranking"] == res["ranking"] and len(res["ranking"]) == 4
    assert "PARTIAL" in (tmp_path / "ablation.md").read_text()
    # ranked on the finished task: b = 128 gives 92.8% >= the 90% target, b = 64 misses it (86.4%)
    assert res["ranking"][0]["setting"].endswith("b/B=1/4")


def test_merged_shards_rank_as_one_run(tmp_path, monkeypatch):
    """--merge: the grid run in shards (an interrupted one included, its
    finished tasks taken) ranks and chooses exactly as one run over all the
    tasks; a task in two shards and a different grid are refused."""
    from es_kernels.demo import ablation, main, run

    def train(method, data, cfg, seed, progress=None, **kw):  # synthetic: each task ranks the settings differently
        acc = 90.0 if method == "full" else 85.0 + (cfg.lam + 1) * cfg.mini_batch / (20 + 10 * cfg.epochs) + seed
        t = 1.0 + cfg.beta1 + cfg.epochs / (cfg.lam + 1)
        return {"wall_s": t, "test_acc": acc, "curve": [[0.0, 10.0, 0], [t, acc, 100]], "epochs": 1, "elapsed_s": 1.0}

    monkeypatch.setattr(ablation, "train", train)
    cfg = run.Config(seeds=2, mnist1d_samples=800)
    grid = {"beta1": "0,0.2", "beta2": "0.5", "lam": "0,1,2", "eps": "0", "ratio": "1/4,1/8"}
    tasks = "digits:1:0,digits:2:0.4,digits:3:0"
    one = run.run_ablation(cfg, tmp_path / "one", grid=grid, tasks=run.parse_tasks(tasks), show_progress=False)
    run.run_ablation(cfg, tmp_path / "a", grid=grid, tasks=run.parse_tasks("digits:1:0"), show_progress=False)
    real, n = ablation.train, [0]

    def interrupted(*a, **kw):  # shard b: its first task finishes, then ^C during its second
        n[0] += 1
        if n[0] > 2 + 2 * 12:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(ablation, "train", interrupted)
    b = run.run_ablation(
        cfg, tmp_path / "b", grid=grid, tasks=run.parse_tasks("digits:2:0.4,digits:9:0"), show_progress=False
    )
    assert b["interrupted"]
    monkeypatch.setattr(ablation, "train", real)
    run.run_ablation(cfg, tmp_path / "c", grid=grid, tasks=run.parse_tasks("digits:3:0"), show_progress=False)
    shards = ",".join(str(tmp_path / s / "ablation.json") for s in "abc")
    assert main(["--ablate", "--merge", shards, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "ablation.json").read_text())
    assert merged["tasks"] == one["tasks"] and merged["complete"]
    assert merged["ranking"] == one["ranking"] and merged["chosen"] == one["chosen"] is not None
    assert len({r["mean_rank"] for r in one["ranking"]}) > 2  # the ranking is not a tie
    assert [m["complete"] for m in merged["merged_from"]] == [True, False, True]
    with pytest.raises(SystemExit):  # a task twice
        main(["--ablate", "--merge", f"{shards},{tmp_path / 'a' / 'ablation.json'}", "--out", str(tmp_path / "x")])
    run.run_ablation(
        cfg, tmp_path / "d", grid=dict(grid, lam="1"), tasks=run.parse_tasks("digits:4:0"), show_progress=False
    )
    with pytest.raises(SystemExit):  # another grid
        main(["--ablate", "--merge", f"{shards},{tmp_path / 'd' / 'ablation.json'}", "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------- the LM task
def test_time_to_target_of_a_loss_is_the_first_point_at_or_below_it():
    loss = [[0.0, 5.5, 0], [1.0, 3.0, 100], [2.0, 2.5, 200], [3.0, 2.6, 300]]
    assert M.time_to_target(loss, 2.5, higher=False) == (2.0, 200)
    assert M.time_to_target(loss, 2.5 - 1e-12, higher=False) == (2.0, 200)  # rounding of a mean over seeds
    assert M.time_to_target(loss, 3.0, higher=False) == (1.0, 100)
    assert M.time_to_target(loss, 2.4, higher=False) is None
    assert M.time_to_target(loss, 2.5) == (0.0, 0)  # as accuracy, the start already "reaches" it


def test_summarize_an_lm_goal_names_its_keys_by_loss():
    from es_kernels.demo.run import fair_reference, summarize

    def run(curve):
        return {**_run(curve), "test_loss": curve[-1][1]}

    runs = {
        "full": [
            run([[0, 5.5, 0], [2, 3.0, 1000], [4, 2.5, 2000]]),
            run([[0, 5.5, 0], [2, 3.2, 1000], [4, 2.7, 2000]]),
        ],
        "es": [run([[0, 5.5, 0], [1, 2.9, 250], [2, 2.6, 500]]), run([[0, 5.5, 0], [1, 3.1, 250], [2, 2.7, 500]])],
    }
    assert fair_reference(runs, M.LM_LOSS) == {"target_loss": pytest.approx(2.6), "window_s": 2.0}
    s = summarize(runs, M.LM_LOSS)
    assert "test_acc" not in s["es"] and s["es"]["test_loss"]["mean"] == pytest.approx(2.65)
    assert s["es"]["time_to_target"]["reached"] == 1 and s["es"]["time_to_target"]["backward_samples"]["mean"] == 500
    assert s["full"]["time_to_target"]["reached"] == 1 and s["full"]["time_to_target"]["wall_s"]["mean"] == 4
    assert s["full"]["loss_at_window"]["mean"] == pytest.approx(3.1)
    assert s["es"]["loss_minus_full"] == pytest.approx(2.65 - 2.6)


def test_rank_configs_with_an_lm_task_ties_on_accuracy_tasks_only():
    cells = {
        "a": {"t": {"ttt": [1.0], "final_acc": [80]}, "lm": {"ttt": [2.0], "final_loss": [2.5]}},
        "b": {"t": {"ttt": [2.0], "final_acc": [90]}, "lm": {"ttt": [1.0], "final_loss": [2.9]}},
    }
    assert [r[0] for r in M.rank_configs(cells)] == ["b", "a"]  # equal mean rank; b more accurate
    lm_only = {c: {"lm": v["lm"]} for c, v in cells.items()}
    assert [(r[0], r[2]) for r in M.rank_configs(lm_only)] == [("b", None), ("a", None)]


def test_lm_corpus_is_deterministic_and_split_by_file():
    from es_kernels.demo import lmtask

    files = lmtask.stdlib_files()
    held = {f.name for f in files if lmtask.is_held_out(f.name)}
    assert files and held and len(held) < len(files) / 4  # about a tenth of the files
    tr, te, info = lmtask.load_corpus(32, 40, 10)
    tr2, te2, _ = lmtask.load_corpus(32, 40, 10)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert tr.shape == (40, 32) and te.shape == (10, 32) and tr.dtype == torch.int64
    assert int(tr.max()) < 256 and int(tr.min()) >= 0  # bytes; 256 (padding) is never in a full window
    assert info["held_out"]["files"] == len(held) and info["train"]["files"] == len(files) - len(held)
    text = b"\n".join(f.read_bytes() for f in files if f.name in held)
    assert all(bytes(row.tolist()) in text for row in te)  # held-out windows come from held-out files
    with pytest.raises(ValueError, match="fewer than"):
        lmtask.load_corpus(32, 10**9, 10)


def test_lm_sequence_losses_are_per_sequence_means_over_shifted_targets():
    from es_kernels.demo.lmtask import IGNORE, sequence_losses

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 3:] = IGNORE
    got = sequence_losses(logits, labels)
    for i in range(3):
        keep = labels[i, 1:] != IGNORE
        want = torch.nn.functional.cross_entropy(logits[i, :-1][keep], labels[i, 1:][keep])
        assert got[i] == pytest.approx(float(want), rel=1e-6)


def test_lm_missing_transformers_message(monkeypatch, capsys):
    import importlib.util

    from es_kernels.demo import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    assert main(["--task", "lm"]) == 2
    assert 'pip install "es-kernels[demo,integrations]"' in capsys.readouterr().err


def test_lm_task_rejects_classification_options(capsys):
    from es_kernels.demo import main

    for argv in (["--label-noise", "0.2"], ["--datasets", "digits"], ["--ablate"]):
        with pytest.raises(SystemExit):
            main(["--task", "lm", *argv])
    from es_kernels.demo.run import _with_noise

    with pytest.raises(ValueError, match="label noise"):
        _with_noise(object(), 0.4, 0)


@pytest.mark.slow
def test_demo_lm_end_to_end(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from es_kernels.demo import main, run

    monkeypatch.setitem(run.LM_QUICK, "lm_train_seqs", 128)
    monkeypatch.setitem(run.LM_QUICK, "lm_test_seqs", 32)
    argv = ["--task", "lm", "--full", "--quick", "--epochs", "2", "--seeds", "2", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SMOKE TEST" in out and "held-out loss" in out and "backward tokens" in out
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["complete"] and res["config"]["task"] == "lm" and list(res["datasets"]) == ["lm"]
    ds = res["datasets"]["lm"]
    assert ds["metric"] == "test_loss" and ds["n_train"] == 128 and ds["n_test"] == 32
    assert ds["tokens_per_sample"] == res["config"]["lm_seq_len"] - 1
    assert ds["corpus"]["train"]["files"] > ds["corpus"]["held_out"]["files"] > 0
    assert set(ds["summary"]) == set(run.LM_METHODS)
    assert ds["target_loss"] == pytest.approx(ds["summary"]["full"]["test_loss"]["mean"])
    assert ds["window_s"] == pytest.approx(ds["summary"]["es"]["wall_s"]["mean"])
    for m in run.LM_METHODS:
        s = ds["summary"][m]
        assert len(ds["runs"][m]) == 2 and "auc" in s and "time_to_target" in s and "loss_at_window" in s
        for r in ds["runs"][m]:
            assert 0 < r["test_loss"] < r["curve"][0][1]  # trained: below the start (about log 257)
            if not m.endswith("-time"):
                assert len(r["curve"]) == 3  # start + 2 epochs
    es, full = ds["summary"]["es"], ds["summary"]["full"]
    assert es["backward_samples"]["mean"] == full["backward_samples"]["mean"] / 4  # b/B = 1/4, every epoch
    assert 0 < es["scoring_share"]["mean"] < 1
    assert (tmp_path / "demo.png").stat().st_size > 1000


@pytest.mark.slow
def test_ablation_takes_the_lm_task(tmp_path):
    pytest.importorskip("transformers")
    from es_kernels.demo import run

    cfg = run.Config(seeds=1, threads=1, lm_train_seqs=128, lm_test_seqs=32)
    grid = {"beta1": "0.2", "beta2": "0.5", "lam": "1", "eps": "0", "ratio": "1/4"}
    res = run.run_ablation(cfg, tmp_path, grid=grid, tasks=run.parse_tasks("lm:1:0"), show_progress=False)
    assert res["complete"] and res["metrics"] == {"lm 1ep noise 0": "test_loss"}
    cell = res["cells"]["beta1=0.2 beta2=0.5 lam=1 eps=0 b/B=1/4"]["lm 1ep noise 0"]
    assert len(cell["final_loss"]) == 1 and cell["curve"][0][-1][2] == 128 // 4  # b = 16 of the LM's B = 64
    assert res["full"]["lm 1ep noise 0"][0]["curve"][-1][2] == 128
    assert res["chosen"] is not None and res["ranking"][0]["mean_final_acc"] is None
    assert "held-out loss" in (tmp_path / "ablation.md").read_text()
    with pytest.raises(ValueError, match="label noise"):
        run.parse_tasks("digits:1:0,lm:1:0.4")


def test_infobatch_rescales_under_a_process_group(tmp_path):
    """InfoBatch's step with the distributed samplers (what --nproc runs) scales the
    losses of the kept pruned-class samples by 1/(1-r), as in one process: in a
    gloo group of one, the same scaled losses, bit for bit."""
    import torch.distributed as dist

    from es_kernels import ESWPSampler, EvolvedSampler
    from es_kernels.demo.run import infobatch_losses
    from es_kernels.distributed import DistributedESWPSampler, DistributedEvolvedSampler

    n, B = 40, 8
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(4, n, generator=g)  # the loss of each sample in each epoch

    def run(es, pruner):
        out, raw = [], []
        for epoch in range(4):
            pruner.set_epoch(epoch)
            order = pruner.epoch_ids()
            for start in range(0, order.shape[0], B):
                ids = order[start : start + B]
                raw.append(losses[epoch, ids])
                out.append(infobatch_losses(es, ids, raw[-1].clone()))
        return torch.cat(out), torch.cat(raw)

    one = EvolvedSampler(n, B, beta1=0.0, beta2=1.0, seed=1)
    want, raw = run(one, ESWPSampler(one, num_epochs=4, prune_ratio=0.5))
    scaled = want != raw
    assert scaled.any() and torch.equal(want[scaled], 2 * raw[scaled])  # the epochs that prune rescale
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        es = DistributedEvolvedSampler(n, B, beta1=0.0, beta2=1.0, seed=1, meta_batch=B)
        got, _ = run(es, DistributedESWPSampler(es, num_epochs=4, prune_ratio=0.5))
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, want)


# ---------------------------------------------------------------- the default run, the verdict, the plot, the CLI
def _planned(monkeypatch, argv) -> object:
    """The Config that ``es-kernels demo ARGV`` would run (run_demo is not called)."""
    from es_kernels.demo import cli

    seen = []

    def fake(cfg, out, show_progress=True):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop main here

    monkeypatch.setattr(cli, "run_demo", fake)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    return seen[0]


def test_default_run_is_the_short_one_and_full_is_one_flag_away(monkeypatch):
    from es_kernels.demo.config import DEFAULT_METHODS, LM_METHODS, METHODS

    cfg = _planned(monkeypatch, [])
    assert cfg.seeds == 3 and cfg.methods == DEFAULT_METHODS and cfg.threads == 1 and cfg.clock == "process"
    assert set(DEFAULT_METHODS) == {"full", "uniform", "es", "eswp", "uniform-time"}
    assert cfg.datasets == ("digits",) and cfg.epochs == 30
    full = _planned(monkeypatch, ["--full"])
    assert full.seeds == 3 and full.methods == METHODS and full.threads == 1 and full.clock == "process"
    assert full.datasets == ("mnist1d", "digits") and full.mnist1d_samples == 20000
    assert _planned(monkeypatch, ["--full", "--seeds", "2", "--threads", "2"]).seeds == 2
    lm = _planned(monkeypatch, ["--task", "lm", "--full"])
    assert lm.methods == LM_METHODS and lm.seeds == 3
    # the schedule study's command line (bench/results/demo_schedule/run_study.sh) plans what it did
    study = [
        "--threads",
        "1",
        "--clock",
        "process",
        "--seeds",
        "3",
        "--methods",
        "full,es-frac",
        "--datasets",
        "mnist1d",
    ]
    study = _planned(monkeypatch, study)
    assert study.seeds == 3 and study.methods == ("full", "es-frac") and study.mnist1d_samples == 20000
    assert study.datasets == ("mnist1d",) and study.epochs == 30 and study.hidden == 1024


def test_help_names_every_option_and_its_default():
    from es_kernels.demo.cli import parser

    ap = parser()
    text = ap.format_help()
    for action in ap._actions:
        assert action.help, f"{action.option_strings} has no help"
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    flat = " ".join(text.split())
    for default in (
        "(default: 171;",
        "(default: 30;",
        "(default: 3)",
        "(default: digits; with --full mnist1d,digits)",
        "(default: demo_results)",
    ):
        assert default in flat, default
    assert "demo.md" in flat and "--full" in flat and "SIGTERM" in flat


def test_verdict_says_what_es_bought_in_one_sentence():
    from es_kernels.demo.summary import fair_reference, summarize, verdict

    runs = {
        "full": [_run([[0, 10, 0], [2, 70, 1000], [4, 80, 2000]])],
        "es": [_run([[0, 10, 0], [1, 80.5, 200], [2, 81, 400]])],
        "uniform-time": [_run([[0, 10, 0], [1, 75, 300], [2, 79, 600]])],
    }
    ds = {"summary": summarize(runs), **fair_reference(runs)}
    v = verdict("digits", ds)
    assert v == (
        "digits: ES reached full's final accuracy (80.0%) in 1 s (25% of full's time); "
        "uniform sampling given ES's time (2 s) did not reach it (final 79.00%)."
    )
    runs["uniform-time"] = [_run([[0, 10, 0], [1.5, 80, 300]])]
    runs["es"].append(_run([[0, 10, 0], [2, 70, 400]]))  # a second seed that misses
    ds = {"summary": summarize(runs), **fair_reference(runs)}
    assert "in 1 s (25% of full's time, 1 of 2 seeds)" in verdict("digits", ds)
    assert "reached it in 1.5 s (38% of full's time)" in verdict("digits", ds)
    runs["es"] = [_run([[0, 10, 0], [2, 70, 400]])]
    ds = {"summary": summarize(runs), **fair_reference(runs)}
    assert verdict("digits", ds).startswith("digits: ES did not reach full's final accuracy (80.0%) in its 1 epochs")
    assert verdict("digits", {"summary": summarize({"es": runs["es"]})}) is None  # no full: no target


def test_plot_y_range_is_the_band_where_methods_differ():
    from es_kernels.demo.report import y_band

    slow = ([0, 2, 4, 6, 8, 10], [10, 60, 90, 95, 96, 97])
    fast = ([0, 2, 4, 6], [10, 80, 96, 98])
    lo, hi = y_band([slow, fast], higher=True)
    assert lo == pytest.approx(60 - 0.05 * 38, abs=1e-5) and hi == pytest.approx(98 + 0.05 * 38, abs=1e-5)
    lo, hi = y_band([([0, 0.5, 2, 4], [3.0, 2.5, 2.0, 1.5])], higher=False)  # a loss: the best to the value at 20%
    assert lo == pytest.approx(1.5 - 0.05, abs=1e-5) and hi == pytest.approx(2.5 + 0.05, abs=1e-5)


@pytest.mark.slow
def test_sigterm_stops_the_demo_like_ctrl_c(tmp_path):
    """kill (SIGTERM) during the third run: exit 130, the JSON says
    interrupted, and the tables, the plot and the verdict come from what
    finished."""
    import subprocess
    import sys

    script = f"""
import os, signal, sys
from es_kernels.demo import cli, run
real, n = run.train, [0]
def train(*a, **kw):
    n[0] += 1
    if n[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **kw)
run.train = train
sys.exit(cli.main({TINY + ["--datasets", "digits", "--out", str(tmp_path)]!r}))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert p.returncode == 130, p.stderr[-2000:]
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["interrupted"] and not res["complete"]
    assert [m for m, rs in res["datasets"]["digits"]["runs"].items() if rs] == ["full", "uniform"]
    assert "interrupted" in p.stdout and "verdict" not in p.stdout  # ES did not run: no verdict
    assert (tmp_path / "demo.png").stat().st_size > 1000 and "PARTIAL" in (tmp_path / "demo.md").read_text()


def test_eta_calibration_leaves_out_the_one_time_costs(monkeypatch):
    """A run costs 30 s once (warm-up, model, first evaluation) plus 1 s an
    epoch: the calibration records 1 s an epoch, not 31."""
    from es_kernels.demo import loop, run

    monkeypatch.setattr(loop, "train", lambda method, data, cfg, seed: {"elapsed_s": 30.0 + cfg.epochs})
    eta = run.Eta(512)
    run.calibrate(run.Config(), eta, {"digits": None})
    assert eta.estimate(("digits", "full", 512), 30) == pytest.approx(30.0)
    assert run.fmt_eta(eta.remaining([(("digits", "uniform", 171), 30)])) == "ETA 10 s"
