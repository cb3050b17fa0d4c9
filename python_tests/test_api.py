"""The public API: validation of bad input (docs/spec.md section 8), check(),
the checked mode, ESState, opcheck and torch.compile; one default per
setting at every entry point, and signatures written out."""

import inspect
import io

import pytest
import torch
from conftest import new_state

import es_kernels as ek
from es_kernels import _ops, distributed, functional, lm, reference, sampler, state


def fresh(n=16):
    st = ek.ESState(n)
    ek.es_step_from_losses(torch.rand(8), torch.arange(8), st, 4)
    return st


def snapshot(st):
    return {k: v.clone() for k, v in st.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k].nan_to_num(-1.0), b[k].nan_to_num(-1.0)) for k in a)


LOGITS, TARGETS, IDS = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.arange(8)

BAD_STEP_CALLS = [  # (kwargs overriding a good es_step call, the argument the error names)
    (dict(logits=torch.randn(8)), "logits"),
    (dict(logits=torch.randn(8, 5).double()), "logits"),
    (dict(logits=torch.randint(0, 3, (8, 5))), "logits"),
    (dict(targets=torch.randint(0, 5, (7,))), "targets"),
    (dict(targets=torch.rand(8)), "targets"),
    (dict(ids=torch.arange(7)), "ids"),
    (dict(ids=torch.arange(8).float()), "ids"),
    (dict(ids=torch.arange(8).reshape(2, 4)), "ids"),
    (dict(b=9), "b"),
    (dict(b=-1), "b"),
    (dict(b=2.0), "b"),
    (dict(beta1=1.5), "beta1"),
    (dict(beta2=-0.1), "beta2"),
    (dict(beta1=float("nan")), "beta1"),
    (dict(select_mode="greedy"), "select_mode"),
    (dict(select_mode="topk", eps=0.5), "eps"),
    (dict(eps=1.5), "eps"),
    (dict(lam=-1.0), "lam"),
    (dict(lam=float("inf")), "lam"),
    (dict(w_min=1e39), "w_min"),
    (dict(seed=2**63), "seed"),
    (dict(step=torch.tensor([3])), "step"),
    (dict(step=torch.tensor(3.0)), "step"),
    (dict(step=torch.tensor(3, dtype=torch.int32)), "step"),
    (dict(advance_step=True), "advance_step"),
    (dict(ignore_index=2**64), "ignore_index"),
    (dict(logits=torch.randn(8, 0)), "logits"),
    (dict(seed=-1), "seed"),
    (dict(label_smoothing=2.0), "label_smoothing"),
    (dict(w_min=0.0), "w_min"),
    (dict(ids=torch.arange(8, device="meta")), "ids"),
]


