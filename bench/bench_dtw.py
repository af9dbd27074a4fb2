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
from ether_kernels import dynamic_time_warping

HARD = dict(pairs=64, n=512, dim=1)
SOFT = dict(pairs=64, n=256, dim=4, gamma=1.0)


def _series(pairs, n, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(pairs, n, dim, generator=generator)


def _hard_dtw_ours_or_eager(provider, x, y):
    """ek.dtw(x, y) as dispatched ("ether_kernels") or on the pure-PyTorch reference
    ("eager")."""
    if provider == "ether_kernels":
        return lambda: ek.dtw(x, y)

    def eager():
        with ek.use_backend("reference"):
            return ek.dtw(x, y)
    return eager


@pytest.mark.parametrize("provider", ["ether_kernels", "eager", "dtaidistance", "tslearn"])
def test_hard_dtw(benchmark, provider):
    x, y = _series(HARD["pairs"], HARD["n"], 1, 0), _series(HARD["pairs"], HARD["n"], 1, 1)
    cells = HARD["pairs"] * HARD["n"] * HARD["n"]
    rounds = 2 if provider == "eager" else 5
    if provider in ("ether_kernels", "eager"):
        fn = _hard_dtw_ours_or_eager(provider, x, y)
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


@pytest.mark.parametrize("lengths", ["equal", "per-pair"])
@pytest.mark.parametrize("provider", ["ether_kernels", "eager", "tslearn", "pysdtw"])
def test_soft_dtw_forward_backward(benchmark, provider, lengths):
    """lengths "per-pair": every pair has its own lengths (x_lengths, y_lengths, 192..256),
    the usual multimodal batch; cells counted per pair (n_k m_k). pysdtw has no per-pair
    lengths."""
    x = _series(SOFT["pairs"], SOFT["n"], SOFT["dim"], 2)
    y = _series(SOFT["pairs"], SOFT["n"], SOFT["dim"], 3)
    gamma = SOFT["gamma"]
    x_lengths = torch.full((SOFT["pairs"],), SOFT["n"])
    y_lengths = torch.full((SOFT["pairs"],), SOFT["n"])
    lengths_given = {}
    if lengths == "per-pair":
        if provider == "pysdtw":
            pytest.skip("pysdtw has no per-pair lengths")
        generator = torch.Generator().manual_seed(6)
        x_lengths = torch.randint(3 * SOFT["n"] // 4, SOFT["n"] + 1, (SOFT["pairs"],),
                                  generator=generator)
        y_lengths = torch.randint(3 * SOFT["n"] // 4, SOFT["n"] + 1, (SOFT["pairs"],),
                                  generator=generator)
        lengths_given = dict(x_lengths=x_lengths, y_lengths=y_lengths)
    cells = int((x_lengths * y_lengths).sum())
    rounds = 5
    if provider in ("ether_kernels", "eager"):
        backend = "auto" if provider == "ether_kernels" else "reference"
        rounds = 5 if provider == "ether_kernels" else 2

        def fn():
            with ek.use_backend(backend):
                a = x.clone().requires_grad_(True)
                torch.autograd.grad(ek.soft_dtw(a, y, gamma, **lengths_given).sum(), (a,))
    elif provider == "tslearn":
        soft = pytest.importorskip("tslearn.metrics")
        a = [x[k, :x_lengths[k]].double().numpy() for k in range(SOFT["pairs"])]
        b = [y[k, :y_lengths[k]].double().numpy() for k in range(SOFT["pairs"])]

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
    if lengths == "equal":
        benchmark.group = "soft_dtw fwd+bwd 64 x 256 x 256, D=4"
    else:
        benchmark.group = "soft_dtw fwd+bwd 64 pairs, lengths 192..256, D=4"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    record(benchmark, op="soft_dtw" if lengths == "equal" else "soft_dtw-lengths",
           mode="forward+backward", shape=(SOFT["pairs"], SOFT["n"], SOFT["n"]),
           dtype=torch.float32, device="cpu", provider=provider, cells=cells)


LONG_PAIR = 4096


@pytest.mark.parametrize("provider", ["ether_kernels", "eager", "dtaidistance", "tslearn"])
def test_hard_dtw_one_long_pair(benchmark, provider):
    """Hard DTW of 1 pair of 4096 x 4096, D = 1, values: a pair alone in the C++ lanes runs
    in strips of 16 rows (forward_hard_strips), one thread; dtaidistance's C code and
    tslearn take one pair on one thread too."""
    n = LONG_PAIR
    x, y = _series(1, n, 1, 3), _series(1, n, 1, 4)
    rounds = 1 if provider == "eager" else 5
    if provider in ("ether_kernels", "eager"):
        fn = _hard_dtw_ours_or_eager(provider, x, y)
    elif provider == "dtaidistance":
        dtai = pytest.importorskip("dtaidistance.dtw")
        a, b = x[0, :, 0].double().numpy(), y[0, :, 0].double().numpy()
        fn = lambda: dtai.distance_fast(a, b)  # noqa: E731
    else:
        metrics = pytest.importorskip("tslearn.metrics")
        a, b = x[0].double().numpy(), y[0].double().numpy()
        metrics.dtw(a[:8], b[:8])  # numba compilation outside the timing
        fn = lambda: metrics.dtw(a, b)  # noqa: E731
    benchmark.group = f"dtw hard 1 x {n} x {n}"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1 if provider != "eager" else 0)
    record(benchmark, op="dtw-one-pair", mode="forward", shape=(1, n, n), dtype=torch.float32,
           device="cpu", provider=provider, cells=n * n)


