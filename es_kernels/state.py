"""ESState: the per-sample state of docs/spec.md section 2, owned in one place."""

from __future__ import annotations

import math

import torch

from . import _checks, _spec
from ._spec import DEFAULT_LAM, DEFAULT_W_MIN


class ESState:
    """Per-sample state of a dataset of ``num_samples`` samples (spec section 2).

    Parameters
    ----------
    num_samples : int in [0, 2**48)
        ``N``, the dataset size; sample ids are in ``[0, N)``.
    device : torch.device, str or None
        Where the state lives (``None``: the CPU); every op on it takes its
        inputs on this device.
    dtype : torch.float32 or torch.float64
        float64 on the CPU only (the Triton kernels take float32).

    Raises
    ------
    ValueError
        For a bad ``num_samples`` or ``dtype``.

    Attributes
    ----------
    tensor : torch.Tensor
        float32 (or float64 on the CPU) ``[N, 2]``, contiguous: column 0 is
        ``s``, the loss EMA (NaN for a sample never observed), column 1 is
        ``d``, the EMA of the loss difference (the trend, 0 at first). One
        observation's pair is written together; the ops take this tensor.
    s, d : torch.Tensor
        ``[N]`` views of the two columns.
    errors : torch.Tensor
        int64 ``[2]``: ids out of range and non-finite observations seen so
        far. Kernels count bad values here on the device instead of writing
        them into the state; :meth:`check` reads the counts and raises.

    Notes
    -----
    Construction and the views make no host synchronisation; :meth:`check`,
    :meth:`validate_state_dict` and :meth:`load_state_dict` read device
    values (one synchronisation each).
    """

    KEYS = ("s", "d", "errors")

    def __init__(
        self, num_samples: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        num_samples = _checks.integer(num_samples, "num_samples", 0, _spec.MAX_SAMPLES)
        if dtype not in _checks.STATE_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.tensor = torch.zeros((num_samples, 2), dtype=dtype, device=device)
        self.tensor[:, 0] = math.nan
        self.errors = torch.zeros((2,), dtype=torch.int64, device=device)

    @property
    def s(self) -> torch.Tensor:
        """``[N]`` view of the level ``s`` (NaN: never observed)."""
        return self.tensor[:, 0]

    @property
    def d(self) -> torch.Tensor:
        """``[N]`` view of the trend ``d``."""
        return self.tensor[:, 1]

    @property
    def num_samples(self) -> int:
        """``N``, the number of samples."""
        return self.tensor.shape[0]

    @property
    def device(self) -> torch.device:
        """The state's device."""
        return self.tensor.device

    @property
    def dtype(self) -> torch.dtype:
        """The state's dtype (float32 or float64)."""
        return self.tensor.dtype

    def observed(self) -> torch.Tensor:
        """The samples seen at least once.

        Returns
        -------
        Tensor
            bool ``[N]`` on the state's device. No host synchronisation.
        """
        return ~torch.isnan(self.s)

    def weights(self, lam: float = DEFAULT_LAM, w_min: float = DEFAULT_W_MIN) -> torch.Tensor:
        """The current weight of every sample (spec section 3).

        Parameters
        ----------
        lam : float >= 0
            Trend gain (default ``DEFAULT_LAM``, as the samplers and the ops).
        w_min : float > 0
            Floor of the weight.

        Returns
        -------
        Tensor
            ``max(s + lam * d, w_min)``, ``[N]`` in the state's dtype and
            device; NaN where unseen. No host synchronisation.
        """
        return torch.clamp(self.s + lam * self.d, min=w_min)

    def check(self) -> None:
        """Raise if any bad value was seen (ids out of range, non-finite
        observations: ``errors``).

        Returns
        -------
        None

        Raises
        ------
        RuntimeError
            With the two counts, when either is non-zero.

        Notes
        -----
        Reads two integers from the device (one synchronisation): call it
        once an epoch, not every step.
        """
        bad_ids, bad_losses = (int(v) for v in self.errors.tolist())
        if bad_ids or bad_losses:
            raise RuntimeError(
                f"es_kernels: {bad_ids} id(s) out of range [0, {self.num_samples}) and "
                f"{bad_losses} non-finite observation(s) (a non-finite loss, or one whose state or "
                "weight would overflow) were seen and skipped; the state of those observations was "
                "left unchanged. Fix the data loader or the loss, then call reset_errors()."
            )

    def reset_errors(self) -> None:
        """Set both error counts to 0 (on the device, no synchronisation).

        Returns
        -------
        None
        """
        self.errors.zero_()

    def state_dict(self) -> dict:
        """The state, for a checkpoint.

        Returns
        -------
        dict
            ``{"s", "d", "errors"}``: copies on the state's device (``s`` and
            ``d`` as ``[N]`` tensors). No host synchronisation.
        """
        return {"s": self.s.clone(), "d": self.d.clone(), "errors": self.errors.clone()}

    def validate_state_dict(self, state_dict: dict, prefix: str = "state_dict") -> tuple:
        """Check a saved state without writing anything.

        Parameters
        ----------
        state_dict : dict
            Exactly ``s``, ``d`` (``[N]``, the state's dtype) and ``errors``
            (int64 ``[2]``), on any device.
        prefix : str
            The name of the dict in error messages.

        Returns
        -------
        tuple
            ``(s, d, errors)``, the dict's tensors.

        Raises
        ------
        ValueError
            Naming the entry: keys, types, shapes, dtypes and values (``s``
            finite or NaN, ``d`` finite, ``errors >= 0``).

        Notes
        -----
        Reads the values (one synchronisation on a GPU).
        """
        _checks.keys(state_dict, prefix, self.KEYS)
        n = self.num_samples
        for key, dtype, length in (("s", self.dtype, n), ("d", self.dtype, n), ("errors", torch.int64, 2)):
            _checks.saved(state_dict[key], f"{prefix}[{key!r}]", dtype, length)
        s, d, errors = (state_dict[k] for k in self.KEYS)
        if bool(torch.isinf(s).any()):
            raise ValueError(f"{prefix}['s'] holds an infinite value (s must be finite, or NaN = unseen)")
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"{prefix}['d'] holds a non-finite value")
        if bool((errors < 0).any()):
            raise ValueError(f"{prefix}['errors'] holds a negative count")
        return s, d, errors

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy a saved state into this one, on this state's device.

        Parameters
        ----------
        state_dict : dict
            As :meth:`state_dict` returns it (see :meth:`validate_state_dict`).

        Returns
        -------
        None

        Raises
        ------
        ValueError
            As :meth:`validate_state_dict`: all or nothing, every entry is
            validated before anything is written.

        Notes
        -----
        Reads the values to validate them (one synchronisation on a GPU).
        """
        s, d, errors = self.validate_state_dict(state_dict)
        self._load_validated(s, d, errors)

    def _load_validated(self, s, d, errors) -> None:
        new = torch.stack([s.detach().to(self.device), d.detach().to(self.device)], dim=1)
        errors = errors.detach().to(self.device)
        self.tensor.copy_(new)
        self.errors.copy_(errors)

    def to(self, device: torch.device | str) -> ESState:
        """A copy of the state on ``device``.

        Parameters
        ----------
        device : torch.device or str

        Returns
        -------
        ESState
            The tensors moved with ``Tensor.to`` (no copy if already there).
        """
        out = ESState.__new__(ESState)
        out.tensor, out.errors = self.tensor.to(device), self.errors.to(device)
        return out

    def __repr__(self) -> str:
        return f"ESState(num_samples={self.num_samples}, device={self.device}, dtype={self.dtype})"
