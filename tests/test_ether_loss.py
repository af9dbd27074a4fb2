"""Ether loss: the reference against the published formula, every backend against the
reference (forward and both gradients), autograd and compile integration, bad input."""

import pytest
import torch

import ether_kernels as ek
from conftest import (assert_close, assert_second_order_matches_the_reference,
                      backend_params, is_interpreted, random_pair)

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def published_ether(y_pred, y_true, modalities, alpha):
    """The published Ether(modalities, alpha) module's forward, written out literally."""
    intra = torch.mean((y_pred - y_true) ** 2)
    overall = torch.mean(y_pred)
    inter = 0.0
    for group in modalities:
        inter = inter + torch.abs(torch.mean(y_pred[:, group]) - overall)
    return intra + alpha * inter


def modalities_for(C):
    """Four groups over C channels: single, overlapping, a slice, a negative index."""
    if C == 1:
        return [0, [0], slice(0, None), -1]
    return [0, [C - 1, 0], slice(C // 2, None), -1]


def reference_fp64(y_pred, y_true, modalities, alpha, **options):
    """The reference on fp64 copies of the inputs: loss and gradients."""
    pred = y_pred.detach().double().requires_grad_(True)
    true = y_true.detach().double().requires_grad_(True)
    with ek.use_backend("reference"):
        loss = ek.ether_loss(pred, true, modalities, alpha, **options)
    grad_pred, grad_true = torch.autograd.grad(loss, (pred, true))
    return loss, grad_pred, grad_true


# -------------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("modalities", [
    [0, 1, 2, 3, 4],                              # each column its own modality (published docs)
    [slice(0, 2), slice(2, 5)],                   # two halves
    [[0, 3], [1, 2, 4]],                          # index lists
    [torch.tensor([4, 0]), 1, slice(1, 4, 2)],    # tensors, ints, strided slices together
    [[0, 1, 2], [2, 3]],                          # overlapping, channel 4 in no modality
])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 2.0])
def test_reference_equals_published_formula(modalities, alpha):
    y_pred, y_true = random_pair((10, 5), torch.float64, "cpu", (False, False))
    expected = published_ether(y_pred, y_true, modalities, alpha)
    with ek.use_backend("reference"):
        actual = ek.ether_loss(y_pred, y_true, modalities, alpha)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_reference_per_sample_and_l2_by_hand():
    y_pred, y_true = random_pair((4, 6, 3), torch.float64, "cpu", (False, False))
    groups = [[0, 1], [2, 3, 4, 5]]
    weights = [0.5, 2.0]
    expected_inter = 0.0
    for b in range(4):
        overall = y_pred[b].mean()
        for w, g in zip(weights, groups):
            expected_inter += w * (y_pred[b, g].mean() - overall) ** 2
    expected = torch.sum((y_pred - y_true) ** 2) + 0.7 * expected_inter / 4
    with ek.use_backend("reference"):
        actual = ek.ether_loss(y_pred, y_true, groups, 0.7, discrepancy="l2", weights=weights,
                               reduction="sum", per_sample=True)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_modality_forms_are_equivalent():
    y_pred, y_true = random_pair((8, 6), torch.float64, "cpu", (False, False))
    forms = [
        torch.tensor([0, 0, 1, 1, 1, 2]),                         # modality ids
        [[0, 1], [2, 3, 4], [5]],                                 # index lists
        [slice(0, 2), slice(2, 5), -1],                           # slices and a negative int
        [torch.tensor([1, 0]), (2, 3, 4), torch.tensor([5])],     # tensors and tuples
        # negative steps; no start going down is the last channel (was refused as empty)
        [slice(1, None, -1), slice(4, 1, -1), slice(None, 4, -1)],
    ]
    losses = [ek.ether_loss(y_pred, y_true, form, 1.5) for form in forms]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-13, atol=0)


# -------------------------------------------------------------- every backend vs reference

SHAPES = [(1, 1), (6, 1), (5, 3), (4, 41), (3, 423), (3, 4, 7), (2, 3, 4, 5), (2, 3, 130), (300, 5),
          (3, 2100), (2, 3, 70, 3)]
