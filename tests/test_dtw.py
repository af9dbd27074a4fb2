"""DTW and soft-DTW: the reference against a plain double loop of the spec, the peers'
conventions (tslearn, dtaidistance), gradients, robustness and bad input; every available
backend against the reference."""

import math

import numpy as np
import pytest
import torch

import ether_kernels as ek
from ether_kernels import _dispatch, dynamic_time_warping

ALL_BACKENDS = ["reference"] + [
    b for b in ("cpp",) if not _dispatch.unsupported_reasons(b, torch.device("cpu"), dynamic_time_warping._CPU_BACKENDS)
]


def naive_R(cost, n, m, band=None, gamma=None):
    """The spec's recurrence as a plain double loop in float64 (the test's own oracle)."""
    R = np.full((n + 1, m + 1), np.inf)
    R[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if band is not None and not (-band + min(0, m - n) <= j - i <= band + max(0, m - n)):
                continue
            prev = (R[i - 1, j - 1], R[i - 1, j], R[i, j - 1])
            mu = min(prev)
            if gamma is None or mu == np.inf:
                best = mu
            else:
                best = mu - gamma * np.log(sum(np.exp(-(v - mu) / gamma) for v in prev))
            R[i, j] = cost[i - 1, j - 1] + best
    return R


def force_cpu_checkpoints(monkeypatch):
    """Makes the C++ soft-DTW keep checkpoints on any pair (S ~ sqrt(N), a multiple of 4:
    small pairs get several segments), and returns a function that runs a callable under
    the profiler and asserts that the checkpointed forward and backward ops ran."""
    monkeypatch.setattr(dynamic_time_warping, "cpu_checkpoint_rows",
                        lambda N, M: max(4, -(-(math.isqrt(N - 1) + 1) // 4) * 4))

    def checked(run):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            result = run()
        names = {event.name for event in prof.events()}
        for op in ("forward", "backward"):
            assert f"ether_kernels::dtw_xy_soft_{op}_checkpointed" in names, names
        return result
    return checked


def random_case(B=4, N=7, M=9, D=2, dtype=torch.float64):
    x = torch.randn(B, N, D, dtype=dtype)
    y = torch.randn(B, M, D, dtype=dtype)
    x_lengths = torch.randint(1, N + 1, (B,))
    y_lengths = torch.randint(1, M + 1, (B,))
    x_lengths[0], y_lengths[0] = N, M
    return x, y, x_lengths, y_lengths


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("band", [None, 0, 1, 3])
@pytest.mark.parametrize("gamma", [None, 1e-3, 0.1, 1.0, 10.0])
def test_values_match_the_recurrence(backend, band, gamma):
    x, y, x_lengths, y_lengths = random_case()
    cost = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    with ek.use_backend(backend):
        if gamma is None:
            values = ek.dtw(x, y, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
        else:
            values = ek.soft_dtw(x, y, gamma, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
    for b in range(x.shape[0]):
        n, m = int(x_lengths[b]), int(y_lengths[b])
        expected = naive_R(cost[b].numpy(), n, m, band, gamma)[n, m]
        assert math.isclose(values[b].item(), expected, rel_tol=1e-10, abs_tol=1e-10), (b, values[b], expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("band", [None, 2])
def test_soft_dtw_gradcheck_fp64(backend, band):
    x, y, x_lengths, y_lengths = random_case(B=3, N=5, M=6, D=2)
    x.requires_grad_(True)
    y.requires_grad_(True)

    def fn(a, b):
        with ek.use_backend(backend):
            return ek.soft_dtw(a, b, 0.7, band=band, x_lengths=x_lengths, y_lengths=y_lengths)

    assert torch.autograd.gradcheck(fn, (x, y))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_soft_dtw_from_cost_gradient_is_the_expected_alignment(backend):
    cost = torch.rand(2, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(c):
        with ek.use_backend(backend):
            return ek.soft_dtw_from_cost(c, 0.5, band=1)

    assert torch.autograd.gradcheck(fn, (cost,))
    (E,) = torch.autograd.grad(fn(cost).sum(), (cost,))
    # Every path goes from (0, 0) to (n-1, m-1): the expected alignment holds both ends fully.
    torch.testing.assert_close(E[:, 0, 0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(E[:, -1, -1], torch.ones(2, dtype=torch.float64))
    assert (E >= -1e-12).all() and (E <= 1 + 1e-12).all()


@pytest.mark.parametrize("gamma", [1e-3, 1e-2, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("band", [None, 1])
def test_fp32_gradients_within_1e4_of_fp64_and_never_nan(gamma, band):
    x, y, x_lengths, y_lengths = random_case(B=3, N=12, M=9, D=3)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        a = x.to(dtype).requires_grad_(True)
        b = y.to(dtype).requires_grad_(True)
        value = ek.soft_dtw(a, b, gamma, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
        grads[dtype] = torch.autograd.grad(value.sum(), (a, b))
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert torch.isfinite(g32).all()
        scale = g64.abs().max()
        assert ((g32.double() - g64).abs().max() / scale).item() < 1e-4


def test_padding_is_never_read_and_gets_zero_gradient():
    x, y, _, _ = random_case(B=2, N=6, M=5)
    x_lengths, y_lengths = torch.tensor([4, 6]), torch.tensor([5, 3])
    x[0, 4:] = float("nan")  # padding
    y[1, 3:] = float("inf")
    x.requires_grad_(True)
    y.requires_grad_(True)
    values = ek.soft_dtw(x, y, 1.0, x_lengths=x_lengths, y_lengths=y_lengths)
    assert torch.isfinite(values).all()
    gx, gy = torch.autograd.grad(values.sum(), (x, y))
    assert torch.isfinite(gx).all() and torch.isfinite(gy).all()
    assert (gx[0, 4:] == 0).all() and (gy[1, 3:] == 0).all()


@pytest.mark.parametrize("checkpointed", [False, True], ids=["grid", "checkpointed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_an_infinite_point_makes_its_pair_inf_as_the_reference_does(monkeypatch, dtype,
                                                                     checkpointed):
    """A +inf in x makes every cost of its row +inf: every path crosses it, so the pair's
    value is +inf (not NaN), and its gradient is what the reference's autograd gives (the
    soft-min passes no gradient through +inf: the seed meets only the end cell's own cost,
    where the kept weights of an unreachable cell would pass it on); the other pairs (a
    lane group of 8 with per-pair lengths, and one more) are untouched."""
    x, y = torch.randn(9, 12, 2, dtype=dtype), torch.randn(9, 10, 2, dtype=dtype)
    x_lengths, y_lengths = torch.randint(9, 13, (9,)), torch.randint(7, 11, (9,))
    x_lengths[3] = 10
    x[3, 5, 1] = math.inf
    checked = force_cpu_checkpoints(monkeypatch) if checkpointed else (lambda run: run())
    results = []
    for backend in ("auto", "reference"):
        a = x.clone().requires_grad_(True)

        def run():
            value = ek.soft_dtw(a, y, 0.5, x_lengths=x_lengths, y_lengths=y_lengths)
            return (value, *torch.autograd.grad(value.sum(), (a,)))
        with ek.use_backend(backend):
            results.append(checked(run) if backend == "auto" else run())
    (value, grad), (expected, expected_grad) = results
    assert value[3] == math.inf
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "l1"])
def test_metrics_and_identical_points_give_finite_gradients(metric):
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = x.clone()  # zero distances on the diagonal: sqrt'(0) must not leak a NaN
    x.requires_grad_(True)
    value = ek.soft_dtw(x, y, 0.5, metric=metric)
    (grad,) = torch.autograd.grad(value.sum(), (x,))
    assert torch.isfinite(grad).all()
    diff = (x.detach()[:, :, None] - y[:, None]).double()
    cost = {"sqeuclidean": (diff ** 2).sum(-1), "euclidean": (diff ** 2).sum(-1).sqrt(),
            "l1": diff.abs().sum(-1)}[metric]
    torch.testing.assert_close(value.detach(), ek.soft_dtw_from_cost(cost, 0.5))


def test_divergence_is_zero_on_equal_series_and_non_negative():
    x, y, _, _ = random_case(B=3, N=8, M=5)
    assert ek.soft_dtw_divergence(x, x, 1.0).abs().max() < 1e-10
    assert (ek.soft_dtw_divergence(x, y, 1.0) >= -1e-10).all()  # n != m works
    loss = ek.SoftDTWLoss(gamma=0.5, normalize=True)(x, y)
    assert loss.shape == () and loss > 0


def test_shapes_broadcast_and_single_pairs():
    x = torch.randn(7, dtype=torch.float64)
    y = torch.randn(3, 9, 1, dtype=torch.float64)
    values = ek.dtw(x, y)  # (N,) against a batch of 3: broadcast
    assert values.shape == (3,)
    for b in range(3):
        torch.testing.assert_close(ek.dtw(x, y[b, :, 0])[0], values[b])
    assert ek.soft_dtw(torch.randn(5, 2), torch.randn(4, 2)).shape == (1,)


def test_gamma_to_zero_tends_to_hard_dtw():
    x, y, _, _ = random_case()
    hard = ek.dtw(x, y)
    torch.testing.assert_close(ek.soft_dtw(x, y, 1e-4), hard, rtol=1e-3, atol=1e-2)


def test_dtw_path_is_monotone_optimal_and_matches_the_matrix():
    x, y, x_lengths, y_lengths = random_case(B=3, N=6, M=8, D=1)
    paths = ek.dtw_path(x, y, x_lengths=x_lengths, y_lengths=y_lengths)
    matrices = ek.dtw_path(x, y, x_lengths=x_lengths, y_lengths=y_lengths, return_matrix=True)
    values = ek.dtw(x, y, x_lengths=x_lengths, y_lengths=y_lengths)
    cost = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)
    for b, path in enumerate(paths):
        n, m = int(x_lengths[b]), int(y_lengths[b])
        assert path[0].tolist() == [0, 0] and path[-1].tolist() == [n - 1, m - 1]
        steps = (path[1:] - path[:-1]).tolist()
        assert all(s in ([1, 1], [1, 0], [0, 1]) for s in steps)
        torch.testing.assert_close(cost[b][path[:, 0], path[:, 1]].sum(), values[b])
        assert matrices[b].sum() == len(path)


def test_cdist_dtw_equals_pairwise_calls():
    X = torch.randn(3, 6, 2, dtype=torch.float64)
    Y = torch.randn(4, 5, 2, dtype=torch.float64)
    table = ek.cdist_dtw(X, Y, band=2)
    for p in range(3):
        for q in range(4):
            torch.testing.assert_close(table[p, q], ek.dtw(X[p], Y[q], band=2)[0])
    # empty sides give empty tables; a huge band is no band
    assert ek.cdist_dtw(X[:0], Y).shape == (0, 4) and ek.cdist_dtw(X, Y[:0]).shape == (3, 0)
    torch.testing.assert_close(ek.cdist_dtw(X, Y, band=2**63), ek.cdist_dtw(X, Y))


def test_empty_batches_with_lengths():
    x, y = torch.randn(0, 5, 2), torch.randn(0, 4, 2)
    lengths = torch.zeros(0, dtype=torch.int64)
    assert ek.dtw(x, y, x_lengths=lengths, y_lengths=lengths).shape == (0,)
    assert ek.soft_dtw(x, y, 0.5, x_lengths=lengths).shape == (0,)


# ---------------------------------------------------------------- peers' conventions

def test_parity_with_tslearn():
    metrics = pytest.importorskip("tslearn.metrics")
    for _ in range(3):
        a = np.random.randn(9, 2)
        b = np.random.randn(12, 2)
        x, y = torch.from_numpy(a), torch.from_numpy(b)
        # hard DTW: tslearn returns sqrt(R[n][m]); band r is its sakoe_chiba_radius r
        for r in (None, 1, 4):
            kwargs = {} if r is None else dict(global_constraint="sakoe_chiba", sakoe_chiba_radius=r)
            ours = ek.dtw(x, y, band=r)[0].item()
            assert math.isclose(math.sqrt(ours), metrics.dtw(a, b, **kwargs), rel_tol=1e-9)
        # soft-DTW value and expected alignment
        for gamma in (0.1, 1.0):
            assert math.isclose(ek.soft_dtw(x, y, gamma)[0].item(), metrics.soft_dtw(a, b, gamma=gamma),
                                rel_tol=1e-9, abs_tol=1e-9)
            alignment, _ = metrics.soft_dtw_alignment(a, b, gamma=gamma)
            np.testing.assert_allclose(ek.soft_dtw_alignment(x, y, gamma)[0].numpy(), alignment,
                                       rtol=1e-8, atol=1e-10)


def test_parity_with_dtaidistance():
    dtai = pytest.importorskip("dtaidistance.dtw")
    for _ in range(3):
        a = np.random.randn(15)
        b = np.random.randn(11)
        for r in (None, 0, 2, 5):
            kwargs = {} if r is None else dict(window=r + 1)  # our band r is its window r + 1
            expected = dtai.distance(a, b, use_c=False, **kwargs)
            ours = ek.dtw(torch.from_numpy(a), torch.from_numpy(b), band=r)[0].item()
            assert math.isclose(math.sqrt(ours), expected, rel_tol=1e-9), (r, ours, expected)


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,error,match", [
    (lambda x, y: ek.soft_dtw(x, y, 0.0), ValueError, r"soft_dtw: gamma must be a finite number > 0, got 0.0"),
    (lambda x, y: ek.soft_dtw(x, y, -1.0), ValueError, r"gamma must be a finite number > 0"),
    # 1 / gamma overflows (a tie then gave 0 * inf = NaN)
    (lambda x, y: ek.soft_dtw(x, y, 1e-310), ValueError, r"soft_dtw: gamma must be at least"),
    (lambda x, y: ek.SoftDTWLoss(gamma=1e-310), ValueError, r"SoftDTWLoss: gamma must be at least"),
    (lambda x, y: ek.dtw(x, y, band=-1), ValueError, r"dtw: band must be >= 0"),
    (lambda x, y: ek.dtw(x, y, band=1.5), TypeError, r"band must be an int"),
    (lambda x, y: ek.dtw(x, y, x_lengths=torch.tensor([0, 3])), ValueError, r"x_lengths must lie in \[1, 5\], got 0"),
    (lambda x, y: ek.dtw(x, y, y_lengths=torch.tensor([7, 3])), ValueError, r"y_lengths must lie in \[1, 6\], got 7"),
    (lambda x, y: ek.dtw(x, y, x_lengths=torch.tensor([3])), ValueError, r"x_lengths must have shape \(2,\)"),
    (lambda x, y: ek.dtw(x, y, x_lengths=torch.tensor([3.0, 2.0])), TypeError, r"x_lengths must be an integer tensor"),
    (lambda x, y: ek.dtw(x, torch.randn(2, 6, 3)), ValueError, r"x has 2 features per step but y has 3"),
    (lambda x, y: ek.dtw(x, torch.randn(2, 0, 2)), ValueError, r"y is an empty sequence"),
    (lambda x, y: ek.dtw(x, torch.randn(3, 6, 2)), ValueError, r"x has 2 series but y has 3"),
    (lambda x, y: ek.dtw(x.long(), y), TypeError, r"x must be a floating-point tensor"),
    (lambda x, y: ek.soft_dtw(x.tolist(), y), TypeError, r"^soft_dtw: x must be a torch.Tensor"),
    (lambda x, y: ek.dtw(x, y, y_lengths=[3, 2]), TypeError, r"^dtw: y_lengths must be a torch.Tensor"),
    (lambda x, y: ek.dtw_from_cost(None), TypeError, r"^dtw_from_cost: cost must be a torch.Tensor"),
    (lambda x, y: ek.dtw(x, y.double()), TypeError, r"x \(torch.float32\) and y \(torch.float64\)"),
    (lambda x, y: ek.dtw(x, y, metric="cosine"), ValueError, r"metric must be one of"),
    (lambda x, y: ek.SoftDTWLoss(reduction="max"), ValueError, r"SoftDTWLoss: reduction must be one of"),
    (lambda x, y: ek.soft_dtw_from_cost(torch.randn(2, 3), 0.0), ValueError, r"soft_dtw_from_cost: gamma"),
    (lambda x, y: ek.dtw(x[:, :, :0], y[:, :, :0]), ValueError, r"dtw: x has no features \(D = 0"),
    (lambda x, y: ek.dtw_path(x, y, return_matrix="yes"), TypeError, r"return_matrix must be a bool"),
    (lambda x, y: ek.cdist_dtw(x, torch.randn(2, 6, 3)), ValueError, r"cdist_dtw: X has 2 features per step but Y has 3"),
    (lambda x, y: ek.cdist_dtw(x, y.double()), TypeError, r"cdist_dtw: X \(torch.float32\) and Y"),
    (lambda x, y: ek.cdist_dtw(x, y, band=-2), ValueError, r"cdist_dtw: band must be >= 0"),
    (lambda x, y: ek.cdist_dtw(x, y, metric="cos"), ValueError, r"cdist_dtw: metric must be one of"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    x, y = torch.randn(2, 5, 2), torch.randn(2, 6, 2)
    with pytest.raises(error, match=match):
        call(x, y)


# ------------------------------------------------------------------ registration (C++ ops)

@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("soft", [False, True])
def test_opcheck(soft):
    for requires_grad in (True, False):
        cost = torch.rand(3, 5, 4, dtype=torch.float64, requires_grad=requires_grad)
        lengths = (torch.tensor([5, 3, 4]), torch.tensor([4, 4, 2]))
        torch.library.opcheck(torch.ops.ether_kernels.dtw_forward.default,
                              (cost, *lengths, 1, 0.5, soft, requires_grad))
    R = torch.ops.ether_kernels.dtw_forward(cost, *lengths, 1, 0.5, soft, True)[1]
    torch.library.opcheck(torch.ops.ether_kernels.dtw_backward.default,
                          (torch.rand(3, dtype=torch.float64), cost, R, *lengths, 1, 0.5, soft))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    x = torch.randn(2, 6, 3, requires_grad=True)
    y = torch.randn(2, 5, 3)
    criterion = ek.SoftDTWLoss(gamma=0.5)

    @torch.compile(fullgraph=True)
    def loss_fn(a, b):
        return criterion(a * 2.0, b)

    with ek.use_backend(backend):
        loss = loss_fn(x, y)
        (grad,) = torch.autograd.grad(loss, (x,))
    # The oracle is the reference in fp64: the fp32 reference's own rounding reaches ~5e-5
    # on a gradient entry of ~0.06 (an fp32 R of ~50 feeds the soft-min's differences), more
    # than the kernels' (they compute in fp64), so the bound is the suite's fp32 one: 1e-4 of
    # the largest gradient entry.
    with ek.use_backend("reference"):
        x_ref = x.detach().double().requires_grad_(True)
        expected = criterion(x_ref * 2.0, y.double())
        (expected_grad,) = torch.autograd.grad(expected, (x_ref,))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    assert ((grad.double() - expected_grad).abs().max() / expected_grad.abs().max()) < 1e-4


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph_gamma_and_lengths_change_between_calls(backend):
    """A float gamma that changes between calls (traced as a symbolic float) and per-pair
    lengths (checked on the device while compiling: no host read) keep a fullgraph compile
    working; a length out of range still raises, naming the argument."""
    def soft(a, b, gamma, x_lengths, y_lengths):
        return ek.soft_dtw(a, b, gamma, x_lengths=x_lengths, y_lengths=y_lengths)

    compiled = torch.compile(soft, fullgraph=True)
    x = torch.randn(3, 7, 2, requires_grad=True)
    y = torch.randn(3, 5, 2)
    with ek.use_backend(backend):
        for gamma, x_lengths, y_lengths in ((0.5, [7, 4, 1], [5, 2, 3]),
                                            (1.3, [2, 7, 6], [1, 5, 5])):
            lengths = torch.tensor(x_lengths), torch.tensor(y_lengths)
            got = compiled(x, y, gamma, *lengths)
            (grad,) = torch.autograd.grad(got.sum(), (x,))
            want = soft(x, y, gamma, *lengths)
            (want_grad,) = torch.autograd.grad(want.sum(), (x,))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)
        with pytest.raises(RuntimeError, match=r"soft_dtw: x_lengths must lie in \[1, 7\]"):
            compiled(x, y, 0.5, torch.tensor([7, 0, 2]), torch.tensor([5, 5, 5]))


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_torch_compile_fullgraph_a_few_long_pairs_in_strips(threads):
    """A few long pairs take the C++ strips by a rule that reads the torch thread count (see
    cpu_soft_strip_pairs): a fullgraph compile traces that rule and matches eager C++."""
    x = torch.randn(2, 83, 3, requires_grad=True)
    y = torch.randn(2, 70, 3)
    assert dynamic_time_warping._runs_in_strips(2, 83, 70, x.dtype)
    previous = torch.get_num_threads()
    torch._dynamo.reset()  # a graph traced on another thread count would be reused
    try:
        torch.set_num_threads(threads)
        with ek.use_backend("cpp"):
            compiled = torch.compile(lambda a, b: ek.soft_dtw(a, b, 0.7), fullgraph=True)
            got = compiled(x, y)
            (grad,) = torch.autograd.grad(got.sum(), (x,))
            want = ek.soft_dtw(x, y, 0.7)
            (want_grad,) = torch.autograd.grad(want.sum(), (x,))
    finally:
        torch.set_num_threads(previous)
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
def test_opcheck_series_ops():
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    lengths = (torch.tensor([5, 3, 4]), torch.tensor([4, 4, 2]))
    for soft in (False, True):
        torch.library.opcheck(torch.ops.ether_kernels.dtw_xy_forward.default,
                              (x, y, *lengths, 0, 1, 0.5, soft, True))
        R = torch.ops.ether_kernels.dtw_xy_forward(x, y, *lengths, 0, 1, 0.5, soft, True)[1]
        torch.library.opcheck(torch.ops.ether_kernels.dtw_xy_backward.default,
                              (torch.rand(3, dtype=torch.float64), x.detach(), y.detach(), R,
                               *lengths, 0, 1, 0.5, soft, True, True))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "l1"])
@pytest.mark.parametrize("gamma", [None, 0.05, 2.0])
@pytest.mark.parametrize("ragged", [False, True], ids=["equal-lengths", "per-pair-lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_series_values_and_gradients_match_the_reference(backend, metric, gamma, ragged, dtype):
    # 17 pairs: one full group of 16 equal-length pairs (the vector path) and a remainder.
    x, y, x_lengths, y_lengths = random_case(B=17, N=9, M=7, D=3)
    if not ragged:
        x_lengths, y_lengths = None, None
    x32, y32 = x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)
    with ek.use_backend(backend):
        fn = ek.dtw if gamma is None else (lambda *a, **k: ek.soft_dtw(a[0], a[1], gamma, **k))
        values = fn(x32, y32, band=2, x_lengths=x_lengths, y_lengths=y_lengths, metric=metric)
    grads = torch.autograd.grad(values.sum(), (x32, y32))
    with ek.use_backend("reference"):
        # the same (possibly fp32-rounded) inputs, in fp64
        xr = x32.detach().double().requires_grad_(True)
        yr = y32.detach().double().requires_grad_(True)
        fn = ek.dtw if gamma is None else (lambda *a, **k: ek.soft_dtw(a[0], a[1], gamma, **k))
        expected = fn(xr, yr, band=2, x_lengths=x_lengths, y_lengths=y_lengths, metric=metric)
    expected_grads = torch.autograd.grad(expected.sum(), (xr, yr))
    if dtype == torch.float64:
        torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-10)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    else:  # the spec's bound for fp32: within 1e-4 relative of fp64 (relative to the largest)
        torch.testing.assert_close(values.double(), expected, rtol=2e-5, atol=1e-5)
        for g, e in zip(grads, expected_grads):
            assert ((g.double() - e).abs().max() / e.abs().max()).item() < 1e-4


def test_long_sequences_stay_finite_and_fp32_tracks_fp64():
    # N = M = 4000 on the CPU (the spec's robustness case), value only.
    x = torch.randn(1, 4000, 1, dtype=torch.float64)
    y = torch.randn(1, 4000, 1, dtype=torch.float64)
    for gamma in (None, 0.1):
        run = ek.dtw if gamma is None else (lambda a, b: ek.soft_dtw(a, b, gamma))
        exact = run(x, y)
        single = run(x.float(), y.float())
        assert torch.isfinite(exact).all() and torch.isfinite(single).all()
        assert abs(single.double().item() - exact.item()) <= 1e-4 * abs(exact.item())


@pytest.mark.parametrize("gamma", [1e-3, 10.0])
def test_large_values_give_finite_gradients(gamma):
    x = (1e3 * torch.randn(4, 30, 2)).requires_grad_(True)
    y = 1e3 * torch.randn(4, 25, 2)
    values = ek.soft_dtw(x, y, gamma, band=3)
    (grad,) = torch.autograd.grad(values.sum(), (x,))
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
def test_the_cpp_ops_check_their_arguments():
    ops = torch.ops.ether_kernels
    cost = torch.rand(2, 3, 4)
    xl, yl = torch.tensor([3, 2]), torch.tensor([4, 4])
    x, y = torch.randn(2, 3, 2), torch.randn(2, 4, 2)
    cases = [
        (lambda: ops.dtw_forward(cost, xl, yl, -1, 0.0, True, False), r"gamma"),
        (lambda: ops.dtw_forward(cost, torch.tensor([0, 2]), yl, -1, 1.0, True, False), r"x_lengths"),
        (lambda: ops.dtw_backward(torch.ones(2), cost, torch.rand(2, 3, 3), xl, yl, -1, 1.0, True),
         r"dtw_backward: R must be the forward's kept \(B, N, M\)"),
        (lambda: ops.dtw_backward(torch.ones(3), cost, cost.double(), xl, yl, -1, 1.0, True),
         r"dtw_backward: grad must be a \(B,\)"),
        (lambda: ops.dtw_xy_forward(x, y, xl, yl, 5, -1, 1.0, True, False), r"metric must be 0"),
        (lambda: ops.dtw_xy_forward(x, torch.randn(2, 4, 3), xl, yl, 0, -1, 1.0, True, False),
         r"same feature size D"),
        # soft-DTW keeps R in float64 (hard DTW in the inputs' dtype)
        (lambda: ops.dtw_xy_backward(torch.ones(2), x, y, cost, xl, yl, 0, -1, 1.0, True,
                                     True, True), r"R must be Double \(soft-DTW keeps R in float64\)"),
        (lambda: ops.dtw_xy_backward(torch.ones(2), x, y, cost.double(), xl, yl, 0, -1, 1.0, False,
                                     True, True), r"R must be Float"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("band", [None, 0, 2, 7])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "l1"])
@pytest.mark.parametrize("D", [1, 3, 4, 6])
def test_lane_groups_match_the_reference(backend, dtype, band, metric, D):
    """19 pairs: two groups of 8 equal-length pairs (the C++ kernels run them in the lanes of
    one vector; fp32 groups keep the soft-argmin weights instead of R) and 3 pairs one by one;
    the second group mixes lengths, so it runs pair by pair as well. D = 1..4 run kernels
    compiled for that D, 6 the general loop; 23 rows are not a multiple of the rows the
    forward computes at once."""
    B, N, M = 19, 23, 17
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = torch.randn(B, M, D, dtype=torch.float64)
    x_lengths = torch.full((B,), N)
    y_lengths = torch.full((B,), M)
    x_lengths[8:16] = torch.randint(1, N + 1, (8,))
    y_lengths[12] = 5
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    results = []
    for name, dt in ((backend, dtype), ("reference", torch.float64)):
        a = x.to(dt).requires_grad_(True)
        b = y.to(dt).requires_grad_(True)
        with ek.use_backend(name):
            values = ek.soft_dtw(a, b, 0.3, band=band, x_lengths=x_lengths, y_lengths=y_lengths,
                                 metric=metric)
            grads = torch.autograd.grad((values * weights.to(dt)).sum(), (a, b))
        results.append((values, grads))
    (values, grads), (ref_values, ref_grads) = results
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    assert ((values.double() - ref_values).abs().max() / ref_values.abs().max()).item() < bound
    for grad, ref in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        error = ((grad.double() - ref).abs().max() / ref.abs().max()).item()
        assert error < (1e-9 if dtype == torch.float64 else 1e-4), error


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("band", [None, 0, 2, 9])
@pytest.mark.parametrize("metric", ["sqeuclidean", "l1"])
@pytest.mark.parametrize("D", [1, 5])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["grid", "checkpointed"])
def test_ragged_lane_groups_match_the_reference(monkeypatch, dtype, band, metric, D,
                                                checkpointed):
    """Groups whose pairs have different lengths run in the lanes on the grid of their
    longest lengths (each lane's value read at its own (n, m), its band masked): values of
    hard and soft DTW and the soft gradients equal the reference's, for lengths from 1 to
    the full size in both directions, and whatever lies past a pair's lengths (NaN here) is
    never read."""
    checked = force_cpu_checkpoints(monkeypatch) if checkpointed else (lambda run: run())
    B, N, M = 35, 21, 26  # two groups of 16 fp32 hard lanes, four groups of 8 fp64 lanes
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = torch.randn(B, M, D, dtype=torch.float64)
    x_lengths = torch.randint(1, N + 1, (B,))
    y_lengths = torch.randint(1, M + 1, (B,))
    x_lengths[:3] = torch.tensor([1, N, N])
    y_lengths[:3] = torch.tensor([M, 1, M])
    for b in range(B):
        x[b, x_lengths[b]:] = float("nan")
        y[b, y_lengths[b]:] = float("nan")
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    kwargs = dict(band=band, x_lengths=x_lengths, y_lengths=y_lengths, metric=metric)
    results = []
    for name, dt in (("cpp", dtype), ("reference", torch.float64)):
        a = x.to(dt).requires_grad_(True)
        b = y.to(dt).requires_grad_(True)

        def run():
            with ek.use_backend(name):
                with torch.no_grad():
                    hard = ek.dtw(a, b, **kwargs)
                soft = ek.soft_dtw(a, b, 0.3, **kwargs)
                grads = torch.autograd.grad((soft * weights.to(dt)).sum(), (a, b))
            return [t.double() for t in (hard, soft, *grads)]
        results.append(checked(run) if name == "cpp" else run())
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want in zip(results[0][:2], results[1][:2]):
        assert ((got - want).abs().max() / want.abs().max()).item() < bound
    for got, want in zip(results[0][2:], results[1][2:]):
        assert torch.isfinite(got).all() and torch.isfinite(want).all()
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error < (1e-9 if dtype == torch.float64 else 1e-4), error


@pytest.mark.parametrize("gamma", [1e-3, 1e-2, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("band", [None, 1])
def test_lane_group_fp32_gradients_within_1e4_of_fp64(gamma, band):
    """The fp32 lane groups' stored fp32 weights against fp64, over the spec's gamma range."""
    x = torch.randn(16, 30, 2, dtype=torch.float64)
    y = torch.randn(16, 26, 2, dtype=torch.float64)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        a = x.to(dtype).requires_grad_(True)
        b = y.to(dtype).requires_grad_(True)
        value = ek.soft_dtw(a, b, gamma, band=band)
        grads[dtype] = torch.autograd.grad(value.sum(), (a, b))
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert torch.isfinite(g32).all()
        assert ((g32.double() - g64).abs().max() / g64.abs().max()).item() < 1e-4


@pytest.mark.parametrize("gamma", [1e-2, 1.0])
def test_fp32_lanes_stay_within_1e4_of_fp64_over_long_paths(gamma):
    """The fp32 lane groups' shortened special functions (an exp2 polynomial, fast
    reciprocals; in the AVX512 build the sweep of 2^(-R)) err per cell, and R carries the
    errors along paths
    of n + m cells into the weights: 8 pairs of 700 x 650 (one lane group, paths of 1350
    cells) against fp64 on the same fp32-rounded inputs, so the difference is the kernels'
    own (an fp32 input changes the gradient by more than 1e-4 at small gamma)."""
    x = torch.randn(8, 700, 2).double()
    y = torch.randn(8, 650, 2).double()
    results = {}
    for dtype in (torch.float32, torch.float64):
        a = x.to(dtype).requires_grad_(True)
        b = y.to(dtype).requires_grad_(True)
        value = ek.soft_dtw(a, b, gamma)
        results[dtype] = (value, *torch.autograd.grad(value.sum(), (a, b)))
    (v32, *g32), (v64, *g64) = results[torch.float32], results[torch.float64]
    assert torch.isfinite(v32).all()
    assert ((v32.double() - v64).abs() / v64.abs()).max().item() < 1e-6
    for got, want in zip(g32, g64):
        assert torch.isfinite(got).all()
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-4


def test_soft_dtw_backward_leaves_the_callers_subnormals_alone():
    """The C++ soft-DTW kernels flush subnormals to zero while they run (E decays into the
    subnormal range far from the path, and subnormal arithmetic is ~100x slower): the result
    still matches the reference, and the calling thread's floating-point mode is restored."""
    x = torch.randn(16, 40, 2, dtype=torch.float64) * 3
    y = torch.randn(16, 40, 2, dtype=torch.float64) * 3
    results = []
    for backend in ("auto", "reference"):
        a = x.clone().requires_grad_(True)
        with ek.use_backend(backend):
            value = ek.soft_dtw(a, y, 0.05)
            results.append((value, torch.autograd.grad(value.sum(), (a,))[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)
    tiny = torch.tensor([2.0 ** -1060], dtype=torch.float64)  # subnormal
    assert (tiny * 1.0).item() != 0.0
    assert (tiny * 2.0).item() == 2.0 ** -1059


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_broadcast_series_is_read_in_place_and_matches_a_loop(backend, gamma, dtype):
    """One series against 19 pairs (two vector-lane groups and three single pairs): the C++
    kernels read the stride-0 batch in place; values and the gradient of the broadcast series
    equal the pair-by-pair loop."""
    x = torch.randn(1, 21, 3, dtype=dtype, requires_grad=True)
    y = torch.randn(19, 17, 3, dtype=dtype)

    def run(a, b):
        with ek.use_backend(backend):
            return ek.dtw(a, b, band=4) if gamma is None else ek.soft_dtw(a, b, gamma, band=4)

    values = run(x, y)
    (gx,) = torch.autograd.grad(values.sum(), (x,))
    loop = torch.stack([run(x[0], y[q])[0] for q in range(19)])
    (gx_loop,) = torch.autograd.grad(loop.sum(), (x,))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(values, loop, rtol=rtol, atol=rtol)
    torch.testing.assert_close(gx, gx_loop, rtol=rtol * 10, atol=rtol * 10)
    X, Y = torch.randn(3, 9, 2, dtype=dtype), torch.randn(18, 7, 2, dtype=dtype)
    with ek.use_backend(backend):
        table = ek.cdist_dtw(X, Y, band=2)
    for p in range(3):
        for q in (0, 8, 17):
            torch.testing.assert_close(table[p, q], ek.dtw(X[p], Y[q], band=2)[0], rtol=rtol,
                                       atol=rtol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("band", [None, 2])
def test_dtw_path_backends_agree_with_the_reference(backend, band):
    x, y, x_lengths, y_lengths = random_case(B=5, N=13, M=10, D=2)
    with ek.use_backend("reference"):
        expected = ek.dtw_path(x, y, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
        expected_matrix = ek.dtw_path(x, y, band=band, x_lengths=x_lengths, y_lengths=y_lengths,
                                      return_matrix=True)
    with ek.use_backend(backend):
        paths = ek.dtw_path(x, y, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
        matrix = ek.dtw_path(x, y, band=band, x_lengths=x_lengths, y_lengths=y_lengths,
                             return_matrix=True)
    for got, want in zip(paths, expected):
        assert torch.equal(got, want)
    assert torch.equal(matrix, expected_matrix) and matrix.dtype == x.dtype


def _second_order(values_of, inputs):
    """d/dinputs of (sum(w * v) + |d sum(w * v) / d inputs|^2): a gradient penalty, which
    differentiates the first gradient (autograd's create_graph=True)."""
    values = values_of(*inputs)
    weights = torch.linspace(0.5, 1.5, values.numel(), dtype=values.dtype,
                             device=values.device)
    first = torch.autograd.grad((values * weights).sum(), inputs, create_graph=True)
    penalty = (values * weights).sum() + sum(g.pow(2).sum() for g in first)
    return [f.detach() for f in first], torch.autograd.grad(penalty, inputs)


DOUBLE_BACKWARD_CASES = {
    "soft-series-lengths": lambda x, y, c: ek.soft_dtw(
        x, y, 0.4, band=3, x_lengths=torch.tensor([7, 4, 6]), y_lengths=torch.tensor([5, 5, 2])),
    "hard-series-l1": lambda x, y, c: ek.dtw(x, y, metric="l1"),
    "soft-divergence": lambda x, y, c: ek.soft_dtw_divergence(x, y, 0.7),
    "soft-cost": lambda x, y, c: ek.soft_dtw_from_cost(c, 0.3, band=2),
    "hard-cost": lambda x, y, c: ek.dtw_from_cost(c, y_lengths=torch.tensor([5, 3, 4])),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD_CASES))
def test_double_backward_matches_the_reference(backend, case):
    """create_graph=True (a gradient penalty): the kernels' backward is not differentiable
    itself, so this path recomputes through the reference; first and second derivatives
    must equal the reference's (before, the C++ path returned a gradient without a graph
    and the second derivative silently lost the penalty's term)."""
    x = torch.randn(3, 7, 2, dtype=torch.float64)
    y = torch.randn(3, 5, 2, dtype=torch.float64)
    cost = torch.rand(3, 6, 5, dtype=torch.float64)
    fn = DOUBLE_BACKWARD_CASES[case]
    results = []
    for name in (backend, "reference"):
        inputs = ((cost.clone().requires_grad_(True),) if "cost" in case else
                  (x.clone().requires_grad_(True), y.clone().requires_grad_(True)))
        with ek.use_backend(name):
            if "cost" in case:
                results.append(_second_order(lambda c: fn(None, None, c), inputs))
            else:
                results.append(_second_order(lambda a, b: fn(a, b, None), inputs))
    for got, want in zip(results[0], results[1]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    # and the second derivative is the true one: finite differences of the first gradient
    if backend != "reference" and case.startswith("soft"):
        inputs = ((cost.clone().requires_grad_(True),) if "cost" in case else
                  (x[:2, :4].clone().requires_grad_(True), y[:2, :3].clone().requires_grad_(True)))
        with ek.use_backend(backend):
            if "cost" in case:
                assert torch.autograd.gradgradcheck(lambda c: fn(None, None, c), inputs)
            elif case == "soft-divergence":
                assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b, None), inputs)
            else:
                assert torch.autograd.gradgradcheck(lambda a, b: ek.soft_dtw(a, b, 0.4, band=1),
                                                    inputs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("gamma", [None, 0.05, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_from_cost_values_and_gradients_match_the_reference(backend, gamma, dtype):
    """dtw_from_cost / soft_dtw_from_cost with per-pair lengths and bands, fp32 and fp64,
    against the fp64 reference (values and the gradient in the cost)."""
    B, N, M = 5, 13, 9
    cost = torch.rand(B, N, M, dtype=torch.float64) * 3
    x_lengths, y_lengths = torch.tensor([13, 1, 7, 13, 10]), torch.tensor([9, 4, 9, 1, 6])
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    # hard DTW: the reference in the same dtype takes the same path (an fp64 oracle could
    # take another one at an fp32 near-tie), so the gradients (the path's weights) are equal
    ref_dtype = dtype if gamma is None else torch.float64
    for band in (None, 0, 2):
        results = []
        for name, dt in ((backend, dtype), ("reference", ref_dtype)):
            c = cost.to(dt).requires_grad_(True)
            with ek.use_backend(name):
                kwargs = dict(band=band, x_lengths=x_lengths, y_lengths=y_lengths)
                value = (ek.dtw_from_cost(c, **kwargs) if gamma is None
                         else ek.soft_dtw_from_cost(c, gamma, **kwargs))
                grad = torch.autograd.grad((value * weights.to(dt)).sum(), c)[0]
            results.append((value.double(), grad.double()))
        (value, grad), (ref_value, ref_grad) = results
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(value, ref_value, rtol=tol, atol=tol)
        if gamma is None:
            assert torch.equal(grad, ref_grad)
        torch.testing.assert_close(grad, ref_grad, rtol=tol,
                                   atol=tol if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_inputs_match_contiguous_ones_and_are_left_unmodified(backend):
    """Transposed / sliced inputs give the contiguous copies' values and gradients, and no
    call writes into a caller's tensor."""
    base_x = torch.randn(7, 3, 2, dtype=torch.float64)   # (N, B, D): x = base.transpose(0, 1)
    base_y = torch.randn(3, 12, 2, dtype=torch.float64)  # y = base[:, ::2]: every other step
    x, y = base_x.transpose(0, 1), base_y[:, ::2, :]
    cost = torch.rand(3, 9, 6, dtype=torch.float64).transpose(1, 2)  # (3, 6, 9) strided
    snapshots = [t.clone() for t in (base_x, base_y, cost)]
    with ek.use_backend(backend):
        for fn in (lambda a, b: ek.soft_dtw(a, b, 0.3, band=2),
                   lambda a, b: ek.dtw(a, b, metric="l1"),
                   lambda a, b: ek.soft_dtw_divergence(a, b, 0.7)):
            results = []
            for a, b in ((x, y), (x.contiguous(), y.contiguous())):
                a = a.detach().requires_grad_(True)
                b = b.detach().requires_grad_(True)
                value = fn(a, b)
                results.append((value, *torch.autograd.grad(value.sum(), (a, b))))
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for fn in (lambda c: ek.soft_dtw_from_cost(c, 0.5), lambda c: ek.dtw_from_cost(c)):
            results = []
            for c in (cost, cost.contiguous()):
                c = c.detach().requires_grad_(True)
                value = fn(c)
                results.append((value, torch.autograd.grad(value.sum(), c)[0]))
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        ek.dtw_path(x, y)
        ek.soft_dtw_alignment(x, y, 0.5)
        ek.cdist_dtw(x, y)
    for before, after in zip(snapshots, (base_x, base_y, cost)):
        assert torch.equal(before, after)


needs_cpp = pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")


def _set_schedule(monkeypatch, schedule):
    """How the C++ kernels' threads hand rows over (RowRing): "free" as in use;
    "contended": every wait counts as a lost core; "publish delayed": a writer stalls 50 us
    after each publish (a test-only setting)."""
    for name in ("ETHER_KERNELS_DTW_CONTENDED_WAIT_US", "ETHER_KERNELS_DTW_PUBLISH_DELAY_US"):
        monkeypatch.delenv(name, raising=False)
    if schedule == "contended":
        monkeypatch.setenv("ETHER_KERNELS_DTW_CONTENDED_WAIT_US", "0")
    elif schedule == "publish delayed":
        monkeypatch.setenv("ETHER_KERNELS_DTW_PUBLISH_DELAY_US", "50")
    else:
        assert schedule == "free", schedule


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B,N,M,D,band,ragged,metric", [
    (1, 13, 9, 2, None, False, "sqeuclidean"),   # a single pair (copied into every lane)
    (9, 23, 17, 4, 3, False, "l1"),              # a lane group and a single pair
    (8, 30, 30, 1, None, False, "sqeuclidean"),  # D = 1
    (5, 37, 12, 6, 2, True, "euclidean"),        # per-pair lengths, D > 4
    (16, 8, 40, 3, None, True, "sqeuclidean"),   # mixed groups, lengths up to N = 2 S
    (3, 4, 5, 5, 0, False, "sqeuclidean"),       # one segment
    (4, 6, 41, 2, 3, True, "l1"),                # N < M: checkpointed along y (swapped)
    # S = 8 (a multiple of the lanes) runs 5 pairs (and 8 in fp64) in strips
    # (soft_strips_for); S = 12 keeps them in lane groups:
    (5, 70, 12, 6, 2, True, "euclidean"),        # per-pair lengths, D > 4, lane groups
    (8, 90, 30, 1, None, False, "sqeuclidean"),  # D = 1, lane groups in fp64 too
])
def test_checkpointed_cpu_soft_dtw_matches_the_reference(monkeypatch, dtype, B, N, M, D, band,
                                                         ragged, metric):
    """Long pairs keep checkpoint rows only and the backward recomputes each segment
    (forced here on small pairs): values and gradients in x and y equal the reference's."""
    checked = force_cpu_checkpoints(monkeypatch)
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = torch.randn(B, M, D, dtype=torch.float64)
    x_lengths = torch.randint(1, N + 1, (B,)) if ragged else None
    y_lengths = torch.randint(1, M + 1, (B,)) if ragged else None
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    results = []
    for backend, dt in (("cpp", dtype), ("reference", torch.float64)):
        a, b = x.to(dt).requires_grad_(True), y.to(dt).requires_grad_(True)

        def run():
            with ek.use_backend(backend):
                values = ek.soft_dtw(a, b, 0.5, band=band, x_lengths=x_lengths,
                                     y_lengths=y_lengths, metric=metric)
                grads = torch.autograd.grad((values * weights.to(dt)).sum(), (a, b))
            return [t.double() for t in (values, *grads)]
        results.append(checked(run) if backend == "cpp" else run())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert ((got - want).abs().max() / want.abs().max()).item() < tol


@needs_cpp
def test_long_cpu_soft_dtw_keeps_checkpoints_not_the_grid():
    """A 3000 x 3000 pair (past CPU_CHECKPOINT_CELLS) saves O(sqrt(N) M) for its backward,
    not the 72 MB of the whole grid, and its gradient equals the grid-keeping path's."""
    N = M = 3000
    assert N * M > dynamic_time_warping.CPU_CHECKPOINT_CELLS
    # skinny pairs keep their (small) grid: the lanes' copies of the long side would be larger
    assert dynamic_time_warping.cpu_checkpoint_rows(2**21, 4) == 0
    assert dynamic_time_warping.cpu_checkpoint_rows(N, M) == 56  # ceil(sqrt(3000)) -> x4
    x = torch.randn(1, N, 2, dtype=torch.float64)
    y = torch.randn(1, M, 2, dtype=torch.float64)
    saved_bytes = []

    def pack(t):
        saved_bytes.append(t.numel() * t.element_size())
        return t

    a = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = ek.soft_dtw(a, y, 1.0)
    (grad,) = torch.autograd.grad(value.sum(), (a,))
    rows = dynamic_time_warping.cpu_checkpoint_rows(N, M)
    checkpoints = -(-N // rows) * (M + 1) * 8
    assert max(saved_bytes) == checkpoints < N * M * 8 / 20
    # the same pair with the whole grid kept (threshold raised, and not in strips, which
    # always checkpoint): the same gradient
    b = x.clone().requires_grad_(True)
    old = dynamic_time_warping.CPU_CHECKPOINT_CELLS, dynamic_time_warping.CPU_SOFT_STRIP_PAIRS
    try:
        dynamic_time_warping.CPU_CHECKPOINT_CELLS = N * M
        dynamic_time_warping.CPU_SOFT_STRIP_PAIRS = {torch.float32: (0, 0),
                                                     torch.float64: (0, 0)}
        (reference,) = torch.autograd.grad(ek.soft_dtw(b, y, 1.0).sum(), (b,))
    finally:
        dynamic_time_warping.CPU_CHECKPOINT_CELLS, dynamic_time_warping.CPU_SOFT_STRIP_PAIRS = old
    torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-12)


@needs_cpp
@pytest.mark.parametrize("schedule", ["free", "contended", "publish delayed"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("B,N,M,D,band,ragged,metric,checkpointed", [
    (8, 200, 180, 4, None, False, "sqeuclidean", False),  # one lane group
    (5, 230, 190, 2, 30, True, "sqeuclidean", False),     # filled group, masked lanes
    (5, 181, 203, 6, None, True, "l1", False),            # D > 4 (D not fixed at compile time)
    (8, 170, 230, 16, 60, True, "sqeuclidean", False),    # D >= 16: the grid backward shared
    (6, 300, 150, 1, None, False, "sqeuclidean", True),   # checkpointed segments
    (8, 190, 260, 3, 50, True, "euclidean", True),        # checkpointed along y, band
])
def test_rows_shared_by_threads_match_one_thread_and_the_reference(
        monkeypatch, threads, B, N, M, D, band, ragged, metric, checkpointed, schedule):
    """Fewer fp32 lane groups than threads: a group's rows are swept by several threads at
    once (RowRing in the C++ kernels: here one group of >= 2^15 cells, 2 or 3 threads, 3
    on 2 cores oversubscribed). The values and x-gradients equal one thread's exactly, the
    y-gradients to rounding (a checkpointed backward sums per-thread partial gy), two runs
    are identical, and all match the fp64 reference. `schedule`: "contended": every wait
    counts as a lost core (ETHER_KERNELS_DTW_CONTENDED_WAIT_US=0), so the sweeps switch to
    one step at a time, then one thread, mid-sweep: the same results as a run not contended,
    bit for bit; "publish delayed": each writer stalls after every publish
    (ETHER_KERNELS_DTW_PUBLISH_DELAY_US), so a read past the published columns would meet
    stale ones and differ."""
    _set_schedule(monkeypatch, schedule)
    # Lane groups here: 5 or 6 pairs on 2 threads would run in strips (cpu_soft_strip_pairs;
    # the strips' threads: test_strips_pairs_are_bitwise_the_same_on_one_and_several_threads).
    monkeypatch.setattr(dynamic_time_warping, "CPU_SOFT_STRIP_PAIRS",
                        {torch.float32: (0, 0), torch.float64: (0, 0)})
    checked = force_cpu_checkpoints(monkeypatch) if checkpointed else (lambda run: run())
    x = torch.randn(B, N, D)
    y = torch.randn(B, M, D)
    x_lengths = torch.randint(N // 2, N + 1, (B,)) if ragged else None
    y_lengths = torch.randint(M // 2, M + 1, (B,)) if ragged else None
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)

    def run(backend, dtype, thread_count):
        before = torch.get_num_threads()
        torch.set_num_threads(thread_count)
        try:
            a, b = x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)
            with ek.use_backend(backend):
                values = ek.soft_dtw(a, b, 0.5, band=band, x_lengths=x_lengths,
                                     y_lengths=y_lengths, metric=metric)
                grads = torch.autograd.grad((values * weights.to(dtype)).sum(), (a, b))
                with torch.no_grad():
                    forward_only = ek.soft_dtw(a, b, 0.5, band=band, x_lengths=x_lengths,
                                               y_lengths=y_lengths, metric=metric)
            assert torch.equal(forward_only, values)
            return [t.detach().double() for t in (values, *grads)]
        finally:
            torch.set_num_threads(before)

    one = checked(lambda: run("cpp", torch.float32, 1))
    shared = checked(lambda: run("cpp", torch.float32, threads))
    _set_schedule(monkeypatch, "free")  # the run it is compared with below
    again = checked(lambda: run("cpp", torch.float32, threads))
    want = run("reference", torch.float64, 1)
    assert torch.equal(shared[0], one[0]) and torch.equal(shared[1], one[1])
    scale = one[2].abs().max()
    assert ((shared[2] - one[2]).abs().max() / scale).item() < 1e-6
    for got, same in zip(shared, again):
        assert torch.equal(got, same)
    for got, ref in zip(shared, want):
        assert torch.isfinite(got).all()
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


@needs_cpp
def test_checkpointed_ops_opcheck_and_argument_checks():
    ops = torch.ops.ether_kernels
    x, y = torch.randn(3, 10, 2, dtype=torch.float64), torch.randn(3, 7, 2, dtype=torch.float64)
    lengths = torch.tensor([10, 4, 9]), torch.tensor([7, 7, 2])
    torch.library.opcheck(ops.dtw_xy_soft_forward_checkpointed,
                          (x.requires_grad_(True), y, *lengths, 0, 2, 0.5, 4))
    values, kept = ops.dtw_xy_soft_forward_checkpointed(x.detach(), y, *lengths, 0, 2, 0.5, 4)
    assert kept.shape == (3, 3, 8) and kept.dtype == torch.float64
    torch.library.opcheck(ops.dtw_xy_soft_backward_checkpointed,
                          (torch.ones(3, dtype=torch.float64), x.detach(), y, kept, *lengths, 0,
                           2, 0.5, 4, True, True))
    with pytest.raises(RuntimeError, match="checkpoint_rows must be a positive multiple of 4"):
        ops.dtw_xy_soft_forward_checkpointed(x.detach(), y, *lengths, 0, 2, 0.5, 6)
    with pytest.raises(RuntimeError, match=r"kept must be the forward's \(B, C, M \+ 1\)"):
        ops.dtw_xy_soft_backward_checkpointed(torch.ones(3, dtype=torch.float64), x.detach(), y,
                                              kept[:, :2], *lengths, 0, 2, 0.5, 4, True, True)
    # another S with the same number of checkpoints (N = 8: S = 8 and S = 12 both give one)
    # is caught by the S the forward recorded
    x8, y8 = x.detach()[:, :8], y
    lengths8 = torch.tensor([8, 4, 7]), lengths[1]
    _, kept8 = ops.dtw_xy_soft_forward_checkpointed(x8, y8, *lengths8, 0, 2, 0.5, 8)
    with pytest.raises(RuntimeError, match=r"grad must be a \(B,\) = \(3,\) CPU tensor"):
        ops.dtw_xy_soft_backward_checkpointed(torch.ones(2, dtype=torch.float64), x8, y8, kept8,
                                              *lengths8, 0, 2, 0.5, 8, True, True)
    with pytest.raises(RuntimeError, match="kept was made with another checkpoint_rows"):
        ops.dtw_xy_soft_backward_checkpointed(torch.ones(3, dtype=torch.float64), x8, y8, kept8,
                                              *lengths8, 0, 2, 0.5, 12, True, True)


def _hard_tie_cases(count, device="cpu"):
    """Small 0/1 costs: hard DTW full of tied predecessors, with bands and lengths."""
    for trial in range(count):
        N, M = int(torch.randint(1, 7, ())), int(torch.randint(1, 7, ()))
        yield (torch.randint(0, 2, (3, N, M)).double().to(device), [None, 0, 1, 2][trial % 4],
               torch.randint(1, N + 1, (3,)).to(device), torch.randint(1, M + 1, (3,)).to(device))


def _hard_value_and_gradient(backend, cost, band, x_lengths, y_lengths):
    c = cost.clone().requires_grad_(True)
    with ek.use_backend(backend):
        value = ek.dtw_from_cost(c, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
        return value.detach(), torch.autograd.grad(value.sum(), c)[0]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hard_gradient_at_ties_is_the_optimal_path(backend):
    """At tied predecessors the hard DTW gradient is the 0/1 indicator of dtw_path's optimal
    path (ties: diagonal, then (i - 1, j), then (i, j - 1)) on every backend, the reference
    included (its min used to split the gradient between tied predecessors)."""
    for cost, band, x_lengths, y_lengths in _hard_tie_cases(60):
        value, grad = _hard_value_and_gradient(backend, cost, band, x_lengths, y_lengths)
        ref_value, ref_grad = _hard_value_and_gradient("reference", cost, band, x_lengths,
                                                       y_lengths)
        assert torch.equal(value, ref_value) and torch.equal(grad, ref_grad)
        for b, path in enumerate(dtw_path_of_cost(cost, band, x_lengths, y_lengths)):
            indicator = torch.zeros_like(cost[b])
            indicator[path[:, 0], path[:, 1]] = 1.0
            assert torch.equal(grad[b], indicator), (b, band)


def dtw_path_of_cost(cost, band, x_lengths, y_lengths):
    """The optimal paths of a precomputed cost (dtw_path takes series): the reference's
    backtrack, the tie rule dtw_path documents."""
    from ether_kernels.reference.dtw import dtw_path_reference
    return dtw_path_reference(cost, x_lengths, y_lengths, band)


# ------------------------------------------------------------------ Triton fallback

TRITON_DEVICES = [
    pytest.param(device, marks=([pytest.mark.gpu] if device == "cuda" else []) + [pytest.mark.triton],
                 id=device)
    for device in ("cpu", "cuda")
    if "triton" in dynamic_time_warping._GPU_BACKENDS
    and not _dispatch.unsupported_reasons("triton", torch.device(device), ("triton",))
    and (device == "cpu" or torch.cuda.is_available())
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("gamma", [None, 0.1, 1.0])
@pytest.mark.parametrize("band", [None, 0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_fallback_matches_the_reference(device, gamma, band, dtype):
    """The Triton DTW (the CUDA fallback without the extension; under the interpreter on
    CPU): values and gradients in x and y with per-pair lengths and bands, against the
    reference on the same inputs."""
    B, N, M, D = 6, 11, 8, 3
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = torch.randn(B, M, D, dtype=torch.float64)
    x_lengths = torch.tensor([11, 4, 11, 1, 9, 7])
    y_lengths = torch.tensor([8, 8, 3, 1, 8, 2])
    weights = torch.rand(B, dtype=torch.float64) + 0.5
    results = []
    for backend, dt, dev in (("triton", dtype, device), ("reference", torch.float64, "cpu")):
        a = x.to(device=dev, dtype=dt).requires_grad_(True)
        b = y.to(device=dev, dtype=dt).requires_grad_(True)
        with ek.use_backend(backend):
            kwargs = dict(band=band, x_lengths=x_lengths.to(dev), y_lengths=y_lengths.to(dev))
            values = ek.dtw(a, b, **kwargs) if gamma is None else ek.soft_dtw(a, b, gamma,
                                                                                **kwargs)
            grads = torch.autograd.grad((values * weights.to(dev, dt)).sum(), (a, b))
        results.append((values.double().cpu(), [g.double().cpu() for g in grads]))
    (values, grads), (ref_values, ref_grads) = results
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert ((values - ref_values).abs().max() / ref_values.abs().max()).item() < tol
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert ((g - r).abs().max() / r.abs().max()).item() < (1e-9 if dtype == torch.float64
                                                              else 1e-4)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_fallback_cost_gradient_path_and_opcheck(device):
    cost = torch.rand(3, 7, 5, dtype=torch.float64, device=device)
    for gamma in (None, 0.5):
        results = []
        for backend in ("triton", "reference"):
            c = cost.clone().requires_grad_(True)
            with ek.use_backend(backend):
                value = (ek.dtw_from_cost(c, band=1) if gamma is None
                         else ek.soft_dtw_from_cost(c, gamma, band=1))
                results.append((value, torch.autograd.grad(value.sum(), c)[0]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)
    x = torch.randn(4, 9, 2, dtype=torch.float64, device=device)
    y = torch.randn(4, 6, 2, dtype=torch.float64, device=device)
    paths = {}
    for backend in ("triton", "reference"):
        with ek.use_backend(backend):
            paths[backend] = ek.dtw_path(x, y, band=2)
    assert all(torch.equal(p.cpu(), q.cpu()) for p, q in zip(paths["triton"], paths["reference"]))
    lengths = torch.tensor([7, 7, 7], device=device), torch.tensor([5, 5, 5], device=device)
    ops = torch.ops.ether_kernels
    torch.library.opcheck(ops.dtw_forward_triton, (cost, *lengths, -1, 0.5, True, True))
    torch.library.opcheck(ops.dtw_forward_triton,
                          (cost.clone().requires_grad_(True), *lengths, 1, 1.0, False, True))
    # hard DTW at ties: the same single path as the reference (_hard_tie_cases)
    for tie_cost, band, x_lengths, y_lengths in _hard_tie_cases(12, device):
        got = _hard_value_and_gradient("triton", tie_cost, band, x_lengths, y_lengths)
        want = _hard_value_and_gradient("reference", tie_cost.cpu(), band, x_lengths.cpu(),
                                        y_lengths.cpu())
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    # double backward (create_graph=True) through the reference, as for the other backends
    results = []
    for backend in ("triton", "reference"):
        with ek.use_backend(backend):
            results.append(_second_order(lambda c: ek.soft_dtw_from_cost(c, 0.5, band=1),
                                         (cost.clone().requires_grad_(True),)))
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-10)


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("band", [None, 0, 2, 5])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["grid", "checkpointed"])
def test_a_ragged_lane_group_is_bitwise_its_pairs_alone(dtype, band, checkpointed):
    """Each pair of a group of 8 with different lengths gets exactly (bitwise) the value and
    gradients it gets in a group of 8 copies of itself: the longer lanes' padding adds
    nothing, not even rounding (fp32 keeps the forward's weights: a masked cell's left share
    1 - wd - wu is ~1e-8, not 0, so its E must be zeroed, not pushed)."""
    ops = torch.ops.ether_kernels
    B, N, M, D = 8, 30, 25, 1
    x = torch.randn(B, N, D, dtype=torch.float64).to(dtype)
    y = torch.randn(B, M, D, dtype=torch.float64).to(dtype)
    x_lengths = torch.randint(1, N + 1, (B,))
    y_lengths = torch.randint(1, M + 1, (B,))
    x_lengths[0], y_lengths[1] = N, M
    grad = torch.linspace(0.5, 1.5, B, dtype=dtype)
    r = -1 if band is None else band

    def run(a, b, xl, yl, g):
        if checkpointed:
            v, kept = ops.dtw_xy_soft_forward_checkpointed(a, b, xl, yl, 0, r, 0.05, 4)
            return (v, *ops.dtw_xy_soft_backward_checkpointed(g, a, b, kept, xl, yl, 0, r, 0.05,
                                                              4, True, True))
        v, kept = ops.dtw_xy_forward(a, b, xl, yl, 0, r, 0.05, True, True)
        return (v, *ops.dtw_xy_backward(g, a, b, kept, xl, yl, 0, r, 0.05, True, True, True))

    together = run(x, y, x_lengths, y_lengths, grad)
    for k in range(B):
        def copies(t):
            return t[k:k + 1].expand(B, *t.shape[1:]).contiguous()
        alone = run(copies(x), copies(y), copies(x_lengths), copies(y_lengths), copies(grad))
        for got, want in zip(together, alone):
            assert torch.equal(got[k], want[0]), (k, got[k], want[0])


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("band", [None, 3])
@pytest.mark.parametrize("path", ["soft", "soft-checkpointed", "hard-values", "hard"])
def test_length_grouped_lanes_give_every_pair_its_own_results(monkeypatch, dtype, band, path):
    """The C++ lanes group pairs by length (LaneGroups: sorted by n, banded by m, the
    shortest left over run alone; the soft forward keeps its state by task, not by pair):
    37 pairs of distinct lengths in a random order give bitwise the values and gradients of
    the same pairs in another order, and the reference's. What this checks is the mapping
    (a backward reading another task's kept state, a value or gradient written to another
    pair); the grouping itself is invisible in the results (a lane's results do not depend
    on its group: test_a_ragged_lane_group_is_bitwise_its_pairs_alone)."""
    B, N, M, D = 37, 40, 33, 2
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = torch.randn(B, M, D, dtype=torch.float64)
    x_lengths = torch.randperm(N)[:B] + 1  # distinct: one sorted order whatever the batch's
    y_lengths = torch.randint(1, M + 1, (B,))
    checked = force_cpu_checkpoints(monkeypatch) if path == "soft-checkpointed" else None

    def run(backend, order, dtype):
        a = x[order].to(dtype).requires_grad_(path != "hard-values")
        b = y[order].to(dtype).requires_grad_(path != "hard-values")
        kwargs = dict(band=band, x_lengths=x_lengths[order], y_lengths=y_lengths[order])
        with ek.use_backend(backend):
            if path == "hard-values":  # no gradient wanted: the value-only lanes
                return [ek.dtw(a, b, **kwargs)]
            values = (ek.dtw(a, b, **kwargs) if path == "hard"
                      else ek.soft_dtw(a, b, 0.5, **kwargs))
            weights = torch.linspace(0.5, 1.5, B, dtype=values.dtype)[order]
            return [values.detach(), *torch.autograd.grad((values * weights).sum(), (a, b))]

    first, second = torch.randperm(B), torch.randperm(B)
    results = {}
    for name, order in (("first", first), ("second", second)):
        got = (checked or (lambda f: f()))(lambda: run("cpp", order, dtype))
        restored = torch.empty_like(order)
        restored[order] = torch.arange(B)
        results[name] = [t[restored] for t in got]  # back in the batch's order
    expected = run("reference", torch.arange(B), torch.float64)
    # fp32 hard DTW may take another path than fp64 where two predecessors' R are within
    # fp32 rounding (its gradient then differs by O(1)): its gradients are checked against
    # the other order only.
    if path == "hard" and dtype == torch.float32:
        expected = expected[:1]
    for name in ("first", "second"):
        assert len(results[name]) == (2 + 1 if path != "hard-values" else 1)
    for got, other in zip(results["first"], results["second"]):
        assert torch.equal(got, other)
    for got, want in zip(results["first"], expected):
        bound = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(got.double(), want, rtol=bound, atol=bound)


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("band", [None, 0, 3, 40])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "l1"])
@pytest.mark.parametrize("D", [1, 3])
def test_pairs_run_alone_in_strips_match_the_reference(dtype, band, metric, D):
    """The hard value-only DTW of a pair run alone (fewer pairs than lanes, or the B mod L
    left over) sweeps it a strip of L rows at a time, lane k one column behind lane k - 1
    (forward_hard_strips). Row counts around the strip height (fewer rows than lanes,
    L, L + 1, a remainder), long and wide grids, bands that cut strips, per-pair lengths:
    the values equal the reference's; a NaN in a cell the band allows makes the pair NaN,
    one outside it changes nothing, an infinite point gives +inf."""
    shapes = [(5, 900), (16, 300), (17, 290), (8, 700), (9, 640), (67, 129), (130, 45),
              (300, 17), (96, 96), (301, 333)]
    for N, M in shapes:
        x = torch.randn(3, N, D, dtype=torch.float64).to(dtype) * 3
        y = torch.randn(3, M, D, dtype=torch.float64).to(dtype) * 3
        x_lengths = torch.tensor([N, max(1, N - 4), max(1, (2 * N) // 3)])
        y_lengths = torch.tensor([M, (3 * M) // 4, max(1, M - 7)])
        for lengths in (dict(), dict(x_lengths=x_lengths, y_lengths=y_lengths)):
            with ek.use_backend("cpp"):
                got = ek.dtw(x, y, band=band, metric=metric, **lengths)
            with ek.use_backend("reference"):
                want = ek.dtw(x.double(), y.double(), band=band, metric=metric, **lengths)
            bound = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got.double(), want, rtol=bound, atol=bound,
                                       msg=lambda m: f"{(N, M)} {lengths != {}}: {m}")
    # The NaN convention, and +inf, in one 100 x 100 pair (a strip path: 10^4 cells).
    x = torch.randn(1, 100, D, dtype=dtype)
    y = torch.randn(1, 100, D, dtype=dtype)
    with ek.use_backend("cpp"):
        clean = ek.dtw(x, y, band=band, metric=metric)
        for i, j, nan in ((50, 50, True), (37, 99, band is None or band >= 62)):
            a, b = x.clone(), y.clone()
            a[0, i - 1, 0], b[0, j - 1, 0] = math.inf, math.inf  # cost(i, j) = inf - inf
            value = ek.dtw(a, b, band=band, metric=metric)
            assert bool(value.isnan()) == nan, (i, j, value)
            if not nan:  # the cell is outside the band: only the points' other cells count
                with ek.use_backend("reference"):
                    want = ek.dtw(a.double(), b.double(), band=band, metric=metric)
                torch.testing.assert_close(value.double(), want)
        a = x.clone()
        a[0, 20, 0] = math.inf
        assert ek.dtw(a, y, band=band, metric=metric).item() == math.inf
        assert clean.isfinite().all()


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("band", [None, 0, 5])
@pytest.mark.parametrize("D", [1, 2])
def test_strips_keep_the_reference_R_and_give_its_gradients(dtype, band, D):
    """Hard DTW with a gradient keeps R pair by pair, in strips for all but small pairs
    (forward_hard_strips, the steps' cells staged and written out by row segments), on the
    series and on a precomputed cost (dtw_from_cost, dtw_path; its costs staged the same
    way): the kept R equals the reference's accumulated cost matrix in every cell (+inf
    outside the band and past the lengths, the rows up to N included), the values its
    end cells, and fp64 gradients equal the reference's."""
    ops = torch.ops.ether_kernels
    for N, M in [(17, 290), (130, 45), (96, 96), (5, 900)]:
        x = torch.randn(3, N, D, dtype=torch.float64)
        y = torch.randn(3, M, D, dtype=torch.float64)
        x_lengths = torch.tensor([N, max(1, N - 3), max(1, (2 * N) // 3)])
        y_lengths = torch.tensor([M, max(1, M - 9), (3 * M) // 4])
        _, R = ops.dtw_xy_forward(x.to(dtype), y.to(dtype), x_lengths, y_lengths, 0,
                                  -1 if band is None else band, 1.0, False, True)
        cost = dynamic_time_warping.pairwise_cost(x, y)
        want = ek.reference.dtw.accumulated_cost_matrix(cost, x_lengths, y_lengths, band)
        want = want[:, 1:, 1:]
        allowed = dynamic_time_warping.allowed_cells(x_lengths, y_lengths, N, M, band)
        want = torch.where(allowed, want, math.inf)
        bound = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(R.double(), want, rtol=bound, atol=bound,
                                   msg=lambda m: f"{(N, M)}: {m}")
        # The same from the precomputed cost (strips too; fp64 arithmetic, R in the dtype).
        for keep in (False, True):
            values, R = ops.dtw_forward(cost.to(dtype), x_lengths, y_lengths,
                                        -1 if band is None else band, 1.0, False, keep)
            ends = want[torch.arange(3), x_lengths - 1, y_lengths - 1]
            torch.testing.assert_close(values.double(), ends, rtol=bound, atol=bound)
            if keep:
                torch.testing.assert_close(R.double(), want, rtol=bound, atol=bound,
                                           msg=lambda m: f"from cost {(N, M)}: {m}")
        if dtype == torch.float64:
            grads = {}
            for backend in ("cpp", "reference"):
                a, b = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
                with ek.use_backend(backend):
                    values = ek.dtw(a, b, band=band, x_lengths=x_lengths, y_lengths=y_lengths)
                weights = torch.tensor([0.5, 1.0, 1.5], dtype=values.dtype)
                grads[backend] = [values.detach(),
                                  *torch.autograd.grad((values * weights).sum(), (a, b))]
            for got, want in zip(grads["cpp"], grads["reference"]):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _forward_batch_sizes(run):
    """The batch sizes ether_kernels::dtw_xy_forward ran with while run() ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        run()
    return [event.input_shapes[0][0] for event in prof.events()
            if event.name == "ether_kernels::dtw_xy_forward"]


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [1, 3, 7, 9, 15])
def test_a_batch_off_the_lane_groups_runs_in_the_lanes(dtype, B):
    """B mod 8 pairs used to run one by one on the scalar soft-DTW path (~16x slower per
    cell: 7 pairs of 256^2 took 13x as long as 8). The batch is filled with empty pairs up
    to a multiple of 8 (_fill_lane_groups): the op runs 8-pair groups, and every pair gets
    bitwise what it gets in a group of real pairs (the scalar path's exp / log round
    differently), its gradient included."""
    N, M, D = 21, 17, 3
    x = torch.randn(B + 1, N, D, dtype=torch.float64).to(dtype)
    y = torch.randn(B + 1, M, D, dtype=torch.float64).to(dtype)
    x_lengths = torch.randint(1, N + 1, (B + 1,))
    y_lengths = torch.randint(1, M + 1, (B + 1,))
    x_lengths[B] = y_lengths[B] = 1  # the extra real pair: the shortest, it joins a group

    def run(count):
        a = x[:count].clone().requires_grad_(True)
        b = y[:count].clone().requires_grad_(True)
        with ek.use_backend("cpp"):
            values = ek.soft_dtw(a, b, 0.3, x_lengths=x_lengths[:count],
                                 y_lengths=y_lengths[:count])
            weights = torch.linspace(0.5, 1.5, B + 1, dtype=values.dtype)[:count]
            grads = torch.autograd.grad((values * weights).sum(), (a, b))
        return [values.detach(), *grads]
    alone = run(B)
    assert _forward_batch_sizes(lambda: run(B)) == [-(-B // 8) * 8]
    if (B + 1) % 8 == 0:  # B + 1 pairs fill whole groups: no filling there
        for got, want in zip(alone, run(B + 1)):
            assert torch.equal(got, want[:B])
    with ek.use_backend("reference"):
        a = x[:B].double().requires_grad_(True)
        b = y[:B].double().requires_grad_(True)
        values = ek.soft_dtw(a, b, 0.3, x_lengths=x_lengths[:B], y_lengths=y_lengths[:B])
        weights = torch.linspace(0.5, 1.5, B + 1, dtype=values.dtype)[:B]
        expected = [values.detach(), *torch.autograd.grad((values * weights).sum(), (a, b))]
    bound = 1e-9 if dtype == torch.float64 else 1e-4
    for got, want in zip(alone, expected):
        torch.testing.assert_close(got.double(), want, rtol=bound, atol=bound)


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [1, 3])
def test_lane_filling_is_skipped_where_the_kept_state_would_grow_too_much(monkeypatch, dtype,
                                                                           B):
    """A few long pairs with a gradient wanted: filling 1 pair up to 8 would keep 8 pairs'
    state for the backward; past CPU_CHECKPOINT_CELLS extra cells the batch is not filled:
    it runs checkpointed, as one partial lane group (fp32, or 3 pairs), or as it is on the
    scalar path (1 or 2 pairs in fp64), with the reference's values and gradients either
    way. Without a gradient nothing is kept, and the batch is filled."""
    x = torch.randn(B, 20, 2, dtype=torch.float64)
    y = torch.randn(B, 17, 2, dtype=torch.float64)
    x_lengths, y_lengths = torch.randint(12, 21, (B,)), torch.randint(10, 18, (B,))
    fill = -B % 8

    def run(backend="cpp", dtype=dtype):
        a = x.to(dtype).requires_grad_(True)
        b = y.to(dtype).requires_grad_(True)
        with ek.use_backend(backend):
            values = ek.soft_dtw(a, b, 0.5, x_lengths=x_lengths, y_lengths=y_lengths)
            weights = torch.linspace(0.5, 1.5, B, dtype=values.dtype)
            return [values.detach(), *torch.autograd.grad((values * weights).sum(), (a, b))]

    monkeypatch.setattr(dynamic_time_warping, "CPU_CHECKPOINT_CELLS", fill * 20 * 17 - 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        run()
    ran = {(event.name, event.input_shapes[0][0]) for event in prof.events()
           if event.name.startswith("ether_kernels::dtw_xy")}
    if dtype == torch.float32 or B >= 3:
        assert ran == {("ether_kernels::dtw_xy_soft_forward_checkpointed", B),
                       ("ether_kernels::dtw_xy_soft_backward_checkpointed", B)}, ran
    else:
        assert ran == {("ether_kernels::dtw_xy_forward", B),
                       ("ether_kernels::dtw_xy_backward", B)}, ran
    expected = run("reference", torch.float64)
    bound = 1e-9 if dtype == torch.float64 else 1e-4
    for got, want in zip(run(), expected):
        torch.testing.assert_close(got.double(), want, rtol=bound, atol=bound)
    with torch.no_grad():
        assert _forward_batch_sizes(lambda: ek.soft_dtw(x, y, 0.5)) == [8]
    monkeypatch.setattr(dynamic_time_warping, "CPU_CHECKPOINT_CELLS", fill * 20 * 17)
    assert _forward_batch_sizes(run) == [8]


# ------------------------------------------------------------------- NaN convention

NAN_BACKENDS = (
    [pytest.param(b, "cpu", id=b) for b in ALL_BACKENDS]
    + [pytest.param("triton", device, marks=[pytest.mark.triton]
                    + ([pytest.mark.gpu] if device == "cuda" else []), id=f"triton-{device}")
       for device in ("cpu", "cuda")
       if "triton" in dynamic_time_warping._GPU_BACKENDS
       and not _dispatch.unsupported_reasons("triton", torch.device(device), ("triton",))
       and (device == "cpu" or torch.cuda.is_available())]
    + [pytest.param("cuda", "cuda", marks=[pytest.mark.gpu], id="cuda")
       for _ in [0] if torch.cuda.is_available()
       and not _dispatch.unsupported_reasons("cuda", torch.device("cuda"),
                                             dynamic_time_warping._GPU_BACKENDS)]
)


def _nan_case(dtype, N=9, M=8, D=2):
    """17 pairs (a group of 16 or two of 8 in the C++ lanes, and a remainder pair) with
    per-pair lengths; NaN in a cell some pairs may use, in ways that reach different spots
    of the recurrence, and NaN or inf where no cell reads it. Returns (x, y, lengths, the
    pairs whose value must be NaN)."""
    B = 17
    x = torch.randn(B, N, D, dtype=torch.float64)
    y = torch.randn(B, M, D, dtype=torch.float64)
    x_lengths = torch.randint(2, N + 1, (B,))
    y_lengths = torch.randint(2, M + 1, (B,))
    x_lengths[:8], y_lengths[:8] = N, M
    x_lengths[11], y_lengths[13] = N - 2, M - 3  # padding that holds NaN (below)
    # The shortest pair, last among equals: the C++ lanes leave it over to run alone
    # (LaneGroups), so pair 16's NaN goes through the single-pair paths.
    x_lengths[16], y_lengths[16] = 2, 2
    nan = float("nan")
    x[1, 0, 0] = nan                                   # the first row: R[1][1] on
    y[3, int(y_lengths[3]) - 1, 1] = nan               # the last column of y
    x[5, int(x_lengths[5]) - 1, 0] = nan               # the last row, the end cell
    x[9, 0, 1], y[9, 0, 1] = math.inf, math.inf        # inf - inf: cost (1, 1) only
    x[12, torch.randint(0, int(x_lengths[12]), ()), 0] = nan  # a random row
    y[16, 0, 0] = nan                                  # the remainder pair, scalar path
    # never read: past the lengths (zeroed by the API)
    x[11, int(x_lengths[11]):] = nan
    y[13, int(y_lengths[13]):] = nan
    x_lengths[2], y_lengths[2] = N, M  # see _values_and_gradients's off_band_nan
    nan_pairs = torch.zeros(B, dtype=torch.bool)
    nan_pairs[[1, 3, 5, 9, 12, 16]] = True
    return x.to(dtype), y.to(dtype), x_lengths, y_lengths, nan_pairs


def _within_lengths(grads, x_lengths, y_lengths, from_cost):
    """(B, ...) masks of each gradient's elements within its pair's lengths."""
    def steps(length, size):
        return torch.arange(size).view(1, -1) < length.view(-1, 1)
    if from_cost:
        N, M = grads[0].shape[1:]
        return [steps(x_lengths, N)[:, :, None] & steps(y_lengths, M)[:, None, :]]
    return [steps(x_lengths, grads[0].shape[1])[:, :, None].expand_as(grads[0]),
            steps(y_lengths, grads[1].shape[1])[:, :, None].expand_as(grads[1])]


def _check_nan_pairs(values, grads, ref_values, ref_grads, nan_pairs, dtype, inside):
    """Values NaN exactly on nan_pairs (both), their gradients NaN within their lengths,
    the other pairs finite and equal to the reference's within the usual bounds."""
    for v in (values, ref_values):
        assert torch.equal(v.isnan(), nan_pairs), (v, nan_pairs)
    fine = ~nan_pairs
    bound = 1e-10 if dtype == torch.float64 else 1e-5
    assert ((values[fine] - ref_values[fine]).abs().max()
            / ref_values[fine].abs().max()).item() < bound
    for g, r, used in zip(grads, ref_grads, inside):
        for got in (g, r):
            assert got[nan_pairs][used[nan_pairs]].isnan().all()
            assert torch.isfinite(got[fine]).all()
        error = ((g[fine] - r[fine]).abs().max() / r[fine].abs().max()).item()
        assert error < (1e-9 if dtype == torch.float64 else 1e-4), error


def _values_and_gradients(backend, device, x, y, x_lengths, y_lengths, gamma, band, from_cost):
    a = x.to(device).requires_grad_(True)
    b = y.to(device).requires_grad_(True)
    kwargs = dict(band=band, x_lengths=x_lengths.to(device), y_lengths=y_lengths.to(device))
    with ek.use_backend(backend):
        if from_cost:
            cost = dynamic_time_warping.pairwise_cost(a, b).detach()
            cost[2, 0, -1] = math.nan  # pair 2's cell (1, M): used without a band only
            cost.requires_grad_(True)
            values = (ek.dtw_from_cost(cost, **kwargs) if gamma is None
                      else ek.soft_dtw_from_cost(cost, gamma, **kwargs))
            inputs = (cost,)
        else:
            values = (ek.dtw(a, b, **kwargs) if gamma is None
                      else ek.soft_dtw(a, b, gamma, **kwargs))
            inputs = (a, b)
        weights = torch.linspace(0.5, 1.5, values.shape[0], dtype=values.dtype, device=device)
        grads = torch.autograd.grad((values * weights).sum(), inputs)
    return values.double().cpu(), [g.double().cpu() for g in grads]


@pytest.mark.parametrize("backend, device", NAN_BACKENDS)
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("band", [None, 0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("from_cost", [False, True], ids=["series", "cost"])
def test_a_nan_in_a_used_cell_makes_that_pair_nan_on_every_backend(backend, device, gamma, band,
                                                                   dtype, from_cost):
    """NaN in, NaN out (the NaN convention of dynamic_time_warping.py): a pair with a NaN
    cost in a cell it may use gets the value NaN and a gradient NaN within its lengths (the
    padding, zeroed before use, gets 0), on every backend;
    NaN / inf that no used cell reads changes nothing; the other pairs equal the reference.
    (The min instructions drop NaN: before, such pairs came out finite or +inf.)"""
    x, y, x_lengths, y_lengths, nan_pairs = _nan_case(dtype)
    nan_pairs[2] = from_cost and band is None  # its NaN cost cell (1, M) lies off bands < M - 1
    values, grads = _values_and_gradients(backend, device, x, y, x_lengths, y_lengths, gamma,
                                          band, from_cost)
    ref_values, ref_grads = _values_and_gradients("reference", "cpu", x.double(), y.double(),
                                                  x_lengths, y_lengths, gamma, band, from_cost)
    _check_nan_pairs(values, grads, ref_values, ref_grads, nan_pairs, dtype,
                     _within_lengths(grads, x_lengths, y_lengths, from_cost))


@pytest.mark.skipif("cpp" not in ALL_BACKENDS, reason="the C++ DTW kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_checkpointed_cpu_soft_dtw_follows_the_nan_convention(monkeypatch, dtype):
    checked = force_cpu_checkpoints(monkeypatch)
    x, y, x_lengths, y_lengths, nan_pairs = _nan_case(dtype, N=13, M=11)
    values, grads = checked(lambda: _values_and_gradients(
        "cpp", "cpu", x, y, x_lengths, y_lengths, 0.5, None, False))
    ref_values, ref_grads = _values_and_gradients("reference", "cpu", x.double(), y.double(),
                                                  x_lengths, y_lengths, 0.5, None, False)
    _check_nan_pairs(values, grads, ref_values, ref_grads, nan_pairs, dtype,
                     _within_lengths(grads, x_lengths, y_lengths, False))


@pytest.mark.parametrize("backend, device", NAN_BACKENDS)
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("from_cost", [False, True], ids=["series", "cost"])
def test_a_nan_pair_masked_out_of_the_loss_gets_no_gradient_from_the_kernels(backend, device,
                                                                            gamma, from_cost):
    """Masking the NaN pairs out of a loss (torch.where(values.isnan(), 0, values)) gives
    them an upstream gradient of 0: the kernels' backward then gives them 0, not NaN, and
    the other pairs their own gradient (the reference, on the finite pairs alone)."""
    if backend == "reference":
        pytest.skip("the reference's autograd gives 0 * NaN = NaN there (documented)")
    if backend == "triton" and not from_cost:
        pytest.skip("Triton on series forms the cost with PyTorch, whose backward takes the "
                    "kernel's 0 to x and y as 0 * NaN = NaN (as the reference)")
    x, y, x_lengths, y_lengths, nan_pairs = _nan_case(torch.float64)
    fine = ~nan_pairs
    kwargs = dict(x_lengths=x_lengths.to(device), y_lengths=y_lengths.to(device))

    def gradients(backend, x, y, **kwargs):
        a, b = x.to(device).requires_grad_(True), y.to(device).requires_grad_(True)
        with ek.use_backend(backend):
            if from_cost:
                inputs = (dynamic_time_warping.pairwise_cost(a, b).detach().requires_grad_(True),)
                values = (ek.dtw_from_cost(inputs[0], **kwargs) if gamma is None
                          else ek.soft_dtw_from_cost(inputs[0], gamma, **kwargs))
            else:
                inputs = (a, b)
                values = (ek.dtw(a, b, **kwargs) if gamma is None
                          else ek.soft_dtw(a, b, gamma, **kwargs))
            loss = torch.where(values.isnan(), 0.0, values).sum()
            return [g.cpu() for g in torch.autograd.grad(loss, inputs)]

    masked = gradients(backend, x, y, **kwargs)
    expected = gradients("reference", x[fine], y[fine], x_lengths=x_lengths[fine].to(device),
                         y_lengths=y_lengths[fine].to(device))
    for got, want in zip(masked, expected):
        assert torch.equal(got[nan_pairs], torch.zeros_like(got[nan_pairs]))
        torch.testing.assert_close(got[fine], want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_ad_follows_the_nan_convention(backend):
    """Under forward AD (torch.func.jvp) the reference runs whatever the backend; its NaN
    pairs' tangents are NaN (the inputs carry tangents there, not requires_grad: the NaN
    term took no input and left some NaN pairs a finite tangent), the others finite and
    equal to the reverse-mode directional derivative."""
    x, y, x_lengths, y_lengths, nan_pairs = _nan_case(torch.float64)
    tx, ty = torch.randn_like(x), torch.randn_like(y)

    def f(a, b):
        return ek.soft_dtw(a, b, 0.5, x_lengths=x_lengths, y_lengths=y_lengths)
    with ek.use_backend(backend):
        values, tangent = torch.func.jvp(f, (x, y), (tx, ty))
        a, b = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        fine = ~nan_pairs
        grads = torch.autograd.grad(f(a, b)[fine].sum(), (a, b))
    assert torch.equal(values.isnan(), nan_pairs)
    assert torch.equal(tangent.isnan(), nan_pairs), (tangent, nan_pairs)
    directional = (grads[0] * tx).flatten(1).sum(1) + (grads[1] * ty).flatten(1).sum(1)
    torch.testing.assert_close(tangent[fine], directional[fine], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend, device", NAN_BACKENDS)
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("from_cost", [False, True], ids=["series", "cost"])
def test_the_values_may_be_changed_in_place_before_backward(backend, device, gamma, from_cost):
    """The ops' outputs belong to the user: an in-place change (values.mul_(2), a masked
    fill) before backward must not break it (the autograd wrappers saved the output to find
    the NaN pairs: "modified by an inplace operation")."""
    x, y, x_lengths, y_lengths = (t.to(device) for t in random_case())

    def gradients(in_place):
        a, b = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        with ek.use_backend(backend):
            if from_cost:
                inputs = (dynamic_time_warping.pairwise_cost(a, b).detach().requires_grad_(True),)
                values = (ek.dtw_from_cost(inputs[0], x_lengths=x_lengths, y_lengths=y_lengths)
                          if gamma is None else
                          ek.soft_dtw_from_cost(inputs[0], gamma, x_lengths=x_lengths,
                                                y_lengths=y_lengths))
            else:
                inputs = (a, b)
                values = (ek.dtw(a, b, x_lengths=x_lengths, y_lengths=y_lengths)
                          if gamma is None else
                          ek.soft_dtw(a, b, gamma, x_lengths=x_lengths, y_lengths=y_lengths))
            values = values.mul_(2) if in_place else values * 2
            return torch.autograd.grad(values.sum(), inputs)
    for got, want in zip(gradients(True), gradients(False)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dtw_path_refuses_and_alignment_is_nan_for_a_nan_pair(backend):
    x, y, x_lengths, y_lengths, nan_pairs = _nan_case(torch.float64)
    kwargs = dict(x_lengths=x_lengths, y_lengths=y_lengths)
    with ek.use_backend(backend):
        with pytest.raises(ValueError, match=r"dtw_path: the local cost of pair\(s\) \[1, 3, 5, 9, 12, 16\]"):
            ek.dtw_path(x, y, **kwargs)
        fine = ~nan_pairs
        paths = ek.dtw_path(x[fine], y[fine], x_lengths=x_lengths[fine],
                            y_lengths=y_lengths[fine])
        assert len(paths) == int(fine.sum())
        alignment = ek.soft_dtw_alignment(x, y, 0.5, **kwargs)
    assert alignment[nan_pairs].isnan().all()
    assert torch.isfinite(alignment[~nan_pairs]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_soft_dtw_alignment_under_no_grad_and_inference_mode(backend):
    """E is a gradient, but evaluation code asks for it under no_grad / inference_mode
    (which raised "element 0 of tensors does not require grad")."""
    x, y, x_lengths, y_lengths = random_case()
    with ek.use_backend(backend):
        expected = ek.soft_dtw_alignment(x, y, 0.5, x_lengths=x_lengths, y_lengths=y_lengths)
        with torch.no_grad():
            plain = ek.soft_dtw_alignment(x, y, 0.5, x_lengths=x_lengths, y_lengths=y_lengths)
        with torch.inference_mode():
            xi, yi, xli, yli = x.clone(), y.clone(), x_lengths.clone(), y_lengths.clone()
            inferred = ek.soft_dtw_alignment(xi, yi, 0.5, x_lengths=xli, y_lengths=yli)
    assert torch.equal(plain, expected) and torch.equal(inferred, expected)
    assert expected.abs().sum() > 0


def _soft_dtw_ops_ran(run):
    """The ether_kernels ops a callable ran (name, batch size, checkpoint rows if any)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        result = run()
    ran = [(e.name, e.input_shapes[0][0] if e.input_shapes and e.input_shapes[0] else None)
           for e in prof.events() if e.name.startswith("ether_kernels::dtw_xy")]
    return result, ran


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("band", [None, 0, 3, 40])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean", "l1"])
@pytest.mark.parametrize("D", [1, 3])
def test_a_few_soft_pairs_run_in_strips_and_match_the_reference(dtype, band, metric, D):
    """A few soft-DTW pairs (up to cpu_soft_strip_pairs: 4 on one thread; 6 in fp32, 8 in
    fp64 on more) run alone, each swept in strips of L rows along the
    anti-diagonals (soft_strips_forward / soft_strips_backward), not in a lane group of 8:
    with a gradient through the checkpointed ops (segments of whole strips, recomputed with
    their weights in the backward), without one through the value-only op, unfilled. Row
    counts around the strip height and its multiples, long and wide grids (the longer side
    swept as rows), bands that cut strips, per-pair lengths: values and gradients in x and
    y equal the fp64 reference's."""
    most = dynamic_time_warping.cpu_soft_strip_pairs(dtype)
    shapes = [(1, 77, 61), (2, 61, 77), (1, 9, 460), (3, 260, 17), (4, 96, 96), (most, 70, 83)]
    for B, N, M in shapes:
        # Values the tested dtype holds exactly, so the fp64 reference sees the kernel's
        # inputs: rounding these to fp32 alone moves the (1, 9, 460) gradient by up to
        # ~1e-5 of its largest entry (gamma 0.5, costs ~20), while the kernel stays within
        # ~1e-7 of the reference on the rounded inputs.
        x = (torch.randn(B, N, D, dtype=torch.float64) * 1.5).to(dtype).double()
        y = (torch.randn(B, M, D, dtype=torch.float64) * 1.5).to(dtype).double()
        x_lengths = torch.tensor([N, max(1, N - 5), N // 2 + 1, max(1, N - 8), N - 1,
                                  N // 3 + 1, N, max(1, N - 2)][:B])
        y_lengths = torch.tensor([M, max(1, (3 * M) // 4), M, M // 3 + 1, M - 2, M, M // 2,
                                  M - 1][:B])
        weights = torch.linspace(0.7, 1.3, B, dtype=torch.float64)
        for lengths in (dict(), dict(x_lengths=x_lengths, y_lengths=y_lengths)):
            results = []
            for backend, dt in (("cpp", dtype), ("reference", torch.float64)):
                a, b = x.to(dt).requires_grad_(True), y.to(dt).requires_grad_(True)

                def run():
                    with ek.use_backend(backend):
                        values = ek.soft_dtw(a, b, 0.5, band=band, metric=metric, **lengths)
                        grads = torch.autograd.grad((values * weights.to(dt)).sum(), (a, b))
                        with torch.no_grad():
                            alone = ek.soft_dtw(a, b, 0.5, band=band, metric=metric, **lengths)
                    return [t.double() for t in (values, *grads, alone)]
                if backend == "cpp":
                    got, ran = _soft_dtw_ops_ran(run)
                    assert ("ether_kernels::dtw_xy_soft_forward_checkpointed", B) in ran, ran
                    assert ("ether_kernels::dtw_xy_forward", B) in ran, ran  # not filled
                    results.append(got)
                else:
                    results.append(run())
            got, want = results
            want.append(want[0])  # the value without a gradient
            bound = 1e-10 if dtype == torch.float64 else 2e-5
            for name, g, w in zip(("values", "grad x", "grad y", "values (no grad)"), got, want):
                assert torch.isfinite(g).all(), (N, M, name)
                error = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
                assert error < bound, (N, M, lengths != {}, name, error)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("band", [None, 4])
def test_soft_strips_follow_the_nan_and_inf_conventions(dtype, band):
    """In strips too: a NaN in a cell the band allows makes that pair's value (and
    gradient) NaN and leaves the other pair alone; a +inf point makes its pair +inf, with
    the reference's gradient (the seed meets only the end cell's own cost)."""
    N, M = 70, 66
    x = torch.randn(2, N, 2, dtype=dtype).double()  # exact in dtype (see above)
    y = torch.randn(2, M, 2, dtype=dtype).double()
    for poison in (math.nan, math.inf):
        a0 = x.clone()
        a0[1, 33, 1] = poison
        results = []
        for backend, dt in (("cpp", dtype), ("reference", torch.float64)):
            a = a0.to(dt).requires_grad_(True)
            with ek.use_backend(backend):
                values = ek.soft_dtw(a, y.to(dt), 0.5, band=band)
                (grad,) = torch.autograd.grad(values.sum(), (a,))
            results.append((values.double(), grad.double()))
        (value, grad), (want_value, want_grad) = results
        if math.isnan(poison):
            assert value[1].isnan() and grad[1].isnan().all()
        else:
            assert value[1].item() == math.inf
        bound = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(value, want_value, rtol=bound, atol=bound, equal_nan=True)
        torch.testing.assert_close(grad, want_grad, rtol=bound, atol=bound, equal_nan=True)


@needs_cpp
@pytest.mark.parametrize("band", [None, 3])
def test_soft_strips_gradcheck_fp64(band):
    """fp64 gradcheck of a single pair in strips (64 x 80 cells: the strips' route)."""
    x = torch.randn(1, 64, 1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 80, 2, dtype=torch.float64)[..., :1].contiguous().requires_grad_(True)
    with ek.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda a, b: ek.soft_dtw(a, b, 0.7, band=band), (x, y), eps=1e-6, atol=1e-7)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [1, 3, 5])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("schedule", ["free", "contended", "publish delayed"])
def test_strips_pairs_are_bitwise_the_same_on_one_and_several_threads(
        monkeypatch, dtype, B, threads, schedule):
    """Pairs in strips too few to spread one per thread (1 on 2 or 3 threads, 3 or 5 on 2)
    each take two threads (3 or 5 on 3 go one per thread): the forward's strip groups handed
    over in a RowRing, the backward's recomputes beside its walks (soft_strips_forward,
    soft_strips_pair_backward). The same
    cells in the same order: values (with and without a gradient) and gradients equal one
    thread's bit for bit, and the reference's. `schedule` (see
    test_rows_shared_by_threads_match_one_thread_and_the_reference): contended, the ring's
    groups then run one at a time, or writers stalled after each publish: still the same
    bits."""
    _set_schedule(monkeypatch, schedule)
    # In strips on one thread too (5 pairs would take lane groups there).
    monkeypatch.setattr(dynamic_time_warping, "CPU_SOFT_STRIP_PAIRS",
                        {torch.float32: (5, 5), torch.float64: (5, 5)})
    # >= 2^15 cells a pair (kStripsSharedMinCells); exact in dtype (see above).
    x = torch.randn(B, 230, 3, dtype=dtype).double()
    y = torch.randn(B, 190, 3, dtype=dtype).double()
    lengths = dict(x_lengths=torch.tensor([230, 201, 215, 222, 208][:B]),
                   y_lengths=torch.tensor([190, 190, 177, 185, 180][:B]))
    before = torch.get_num_threads()
    results = []
    try:
        for count in (1, threads):
            torch.set_num_threads(count)
            a, b = x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True)
            with ek.use_backend("cpp"):
                value = ek.soft_dtw(a, b, 0.4, band=40, **lengths)
                grads = torch.autograd.grad(value.sum(), (a, b))
                with torch.no_grad():
                    alone = ek.soft_dtw(a, b, 0.4, band=40, **lengths)
            results.append([value.detach(), *grads, alone])
    finally:
        torch.set_num_threads(before)
    for one, several in zip(*results):
        assert torch.equal(one, several)
    a, b = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    with ek.use_backend("reference"):
        value = ek.soft_dtw(a, b, 0.4, band=40, **lengths)
    want = [value.detach(), *torch.autograd.grad(value.sum(), (a, b)), value.detach()]
    bound = 1e-10 if dtype == torch.float64 else 2e-5
    for got, w in zip(results[1], want):
        assert ((got.double() - w).abs().max() / w.abs().max()).item() < bound
