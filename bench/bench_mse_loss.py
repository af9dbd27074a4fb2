"""Fused MSE: torch.nn.functional.mse_loss eager, torch.compile of it, and ours (fp32)."""

import pytest
import torch
import torch.nn.functional as F

import ether_kernels as ek
from _common import TRAFFIC, loss_cases, rounds_for, run_mode
from conftest import record

SHAPES = {"cpu": [(256, 64), (1024, 256), (4096, 1024)],
          "cuda": [(256, 64), (4096, 1024), (16384, 4096)]}
PROVIDERS = ["eager", "torch.compile", "ether_kernels"]
# On a GPU the automatic choice is Triton; the CUDA C++ kernels are measured as well.
GPU_PROVIDERS = PROVIDERS + ["ether_kernels-cuda"]
_compiled_mse = torch.compile(F.mse_loss, dynamic=False)


@pytest.mark.parametrize("device,shape,mode,provider",
                         list(loss_cases(SHAPES, PROVIDERS, GPU_PROVIDERS)))
def test_mse_loss(benchmark, device, shape, mode, provider):
    pred = torch.randn(shape, device=device, requires_grad=True)
    true = torch.randn(shape, device=device)
    def fused_on_cuda_backend(p, t):
        with ek.use_backend("cuda"):
            return ek.fused_mse_loss(p, t)

    loss_fn = {"eager": F.mse_loss, "torch.compile": _compiled_mse,
               "ether_kernels": ek.fused_mse_loss,
               "ether_kernels-cuda": fused_on_cuda_backend}[provider]
    benchmark.group = f"mse_loss {device} {shape[0]}x{shape[1]} {mode}"
    run_mode(benchmark, mode, loss_fn, pred, true, device, rounds_for(pred.numel(), device))
    record(benchmark, op="mse_loss", mode=mode, shape=shape, dtype=pred.dtype, device=device,
           provider=provider, bytes_moved=TRAFFIC[mode] * pred.numel() * pred.element_size())
