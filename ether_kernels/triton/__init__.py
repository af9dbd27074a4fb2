"""Triton kernels: importing this package registers the *_triton custom ops.

Imported only when triton is importable (see ether_kernels/_triton_support.py).
"""

from . import ether_loss, mse_loss  # noqa: F401
