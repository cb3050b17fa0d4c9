"""The scoring schedule (docs/spec.md section 12): which steps run the scoring
pass, and the rules of the steps that select from the state instead."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import NamedTuple

KINDS = ("step", "epoch", "fraction", "stale")
DEFAULT_CAP = 1


class ScoringSchedule(NamedTuple):
    """When :class:`~es_kernels.EvolvedSampler` scores a meta-batch.

    Build one with :meth:`every_step`, :meth:`every_epochs`, :meth:`fraction`
    or :meth:`stale`, or parse a string with :meth:`parse` (``"step"``,
    ``"epoch:3"``, ``"fraction:0.25"``, ``"stale:500"``, each optionally
    followed by ``",cap=C"`` or ``",cap=none"``); ``str()`` gives the string
    back. The decisions depend on the sampler's host step counter and epoch
    only, so a resumed run makes the same ones.

    Attributes
    ----------
    kind : str
        ``"step"``, ``"epoch"``, ``"fraction"`` or ``"stale"``.
    every : int
        ``k`` of ``every_epochs(k)`` (else 1).
    fraction : float
        ``p`` of ``fraction(p)`` (else 1.0).
    max_age : int
        ``stale``'s age in steps beyond which an id is a priority (else -1: off).
    cap : int
        Picks from the state between two refreshes of an id (-1: no cap).

    Notes
    -----
    Pure host arithmetic: no host synchronisation.
    """

    kind: str = "step"
    every: int = 1
    fraction: float = 1.0
    max_age: int = -1
    cap: int = -1

    # ------------------------------------------------------------- builders
    @classmethod
    def every_step(cls) -> ScoringSchedule:
        """Score every meta-batch (ES without a schedule; the default).

        Returns
        -------
        ScoringSchedule
            The schedule. No host synchronisation.
        """
        return cls()

    @classmethod
    def every_epochs(cls, k: int, cap: int | None = DEFAULT_CAP) -> ScoringSchedule:
        """Score every step of the epochs ``e`` with ``e % k == 0``; select
        from the state in the others.

        Parameters
        ----------
        k : int >= 1
            The period in epochs (``k = 1``: every step).
        cap : int >= 0 or None
            Picks of an id from the state between two refreshes (None: no cap).

        Returns
        -------
        ScoringSchedule
            The schedule. No host synchronisation.
        """
        return cls._build("epoch", cap, every=_int(k, "k", 1))

    @classmethod
    def fraction_of_steps(cls, p: float, cap: int | None = DEFAULT_CAP) -> ScoringSchedule:
        """Score a share ``p`` of the steps: step ``k`` scores iff
        ``ceil((k + 1) p) > ceil(k p)`` (exact rational arithmetic), so step
        0 scores.

        Parameters
        ----------
        p : float in (0, 1]
            The share of scoring steps.
        cap : int >= 0 or None
            As in :meth:`every_epochs`.

        Returns
        -------
        ScoringSchedule
            The schedule. No host synchronisation.
        """
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0.0 < float(p) <= 1.0):
            raise ValueError(f"schedule: the fraction p must be a float in (0, 1], got {p!r}")
        return cls._build("fraction", cap, fraction=float(p))

    @classmethod
    def stale(cls, max_age: int, cap: int | None = DEFAULT_CAP) -> ScoringSchedule:
        """Score the first epoch only; then select from the state, with
        priority for the ids not observed within ``max_age`` steps.

        Parameters
        ----------
        max_age : int >= 0
            Steps after which an id's information is refreshed first.
        cap : int >= 0 or None
            As in :meth:`every_epochs`.

        Returns
        -------
        ScoringSchedule
            The schedule. No host synchronisation.
        """
        return cls._build("stale", cap, max_age=_int(max_age, "max_age", 0))

    @classmethod
    def _build(cls, kind: str, cap: int | None, **kw) -> ScoringSchedule:
        """The schedule of ``kind`` with ``cap`` validated (None: no cap, -1)
        and the builder's validated fields ``kw``."""
        out = cls(kind=kind, cap=-1 if cap is None else _int(cap, "cap", 0), **kw)
        if kind == "epoch" and out.every == 1 or kind == "fraction" and out.fraction == 1.0:
            return cls()  # scores every step: the counters would never be used
        return out

    @classmethod
    def parse(cls, value: ScoringSchedule | str | None) -> ScoringSchedule:
        """A schedule from ``None`` (every step), a :class:`ScoringSchedule`
        or its string form.

        Parameters
        ----------
        value : ScoringSchedule, str or None
            E.g. ``"epoch:3"``, ``"fraction:0.25,cap=2"``, ``"stale:500,cap=none"``.

        Returns
        -------
        ScoringSchedule
            The schedule. No host synchronisation.

        Raises
        ------
        ValueError
            Naming ``schedule``, for anything else.
        """
        if value is None:
            return cls()
        if isinstance(value, ScoringSchedule):
            return cls._check(value)
        if not isinstance(value, str):
            raise ValueError(f"schedule must be a ScoringSchedule, a string or None, got {type(value).__name__}")
        head, *opts = [p.strip() for p in value.split(",")]
        cap: int | None = DEFAULT_CAP
        for opt in opts:
            key, _, val = opt.partition("=")
            if key.strip() != "cap" or not val.strip():
                raise ValueError(f"schedule: unknown option {opt!r} in {value!r} (only cap=C or cap=none)")
            val = val.strip()
            cap = None if val == "none" else _parse_int(val, "cap", value)
        kind, _, arg = head.partition(":")
        if kind == "step" and not arg:
            if opts:
                raise ValueError(f"schedule: 'step' takes no options, got {value!r}")
            return cls()
        if kind == "epoch":
            return cls.every_epochs(_parse_int(arg, "k", value), cap)
        if kind == "fraction":
            try:
                p = float(arg)
            except ValueError:
                raise ValueError(f"schedule: the fraction in {value!r} is not a number") from None
            return cls.fraction_of_steps(p, cap)
        if kind == "stale":
            return cls.stale(_parse_int(arg, "max_age", value), cap)
        raise ValueError(
            f"schedule must be 'step', 'epoch:K', 'fraction:P' or 'stale:MAX_AGE' (optionally ',cap=C'), got {value!r}"
        )

    @classmethod
    def _check(cls, s: ScoringSchedule) -> ScoringSchedule:
        """Validate a schedule built by hand (the fields)."""
        if s.kind not in KINDS:
            raise ValueError(f"schedule: kind must be one of {KINDS}, got {s.kind!r}")
        return cls.parse(str(s))

    def __str__(self) -> str:
        if self.kind == "step":
            return "step"
        arg = {"epoch": self.every, "fraction": repr(self.fraction), "stale": self.max_age}[self.kind]
        return f"{self.kind}:{arg},cap={'none' if self.cap < 0 else self.cap}"

    # ------------------------------------------------------------ decisions
    @property
    def selects_from_state(self) -> bool:
        """Whether some steps select from the state (every policy but every step)."""
        return self.kind != "step"

    def scores(self, step: int, epoch: int) -> bool:
        """Whether step ``step`` (calls of ``select`` so far) of epoch
        ``epoch`` is a scoring step.

        Parameters
        ----------
        step, epoch : int >= 0
            The sampler's host step counter and epoch.

        Returns
        -------
        bool
            True: run the scoring pass. No host synchronisation.
        """
        if self.kind == "step":
            return True
        if self.kind == "epoch":
            return epoch % self.every == 0
        if self.kind == "stale":
            return epoch == 0
        p = Fraction(self.fraction)  # exact: the float's value
        return math.ceil((step + 1) * p) > math.ceil(step * p)


def _int(x, name: str, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or int(x) < lo or int(x) >= 2**63:
        raise ValueError(f"schedule: {name} must be an int in [{lo}, 2**63), got {x!r}")
    return int(x)


def _parse_int(text: str, name: str, value: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"schedule: {name} in {value!r} must be an int, got {text!r}") from None