OPTIONS = [
    dict(discrepancy="l1", reduction="mean", per_sample=False, weights=None),
    dict(discrepancy="l2", reduction="sum", per_sample=False, weights=[0.5, 2.0, 1.0, 0.0]),
    dict(discrepancy="l1", reduction="mean", per_sample=True, weights=None),
    dict(discrepancy="l2", reduction="mean", per_sample=True, weights=[1.0, 0.25, 3.0, 1.0]),
]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=["l1-mean", "l2-sum-weights", "l1-per-sample",
                                                  "l2-per-sample-weights"])
def test_backend_matches_reference(device, backend, dtype, shape, options):
    if is_interpreted(device, backend) and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    if is_interpreted(device, backend) and torch.Size(shape).numel() > 20000:
        pytest.skip("large shapes are too slow under the Triton interpreter")
    y_pred, y_true = random_pair(shape, dtype, device)
    modalities = modalities_for(shape[1])
    expected, expected_grad_pred, expected_grad_true = reference_fp64(
        y_pred, y_true, modalities, 0.8, **options)
    with ek.use_backend(backend):
        loss = ek.ether_loss(y_pred, y_true, modalities, 0.8, **options)
    assert loss.dtype == dtype and loss.shape == ()
    grad_pred, grad_true = torch.autograd.grad(loss, (y_pred, y_true))
    assert_close(loss, expected, dtype, "loss")
    assert_close(grad_pred, expected_grad_pred, dtype, "d loss / d y_pred")
    assert_close(grad_true, expected_grad_true, dtype, "d loss / d y_true")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("per_sample", [False, True])
def test_many_modalities(device, backend, per_sample):
    # More modalities and membership pairs than one block of the GPU finalize step (256).
    C = 300
    modalities = list(range(C)) + [slice(0, C, 2), [5, 299, 17]]
    y_pred, y_true = random_pair((3, C, 2), torch.float64, device)
    weights = torch.rand(len(modalities)).tolist()
    options = dict(weights=weights, per_sample=per_sample, discrepancy="l1")
    expected, expected_grad_pred, _ = reference_fp64(y_pred, y_true, modalities, 0.3, **options)
    with ek.use_backend(backend):
        loss = ek.ether_loss(y_pred, y_true, modalities, 0.3, **options)
    (grad_pred,) = torch.autograd.grad(loss, (y_pred,))
    assert_close(loss, expected, torch.float64, "loss")
    assert_close(grad_pred, expected_grad_pred, torch.float64, "d loss / d y_pred")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("which", ["y_pred", "y_true"])
def test_gradient_of_one_input_only(device, backend, which):
    y_pred, y_true = random_pair((7, 5, 3), torch.float32, device,
                                 (which == "y_pred", which == "y_true"))
    _, expected_grad_pred, expected_grad_true = reference_fp64(y_pred, y_true, [0, [1, 2]], 1.0)
    with ek.use_backend(backend):
        loss = ek.ether_loss(y_pred, y_true, [0, [1, 2]], 1.0)
    loss.backward()
    if which == "y_pred":
        assert y_true.grad is None
        assert_close(y_pred.grad, expected_grad_pred, torch.float32, "d loss / d y_pred")
    else:
        assert y_pred.grad is None
        assert_close(y_true.grad, expected_grad_true, torch.float32, "d loss / d y_true")


@pytest.mark.parametrize("device,backend", backend_params())
def test_upstream_gradient_scales_the_gradients(device, backend):
    y_pred, y_true = random_pair((9, 4), torch.float64, device)
    with ek.use_backend(backend):
        loss = ek.ether_loss(y_pred, y_true, [[0, 1], [2, 3]], 0.5)
    grads = torch.autograd.grad(3.5 * loss, (y_pred, y_true))
    _, ref_pred, ref_true = reference_fp64(y_pred, y_true, [[0, 1], [2, 3]], 0.5)
    assert_close(grads[0], 3.5 * ref_pred, torch.float64, "d (3.5 loss) / d y_pred")
    assert_close(grads[1], 3.5 * ref_true, torch.float64, "d (3.5 loss) / d y_true")


