"""DTW and soft-DTW on CUDA tensors: the CUDA wavefront kernels against the fp64 reference
(values, gradients in x, y and cost; hard and soft; bands; per-pair lengths; every metric;
D = 1 (the register path), D <= 4 and D > 4; several stripes of rows per pair), gradcheck,
opcheck, torch.compile, no host synchronisation, broadcasting, long sequences.

Every test here needs a GPU (marked `gpu`); without one they are skipped.
"""

import pytest
import torch

import ether_kernels as ek
from ether_kernels import _dispatch, dynamic_time_warping

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available()
        or bool(_dispatch.unsupported_reasons("cuda", torch.device("cuda"),
                                              dynamic_time_warping._GPU_BACKENDS)),
        reason="needs a GPU and the CUDA build of the extension"),
]

# (D, metric): the kernels' three cost paths (D == 1, D <= 4, any D) and the three metrics;
# soft-DTW with sqeuclidean and D <= 4 takes the fused backward (D = 1 and D = 4 variants).
FEATURES = [(1, "sqeuclidean"), (4, "sqeuclidean"), (3, "euclidean"), (6, "l1")]


def case(B, N, M, D, dtype):
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = torch.randn(B, M, D, dtype=torch.float64)
    x_lengths = torch.randint(1, N + 1, (B,))
    y_lengths = torch.randint(1, M + 1, (B,))
    x_lengths[0], y_lengths[0] = N, M
    return x.to(dtype), y.to(dtype), x_lengths, y_lengths


def relative_error(actual, expected):
    expected = expected.double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double().cpu() - expected).abs().max() / scale).item()


def values_and_grads(x, y, x_lengths, y_lengths, weights, backend, device, **options):
    """values and the gradients of sum(weights * values) in x and y, on `device`."""
    a = x.to(device).requires_grad_(True)
    b = y.to(device).requires_grad_(True)
    gamma = options.pop("gamma")
    with ek.use_backend(backend):
        if gamma is None:
            values = ek.dtw(a, b, x_lengths=x_lengths.to(device), y_lengths=y_lengths.to(device),
                            **options)
        else:
            values = ek.soft_dtw(a, b, gamma, x_lengths=x_lengths.to(device),
                                 y_lengths=y_lengths.to(device), **options)
        grads = torch.autograd.grad((values * weights.to(device, values.dtype)).sum(), (a, b))
    return values, grads


