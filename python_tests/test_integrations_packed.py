"""ESTrainer with packed batches (transformers' DataCollatorWithFlattening: the
meta-batch's documents end to end in one row, position_ids restarting at each
one, or the flash-attention kwargs cu_seq_lens_q / _k): one observation per
document, a selection of documents, training on the packed row of the picks.
Against a hand-written loop, bit for bit (tiny random-init GPT-2, CPU)."""

import importlib.util
import socket

import pytest
import torch
import torch.nn.functional as F
from conftest import read_ahead
from torch.utils.data import DataLoader

import es_kernels as ek
from es_kernels.integrations import (
    DOC_KEY,
    LENGTHS_KEY,
    ESCollator,
    ESDataset,
    ESStream,
    packed_documents,
    select_batch,
    take_documents,
)

N, T, V, B, b = 32, 8, 257, 8, 4  # documents of 1 to T tokens; meta-batches of B documents, b picked
LR = 0.5

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("transformers", "accelerate")),
    reason="transformers / accelerate not installed (pip install -e '.[integrations]')",
)


def make_docs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[3] = 1  # a document with no scored token (the collator's separator takes its only label)
    docs = []
    for i in range(N):
        x = torch.randint(0, V, (int(lengths[i]),), generator=g)
        y = x.clone()
        if i % 5 == 0:
            y[-2:] = -100  # some ignored labels
        docs.append({"input_ids": x, "labels": y, "text": f"document {i}"})
    return docs


def make_model(dropout=0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    p = dropout
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p
    )
    model = GPT2LMHeadModel(cfg)
    model.config.use_cache = False  # as the Trainer sets it: with a cache, transformers ignores the packing
    return model


def collator(flash=False):
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash)


def trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=B, learning_rate=LR, optim="sgd", max_grad_norm=0.0,
        weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", logging_strategy="no", save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def make_trainer(tmp_path, flash=False, eswp=False, schedule="step", dropout=0.0, es_kw=None, **kw):
    from es_kernels.integrations.transformers import ESTrainer

    es = ek.EvolvedSampler(N, mini_batch=b, seed=0, schedule=schedule)
    pruner = ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5) if eswp else None
    tr = ESTrainer(
        model=make_model(dropout), args=trainer_args(tmp_path, **kw), train_dataset=make_docs(),
        data_collator=collator(flash), es_sampler=es, eswp=pruner, **(es_kw or {}),
    )  # fmt: skip
    return tr, es


def record(tr, es):
    """The selected ids of each scoring or state step (-1: a document without
    a scored token), and each micro-step's loss and num_items_in_batch."""
    seen, losses = [], []
    select = es.select

    def sel(ids=None, **kw):
        s = select(ids, **kw)
        got = ids if ids is not None else kw["segment_ids"][:, 0]
        seen.append(got[s.positions].tolist())
        return s

    es.select = sel
    compute = tr.compute_loss

    def compute_loss(model, inputs, num_items_in_batch=None, **kw):
        loss = compute(model, inputs, num_items_in_batch=num_items_in_batch, **kw)
        losses.append((loss.detach().clone(), num_items_in_batch))
        return loss

    tr.compute_loss = compute_loss
    return seen, losses


def hand_documents(position_ids):
    """(start, length) of each document: a new one wherever position_ids restart at 0."""
    p = position_ids[0].tolist()
    starts = [t for t in range(len(p)) if p[t] == 0]
    return [(s, e - s) for s, e in zip(starts, starts[1:] + [len(p)])]