@pytest.mark.parametrize("device,backend", backend_params())
def test_noncontiguous_inputs(device, backend):
    base_pred, base_true = random_pair((6, 9), torch.float32, device, (False, False))
    y_pred = base_pred.t().requires_grad_(True)  # (9, 6), strides (1, 9)
    y_true = base_true.t()
    expected, expected_grad, _ = reference_fp64(y_pred, y_true, [0, slice(2, 5)], 1.0)
    with ek.use_backend(backend):
        loss = ek.ether_loss(y_pred, y_true, [0, slice(2, 5)], 1.0)
    loss.backward()
    assert_close(loss, expected, torch.float32, "loss")
    assert_close(y_pred.grad, expected_grad, torch.float32, "d loss / d y_pred")


# ------------------------------------------------------------------------ special values

@pytest.mark.parametrize("device,backend", backend_params() + [pytest.param("cpu", "reference")])
def test_alpha_zero_is_exactly_the_mse(device, backend):
    y_pred, y_true = random_pair((11, 7), torch.float64, device)
    with ek.use_backend(backend):
        loss = ek.ether_loss(y_pred, y_true, [0, [1, 2]], 0.0)
    expected = torch.nn.functional.mse_loss(y_pred.detach(), y_true)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-14, atol=0)
    (grad_pred,) = torch.autograd.grad(loss, (y_pred,))
    torch.testing.assert_close(grad_pred, 2 * (y_pred - y_true).detach() / y_pred.numel(),
                               rtol=1e-13, atol=1e-17)