@pytest.mark.parametrize("override,name", BAD_STEP_CALLS)
def test_bad_step_input_names_argument_and_keeps_state(override, name):
    st = fresh()
    before = snapshot(st)
    kw = dict(
        logits=LOGITS,
        targets=TARGETS,
        ids=IDS,
        b=4,
        beta1=0.2,
        beta2=0.9,
        select_mode="sample",
        seed=0,
        step=0,
        label_smoothing=0.0,
        w_min=1e-8,
    )
    kw.update(override)
    args = [kw.pop(k) for k in ("logits", "targets", "ids")]
    b = kw.pop("b")
    with pytest.raises(ValueError, match=name):
        ek.es_step(*args, st, b, **kw)
    assert same(before, snapshot(st))


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda st: ek.es_step_from_losses(torch.rand(7), torch.arange(8), st, 2), "losses"),
        (lambda st: ek.es_step_from_losses(torch.arange(8), torch.arange(8), st, 2), "losses"),
        (lambda st: ek.es_update(torch.arange(8), torch.rand(8, 1), st), "losses"),
        (lambda st: ek.es_step_from_losses(torch.rand(8), torch.arange(8), st.s, 2), "state"),
        (
            lambda st: ek.es_step_from_losses(torch.rand(8), torch.arange(8), st, 2, step=torch.tensor(0).expand(())),
            None,
        ),
        (
            lambda st: ek.es_step_from_losses(
                torch.rand(8), torch.arange(8), st, 2, mask=torch.ones(8, dtype=torch.bool)
            ),
            "mask",
        ),
        (lambda st: ek.es_step_from_losses(torch.rand(8, 3), torch.arange(8), st, 2, mask=torch.ones(8, 3)), "mask"),
        (
            lambda st: ek.es_step_from_losses(
                torch.rand(8, 3), torch.arange(8), st, 2, mask=torch.ones(8, 2, dtype=torch.bool)
            ),
            "mask",
        ),
        (lambda st: ek.es_step_from_losses(torch.rand(8, 3, 1), torch.arange(8), st, 2), "losses"),
        (lambda st: ek.es_step_from_losses(torch.rand(8, 3), torch.arange(8), st, 2), None),
        (lambda st: ek.weighted_select(torch.rand(4), 5), "b"),
        (lambda st: ek.weighted_select(torch.rand(4, 1), 1), "weights"),
        (lambda st: ek.weighted_select(torch.arange(4), 1), "weights"),
        (lambda st: ek.eswp_prune(st, 1.0), "prune_ratio"),
        (lambda st: ek.eswp_prune(st, -0.1), "prune_ratio"),
        (lambda st: ek.eswp_prune(st, 0.5, num_epochs=0), "num_epochs"),
        (lambda st: ek.eswp_prune(st, 0.5, anneal_frac=1.5), "anneal_frac"),
        (lambda st: ek.per_sample_cross_entropy(torch.randn(2, 3, 4, 5), torch.zeros(2, 3, 4).long()), "logits"),
    ],
)
def test_other_bad_input(call, name):
    st = fresh()
    before = snapshot(st)
    if name is None:  # a good call (the list's controls)
        call(st)
        return
    with pytest.raises(ValueError, match=name):
        call(st)
    assert same(before, snapshot(st))


def test_expanded_state_is_refused_before_writing():
    st = ek.ESState(1)
    st.tensor = st.tensor.expand(4, 2)  # 4 rows, one memory row: cannot be written in place
    with pytest.raises(ValueError, match="state is expanded"):
        ek.es_update(torch.arange(2), torch.rand(2), st)
    assert torch.isnan(st.s).all()
    st = ek.ESState(4)
    st.errors = torch.zeros(1, dtype=torch.long).expand(2)
    with pytest.raises(ValueError, match="errors is expanded"):
        ek.es_update(torch.arange(2), torch.rand(2), st)
    assert torch.isnan(st.s).all()


def test_direct_op_call_is_guarded_too():
    st, e = new_state(8)
    with pytest.raises(ValueError, match="b must be"):
        torch.ops.es_kernels.es_step_from_losses(torch.rand(4), torch.arange(4), st, e, 5, 0.2, 0.9)
    with pytest.raises(ValueError, match="losses"):
        torch.ops.es_kernels.es_update(torch.arange(4), torch.rand(3), st, e, 0.2, 0.9)


def test_check_reports_bad_values_and_state_is_untouched():
    st = ek.ESState(10)
    ek.es_step_from_losses(torch.rand(4), torch.arange(4), st, 2)
    before = snapshot(st)
    ek.es_step_from_losses(torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([10, 1, -3]), st, 1)
    assert torch.equal(st.s.nan_to_num(-1), before["s"].nan_to_num(-1))
    with pytest.raises(RuntimeError, match=r"2 id\(s\) out of range \[0, 10\) and 1 non-finite"):
        st.check()
    st.reset_errors()
    st.check()


def test_checked_mode(monkeypatch):
    st = ek.ESState(10)
    monkeypatch.setenv("ES_KERNELS_CHECKED", "1")
    with pytest.raises(RuntimeError, match="distinct"):
        ek.es_step_from_losses(torch.rand(3), torch.tensor([1, 2, 1]), st, 1)
    assert torch.isnan(st.s).all()  # refused before anything was written
    with pytest.raises(RuntimeError, match="non-finite"):
        ek.es_step_from_losses(torch.tensor([1.0, float("inf")]), torch.tensor([1, 2]), st, 1)
    monkeypatch.delenv("ES_KERNELS_CHECKED")
    ek.es_step_from_losses(torch.rand(3), torch.tensor([1, 2, 1]), st, 1)  # unchecked: no error


