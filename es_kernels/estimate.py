"""Will ES pay on my model? Time its parts on the user's model and a batch.

ES trains ``b`` of every meta-batch of ``B`` samples, but on a step that
scores the meta-batch it also runs a forward pass without autograd over all
``B``. What that costs against a training step depends on the model and the
hardware: the common "scoring costs a third" assumes a backward pass of twice
the forward, which holds for large matrix multiplies and not for small models,
where launch overheads, the optimizer and the data movement weigh as much as
the arithmetic. :func:`estimate_cost` measures the parts on the user's own
model and data:

* ``train_full``: a training step (forward, backward, optimizer) on ``B`` rows;
* ``train_mini``: the same on ``b`` rows (uniform sampling's step, and ES's
  training pass);
* ``score``: the scoring pass, a forward without autograd over ``B`` rows and
  the per-sample losses;
* ``es_step``: the fused ES step on those losses (update and selection);
* ``from_state``: a non-scoring step's selection from the stored state and
  the observation of the picks' training losses (the scoring schedules).

and :meth:`CostEstimate.report` says what each schedule costs per meta-batch
against full training and against uniform sampling, with a plain warning
where ES cannot pay.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import torch

from ._spec import DEFAULT_LAM
from .functional import es_step_from_losses, es_update, per_sample_cross_entropy, weighted_select
from .state import ESState

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}

# The scoring schedules the report prices, by the share of steps that score the
# meta-batch (the rest select from the stored state).
SCHEDULES = (
    ("every step", 1.0),  # schedule="step"
    ("every 3rd epoch", 1.0 / 3.0),  # schedule="epoch:3"
    ("a third of steps", 1.0 / 3.0),  # schedule="fraction:0.333"
    ("10% of steps", 0.1),  # schedule="fraction:0.1"
)


class CostEstimate(NamedTuple):
    """Measured seconds of the parts of a step (medians over the repeats).

    Attributes
    ----------
    meta_batch, mini_batch : int
        ``B`` and ``b``.
    train_full, train_mini : float
        A training step (forward, backward, optimizer) on ``B`` / ``b`` rows.
    score : float
        The scoring pass: forward without autograd over ``B`` rows and the
        per-sample losses.
    es_step : float
        The fused ES step on the scoring pass's ``B`` losses.
    from_state : float
        A non-scoring step's ES work: the selection from the stored weights
        of ``B`` ids and the observation of ``b`` training losses.
    clock : str
        ``"wall"`` or ``"process"`` (this process's CPU time).
    """

    meta_batch: int
    mini_batch: int
    train_full: float
    train_mini: float
    score: float
    es_step: float
    from_state: float
    clock: str

    def step_cost(self, scoring_fraction: float = 1.0) -> float:
        """ES's time per meta-batch as a fraction of a full training step.

        Parameters
        ----------
        scoring_fraction : float in [0, 1]
            The share of steps that run the scoring pass (1: every step, as
            the plain :class:`~es_kernels.EvolvedSampler` does).

        Returns
        -------
        float
            ``(f (score + es_step) + (1 - f) from_state + train_mini) / train_full``.

        Notes
        -----
        Host arithmetic only (no synchronisation).
        """
        f = float(scoring_fraction)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"scoring_fraction must be in [0, 1], got {scoring_fraction!r}")
        es = f * (self.score + self.es_step) + (1.0 - f) * self.from_state + self.train_mini
        return es / self.train_full

    @property
    def uniform_cost(self) -> float:
        """Uniform sampling's time per meta-batch (``b`` of ``B``) as a fraction of a full step."""
        return self.train_mini / self.train_full

    @property
    def score_ratio(self) -> float:
        """The scoring pass's time as a fraction of a full training step (the
        "one third" that a backward of twice the forward would give)."""
        return self.score / self.train_full

    def report(self, schedules: Sequence[tuple[str, float]] = SCHEDULES) -> str:
        """What ES and each scoring schedule cost, in plain words.

        Parameters
        ----------
        schedules : sequence of (str, float)
            ``(name, scoring fraction)`` pairs to price (default: every step,
            every 3rd epoch, a third of the steps, 10% of the steps: the
            ``EvolvedSampler`` schedules ``"step"``, ``"epoch:3"``,
            ``"fraction:0.333"``, ``"fraction:0.1"``).

        Returns
        -------
        str
            A few lines: the measured parts, each schedule's cost per
            meta-batch against full training and uniform sampling, the
            speed-up ES must reach to beat uniform sampling given the same
            time, and a warning where ES cannot pay.

        Notes
        -----
        Host arithmetic only (no synchronisation).
        """
        B, b = self.meta_batch, self.mini_batch
        unit = "CPU s" if self.clock == "process" else "s"
        ms = lambda x: f"{1e3 * x:.2f} ms"  # noqa: E731
        lines = [
            f"Measured ({self.clock} clock, {unit}; B = {B}, b = {b}):",
            f"  training step on B rows   {ms(self.train_full)}   (full training)",
            f"  training step on b rows   {ms(self.train_mini)}   ({self.uniform_cost:.2f} of full: uniform sampling)",
            f"  scoring pass on B rows    {ms(self.score)}   ({self.score_ratio:.2f} of a full step; "
            "a backward of twice the forward would give 0.33)",
            f"  fused ES step             {ms(self.es_step)}",
            f"  selection from the state  {ms(self.from_state)}   (non-scoring steps)",
            "Per meta-batch, as a share of a full training step:",
            f"  {'uniform':<20} {self.uniform_cost:.2f}   {_against_full(self.uniform_cost)}",
        ]
        verdicts = []
        for name, f in schedules:
            c = self.step_cost(f)
            need = self.uniform_cost / c  # ES must need at most this share of uniform's steps
            lines.append(
                f"  {'ES, ' + name:<20} {c:.2f}   {_against_full(c)}; "
                f"beats uniform at equal time only if it reaches the target in < {100 * need:.0f}% of "
                f"uniform's steps"
            )
            verdicts.append((name, c))
        every = self.step_cost(1.0)
        if every >= 0.8:
            lines.append(
                f"WARNING: scoring every step costs {every:.2f} of a full step here: ES (every step) "
                "cannot save much time against full training on this model and hardware; use a "
                "scoring schedule that scores fewer steps, or do not use ES."
            )
        if all(c >= 0.95 for _, c in verdicts):
            lines.append("WARNING: no schedule saves 5% of a full step: ES cannot pay here.")
        lines.append(
            "ES pays when its selection makes each trained sample worth more than a random one: "
            "the demo (es-kernels demo) measures that on its tasks; these numbers only price the steps."
        )
        return "\n".join(lines)


def _against_full(cost: float) -> str:
    if cost <= 1.0:
        return f"saves {100 * (1 - cost):.0f}% of full training's time per epoch"
    return f"costs {100 * (cost - 1):.0f}% MORE than full training per epoch"


def _default_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy with autograd: ``[B, C]`` or the token mean of ``[B, T, V]``."""
    if output.dim() == 2:
        return torch.nn.functional.cross_entropy(output, targets, reduction="none")
    tok = torch.nn.functional.cross_entropy(output.flatten(0, -2), targets.flatten(), reduction="none")
    scored = (targets != -100).sum(-1).clamp_min(1)
    return tok.view(targets.shape).sum(-1) / scored


def _default_forward(model, inputs):
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _rows(x, idx):
    if isinstance(x, torch.Tensor):
        return x[idx]
    if isinstance(x, dict):
        return {k: _rows(v, idx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_rows(v, idx) for v in x)
    return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_cost(
    model: torch.nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    mini_batch: int,
    *,
    loss_fn: Callable | None = None,
    forward: Callable | None = None,
    optimizer: Callable | None = None,
    score: Callable | None = None,
    repeats: int = 7,
    warmup: int = 2,
    clock: str = "wall",
    lam: float = DEFAULT_LAM,
) -> CostEstimate:
    """Time a training step, a scoring pass and ES's own work on the user's model.

    The model is copied (the user's model and its optimizer state are not
    touched); each part runs ``warmup`` times untimed, then the parts run
    interleaved ``repeats`` times and the median of each is kept, so that a
    change of load on a shared machine hits every part alike.

    Parameters
    ----------
    model : torch.nn.Module
        The model, on the device it trains on.
    inputs : Tensor, dict or sequence of Tensors
        One meta-batch of ``B`` rows, as ``forward`` takes it (rows are
        indexed along the first dimension of every tensor).
    targets : Tensor
        The meta-batch's targets, ``[B]`` or ``[B, T]``.
    mini_batch : int in [1, B]
        ``b``, the rows ES trains on per meta-batch.
    loss_fn : callable or None
        ``loss_fn(output, targets) -> [B]`` the training step's per-sample
        losses (default: ``torch.nn.functional.cross_entropy`` per row, the
        mean over the tokens of a ``[B, T, V]`` output).
    forward : callable or None
        ``forward(model, inputs) -> output`` (default ``model(inputs)``, its
        ``.logits`` where it has them).
    optimizer : callable or None
        ``optimizer(parameters) -> torch.optim.Optimizer`` (default AdamW).
    score : callable or None
        ``score(model, inputs, targets) -> [B]`` the scoring pass's
        per-sample losses, run in eval mode without autograd (default
        :func:`es_kernels.per_sample_cross_entropy` of ``forward(model,
        inputs)``, ES's scoring kernel; e.g. the hidden-state
        path of :func:`es_kernels.per_sample_losses_from_hidden` for a
        language model).
    repeats, warmup : int
        Timed rounds (>= 1) and untimed ones (>= 0).
    clock : str
        ``"wall"`` (default) or ``"process"``: this process's CPU time, the
        fair clock on a machine shared with other work (with one thread).
    lam : float
        The ES weight's trend coefficient for the timed fused step.

    Returns
    -------
    CostEstimate
        The medians; :meth:`CostEstimate.report` prints what they mean.

    Raises
    ------
    ValueError
        Naming the argument, for a bad value.

    Notes
    -----
    It synchronises with the host around every timed part (it measures).
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dim() < 1:
        raise ValueError("targets must be a tensor with a batch dimension")
    B = int(targets.shape[0])
    if isinstance(mini_batch, bool) or not isinstance(mini_batch, int) or not 1 <= mini_batch <= B:
        raise ValueError(f"mini_batch must be an int in [1, {B}], got {mini_batch!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    loss_fn = loss_fn or _default_loss
    forward = forward or _default_forward
    make_opt = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
    now = CLOCKS[clock]

    net = copy.deepcopy(model)
    net.train()
    opt = make_opt(net.parameters())
    device = targets.device
    mini = torch.arange(mini_batch, device=device)
    x_b, y_b = _rows(inputs, mini), targets[mini]
    state = ESState(B, device=device)
    ids = torch.arange(B, device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)

    def train(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(net, x), y).float().mean()
        loss.backward()
        opt.step()

    scored = {}

    score_fn = score or (lambda m, x, y: per_sample_cross_entropy(forward(m, x), y))

    def run_score():
        net.eval()
        with torch.no_grad():
            scored["losses"] = score_fn(net, inputs, targets).float()
        net.train()

    def fused():
        es_step_from_losses(scored["losses"], ids, state, mini_batch, lam=lam, step=step, advance_step=True)

    def from_state():
        w = state.weights(lam=lam)
        pos = weighted_select(w[ids], mini_batch, step=step)
        es_update(ids[pos], scored["losses"][pos], state, lam=lam)

    parts = {
        "train_full": lambda: train(inputs, targets),
        "train_mini": lambda: train(x_b, y_b),
        "score": run_score,
        "es_step": fused,
        "from_state": from_state,
    }
    run_score()  # the ES parts read its losses
    for _ in range(warmup):
        for fn in parts.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeats):
        for k, fn in parts.items():
            _sync(device)
            t0 = now()
            fn()
            _sync(device)
            times[k].append(now() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return CostEstimate(meta_batch=B, mini_batch=mini_batch, clock=clock, **med)


# ------------------------------------------------------------------ the CLI
def _demo_case(task: str, meta_batch: int, device: torch.device, hidden: int):
    """(model, inputs, targets, extra estimate_cost keywords) for a demo task."""
    from .demo.config import Config
    from .demo.loop import as_task
    from .demo.tasks import load_dataset

    if task == "lm":
        from .demo.lmtask import sequence_losses
        from .lm import per_sample_losses_from_hidden

        cfg = Config(task="lm", datasets=("lm",), lm_train_seqs=max(meta_batch, 64), lm_test_seqs=8)
        t = load_dataset("lm", cfg).to(device)
        model = t.model(0).to(device)
        x = t.xtr[:meta_batch]

        def score(m, x, y):  # the demo's scoring pass: hidden states, never the logits
            h = m.transformer(input_ids=x, use_cache=False).last_hidden_state
            return per_sample_losses_from_hidden(h, m.lm_head.weight, y, shift_labels=True)

        extra = dict(
            forward=lambda m, x: m(input_ids=x, use_cache=False).logits,
            loss_fn=sequence_losses,
            score=score,
        )
        return model, x, x, extra
    cfg = Config(datasets=(task,), hidden=hidden, mnist1d_samples=max(4000, meta_batch))
    t = as_task(load_dataset(task, cfg), cfg)
    model = t.model(0).to(device)
    return model, t.xtr[:meta_batch].to(device), t.ytr[:meta_batch].to(device), {}


def _user_case(spec: str):
    import importlib

    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"--model must be MODULE:FUNCTION, got {spec!r}")
    made = getattr(importlib.import_module(mod), fn)()
    if not isinstance(made, tuple) or len(made) not in (3, 4):
        raise ValueError(f"{spec}() must return (model, inputs, targets) or (model, inputs, targets, options)")
    model, x, y, *extra = made
    return model, x, y, (extra[0] if extra else {})


def main(argv=None) -> int:
    """``es-kernels estimate``: what ES and each scoring schedule cost on a model.

    Parameters
    ----------
    argv : list of str or None
        The command line (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.

    Notes
    -----
    Synchronises the device (it measures).
    """
    import argparse

    class Formatter(argparse.ArgumentDefaultsHelpFormatter):  # no "(default: None)" for an unset option
        def _get_help_string(self, action):
            return action.help if action.default is None else super()._get_help_string(action)

    ap = argparse.ArgumentParser(
        prog="es-kernels estimate",
        description="Time a training step, ES's scoring pass and its fused step on a model and one "
        "meta-batch of its data, and print what ES and each scoring schedule cost against full "
        "training and uniform sampling.",
        formatter_class=Formatter,
    )
    ap.add_argument(
        "--task", default="mnist1d", choices=("mnist1d", "digits", "lm"), help="a demo task's model and data"
    )
    ap.add_argument(
        "--model",
        default=None,
        metavar="MODULE:FUNCTION",
        help="your own case instead of --task: FUNCTION() returns (model, inputs, targets) or "
        "(model, inputs, targets, options), options being estimate_cost keywords (default: --task's)",
    )
    ap.add_argument("--meta-batch", type=int, default=512, metavar="B", help="rows per meta-batch (demo tasks)")
    ap.add_argument("--mini-batch", type=int, default=None, metavar="b", help="rows ES trains on (default: B/3)")
    ap.add_argument("--hidden", type=int, default=1024, metavar="N", help="the demo MLP's width (classification tasks)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads (default: torch's)")
    ap.add_argument(
        "--clock", default="wall", choices=tuple(CLOCKS), help="wall: real time; process: this process's CPU time"
    )
    ap.add_argument("--repeats", type=int, default=7, metavar="N", help="timed rounds (the median is kept)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model:
        model, x, y, extra = _user_case(args.model)
    else:
        model, x, y, extra = _demo_case(args.task, args.meta_batch, device, args.hidden)
    B = int(y.shape[0])
    b = args.mini_batch if args.mini_batch is not None else max(1, B // 3)
    est = estimate_cost(model, x, y, b, clock=args.clock, repeats=args.repeats, **extra)
    what = args.model or f"the demo's {args.task} model"
    print(f"es-kernels estimate: {what} on {device}, {torch.get_num_threads()} thread(s)")
    print(est.report())
    return 0