@pytest.mark.parametrize("device,backend", backend_params() + [pytest.param("cpu", "reference")])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("discrepancy", ["l1", "l2"])
def test_non_finite_values_propagate(device, backend, bad_value, alpha, discrepancy):
    """A NaN or inf in y_pred makes the loss non-finite, and the gradient is the reference's
    (NaN where it has NaN, the same values elsewhere): with alpha = 0 the MSE's own gradient
    (no NaN spread over every element by 0 * NaN), with l1 torch.abs's sign(NaN) = 0."""
    y_pred, y_true = random_pair((5, 4), torch.float32, device, (False, False))
    y_pred[2, 1] = bad_value
    results = []
    for name in (backend, "reference"):
        p = y_pred.clone().requires_grad_(True)
        with ek.use_backend(name):
            loss = ek.ether_loss(p, y_true, [0, [1, 2]], alpha, discrepancy=discrepancy)
        assert not torch.isfinite(loss), f"a {bad_value} in y_pred gave a finite loss {loss.item()}"
        results.append(torch.autograd.grad(loss, (p,))[0])
    got, expected = results
    assert not torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, equal_nan=True)
    if alpha == 0:
        p = y_pred.clone().requires_grad_(True)
        mse = torch.nn.functional.mse_loss(p, y_true)
        torch.testing.assert_close(got, torch.autograd.grad(mse, (p,))[0], equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("value", [0.1, 0.3, 1 / 3, 0.7])
def test_l1_subgradient_is_zero_when_fp32_means_are_equal(device, backend, value):
    """Equal fp32 means (0.1 is not exact in binary): the gap is 0 in the kernels' fp64 and
    in the reference's, so the subgradient is 0 on every path, the second-order one too."""
    y_pred = torch.full((7, 6), value, device=device, requires_grad=True)
    y_true = torch.zeros(7, 6, device=device)
    expected = torch.full_like(y_pred, 2 * value / 42).detach()
    for name in (backend, "reference"):
        with ek.use_backend(name):
            loss = ek.ether_loss(y_pred, y_true, [[0, 1], [2, 3, 4, 5]], 5.0)
        (grad,) = torch.autograd.grad(loss, (y_pred,), retain_graph=True)
        (grad_with_graph,) = torch.autograd.grad(loss, (y_pred,), create_graph=True)
        torch.testing.assert_close(grad, expected)
        torch.testing.assert_close(grad_with_graph.detach(), expected)


def test_l1_subgradient_is_zero_when_means_are_equal():
    # Every modality mean equals the overall mean: the inter term and its gradient vanish.
    y_pred = torch.ones(4, 6, dtype=torch.float64, requires_grad=True)
    y_true = torch.zeros(4, 6, dtype=torch.float64)
    for backend in ("cpp", "reference"):
        with ek.use_backend(backend):
            loss = ek.ether_loss(y_pred, y_true, [[0, 1], [2, 3, 4, 5]], 5.0)
        (grad,) = torch.autograd.grad(loss, (y_pred,))
        torch.testing.assert_close(grad, torch.full_like(grad, 2.0 / 24), rtol=0, atol=1e-15)


@pytest.mark.parametrize("device,backend", backend_params())
def test_user_tensors_are_not_modified(device, backend):
    y_pred, y_true = random_pair((6, 5, 4), torch.float16, device)
    pred_before, true_before = y_pred.detach().clone(), y_true.detach().clone()
    with ek.use_backend(backend):
        loss = ek.ether_loss(y_pred, y_true, [0, [1, 2]], 1.0, per_sample=True)
    loss.backward()
    assert torch.equal(y_pred.detach(), pred_before)
    assert torch.equal(y_true.detach(), true_before)


def test_the_functional_api_builds_its_device_tensors_once():
    import sys
    module = sys.modules["ether_kernels.ether_loss"]
    y_pred, y_true = random_pair((4, 6), torch.float32, "cpu", (False, False))
    ek.ether_loss(y_pred, y_true, [slice(0, 3), [3, 5]], 0.5)
    groups = module.shared_groups([slice(0, 3), [3, 5]])
    cached = groups.tensors(6, y_pred.device, (1.0, 1.0))
    ek.ether_loss(y_pred, y_true, [slice(0, 3), [3, 5]], 0.5)
    again = groups.tensors(6, y_pred.device, (1.0, 1.0))
    assert all(a is b for a, b in zip(again, cached))
    assert module.shared_groups([slice(0, 3), (3, 5)]) is groups  # equal groups, one entry


def test_a_weight_schedule_does_not_grow_the_cache():
    """weights that change every step (a schedule) replace the cached weights tensor: the
    group tensors stay the same objects and nothing accumulates."""
    import sys
    module = sys.modules["ether_kernels.ether_loss"]
    y_pred, y_true = random_pair((4, 6), torch.float32, "cpu", (True, False))
    groups = module.shared_groups([slice(0, 3), [3, 5]])
    first = groups.tensors(6, y_pred.device, (1.0, 1.0))
    for step in range(50):
        w = (1.0 + step / 100, 0.5)
        loss = ek.ether_loss(y_pred, y_true, [slice(0, 3), [3, 5]], 0.5, weights=list(w))
        with ek.use_backend("reference"):
            expected = ek.ether_loss(y_pred, y_true, [slice(0, 3), [3, 5]], 0.5, weights=list(w))
        torch.testing.assert_close(loss, expected)
        current = groups.tensors(6, y_pred.device, w)
        assert current[2].tolist() == list(w)
    assert current[0] is first[0] and current[1] is first[1] and current[3] is first[3]
    assert len(groups._tensors) == 1 and len(groups._weights) == 1


def test_huge_modality_ids_fail_fast():
    """An id far beyond the channel count is refused without enumerating the ids below."""
    with pytest.raises(ValueError, match="modality 4 has no channel"):
        ek.ether_loss(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3, 10**12]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b.values[1] for b in backend_params() if b.values[0] == "cuda"])
def test_no_host_synchronisation_on_cuda(backend):
    y_pred, y_true = random_pair((64, 12), torch.float32, "cuda")
    with ek.use_backend(backend):
        ek.ether_loss(y_pred, y_true, [slice(0, 6), [6, 7]], 0.5)  # builds the cached tensors
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = ek.ether_loss(y_pred, y_true, [slice(0, 6), [6, 7]], 0.5)
            torch.autograd.grad(loss, (y_pred, y_true))
            ek.fused_mse_loss(y_pred, y_true)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- determinism

