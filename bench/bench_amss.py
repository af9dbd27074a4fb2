"""AMSS / AMSS+ masking of one training step's gradients: the fused op against the eager
per-tensor loop (the public code's structure: several small kernels per tensor), side by side.

Gradients shaped like two ResNet18 encoders (20 conv weights each: 40 tensors, ~22M
parameters), fp32, ratios (0.3, 0.7). Each round masks fresh copies (the copy is not timed).
GB/s counts one read of every gradient plus one write (the least a masking pass moves).
"""

import pytest
import torch

import ether_kernels as ek
from conftest import record, sync


def resnet18_conv_shapes():
    shapes = [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4
    for c_in, c_out in ((64, 128), (128, 256), (256, 512)):
        shapes += [(c_out, c_in, 3, 3), (c_out, c_out, 3, 3), (c_out, c_in, 1, 1),
                   (c_out, c_out, 3, 3), (c_out, c_out, 3, 3)]
    return shapes


SHAPES = resnet18_conv_shapes()


@pytest.mark.parametrize("mode", ["amss", "amss+"])
@pytest.mark.parametrize("provider", ["ether_kernels", "eager"])
def test_amss_mask_step(benchmark, provider, mode):
    torch.manual_seed(0)
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(2)]
    numel = sum(g.numel() for group in grads for g in group)
    backend = "auto" if provider == "ether_kernels" else "reference"

    def setup():
        return ([[g.clone() for g in group] for group in grads],), {}

    def run(copies):
        with ek.use_backend(backend):
            ek.amss.mask_gradients(copies, [0.3, 0.7], mode=mode, seed=0, step=1)

    benchmark.group = f"amss {mode} 2 x ResNet18 ({len(SHAPES) * 2} tensors, {numel / 1e6:.1f}M)"
    benchmark.pedantic(run, setup=setup, rounds=7 if provider == "ether_kernels" else 3,
                       warmup_rounds=1)
    record(benchmark, op=f"amss_mask[{mode}]", mode="step", shape=(len(SHAPES) * 2, numel),
           dtype=torch.float32, device="cpu", provider=provider, bytes_moved=2 * 4 * numel)


# --------------------------------------------------------------------------------- GPU
# The same step on CUDA tensors: the fused Triton kernels (three stages, one launch each,
# no host read) against the eager per-tensor loop on the same GPU. GB/s as above; the
# results table puts it next to the device's copy bandwidth.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["amss", "amss+"])
@pytest.mark.parametrize("provider", ["ether_kernels-cuda", "eager-cuda"])
def test_amss_mask_step_cuda(benchmark, provider, mode, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.manual_seed(0)
    grads = [[torch.randn(s, device="cuda", dtype=dtype) for s in SHAPES] for _ in range(2)]
    numel = sum(g.numel() for group in grads for g in group)
    backend = "auto" if provider.startswith("ether_kernels") else "reference"

    def setup():
        copies = [[g.clone() for g in group] for group in grads]
        sync("cuda")
        return (copies,), {}

    def run(copies):
        with ek.use_backend(backend):
            ek.amss.mask_gradients(copies, [0.3, 0.7], mode=mode, seed=0, step=1)
        sync("cuda")

    benchmark.group = (f"amss {mode} cuda {dtype} 2 x ResNet18 ({len(SHAPES) * 2} tensors, "
                       f"{numel / 1e6:.1f}M)")
    benchmark.pedantic(run, setup=setup, rounds=20 if backend == "auto" else 5,
                       warmup_rounds=2)
    record(benchmark, op=f"amss_mask[{mode}]", mode="step", shape=(len(SHAPES) * 2, numel),
           dtype=dtype, device="cuda", provider=provider,
           bytes_moved=2 * dtype.itemsize * numel)
