"""Shared fixtures: the backends under test, random inputs, hypothesis profile.

Each backend exposes the six ops with the schemas' signatures (see
es_kernels/_ops.py). Every op test runs on every backend present here and
compares against es_kernels.reference. The "cpp" backend is whatever
``torch.ops.es_kernels`` runs on CPU tensors: the C++ kernels, or, with
ES_KERNELS_NO_CPP=1 (a pure-Python install), the reference fallback.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import es_kernels  # noqa: E402
from es_kernels import reference as R  # noqa: E402

try:
    from es_kernels._triton import ops as triton_ops
except ImportError:  # Triton not installed: the C++ backend alone is tested
    triton_ops = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH = Path(__file__).resolve().parents[1] / "bench"


def aot_harness():
    """bench/aot.py, the ahead-of-time compile harness (bench tooling, not in
    the package), imported as ``aot`` with bench/ on ``sys.path``; the
    calling test skips where there is no bench/ (the sdist ships python_tests/ alone)."""
    if not (BENCH / "aot.py").is_file():
        pytest.skip("bench/aot.py is not here (a checkout's tooling)", allow_module_level=True)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import aot

    return aot


settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

OP_NAMES = es_kernels._ops.OP_NAMES


def _torch_ops_backend():
    name = "cpp" if es_kernels._ops.HAS_CPP else "fallback"
    return types.SimpleNamespace(
        name=name,
        device="cpu",
        state_dtypes=(torch.float32, torch.float64),
        **{n: getattr(torch.ops.es_kernels, n) for n in OP_NAMES},
    )


def _on_device(fn, device):
    """Run an op on ``device`` for tests written with CPU tensors: inputs are
    copied there, in-place arguments copied back, outputs returned on the CPU."""
    if device == "cpu":
        return fn

    def call(*args, **kwargs):
        moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        kmoved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = fn(*moved, **kmoved)
        pairs = list(zip(args, moved)) + [(kwargs[k], kmoved[k]) for k in kwargs]
        for a, m in pairs:  # what the op mutated (inputs copy back unchanged)
            if isinstance(a, torch.Tensor):
                a.copy_(m.cpu())
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    return call


def _triton_backend():
    ops = {n: _on_device(f, DEVICE) for n, f in triton_ops.OPS.items()}
    return types.SimpleNamespace(name="triton", device=DEVICE, state_dtypes=(torch.float32,), **ops)


BACKENDS = {"cpp": _torch_ops_backend}
if triton_ops is not None:
    BACKENDS["triton"] = _triton_backend


@pytest.fixture(params=sorted(BACKENDS), scope="session")
def backend(request):
    return BACKENDS[request.param]()


def new_state(n, dtype=torch.float32, observed=0.5, seed=0):
    """An (state [N, 2], errors [2]) pair with a fraction of observed samples."""
    g = torch.Generator().manual_seed(seed)
    state = torch.zeros((n, 2), dtype=dtype)
    state[:, 0] = float("nan")
    seen = torch.rand(n, generator=g) < observed
    state[seen, 0] = (torch.rand(int(seen.sum()), generator=g) * 4).to(dtype)
    state[seen, 1] = (torch.randn(int(seen.sum()), generator=g) * 0.3).to(dtype)
    return state, torch.zeros(2, dtype=torch.int64)


def clone_all(t):
    return tuple(x.clone() for x in t)


def read_ahead(loader):
    """Iterate like accelerate's DataLoaderShard: batch i+1 is fetched before
    batch i is handed out. ESWP plans are made when the stream is first read
    past the previous plan, so the read-ahead depth decides which ES state a
    plan sees; the hand loop reads ahead as the Trainer does."""
    it = iter(loader)
    cur = next(it)
    for nxt in it:
        yield cur
        cur = nxt
    yield cur


def bad_select_forms() -> dict:
    """Bad input to every form of a sampler's ``select`` (a sampler of N = 40,
    meta_batch 6): the error message each must raise, and the keyword arguments
    that give it. Shared by the replicated and sharded distributed samplers' tests."""
    ids, seg = torch.arange(4), torch.zeros(4, 5, dtype=torch.int64)
    hid, wt, tgt = torch.randn(4, 5, 3), torch.randn(7, 3), torch.randint(0, 7, (4, 5))
    return {
        "weight and targets must be given with hidden": dict(ids=ids, hidden=hid, targets=tgt),
        "ids must be None when segment_ids": dict(ids=ids, segment_ids=seg, losses=torch.rand(4, 5)),
        "weight must have shape": dict(ids=ids, hidden=hid, weight=torch.randn(7, 2), targets=tgt),
        "ids must have the batch size of hidden": dict(ids=ids[:3], hidden=hid, weight=wt, targets=tgt),
        "shift_labels=True needs logits": dict(ids=ids, logits=torch.randn(4, 7), targets=tgt[:, 0], shift_labels=True),
        "segment_ids must have shape": dict(segment_ids=seg[:, :4], hidden=hid, weight=wt, targets=tgt),
        "losses must be floating point": dict(ids=ids, losses=torch.ones(4, dtype=torch.int64)),
        "ids must have dtype": dict(ids=ids.double(), logits=torch.randn(4, 7), targets=tgt[:, 0]),
        "hidden requires grad": dict(ids=ids, hidden=hid.clone().requires_grad_(), weight=wt, targets=tgt),
    }


