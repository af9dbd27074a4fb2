"""MultiModalLoss against the spec's formula written out with loops (the test's own oracle):
values, the gradients for z and W, gradcheck, the parameter's shape and initialisation, and
bad input."""

import math

import pytest
import torch

import ether_kernels as ek
from conftest import assert_second_order_matches_the_reference, backend_params, is_interpreted
from ether_kernels import multimodal_loss as mm_module
from ether_kernels.reference.multimodal_loss import multimodal_loss_reference

BACKENDS = (["reference"] + (["cpp"] if mm_module._CPU_BACKENDS else [])
            + (["triton"] if mm_module._GPU_BACKENDS else []))
FUSED = [p for p in backend_params()
         if {"cpp": bool(mm_module._CPU_BACKENDS),
             "triton": bool(mm_module._GPU_BACKENDS)}.get(p.values[1], False)]
needs_cpp = pytest.mark.skipif(not mm_module._CPU_BACKENDS, reason="the C++ extension is not built")


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,C,M,K,gamma", [(1, 2, 3, 1, 0.1), (7, 3, 2, 4, 0.1),
                                           (5, 4, 3, 20, 0.5), (131, 2, 3, 5, 0.1),
                                           (9, 3, 2, 4, 0.002)])
def test_multimodal_loss_matches_the_formula(backend, B, C, M, K, gamma):
    """131 rows: three row blocks of the C++ kernel, a ragged last one. A zero row of z
    (the normalisation's eps branch), an all-negative proxy column (relu gives 0), and
    gamma = 0.002 (the kernel's separate class-softmax path: exp(-2 / gamma) underflows)."""
    module = ek.MultiModalLoss(C, M, proxies_per_class=K, gamma=gamma).double()
    with torch.no_grad():
        module.W.uniform_(-1, 1)  # some negative entries: relu matters
        module.W[:, 0] = -1.0
    z = torch.softmax(torch.randn(B, M, C, dtype=torch.float64), dim=2).reshape(B, M * C)
    if B > 1:
        z[1] = 0.0
    z.requires_grad_(True)
    labels = torch.randint(0, C, (B,))
    with ek.use_backend(backend):
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
        # a bool ran as gamma 1.0, bool labels as classes 0 and 1
        (lambda: ek.MultiModalLoss(3, 2, gamma=True), TypeError,
         "MultiModalLoss: gamma must be a real number, got bool"),
        (lambda: module(torch.rand(4, 6), torch.ones(4, dtype=torch.bool)), ValueError,
         r"labels must be a \(4,\) integer tensor, got torch.bool"),
        # another device (meta here) ran the fake kernel: an uninitialised "loss"
        (lambda: module(torch.rand(4, 6), torch.zeros(4, dtype=torch.long, device="meta")),
         RuntimeError, "labels is on meta but z is on cpu"),
        (lambda: module(torch.rand(4, 6, device="meta"), torch.zeros(4, dtype=torch.long,
                                                                     device="meta")),
         RuntimeError, r"W \(the module's parameter\) is on cpu but z is on meta"),
        (lambda: module.predict(torch.rand(4, 6, device="meta")), RuntimeError, "W "),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("device,backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_fused_against_fp64_on_every_device(device, backend, dtype):
    if dtype == torch.bfloat16 and is_interpreted(device, backend):
        pytest.skip("the Triton interpreter does not support bfloat16")
    module = ek.MultiModalLoss(3, 3, proxies_per_class=6)
    z = torch.softmax(torch.randn(50, 3, 3), dim=2).reshape(50, 9)
    labels = torch.randint(0, 3, (50,))
    zl = z.to(device=device, dtype=dtype).requires_grad_(True)
    W = module.W.detach().to(device=device, dtype=dtype).requires_grad_(True)
    with ek.use_backend(backend):
        loss = mm_module.multimodal_loss(zl, labels.to(device), W, 3, 0.1)
    gz, gW = torch.autograd.grad(loss * 3.0, (zl, W))  # an upstream gradient of 3
    assert loss.dtype == gz.dtype == gW.dtype == dtype
    z64 = zl.detach().cpu().double().requires_grad_(True)
    W64 = W.detach().cpu().double().requires_grad_(True)
    expected = multimodal_loss_reference(z64, labels, W64, 3, 0.1)
    ez, eW = torch.autograd.grad(expected * 3.0, (z64, W64))
    # C++ computes in fp64, Triton in fp32 (fp64 for fp64): rounding of the inputs, the
    # outputs and, for Triton, fp32 arithmetic over a few hundred terms
    tol = {torch.float64: 1e-12, torch.float32: 1e-6 if backend == "cpp" else 2e-5,
           torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert abs(loss.double().item() - expected.item()) <= tol * abs(expected.item())
    for g, e in ((gz, ez), (gW, eW)):
        assert ((g.double().cpu() - e).abs().max() / e.abs().max()).item() <= tol


@needs_cpp
def test_the_op_called_without_its_gradients_still_differentiates():
    """compute_grad=False (the op forms no gradients) with inputs that require grad: the
    backward returned the empty tensors (an invalid-gradient error, and opcheck failed);
    now it goes through the reference."""
    z = torch.rand(5, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (5,))
    loss, _, _ = torch.ops.ether_kernels.multimodal_loss_forward(z, labels, W, 3, 0.1, False)
    got = torch.autograd.grad(loss * 2.5, (z, W))
    want = torch.autograd.grad(multimodal_loss_reference(z, labels, W, 3, 0.1) * 2.5, (z, W))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.library.opcheck(torch.ops.ether_kernels.multimodal_loss_forward,
                          (z, labels, W, 3, 0.1, False))


@needs_cpp
def test_fused_op_opcheck_compile_and_thread_count_determinism():
    ops = torch.ops.ether_kernels
    z = torch.rand(70, 6, dtype=torch.float64)
    W = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.randint(0, 2, (70,))
    torch.library.opcheck(ops.multimodal_loss_forward, (z, labels, W, 2, 0.1, False))
    torch.library.opcheck(ops.multimodal_loss_forward,
                          (z.clone().requires_grad_(True), labels,
                           W.clone().requires_grad_(True), 2, 0.1, True))
    module = ek.MultiModalLoss(2, 3, proxies_per_class=4).double()
    zz = z.clone().requires_grad_(True)
    compiled = torch.compile(lambda t: module(t, labels), fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(zz), zz)
    (g_eager,) = torch.autograd.grad(module(zz, labels), zz)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-12, atol=1e-15)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            zz = torch.rand(1000, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            zz.requires_grad_(True)
            y = torch.randint(0, 2, (1000,), generator=torch.Generator().manual_seed(2))
            loss = module(zz, y)
            results.append((loss, *torch.autograd.grad(loss, (zz, module.W))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_cpp
def test_fused_op_checks_its_arguments():
    ops = torch.ops.ether_kernels
    z, W = torch.rand(4, 6), torch.randn(6, 8)
    y = torch.zeros(4, dtype=torch.long)
    cases = [
        (lambda: ops.multimodal_loss_forward(z, torch.full((4,), 2), W, 2, 0.1, False),
         r"labels\[0\] = 2 is outside"),
        (lambda: ops.multimodal_loss_forward(z[:, :5], y, W, 2, 0.1, False), r"z must be"),
        (lambda: ops.multimodal_loss_forward(z, y, W.double(), 2, 0.1, False), r"same dtype"),
        (lambda: ops.multimodal_loss_forward(z, y, W, 2, 0.0, False), r"gamma"),
        (lambda: ops.multimodal_loss_forward(z, y.int(), W, 2, 0.1, False), r"int64"),
        (lambda: ops.multimodal_loss_forward(z, y, W[:, :7], 2, 0.1, False), r"W must be"),
        (lambda: ops.multimodal_loss_forward(z, y, W, 0, 0.1, False), r"num_classes must be"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.parametrize("device,backend", [p for p in FUSED if p.values[1] == "triton"])
def test_triton_op_opcheck_and_checks(device, backend):
    ops = torch.ops.ether_kernels
    z = torch.rand(20, 6, dtype=torch.float64, device=device)
    W = torch.randn(6, 8, dtype=torch.float64, device=device)
    labels = torch.randint(0, 2, (20,), device=device)
    torch.library.opcheck(ops.multimodal_loss_forward_triton, (z, labels, W, 2, 0.1, False))
    torch.library.opcheck(ops.multimodal_loss_forward_triton,
                          (z.clone().requires_grad_(True), labels,
                           W.clone().requires_grad_(True), 2, 0.1, True))
    # the op itself does not check label values (multimodal_loss does, before it): a label
    # out of range gives NaN, never a finite loss
    bad = labels.clone()
    bad[3] = 2
    loss, _, _ = ops.multimodal_loss_forward_triton(z, bad, W, 2, 0.1, False)
    assert torch.isnan(loss)
    cases = [
        (lambda: ops.multimodal_loss_forward_triton(z[:, :5], labels, W, 2, 0.1, False),
         r"z must be"),
        (lambda: ops.multimodal_loss_forward_triton(z, labels, W.float(), 2, 0.1, False),
         r"same dtype"),
        (lambda: ops.multimodal_loss_forward_triton(z, labels.int(), W, 2, 0.1, False),
         r"int64"),
        (lambda: ops.multimodal_loss_forward_triton(z, labels, W[:, :7], 2, 0.1, False),
         r"W must be"),
        (lambda: ops.multimodal_loss_forward_triton(z, labels, W, 2, 0.0, False),
         r"gamma must be > 0"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.parametrize("device,backend", FUSED)
def test_second_derivatives_match_the_reference(device, backend):
    """create_graph=True (a gradient penalty) goes through the reference: the fused op's
    gradients are first order (they used to be differentiated as constants)."""
    module = ek.MultiModalLoss(3, 2, proxies_per_class=4)
    z = torch.softmax(torch.randn(11, 2, 3, dtype=torch.float64), dim=2).reshape(11, 6)
    labels = torch.randint(0, 3, (11,))
    W = module.W.detach().double()
    assert_second_order_matches_the_reference(
        lambda z, W, labels: mm_module.multimodal_loss(z, labels, W, 3, 0.1),
        [z.requires_grad_(True), W.requires_grad_(True), labels], device, backend)


@pytest.mark.parametrize("device,backend", FUSED + [pytest.param("cpu", "reference")])
def test_transposed_inputs_give_the_reference_gradients(device, backend):
    """z and W given as transposed views (the kernels read row-major copies): values and both
    gradients equal the reference's on contiguous copies, and the ops' opcheck (the fake's
    strides equal the real op's) passes on the views."""
    module = ek.MultiModalLoss(3, 2, proxies_per_class=4).double().to(device)
    labels = torch.randint(0, 3, (5,), device=device)
    z_storage = torch.rand(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    W_storage = module.W.detach().t().contiguous().requires_grad_(True)  # (C*K, M*C)
    with ek.use_backend(backend):
        loss = mm_module.multimodal_loss(z_storage.t(), labels, W_storage.t(), 3, 0.1)
    got = torch.autograd.grad(loss, (z_storage, W_storage))
    z = z_storage.detach().t().contiguous().requires_grad_(True)
    W = module.W.detach().clone().requires_grad_(True)
    expected_loss = multimodal_loss_reference(z, labels, W, 3, 0.1)
    expected = torch.autograd.grad(expected_loss, (z, W))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[0], expected[0].t(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1].t(), rtol=1e-10, atol=1e-12)
    if backend != "reference":
        op = (torch.ops.ether_kernels.multimodal_loss_forward if backend == "cpp"
              else torch.ops.ether_kernels.multimodal_loss_forward_triton)
        torch.library.opcheck(op, (z_storage.detach().t().requires_grad_(True), labels,
                                   W_storage.detach().t().requires_grad_(True), 3, 0.1, True))


@needs_cpp
def test_compile_fullgraph_with_transposed_inputs():
    module = ek.MultiModalLoss(3, 2, proxies_per_class=4).double()
    labels = torch.randint(0, 3, (5,))
    z_storage = torch.rand(6, 5, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda t: module(t.t(), labels), fullgraph=True)
    (got,) = torch.autograd.grad(compiled(z_storage), (z_storage,))
    (expected,) = torch.autograd.grad(module(z_storage.t(), labels), (z_storage,))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_of_any_integer_dtype_and_out_of_range_labels(backend):
    """int32 / int16 / uint8 labels give the int64 labels' loss on every backend; a label
    outside [0, C) (cross_entropy's ignore_index -100 included: the loss is the mean over
    every row) is an error naming labels, on every backend."""
    module = ek.MultiModalLoss(3, 2, proxies_per_class=2)
    z = torch.rand(4, 6)
    labels = torch.tensor([0, 1, 2, 1])
    with ek.use_backend(backend):
        expected = module(z, labels)
        for dtype in (torch.int32, torch.int16, torch.uint8):
            torch.testing.assert_close(module(z, labels.to(dtype)), expected)
        for bad in (-100, -1, 3):
            wrong = labels.clone()
            wrong[1] = bad
            with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, 3\), got {bad}"):
                module(z, wrong)
