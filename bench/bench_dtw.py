"""DTW and soft-DTW throughput in cells per second (one cell = one (i, j) of one pair).

Side by side in one run: ours (automatic backend: the C++ kernels on CPU), the plain-PyTorch
anti-diagonal reference ("eager"), and the public implementations users compare with:
dtaidistance's C code (parallel over pairs) and tslearn (numba) for hard DTW; tslearn and
pysdtw for soft-DTW forward+backward. A peer that is not installed is skipped.
Shapes follow issue 3: 64 pairs of 512 x 512 univariate (hard), 64 pairs of 256 x 256 with
D = 4 (soft, forward+backward).
"""

import numpy as np
import pytest
import torch

import ether_kernels as ek
from conftest import record

HARD = dict(pairs=64, n=512, dim=1)
SOFT = dict(pairs=64, n=256, dim=4, gamma=1.0)


def _series(pairs, n, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(pairs, n, dim, generator=generator)


@pytest.mark.parametrize("provider", ["ether_kernels", "eager", "dtaidistance", "tslearn"])
def test_hard_dtw(benchmark, provider):
    x, y = _series(HARD["pairs"], HARD["n"], 1, 0), _series(HARD["pairs"], HARD["n"], 1, 1)
    cells = HARD["pairs"] * HARD["n"] * HARD["n"]
    rounds = 5
    if provider == "ether_kernels":
        fn = lambda: ek.dtw(x, y)  # noqa: E731
    elif provider == "eager":
        def fn():
            with ek.use_backend("reference"):
                return ek.dtw(x, y)
        rounds = 2
    elif provider == "dtaidistance":
        dtai = pytest.importorskip("dtaidistance.dtw")
        series = np.concatenate([x[:, :, 0].double().numpy(), y[:, :, 0].double().numpy()])
        pairs = HARD["pairs"]
        # dtaidistance computes blocks of a distance matrix: the 64 x 64 block of x against y
        # (4096 pairs, each counted in the cells), in parallel C.
        fn = lambda: dtai.distance_matrix_fast(series, block=((0, pairs), (pairs, 2 * pairs)),  # noqa: E731
                                               parallel=True, compact=True)
        cells = pairs * pairs * HARD["n"] * HARD["n"]
    else:
        metrics = pytest.importorskip("tslearn.metrics")
        a, b = x.double().numpy(), y.double().numpy()
        metrics.dtw(a[0], b[0])  # numba compilation outside the timing
        fn = lambda: [metrics.dtw(a[k], b[k]) for k in range(len(a))]  # noqa: E731
    benchmark.group = "dtw hard 64 x 512 x 512"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    record(benchmark, op="dtw", mode="forward", shape=(HARD["pairs"], HARD["n"], HARD["n"]),
           dtype=torch.float32, device="cpu", provider=provider, cells=cells)


@pytest.mark.parametrize("provider", ["ether_kernels", "eager", "tslearn", "pysdtw"])
def test_soft_dtw_forward_backward(benchmark, provider):
    x = _series(SOFT["pairs"], SOFT["n"], SOFT["dim"], 2)
    y = _series(SOFT["pairs"], SOFT["n"], SOFT["dim"], 3)
    gamma = SOFT["gamma"]
    cells = SOFT["pairs"] * SOFT["n"] * SOFT["n"]
    rounds = 5
    if provider in ("ether_kernels", "eager"):
        backend = "auto" if provider == "ether_kernels" else "reference"
        rounds = 5 if provider == "ether_kernels" else 2

        def fn():
            with ek.use_backend(backend):
                a = x.clone().requires_grad_(True)
                torch.autograd.grad(ek.soft_dtw(a, y, gamma).sum(), (a,))
    elif provider == "tslearn":
        soft = pytest.importorskip("tslearn.metrics")
        a, b = x.double().numpy(), y.double().numpy()

        def fn():
            for k in range(len(a)):
                distances = soft.SquaredEuclidean(a[k], b[k])
                sdtw = soft.SoftDTW(distances, gamma=gamma)
                sdtw.compute()
                distances.jacobian_product(sdtw.grad())
        fn()  # numba compilation outside the timing
    else:
        pysdtw = pytest.importorskip("pysdtw")
        criterion = pysdtw.SoftDTW(gamma=gamma, use_cuda=False)

        def fn():
            a = x.clone().requires_grad_(True)
            torch.autograd.grad(criterion(a, y).sum(), (a,))
        fn()
    benchmark.group = "soft_dtw fwd+bwd 64 x 256 x 256, D=4"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    record(benchmark, op="soft_dtw", mode="forward+backward",
           shape=(SOFT["pairs"], SOFT["n"], SOFT["n"]), dtype=torch.float32, device="cpu",
           provider=provider, cells=cells)