def test_empty_meta_batch_and_noncontiguous():
    st = fresh()
    before = snapshot(st)
    r = ek.es_step(torch.empty(0, 5), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), st, 0)
    assert r.positions.shape == (0,) and r.losses.shape == (0,) and r.weights.shape == (0,)
    assert same(before, snapshot(st))
    logits = torch.randn(5, 16)[:, ::2]
    ids = torch.arange(20)[::2]
    r = ek.es_step(logits, torch.randint(0, 8, (5, 2))[:, 0], ids[:5], st, 2)
    assert r.positions.shape == (2,)


def test_state_round_trip_through_torch_save():
    st = fresh(32)
    ek.es_update(torch.tensor([30, 31]), torch.tensor([float("nan"), 1.0]), st)
    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    other = ek.ESState(32)
    other.load_state_dict(torch.load(buf))
    assert same(st.state_dict(), other.state_dict())
    assert other.errors.tolist() == [0, 1]
    # both continue identically
    a = ek.es_step_from_losses(torch.rand(8), torch.arange(8, 16), st, 3, step=1)
    b = ek.es_step_from_losses(a.losses, torch.arange(8, 16), other, 3, step=1)
    assert torch.equal(a.positions, b.positions) and same(st.state_dict(), other.state_dict())


def test_load_state_dict_validates_before_writing():
    st = fresh(16)
    before = snapshot(st)
    bad = snapshot(st)
    bad["d"] = torch.zeros(15)
    with pytest.raises(ValueError, match="'d'"):
        st.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing 'errors'"):
        st.load_state_dict({"s": before["s"], "d": before["d"]})
    assert same(before, snapshot(st))
    with pytest.raises(ValueError, match="dtype"):
        ek.ESState(4, dtype=torch.float16)


def test_prune_result():
    st = ek.ESState(100)
    ek.es_update(torch.arange(100), torch.rand(100), st)
    res = ek.eswp_prune(st, 0.5, seed=1)
    kept = res.kept_ids
    assert kept.shape == (int(res.num_kept),) and len(set(kept.tolist())) == kept.numel()


def op_samples():
    st, e = new_state(20, seed=1)
    logits, targets = torch.randn(6, 7), torch.randint(0, 7, (6,))
    seq_logits, seq_targets = torch.randn(3, 4, 7).bfloat16(), torch.randint(0, 7, (3, 4))
    ids = torch.tensor([3, 0, 7, 19, 12, 5])
    return [
        ("per_sample_cross_entropy", (logits, targets, -100, 0.1)),
        ("per_sample_cross_entropy", (seq_logits, seq_targets, -100, 0.0)),
        ("es_update", (ids, torch.rand(6), st, e, 0.2, 0.9, 1.5, 1e-8)),
        ("weighted_select", (torch.rand(9), 4, "sample", 1, 2)),
        ("weighted_select", (torch.rand(9), 4, "sample", 0, 0, torch.tensor(3), torch.tensor(4), 0.25)),
        ("weighted_select", (torch.rand(9), 4, "sample", 1, 2, None, None, 0.0, 2**40 + 5)),
        ("weighted_select", (torch.rand(9), 4, "sample", 0, 0, torch.tensor(3), torch.tensor(4), 0.25, 4096)),
        ("es_step_from_losses", (torch.rand(6), ids, st, e, 3, 0.2, 0.9, "topk", 0, 0)),
        (
            "es_step_from_losses",
            (
                torch.rand(6),
                ids,
                st,
                e,
                3,
                0.2,
                0.9,
                "sample",
                0,
                0,
                torch.tensor(5),
                torch.tensor(2),
                True,
                1.0,
                0.5,
                1e-8,
            ),
        ),
        (
            "es_step",
            (
                logits,
                targets,
                ids,
                st,
                e,
                3,
                0.2,
                0.9,
                "sample",
                1,
                0,
                None,
                torch.tensor(7),
                True,
                -100,
                0.0,
                0.5,
                0.1,
                1e-8,
            ),
        ),
        ("eswp_prune", (st, 0.5, 0, 0, 4, 0.125, True)),
    ]


