"""The main job: train a small network on real data with five methods and
compare wall-clock, backward work and test accuracy.

    es-kernels demo                  # default run (about 10 minutes on 2 cores)
    es-kernels demo --quick          # under 2 minutes
    es-kernels demo --label-noise 0.4
    es-kernels demo --ablate         # the beta1 x beta2 grid behind the defaults
    es-kernels demo --nproc 2        # every method under DDP on 2 gloo processes

Methods, each with the same optimizer, model and epochs:

* ``full``: backprop the whole meta-batch of B samples;
* ``uniform``: b random samples of each meta-batch (ES's backward budget);
* ``es``: Evolved Sampling, b of B chosen by the fused ``es_step``;
* ``eswp``: ES with pruning (ESWPSampler) on top;
* ``infobatch``: the InfoBatch rule as the peer baseline: each epoch, drop
  samples whose last loss is below the mean with probability r, rescale the
  kept ones by 1/(1-r), anneal; backprop whole meta-batches of what is kept.

Data, all generated or shipped locally: MNIST-1D made by the ``mnist1d``
package (``make_dataset``, never its download) and scikit-learn's bundled
handwritten digits.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .functional import DEFAULT_BETA1, DEFAULT_BETA2, es_update
from .sampler import ESWPSampler, EvolvedSampler

METHODS = ("full", "uniform", "es", "eswp", "infobatch")


@dataclass
class Config:
    datasets: tuple = ("mnist1d", "digits")
    seeds: int = 3
    epochs: int = 30
    meta_batch: int = 512
    mini_batch: int = 96
    hidden: int = 1024
    lr: float = 1e-3
    mnist1d_samples: int = 20000
    label_noise: float = 0.0
    beta1: float = DEFAULT_BETA1
    beta2: float = DEFAULT_BETA2
    prune_ratio: float = 0.5
    anneal_frac: float = 0.125
    methods: tuple = METHODS
    threads: int = field(default_factory=torch.get_num_threads)
    nproc: int = 1  # processes (DDP, gloo); the global meta-batch and mini-batch are split among them


QUICK = dict(epochs=8, mnist1d_samples=6000, hidden=512)


# ---------------------------------------------------------------- data
def load_dataset(name: str, cfg: Config):
    """(x_train, y_train, x_test, y_test, num_classes) as float32 / int64 tensors."""
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = cfg.mnist1d_samples
        data = make_dataset(args)  # generated locally, no download
        xtr, ytr, xte, yte = data["x"], data["y"], data["x_test"], data["y_test"]
    elif name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)  # shipped with scikit-learn
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).numpy()
        x, y = x[perm] / 16.0, y[perm]
        cut = int(0.8 * len(y))
        xtr, ytr, xte, yte = x[:cut], y[:cut], x[cut:], y[cut:]
    else:
        raise ValueError(f"dataset must be one of mnist1d, digits; got {name!r}")
    t = lambda a, dt: torch.as_tensor(a).to(dt).contiguous()  # noqa: E731
    return t(xtr, torch.float32), t(ytr, torch.int64), t(xte, torch.float32), t(yte, torch.int64), 10


def corrupt_labels(y: torch.Tensor, p: float, num_classes: int, seed: int) -> torch.Tensor:
    """Symmetric label noise: each label, with probability p, becomes one of
    the other classes uniformly."""
    if p <= 0:
        return y
    g = torch.Generator().manual_seed(10_000 + seed)
    flip = torch.rand(y.shape[0], generator=g) < p
    shift = torch.randint(1, num_classes, y.shape, generator=g)
    return torch.where(flip, (y + shift) % num_classes, y)


# ---------------------------------------------------------------- training
def make_model(d_in: int, hidden: int, k: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, k),
    )


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * acc


def _world() -> tuple:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def train(method: str, data, cfg: Config, seed: int, progress=None) -> dict:
    """One run. Under a process group of W ranks (``--nproc`` or torchrun) each rank
    trains a DDP replica on its shard of every epoch with meta-batch B/W and
    mini-batch b/W; the ES state is replicated (es_kernels.distributed)."""
    xtr, ytr, xte, yte, k = data
    n = xtr.shape[0]
    world, rank = _world()
    B, b = cfg.meta_batch // world, cfg.mini_batch // world
    net = model = make_model(xtr.shape[1], cfg.hidden, k, seed)
    if world > 1:
        from .distributed import DistributedESWPSampler, DistributedEvolvedSampler, shard_indices

        model = torch.nn.parallel.DistributedDataParallel(net)
        ES = functools.partial(DistributedEvolvedSampler, meta_batch=B)
        Pruner = DistributedESWPSampler
    else:
        ES, Pruner = EvolvedSampler, ESWPSampler
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # fused: the optimizer is not the bottleneck
    g = torch.Generator().manual_seed(seed)
    es = pruner = None
    if method in ("es", "eswp"):
        es = ES(n, b, beta1=cfg.beta1, beta2=cfg.beta2, seed=seed)
    if method == "infobatch":  # score = the last training loss: s = l, d = 0
        es = ES(n, B, beta1=0.0, beta2=1.0, seed=seed)
    if method in ("eswp", "infobatch"):
        pruner = Pruner(es, num_epochs=cfg.epochs, prune_ratio=cfg.prune_ratio,
                        anneal_frac=cfg.anneal_frac, seed=seed)
    wall = 0.0
    backward = 0
    curve = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        if pruner is not None:
            pruner.set_epoch(epoch)
            order = torch.tensor(list(pruner), dtype=torch.int64)  # what a DataLoader would draw
        else:
            order = torch.randperm(n, generator=g)
            if world > 1:  # this rank's share, as DistributedSampler (same length on every rank)
                order = torch.tensor(shard_indices(order.tolist(), world, rank, False), dtype=torch.int64)
        for start in range(0, order.shape[0], B):
            ids = order[start : start + B]
            x, y = xtr[ids], ytr[ids]
            if method in ("full", "infobatch"):
                per = F.cross_entropy(model(x), y, reduction="none")
                if method == "infobatch" and world > 1:
                    es.observe(ids, per.detach())  # every rank's losses reach every replica
                elif method == "infobatch":
                    es_update(ids, per.detach(), es.state, beta1=0.0, beta2=1.0)
                    per = per * es.scales_of(ids)
                backward += ids.shape[0]
            elif method == "uniform":
                pos = torch.randperm(ids.shape[0], generator=g)[:b]
                per = F.cross_entropy(model(x[pos]), y[pos], reduction="none")
                backward += pos.shape[0]
            else:
                with torch.no_grad():
                    logits = net(x)  # the scoring pass
                sel = es.select(ids, logits=logits, targets=y)
                pos = sel.positions
                per = F.cross_entropy(model(x[pos]), y[pos], reduction="none") * sel.scales
                backward += pos.shape[0]
            opt.zero_grad(set_to_none=True)
            per.mean().backward()
            opt.step()
        wall += time.perf_counter() - t0
        curve.append([wall, accuracy(net, xte, yte)])  # evaluation is not timed
        if progress is not None:
            progress.set_postfix_str(f"{method} seed {seed} epoch {epoch + 1}/{cfg.epochs} acc {curve[-1][1]:.1f}")
    if es is not None:
        es.state.check()
    if world > 1:  # wall: the slowest rank; backward samples: all ranks
        import torch.distributed as dist

        slowest = torch.tensor([wall], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        back = torch.tensor([backward], dtype=torch.int64)
        dist.all_reduce(back)
        wall, backward = float(slowest), int(back)
    return {"wall_s": wall, "backward_samples": backward, "test_acc": curve[-1][1], "curve": curve}


def _mean_sd(xs):
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(runs: dict) -> dict:
    out = {}
    for method, rs in runs.items():
        out[method] = {
            "wall_s": _mean_sd([r["wall_s"] for r in rs]),
            "test_acc": _mean_sd([r["test_acc"] for r in rs]),
            "backward_samples": _mean_sd([r["backward_samples"] for r in rs]),
        }
    if "full" in out:
        base = out["full"]
        for m, s in out.items():
            s["wall_saving_vs_full"] = 1.0 - s["wall_s"]["mean"] / base["wall_s"]["mean"]
            s["acc_minus_full"] = s["test_acc"]["mean"] - base["test_acc"]["mean"]
    return out


def run_demo(cfg: Config, out_dir: Path, show_progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    world, rank = _world()
    torch.set_num_threads(max(1, cfg.threads // world))
    results = {"config": asdict(cfg), "machine": machine(), "datasets": {}}
    total = len(cfg.datasets) * len(cfg.methods) * cfg.seeds
    with tqdm(total=total, desc="es-kernels demo", disable=not show_progress or rank > 0) as bar:
        for name in cfg.datasets:
            xtr, ytr, xte, yte, k = load_dataset(name, cfg)
            runs = {m: [] for m in cfg.methods}
            for seed in range(cfg.seeds):
                data = (xtr, corrupt_labels(ytr, cfg.label_noise, k, seed), xte, yte, k)
                for method in cfg.methods:
                    runs[method].append(train(method, data, cfg, seed, bar))
                    bar.update(1)
            results["datasets"][name] = {"n_train": int(xtr.shape[0]), "n_test": int(xte.shape[0]),
                                         "summary": summarize(runs), "runs": runs}
    if rank > 0:  # rank 0 writes
        return results
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_dir / "demo.png")
    return results


def run_ablation(cfg: Config, out_dir: Path, grid1=(0.0, 0.2, 0.5, 0.8), grid2=(0.5, 0.9, 1.0)) -> dict:
    """ES test accuracy over a beta1 x beta2 grid (mean over seeds), per dataset."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    table = {}
    with tqdm(total=len(cfg.datasets) * len(grid1) * len(grid2) * cfg.seeds, desc="ablation") as bar:
        for name in cfg.datasets:
            xtr, ytr, xte, yte, k = load_dataset(name, cfg)
            rows = []
            for b1 in grid1:
                for b2 in grid2:
                    accs = []
                    for seed in range(cfg.seeds):
                        data = (xtr, corrupt_labels(ytr, cfg.label_noise, k, seed), xte, yte, k)
                        accs.append(train("es", data, replace(cfg, beta1=b1, beta2=b2), seed, bar)["test_acc"])
                        bar.update(1)
                    rows.append({"beta1": b1, "beta2": b2, "test_acc": _mean_sd(accs)})
            table[name] = rows
    res = {"config": asdict(cfg), "machine": machine(), "ablation": table}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, rs in results["datasets"][name]["runs"].items():
            epochs = len(rs[0]["curve"])
            t = [statistics.fmean(r["curve"][e][0] for r in rs) for e in range(epochs)]
            a = [statistics.fmean(r["curve"][e][1] for r in rs) for e in range(epochs)]
            ax.plot(t, a, marker=".", label=method)
        ax.set_title(f"{name} (label noise {results['config']['label_noise']:g})")
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(results: dict) -> str:
    lines = []
    for name, ds in results["datasets"].items():
        lines.append(f"\n{name}: {ds['n_train']} train / {ds['n_test']} test, "
                     f"label noise {results['config']['label_noise']:g}, {results['config']['seeds']} seeds")
        lines.append("| method | wall-clock s | vs full | backward samples | test acc % | vs full (points) |")
        lines.append("|---|---|---|---|---|---|")
        for m, s in ds["summary"].items():
            lines.append(
                f"| {m} | {s['wall_s']['mean']:.1f} ± {s['wall_s']['sd']:.1f} | "
                f"{-100 * s.get('wall_saving_vs_full', math.nan):+.0f}% | {s['backward_samples']['mean']:.0f} | "
                f"{s['test_acc']['mean']:.2f} ± {s['test_acc']['sd']:.2f} | {s.get('acc_minus_full', math.nan):+.2f} |")
    return "\n".join(lines)