def test_cpp_is_bitwise_deterministic_across_thread_counts():
    y_pred, y_true = random_pair((1500, 300), torch.float32, "cpu")
    results = []
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with ek.use_backend("cpp"):
                loss = ek.ether_loss(y_pred, y_true, [slice(0, 100), [5, 250, 7]], 1.0)
            results.append((loss.detach(), *torch.autograd.grad(loss, (y_pred, y_true))))
    finally:
        torch.set_num_threads(threads_before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------- autograd / compile / ops

@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("discrepancy", ["l1", "l2"])
def test_gradcheck_fp64(device, backend, per_sample, discrepancy):
    y_pred, y_true = random_pair((4, 5, 2), torch.float64, device)

    def loss_fn(pred, true):
        with ek.use_backend(backend):
            return ek.ether_loss(pred, true, [0, [1, 4], slice(2, 4)], 0.9,
                                 discrepancy=discrepancy, per_sample=per_sample)

    assert torch.autograd.gradcheck(loss_fn, (y_pred, y_true))


def _forward_op(backend):
    return (torch.ops.ether_kernels.ether_loss_forward_triton.default if backend == "triton"
            else torch.ops.ether_kernels.ether_loss_forward.default)


def _backward_op(backend):
    return (torch.ops.ether_kernels.ether_loss_backward_triton.default if backend == "triton"
            else torch.ops.ether_kernels.ether_loss_backward.default)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("per_sample", [False, True])
def test_opcheck(device, backend, per_sample):
    members = dict(member_channel=torch.tensor([0, 1, 2, 2], device=device),
                   member_group=torch.tensor([0, 0, 1, 2], device=device),
                   weights=torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, device=device))
    for requires_grad in [(True, True), (True, False), (False, False)]:
        y_pred, y_true = random_pair((3, 4, 5), torch.float32, device, requires_grad)
        args = (y_pred, y_true, members["member_channel"], members["member_group"],
                members["weights"], 0.5, 0, 0, per_sample)
        torch.library.opcheck(_forward_op(backend), args)
    coef = torch.randn((3, 4) if per_sample else (4,), device=device)
    grad_args = (torch.tensor(1.5, device=device), y_pred.detach(), y_true.detach(), coef,
                 0, per_sample, True, False)
    torch.library.opcheck(_backward_op(backend), grad_args)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_torch_compile_fullgraph(backend):
    module = ek.EtherLoss([slice(0, 3), [3, 4, 5]], alpha=0.5)
    y_pred, y_true = random_pair((16, 6), torch.float32, "cpu")

    @torch.compile(fullgraph=True)
    def step(pred, true):
        return module(pred * 2.0, true) + 1.0

    with ek.use_backend(backend):
        loss = step(y_pred, y_true)
        grads = torch.autograd.grad(loss, (y_pred, y_true))
    expected, grad_pred, grad_true = reference_fp64(y_pred * 2.0, y_true, [slice(0, 3), [3, 4, 5]], 0.5)
    assert_close(loss, expected + 1.0, torch.float32, "compiled loss")
    assert_close(grads[0], 2.0 * grad_pred, torch.float32, "compiled d loss / d y_pred")
    assert_close(grads[1], grad_true, torch.float32, "compiled d loss / d y_true")


def test_module_is_a_drop_in_for_the_published_one():
    y_pred, y_true = random_pair((10, 5), torch.float64, "cpu")
    module = ek.EtherLoss([0, 1, 2, 3, 4], 0.25)
    loss = module(y_pred, y_true)
    expected = published_ether(y_pred, y_true, [0, 1, 2, 3, 4], 0.25)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    grads = torch.autograd.grad(loss, (y_pred, y_true))
    expected_grads = torch.autograd.grad(expected, (y_pred, y_true))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)
    assert "alpha=0.25" in repr(module)


# -------------------------------------------------------------------------- bad input

def _good():
    return dict(y_pred=torch.randn(4, 5), y_true=torch.randn(4, 5), modalities=[0, [1, 2]],
                alpha=1.0)


