"""Scoring schedules for the demo's study (bench/results/demo_schedule/RULE.md).

PROTOTYPE, built on the existing ops (``es_update``, ``weighted_select``)
until ``EvolvedSampler(schedule=...)`` exists: then :class:`Schedule` is
replaced by the sampler's own argument (one line in ``run.train``). It makes
host reads (the count of unseen ids, the age order, the cap): a CPU
prototype, not the GPU path.

Each step either scores the meta-batch (today's fused step:
``EvolvedSampler.select``) or selects from the stored state: the weights
``max(s + lam d, w_min)`` of the meta-batch's ids, never-observed ids
(``s`` NaN) first, the rest with ``weighted_select`` (the sampler's eps,
select_mode, seed and step counter); the picks' training losses (detached,
before the ESWP scale) are then observed with ``es_update``. With the loop
breaker a quarter of the picks goes to the ids observed longest ago and an
id picked by its stored weight ``CAP`` times since its last fresh
observation (a scoring pass or an age pick) is barred from the weight draw.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from ..functional import es_update, weighted_select
from ..sampler import EvolvedSampler

AGE_SHARE = Fraction(1, 4)  # of the b picks, to the oldest observations (loop breaker)
CAP = 2  # weight picks between fresh observations (loop breaker)

# policy name -> (which steps score, loop breaker); fixed before the study's runs
POLICIES = {
    "epoch3": ("epoch", 3, False),  # epochs 0, 3, 6, ... score every step
    "frac": ("frac", Fraction(1, 3), False),  # global step k scores iff floor((k+1)p) > floor(kp)
    "epoch3s": ("epoch", 3, True),
    "stale": ("first", None, True),  # epoch 0 scores; afterwards the state alone drives the picks
}


def policy_of(method: str) -> str | None:
    """``"es-epoch3"`` / ``"eswp-epoch3"`` -> ``"epoch3"``; None for a method without a schedule."""
    head, _, tail = method.partition("-")
    return tail if head in ("es", "eswp") and tail in POLICIES else None


class Schedule:
    """A scoring schedule on top of an :class:`EvolvedSampler` (PROTOTYPE).

    Parameters
    ----------
    es : EvolvedSampler
        The sampler whose state, settings and step counter are used.
    policy : str
        A key of :data:`POLICIES`.

    Notes
    -----
    Host reads on every non-scoring step (a CPU prototype).
    """

    def __init__(self, es: EvolvedSampler, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.es = es
        self.when, self.param, self.breaker = POLICIES[policy]
        n = es.state.num_samples
        self.last = torch.full((n,), -1, dtype=torch.int64, device=es.device)  # step of the last observation
        self.streak = torch.zeros((n,), dtype=torch.int64, device=es.device)  # weight picks since a fresh one
        self.k = 0  # steps so far
        self._fresh = None

    def scores(self, epoch: int) -> bool:
        """Whether this step (the next one) scores its meta-batch; advances the step count."""
        k, self.k = self.k, self.k + 1
        if self.when == "epoch":
            return epoch % self.param == 0
        if self.when == "frac":
            p = self.param
            return (k + 1) * p.numerator // p.denominator > k * p.numerator // p.denominator
        return epoch == 0

    def scored(self, ids: torch.Tensor) -> None:
        """After a scoring step: every id of the meta-batch was observed fresh."""
        self.last[ids] = self.k
        self.streak[ids] = 0

    def _draw(self, w: torch.Tensor, among: torch.Tensor, m: int) -> torch.Tensor:
        es = self.es
        sub = weighted_select(w[among], m, es.select_mode, es.seed, es.step_tensor, eps=es.eps)
        return among[sub]

    def select(self, ids: torch.Tensor) -> torch.Tensor:
        """Positions (ascending) of the picks of a non-scoring step, from the stored state."""
        es = self.es
        B = ids.shape[0]
        b = min(es.mini_batch, B)
        w = es.state.weights(es.lam, es.w_min)[ids]
        free = torch.ones(B, dtype=torch.bool, device=ids.device)
        fresh = torch.zeros(B, dtype=torch.bool, device=ids.device)
        unseen = torch.isnan(w).nonzero().squeeze(1)[:b]
        free[unseen] = False
        fresh[unseen] = True
        rest = b - unseen.shape[0]
        if self.breaker and rest > 0:
            n_age = min(int(b * AGE_SHARE), rest)
            seen = free.nonzero().squeeze(1)
            order = torch.sort(self.last[ids[seen]], stable=True).indices[:n_age]  # oldest first, lower position
            free[seen[order]] = False
            fresh[seen[order]] = True
            rest -= n_age
        if rest > 0:
            allowed = free & (self.streak[ids] < CAP) if self.breaker else free
            cand = allowed.nonzero().squeeze(1)
            if cand.shape[0] >= rest:
                free[self._draw(w, cand, rest)] = False
            else:  # too few allowed: all of them, the barred ones fill the gap by weight
                free[cand] = False
                free[self._draw(w, free.nonzero().squeeze(1), rest - cand.shape[0])] = False
        es.step_tensor.add_(1)
        pos = (~free).nonzero().squeeze(1)
        self._fresh = fresh[pos]
        return pos

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Observe the picks' training losses (detached, before any ESWP scale); ``ids`` = ``ids[select(ids)]``."""
        es = self.es
        es_update(ids, losses.detach(), es.state, es.beta1, es.beta2, lam=es.lam, w_min=es.w_min)
        self.last[ids] = self.k
        self.streak[ids] = torch.where(self._fresh, 0, self.streak[ids] + 1)