def _dist_worker(rank: int, world: int, cfg: Config, out: Path, show_progress: bool, init: str) -> dict:
    """One process of a distributed demo: join the gloo group, run every method."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        return run_demo(cfg, out, show_progress=show_progress)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="es-kernels demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller data and fewer epochs: under 2 minutes")
    ap.add_argument("--label-noise", type=float, default=0.0, metavar="P",
                    help="symmetric label corruption of the training set, probability P")
    ap.add_argument("--ablate", action="store_true", help="run the beta1 x beta2 grid for ES instead")
    ap.add_argument("--datasets", default=None, help="comma-separated: mnist1d,digits")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--mnist1d-samples", type=int, default=None)
    ap.add_argument("--out", default="demo_results", help="folder for demo.json and demo.png")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--nproc", type=int, default=1, metavar="W",
                    help="run every method under DDP on W gloo processes (spawned here); "
                         "under torchrun the processes come from torchrun instead")
    a = ap.parse_args(argv)
    if not 0.0 <= a.label_noise < 1.0:
        ap.error("--label-noise must be in [0, 1)")
    cfg = Config(label_noise=a.label_noise)
    if a.nproc < 1:
        ap.error("--nproc must be >= 1")
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if a.quick:
        cfg = replace(cfg, **QUICK)
    over = {"seeds": a.seeds, "epochs": a.epochs, "mnist1d_samples": a.mnist1d_samples}
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if a.datasets:
        cfg = replace(cfg, datasets=tuple(a.datasets.split(",")))
    if a.methods:
        bad = set(a.methods.split(",")) - set(METHODS)
        if bad:
            ap.error(f"unknown methods: {sorted(bad)}")
        cfg = replace(cfg, methods=tuple(m for m in METHODS if m in a.methods.split(",")))
    out = Path(a.out)
    if a.ablate:
        res = run_ablation(cfg, out)
        for name, rows in res["ablation"].items():
            print(f"\n{name}: ES test accuracy (%), mean over {cfg.seeds} seeds")
            for r in rows:
                print(f"  beta1={r['beta1']:<4} beta2={r['beta2']:<4} {r['test_acc']['mean']:.2f} ± {r['test_acc']['sd']:.2f}")
        print(f"\nwrote {out / 'ablation.json'}")
        return 0
    if torchrun or a.nproc > 1:
        cfg = replace(cfg, nproc=int(os.environ["WORLD_SIZE"]) if torchrun else a.nproc)
        if a.ablate:
            ap.error("--ablate runs in one process")
        if torchrun:  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
            res = _dist_worker(int(os.environ["RANK"]), cfg.nproc, cfg, out, not a.no_progress, "env://")
            if int(os.environ["RANK"]) > 0:
                return 0
        else:
            import tempfile

            import torch.multiprocessing as mp

            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_dist_worker, args=(cfg.nproc, cfg, out, not a.no_progress, f"file://{tmp}/init"),
                         nprocs=cfg.nproc, join=True)
            res = json.loads((out / "demo.json").read_text())
        print(format_summary(res))
        print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}")
        return 0
    res = run_demo(cfg, out, show_progress=not a.no_progress)
    print(format_summary(res))
    print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}")
    return 0