@pytest.mark.parametrize("threads", [None, 32], ids=["default-block", "32-threads-several-stripes"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("features", FEATURES, ids=[f"D{d}-{m}" for d, m in FEATURES])
@pytest.mark.parametrize("band", [None, 2])
@pytest.mark.parametrize("gamma", [None, 0.1, 1.0])
def test_cuda_matches_the_reference(gamma, band, features, dtype, threads, monkeypatch):
    D, metric = features
    if threads is not None:
        # 32 threads per pair: stripes of 128 rows (soft) / 512 rows (hard), so these
        # lengths cross one (hard) to four (soft) stripe boundaries.
        monkeypatch.setenv("ETHER_KERNELS_DTW_THREADS", str(threads))
        B, N, M = 3, 530, 190
    else:
        B, N, M = 5, 37, 29
    x, y, x_lengths, y_lengths = case(B, N, M, D, dtype)
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    options = dict(gamma=gamma, band=band, metric=metric)
    values, grads = values_and_grads(x, y, x_lengths, y_lengths, weights, "cuda", "cuda",
                                     **dict(options))
    ref_values, ref_grads = values_and_grads(x.double(), y.double(), x_lengths, y_lengths,
                                             weights, "reference", "cpu", **dict(options))
    assert values.dtype == dtype and values.device.type == "cuda"
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    assert relative_error(values, ref_values) < bound, "values"
    if gamma is None and metric == "l1" and dtype == torch.float32:
        return  # l1 in 1-D has exact ties between paths; fp32 rounding picks among them
    grad_bound = 1e-9 if dtype == torch.float64 else 1e-4  # the spec's fp32 bound
    for name, grad, ref in zip(("x", "y"), grads, ref_grads):
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, ref) < grad_bound, f"gradient in {name}"


@pytest.mark.parametrize("threads", [None, 32], ids=["default-block", "32-threads-several-stripes"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("features", [(1, "sqeuclidean"), (4, "sqeuclidean"), (3, "euclidean")],
                         ids=["D1-fused", "D4-fused", "D3-E-path"])
@pytest.mark.parametrize("band", [None, 2])
def test_soft_two_rows_per_thread_matches_the_reference(band, features, dtype, threads,
                                                        monkeypatch):
    """ETHER_KERNELS_DTW_SOFT_ROWS=2 (twice the threads per pair): the same values and
    gradients as the reference, and the fake kernel shapes the kept state alike (opcheck)."""
    monkeypatch.setenv("ETHER_KERNELS_DTW_SOFT_ROWS", "2")
    if threads is not None:
        monkeypatch.setenv("ETHER_KERNELS_DTW_THREADS", str(threads))
    D, metric = features
    B, N, M = (3, 300, 170) if threads else (5, 37, 29)
    x, y, x_lengths, y_lengths = case(B, N, M, D, dtype)
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    options = dict(gamma=0.4, band=band, metric=metric)
    values, grads = values_and_grads(x, y, x_lengths, y_lengths, weights, "cuda", "cuda",
                                     **dict(options))
    ref_values, ref_grads = values_and_grads(x.double(), y.double(), x_lengths, y_lengths,
                                             weights, "reference", "cpu", **dict(options))
    assert relative_error(values, ref_values) < (1e-10 if dtype == torch.float64 else 1e-5)
    for grad, ref in zip(grads, ref_grads):
        assert relative_error(grad, ref) < (1e-9 if dtype == torch.float64 else 1e-4)
    metric_code = {"sqeuclidean": 0, "euclidean": 1, "l1": 2}[metric]
    torch.library.opcheck(torch.ops.ether_kernels.dtw_xy_forward,
                          (x.cuda(), y.cuda(), x_lengths.cuda(), y_lengths.cuda(), metric_code,
                           -1 if band is None else band, 0.4, True, True))


@pytest.mark.parametrize("threads", [None, 32], ids=["default-block", "32-threads-several-stripes"])
@pytest.mark.parametrize("D", [1, 3])
def test_fused_soft_backward_equals_the_E_path(D, threads, monkeypatch):
    """The fused backward (E contracted in the kernel) and the E path + matmuls compute the
    same gradients (fp64: to rounding), bands and per-pair lengths included."""
    if threads is not None:
        monkeypatch.setenv("ETHER_KERNELS_DTW_THREADS", str(threads))
    B, N, M = (3, 530, 190) if threads else (5, 37, 29)
    x, y, x_lengths, y_lengths = case(B, N, M, D, torch.float64)
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("ETHER_KERNELS_DTW_FUSED_BACKWARD", fused)
        results.append(values_and_grads(x, y, x_lengths, y_lengths, weights, "cuda", "cuda",
                                        gamma=0.3, band=40, metric="sqeuclidean"))
    (values, grads), (values_e, grads_e) = results
    torch.testing.assert_close(values, values_e, rtol=0, atol=0)  # the same forward
    for grad, grad_e in zip(grads, grads_e):
        assert torch.isfinite(grad).all()
        assert relative_error(grad, grad_e) < 1e-10


@pytest.mark.parametrize("threads", [None, 32])
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_from_cost_matches_the_reference(gamma, dtype, threads, monkeypatch):
    if threads is not None:
        monkeypatch.setenv("ETHER_KERNELS_DTW_THREADS", str(threads))
    B, N, M = (2, 560, 150) if threads else (4, 23, 31)
    cost = torch.rand(B, N, M, dtype=torch.float64)
    x_lengths = torch.randint(1, N + 1, (B,))
    y_lengths = torch.randint(1, M + 1, (B,))
    x_lengths[0], y_lengths[0] = N, M
    results = []
    for backend, device, dt in (("cuda", "cuda", dtype), ("reference", "cpu", torch.float64)):
        c = cost.to(device, dt).requires_grad_(True)
        with ek.use_backend(backend):
            kwargs = dict(band=3, x_lengths=x_lengths.to(device), y_lengths=y_lengths.to(device))
            values = (ek.dtw_from_cost(c, **kwargs) if gamma is None
                      else ek.soft_dtw_from_cost(c, gamma, **kwargs))
            (E,) = torch.autograd.grad(values.sum(), (c,))
        results.append((values, E))
    (values, E), (ref_values, ref_E) = results
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    assert relative_error(values, ref_values) < bound
    assert relative_error(E, ref_E) < (1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("band", [None, 1])
def test_cuda_gradcheck_fp64(band):
    x = torch.randn(3, 6, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    y = torch.randn(3, 5, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    x_lengths = torch.tensor([6, 4, 2], device="cuda")
    y_lengths = torch.tensor([5, 5, 3], device="cuda")

    def fn(a, b):
        return ek.soft_dtw(a, b, 0.7, band=band, x_lengths=x_lengths, y_lengths=y_lengths)

    assert torch.autograd.gradcheck(fn, (x, y))
    cost = torch.rand(2, 5, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: ek.soft_dtw_from_cost(c, 0.5, band=band), (cost,))


@pytest.mark.parametrize("soft", [False, True])
def test_cuda_opcheck(soft):
    ops = torch.ops.ether_kernels
    x = torch.randn(3, 7, 2, device="cuda", requires_grad=True)
    y = torch.randn(3, 5, 2, device="cuda", requires_grad=True)
    lengths = (torch.tensor([7, 3, 5], device="cuda"), torch.tensor([5, 5, 2], device="cuda"))
    torch.library.opcheck(ops.dtw_xy_forward, (x, y, *lengths, 0, 2, 0.5, soft, True))
    x6 = torch.randn(3, 7, 6, device="cuda", requires_grad=True)  # the generic-D kernels
    y6 = torch.randn(3, 5, 6, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.dtw_xy_forward, (x6, y6, *lengths, 1, 1, 0.5, soft, True))
    # keep=False keeps nothing for a backward: checked without gradients
    torch.library.opcheck(ops.dtw_xy_forward,
                          (x.detach(), y.detach(), *lengths, 2, -1, 0.5, soft, False))
    cost = torch.rand(3, 7, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.dtw_forward, (cost, *lengths, 1, 0.5, soft, True))


def test_cuda_soft_dtw_never_synchronises_with_the_host():
    x = torch.randn(4, 50, 3, device="cuda", requires_grad=True)
    y = torch.randn(4, 40, 3, device="cuda", requires_grad=True)
    ek.soft_dtw(x, y).sum().backward()  # warm-up (allocations, lazy initialisation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn in (lambda: ek.soft_dtw(x, y, 0.5, band=5), lambda: ek.dtw(x, y)):
            values = fn()
            if values.requires_grad:
                torch.autograd.grad(values.sum(), (x, y))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_broadcast_batch_and_cdist():
    x = torch.randn(1, 30, 2, device="cuda", dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 25, 2, device="cuda", dtype=torch.float64)
    values = ek.soft_dtw(x, y, 0.3)
    (gx,) = torch.autograd.grad(values.sum(), (x,))
    expected = torch.stack([ek.soft_dtw(x[0], y[b], 0.3)[0] for b in range(6)])
    torch.testing.assert_close(values, expected)
    (gx_loop,) = torch.autograd.grad(expected.sum(), (x,))
    torch.testing.assert_close(gx, gx_loop)
    X, Y = torch.randn(4, 20, 3, device="cuda"), torch.randn(5, 17, 3, device="cuda")
    torch.testing.assert_close(ek.cdist_dtw(X, Y, band=3),
                               ek.cdist_dtw(X.cpu(), Y.cpu(), band=3).cuda(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gamma", [1e-3, 1e-2, 0.1, 1.0, 10.0])
def test_cuda_fp32_gradients_within_1e4_of_fp64(gamma):
    x, y, x_lengths, y_lengths = case(3, 60, 45, 3, torch.float64)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        a = x.to("cuda", dtype).requires_grad_(True)
        b = y.to("cuda", dtype).requires_grad_(True)
        value = ek.soft_dtw(a, b, gamma, band=4, x_lengths=x_lengths.cuda(),
                            y_lengths=y_lengths.cuda())
        grads[dtype] = torch.autograd.grad(value.sum(), (a, b))
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert torch.isfinite(g32).all()
        assert relative_error(g32, g64) < 1e-4


def test_cuda_padding_is_never_read():
    x = torch.randn(2, 6, 2, device="cuda", dtype=torch.float64)
    y = torch.randn(2, 5, 2, device="cuda", dtype=torch.float64)
    x[0, 4:] = float("nan")
    y[1, 3:] = float("inf")
    x.requires_grad_(True)
    y.requires_grad_(True)
    lengths = dict(x_lengths=torch.tensor([4, 6], device="cuda"),
                   y_lengths=torch.tensor([5, 3], device="cuda"))
    values = ek.soft_dtw(x, y, 1.0, **lengths)
    gx, gy = torch.autograd.grad(values.sum(), (x, y))
    assert torch.isfinite(values).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert (gx[0, 4:] == 0).all() and (gy[1, 3:] == 0).all()


def test_cuda_long_sequences_match_the_cpu():
    """N = M = 4096 (two stripes of rows at the default block): soft value and gradient
    against the C++ CPU kernel in fp64; hard DTW at 8192."""
    x = torch.randn(1, 4096, 1, dtype=torch.float64)
    y = torch.randn(1, 4096, 1, dtype=torch.float64)
    results = []
    for device in ("cuda", "cpu"):
        a = x.to(device).requires_grad_(True)
        value = ek.soft_dtw(a, y.to(device), 1.0)
        (grad,) = torch.autograd.grad(value.sum(), (a,))
        results.append((value, grad))
    assert relative_error(results[0][0], results[1][0]) < 1e-10
    assert relative_error(results[0][1], results[1][1]) < 1e-9
    x, y = torch.randn(2, 8192, 1), torch.randn(2, 8192, 1)
    assert relative_error(ek.dtw(x.cuda(), y.cuda()), ek.dtw(x, y)) < 1e-5


def test_cuda_torch_compile_fullgraph():
    x = torch.randn(3, 20, 2, device="cuda", requires_grad=True)
    y = torch.randn(3, 16, 2, device="cuda")
    compiled = torch.compile(lambda a, b: ek.soft_dtw(a, b, 0.5).sum(), fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(x, y), (x,))
    (expected,) = torch.autograd.grad(ek.soft_dtw(x, y, 0.5).sum(), (x,))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("band", [None, 3])
def test_cuda_dtw_path_matches_the_reference(band):
    x, y, x_lengths, y_lengths = case(4, 40, 31, 2, torch.float64)
    with ek.use_backend("reference"):
        expected = ek.dtw_path(x, y, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
    paths = ek.dtw_path(x.cuda(), y.cuda(), band=band, x_lengths=x_lengths.cuda(),
                        y_lengths=y_lengths.cuda())
    for got, want in zip(paths, expected):
        assert torch.equal(got.cpu(), want)


def test_bad_soft_rows_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("ETHER_KERNELS_DTW_SOFT_ROWS", "3")
    x = torch.randn(2, 5, 1, device="cuda")
    with pytest.raises(RuntimeError, match="ETHER_KERNELS_DTW_SOFT_ROWS must be 2 or 4"):
        with ek.use_backend("cuda"):
            ek.soft_dtw(x, x, 1.0)


def test_cuda_double_backward_matches_the_cpu_reference():
    """create_graph=True on CUDA tensors goes through the reference (the kernels' backward
    has no derivative of its own): first and second derivatives equal the CPU reference's."""
    x = torch.randn(3, 9, 2, dtype=torch.float64)
    y = torch.randn(3, 6, 2, dtype=torch.float64)
    results = []
    for device, backend in (("cuda", "cuda"), ("cpu", "reference")):
        a = x.to(device).requires_grad_(True)
        b = y.to(device).requires_grad_(True)
        with ek.use_backend(backend):
            values = ek.soft_dtw(a, b, 0.3, band=2)
            first = torch.autograd.grad(values.sum(), (a, b), create_graph=True)
            penalty = values.sum() + sum(g.pow(2).sum() for g in first)
            second = torch.autograd.grad(penalty, (a, b))
        results.append([t.detach().cpu() for t in (*first, *second)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_cuda_hard_gradient_at_ties_equals_the_reference():
    """0/1 costs (tied predecessors everywhere): the CUDA backtrack's gradient is the
    reference's single optimal path (ties: diagonal, then up, then left)."""
    for trial in range(24):
        N, M = int(torch.randint(1, 9, ())), int(torch.randint(1, 9, ()))
        cost = torch.randint(0, 2, (3, N, M)).double()
        band = [None, 0, 1, 2][trial % 4]
        x_lengths, y_lengths = torch.randint(1, N + 1, (3,)), torch.randint(1, M + 1, (3,))
        results = []
        for device, backend in (("cuda", "cuda"), ("cpu", "reference")):
            c = cost.to(device).requires_grad_(True)
            with ek.use_backend(backend):
                value = ek.dtw_from_cost(c, band=band, x_lengths=x_lengths.to(device),
                                         y_lengths=y_lengths.to(device))
                results.append((value.detach().cpu(),
                                torch.autograd.grad(value.sum(), c)[0].cpu()))
        assert torch.equal(results[0][0], results[1][0])
        assert torch.equal(results[0][1], results[1][1]), (trial, band)
