"""Whether Triton can be used, and whether it runs in the interpreter (CPU tensors)."""

import os

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    triton_import_error = None
    triton_version = triton.__version__
except Exception as error:  # not installed, or a broken install
    triton_import_error = f"{type(error).__name__}: {error}"
    triton_version = None


def _interpreting():
    """TRITON_INTERPRET as Triton itself reads it (1, true, on, any case); without Triton,
    or with one too old to have knobs, the common spellings."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except Exception:
        value = os.environ.get("TRITON_INTERPRET", "0").strip().lower()
        return value in ("1", "true", "on", "yes")


triton_interpret = _interpreting()
