"""Stateful fuzz of the samplers (issue 8): random sequences of API calls,
good and bad, on EvolvedSampler + ESWPSampler (the C++ CPU path), against a
pure-Python model of docs/spec.md sections 3, 8 and 11.

After every step: the state is finite-or-NaN (d finite, s finite or NaN) and
equals the model's bit for bit (float32 update of section 3, serial over the
positions as the CPU kernel runs them, so duplicates are modelled too);
``errors`` equals the model's count (bad id -> errors[0]; non-finite loss or
an overflowing update -> errors[1], per observation); the step, the epochs,
the plan of the epoch and the scales in force follow section 11; a call that
raises changed nothing (full snapshots). ``verify_resume`` replays every call
since the last checkpoint on a fresh sampler pair loaded from it and requires
identical outputs and final state.

Size: ``EXAMPLES`` sequences of up to ``STEPS`` calls (about 10 calls a
sequence on average, so well over 10,000 calls a run), deterministic
(``derandomize=True``).
"""

import copy
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_reliability import assert_same, bits, pr_snapshot, same_bits

import es_kernels as ek

N, MB = 12, 3
CFG = dict(beta1=0.3, beta2=0.6, lam=1.5, eps=0.2, seed=7, w_min=1e-6)
PR_CFG = dict(num_epochs=5, prune_ratio=0.5, anneal_frac=0.25)
EXAMPLES, STEPS = 700, 20

F32 = np.float32
LOSS = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e38, -1e38, 0.0, -0.0, 1e-30, 1e39]),
    st.floats(-2.0, 10.0, width=32),
)
ID = st.integers(-2, N + 1)
PAIRS = st.lists(st.tuples(ID, LOSS), max_size=6)  # (id, loss) of each position; ids may repeat
BAD_INT = st.sampled_from([-1, -2, 2**63 - 1, 2**63, 2**64, 10**30, 1.5, "2", None, True])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The results do not depend on the thread count; one thread avoids waking
    a pool for tiny tensors on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Model:
    """Pure-Python model: the state (float32), errors, step, epochs, plans."""

    def __init__(self):
        b1, b2 = CFG["beta1"], CFG["beta2"]
        self.c1, self.k1, self.c2, self.k2 = F32(b1), F32(1.0 - b1), F32(b2), F32(1.0 - b2)
        self.lm, self.wm = F32(CFG["lam"]), F32(CFG["w_min"])
        self.s = [F32("nan")] * N
        self.d = [F32(0.0)] * N
        self.errors = [0, 0]
        self.step = 0
        self.next_epoch = 0  # ESWPSampler.epoch
        self.es_epoch = 0
        self.active = None  # [epoch, ids, scale, pos] of the epoch in progress
        self.pending = None  # the plan the next iter() runs (from len() or a checkpoint)
        self.scale = None  # the scales in force (bits)
        self.it = None  # the plan the live iterator belongs to

    def update(self, ids, losses, scored=None):
        """Section 3, serially: returns the float32 weights. A position without
        ``scored`` (a row with no target to score, section 6) is skipped: weight 0."""
        out = []
        scored = [True] * len(ids) if scored is None else scored
        with np.errstate(all="ignore"):
            for i, x, sc in zip(ids, losses, scored):
                if not sc:
                    out.append(F32(0.0))
                    continue
                if i < 0 or i >= N:
                    self.errors[0] += 1
                    out.append(self.wm)
                    continue
                l = F32(x)
                if not math.isfinite(l):
                    self.errors[1] += 1
                    out.append(self.wm)
                    continue
                s, d = self.s[i], self.d[i]
                if math.isnan(s):
                    s1, d1 = l, F32(0.0)
                else:
                    s1 = self.c1 * s + self.k1 * l
                    d1 = self.c2 * d + self.k2 * (l - s)
                wi = s1 + self.lm * d1
                wf = self.wm if wi < self.wm else wi
                if not (math.isfinite(s1) and math.isfinite(d1) and math.isfinite(wf)):
                    self.errors[1] += 1
                    out.append(self.wm)
                    continue
                self.s[i], self.d[i] = s1, d1
                out.append(F32(wf))
        return out

    def state(self):
        return np.stack([np.array(self.s, dtype=F32), np.array(self.d, dtype=F32)], axis=1)