def hand_document_scores(model, batch, y, seg, ids, rows, from_hidden):
    """The scoring pass of docs/packing.md's loop (eval mode, no grad; from the logits
    or the hidden states): one ``[rows, 1]`` row per document, ``(losses, segment_ids)``,
    observed once each, none without a scored token (segment id -1)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        if from_hidden:
            h = model.transformer(**inputs).last_hidden_state
            d = ek.lm.per_document_losses_from_hidden(h, model.lm_head.weight, y, seg, shift_labels=True)
        else:
            d = ek.lm.per_document_cross_entropy(model(**inputs).logits, y, seg, shift_labels=True)
    model.train()
    doc_loss, doc_seg = torch.zeros(rows, 1), torch.full((rows, 1), -1)
    for k, loss, c in zip(d.ids.tolist(), d.losses.tolist(), d.counts.tolist()):
        if k >= 0 and c > 0:
            doc_loss[k], doc_seg[k] = loss, ids[k]
    return doc_loss, doc_seg


def hand_loop(steps, flash=False, eswp=False, schedule="step", accum=1, from_hidden=False):
    """The loop docs/packing.md describes, with the Trainer's optimizer, schedule and losses."""
    from transformers import get_linear_schedule_with_warmup

    model = make_model()
    es = ek.EvolvedSampler(N, mini_batch=b, seed=0, schedule=schedule)
    stream = ESStream(ek.ESWPSampler(es, num_epochs=6, prune_ratio=0.5) if eswp else None, es=es)
    loader = DataLoader(ESDataset(make_docs()), batch_size=B, sampler=stream, collate_fn=ESCollator(collator(flash)))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    seen, losses, it = [], [], read_ahead(loader)
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            try:
                batch = next(it)
            except StopIteration:
                it = read_ahead(loader)
                batch = next(it)
            ids, scales, y = batch.pop("es_id"), batch.pop("es_scale"), batch["labels"]
            docs = hand_documents(batch["position_ids"])
            seg = torch.cat([torch.full((1, n), k) for k, (_, n) in enumerate(docs)], 1)
            scored = es.needs_scores
            if scored:
                doc_loss, doc_seg = hand_document_scores(model, batch, y, seg, ids, B, from_hidden)
                sel = es.select(losses=doc_loss, segment_ids=doc_seg)
                seen.append(doc_seg[sel.positions, 0].tolist())  # -1: a pick without a scored token
            else:
                sel = es.select(ids)
                seen.append(ids[sel.positions].tolist())
            pos = sel.positions.tolist()
            picked = [docs[k] for k in pos]
            row = {k: torch.cat([batch[k][:, s : s + n] for s, n in picked], 1) for k in ("input_ids", "labels")}
            row["position_ids"] = torch.cat([torch.arange(n) for _, n in picked]).view(1, -1)
            if flash:
                cu = torch.tensor([0] + [n for _, n in picked]).cumsum(0).to(torch.int32)
                row.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(n for _, n in picked))
                row["max_length_k"] = row["max_length_q"]
            scale = torch.cat([torch.full((n,), float(scales[k])) for k, (_, n) in zip(pos, picked)]).view(1, -1)
            micro.append((row, scale, ids[pos], not scored))
        count = sum((row["labels"][..., 1:] != -100).sum() for row, *_ in micro) / 1  # the Trainer's count
        for row, scale, picks, from_state in micro:
            if eswp or from_state:  # ESTrainer's loss: each token's loss times its document's ESWP scale
                inputs = {k: v for k, v in row.items() if k != "labels"}
                yy = row["labels"][:, 1:]
                tok = F.cross_entropy(
                    model(**inputs).logits[:, :-1].reshape(-1, V).float(), yy.reshape(-1), reduction="none"
                ).view(yy.shape)
                if from_state:  # the picks' training losses, a mean per document over its scored tokens
                    means = []
                    for s, n in hand_documents(row["position_ids"]):  # labels s .. s + n - 1: tok[s - 1 ...]
                        a = max(s - 1, 0)
                        t, m = tok[0, a : s + n - 1], yy[0, a : s + n - 1] != -100
                        means.append(float(t[m].detach().double().sum() / int(m.sum())) if m.any() else 0.0)
                    es.observe(picks, torch.tensor(means))
                loss = (tok * scale[:, 1:]).sum() / count
            else:
                loss = model(**row, num_items_in_batch=count).loss  # the Trainer's own loss
            losses.append((loss.detach().clone(), count))
            loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, es, seen, losses


def same_run(tr, es, seen, losses, ref):
    model, es_ref, seen_ref, losses_ref = ref
    assert seen == seen_ref
    assert len(losses) == len(losses_ref)
    for (l1, n1), (l2, n2) in zip(losses, losses_ref):
        assert torch.equal(l1, l2) and torch.equal(n1, n2)
    assert es.step == es_ref.step
    assert torch.equal(es.state.tensor.nan_to_num(-1), es_ref.state.tensor.nan_to_num(-1))
    assert torch.equal(es.state.errors, es_ref.state.errors)
    for (name, p1), p2 in zip(tr.model.named_parameters(), model.parameters()):
        assert torch.equal(p1, p2), name


