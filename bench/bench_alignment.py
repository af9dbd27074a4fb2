"""The alignment losses and the MultiModal loss, forward+backward on CPU (fp32): ours, the
plain reference formula (eager) and torch.compile of that reference, side by side.

The issue's target: each loss at least as fast as torch.compile of its reference. GB/s
counts one read of the inputs (a floor, not the traffic: these are GEMM / sort bound).
Peak memory is the point of two of them: the blockwise contrastive loss never holds the
(B, B) logits, batch-all never the (B, B, B) triplets.
"""

import pytest
import torch

import ether_kernels as ek
from conftest import record
from ether_kernels.reference import alignment as ref
from ether_kernels.reference.multimodal_loss import multimodal_loss_reference

PROVIDERS = ["ether_kernels", "eager", "torch.compile"]


def _batch_all_reference(x, labels):
    return ref.batch_all_triplet_reference(ref.pairwise_distances_reference(x, x), labels,
                                           labels, 0.2, exclude_self=True)


def _batch_hard_reference(x, labels):
    return ref.batch_hard_triplet_reference(ref.pairwise_distances_reference(x, x), labels,
                                            labels, 0.2, exclude_self=True)


def _cases():
    torch.manual_seed(0)
    B, E = 4096, 256
    a, b = torch.randn(B, E), torch.randn(B, E)
    x_all, y_all = torch.randn(256, 64), torch.randint(0, 8, (256,))
    x_hard, y_hard = torch.randn(1024, 128), torch.randint(0, 16, (1024,))
    h1, h2 = torch.randn(1024, 64), torch.randn(1024, 48)
    module = ek.MultiModalLoss(2, 3, proxies_per_class=20)
    z = torch.softmax(torch.randn(4096, 3, 2), dim=2).reshape(4096, 6)
    y_mm = torch.randint(0, 2, (4096,))
    return {
        "contrastive_loss": ((a, b), lambda u, v: ek.contrastive_loss(u, v),
                             lambda u, v: ref.contrastive_loss_reference(u, v)),
        # the same loss kept to (512, B) slabs (what large B needs): 8 slabs, each formed
        # twice (forward, backward)
        "contrastive_loss[block=512]": ((a, b),
                                        lambda u, v: ek.contrastive_loss(u, v, block=512),
                                        lambda u, v: ref.contrastive_loss_reference(u, v)),
        "batch_all_triplet_loss": ((x_all,), lambda t: ek.batch_all_triplet_loss(t, y_all, 0.2),
                                   lambda t: _batch_all_reference(t, y_all)),
        "batch_hard_triplet_loss": ((x_hard,),
                                    lambda t: ek.batch_hard_triplet_loss(t, y_hard, 0.2),
                                    lambda t: _batch_hard_reference(t, y_hard)),
        "cca_loss": ((h1, h2), lambda u, v: ek.cca_loss(u, v, k=16),
                     lambda u, v: ref.cca_loss_reference(u.double(), v.double(), k=16)),
        # gradients for z and for the module's W (a leaf of both)
        "multimodal_loss": ((z,), lambda t: module(t, y_mm),
                            lambda t: multimodal_loss_reference(t, y_mm, module.W, 2, 0.1),
                            [module.W]),
    }


CASES = _cases()


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_alignment_forward_backward(benchmark, op, provider):
    inputs, ours, reference, *extra = CASES[op]
    extra = extra[0] if extra else []
    fn = {"ether_kernels": ours, "eager": reference,
          "torch.compile": torch.compile(reference, dynamic=False)}[provider]
    leaves = [t.clone().requires_grad_(True) for t in inputs]

    def run():
        torch.autograd.grad(fn(*leaves), leaves + extra)

    benchmark.group = f"{op} fwd+bwd"
    benchmark.pedantic(run, rounds=5, warmup_rounds=2)
    record(benchmark, op=op, mode="forward+backward", shape=tuple(inputs[0].shape),
           dtype=torch.float32, device="cpu", provider=provider,
           bytes_moved=sum(t.numel() * t.element_size() for t in inputs))


# --------------------------------------------------------------------------------- GPU
# On CUDA: the contrastive loss at B = 32768 (the memory target: one B x block slab,
# where the plain formula holds the 4 GiB logits and their gradient) and the MultiModal
# loss's Triton kernel; peak memory is in the results table next to the time.

def _gpu_cases():
    torch.manual_seed(0)
    a, b = torch.randn(32768, 256, device="cuda"), torch.randn(32768, 256, device="cuda")
    module = ek.MultiModalLoss(2, 3, proxies_per_class=20).cuda()
    z = torch.softmax(torch.randn(65536, 3, 2, device="cuda"), dim=2).reshape(65536, 6)
    y = torch.randint(0, 2, (65536,), device="cuda")
    return {
        "contrastive_loss": ((a, b), lambda u, v: ek.contrastive_loss(u, v, block=512),
                             lambda u, v: ref.contrastive_loss_reference(u, v), []),
        "multimodal_loss": ((z,), lambda t: module(t, y),
                            lambda t: multimodal_loss_reference(t, y, module.W, 2, 0.1),
                            [module.W]),
    }


@pytest.mark.parametrize("op", ["contrastive_loss", "multimodal_loss"])
@pytest.mark.parametrize("provider", ["ether_kernels-cuda", "eager-cuda", "torch.compile"])
def test_alignment_forward_backward_cuda(benchmark, op, provider):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    inputs, ours, reference, extra = _gpu_cases()[op]
    fn = {"ether_kernels-cuda": ours, "eager-cuda": reference,
          "torch.compile": torch.compile(reference, dynamic=False)}[provider]
    leaves = [t.clone().requires_grad_(True) for t in inputs]

    def run():
        torch.autograd.grad(fn(*leaves), leaves + extra)
        torch.cuda.synchronize()

    benchmark.group = f"{op} fwd+bwd cuda"
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    record(benchmark, op=op, mode="forward+backward", shape=tuple(inputs[0].shape),
           dtype=torch.float32, device="cuda", provider=provider,
           bytes_moved=sum(t.numel() * t.element_size() for t in inputs))