def key(t):
    """A tensor's exact content as plain data (comparable with ==), or None."""
    return None if t is None else (str(t.dtype), tuple(t.shape), t.detach().cpu().contiguous().numpy().tobytes())


def f32_key(values):
    return key(torch.from_numpy(np.array(values, dtype=F32)))


def check_plan(ids, scale, r=PR_CFG["prune_ratio"]):
    """A plan's structure (section 7): distinct ids in range, the kept ids are
    exactly those of nonzero scale, scales in {0, 1, f32(1 / (1 - r))}."""
    ids = ids.tolist()
    assert len(set(ids)) == len(ids) and all(0 <= i < N for i in ids)
    assert set(ids) == set(torch.nonzero(scale > 0).flatten().tolist())
    assert set(scale.unique().tolist()) <= {0.0, 1.0, float(F32(1.0 / (1.0 - r)))}


class World:
    """The system under test: a sampler pair and the loop's live iterator."""

    def __init__(self, cfg=CFG, pr_cfg=PR_CFG):
        self.es = ek.EvolvedSampler(N, MB, **cfg)
        self.pr = ek.ESWPSampler(self.es, **pr_cfg)
        self.it = None

    def do(self, op, *args):
        """Run one call; return its outcome as plain data (or the error type)."""
        try:
            return getattr(self, "op_" + op)(*args)
        except (ValueError, RuntimeError) as e:
            return ("raised", type(e).__name__)

    def op_select(self, ids, losses, ids_dtype, loss_dtype):
        sel = self.es.select(torch.tensor(ids, dtype=ids_dtype), losses=torch.tensor(losses, dtype=loss_dtype))
        return ("sel", sel.positions.tolist(), key(sel.scales), key(sel.losses), key(sel.weights))

    def op_select_logits(self, ids, logits, targets):
        sel = self.es.select(
            torch.tensor(ids, dtype=torch.int64),
            logits=torch.tensor(logits, dtype=torch.float32).reshape(len(ids), 2),
            targets=torch.tensor(targets, dtype=torch.int64),
        )
        return ("sel", sel.positions.tolist(), key(sel.scales), key(sel.losses), key(sel.weights))

    def op_update(self, ids, losses):
        w = ek.es_update(
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(losses, dtype=torch.float32),
            self.es.state,
            beta1=CFG["beta1"],
            beta2=CFG["beta2"],
            lam=CFG["lam"],
            w_min=CFG["w_min"],
        )
        return ("w", key(w))

    def op_bad_select(self, kind):
        ids, losses = torch.arange(3), torch.rand(3)
        calls = {
            "2d ids": lambda: self.es.select(ids.reshape(3, 1), losses=losses),
            "0-d ids": lambda: self.es.select(ids[0], losses=losses[:1]),
            "int ids": lambda: self.es.select(1, losses=losses[:1]),
            "float ids": lambda: self.es.select(ids.float(), losses=losses),
            "meta ids": lambda: self.es.select(torch.arange(3, device="meta"), losses=losses),
            "short losses": lambda: self.es.select(ids, losses=losses[:2]),
            "int losses": lambda: self.es.select(ids, losses=ids),
            "both": lambda: self.es.select(ids, losses=losses, logits=torch.rand(3, 2), targets=ids),
            "neither": lambda: self.es.select(ids),
            "no targets": lambda: self.es.select(ids, logits=torch.rand(3, 2)),
            "bad targets dtype": lambda: self.es.select(ids, logits=torch.rand(3, 2), targets=ids.float()),
            "bad smoothing": lambda: self.es.select(ids, logits=torch.rand(3, 2), targets=ids, label_smoothing=2.0),
        }
        return calls[kind]()

    def op_iter(self):
        self.it = iter(self.pr)
        return ("iter", self.pr.epoch)

    def op_take(self, k):
        if self.it is None:
            return ("take", [])
        return ("take", [i for _, i in zip(range(k), self.it)])

    def op_len(self):
        return ("len", len(self.pr))

    def op_set_epoch(self, e):
        self.pr.set_epoch(e)
        return ("set_epoch", e)

    def op_reset_errors(self):
        self.es.state.reset_errors()
        return ("reset",)

    def checkpoint(self, position):
        """Both state_dicts through torch.save, and whether the loop was mid-epoch."""
        es_sd = self.es.state_dict()
        pr_sd = self.pr.state_dict(position)
        buf = io.BytesIO()
        torch.save({"es": es_sd, "pr": pr_sd}, buf)
        return buf.getvalue()

    def load(self, blob, live):
        """A resumed loop: load both, and restart its iterator if it was mid-epoch."""
        ck = torch.load(io.BytesIO(blob))
        self.es.load_state_dict(ck["es"])
        self.pr.load_state_dict(ck["pr"])
        self.it = iter(self.pr) if live else None

    def snapshot(self):
        return pr_snapshot(self.pr)

    def comparable(self):
        """What two equivalent runs share (not object identities)."""
        pr, es = self.pr, self.es

        def plan(p):
            return None if p is None else (p.epoch, p.ids.tolist(), key(p.scale), p.pos)

        # an epoch in progress whose ids were all yielded is complete: a
        # checkpoint keeps only its length (what len() reports until iter())
        done = pr._active and pr._plan is not None and pr._plan.pos >= len(pr._plan)
        running = pr._active and not done
        finished = len(pr._plan) if done else (pr._finished if not pr._active and pr._next is None else None)
        return {
            "state": key(es.state.tensor),
            "errors": es.state.errors.tolist(),
            "step": es.step,
            "es_epoch": es.epoch,
            "scale": key(es.scale),
            "epoch": pr.epoch,
            "active": running,
            "plan": plan(pr._plan) if running else None,
            "next": plan(pr._next),
            "finished": finished,
            "live": self.it is not None and running,
        }


