"""The HF Trainer and Lightning integrations against hand-written loops (tiny
random-init GPT-2 from a config, CPU, fixed seeds; nothing downloaded)."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import import_lightning, lit_module, lit_trainer, read_ahead
from torch.utils.data import DataLoader

import es_kernels as ek
from es_kernels.integrations import ESCollator, ESDataset, ESStream

N, T, V, B, b = 32, 8, 257, 8, 4
LR = 0.5  # plain SGD in both loops (Adam amplifies rounding-level gradient differences to lr-sized steps)


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (N, T), generator=g)
    y = x.clone()
    y[:, 0] = -100  # never a target after the shift: the token count is the same whether a Trainer
    #                 version counts labels or labels[..., 1:] for num_items_in_batch
    y[: N // 2, -2:] = -100  # sequences of different lengths
    return [{"input_ids": x[i], "labels": y[i], "text": f"sample {i}"} for i in range(N)]


def make_model(seed=0, dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    p = dropout
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p
    )
    return GPT2LMHeadModel(cfg)


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels")}


# -- the stream sampler (no framework) --------------------------------------------------
def test_stream_fixed_length_and_exact_replay():
    es = ek.EvolvedSampler(N, mini_batch=b, seed=3)
    pruner = ek.ESWPSampler(es, num_epochs=8, prune_ratio=0.5)
    stream = ESStream(pruner)
    g = torch.Generator().manual_seed(0)
    epochs = []
    for e in range(3):
        keys = list(stream)
        assert len(keys) == len(stream) == N  # a loader epoch is the unpruned size
        epochs.append(keys)
        ids = torch.tensor([k[0] for k in keys])
        es.select(ids, losses=torch.rand(N, generator=g))  # move the state: later plans prune
        if e == 0:
            sd = stream.state_dict()
            es_sd = es.state_dict()
    assert any(s != 1.0 for _, s in epochs[2])  # pruned: scales 1/(1-r) appear
    assert len(stream._plans) >= 1
    # replay from the checkpoint taken after epoch 0: epoch 1 again, then 2
    es2 = ek.EvolvedSampler(N, mini_batch=b, seed=3)
    es2.load_state_dict(es_sd)
    stream2 = ESStream(ek.ESWPSampler(es2, num_epochs=8, prune_ratio=0.5))
    stream2.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    torch.rand(N, generator=g)
    for e in (1, 2):
        keys = list(stream2)
        assert keys == epochs[e]
        es2.select(torch.tensor([k[0] for k in keys]), losses=torch.rand(N, generator=g))


# -- Hugging Face Trainer -------------------------------------------------------------------
def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


hf = pytest.mark.skipif(
    not (_installed("transformers") and _installed("accelerate")),
    reason="transformers / accelerate not installed (pip install -e '.[integrations]')",
)


def trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=B,
        learning_rate=LR,
        optim="sgd",
        max_grad_norm=0.0,
        weight_decay=0.0,
        warmup_steps=0,
        lr_scheduler_type="linear",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def make_trainer(tmp_path, eswp=False, seed=0, dropout=0.0, es_kw=None, model=None, **kw):
    from es_kernels.integrations.transformers import ESTrainer

    es = ek.EvolvedSampler(N, mini_batch=b, seed=seed)
    pruner = ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5) if eswp else None
    tr = ESTrainer(
        model=make_model(dropout=dropout) if model is None else model(),
        args=trainer_args(tmp_path, **kw),
        train_dataset=make_data(),
        data_collator=collate,
        es_sampler=es,
        eswp=pruner,
        **(es_kw or {}),
    )
    return tr, es, pruner


def record_selections(es):
    seen = []
    orig = es.select

    def select(ids, **kw):
        sel = orig(ids, **kw)
        seen.append(ids[sel.positions].tolist())
        return sel

    es.select = select
    return seen


def bf16_autocast(on):
    import contextlib

    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def hand_select(model, es, batch, seen, bf16=False):
    """ESTrainer's scoring pass (eval mode, no autograd) and selection on one
    collated meta-batch; the selected ids go to ``seen``. Returns the positions."""
    x, y, ids = batch["input_ids"], batch["labels"], batch["es_id"]
    model.eval()
    with torch.no_grad():
        with bf16_autocast(bf16):
            logits = model(x).logits
        sel = es.select(ids, logits=logits[:, :-1], targets=y[:, 1:])
    model.train()
    seen.append(ids[sel.positions].tolist())
    return sel.positions


def hand_loop(steps, accum=1, eswp=False, seed=0, bf16=False):
    """The loop the README describes, with the Trainer's optimizer, schedule and
    token-mean loss (normalised over the tokens of all micro-batches of a step)."""
    from transformers import get_linear_schedule_with_warmup

    model = make_model()
    es = ek.EvolvedSampler(N, mini_batch=b, seed=seed)
    stream = ESStream(ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5) if eswp else None, es=es)
    loader = DataLoader(ESDataset(make_data()), batch_size=B, sampler=stream, collate_fn=ESCollator(collate))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    seen, it = [], read_ahead(loader)
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            try:
                batch = next(it)
            except StopIteration:
                it = read_ahead(loader)
                batch = next(it)
            pos = hand_select(model, es, batch, seen, bf16=bf16)
            micro.append((batch["input_ids"][pos], batch["labels"][pos], batch["es_scale"][pos]))
        count = sum(int((y[:, 1:] != -100).sum()) for _, y, _ in micro)
        for x, y, s in micro:
            with bf16_autocast(bf16):
                logits = model(x).logits[:, :-1]
            tok = F.cross_entropy(logits.reshape(-1, V).float(), y[:, 1:].reshape(-1), reduction="none")
            (((tok.view(y.shape[0], -1).sum(1) * s).sum()) / count).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, es, seen


def assert_same_params(m1, m2, atol=1e-6):
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=atol, rtol=1e-5, msg=n)


@hf
@pytest.mark.parametrize("accum,eswp", [(1, False), (2, False), (1, True)])
def test_trainer_matches_hand_loop(tmp_path, accum, eswp):
    steps = 10 if eswp else 3  # ESWP: past the first epoch, into pruned plans
    tr, es, _ = make_trainer(tmp_path, eswp=eswp, max_steps=steps, gradient_accumulation_steps=accum)
    seen = record_selections(es)
    tr.train()
    model, es_ref, seen_ref = hand_loop(steps, accum=accum, eswp=eswp)
    assert seen == seen_ref
    assert es.step == es_ref.step == steps * accum
    torch.testing.assert_close(es.state.tensor, es_ref.state.tensor, equal_nan=True, atol=1e-6, rtol=1e-5)
    assert_same_params(tr.model, model)
    if eswp:
        assert any(p.epoch >= 1 for p in tr.es_stream._plans)


@hf
def test_trainer_eswp_planned_steps_run(tmp_path):
    # 6 epochs x 4 steps planned; pruned ESWP epochs do not shorten the Trainer's epochs
    tr, es, pruner = make_trainer(tmp_path, eswp=True, num_train_epochs=6)
    scales = []
    orig = tr.compute_loss

    def compute_loss(model, inputs, **kw):
        scales.append(inputs["es_scale"].clone())
        return orig(model, inputs, **kw)

    tr.compute_loss = compute_loss
    out = tr.train()
    assert tr.state.max_steps == 24 and out.global_step == 24
    assert tr.lr_scheduler.get_last_lr()[0] == 0.0  # the linear schedule ran to its end
    assert max(p.epoch for p in tr.es_stream._plans) >= 6  # more ESWP epochs than Trainer epochs
    assert any(bool((s != 1).any()) for s in scales)  # ESWP's rescale reached the loss


@hf
def test_trainer_resume_is_exact(tmp_path):
    from es_kernels.integrations.transformers import CHECKPOINT_FILE

    tr, es, _ = make_trainer(tmp_path / "a", eswp=True, max_steps=12, save_strategy="steps", save_steps=6)
    tr.train()
    ckpt = tmp_path / "a" / "checkpoint-6"
    assert (ckpt / CHECKPOINT_FILE).is_file()
    tr2, es2, _ = make_trainer(tmp_path / "a", eswp=True, max_steps=12, save_strategy="no")
    tr2.train(resume_from_checkpoint=str(ckpt))
    assert tr2.state.global_step == 12
    for p1, p2 in zip(tr.model.parameters(), tr2.model.parameters()):
        assert torch.equal(p1, p2)
    sd1, sd2 = es.state_dict(), es2.state_dict()
    assert torch.equal(es.state.tensor.nan_to_num(-1), es2.state.tensor.nan_to_num(-1))
    assert sd1["step"] == sd2["step"] == 12
    st1, st2 = tr.es_stream.state_dict(), tr2.es_stream.state_dict()
    assert st1["k"] == st2["k"] and st1["start"] == st2["start"]
    assert [(e, i.tolist()) for e, i, _ in st1["plans"]] == [(e, i.tolist()) for e, i, _ in st2["plans"]]


@hf
@pytest.mark.parametrize("score_in_eval_mode,at_step", [(False, 6), (False, 4), (True, 6)])
def test_trainer_resume_with_dropout_is_exact(tmp_path, score_in_eval_mode, at_step):
    # dropout in the training step, and in the scoring pass when it runs in train mode; the
    # checkpoint at step 6 is in the middle of epoch 1 (4 steps an epoch), the one at 4 at its start
    es_kw = {"es_score_in_eval_mode": score_in_eval_mode}
    kw = dict(eswp=True, dropout=0.5, es_kw=es_kw, max_steps=8)
    tr, es, _ = make_trainer(tmp_path / "a", save_strategy="steps", save_steps=2, **kw)
    tr.train()
    tr2, es2, _ = make_trainer(tmp_path / "a", save_strategy="no", **kw)
    torch.manual_seed(1)  # another global RNG state: the checkpoint's must be restored
    tr2.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{at_step}"))
    assert es2.step == 8
    for p1, p2 in zip(tr.model.parameters(), tr2.model.parameters()):
        assert torch.equal(p1, p2)
    assert torch.equal(es.state.tensor.nan_to_num(-1), es2.state.tensor.nan_to_num(-1))


def record_select_dtypes(es):
    """The dtypes of the tensors ``es.select`` receives, one dict a call."""
    seen = []
    orig = es.select

    def select(ids, **kw):
        seen.append({k: v.dtype for k, v in kw.items() if isinstance(v, torch.Tensor)})
        return orig(ids, **kw)

    es.select = select
    return seen


@hf
def test_trainer_bf16_scores_bf16_logits(tmp_path):
    # bf16=True: the scoring pass reads the autocast's bfloat16 logits, not accelerate's float32 copy
    steps = 3
    tr, es, _ = make_trainer(tmp_path, max_steps=steps, bf16=True)
    dtypes = record_select_dtypes(es)
    seen = record_selections(es)
    tr.train()
    assert [d["logits"] for d in dtypes] == [torch.bfloat16] * steps
    model, es_ref, seen_ref = hand_loop(steps, bf16=True)
    assert seen == seen_ref
    torch.testing.assert_close(es.state.tensor, es_ref.state.tensor, equal_nan=True, atol=1e-6, rtol=1e-5)
    assert_same_params(tr.model, model, atol=1e-5)


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=T,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@hf
@pytest.mark.parametrize("bf16,arch", [(False, "gpt2"), (True, "gpt2"), (True, "llama")])
def test_trainer_score_from_hidden(tmp_path, bf16, arch):
    # es_score_from_hidden: the base model's hidden states and lm_head's weight, in the dtype the
    # autocast lm_head computes in; the same selections and training as scoring from the logits
    # (GPT-2: model.transformer, tied lm_head; Llama: model.model, untied)
    steps = 3
    model = make_llama if arch == "llama" else None
    es_kw = {"es_score_from_hidden": True}
    tr, es, _ = make_trainer(tmp_path / "h", max_steps=steps, bf16=bf16, es_kw=es_kw, model=model)
    dtypes = record_select_dtypes(es)
    seen = record_selections(es)
    tr.train()
    dt = torch.bfloat16 if bf16 else torch.float32
    assert dtypes == [{"hidden": dt, "weight": dt, "targets": torch.int64}] * steps
    ref, es_ref, _ = make_trainer(tmp_path / "l", max_steps=steps, bf16=bf16, model=model)
    seen_ref = record_selections(es_ref)
    ref.train()
    assert seen == seen_ref
    torch.testing.assert_close(es.state.tensor, es_ref.state.tensor, equal_nan=True, atol=1e-5, rtol=1e-4)
    assert_same_params(tr.model, ref.model, atol=1e-5)


@hf
def test_trainer_score_from_hidden_refuses_other_heads(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from es_kernels.integrations.transformers import ESTrainer

    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V, n_positions=T, num_labels=3)
    capped = make_model()
    capped.config.final_logit_softcapping = 30.0  # logits that are not lm_head(hidden)
    for model, match in ((GPT2ForSequenceClassification(cfg), "linear output layer"), (capped, "softcapping")):
        with pytest.raises(ValueError, match=match):
            ESTrainer(
                model=model,
                args=trainer_args(tmp_path),
                train_dataset=make_data(),
                data_collator=collate,
                es_sampler=ek.EvolvedSampler(N, mini_batch=b),
                es_score_from_hidden=True,
            )


@hf
def test_trainer_evaluation_does_not_score(tmp_path):
    from transformers import Trainer

    tr, es, _ = make_trainer(tmp_path)
    ev = make_data(seed=1)
    got = tr.evaluate(eval_dataset=ev)
    assert es.step == 0
    plain = Trainer(model=make_model(), args=trainer_args(tmp_path), data_collator=collate)
    ref = plain.evaluate(eval_dataset=ev)
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)


@hf
def test_trainer_unused_columns_and_version_check(tmp_path):
    from es_kernels.integrations.transformers import check_version

    # the "text" column is dropped by ESCollator (remove_unused_columns=True), es_id is kept
    tr, es, _ = make_trainer(tmp_path, max_steps=1)
    batch = next(iter(tr.get_train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "es_id", "es_scale"}
    for bad in ("4.40.0", "6.0.0"):
        with pytest.raises(RuntimeError, match="tested with"):
            check_version(bad)
    check_version()


# -- Lightning ------------------------------------------------------------------------------
def make_lit(pl, eswp, dropout=0.0, score_in_eval_mode=True):
    es = ek.EvolvedSampler(N, mini_batch=b, seed=1)
    eswp = ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5) if eswp else None
    return lit_module(pl, N, B, es=es, eswp=eswp, dropout=dropout, score_in_eval_mode=score_in_eval_mode)


@pytest.mark.parametrize("eswp", [False, True])
def test_lightning_mid_epoch_resume_is_exact(tmp_path, eswp):
    pl = import_lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    # 4 steps an epoch; the checkpoint at step 6 is in the middle of epoch 1
    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=6, save_top_k=-1)
    m1 = make_lit(pl, eswp)
    lit_trainer(pl, tmp_path, max_steps=12, callbacks=[ck]).fit(m1)
    path = [p for p in os.listdir(tmp_path / "ck") if "step=6" in p]
    assert path, os.listdir(tmp_path / "ck")
    m2 = make_lit(pl, eswp)
    t2 = lit_trainer(pl, tmp_path, max_steps=12)
    t2.fit(m2, ckpt_path=str(tmp_path / "ck" / path[0]))
    assert t2.global_step == 12
    assert m1.es_sampler.step == m2.es_sampler.step == 12
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert torch.equal(m1.es_sampler.state.tensor.nan_to_num(-1), m2.es_sampler.state.tensor.nan_to_num(-1))


@pytest.mark.parametrize("score_in_eval_mode", [True, False])
@pytest.mark.parametrize("at_step", [4, 6])  # the end of epoch 0; the middle of epoch 1
def test_lightning_resume_with_dropout_is_exact(tmp_path, score_in_eval_mode, at_step):
    # dropout in the training step (and in the scoring pass when it runs in train mode): the
    # resumed run must draw the masks the uninterrupted run drew
    pl = import_lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    ck = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=2, save_top_k=-1)
    torch.manual_seed(123)
    m1 = make_lit(pl, True, dropout=0.5, score_in_eval_mode=score_in_eval_mode)
    lit_trainer(pl, tmp_path, max_steps=10, callbacks=[ck]).fit(m1)
    path = [p for p in os.listdir(tmp_path / "ck") if f"step={at_step}." in p]
    assert len(path) == 1, os.listdir(tmp_path / "ck")
    torch.manual_seed(456)  # another global RNG state: the checkpoint's must be restored
    m2 = make_lit(pl, True, dropout=0.5, score_in_eval_mode=score_in_eval_mode)
    torch.rand(7)
    lit_trainer(pl, tmp_path, max_steps=10).fit(m2, ckpt_path=str(tmp_path / "ck" / path[0]))
    assert m2.es_sampler.step == 10
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert torch.equal(m1.es_sampler.state.tensor.nan_to_num(-1), m2.es_sampler.state.tensor.nan_to_num(-1))


def test_lightning_bf16_mixed_scores_under_autocast(tmp_path):
    # the scoring pass runs under the trainer's precision, as the training step does
    pl = import_lightning()
    m = make_lit(pl, eswp=False)
    dtypes = {True: set(), False: set()}  # grad enabled (training step) / not (scoring pass)
    orig = m.es_sample_losses

    def es_sample_losses(batch):
        dtypes[torch.is_grad_enabled()].add(m.net(batch["x"]).dtype)
        return orig(batch)

    m.es_sample_losses = es_sample_losses
    lit_trainer(pl, tmp_path, max_steps=2, precision="bf16-mixed").fit(m)
    assert dtypes == {True: {torch.bfloat16}, False: {torch.bfloat16}}


def test_lightning_matches_hand_loop(tmp_path):
    pl = import_lightning()
    m = make_lit(pl, eswp=True)
    seen = record_selections(m.es_sampler)
    lit_trainer(pl, tmp_path, max_steps=10).fit(m)
    # the hand loop: same data, sampler and loss (Lightning 2.6's fetcher reads the sampler as plain iteration does)
    ref = make_lit(pl, eswp=True)
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    loader = ref.es_dataloader(ref.data, batch_size=B)
    seen_ref, it = [], iter(loader)
    for _ in range(10):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        ids = batch["es_id"]
        with torch.no_grad():
            sel = ref.es_sampler.select(ids, losses=ref.es_sample_losses(batch))
        pos = sel.positions
        seen_ref.append(ids[pos].tolist())
        loss = (ref.es_sample_losses({"x": batch["x"][pos], "y": batch["y"][pos]}) * batch["es_scale"][pos]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen == seen_ref
    for p1, p2 in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
