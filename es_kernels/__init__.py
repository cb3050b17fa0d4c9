"""es-kernels: fast Evolved Sampling (ES) and ES with pruning (ESWP) for PyTorch.

The ops live in ``torch.ops.es_kernels`` (C++ on CPU, Triton on CUDA); this
package adds the functional API, the per-sample state and the plain-PyTorch
reference (:mod:`es_kernels.reference`).
"""

from . import lm, reference
from ._ops import ops

# The defaults of every entry point (the ops' schemas, the functional API,
# ESState.weights, the samplers), defined once in es_kernels/_spec.py.
from ._spec import (  # noqa: F401  (exported: es_kernels.DEFAULT_LAM, ...)
    DEFAULT_ANNEAL_FRAC,
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_EPS,
    DEFAULT_IGNORE_INDEX,
    DEFAULT_LABEL_SMOOTHING,
    DEFAULT_LAM,
    DEFAULT_PRUNE_RATIO,
    DEFAULT_SELECT_MODE,
    DEFAULT_W_MIN,
)
from .estimate import CostEstimate, estimate_cost
from .functional import (
    PruneResult,
    StepResult,
    checked_mode,
    es_select_from_state,
    es_step,
    es_step_from_losses,
    es_update,
    eswp_prune,
    per_sample_cross_entropy,
    weighted_select,
)
from .lm import es_step_from_hidden, per_sample_losses_from_hidden
from .sampler import ESWPSampler, EvolvedSampler, IndexedDataset, Selection
from .schedule import ScoringSchedule
from .scoring import scoring
from .state import ESState


def _register_triton() -> bool:
    """Register the Triton kernels for CUDA tensors, where CUDA and Triton are."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from ._triton import ops as _triton_ops  # noqa: F401  (registers the CUDA kernels)
    except ImportError:
        return False
    return True


HAS_TRITON_CUDA = _register_triton()

from ._version import __version__  # noqa: E402, F401  (re-exported)

__all__ = [
    "HAS_TRITON_CUDA",
    "DEFAULT_BETA1",
    "DEFAULT_BETA2",
    "DEFAULT_ANNEAL_FRAC",
    "DEFAULT_EPS",
    "DEFAULT_IGNORE_INDEX",
    "DEFAULT_LABEL_SMOOTHING",
    "DEFAULT_LAM",
    "DEFAULT_PRUNE_RATIO",
    "DEFAULT_SELECT_MODE",
    "DEFAULT_W_MIN",
    "CostEstimate",
    "ESState",
    "ESWPSampler",
    "EvolvedSampler",
    "IndexedDataset",
    "Selection",
    "PruneResult",
    "ScoringSchedule",
    "StepResult",
    "checked_mode",
    "es_select_from_state",
    "es_step",
    "es_step_from_hidden",
    "es_step_from_losses",
    "es_update",
    "estimate_cost",
    "eswp_prune",
    "ops",
    "lm",
    "per_sample_cross_entropy",
    "per_sample_losses_from_hidden",
    "reference",
    "scoring",
    "weighted_select",
]
