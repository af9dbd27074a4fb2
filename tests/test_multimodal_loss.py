"""MultiModalLoss against the spec's formula written out with loops (the test's own oracle):
values, the gradients for z and W, gradcheck, the parameter's shape and initialisation, and
bad input."""

import math

import pytest
import torch

import ether_kernels as ek


def loop_logits(z, W, C, gamma):
    """The spec line by line, one sample and one proxy at a time, fp64."""
    B, MC = z.shape
    M, K = MC // C, W.shape[1] // C
    s = 1.0 / gamma
    w = torch.relu(W)
    proxies = [w[:, j] / max(w[:, j].norm(), torch.tensor(1e-12, dtype=W.dtype))
               for j in range(C * K)]
    rows = []
    for i in range(B):
        zi = z[i]
        S = torch.stack([(zi @ pj) / max(zi.norm(), torch.tensor(1e-12, dtype=z.dtype))
                         for pj in proxies])
        attention = torch.softmax(s * S, dim=0)
        a = sum(attention[j] * proxies[j] for j in range(C * K))
        att = torch.stack([sum(zi[m * C + c] * (1 + a[m * C + c]) for m in range(M))
                           for c in range(C)])
        S3 = S.view(C, K)
        Q = torch.softmax(s * S3, dim=0)  # over the classes
        sim = (Q * S3).sum(dim=1)
        rows.append(sim + att)
    return torch.stack(rows)


@pytest.mark.parametrize("B,C,M,K,gamma", [(1, 2, 3, 1, 0.1), (7, 3, 2, 4, 0.1),
                                           (5, 4, 3, 20, 0.5)])
def test_multimodal_loss_matches_the_formula(B, C, M, K, gamma):
    module = ek.MultiModalLoss(C, M, proxies_per_class=K, gamma=gamma).double()
    with torch.no_grad():
        module.W.uniform_(-1, 1)  # some negative entries: relu matters
    z = torch.softmax(torch.randn(B, M, C, dtype=torch.float64), dim=2).reshape(B, M * C)
    z.requires_grad_(True)
    labels = torch.randint(0, C, (B,))
    loss = module(z, labels)
    gz, gW = torch.autograd.grad(loss, (z, module.W))
    W = module.W.detach().clone().requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(loop_logits(z2, W, C, gamma), labels)
    ez, eW = torch.autograd.grad(expected, (z2, W))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, ez, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gW, eW, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(module.predict(z.detach()), loop_logits(z.detach(), W.detach(),
                                                                       C, gamma),
                               rtol=1e-12, atol=1e-12)


def test_multimodal_loss_gradcheck_parameter_and_init():
    module = ek.MultiModalLoss(3, 2, proxies_per_class=4, gamma=0.3).double()
    assert [name for name, _ in module.named_parameters()] == ["W"]
    assert module.W.shape == (2 * 3, 3 * 4)
    z = torch.rand(5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (5,))
    assert torch.autograd.gradcheck(lambda t, w: torch.nn.functional.cross_entropy(
        loop_logits(t, w, 3, 0.3), labels), (z, module.W))
    assert torch.autograd.gradcheck(lambda t: module(t, labels), (z,))
    # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C*K
    big = ek.MultiModalLoss(10, 3, proxies_per_class=20)
    bound = 1 / math.sqrt(10 * 20)
    assert big.W.abs().max().item() <= bound
    assert big.W.abs().max().item() > 0.95 * bound
    assert abs(big.W.mean().item()) < 0.05 * bound


def test_multimodal_loss_bad_input():
    module = ek.MultiModalLoss(3, 2, proxies_per_class=2)
    cases = [
        (lambda: module(torch.rand(4, 5), torch.zeros(4, dtype=torch.long)), ValueError, "z must"),
        (lambda: module(torch.rand(4, 6), torch.zeros(3, dtype=torch.long)), ValueError,
         "labels"),
        (lambda: module(torch.rand(4, 6), torch.zeros(4)), ValueError, "labels"),
        (lambda: module.predict(torch.ones(4, 6, dtype=torch.long)), TypeError, "floating"),
        (lambda: ek.MultiModalLoss(0, 2), ValueError, "num_classes"),
        (lambda: ek.MultiModalLoss(3, 2, gamma=0), ValueError, "gamma"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
