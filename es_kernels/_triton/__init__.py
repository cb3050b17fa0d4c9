"""Triton kernels of the es_kernels ops (the GPU path).

Importing :mod:`es_kernels._triton.ops` registers them for the CUDA dispatch
key of ``torch.ops.es_kernels.*``. The launchers there take the op schemas'
arguments, so the tests also run them on CPU tensors under
``TRITON_INTERPRET=1``.
"""
