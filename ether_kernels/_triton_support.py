"""Whether Triton can be used, and whether it runs in the interpreter (CPU tensors)."""

import os

triton_interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    triton_import_error = None
    triton_version = triton.__version__
except Exception as error:  # not installed, or a broken install
    triton_import_error = f"{type(error).__name__}: {error}"
    triton_version = None
