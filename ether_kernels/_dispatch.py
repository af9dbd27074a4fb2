"""Which implementation runs an op: automatic by device, overridable, and explained.

Backends (not every op has every one):
  reference  pure PyTorch, every device: the specification and the test oracle
  cpp        the C++ CPU kernels of ether_kernels._C (CPU tensors)
  cuda       the CUDA C++ kernels of ether_kernels._C (CUDA tensors; built only where the
             CUDA toolkit and a CUDA torch were present at install time)
  triton     the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)

Automatic choice: CPU tensors -> cpp; CUDA tensors -> the op's GPU backends in its own order
(set from measurements on an H200: the CUDA C++ kernels first for the Ether loss and the
fused MSE, Triton where the CUDA part was not built); whatever cannot run is skipped,
ending at the reference.
Force one with ETHER_KERNELS_BACKEND=<name> or `with ether_kernels.use_backend(name):` (the
context manager wins over the variable). Forcing a backend that cannot run raises
BackendUnavailableError listing every reason, never a silent fallback.
"""

import contextlib
import os
import threading

import torch

from . import _extension
from ._triton_support import triton_import_error, triton_interpret

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "ETHER_KERNELS_BACKEND"

# use_backend() choices, per thread: one thread's block must not steer the ops another
# thread runs (a data loader, a serving thread). torch.compile reads a threading.local while
# tracing and guards on it (a change recompiles).
_this_thread = threading.local()


def _forced_stack():
    """This thread's stack of use_backend() choices, innermost last."""
    stack = getattr(_this_thread, "stack", None)
    if stack is None:
        stack = _this_thread.stack = []
    return stack


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call."""


def _check_name(name, where):
    if name not in BACKENDS:
        raise ValueError(f"{where} must be one of {', '.join(BACKENDS)} or 'auto', got {name!r}")


def _normalised(name):
    """A backend name as ETHER_KERNELS_BACKEND takes it: case and surrounding spaces ignored."""
    return name.strip().lower() if isinstance(name, str) else name


@contextlib.contextmanager
def use_backend(name):
    """Runs the ops inside the block on backend `name` ('auto' restores automatic choice),
    in this thread (other threads keep their own choice)."""
    name = _normalised(name)
    if name != "auto":
        _check_name(name, "use_backend(name)")
    stack = _forced_stack()
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forced_backend():
    """The backend forced by use_backend() (in this thread) or ETHER_KERNELS_BACKEND, or
    None for automatic."""
    stack = _forced_stack()
    name = stack[-1] if stack else _normalised(os.environ.get(ENV_VAR, "auto"))
    if name in ("", "auto"):
        return None
    _check_name(name, ENV_VAR)
    return name


def unsupported_reasons(backend, device, op_backends):
    """Why `backend` cannot run an op with the backends `op_backends` on `device` ([] = it can)."""
    reasons = []
    if backend != "reference" and backend not in op_backends:
        reasons.append(f"this op has no {backend} implementation (it has: "
                       f"{', '.join(('reference',) + tuple(op_backends))})")
    if backend in ("cpp", "cuda") and not _extension.cpp_available:
        reasons.append(f"the compiled extension did not load ({_extension.load_error})")
    if backend == "cpp" and device.type != "cpu":
        reasons.append(f"cpp runs on CPU tensors, these are on {device}")
    if backend == "cuda":
        if _extension.cpp_available and not _extension.cuda_built:
            reasons.append("the extension was built without CUDA (no CUDA toolkit or a CPU torch)")
        if device.type != "cuda":
            reasons.append(f"cuda runs on CUDA tensors, these are on {device}")
    if backend == "triton":
        if triton_import_error is not None:
            reasons.append(f"triton is not importable ({triton_import_error})")
        if device.type == "cpu" and not triton_interpret:
            reasons.append("triton runs on CPU tensors only under TRITON_INTERPRET=1")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"triton does not run on {device} tensors")
    if device.type == "cuda" and not torch.cuda.is_available():
        reasons.append("torch sees no CUDA device (a CPU build of torch, or no GPU)")
    return reasons


def transformed():
    """Whether forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) or a torch.func
    transform (grad, vjp, vmap, jacrev, ...) is active. The fused ops' derivatives are
    reverse-mode autograd formulas: under forward AD they would give a tangent of 0 without
    a word, and functorch cannot run them, so select() then takes the reference (composite
    PyTorch, which every transform differentiates)."""
    return (torch.autograd.forward_ad._current_level >= 0
            or torch._C._functorch.peek_interpreter_stack() is not None)


def select(op_name, device, cpu_backends=("cpp",), gpu_backends=("triton",)):
    """The backend that runs `op_name` on tensors on `device`: the reference under forward
    AD or a torch.func transform (see transformed()), even when a backend is forced."""
    if not torch.compiler.is_compiling() and transformed():
        return "reference"
    forced = forced_backend()
    key = (op_name, device.type, cpu_backends, gpu_backends, forced)
    choice = _choices.get(key)
    if choice is None:  # what can run depends only on the key: decide once
        choice = _choices[key] = _select_uncached(op_name, device, cpu_backends, gpu_backends, forced)
    if isinstance(choice, BackendUnavailableError):
        raise BackendUnavailableError(*choice.args)  # a fresh error: no traceback piles up
    return choice


_choices = {}  # select()'s decisions (or the error to raise), by what they depend on


def _select_uncached(op_name, device, cpu_backends, gpu_backends, forced):
    op_backends = tuple(cpu_backends) + tuple(b for b in gpu_backends if b not in cpu_backends)
    if forced is not None:
        reasons = unsupported_reasons(forced, device, op_backends)
        if reasons:
            return BackendUnavailableError(
                f"{op_name}: backend {forced!r} was forced but cannot run on {device.type} "
                "tensors: " + "; ".join(reasons))
        return forced
    order = cpu_backends if device.type == "cpu" else gpu_backends
    for backend in order:
        if not unsupported_reasons(backend, device, op_backends):
            return backend
    return "reference"


def available_backends(device):
    """The backends that could run on `device` (for info() and the tests)."""
    device = torch.device(device)
    return [b for b in BACKENDS if not unsupported_reasons(b, device, BACKENDS)]
