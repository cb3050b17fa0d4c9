"""es-kernels: fast Evolved Sampling (ES) and ES with pruning (ESWP) for PyTorch.

The ops live in ``torch.ops.es_kernels`` (C++ on CPU, Triton on CUDA); this
package adds the functional API, the per-sample state and the plain-PyTorch
reference (:mod:`es_kernels.reference`).
"""
from . import reference
from ._ops import ops
from .functional import (
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    PruneResult,
    StepResult,
    checked_mode,
    es_step,
    es_step_from_losses,
    es_update,
    eswp_prune,
    per_sample_cross_entropy,
    weighted_select,
)
from .state import ESState

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BETA1",
    "DEFAULT_BETA2",
    "ESState",
    "PruneResult",
    "StepResult",
    "checked_mode",
    "es_step",
    "es_step_from_losses",
    "es_update",
    "eswp_prune",
    "ops",
    "per_sample_cross_entropy",
    "reference",
    "weighted_select",
]