# the corruptions of corrupt(), by the sampler whose saved dict they touch
ES_CORRUPTIONS = (
    "s inf",
    "d nan",
    "errors negative",
    "step huge",
    "beta1 nan",
    "mini_batch 0",
    "scale short",
    "es missing",
)
PR_CORRUPTIONS = ("epoch huge", "position huge", "kept bad", "pr extra", "prune_ratio 1")


def corrupt(blob, kind):
    """The checkpoint with other valid settings (a partial write would show)
    and one bad entry."""
    ck = torch.load(io.BytesIO(blob))
    es, pr = ck["es"], ck["pr"]
    es.update(
        mini_batch=5,
        beta1=0.9,
        beta2=0.1,
        lam=0.0,
        eps=0.0,
        seed=99,
        w_min=1e-3,
        select_mode="topk",
        step=es["step"] + 3,
        epoch=es["epoch"] + 1,
        scale=torch.full((N,), 2.0),
    )
    es["state"] = {k: v + 1 for k, v in es["state"].items()}
    pr.update(num_epochs=9, prune_ratio=0.25, anneal_frac=0.5, rescale=False, seed=5, epoch=pr["epoch"] + 1)
    if kind == "s inf":
        es["state"]["s"] = es["state"]["s"].clone().fill_(float("inf"))
    elif kind == "d nan":
        es["state"]["d"] = es["state"]["d"].clone().fill_(float("nan"))
    elif kind == "errors negative":
        es["state"]["errors"] = torch.tensor([0, -1])
    elif kind == "step huge":
        es["step"] = 2**64
    elif kind == "beta1 nan":
        es["beta1"] = float("nan")
    elif kind == "mini_batch 0":
        es["mini_batch"] = 0
    elif kind == "scale short":
        es["scale"] = torch.ones(N - 1)
    elif kind == "es missing":
        del es["seed"]
    elif kind == "epoch huge":
        pr["epoch"] = 2**63
    elif kind == "position huge":
        pr["position"] = 10**20
    elif kind == "kept bad":
        pr["kept"] = torch.tensor([-1, -1])
    elif kind == "pr extra":
        pr["zzz"] = 1
    elif kind == "prune_ratio 1":
        pr["prune_ratio"] = 1.0
    return ck


class SamplerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.w = World()
        self.m = Model()
        self.ck = None  # (blob, live, model of the resumed run, exact: the run continued from it)
        self.log = []  # (op, args, outcome) since the checkpoint
        self.steps = 0

    # ---------------------------------------------------------- helpers

    def run(self, op, *args):
        """Run a call on the world; a call that raises must change nothing."""
        before = self.w.snapshot()
        out = self.w.do(op, *args)
        if out[0] == "raised":
            assert_same(before, self.w.snapshot())
        self.log.append((op, args, out))
        self.steps += 1
        return out

    def compute_plan(self, epoch):
        """The plan the sampler computed (structure checked; its content is
        the C++ op's, compared with the reference in test_prune)."""
        p = self.w.pr._next if not self.w.pr._active else self.w.pr._plan
        assert p.epoch == epoch
        check_plan(p.ids, p.scale)
        return [p.epoch, p.ids.tolist(), bits(p.scale), p.pos]

    def expect_selection(self, out, ids, losses_used, scored=None):
        w = self.m.update(ids, losses_used, scored)
        self.m.step += 1
        _, pos, scales, _, weights = out
        b = min(MB, len(ids))
        assert len(pos) == b and pos == sorted(set(pos)) and all(0 <= p < len(ids) for p in pos)
        assert weights == f32_key(w)
        sc = (
            [1.0] * b
            if self.m.scale is None
            else [self.m.scale[2].view(torch.float32)[ids[p]].item() if 0 <= ids[p] < N else 1.0 for p in pos]
        )
        assert scales == f32_key(sc)

    # ---------------------------------------------------------- rules

    @rule(
        pairs=PAIRS,
        ids_dtype=st.sampled_from([torch.int64, torch.int32]),
        loss_dtype=st.sampled_from([torch.float32, torch.float64]),
    )
    def select(self, pairs, ids_dtype, loss_dtype):
        ids, losses = [p[0] for p in pairs], [p[1] for p in pairs]
        out = self.run("select", ids, losses, ids_dtype, loss_dtype)
        assert out[0] == "sel"
        self.expect_selection(out, ids, losses)

    @rule(rows=st.lists(st.tuples(ID, LOSS, LOSS, st.sampled_from([0, 1, 2, -1, -100])), min_size=1, max_size=5))
    def select_logits(self, rows):
        ids = [r[0] for r in rows]
        logits = [x for r in rows for x in r[1:3]]  # [B, 2]; targets 2 and -1 are out of range, -100 ignored
        out = self.run("select_logits", ids, logits, [r[3] for r in rows])
        assert out[0] == "sel"
        got = np.frombuffer(out[3][2], dtype=F32).tolist()  # the op's losses are what the state observed
        self.expect_selection(out, ids, got, [r[3] != -100 for r in rows])

    @rule(pairs=PAIRS)
    def update(self, pairs):
        ids, losses = [p[0] for p in pairs], [p[1] for p in pairs]
        out = self.run("update", ids, losses)
        with np.errstate(over="ignore"):
            w = self.m.update(ids, [F32(x) for x in losses])
        assert out[1] == f32_key(w)

    @rule(
        kind=st.sampled_from(
            [
                "2d ids",
                "0-d ids",
                "int ids",
                "float ids",
                "meta ids",
                "short losses",
                "int losses",
                "both",
                "neither",
                "no targets",
                "bad targets dtype",
                "bad smoothing",
            ]
        )
    )
    def bad_select(self, kind):
        assert self.run("bad_select", kind) == ("raised", "ValueError")

    @rule()
    def start_iteration(self):
        out = self.run("iter")
        m = self.m
        if m.errors != [0, 0]:
            assert out == ("raised", "RuntimeError")
            return
        plan = m.pending if m.pending is not None else self.compute_plan(m.next_epoch)
        m.pending = None
        m.active, m.it = plan, plan
        m.scale = plan[2]
        m.es_epoch = plan[0]
        m.next_epoch = plan[0] + 1
        assert out == ("iter", m.next_epoch)

    @rule(k=st.integers(0, 9))
    def take(self, k):
        out = self.run("take", k)
        m = self.m
        want = []
        if m.it is not None and m.it is m.active:
            want = m.active[1][m.active[3] : m.active[3] + k]
            m.active[3] += len(want)
        assert out == ("take", want)

    @rule()
    def length(self):
        out = self.run("len")
        m = self.m
        if m.active is None:
            if m.pending is None:
                m.pending = self.compute_plan(m.next_epoch)
            plan = m.pending
        else:
            plan = m.active
        assert out == ("len", len(plan[1]))

    @rule(e=st.one_of(st.integers(0, 6), BAD_INT))
    def set_epoch(self, e):
        out = self.run("set_epoch", e)
        good = isinstance(e, int) and not isinstance(e, bool) and 0 <= e < 2**63 - 1
        if not good:
            assert out == ("raised", "ValueError")
            return
        m = self.m
        if m.pending is not None and m.pending[0] != e:
            m.pending = None
        m.next_epoch, m.active = e, None

    @rule()
    def reset_errors(self):
        self.run("reset_errors")
        self.m.errors = [0, 0]

    @rule(position=st.one_of(st.none(), st.integers(0, 12)), reset=st.booleans())
    def checkpoint(self, position, reset):
        if reset:  # a loop that fixed its input clears the counts (state_dict refuses them)
            self.reset_errors()
        m = self.m
        before = self.w.snapshot()
        try:
            blob = self.w.checkpoint(position)
        except (ValueError, RuntimeError) as e:
            assert_same(before, self.w.snapshot())
            plan = m.active if m.active is not None else m.pending
            hi = 0 if plan is None else plan[3]
            assert (isinstance(e, RuntimeError) and m.errors != [0, 0]) or (
                isinstance(e, ValueError) and m.errors == [0, 0] and position > hi
            )
            return
        assert m.errors == [0, 0]
        live = m.it is not None and m.it is m.active
        sd = torch.load(io.BytesIO(blob))["pr"]
        plan = m.active if m.active is not None else m.pending
        pos = (plan[3] if plan else 0) if position is None else position
        if plan is not None and pos < len(plan[1]):
            assert (sd["epoch"], sd["position"], sd["kept"].tolist()) == (plan[0], pos, plan[1])
            assert same_bits(bits(sd["scale"]), plan[2])
        else:
            assert (sd["epoch"], sd["position"], sd["kept"], sd["scale"]) == (m.next_epoch, 0, None, None)
            live = False
        exact = position is None or position == (plan[3] if plan else 0)
        self.ck = (blob, live, self.resumed_model(sd, live), exact)
        STATS["checkpoints"] += 1
        self.log = []
        self.steps += 1

    def resumed_model(self, sd, live):
        """The model of a run resumed from ``sd``: the same, with the plan restored."""
        m = copy.deepcopy(self.m)
        m.active = m.pending = m.it = None
        if sd["kept"] is not None:
            plan = [sd["epoch"], sd["kept"].tolist(), bits(sd["scale"]), sd["position"]]
            if live:
                m.active = m.it = plan
                m.next_epoch = plan[0] + 1
                m.es_epoch = plan[0]
                m.scale = plan[2]
            else:
                m.pending = plan
                m.next_epoch = plan[0]
        else:
            m.next_epoch = sd["epoch"]
        return m

    @precondition(lambda self: self.ck is not None)
    @rule()
    def load_checkpoint(self):
        blob, live, model, _ = self.ck
        self.w.load(blob, live)
        self.m = copy.deepcopy(model)
        self.ck = (blob, live, model, True)  # this run now continues from it
        STATS["loads"] += 1
        self.log = []
        self.steps += 1

    @precondition(lambda self: self.ck is not None)
    @rule(kind=st.sampled_from(ES_CORRUPTIONS + PR_CORRUPTIONS))
    def load_corrupt(self, kind):
        ck = corrupt(self.ck[0], kind)
        side = "es" if kind in ES_CORRUPTIONS else "pr"
        before = self.w.snapshot()
        with pytest.raises(ValueError):
            (self.w.es if side == "es" else self.w.pr).load_state_dict(ck[side])
        assert_same(before, self.w.snapshot())
        self.steps += 1
        STATS["corrupt loads"] += 1

    @precondition(lambda self: self.ck is not None and self.ck[3])
    @rule()
    def verify_resume(self):
        """A fresh pair (other settings) loaded from the checkpoint and fed the
        same calls gives the same outcomes and ends in the same state."""
        blob, live, _, _ = self.ck
        other = World(cfg=dict(CFG, beta1=0.9, seed=1, eps=0.0), pr_cfg=dict(num_epochs=2, prune_ratio=0.1))
        other.load(blob, live)
        for op, args, out in self.log:
            assert other.do(op, *args) == out, (op, args)
        STATS["resumes verified"] += 1
        STATS["calls replayed"] += len(self.log)
        a, b = self.w.comparable(), other.comparable()
        for k in a:
            assert a[k] == b[k], k

    # ---------------------------------------------------------- invariants

    @invariant()
    def state_matches_the_model(self):
        es, m = self.w.es, self.m
        t = es.state.tensor
        s, d = t[:, 0], t[:, 1]
        assert bool((torch.isfinite(s) | torch.isnan(s)).all()) and bool(torch.isfinite(d).all())
        want = torch.from_numpy(m.state())
        assert torch.equal(torch.isnan(t), torch.isnan(want))
        assert torch.equal(t.nan_to_num(0.5).view(torch.int32), want.nan_to_num(0.5).view(torch.int32))
        assert es.state.errors.tolist() == m.errors
        assert es.step == m.step and es.epoch == m.es_epoch
        pr = self.w.pr
        assert pr.epoch == m.next_epoch and pr._active == (m.active is not None)
        assert same_bits(bits(es.scale), m.scale)
        if m.active is not None:
            assert pr._plan.ids.tolist() == m.active[1] and pr._plan.pos == m.active[3]
            assert es.scale is pr._plan.scale
        assert (pr._next is None) == (m.pending is None)
        if m.pending is not None:
            assert pr._next.ids.tolist() == m.pending[1] and pr._next.pos == m.pending[3]

    def teardown(self):
        if self.ck is not None and self.ck[3] and self.log:  # every sequence ends with a resume check
            self.verify_resume()
        STATS["examples"] += 1
        STATS["calls"] += self.steps


STATS = {
    "examples": 0,
    "calls": 0,
    "checkpoints": 0,
    "loads": 0,
    "corrupt loads": 0,
    "resumes verified": 0,
    "calls replayed": 0,
}


SamplerMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True
)
TestSamplerFuzz = SamplerMachine.TestCase


def test_fuzz_ran_enough_calls():
    """Runs after the machine (file order): at least 10,000 calls in total."""
    if STATS["examples"] == 0:
        pytest.skip("the fuzz machine did not run in this session")
    print(STATS)
    assert STATS["examples"] >= EXAMPLES and STATS["calls"] >= 10_000, STATS
    assert STATS["resumes verified"] >= EXAMPLES // 4 and STATS["calls replayed"] >= EXAMPLES, STATS
    assert STATS["corrupt loads"] >= EXAMPLES // 10, STATS