# -- the pieces ------------------------------------------------------------------------------------
def test_packed_documents_from_position_ids_and_cu_seq_lens():
    docs = make_docs()[:4]
    for flash in (False, True):
        batch = collator(flash)(docs)
        doc, lengths = packed_documents(batch, 4)
        assert lengths == tuple(len(d["input_ids"]) for d in docs)
        assert doc.tolist() == [sum(([k] * n for k, n in enumerate(lengths)), [])]
    batch = collator(True)(docs)
    del batch["position_ids"]  # the flash-attention kwargs alone
    assert packed_documents(batch, 4)[1] == lengths
    # not packed: rows of their own, or one sample
    assert packed_documents({"input_ids": torch.zeros(4, 3), "position_ids": torch.zeros(4, 3)}, 4) is None
    assert packed_documents(collator()(docs[:1]), 1) is None


def test_packed_documents_refuses_other_counts():
    docs = make_docs()[:4]
    batch = collator()(docs)
    with pytest.raises(ValueError, match="position_ids hold 4 documents .*, the batch 5 samples"):
        packed_documents(batch, 5)
    batch = collator(True)(docs)
    with pytest.raises(ValueError, match="cu_seq_lens_q holds 4 documents"):
        packed_documents(batch, 3)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_q"] - 1
    with pytest.raises(ValueError, match="cu_seq_lens_q must rise from 0"):
        packed_documents(batch, 4)
    with pytest.raises(ValueError, match="packed"):
        ESCollator(packed=1)


def test_packed_collator_refuses_dropped_items():
    # DataCollatorWithFlattening drops an item without tokens: its documents are no longer the items
    items = [ESDataset(make_docs())[i] for i in range(4)]
    items[2] = items[2]._replace(item={"input_ids": torch.zeros(0, dtype=torch.int64), "labels": torch.zeros(0)})
    with pytest.raises(ValueError, match="position_ids hold 3 documents .*drops empty samples"):
        ESCollator(collator(), packed=True)(items)
    assert DOC_KEY not in ESCollator(collator())(items)  # packed=False: the batch as collated


def test_packed_select_from_document_losses():
    # a score that returns the documents' losses [B] (an override of ESTrainer.es_score): observed as given
    items = [ESDataset(make_docs())[i] for i in range(B)]
    batch = ESCollator(collator(), packed=True)(items)
    losses = torch.rand(B, generator=torch.Generator().manual_seed(0))
    es, ref = ek.EvolvedSampler(N, mini_batch=b, seed=2), ek.EvolvedSampler(N, mini_batch=b, seed=2)
    out = select_batch(es, batch, lambda bt: {"losses": losses})
    sel = ref.select(batch["es_id"], losses=losses)
    assert torch.equal(es.state.tensor.nan_to_num(-1), ref.state.tensor.nan_to_num(-1))
    # the same picks as the unpacked selection from the same losses: the weights and the noise agree
    picked = torch.cat([items[k].item["input_ids"] for k in sel.positions.tolist()])
    assert torch.equal(out["input_ids"][0], picked)


def test_take_documents_builds_the_picks_row():
    docs = make_docs()[:5]
    batch = collator(True)(docs)
    doc, lengths = packed_documents(batch, 5)
    out = take_documents({**batch, "per_sample": torch.arange(5)}, torch.tensor([1, 3, 4]), lengths)
    keep = [docs[k] for k in (1, 3, 4)]
    assert torch.equal(out["input_ids"][0], torch.cat([d["input_ids"] for d in keep]))
    assert torch.equal(out["position_ids"][0], torch.cat([torch.arange(len(d["input_ids"])) for d in keep]))
    n = [len(d["input_ids"]) for d in keep]
    assert out["cu_seq_lens_q"].tolist() == out["cu_seq_lens_k"].tolist() == [0, n[0], n[0] + n[1], sum(n)]
    assert out["cu_seq_lens_q"].dtype == torch.int32 and out["max_length_q"] == out["max_length_k"] == max(n)
    assert out["per_sample"].tolist() == [1, 3, 4]
    assert out[DOC_KEY].tolist() == [[0] * n[0] + [1] * n[1] + [2] * n[2]]
    # the flattening collator's own batch of the picks, but for es_doc
    ref = collator(True)(keep)
    assert all(torch.equal(torch.as_tensor(out[k]), torch.as_tensor(v)) for k, v in ref.items())


