"""Loads the compiled operator library `ether_kernels._C`, or explains why it did not load.

The package works without it (every op falls back to its pure-PyTorch reference), so a
failed or disabled build costs speed, not function: we warn once and carry on.
"""

import os
import warnings

_DISABLE_ENV = "ETHER_KERNELS_DISABLE_EXTENSION"

_C = None
load_error = None  # why the extension is not there, in words (None when it loaded)
build_info = {}

if os.environ.get(_DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
    load_error = f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}"
else:
    try:
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        from . import _C  # noqa: F811  (registers the ops with the dispatcher)

        build_info = dict(_C.build_info())
    except Exception as error:  # ImportError, or an undefined symbol from a torch mismatch
        _C = None
        load_error = f"{type(error).__name__}: {error}"

if load_error is not None:
    warnings.warn(
        f"ether_kernels: the compiled extension is not available ({load_error}); "
        "CPU ops run on the pure-PyTorch reference. Rebuild with "
        "`pip install --no-build-isolation -e .` to get the fast kernels.",
        RuntimeWarning,
        stacklevel=2,
    )

cpp_available = _C is not None
cuda_built = bool(build_info.get("cuda", False))