@pytest.mark.parametrize("change,error,match", [
    (dict(y_true=torch.randn(4, 6)), ValueError, r"y_pred has shape \(4, 5\) but y_true has shape \(4, 6\)"),
    (dict(y_true=torch.randn(4, 5, dtype=torch.float64)), TypeError, r"y_pred \(torch.float32\) and y_true \(torch.float64\)"),
    (dict(y_pred=torch.ones(4, 5, dtype=torch.int64), y_true=torch.ones(4, 5, dtype=torch.int64)), TypeError, r"y_pred must be a floating-point tensor"),
    (dict(y_true=[1.0, 2.0]), TypeError, r"y_true must be a torch.Tensor"),
    (dict(y_pred=torch.randn(5), y_true=torch.randn(5)), ValueError, r"y_pred must have at least 2 dimensions"),
    (dict(y_pred=torch.randn(0, 5), y_true=torch.randn(0, 5)), ValueError, r"y_pred must not be empty"),
    (dict(modalities=[0, 5]), IndexError, r"modalities\[1\]: channel index 5 is out of range"),
    (dict(modalities=[0, -6]), IndexError, r"modalities\[1\]: channel index -6 is out of range"),
    (dict(modalities=[0, []]), ValueError, r"modalities\[1\] is empty"),
    (dict(modalities=[0, slice(3, 3)]), ValueError, r"modalities\[1\] = slice\(3, 3, None\) selects no channel"),
    (dict(modalities=[0, slice(7, None)]), ValueError, r"modalities\[1\] = slice\(7, None, None\) selects no channel"),
    (dict(modalities=[[1, 2, 1]]), ValueError, r"modalities\[0\] lists channel 1 twice"),
    (dict(modalities=[[1, -4]]), ValueError, r"modalities\[0\] names the same channel twice"),
    (dict(modalities=[]), ValueError, r"modalities must name at least one modality"),
    (dict(modalities=[0, 1.5]), TypeError, r"modalities\[1\] must be an int"),
    (dict(modalities=[True]), TypeError, r"modalities\[0\] must be an int.*got bool"),
    (dict(modalities="01"), TypeError, r"modalities must be a list"),
    (dict(modalities=torch.tensor([0, 0, 2, 2, 2])), ValueError, r"modality 1 has no channel"),
    (dict(modalities=torch.tensor([0, 0, 1])), ValueError, r"modality-id tensor has 3 entries but y_pred has 5 channels"),
    (dict(modalities=torch.tensor([0.0, 1.0])), TypeError, r"modality-id tensor must be an integer tensor"),
    (dict(modalities=torch.tensor([0, -1, 0, 0, 0])), ValueError, r"modality ids must be >= 0"),
    (dict(alpha=-0.5), ValueError, r"alpha must be a finite number >= 0, got -0.5"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a finite number >= 0"),
    (dict(alpha="1"), TypeError, r"alpha must be a real number"),
    (dict(discrepancy="l3"), ValueError, r"discrepancy must be one of 'l1', 'l2', got 'l3'"),
    (dict(reduction="none"), ValueError, r"reduction must be one of 'mean', 'sum', got 'none'"),
    (dict(weights=[1.0]), ValueError, r"weights has 1 entries but there are 2 modalities"),
    (dict(weights=[1.0, -2.0]), ValueError, r"weights\[1\] must be a finite number >= 0"),
    (dict(per_sample=1), TypeError, r"per_sample must be a bool"),
])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_raises_a_clear_error(change, error, match, backend):
    kwargs = {**_good(), **change}
    with ek.use_backend(backend), pytest.raises(error, match=match):
        ek.ether_loss(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    with pytest.raises(RuntimeError, match=r"y_pred is on cpu but y_true is on cuda"):
        ek.ether_loss(torch.randn(3, 2), torch.randn(3, 2, device="cuda"), [0, 1])


@pytest.mark.parametrize("modalities,error,match", [
    ([0, []], ValueError, r"modalities\[1\] is empty"),
    ([[2, 2]], ValueError, r"modalities\[0\] lists channel 2 twice"),
    ([slice(0, 4, 0)], ValueError, r"slice step cannot be zero"),
])
def test_module_construction_checks_early(modalities, error, match):
    with pytest.raises(error, match=match):
        ek.EtherLoss(modalities)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(alpha=-1.0), ValueError, r"EtherLoss: alpha must be a finite number >= 0"),
    (dict(discrepancy="huber"), ValueError, r"EtherLoss: discrepancy must be one of"),
    (dict(reduction="max"), ValueError, r"EtherLoss: reduction must be one of"),
    (dict(weights=[1.0, 2.0, 3.0]), ValueError, r"weights has 3 entries but there are 2"),
])
def test_module_options_are_checked_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ek.EtherLoss([0, 1], **kwargs)


# ------------------------------------------------------------- property-based: any groups

