"""Ether loss: the published formula in eager PyTorch, torch.compile of it, and ours.

4 modalities (4 equal column slices), alpha = 1, fp32, gradient for y_pred.
Run with `make bench` (or pytest bench/bench_ether_loss.py --benchmark-enable).
"""

import pytest
import torch

import ether_kernels as ek
from _common import TRAFFIC, loss_cases, rounds_for, run_mode
from conftest import record

SHAPES = {"cpu": [(256, 64), (1024, 256), (4096, 1024)],
          "cuda": [(256, 64), (4096, 1024), (16384, 4096)]}
PROVIDERS = ["eager", "torch.compile", "ether_kernels"]
# On a GPU the automatic choice is Triton; the CUDA C++ kernels are measured as well.
GPU_PROVIDERS = PROVIDERS + ["ether_kernels-cuda"]


def published_ether(y_pred, y_true, modalities, alpha):
    """The published Ether(modalities, alpha) forward: the eager baseline."""
    intra = torch.mean((y_pred - y_true) ** 2)
    overall = torch.mean(y_pred)
    inter = 0.0
    for group in modalities:
        inter = inter + torch.abs(torch.mean(y_pred[:, group]) - overall)
    return intra + alpha * inter


_compiled_published = torch.compile(published_ether, dynamic=False)


@pytest.mark.parametrize("device,shape,mode,provider",
                         list(loss_cases(SHAPES, PROVIDERS, GPU_PROVIDERS)))
def test_ether_loss(benchmark, device, shape, mode, provider):
    C = shape[1]
    modalities = [slice(i * C // 4, (i + 1) * C // 4) for i in range(4)]
    pred = torch.randn(shape, device=device, requires_grad=True)
    true = torch.randn(shape, device=device)
    if provider == "eager":
        loss_fn = lambda p, t: published_ether(p, t, modalities, 1.0)  # noqa: E731
    elif provider == "torch.compile":
        loss_fn = lambda p, t: _compiled_published(p, t, modalities, 1.0)  # noqa: E731
    elif provider == "ether_kernels":
        loss_fn = ek.EtherLoss(modalities, 1.0)
    else:
        module = ek.EtherLoss(modalities, 1.0)

        def loss_fn(p, t):
            with ek.use_backend("cuda"):
                return module(p, t)
    benchmark.group = f"ether_loss {device} {shape[0]}x{shape[1]} {mode}"
    run_mode(benchmark, mode, loss_fn, pred, true, device, rounds_for(pred.numel(), device))
    record(benchmark, op="ether_loss", mode=mode, shape=shape, dtype=pred.dtype, device=device,
           provider=provider, bytes_moved=TRAFFIC[mode] * pred.numel() * pred.element_size())
