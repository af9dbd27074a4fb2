"""Helpers shared by the benchmark files: timing modes and the timed bodies."""

import pytest
import torch

from conftest import devices, sync

MODES = ["forward", "backward", "forward+backward"]
# Elements moved at least, per element of the input, by each mode (grad wanted for the
# prediction only): forward reads two tensors; backward reads two and writes one.
TRAFFIC = {"forward": 2, "backward": 3, "forward+backward": 5}


def rounds_for(numel, device):
    """Enough rounds for a stable median, a few seconds at most per benchmark."""
    if device == "cuda":
        return 100
    return 200 if numel <= 1 << 16 else (50 if numel <= 1 << 20 else 15)


def run_mode(benchmark, mode, loss_fn, pred, true, device, rounds):
    """Times `mode` of loss_fn(pred, true) (pred requires grad) with pytest-benchmark."""
    def forward():
        loss = loss_fn(pred, true)
        sync(device)
        return loss

    def backward(loss):
        torch.autograd.grad(loss, (pred,))
        sync(device)

    def forward_backward():
        torch.autograd.grad(loss_fn(pred, true), (pred,))
        sync(device)

    for _ in range(3):  # warm up: compilation, allocator, caches
        forward_backward()
    if mode == "forward":
        benchmark.pedantic(forward, rounds=rounds, warmup_rounds=1)
    elif mode == "backward":
        benchmark.pedantic(backward, setup=lambda: ((forward(),), {}), rounds=rounds)
    else:
        benchmark.pedantic(forward_backward, rounds=rounds, warmup_rounds=1)


def loss_cases(shapes, providers, gpu_providers):
    """(device, shape, mode, provider) parameters of a loss benchmark, named for the table."""
    for device in devices():
        for shape in shapes[device]:
            for mode in MODES:
                for provider in (gpu_providers if device == "cuda" else providers):
                    yield pytest.param(device, shape, mode, provider,
                                       id=f"{device}-{shape[0]}x{shape[1]}-{mode}-{provider}")
