"""Peak host memory of one ESTrainer step with ``bf16=True`` on the CPU, where
the scoring pass dominates: B=8 rows of T=512 tokens, V=32000, mini_batch 1,
a 1-layer GPT-2 (random init, nothing downloaded).

    python bench/bench_trainer_mem.py      # prints a table; each mode in a fresh process

Modes: ``logits`` (ESTrainer's scoring pass: the unwrapped model under
autocast, bfloat16 logits), ``wrapped`` (the scoring pass through accelerate's
wrapper of the training model, which returns a float32 copy of the logits),
``hidden`` (``es_score_from_hidden=True``). The number is the growth of the
process's peak RSS over ``trainer.train()``.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile

N, B, T, V = 8, 8, 512, 32000
MODES = ("logits", "wrapped", "hidden")


def run(mode: str) -> tuple[float, dict]:
    """One training step in this process; returns (peak RSS growth in MiB, the dtypes ``select`` got)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    import es_kernels as ek
    from es_kernels.integrations.transformers import ESTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=V, n_positions=T))
    x = torch.randint(0, V, (N, T))
    data = [{"input_ids": x[i], "labels": x[i]} for i in range(N)]

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels")}

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=B,
        max_steps=1,
        bf16=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        optim="sgd",
        learning_rate=0.1,
    )
    es = ek.EvolvedSampler(N, mini_batch=1)
    tr = ESTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        es_sampler=es,
        es_score_from_hidden=mode == "hidden",
    )
    if mode == "wrapped":
        tr._es_forward = lambda module, inputs: (tr.model_wrapped(**inputs), None)
    seen = []
    select = es.select

    def record(ids, **kw):
        seen.append({k: str(v.dtype) for k, v in kw.items() if isinstance(v, torch.Tensor)})
        return select(ids, **kw)

    es.select = record
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tr.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) / 1024, seen[0]


def main() -> None:
    print(f"bf16 logits [B, T, V] = [{B}, {T}, {V}]: {B * T * V * 2 / 2**20:.0f} MiB")
    print("| scoring pass | select receives | peak RSS growth of the step (MiB) |\n|---|---|---|")
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        mib, dtypes = run(sys.argv[1])
        print(f"| {sys.argv[1]} | {', '.join(f'{k} {v[6:]}' for k, v in dtypes.items())} | {mib:.0f} |")
    else:
        main()
