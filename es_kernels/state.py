"""ESState: the per-sample state of ES_SPEC section 2, owned in one place."""
from __future__ import annotations

import torch

from . import _checks


class ESState:
    """Per-sample state of a dataset of ``num_samples`` samples.

    * ``s`` (``[N]``): loss EMA, NaN for a sample never observed;
    * ``d`` (``[N]``): EMA of the loss difference (the trend), 0 at first;
    * ``errors`` (int64 ``[2]``): ids out of range and non-finite losses seen
      so far. Kernels count bad values here on the device instead of writing
      them into ``s`` or ``d``; :meth:`check` reads the counts and raises.
    """

    def __init__(self, num_samples: int, device=None, dtype: torch.dtype = torch.float32):
        num_samples = _checks.integer(num_samples, "num_samples", 0)
        if dtype not in _checks.STATE_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.s = torch.full((num_samples,), float("nan"), dtype=dtype, device=device)
        self.d = torch.zeros((num_samples,), dtype=dtype, device=device)
        self.errors = torch.zeros((2,), dtype=torch.int64, device=device)

    @property
    def num_samples(self) -> int:
        return self.s.shape[0]

    @property
    def device(self) -> torch.device:
        return self.s.device

    @property
    def dtype(self) -> torch.dtype:
        return self.s.dtype

    def observed(self) -> torch.Tensor:
        """Boolean mask of the samples seen at least once."""
        return ~torch.isnan(self.s)

    def weights(self, w_min: float = 1e-8) -> torch.Tensor:
        """The current weight ``max(s + d, w_min)`` of every sample (NaN where unseen)."""
        return torch.clamp(self.s + self.d, min=w_min)

    def check(self) -> None:
        """Raise ``RuntimeError`` if any bad value was seen. Reads two integers
        from the device (one synchronisation): call it once an epoch, not
        every step."""
        bad_ids, bad_losses = (int(v) for v in self.errors.tolist())
        if bad_ids or bad_losses:
            raise RuntimeError(
                f"es_kernels: {bad_ids} id(s) out of range [0, {self.num_samples}) and "
                f"{bad_losses} non-finite loss(es) were seen and skipped; the state of those "
                "observations was left unchanged. Fix the data loader or the loss, then call "
                "reset_errors()."
            )

    def reset_errors(self) -> None:
        self.errors.zero_()

    def state_dict(self) -> dict:
        return {"s": self.s.clone(), "d": self.d.clone(), "errors": self.errors.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Copy a saved state into this one (on this state's device). Every
        entry is validated before anything is written."""
        for key in ("s", "d", "errors"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
        s, d, errors = state_dict["s"], state_dict["d"], state_dict["errors"]
        for key, new, own in (("s", s, self.s), ("d", d, self.d), ("errors", errors, self.errors)):
            _checks.tensor(new, f"state_dict[{key!r}]", dim=1)
            if new.shape != own.shape:
                raise ValueError(f"state_dict[{key!r}] has shape {tuple(new.shape)}, this state {tuple(own.shape)}")
            if new.dtype != own.dtype:
                raise ValueError(f"state_dict[{key!r}] has dtype {new.dtype}, this state {own.dtype}")
        self.s.copy_(s)
        self.d.copy_(d)
        self.errors.copy_(errors)

    def to(self, device) -> "ESState":
        out = ESState.__new__(ESState)
        out.s, out.d, out.errors = self.s.to(device), self.d.to(device), self.errors.to(device)
        return out

    def __repr__(self) -> str:
        return f"ESState(num_samples={self.num_samples}, device={self.device}, dtype={self.dtype})"