# (pairs, n): one lane group (8 pairs), or strips (up to 6 fp32 pairs on 2 threads, 4 on one:
# dynamic_time_warping.cpu_soft_strip_pairs)
FEW = [(8, 1024), (6, 1024), (4, 1024), (1, 2048)]


@pytest.mark.parametrize("pairs,n", FEW, ids=[f"{p}x{n}" for p, n in FEW])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", ["ether_kernels", "ether_kernels-1-thread",
                                      "ether_kernels-lane-groups", "eager", "pysdtw"])
def test_soft_dtw_few_long_pairs(benchmark, provider, mode, pairs, n):
    """A few long pairs, D = 4: 8 pairs make one lane group, whose rows the C++ kernels share
    among the threads; 6, 4 and 1 pair run in strips (each pair alone, checkpointed for the
    backward); "ether_kernels-1-thread" is the same call on one thread (6 pairs: a lane
    group there), "ether_kernels-lane-groups" the same call with the pairs filled into a
    lane group instead of strips (what 5 to 6 pairs took before, and 2 to 4 before strips)."""
    if provider == "ether_kernels-lane-groups" and pairs not in (4, 6):
        pytest.skip("lane groups against strips: 4 and 6 pairs")
    x = _series(pairs, n, 4, 7)
    y = _series(pairs, n, 4, 8)
    gamma = SOFT["gamma"]
    threads = torch.get_num_threads()
    rounds = 3
    if provider.startswith("ether_kernels") or provider == "eager":
        backend = "reference" if provider == "eager" else "auto"
        if provider == "eager":
            rounds = 1
        strip_pairs = ({torch.float32: (0, 0), torch.float64: (0, 0)}
                       if provider == "ether_kernels-lane-groups"
                       else dynamic_time_warping.CPU_SOFT_STRIP_PAIRS)

        def call(a):
            saved = dynamic_time_warping.CPU_SOFT_STRIP_PAIRS
            dynamic_time_warping.CPU_SOFT_STRIP_PAIRS = strip_pairs
            try:
                with ek.use_backend(backend):
                    return ek.soft_dtw(a, y, gamma)
            finally:
                dynamic_time_warping.CPU_SOFT_STRIP_PAIRS = saved
    else:
        pysdtw = pytest.importorskip("pysdtw")
        criterion = pysdtw.SoftDTW(gamma=gamma, use_cuda=False)

        def call(a):
            return criterion(a, y)

    def fn():
        if mode == "forward":
            with torch.no_grad():
                return call(x)
        a = x.clone().requires_grad_(True)
        return torch.autograd.grad(call(a).sum(), (a,))

    torch.set_num_threads(1 if provider == "ether_kernels-1-thread" else threads)
    try:
        benchmark.group = f"soft_dtw {mode} {pairs} x {n} x {n}, D=4"
        # the eager loop (~25 s for 8 x 1024^2 forward+backward) is timed once, cold
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0 if provider == "eager" else 1)
    finally:
        torch.set_num_threads(threads)
    record(benchmark, op="soft_dtw-few", mode=mode, shape=(pairs, n, n), dtype=torch.float32,
           device="cpu", provider=provider, cells=pairs * n * n)


@pytest.mark.parametrize("provider", ["ether_kernels", "eager", "tslearn", "pysdtw"])
def test_soft_dtw_forward(benchmark, provider):
    """Soft-DTW values only (no gradient wanted): ours keeps O(M) state per pair."""
    x = _series(SOFT["pairs"], SOFT["n"], SOFT["dim"], 2)
    y = _series(SOFT["pairs"], SOFT["n"], SOFT["dim"], 3)
    gamma = SOFT["gamma"]
    rounds = 5
    if provider in ("ether_kernels", "eager"):
        backend = "auto" if provider == "ether_kernels" else "reference"
        rounds = 5 if provider == "ether_kernels" else 2

        def fn():
            with ek.use_backend(backend), torch.no_grad():
                return ek.soft_dtw(x, y, gamma)
    elif provider == "tslearn":
        soft = pytest.importorskip("tslearn.metrics")
        a, b = x.double().numpy(), y.double().numpy()

        def fn():
            return [soft.soft_dtw(a[k], b[k], gamma=gamma) for k in range(len(a))]
        fn()  # numba compilation outside the timing
    else:
        pysdtw = pytest.importorskip("pysdtw")
        criterion = pysdtw.SoftDTW(gamma=gamma, use_cuda=False)

        def fn():
            with torch.no_grad():
                return criterion(x, y)
        fn()
    benchmark.group = "soft_dtw forward 64 x 256 x 256, D=4"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
    record(benchmark, op="soft_dtw", mode="forward",
           shape=(SOFT["pairs"], SOFT["n"], SOFT["n"]), dtype=torch.float32, device="cpu",
           provider=provider, cells=SOFT["pairs"] * SOFT["n"] * SOFT["n"])


