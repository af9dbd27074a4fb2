"""Shared test fixtures: backends and devices to sweep, tolerances, fresh random seeds.

Without a GPU the Triton kernels run under the interpreter on CPU tensors; the variable must
be set before triton is first imported, which is why it is set here, at collection.
"""

import os
import secrets

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import ether_kernels  # noqa: E402  (after TRITON_INTERPRET is set)
from ether_kernels import _dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Tolerances of a fast path against the fp64 reference computed from the same inputs:
# (rtol, atol relative to the largest magnitude of the reference value). Half and bfloat16
# store every output rounded to 11 / 8 significant bits; fp32 sums are blocked so their
# error stays near a few ulps.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_params():
    """(device, backend) pairs: every fast backend that can run here, GPU ones marked."""
    params = []
    for device in devices():
        for backend in ("cpp", "cuda", "triton"):
            if _dispatch.unsupported_reasons(backend, torch.device(device), ("cpp", "cuda", "triton")):
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            if backend == "triton":
                marks.append(pytest.mark.triton)
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def is_interpreted(device, backend):
    """Triton under the interpreter: slow, and without bfloat16 support."""
    return backend == "triton" and device == "cpu"


@pytest.fixture(autouse=True)
def fresh_seed():
    """A new seed every run (printed, so that a failure can be replayed with it)."""
    seed = int(os.environ.get("ETHER_KERNELS_TEST_SEED", secrets.randbits(31)))
    torch.manual_seed(seed)
    print(f"seed={seed} (replay with ETHER_KERNELS_TEST_SEED={seed})")
    yield seed


def assert_close(actual, expected, dtype, what):
    """actual (any dtype) against expected (fp64), with the dtype's tolerance; says where."""
    rtol, atol_scale = TOLERANCES[dtype]
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    # Plus one step of the dtype's subnormal grid: no value stored in the dtype can be closer
    # than that (fp16 gradients of a mean over many elements are subnormal).
    finfo = torch.finfo(dtype)
    atol = atol_scale * max(scale, 1e-30) + finfo.eps * finfo.smallest_normal
    error = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~(error <= bound)
    if bad.any():
        index = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.dim() else ()
        worst = (error / bound).nan_to_num(float("inf")).max().item()
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())} of {bad.numel()} values off; first at {index}: "
            f"got {actual[index].item():.10g}, expected {expected[index].item():.10g} "
            f"(|error| {error[index].item():.3g} > bound {bound[index].item():.3g}); "
            f"worst error / bound = {worst:.3g}")


def random_pair(shape, dtype, device, requires_grad=(True, True)):
    """y_pred, y_true with a modality-dependent offset so that the inter term matters."""
    y_pred = torch.randn(shape, dtype=torch.float64)
    offsets = torch.randn(shape[1], dtype=torch.float64).view(1, -1, *([1] * (len(shape) - 2)))
    y_pred = (y_pred + offsets).to(device=device, dtype=dtype)
    y_true = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    return y_pred.requires_grad_(requires_grad[0]), y_true.requires_grad_(requires_grad[1])


def second_order(loss_of, inputs):
    """First derivatives of loss_of(*inputs).sum() with create_graph=True, then the
    derivatives of (loss + |first derivatives|^2) (a gradient penalty): what a second
    derivative through an op gives. Inputs that do not require grad are skipped."""
    wanted = [t for t in inputs if t.requires_grad]
    loss = loss_of(*inputs).sum()
    first = torch.autograd.grad(loss, wanted, create_graph=True)
    penalty = loss + sum(g.pow(2).sum() for g in first)
    second = torch.autograd.grad(penalty, wanted)
    return [t.detach() for t in (*first, *second)]


def assert_second_order_matches_the_reference(loss_of, inputs, device, backend,
                                              rtol=1e-9, atol=1e-11):
    """The fused backend's first and second derivatives (create_graph=True) equal the
    reference's on copies of the same fp64 inputs (those requiring grad are differentiated)."""
    results = []
    for name, dev in ((backend, device), ("reference", "cpu")):
        copies = [t.detach().clone().to(dev).requires_grad_(t.requires_grad) for t in inputs]
        with ether_kernels.use_backend(name):
            results.append([t.cpu() for t in second_order(loss_of, copies)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