@pytest.mark.parametrize("name,args", op_samples(), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.es_kernels, name).default, args)


def test_torch_compile_traces_the_step():
    st = ek.ESState(64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(logits, targets, ids, state, e):
        return torch.ops.es_kernels.es_step(logits, targets, ids, state, e, 4, 0.2, 0.9, "sample", 0, 0)

    logits, targets, ids = torch.randn(16, 10), torch.randint(0, 10, (16,)), torch.arange(16)
    pos, losses, w = step(logits, targets, ids, st.tensor, st.errors)
    assert pos.shape == (4,) and not torch.isnan(st.s[:16]).any()


def test_compiled_sampler_loop_compiles_once():
    """torch.compile(fullgraph=True) of a loop step that calls the sampler:
    the device step counter keeps it from recompiling each step (issue: the
    host int step was specialised and hit the recompile limit after 8)."""
    import torch._dynamo

    torch._dynamo.reset()
    counts = {"frames": 0}

    def counting_backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    n, B, b = 400, 32, 8
    es = ek.EvolvedSampler(n, b, seed=3)
    ref = ek.EvolvedSampler(n, b, seed=3)

    @torch.compile(fullgraph=True, backend=counting_backend)
    def step(ids, losses):
        sel = es.select(ids, losses=losses)
        return sel.positions, sel.scales

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randperm(n, generator=g)[:B]
        losses = torch.rand(B, generator=g)
        pos, _ = step(ids, losses)
        assert torch.equal(pos, ref.select(ids, losses=losses).positions)
    assert es.step == 20
    assert counts["frames"] <= 2, counts


# --------------------------------------------------------------------------
# One default per setting: every entry point that takes a setting (the op
# schemas, the reference, the functional API, ESState, the samplers, the
# distributed samplers) defaults it to the constant es_kernels exports; the
# public signatures are written out (no **kwargs, none built at import time).

# setting name -> the exported constant
SETTING_DEFAULTS = {
    "beta1": ek.DEFAULT_BETA1,
    "beta2": ek.DEFAULT_BETA2,
    "lam": ek.DEFAULT_LAM,
    "eps": ek.DEFAULT_EPS,
    "w_min": ek.DEFAULT_W_MIN,
    "select_mode": ek.DEFAULT_SELECT_MODE,
    "ignore_index": ek.DEFAULT_IGNORE_INDEX,
    "label_smoothing": ek.DEFAULT_LABEL_SMOOTHING,
    "anneal_frac": ek.DEFAULT_ANNEAL_FRAC,
    "prune_ratio": ek.DEFAULT_PRUNE_RATIO,
}

# where a setting is a required argument, not a default
REQUIRED_SETTINGS = {
    ("eswp_prune", "prune_ratio"),  # the op and the function: the caller's choice
}


def test_the_package_defaults():
    assert ek.DEFAULT_LAM == 2.0
    assert (ek.DEFAULT_BETA1, ek.DEFAULT_BETA2) == (0.2, 0.5)
    assert ek.DEFAULT_SELECT_MODE in ("sample", "topk")


def _python_entry_points():
    """(name, callable) of every public function and method of the modules
    that take settings, and of the reference (which the ops fall back to)."""
    for mod in (functional, lm, sampler, distributed, state, reference):
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj):
                for mname, member in vars(obj).items():
                    if inspect.isfunction(member) and (mname == "__init__" or not mname.startswith("_")):
                        yield f"{mod.__name__}.{name}.{mname}", member
            elif inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj


def _setting_params(params):
    return {p.name: p for p in params if p.name in SETTING_DEFAULTS}


