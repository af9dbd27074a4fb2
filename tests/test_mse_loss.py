"""Fused MSE: equal to torch.nn.functional.mse_loss in value and both gradients."""

import pytest
import torch
import torch.nn.functional as F

import ether_kernels as ek
from conftest import (assert_close, assert_second_order_matches_the_reference,
                      backend_params, is_interpreted)

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(1,), (3,), (41,), (423,), (7, 5), (3, 4, 17), (2, 3, 4, 5), (70000,), (65, 1031)]
REDUCTIONS = ["mean", "sum", "none"]


def reference_fp64(input, target, reduction, upstream):
    x = input.detach().double().requires_grad_(True)
    y = target.detach().double().requires_grad_(True)
    loss = F.mse_loss(x, y, reduction=reduction)
    grad_x, grad_y = torch.autograd.grad(loss, (x, y), upstream.double())
    return loss, grad_x, grad_y


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_matches_reference(device, backend, dtype, shape, reduction):
    if is_interpreted(device, backend) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    # Scaled by 0.5 so that a float16 "sum" over 70k elements stays inside float16's range.
    input = (0.5 * torch.randn(shape, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_(True)
    target = (0.5 * torch.randn(shape, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(shape if reduction == "none" else (), dtype=dtype, device=device)
    expected, expected_grad_x, expected_grad_y = reference_fp64(input, target, reduction, upstream)
    with ek.use_backend(backend):
        loss = ek.fused_mse_loss(input, target, reduction)
    assert loss.dtype == dtype
    grad_x, grad_y = torch.autograd.grad(loss, (input, target), upstream)
    assert_close(loss, expected, dtype, "loss")
    assert_close(grad_x, expected_grad_x, dtype, "d loss / d input")
    assert_close(grad_y, expected_grad_y, dtype, "d loss / d target")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fp64(device, backend, reduction):
    input = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)

    def loss_fn(x, y):
        with ek.use_backend(backend):
            return ek.fused_mse_loss(x, y, reduction)

    assert torch.autograd.gradcheck(loss_fn, (input, target))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("which", ["input", "target", "neither"])
def test_gradient_of_one_input_only(device, backend, which):
    input = torch.randn(5, 6, device=device, requires_grad=which == "input")
    target = torch.randn(5, 6, device=device, requires_grad=which == "target")
    with ek.use_backend(backend):
        loss = ek.fused_mse_loss(input, target)
    expected = F.mse_loss(input.detach(), target.detach())
    assert_close(loss, expected, torch.float32, "loss")
    if which == "neither":
        assert not loss.requires_grad
        return
    leaf = input if which == "input" else target
    (grad,) = torch.autograd.grad(loss, (leaf,))
    sign = 1.0 if which == "input" else -1.0
    assert_close(grad, sign * 2 * (input - target).detach() / input.numel(), torch.float32, "gradient")


@pytest.mark.parametrize("device,backend", backend_params())
def test_no_grad_mode_writes_no_gradient(device, backend):
    input = torch.randn(4, 4, device=device, requires_grad=True)
    target = torch.randn(4, 4, device=device)
    with torch.no_grad(), ek.use_backend(backend):
        loss = ek.fused_mse_loss(input, target)
    assert not loss.requires_grad
    assert_close(loss, F.mse_loss(input.detach(), target), torch.float32, "loss")


@pytest.mark.parametrize("device,backend", backend_params())
def test_retain_graph_backward_twice(device, backend):
    input = torch.randn(6, 3, device=device, requires_grad=True)
    target = torch.randn(6, 3, device=device)
    with ek.use_backend(backend):
        loss = ek.fused_mse_loss(input, target)
    loss.backward(retain_graph=True)
    first = input.grad.clone()
    loss.backward()
    torch.testing.assert_close(input.grad, 2 * first)


@pytest.mark.parametrize("device,backend", backend_params() + [pytest.param("cpu", "reference")])
def test_empty_input_matches_torch(device, backend):
    input = torch.randn(0, 3, device=device, requires_grad=True)
    target = torch.randn(0, 3, device=device)
    with ek.use_backend(backend):
        mean, total = ek.fused_mse_loss(input, target), ek.fused_mse_loss(input, target, "sum")
    assert torch.isnan(mean) and torch.isnan(F.mse_loss(input, target))
    assert total.item() == 0.0


@pytest.mark.parametrize("device,backend", backend_params())
def test_nan_propagates_and_inputs_are_not_modified(device, backend):
    input = torch.randn(5, 5, device=device)
    input[1, 3] = float("nan")
    input.requires_grad_(True)
    target = torch.randn(5, 5, device=device)
    before = input.detach().clone(), target.clone()
    with ek.use_backend(backend):
        loss = ek.fused_mse_loss(input, target)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(input.grad[1, 3]) and torch.isfinite(input.grad[0]).all()
    assert torch.equal(input.detach().nan_to_num(7.0), before[0].nan_to_num(7.0))
    assert torch.equal(target, before[1])


def test_cpp_is_bitwise_deterministic_across_thread_counts():
    input = torch.randn(3_000_001, requires_grad=True)
    target = torch.randn(3_000_001)
    threads_before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with ek.use_backend("cpp"):
                loss = ek.fused_mse_loss(input, target)
            results.append((loss.detach(), *torch.autograd.grad(loss, (input,))))
    finally:
        torch.set_num_threads(threads_before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _forward_op(backend):
    return (torch.ops.ether_kernels.mse_loss_forward_triton.default if backend == "triton"
            else torch.ops.ether_kernels.mse_loss_forward.default)


def _backward_op(backend):
    return (torch.ops.ether_kernels.mse_loss_backward_triton.default if backend == "triton"
            else torch.ops.ether_kernels.mse_loss_backward.default)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(device, backend, reduction):
    for requires_grad in (True, False):
        input = torch.randn(3, 5, device=device, requires_grad=requires_grad)
        target = torch.randn(3, 5, device=device)
        torch.library.opcheck(_forward_op(backend), (input, target, reduction, requires_grad))
    torch.library.opcheck(_backward_op(backend),
                          (torch.tensor(0.5, device=device), torch.randn(4, 3, device=device), True))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("needs", ["input", "target"])
def test_fp16_gradient_does_not_overflow_when_it_is_representable(device, backend, reduction,
                                                                  needs):
    """|input - target| = 40000 is a float16, twice it is not, while the gradient (times the
    upstream value) is: it must come out finite and right, not +-inf (the forward keeps
    input - target, not 2 (input - target); torch itself overflows here for "sum" and
    "none", so the fp64 gradient is the oracle)."""
    n = 4096
    input = torch.zeros(n, dtype=torch.float16, device=device)
    target = torch.zeros(n, dtype=torch.float16, device=device)
    input[0], target[1] = 40000.0, -30000.0
    upstream = torch.rand(n if reduction == "none" else (), dtype=torch.float16, device=device)
    # representable gradients: 2 * 40000 * upstream (/ n) below 65504
    upstream = upstream * {"none": 1e-4, "sum": 0.4, "mean": 1.0}[reduction]
    a = input.clone().requires_grad_(needs == "input")
    b = target.clone().requires_grad_(needs == "target")
    with ek.use_backend(backend):
        loss = ek.fused_mse_loss(a, b, reduction)
    (got,) = torch.autograd.grad(loss, (a if needs == "input" else b,), upstream)
    a64 = input.double().requires_grad_(needs == "input")
    b64 = target.double().requires_grad_(needs == "target")
    loss64 = F.mse_loss(a64, b64, reduction=reduction)
    (expected,) = torch.autograd.grad(loss64, (a64 if needs == "input" else b64,),
                                      upstream.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=1e-6)


@pytest.mark.skipif(not ek.info()["cpp"], reason="the C++ extension is not built")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_compile_fullgraph_runs_the_cpp_kernel(reduction):
    """The C++ op under torch.compile(fullgraph=True), where the automatic choice takes it
    (from CPU_MIN_ELEMENTS on): no graph break, the kernels' values and gradients."""
    n = ek.mse_loss.CPU_MIN_ELEMENTS
    input = torch.randn(n, requires_grad=True)
    target = torch.randn(n)
    compiled = torch.compile(lambda x, y: ek.fused_mse_loss(x, y, reduction) * 3.0,
                             fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(input, target), (input,))
    x = input.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.mse_loss(x, target, reduction=reduction) * 3.0, (x,))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device,backend", backend_params())
def test_batched_upstream_gradients(device, backend):
    """autograd.grad(..., is_grads_batched=True) (how torch.autograd.functional.jacobian
    vectorizes): one gradient per upstream value, as torch's."""
    input = torch.randn(6, 5, device=device, requires_grad=True)
    target = torch.randn(6, 5, device=device)
    upstream = torch.tensor([1.0, -2.0, 0.5], device=device)
    with ek.use_backend(backend):
        loss = ek.fused_mse_loss(input, target)
    (grads,) = torch.autograd.grad(loss, (input,), upstream, is_grads_batched=True)
    expected = torch.stack([2 * (input - target).detach() / input.numel() * u for u in upstream])
    torch.testing.assert_close(grads, expected)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(reduction):
    module = ek.FusedMSELoss(reduction)
    input = torch.randn(8, 5, requires_grad=True)
    target = torch.randn(8, 5)
    compiled = torch.compile(lambda x, y: module(x.sin(), y).sum(), fullgraph=True)
    loss = compiled(input, target)
    (grad,) = torch.autograd.grad(loss, (input,))
    x = input.detach().requires_grad_(True)
    expected = F.mse_loss(x.sin(), target, reduction=reduction).sum()
    (expected_grad,) = torch.autograd.grad(expected, (x,))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("change,error,match", [
    (dict(target=torch.randn(4, 6)), ValueError, r"input has shape \(4, 5\) but target has shape \(4, 6\)"),
    (dict(target=torch.randn(4, 5, dtype=torch.float16)), TypeError, r"input \(torch.float32\) and target \(torch.float16\)"),
    (dict(input=torch.ones(4, 5, dtype=torch.int32), target=torch.ones(4, 5, dtype=torch.int32)), TypeError, r"input must be a floating-point tensor"),
    (dict(input=None), TypeError, r"input must be a torch.Tensor"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_raises_a_clear_error(change, error, match, backend):
    kwargs = {"input": torch.randn(4, 5), "target": torch.randn(4, 5), "reduction": "mean", **change}
    with ek.use_backend(backend), pytest.raises(error, match=match):
        ek.fused_mse_loss(**kwargs)


def test_module_checks_reduction_at_construction():
    with pytest.raises(ValueError, match=r"FusedMSELoss: reduction must be one of"):
        ek.FusedMSELoss("median")


@pytest.mark.skipif(not ek.info()["cpp"], reason="the C++ extension is not loaded")
def test_automatic_choice_on_cpu_uses_the_kernel_only_where_it_pays(monkeypatch):
    from ether_kernels import mse_loss as module
    calls = []
    monkeypatch.setattr(module, "mse_loss_reference", lambda *a: calls.append("reference") or F.mse_loss(*a))
    small = torch.randn(8, 8)
    ek.fused_mse_loss(small, small)
    assert calls == ["reference"]
    big = torch.randn(module.CPU_MIN_ELEMENTS)
    ek.fused_mse_loss(big, big)
    assert calls == ["reference"]  # the C++ kernel ran
    with ek.use_backend("cpp"):
        ek.fused_mse_loss(small, small)
    assert calls == ["reference"]  # a forced backend is always honoured


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_derivatives_match_the_reference(device, backend, reduction):
    """create_graph=True (a gradient penalty) goes through the reference: the kernels'
    backward has no derivative of its own, and its gradient used to come back without a
    graph (the penalty's term was silently lost)."""
    input = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert_second_order_matches_the_reference(
        lambda a, b: ek.fused_mse_loss(a, b, reduction), [input, target], device, backend)
    assert_second_order_matches_the_reference(  # the target without a gradient
        lambda a, b: ek.fused_mse_loss(a, b, reduction), [input, target.detach()], device,
        backend)


def _backward_ops_called(run):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {e.name for e in profile.events()} & {"ether_kernels::mse_loss_backward_",
                                                  "ether_kernels::mse_loss_backward"}


@pytest.mark.skipif(not ek.info()["cpp"], reason="the C++ extension is not built")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpu_backward_writes_over_the_forwards_buffer_only_when_nothing_else_reads_it(reduction):
    """The CPU backward scales the forward's input - target in place (no fresh buffer:
    its page faults cost more than the pass) only when that buffer is read by nothing else:
    retain_graph, create_graph and a caller holding the op's second output get a new tensor,
    and every gradient equals F.mse_loss's."""
    input = torch.randn(33, 65, requires_grad=True)
    target = torch.randn(33, 65, requires_grad=True)
    expected = torch.autograd.grad(F.mse_loss(input, target, reduction=reduction) * 1.5,
                                   (input, target))
    with ek.use_backend("cpp"):
        grads = {}

        def plain():
            grads["plain"] = torch.autograd.grad(ek.fused_mse_loss(input, target, reduction) * 1.5,
                                                 (input, target))
        assert _backward_ops_called(plain) == {"ether_kernels::mse_loss_backward_"}

        def retained():
            loss = ek.fused_mse_loss(input, target, reduction) * 1.5
            grads["first"] = torch.autograd.grad(loss, (input, target), retain_graph=True)
            grads["second"] = torch.autograd.grad(loss, (input, target))
        assert "ether_kernels::mse_loss_backward" in _backward_ops_called(retained)

        stash = []  # a pack hook that keeps its own reference: no overwrite under it

        def hooked():
            with torch.autograd.graph.saved_tensors_hooks(lambda t: (stash.append(t), t)[1],
                                                          lambda t: t):
                loss = ek.fused_mse_loss(input, target, reduction) * 1.5
            grads["hooked"] = torch.autograd.grad(loss, (input, target))
        assert "ether_kernels::mse_loss_backward_" not in _backward_ops_called(hooked)
        kept = [t for t in stash if t.shape == input.shape and t is not input
                and t is not target]
        torch.testing.assert_close(kept[0], (input - target).detach())

        code = {"mean": 0, "sum": 1}[reduction]
        loss, difference = torch.ops.ether_kernels.mse_loss_forward(input, target, code, True)
        held = difference.clone()
        grads["held"] = torch.autograd.grad(loss * 1.5, (input, target))
        assert torch.equal(difference, held)  # the caller's tensor is left as it was
    for name in ("plain", "first", "second", "held", "hooked"):
        for got, want in zip(grads[name], expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not ek.info()["cpp"], reason="the C++ extension is not built")
def test_inplace_backward_op_checks_its_arguments():
    op = torch.ops.ether_kernels.mse_loss_backward_
    with pytest.raises(RuntimeError, match="grad_loss must hold one value, got 2"):
        op(torch.randn(3, 4), torch.ones(2), True)
    with pytest.raises(RuntimeError, match="difference must be floating point"):
        op(torch.ones(3, 4, dtype=torch.int64), torch.ones(()), True)
    with pytest.raises(RuntimeError, match="must be a contiguous CPU tensor"):
        op(torch.randn(4, 3).t(), torch.ones(()), True)
    difference = torch.randn(3, 4)
    expected = difference * 2 * 0.5 / 12  # the gradient of the mean from input - target
    op(difference, torch.tensor(0.5), True)  # in place: mean divides by the 12 elements
    torch.testing.assert_close(difference, expected)
