"""Train a causal language model with Evolved Sampling on several GPUs.

    torchrun --nproc-per-node 8 examples/train_lm_ddp.py --model gpt2 \
        --dataset wikitext --dataset-config wikitext-103-raw-v1 --output-dir runs/es
    # the same command again resumes from the last checkpoint in --output-dir

What it puts together (docs/distributed.md, "A language model on many GPUs"):
the Hugging Face Trainer as ESTrainer; packed rows (DataCollatorWithFlattening:
each meta-batch's documents end to end in one row, so ES observes and selects
documents); the scoring pass from the last hidden states and the lm_head
weight (no [B, T, V] logits); DistributedEvolvedSampler and, with
--prune-ratio > 0, DistributedESWPSampler (a replica of the ES state on every
rank, every rank's observations applied to each); checkpoints every
--save-steps steps, and a bit-exact resume from the last one.

Each rank scores --meta-batch documents a step and trains --mini-batch of
them: the global batch is W x --mini-batch documents.

--tiny runs a tiny random-init GPT-2 on synthetic documents on the CPU (gloo):

    torchrun --nproc-per-node 2 examples/train_lm_ddp.py --tiny --output-dir /tmp/es-tiny

Needs es-kernels[integrations] (transformers, accelerate); --dataset needs
the datasets package.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from transformers import DataCollatorWithFlattening, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from es_kernels import ESWPSampler, EvolvedSampler
from es_kernels.integrations.transformers import ESTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", help="a causal LM: a Hugging Face Hub name or a local folder")
    ap.add_argument("--dataset", default="wikitext", help="a Hugging Face datasets name (or a local folder)")
    ap.add_argument("--dataset-config", default="wikitext-2-raw-v1")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--seq-len", type=int, default=1024, help="documents are cut to this many tokens")
    ap.add_argument("--output-dir", default="runs/es-lm")
    ap.add_argument("--meta-batch", type=int, help="documents each rank scores a step (32; --tiny: 4)")
    ap.add_argument("--mini-batch", type=int, help="documents each rank trains a step (8; --tiny: 2)")
    ap.add_argument("--prune-ratio", type=float, default=0.0, help="> 0: ESWP, pruning the well-learned documents")
    ap.add_argument("--eswp-epochs", type=int, help="ESWP's num_epochs, for its annealing (default: the passes)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=-1, help="> 0: train this many steps instead of --epochs")
    ap.add_argument("--save-steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPUs)")
    ap.add_argument("--no-resume", action="store_true", help="start over even if --output-dir has a checkpoint")
    ap.add_argument("--tiny", action="store_true", help="a tiny random-init GPT-2 on synthetic documents, CPU")
    a = ap.parse_args(argv)
    a.meta_batch = a.meta_batch or (4 if a.tiny else 32)
    a.mini_batch = a.mini_batch or (2 if a.tiny else 8)
    return a


def tiny_model_and_data(seed: int, n: int = 32, seq_len: int = 16):
    """A 2-layer GPT-2 (dropout on) and ``n`` documents of 2 to ``seq_len`` random tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    special = {"bos_token_id": 256, "eos_token_id": 256}
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=257, n_positions=seq_len, **special))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, seq_len + 1, (n,), generator=g).tolist()
    docs = [{"input_ids": torch.randint(0, 257, (k,), generator=g).tolist()} for k in lengths]
    return model, docs


def model_and_data(a: argparse.Namespace):
    """The model and a list-like data set of documents ``{"input_ids": [...]}`` (none empty:
    DataCollatorWithFlattening drops empty items, which ES refuses)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a.model)
    tok = AutoTokenizer.from_pretrained(a.model)
    raw = load_dataset(a.dataset, a.dataset_config, split="train")
    raw = raw.filter(lambda ex: len(ex[a.text_column].strip()) > 0)

    def tokenize(batch):
        return {"input_ids": [ids[: a.seq_len] for ids in tok(batch[a.text_column])["input_ids"]]}

    docs = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    return model, docs.filter(lambda ex: len(ex["input_ids"]) >= 2)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    cpu = a.tiny or not torch.cuda.is_available()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun
    args = TrainingArguments(  # under torchrun, this initialises the process group
        output_dir=a.output_dir,
        per_device_train_batch_size=a.meta_batch,  # the meta-batch B, per rank
        learning_rate=a.lr,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        save_strategy="steps",
        save_steps=a.save_steps,
        logging_steps=max(1, a.save_steps // 10),
        seed=a.seed,
        bf16=a.bf16,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and launched else None,
        ddp_find_unused_parameters=False,
        report_to=[],
        disable_tqdm=a.tiny,
    )
    with args.main_process_first(desc="loading and tokenizing"):  # the other ranks then read its cache
        model, docs = tiny_model_and_data(a.seed) if a.tiny else model_and_data(a)
    model.config.use_cache = False  # with a cache, transformers would ignore the packing
    n, device = len(docs), args.device
    if args.world_size > 1:  # built after the process group: on every rank, with the same arguments
        from es_kernels.distributed import DistributedESWPSampler, DistributedEvolvedSampler

        es = DistributedEvolvedSampler(n, mini_batch=a.mini_batch, meta_batch=a.meta_batch, seed=a.seed, device=device)
        Pruner = DistributedESWPSampler
    else:  # one process (python examples/train_lm_ddp.py)
        es, Pruner = EvolvedSampler(n, mini_batch=a.mini_batch, seed=a.seed, device=device), ESWPSampler
    # ESWP counts its own epochs (a pruned one is shorter than the Trainer's): the passes over the data
    passes = a.epochs if a.max_steps <= 0 else a.max_steps * a.meta_batch * args.world_size / n
    eswp_epochs = a.eswp_epochs or max(1, math.ceil(passes))
    eswp = Pruner(es, num_epochs=eswp_epochs, prune_ratio=a.prune_ratio, seed=a.seed) if a.prune_ratio > 0 else None
    trainer = ESTrainer(
        model=model,
        args=args,
        train_dataset=docs,
        data_collator=DataCollatorWithFlattening(),  # packed rows: one per meta-batch
        es_sampler=es,
        eswp=eswp,
        es_score_from_hidden=True,  # score from the hidden states and lm_head.weight
    )
    last = None if a.no_resume or not os.path.isdir(a.output_dir) else get_last_checkpoint(a.output_dir)
    if last is not None and args.process_index == 0:
        print(f"resuming from {last}", flush=True)
    trainer.train(resume_from_checkpoint=last)  # last: the ES state and the stream resume bit for bit
    trainer.save_model()  # the final model in --output-dir
    if torch.distributed.is_initialized():  # left to the interpreter's exit, gloo's threads can abort a rank
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