from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def shapes_and_groups(draw):
    C = draw(st.integers(1, 12))
    B = draw(st.integers(1, 6))
    rest = draw(st.lists(st.integers(1, 3), max_size=2))
    channel = st.integers(-C, C - 1)
    group = st.one_of(
        channel,
        st.lists(channel, min_size=1, max_size=C, unique_by=lambda i: i % C),
        st.builds(slice, st.integers(0, C - 1), st.integers(1, C)).filter(
            lambda s: len(range(*s.indices(C))) > 0),
    )
    groups = draw(st.lists(group, min_size=1, max_size=5))
    return (B, C, *rest), groups


@settings(max_examples=60, deadline=None)
@given(case=shapes_and_groups(), alpha=st.floats(0.0, 4.0))
def test_any_valid_groups_match_the_published_formula(case, alpha):
    shape, groups = case
    y_pred = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y_true = torch.randn(shape, dtype=torch.float64)
    expected = published_ether(y_pred, y_true, groups, alpha)
    (expected_grad,) = torch.autograd.grad(expected, (y_pred,))
    loss = ek.ether_loss(y_pred, y_true, groups, alpha)  # automatic backend: C++ on CPU
    (grad,) = torch.autograd.grad(loss, (y_pred,))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not ek.info()["cpp"], reason="the C++ extension is not loaded")
def test_the_cpp_op_checks_its_arguments():
    op = torch.ops.ether_kernels.ether_loss_forward
    p, t = torch.randn(4, 3), torch.randn(4, 3)
    w = torch.ones(2, dtype=torch.float64)
    good = (torch.tensor([0, 1]), torch.tensor([0, 1]))
    cases = [
        ((p, t, torch.tensor([0, 3]), good[1], w, 1.0, 0, 0, False), r"member_channel\[1\] = 3 is out of range"),
        ((p, t, good[0], torch.tensor([0, 2]), w, 1.0, 0, 0, False), r"member_group\[1\] = 2 is out of range"),
        ((p, t, good[0], torch.tensor([0, 0]), w, 1.0, 0, 0, False), r"modality 1 has no channel"),
        ((p, t, *good, w, 1.0, 7, 0, False), r"discrepancy code must be 0"),
        ((p, t, *good, w, 1.0, 0, 2, False), r"reduction code must be 0"),
        ((p, t, *good, w.float(), 1.0, 0, 0, False), r"weights must be a 1-D float64"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    with pytest.raises(RuntimeError, match=r"reduction code must be 0"):
        torch.ops.ether_kernels.ether_loss_backward(torch.tensor(1.0), p, t, torch.zeros(3), 5,
                                                    False, True, True)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("discrepancy,reduction,per_sample", [("l1", "mean", False),
                                                              ("l2", "sum", True)])
def test_second_derivatives_match_the_reference(device, backend, discrepancy, reduction,
                                                per_sample):
    """create_graph=True (a gradient penalty) goes through the reference: the kernels'
    backward has no derivative of its own, and its gradient used to come back without a
    graph (the penalty's term was silently lost)."""
    y_pred = torch.randn(9, 5, 3, dtype=torch.float64, requires_grad=True)
    y_true = torch.randn(9, 5, 3, dtype=torch.float64, requires_grad=True)
    for inputs in ([y_pred, y_true], [y_pred, y_true.detach()]):
        assert_second_order_matches_the_reference(
            lambda a, b: ek.ether_loss(a, b, [[0, 1], [2, 3, 4]], alpha=0.7,
                                       discrepancy=discrepancy, weights=[0.25, 0.75],
                                       reduction=reduction, per_sample=per_sample),
            inputs, device, backend)


def test_alpha_may_change_under_a_fullgraph_compile():
    """An alpha schedule: the second distinct value is a symbolic float for torch.compile,
    whose argument check must still trace (math.isfinite could not)."""
    y_pred, y_true = random_pair((6, 5), torch.float32, "cpu", (True, False))
    state = {"alpha": 1.0}
    compiled = torch.compile(
        lambda p, t: ek.ether_loss(p, t, [0, [1, 2]], state["alpha"]), fullgraph=True)
    for alpha in (1.0, 0.5, 0.25):
        state["alpha"] = alpha
        (got,) = torch.autograd.grad(compiled(y_pred, y_true), (y_pred,))
        (expected,) = torch.autograd.grad(ek.ether_loss(y_pred, y_true, [0, [1, 2]], alpha),
                                          (y_pred,))
        torch.testing.assert_close(got, expected)
