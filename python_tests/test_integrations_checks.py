"""The integrations validate and load all-or-nothing (ESStream, ESTrainer, the
Lightning mixin, the samplers' loads and ``es.scale``), and the accelerate
recipe of the README resumes bit for bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import import_lightning, lit_module, lit_trainer
from test_integrations import (
    B,
    N,
    b,
    collate,
    hf,
    make_data,
    make_lit,
    make_model,
    trainer_args,
)
from torch.utils.data import DataLoader

import es_kernels as ek
from es_kernels.integrations import ESStream
from es_kernels.sampler import MAX_EPOCH


def frozen(x):
    """A state_dict's exact content (tensors as bits, NaN included)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(t.dtype)
        return ("tensor", t.dtype, tuple(t.shape), tuple((t.view(view) if view else t).flatten().tolist()))
    if isinstance(x, dict):
        return {k: frozen(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(frozen(v) for v in x)
    return x


def stream_snapshot(stream):
    return frozen(
        {
            "stream": stream.state_dict(),
            "resume": stream._resume_consumed,
            "es": stream.es.state_dict(),
            "pruner_next": None if stream.pruner._next is None else stream.pruner._next.pos,
        }
    )


def run_stream(seed, epochs, n=N):
    """An ES + ESWP stream after ``epochs`` loader epochs of random losses."""
    es = ek.EvolvedSampler(n, mini_batch=b, seed=seed)
    stream = ESStream(ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        ids = torch.tensor([k[0] for k in stream])
        es.select(ids, losses=torch.rand(ids.numel(), generator=g))
    return es, stream


# -- ESStream -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(length=2.5), "length"),
        (dict(length=0), "length"),
        (dict(length="8"), "length"),
        (dict(resume_mid_epoch="yes"), "resume_mid_epoch"),
        (dict(pruner="es"), "pruner"),
        (dict(es="x"), "es must be"),
    ],
)
def test_stream_arguments(kw, match):
    es = ek.EvolvedSampler(N, mini_batch=b)
    kw = dict(kw)
    if kw.get("pruner") == "es":
        kw["pruner"] = es  # an EvolvedSampler where the ESWPSampler goes
    elif "es" not in kw:
        kw["es"] = es
    with pytest.raises(ValueError, match=match):
        ESStream(**kw)
    stream = ESStream(es=es)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="n must be"):
            stream.mark_consumed(bad)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="epoch"):
            stream.set_epoch(bad)


def _corrupt(sd, what):
    sd = copy.deepcopy(sd)
    if what == "epoch":
        sd["epoch"] = -5
    elif what == "missing":
        del sd["consumed"]
    elif what == "extra":
        sd["extra"] = 1
    elif what == "length":
        sd["length"] = N + 1
    elif what == "start":
        sd["start"] = sd["plans"][0][1].numel() + 1  # beyond its plan
    elif what == "id":
        sd["plans"][-1][1][0] = N  # an id >= N
    elif what == "scale":
        sd["plans"][-1][2][0] = float("nan")
    elif what == "plan_epochs":
        e, i, s = sd["plans"][-1]
        sd["plans"].append((e + 2, i.clone(), s.clone()))
    elif what == "k_none":
        sd["k"] = None
    elif what == "consumed":
        sd["consumed"] = 2.0
    elif what == "pruner":
        sd["pruner"]["epoch"] = -1
    return sd


CORRUPTIONS = ["epoch", "missing", "extra", "length", "start", "id", "scale", "plan_epochs", "k_none", "consumed"]


@pytest.mark.parametrize("what", CORRUPTIONS + ["pruner"])
def test_stream_load_is_all_or_nothing(what):
    _, src = run_stream(seed=1, epochs=3)
    sd = src.state_dict()
    assert sd["k"] == 2 and sd["plans"] and sd["pruner"]["epoch"] >= 1
    _, dst = run_stream(seed=2, epochs=1)  # another position and pruner state
    before = stream_snapshot(dst)
    with pytest.raises(ValueError, match="state_dict"):
        dst.load_state_dict(_corrupt(sd, what))
    assert stream_snapshot(dst) == before
    dst.load_state_dict(sd)  # the uncorrupted dict loads and round-trips
    assert frozen(dst.state_dict()) == frozen(sd)


def test_stream_load_round_trip_continues_the_stream():
    es, src = run_stream(seed=4, epochs=2)
    sd, es_sd = src.state_dict(), es.state_dict()
    want = list(src)
    es2 = ek.EvolvedSampler(N, mini_batch=b, seed=4)
    es2.load_state_dict(es_sd)
    dst = ESStream(ek.ESWPSampler(es2, num_epochs=6, prune_ratio=0.5))
    dst.load_state_dict(sd)
    assert list(dst) == want


