"""The one place kernels are launched from.

``launch`` runs a kernel under a device guard (so tensors on ``cuda:1`` work
while the current device is ``cuda:0``). ``in_kernel()`` is true while a
kernel runs: the no-host-sync test patches the tensor methods that read
device values (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``, ...) to
fail outside kernels, which holds the Python orchestration to no host
round-trip while the Triton interpreter (which runs kernels through NumPy on
the host) still works.
"""

import contextlib
import threading

import torch

_state = threading.local()


def in_kernel() -> bool:
    return getattr(_state, "depth", 0) > 0


def launch(kernel, grid, device: torch.device, *args, **meta):
    _state.depth = getattr(_state, "depth", 0) + 1
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with guard:
            kernel[grid](*args, **meta)
    finally:
        _state.depth -= 1