# --------------------------------------------------------------------------------- GPU
# On a GPU: ours (the CUDA wavefront kernels) against the plain-PyTorch anti-diagonal loop
# on the same GPU ("eager-cuda") and pysdtw's CUDA path where it is installed. Batches are
# sized to fill the device (one thread block per pair); memory is the peak allocated by a
# forward+backward of ONE pair, inputs included.
from conftest import devices  # noqa: E402

GPU = "cuda" in devices()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a GPU")
GPU_HARD = [(1024, 512), (256, 2048), (32, 8192)]          # (pairs, n), value only, D = 1
# fwd+bwd, D = 4. One block of N / 4 threads per pair: 256 pairs of 512 give ~8 warps per
# SM and 64 pairs of 4096 busy 64 of 132 SMs, so 1024 x 512 and 128 x 4096 fill the device.
GPU_SOFT = [(256, 512), (1024, 512), (128, 1024), (128, 2048), (64, 4096), (128, 4096)]
GPU_MEMORY = [512, 2048, 8192]


def _gpu_series(pairs, n, dim, seed):
    return _series(pairs, n, dim, seed).cuda()


def _timed_cuda(benchmark, fn, rounds):
    def run():
        fn()
        torch.cuda.synchronize()
    run()  # warm-up: lazy initialisation, allocator
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


@gpu_only
@pytest.mark.parametrize("pairs,n", GPU_HARD, ids=[f"{p}x{n}" for p, n in GPU_HARD])
@pytest.mark.parametrize("provider", ["ether_kernels-cuda", "eager-cuda"])
def test_gpu_hard_dtw(benchmark, provider, pairs, n):
    if provider == "eager-cuda" and n > 512:
        pytest.skip("the PyTorch loop takes minutes here")
    x, y = _gpu_series(pairs, n, 1, 0), _gpu_series(pairs, n, 1, 1)
    backend = "cuda" if provider == "ether_kernels-cuda" else "reference"

    def fn():
        with ek.use_backend(backend):
            return ek.dtw(x, y)
    benchmark.group = f"dtw hard cuda {pairs} x {n} x {n}"
    _timed_cuda(benchmark, fn, rounds=5 if backend == "cuda" else 1)
    record(benchmark, op="dtw", mode="forward", shape=(pairs, n, n), dtype=torch.float32,
           device="cuda", provider=provider, cells=pairs * n * n)


@gpu_only
@pytest.mark.parametrize("pairs,n", GPU_SOFT, ids=[f"{p}x{n}" for p, n in GPU_SOFT])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", ["ether_kernels-cuda", "eager-cuda", "pysdtw-cuda"])
def test_gpu_soft_dtw(benchmark, provider, mode, pairs, n):
    if provider == "eager-cuda" and (n > 512 or pairs > 256):
        pytest.skip("the PyTorch loop takes minutes here")
    x, y = _gpu_series(pairs, n, 4, 2), _gpu_series(pairs, n, 4, 3)
    if provider == "pysdtw-cuda":
        pysdtw = pytest.importorskip("pysdtw")
        criterion = pysdtw.SoftDTW(gamma=1.0, use_cuda=True)
        soft = lambda a, b: criterion(a, b)  # noqa: E731
    else:
        backend = "cuda" if provider == "ether_kernels-cuda" else "reference"

        def soft(a, b):
            with ek.use_backend(backend):
                return ek.soft_dtw(a, b, 1.0)

    def fn():
        if mode == "forward":
            with torch.no_grad():
                return soft(x, y)
        a = x.clone().requires_grad_(True)
        return torch.autograd.grad(soft(a, y).sum(), (a,))
    benchmark.group = f"soft_dtw cuda {pairs} x {n} x {n} D=4 {mode}"
    _timed_cuda(benchmark, fn, rounds=5 if provider != "eager-cuda" else 1)
    record(benchmark, op="soft_dtw", mode=mode, shape=(pairs, n, n), dtype=torch.float32,
           device="cuda", provider=provider, cells=pairs * n * n)


@gpu_only
@pytest.mark.parametrize("n", GPU_MEMORY)
@pytest.mark.parametrize("provider", ["ether_kernels-cuda"])
def test_gpu_soft_dtw_memory_one_pair(benchmark, provider, n):
    """Peak device memory of a soft-DTW forward+backward of one n x n pair (D = 1)."""
    x, y = _gpu_series(1, n, 1, 4), _gpu_series(1, n, 1, 5)

    def fn():
        a = x.clone().requires_grad_(True)
        with ek.use_backend("cuda"):
            return torch.autograd.grad(ek.soft_dtw(a, y, 1.0).sum(), (a,))
    benchmark.group = f"soft_dtw cuda memory 1 x {n} x {n}"
    _timed_cuda(benchmark, fn, rounds=3)
    record(benchmark, op="soft_dtw-memory", mode="forward+backward", shape=(1, n, n),
           dtype=torch.float32, device="cuda", provider=provider, cells=n * n)