# -- the samplers' loads and es.scale ---------------------------------------------------------
def test_eswp_state_after_the_last_epoch_loads():
    es = ek.EvolvedSampler(8, 2)
    pr = ek.ESWPSampler(es, num_epochs=3)
    pr.set_epoch(MAX_EPOCH)
    assert len(list(pr)) == 8
    sd = pr.state_dict()
    assert sd["epoch"] == MAX_EPOCH + 1 and sd["kept"] is None
    pr2 = ek.ESWPSampler(es, num_epochs=3)
    pr2.load_state_dict(sd)  # what state_dict writes, load_state_dict takes
    assert pr2.epoch == MAX_EPOCH + 1 and pr2.state_dict() == sd
    for p in (pr, pr2):  # but there is no epoch after the last one
        before = p.state_dict()
        with pytest.raises(ValueError, match="past the last epoch"):
            iter(p)
        assert p.state_dict() == before and p.epoch == MAX_EPOCH + 1
    with pytest.raises(ValueError, match="epoch"):  # nor a plan of epoch 2**63 - 1
        pr2.load_state_dict(dict(pr.state_dict(), epoch=MAX_EPOCH + 1, kept=torch.arange(8), scale=torch.ones(8)))


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf"), -float("inf")])
def test_scale_setter_refuses_bad_values(bad):
    es = ek.EvolvedSampler(6, 2)
    es.scale = torch.full((6,), 2.0)
    before = es.scale
    value = torch.ones(6)
    value[3] = bad
    with pytest.raises(ValueError, match="scale must be finite and >= 0"):
        es.scale = value
    assert es.scale is before
    es.scale = torch.zeros(6)  # 0 is a valid scale
    es.scale = None


# -- Hugging Face Trainer ---------------------------------------------------------------------
def _trainer(tmp_path, es=None, eswp=None, **kw):
    from es_kernels.integrations.transformers import ESTrainer

    es = ek.EvolvedSampler(N, mini_batch=b) if es is None else es
    return ESTrainer(
        model=make_model(),
        args=trainer_args(tmp_path, **kw),
        train_dataset=make_data(),
        data_collator=collate,
        es_sampler=es,
        eswp=eswp,
    )


@hf
def test_trainer_arguments(tmp_path):
    es = ek.EvolvedSampler(N, mini_batch=b)
    with pytest.raises(ValueError, match="es_sampler must be an EvolvedSampler"):
        _trainer(tmp_path, es="x")
    with pytest.raises(ValueError, match="eswp must be an ESWPSampler"):
        _trainer(tmp_path, es=es, eswp=es)
    with pytest.raises(ValueError, match="eswp must be built on es_sampler"):
        _trainer(tmp_path, es=es, eswp=ek.ESWPSampler(ek.EvolvedSampler(N, mini_batch=b), num_epochs=2))
    with pytest.raises(ValueError, match="mini_batch"):
        _trainer(tmp_path, es=ek.EvolvedSampler(N, mini_batch=B + 1))
    from es_kernels.integrations.transformers import ESTrainer

    for kw, match in ((dict(es_shift_labels="yes"), "es_shift_labels"), (dict(es_score_in_eval_mode=1), "eval_mode")):
        with pytest.raises(ValueError, match=match):
            ESTrainer(model=make_model(), args=trainer_args(tmp_path), es_sampler=es, **kw)
    _trainer(tmp_path, es=ek.EvolvedSampler(N, mini_batch=B))  # b = B: allowed (ESWP without selection)


@hf
def test_trainer_refuses_a_batch_without_ids(tmp_path):
    tr = _trainer(tmp_path, max_steps=2)
    tr.get_train_dataloader = lambda: DataLoader(make_data(), batch_size=B, collate_fn=collate)
    with pytest.raises(ValueError, match="no 'es_id' column.*get_train_dataloader"):
        tr.train()
    assert tr.es_sampler.step == 0