@pytest.mark.parametrize("name,fn", list(_python_entry_points()), ids=lambda x: x if isinstance(x, str) else "")
def test_python_entry_points_default_to_the_constants(name, fn):
    for pname, p in _setting_params(inspect.signature(fn).parameters.values()).items():
        if p.default is inspect.Parameter.empty:
            continue  # a required argument (e.g. gathered_update's, rank_selection's)
        assert p.default == SETTING_DEFAULTS[pname] and type(p.default) is type(SETTING_DEFAULTS[pname]), (
            f"{name}({pname}=...) defaults to {p.default!r}, the package's default is {SETTING_DEFAULTS[pname]!r}"
        )


@pytest.mark.parametrize("op", _ops.OP_NAMES)
def test_op_schemas_default_to_the_constants(op):
    schema = getattr(torch.ops.es_kernels, op).default._schema
    args = {a.name: a for a in schema.arguments if a.name in SETTING_DEFAULTS}
    for pname, a in args.items():
        if (op, pname) in REQUIRED_SETTINGS:
            assert not a.has_default_value()
            continue
        assert a.has_default_value(), f"{op}: {pname} has no default"
        assert a.default_value == SETTING_DEFAULTS[pname], (
            f"{op}({pname}={a.default_value!r}) vs {SETTING_DEFAULTS[pname]!r}"
        )


def test_every_setting_of_the_ops_has_its_default():
    """The settings the op schemas take are the ones this test knows (a new one gets a constant)."""
    known = set(SETTING_DEFAULTS) | {"seed", "step", "advance_step", "num_epochs", "epoch", "rescale", "max_age", "cap"}
    known.add("offset")  # weighted_select's first noise position: no setting
    known |= {"id_offset", "order_key"}  # eswp_prune's shard arguments (0: the whole state)
    for op in _ops.OP_NAMES:
        schema = getattr(torch.ops.es_kernels, op).default._schema
        for a in schema.arguments:
            if a.has_default_value() and a.default_value is not None:
                assert a.name in known, f"{op}: {a.name} defaults to {a.default_value!r}: give it a DEFAULT_ constant"


@pytest.mark.parametrize("fn", [ek.es_step, ek.es_step_from_losses, ek.es_step_from_hidden])
def test_fused_steps_spell_out_the_step_settings(fn):
    params = inspect.signature(fn).parameters
    for name, default in functional.STEP_SETTINGS.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_sampler_holds_the_defaults():
    es = ek.EvolvedSampler(8, 2)
    for name in ("beta1", "beta2", "lam", "eps", "w_min", "select_mode"):
        assert getattr(es, name) == SETTING_DEFAULTS[name], name
    assert ek.ESWPSampler(es, num_epochs=2).prune_ratio == ek.DEFAULT_PRUNE_RATIO


def test_raw_op_and_api_agree_without_settings():
    """The op called without its settings computes what the API does without them."""
    n, B = 16, 8
    ids, losses = torch.arange(B), torch.rand(B)
    st_api, st_op = ek.ESState(n), ek.ESState(n)
    for _ in range(3):
        losses = torch.rand(B)
        w_api = ek.es_update(ids, losses, st_api)
        w_op = torch.ops.es_kernels.es_update(ids, losses, st_op.tensor, st_op.errors)
        torch.testing.assert_close(w_api, w_op, rtol=0, atol=0)
    torch.testing.assert_close(st_api.weights()[:B], w_api, rtol=0, atol=0)


def _public(name: str) -> bool:
    """A name of the public API (the modules' ``__all__``; the reference, the
    oracle, binds its fused steps to the op schemas and is not in it)."""
    parts = name.split(".")
    mod = {"functional": ek, "lm": lm, "distributed": distributed, "sampler": ek, "state": ek}.get(parts[1])
    return mod is not None and parts[2] in mod.__all__


@pytest.mark.parametrize(
    "name,fn",
    [(n, f) for n, f in _python_entry_points() if _public(n)],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_signatures_are_written_out(name, fn):
    """What an editor or a type checker reads is what ``inspect`` shows: no
    signature rewritten at import time, no ``**kwargs`` standing for settings."""
    assert "__signature__" not in vars(fn), f"{name}: a signature built at import time"
    kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name} takes **kwargs"