def assert_state_equal(a, b):
    """Bit-exact equality of (state, errors), NaN == NaN, -0 != +0."""
    for x, y, name in zip(a, b, ("state", "errors")):
        if x.is_floating_point():
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert torch.equal(
                x.nan_to_num(7.25).view(torch.int32 if x.dtype == torch.float32 else torch.int64),
                y.nan_to_num(7.25).view(torch.int32 if y.dtype == torch.float32 else torch.int64),
            ), name
        else:
            assert torch.equal(x, y), name


@pytest.fixture
def reference():
    return R


@pytest.fixture
def api():
    return es_kernels


# -- Lightning: the module and trainer of the integration tests --------------------------------
def import_lightning():
    """``lightning.pytorch``, or skip the test where Lightning is not installed."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        pytest.skip("lightning is not installed (pip install -e '.[integrations]')")
    return pl


def lit_module(pl, n, batch_size, *, es=None, eswp=None, dropout=0.0, score_in_eval_mode=True, es_ids=True):
    """An ``ESLightningMixin`` module: a linear classifier (6 features, 5
    classes; with ``dropout``, a hidden layer of 16 and dropout) on ``n``
    random samples, plain SGD (lr 0.5), batches of ``batch_size``. ``es``
    (with ``eswp``) is set up in ``__init__`` when given; ``es_ids=False``
    serves a plain ``DataLoader`` (batches without ``es_id``)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from es_kernels.integrations.lightning import ESLightningMixin

    class Lit(ESLightningMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            if dropout:
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(6, 16), torch.nn.Dropout(dropout), torch.nn.Linear(16, 5)
                )
            else:
                self.net = torch.nn.Linear(6, 5)
            self.es_score_in_eval_mode = score_in_eval_mode
            if es is not None:
                self.es_setup(es, eswp=eswp)
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)
            self.data = [{"x": x[i], "y": y[i]} for i in range(n)]

        def es_sample_losses(self, batch):
            return F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")

        def training_step(self, batch, i):
            return self.es_loss(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            if es_ids:
                return self.es_dataloader(self.data, batch_size=batch_size)
            return DataLoader(self.data, batch_size=batch_size)

    return Lit()


def lit_trainer(pl, root, **kw):
    """A quiet CPU ``pl.Trainer`` writing under ``root``; ``kw`` as ``pl.Trainer`` takes them."""
    return pl.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