@hf
@pytest.mark.parametrize("what", ["stream", "es", "missing", "extra"])
def test_trainer_es_load_is_all_or_nothing(tmp_path, what):
    es = ek.EvolvedSampler(N, mini_batch=b, seed=5)
    tr = _trainer(tmp_path, es=es, eswp=ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # move the state and the stream as training would
        ids = torch.tensor([k[0] for k in tr.es_stream])
        es.select(ids, losses=torch.rand(N, generator=g))
    sd = tr.es_state_dict()
    es2 = ek.EvolvedSampler(N, mini_batch=b, seed=5)
    tr2 = _trainer(tmp_path, es=es2, eswp=ek.ESWPSampler(es2, num_epochs=6, prune_ratio=0.5))
    es2.select(torch.arange(N), losses=torch.rand(N, generator=g))
    before = stream_snapshot(tr2.es_stream)
    bad = copy.deepcopy(sd)
    if what == "stream":
        bad["stream"]["epoch"] = -5
    elif what == "es":
        bad["es"]["step"] = -1
    elif what == "missing":
        del bad["stream"]
    else:
        bad["unexpected"] = {}
    with pytest.raises(ValueError, match="state_dict"):
        tr2.es_load_state_dict(bad)
    assert stream_snapshot(tr2.es_stream) == before  # the ES state, the stream and the pruner
    tr2.es_load_state_dict(sd)
    assert frozen(tr2.es_state_dict()["es"]) == frozen(sd["es"])


# -- Lightning ------------------------------------------------------------------------------
def test_lightning_arguments_and_a_batch_without_ids(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    m = lit_module(pl, N, B, es_ids=False)  # the user's own loader: no es_id
    es = ek.EvolvedSampler(N, mini_batch=b)
    with pytest.raises(ValueError, match="es must be an EvolvedSampler"):
        m.es_setup("x")
    with pytest.raises(ValueError, match="eswp must be an ESWPSampler"):
        m.es_setup(es, eswp=es)
    m.es_setup(es)
    with pytest.raises(ValueError, match="batch_size"):
        m.es_dataloader(m.data, batch_size=b - 1)
    trainer = lit_trainer(pl, tmp_path, enable_checkpointing=False, max_steps=2)
    with pytest.raises(ValueError, match="no 'es_id' key.*es_dataloader"):
        trainer.fit(m)
    assert es.step == 0


def test_lightning_checkpoint_loads_all_or_nothing(tmp_path):
    pl = import_lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=6, save_top_k=-1)
    lit_trainer(pl, tmp_path, max_steps=6, callbacks=[ck]).fit(make_lit(pl, eswp=True))
    (path,) = [tmp_path / "ck" / p for p in (tmp_path / "ck").iterdir()]
    good = torch.load(path, weights_only=False)
    loader_states = good["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert len(loader_states) == 1 and loader_states[0]["k"] == 1
    for what in ("stream", "es"):
        bad = copy.deepcopy(good)
        if what == "stream":
            bad["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["epoch"] = -5
        else:
            del bad["es_sampler"]
        torch.save(bad, tmp_path / "bad.ckpt")
        m = make_lit(pl, eswp=True)
        before = stream_snapshot(m.es_stream)
        with pytest.raises(ValueError, match="train loader state|es_sampler"):
            lit_trainer(pl, tmp_path, max_steps=8).fit(m, ckpt_path=str(tmp_path / "bad.ckpt"))
        assert stream_snapshot(m.es_stream) == before  # the ES state was not loaded either


# -- accelerate: the README's recipe ----------------------------------------------------------
def _accelerate_run(stop=None, resume=None, recipe=True, epochs=4):
    """The README's accelerate loop (ES + ESWP on an IndexedDataset). ``stop``:
    ``(epoch, batch)`` after which a checkpoint is returned; ``resume``: that
    checkpoint, loaded into fresh objects. Returns the model (and the checkpoint)."""
    from accelerate import Accelerator

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 6, generator=g), torch.randint(0, 5, (N,), generator=g)
    train_set = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    accelerator = Accelerator(cpu=True)
    es = ek.EvolvedSampler(len(train_set), mini_batch=b, seed=2, device=accelerator.device)
    pruner = ek.ESWPSampler(es, num_epochs=epochs, prune_ratio=0.5)
    loader = DataLoader(ek.IndexedDataset(train_set), batch_size=B, sampler=pruner)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        es.load_state_dict(resume["es"])
        pruner.load_state_dict(resume["pruner"])

    for epoch in range(pruner.epoch, epochs):  # the epoch in progress at the checkpoint, or the next
        if recipe:
            loader.set_epoch(epoch)  # else a fresh accelerate loader sets the sampler's epoch to 0
        trained = pruner.position  # ids of this epoch trained before (a resumed epoch's checkpoint position)
        for i, (ids, xb, yb) in enumerate(loader):
            with torch.no_grad():
                sel = es.select(ids, logits=model(xb), targets=yb)
            pos = sel.positions
            loss = (F.cross_entropy(model(xb[pos]), yb[pos], reduction="none") * sel.scales).mean()
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            trained += ids.shape[0]
            if (epoch, i) == stop:
                # accelerate's loader has read the next batch already: save the position trained
                position = trained if recipe else None
                ck = {"es": es.state_dict(), "pruner": pruner.state_dict(position=position)}
                ck.update(model=copy.deepcopy(model.state_dict()), opt=copy.deepcopy(opt.state_dict()))
                return model, ck
    return model, None


@hf
@pytest.mark.parametrize("stop", [(1, 1), (2, 0), (1, 3)])  # mid-epoch, and at the end of epoch 1
def test_accelerate_recipe_resumes_exactly(stop):
    ref, _ = _accelerate_run()
    _, ck = _accelerate_run(stop=stop)
    assert ck["pruner"]["kept"] is not None or stop == (1, 3)
    resumed, _ = _accelerate_run(resume=ck)
    for p1, p2 in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p1, p2)


@hf
def test_accelerate_without_the_recipe_resumes_wrongly():
    """The test above can fail: the natural loop (the position the sampler
    yielded, accelerate's own epoch count) trains something else on resume."""
    ref, _ = _accelerate_run()
    _, ck = _accelerate_run(stop=(1, 1), recipe=False)
    resumed, _ = _accelerate_run(resume=ck, recipe=False)
    assert any(not torch.equal(p1, p2) for p1, p2 in zip(ref.parameters(), resumed.parameters()))
