"""Compile every Triton kernel the ops launch for a Hopper GPU (sm_90), on a machine without one.

The interpreter (TRITON_INTERPRET=1, how the test suite runs Triton on CPU) executes a
kernel's Python with NumPy: it accepts code that the compiler rejects, and it passes Python
floats in fp64 where a compiled kernel receives fp32. Three bugs of that kind reached a GPU:
an int argument equal to 1 that the compiler turned into a constant (no .to() on it), a
module-level float read inside a kernel (must be a tl.constexpr), and gamma = 0.1 arriving
as 0.100000001 in an fp64 computation. This script runs the public ops on CPU tensors with
the Triton backend forced, intercepts each launch, specialises its arguments the way the
launcher does (an int equal to 1 becomes a constant unless do_not_specialize names it) and
compiles the kernel through Triton's front end, optimiser and ptxas for sm_90. It also
fails on a float argument that fp32 cannot hold exactly (it would be rounded on a GPU).
The kernels are not run: their outputs are left uninitialised.

Run without TRITON_INTERPRET (tests/test_triton_compiles.py does, in a subprocess):
    python tests/compile_triton_kernels.py
"""

import inspect
import os
import struct
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ether_kernels as ek  # noqa: E402
from ether_kernels import _dispatch  # noqa: E402
from ether_kernels.multimodal_loss import multimodal_loss  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32",
                 torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion"}
compiled = set()


def fp32_holds(value):
    return struct.unpack("f", struct.pack("f", value))[0] == value


def compile_launch(kernel, *args, grid, warmup, **kwargs):
    """Stands in for JITFunction.run: compile this launch's specialisation, run nothing."""
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    arguments = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    bound = inspect.signature(kernel.fn).bind(*args, **arguments)
    bound.apply_defaults()
    name = kernel.fn.__name__
    signature, constants = {}, {}
    for param in kernel.params:
        value = bound.arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[param.name], constants[param.name] = "constexpr", 1
            else:
                signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            if not fp32_holds(value):
                raise AssertionError(f"{name}: float argument {param.name} = {value!r} is "
                                     "rounded to fp32 on a GPU; pass it in a tensor")
            signature[param.name] = "fp32"
        else:
            raise AssertionError(f"{name}: argument {param.name} of type {type(value)}")
    key = (name, tuple(sorted(signature.items())),
           tuple(sorted((k, repr(v)) for k, v in constants.items())))
    if key not in compiled:
        triton.compile(ASTSource(kernel, signature, constants), target=HOPPER,
                       options={k: v for k, v in options.items() if k != "num_ctas"})
        compiled.add(key)


def run_every_triton_op():
    torch.manual_seed(0)
    floats = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    with ek.use_backend("triton"):
        for dtype in floats:
            for shape in ((5, 3), (1, 1), (4, 3, 7)):
                a = torch.randn(shape, dtype=dtype, requires_grad=True)
                b = torch.randn(shape, dtype=dtype, requires_grad=True)
                for reduction in ("mean", "sum", "none"):
                    ek.fused_mse_loss(a, b, reduction).sum().backward()
            pred = torch.randn(6, 3, 4, dtype=dtype, requires_grad=True)
            true = torch.randn(6, 3, 4, dtype=dtype, requires_grad=True)
            for options in ({}, {"discrepancy": "l2", "reduction": "sum"},
                            {"per_sample": True}):
                ek.ether_loss(pred, true, [0, [1, 2]], 0.3, **options).backward()
            ek.ether_loss(pred, true.detach(), [0, [1, 2]], 0.3).backward()  # y_pred only
            ek.ether_loss(pred.detach(), true, [0, [1, 2]], 0.3).backward()  # y_true only
            # AMSS: every mode, steps 0 / 1 / 17 (1 and multiples of 16 are specialised)
            # 300 units: the selection's wide variants (IB = 256, WIDTH = 512)
            grads = [torch.randn(8, 5, dtype=dtype), torch.randn(300, 2, dtype=dtype),
                     torch.randn(1, 1, dtype=dtype)]
            for mode, scaling in (("amss", None), ("amss+", "paper"),
                                  ("amss+", "reference-code"), ("uniform", None),
                                  ("topk", None)):
                for step in (0, 1, 17, 32):
                    ek.amss.mask_gradients([grads[:2], grads[2:]], [0.5, 0.3], mode=mode,
                                           scaling=scaling, seed=1, step=step)
            for options in ({}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}):
                params = [torch.nn.Parameter(torch.randn(8, 5, dtype=dtype)) for _ in range(2)]
                for p in params:
                    p.grad = torch.randn_like(p)
                buffers = None
                for step in range(2):
                    buffers = ek.amss.masked_sgd_step([params[:1], params[1:]], [0.5, 0.5],
                                                      lr=0.1, weight_decay=1e-4, step=step,
                                                      momentum_buffers=buffers, **options)
            z = torch.randn(40, 3 * 4, dtype=dtype, requires_grad=True)
            W = torch.randn(12, 4 * 5, dtype=dtype, requires_grad=True)
            for batch in (1, 5, 40):
                multimodal_loss(z[:batch], torch.randint(0, 4, (batch,)), W, 4,
                                0.1).backward()
            with torch.no_grad():  # the forward without gradients
                multimodal_loss(z, torch.randint(0, 4, (40,)), W, 4, 0.1)
        for dtype in (torch.float32, torch.float64):
            for batch, n, m in ((2, 5, 7), (1, 1, 1), (3, 16, 16)):
                x = torch.randn(batch, n, 2, dtype=dtype, requires_grad=True)
                y = torch.randn(batch, m, 2, dtype=dtype, requires_grad=True)
                for band in (None, 0, 1, 2):
                    ek.dtw(x, y, band=band).sum().backward()
                    for gamma in (1.0, 0.1):
                        ek.soft_dtw(x, y, gamma, band=band).sum().backward()


def every_kernel_in_the_package():
    """The names of all @triton.jit kernels (launched ones: their names end in _kernel)."""
    import importlib
    import pkgutil

    import ether_kernels.triton as package
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {name for name, value in vars(module).items()
                  if isinstance(value, triton_jit.JITFunction) and name.endswith("_kernel")}
    return names


if __name__ == "__main__":
    _dispatch.triton_interpret = True  # let the dispatcher pick Triton for CPU tensors
    triton_jit.JITFunction.run = compile_launch
    run_every_triton_op()
    reached = {key[0] for key in compiled}
    missing = every_kernel_in_the_package() - reached
    assert not missing, f"kernels no op launched here (add a call that reaches them): {missing}"
    print(f"compiled {len(compiled)} specialisations of {len(reached)} Triton kernels for "
          "sm_90")