def score_packed(model, shifted):
    """The score of select_batch: the full logits and labels with shift_labels, or both shifted."""

    def score(bt):
        logits = model(**{k: v for k, v in bt.items() if k != "labels"}).logits
        if shifted:
            return {"logits": logits[:, :-1], "targets": bt["labels"][:, 1:]}
        return {"logits": logits, "targets": bt["labels"], "shift_labels": True}

    return score


@pytest.mark.parametrize("shifted", [False, True])
def test_packed_scoring_observes_documents_as_unpacked_rows(shifted):
    # the same documents packed in one row or padded in rows of their own: the same observations
    # (to float32 rounding of the forward)
    model = make_model()
    model.eval()
    items = [ESDataset(make_docs())[i] for i in range(B)]
    packed = ESCollator(collator(), packed=True)(items)
    assert DOC_KEY in packed and LENGTHS_KEY in packed
    es_p = ek.EvolvedSampler(N, mini_batch=b, seed=1)
    with torch.no_grad():
        out = select_batch(es_p, packed, score_packed(model, shifted))
    es_u = ek.EvolvedSampler(N, mini_batch=b, seed=1)
    lengths = [len(it.item["input_ids"]) for it in items]
    x = torch.zeros(B, T, dtype=torch.int64)
    y = torch.full((B, T), -100)
    for k, it in enumerate(items):
        x[k, : lengths[k]] = it.item["input_ids"]
        y[k, 1 : lengths[k]] = it.item["labels"][1:]
    with torch.no_grad():
        logits = model(x).logits
    ids = torch.tensor([it.id for it in items])
    seen = y[:, 1:].ne(-100).any(1)  # the unpacked step observes a row without a scored token at loss 0
    sel = es_u.select(ids[seen], logits=logits[seen, :-1], targets=y[seen, 1:])
    torch.testing.assert_close(es_p.state.tensor, es_u.state.tensor, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert not bool(seen.all()) and bool(es_p.state.tensor[ids[~seen], 0].isnan().all())  # not observed
    assert sel.positions.shape == (b,)
    # the packed path picked b documents and returned their packed row, a scale per token
    assert out[DOC_KEY].unique().tolist() == list(range(b)) and out["es_scale"].shape == out["input_ids"].shape


# -- ESTrainer against the hand loop -----------------------------------------------------------------
@pytest.mark.parametrize(
    "flash,eswp,accum,from_hidden",
    [(False, False, 1, False), (True, False, 2, False), (False, True, 1, False), (False, False, 1, True)],
)
def test_trainer_packed_matches_hand_loop(tmp_path, flash, eswp, accum, from_hidden):
    steps = 8 if eswp else 3  # ESWP: into the pruned plans
    es_kw = {"es_score_from_hidden": True} if from_hidden else None
    tr, es = make_trainer(
        tmp_path, flash=flash, eswp=eswp, es_kw=es_kw, max_steps=steps, gradient_accumulation_steps=accum
    )
    seen, losses = record(tr, es)
    tr.train()
    assert all(len(s) == b for s in seen) and len(seen) == steps * accum
    same_run(tr, es, seen, losses, hand_loop(steps, flash=flash, eswp=eswp, accum=accum, from_hidden=from_hidden))


def test_trainer_packed_with_a_schedule_matches_hand_loop(tmp_path):
    # steps that select from the state observe the picks' training losses, a mean per document
    steps, schedule = 6, "fraction:0.5,cap=1"
    tr, es = make_trainer(tmp_path, schedule=schedule, max_steps=steps)
    seen, losses = record(tr, es)
    tr.train()
    ref = hand_loop(steps, schedule=schedule)
    assert ref[1].state_dict()["counters"] is not None
    same_run(tr, es, seen, losses, ref)


@pytest.mark.parametrize("dropout,at_step", [(0.0, 6), (0.5, 6)])
def test_trainer_packed_resume_is_exact(tmp_path, dropout, at_step):
    # 4 steps an epoch: the checkpoint at step 6 is in the middle of epoch 1, with pruned ESWP plans
    kw = dict(eswp=True, dropout=dropout, max_steps=10)
    tr, es = make_trainer(tmp_path / "a", save_strategy="steps", save_steps=2, **kw)
    tr.train()
    tr2, es2 = make_trainer(tmp_path / "a", save_strategy="no", **kw)
    torch.manual_seed(1)  # another global RNG state: the checkpoint's must be restored
    tr2.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{at_step}"))
    assert es2.step == es.step == 10
    assert torch.equal(es.state.tensor.nan_to_num(-1), es2.state.tensor.nan_to_num(-1))
    for p1, p2 in zip(tr.model.parameters(), tr2.model.parameters()):
        assert torch.equal(p1, p2)
    assert max(p.epoch for p in tr.es_stream._plans) >= 1


# -- under DDP ------------------------------------------------------------------------------------------
DDP_SCENARIOS = (
    "packed_trainer_run", "packed_hand_loop", "packed_trainer_hidden", "packed_hand_hidden",
    "packed_resume_scoring_dropout",
)  # fmt: skip


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One spawn of 2 gloo processes for every DDP check (python_tests/dist_packed_workers.py)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is needed")
    import dist_packed_workers as W

    out = tmp_path_factory.mktemp("ddp_packed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(W.entry, args=(2, port, str(out), DDP_SCENARIOS), nprocs=2, join=True)
    return {(n, r): torch.load(out / f"{n}_{r}.pt", weights_only=False) for n in DDP_SCENARIOS for r in range(2)}


def same_ddp(a, b):
    assert a["seen"] == b["seen"]
    assert a["step"] == b["step"]
    assert torch.equal(a["state"].nan_to_num(-1), b["state"].nan_to_num(-1))
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


@pytest.mark.slow
def test_trainer_packed_ddp_matches_hand_loop(ddp_runs):
    import dist_packed_workers as W

    for r in range(2):
        tr, hand = ddp_runs["packed_trainer_run", r], ddp_runs["packed_hand_loop", r]
        assert len(tr["seen"]) == W.STEPS
        same_ddp(tr, hand)
    assert ddp_runs["packed_trainer_run", 0]["seen"] != ddp_runs["packed_trainer_run", 1]["seen"]
    s0, s1 = (ddp_runs["packed_trainer_run", r]["state"].nan_to_num(-1) for r in range(2))
    assert torch.equal(s0, s1)


@pytest.mark.slow
def test_trainer_packed_ddp_hidden_eswp_dropout_matches_hand_loop(ddp_runs):
    # scoring from the hidden states, DistributedESWPSampler into its pruned epochs, dropout in training
    import dist_packed_workers as W

    for r in range(2):
        tr, hand = ddp_runs["packed_trainer_hidden", r]["full"], ddp_runs["packed_hand_hidden", r]
        assert len(tr["seen"]) == W.HIDDEN_STEPS and tr["pruned"]
        assert tr["plans"] == hand["plans"] and max(e for e, _ in tr["plans"]) >= 2
        same_ddp(tr, hand)
    full = [ddp_runs["packed_trainer_hidden", r]["full"] for r in range(2)]
    assert full[0]["seen"] != full[1]["seen"] and full[0]["plans"] == full[1]["plans"]
    assert torch.equal(full[0]["state"].nan_to_num(-1), full[1]["state"].nan_to_num(-1))
    for k in full[0]["params"]:
        assert torch.equal(full[0]["params"][k], full[1]["params"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("name", ["packed_trainer_hidden", "packed_resume_scoring_dropout"])
def test_trainer_packed_ddp_resume_is_exact(ddp_runs, name):
    # the checkpoint at step SAVE_AT is in the middle of loader epoch 1, in pruned ESWP epochs
    import dist_packed_workers as W

    for r in range(2):
        full, resumed = ddp_runs[name, r]["full"], ddp_runs[name, r]["resumed"]
        assert full["pruned"]
        assert resumed["global_step"] == W.HIDDEN_STEPS and resumed["plans"] == full["plans"]
        same_ddp({**full, "seen": full["seen"][W.SAVE_AT :]}, resumed)
