"""The demo's language-model task (``es-kernels demo --task lm``): a small
GPT-2 built from a ``transformers`` config (random init, nothing downloaded)
trained on the Python standard library's own sources, bytes as tokens.

Corpus. The top-level ``*.py`` files of the running interpreter's standard
library (``sysconfig.get_paths()["stdlib"]``), sorted by name; a file is
held out when ``zlib.crc32(name) % 10 == 0`` (about a tenth, the split is by
file, so held-out text is never trained on). Each side's files are joined
(in name order, a newline between files) and cut into non-overlapping
windows of ``seq_len`` bytes (the tail shorter than a window is dropped, so
every sequence has exactly ``seq_len - 1`` targets); a fixed generator (seed
0, whatever the run's seed) draws ``lm_train_seqs`` training and
``lm_test_seqs`` held-out windows. The corpus depends on the Python version
(its standard library), not on the run: the JSON records the files' count
and bytes.

Vocabulary: the 256 byte values plus a padding id (256), which fixed-length
windows never use; labels equal the input ids (the Hugging Face convention:
``logits[:, t]`` is scored against ``labels[:, t + 1]``).

Losses. A sequence's training loss (and ES's score) is the mean
cross-entropy over its targets; the held-out loss is the mean over all
held-out targets, in nats per byte. ES scores the meta-batch from the last
hidden states and the tied ``lm_head`` weight with
:func:`es_kernels.per_sample_losses_from_hidden` (``shift_labels=True``;
what ``EvolvedSampler.select(ids, hidden=..., weight=..., targets=labels,
shift_labels=True)`` computes): the ``[B, T, V]`` logits of the scoring pass
are never materialised.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..lm import per_sample_losses_from_hidden
from . import metrics as M

VOCAB = 257  # 256 bytes + padding
PAD_ID = 256
IGNORE = -100
INSTALL_HINT = 'pip install "es-kernels[demo,integrations]" (or pip install transformers)'


def stdlib_files() -> list:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)


def is_held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % 10 == 0


def _windows(files, seq_len: int) -> torch.Tensor:
    data = b"\n".join(f.read_bytes() for f in files)
    n = len(data) // seq_len
    return torch.frombuffer(bytearray(data[: n * seq_len]), dtype=torch.uint8).view(n, seq_len).long()


def load_corpus(seq_len: int, n_train: int, n_test: int) -> tuple:
    """``(train [n_train, seq_len], held_out [n_test, seq_len], info)``: int64 byte ids."""
    files = stdlib_files()
    if not files:
        raise RuntimeError(f"no *.py files in the standard library folder {sysconfig.get_paths()['stdlib']}")
    out: list[torch.Tensor] = []
    info: dict[str, object] = {"stdlib": str(files[0].parent)}
    g = torch.Generator().manual_seed(0)
    for side, held, n in (("train", False, n_train), ("held_out", True, n_test)):
        chosen = [f for f in files if is_held_out(f.name) == held]
        win = _windows(chosen, seq_len)
        if win.shape[0] < n:
            raise ValueError(f"the {side} files give {win.shape[0]} windows of {seq_len} bytes, fewer than {n}")
        out.append(win[torch.randperm(win.shape[0], generator=g)[:n]].contiguous())
        info[side] = {"files": len(chosen), "bytes": sum(f.stat().st_size for f in chosen), "windows": win.shape[0]}
    return out[0], out[1], info


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` (with autograd)."""
    tgt = labels[:, 1:]
    tok = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none", ignore_index=IGNORE
    ).view_as(tgt)
    count = (tgt != IGNORE).sum(1)
    return tok.sum(1) / count.clamp(min=1)


class LMTask:
    """The LM problem the demo's training loop runs (the classification one
    is :class:`es_kernels.demo.run.Classification`): data, model, per-sample
    losses, ES's scoring pass and the held-out evaluation."""

    goal = M.LM_LOSS

    def __init__(self, cfg):
        import transformers  # noqa: F401  (fail here, with the install hint, before any training)

        self.cfg = cfg
        train, test, self.info = load_corpus(cfg.lm_seq_len, cfg.lm_train_seqs, cfg.lm_test_seqs)
        self.xtr = self.ytr = train  # labels = input ids
        self.xte = test
        self.tokens_per_sample = cfg.lm_seq_len - 1  # targets per sequence (no padding)

    def to(self, dev: torch.device) -> LMTask:
        self.xtr = self.ytr = self.xtr.to(dev)
        self.xte = self.xte.to(dev)
        return self

    def model(self, seed: int) -> torch.nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.cfg
        torch.manual_seed(seed)
        conf = GPT2Config(
            vocab_size=VOCAB,
            n_positions=c.lm_seq_len,
            n_embd=c.lm_width,
            n_layer=c.lm_layers,
            n_head=c.lm_heads,
            resid_pdrop=0.0,  # no dropout: the scoring pass sees the model the training step trains
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=PAD_ID,
            bos_token_id=PAD_ID,
            eos_token_id=PAD_ID,
        )
        conf._attn_implementation = "sdpa"
        return GPT2LMHeadModel(conf)

    def losses(self, model, x, y) -> torch.Tensor:
        return sequence_losses(model(input_ids=x).logits, y)

    def score(self, net, x, y) -> dict:
        """ES's scoring pass, as ``select``'s arguments (the caller holds
        inference_mode): per-sequence losses from the last hidden states and
        the ``lm_head`` weight, never the logits. The losses (not
        ``select(hidden=...)``, which computes the same ones) so that the
        distributed sampler takes them too."""
        hidden = net.transformer(input_ids=x).last_hidden_state
        return {"losses": per_sample_losses_from_hidden(hidden, net.lm_head.weight, y, shift_labels=True)}

    @torch.inference_mode()
    def evaluate(self, net, batch: int = 256) -> float:
        """Held-out loss, nats per byte (mean over every held-out target)."""
        net.eval()
        total = 0.0  # every sequence has tokens_per_sample targets: the mean of the sequences' means
        for i in range(0, self.xte.shape[0], batch):
            x = self.xte[i : i + batch]
            total += float(sequence_losses(net(input_ids=x).logits, x).double().sum())
        net.train()
        return total / self.xte.shape[0]

    def describe(self) -> dict:
        return {
            "n_train": int(self.xtr.shape[0]),
            "n_test": int(self.xte.shape[0]),
            "tokens_per_sample": self.tokens_per_sample,
            "corpus": self.info,
        }
