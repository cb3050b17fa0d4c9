"""The one place kernels are launched from.

``IN_KERNEL`` is true while a kernel runs: the no-host-sync test patches the
tensor methods that read device values (``.item()``, ``.tolist()``, ``.cpu()``,
``bool()``, ...) to fail outside kernels, which holds the Python
orchestration to no host round-trip while the Triton interpreter (which runs
kernels through NumPy on the host) still works.
"""
import threading

_state = threading.local()


def in_kernel() -> bool:
    return getattr(_state, "depth", 0) > 0


def launch(kernel, grid, *args, **meta):
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        kernel[grid](*args, **meta)
    finally:
        _state.depth -= 1
