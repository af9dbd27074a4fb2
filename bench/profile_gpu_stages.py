"""Where the GPU time of two fused paths goes (run on a GPU machine; prints tables).

1. The AMSS step on two ResNet18 encoders' gradients (40 tensors, 22M fp32): wall time of
   one step (host included, CUDA-synchronised), the GPU time of its kernels by name
   (torch.profiler), and the number of launches, so the selection stage's small torch ops
   can be weighed against the two passes over gradient memory.
2. DTW / soft-DTW on the same inputs through the CUDA extension and the Triton fallback
   (median of CUDA-event timings), in G cells/s.

Usage: python3 bench/profile_gpu_stages.py [amss] [dtw | dtw-triton]   (amss and dtw without
an argument)
"""

import cProfile
import pstats
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import ether_kernels as ek

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_amss import SHAPES  # noqa: E402


def cuda_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_amss():
    torch.manual_seed(0)
    for mode in ("amss", "amss+"):
        grads = [[torch.randn(s, device="cuda") for s in SHAPES] for _ in range(2)]
        numel = sum(g.numel() for group in grads for g in group)

        def step():
            ek.amss.mask_gradients(grads, [0.3, 0.7], mode=mode, seed=0, step=1)

        ms = cuda_ms(step)
        print(f"\n== AMSS {mode}: {numel / 1e6:.1f}M fp32, step {ms * 1e3:.0f} us wall, "
              f"{2 * 4 * numel / ms / 1e6:.0f} GB/s (read + write)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()

        # host time per step: launches queued without waiting (the GPU is not the limit
        # when this is above the kernels' GPU time), then where it goes (cProfile)
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(50):
            step()
        host_us = (time.perf_counter() - begin) / 50 * 1e6
        torch.cuda.synchronize()
        print(f"host time per step (no sync): {host_us:.0f} us")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(50):
            step()
        profiler.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(12)
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"
                  or getattr(e, "self_device_time_total", 0) > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        launches = sum(e.count for e in events) / 5
        print(f"kernels per step: {launches:.0f}; GPU time per step by kernel:")
        for e in events[:15]:
            us = e.self_device_time_total / 5
            rate = (f"  ({4 * numel / us / 1e3:.0f} GB/s: one read of every gradient)"
                    if e.key == "_importance_kernel" else "")
            print(f"  {us:8.1f} us  x{e.count // 5:3d}  {e.key[:90]}{rate}")


def sweep_amss_passes():
    """GPU time of the two passes over gradient memory (importance: one read; apply: the
    dropped units' zeros) for other elements per loop iteration (BLOCK = 32 warps vectors
    per thread x 4 elements, fp32) and warps per program than the defaults."""
    from ether_kernels.triton import amss as triton_amss
    torch.manual_seed(0)
    grads = [[torch.randn(s, device="cuda") for s in SHAPES] for _ in range(2)]
    numel = sum(g.numel() for group in grads for g in group)
    defaults = triton_amss.VECTORS_PER_THREAD, triton_amss.NUM_WARPS
    print("\n== AMSS passes by (BLOCK, warps), fp32 amss: importance us (TB/s), apply us")
    try:
        for vectors, warps in ((1, 4), (2, 4), (4, 4), (2, 8), (4, 8), (4, 16)):
            triton_amss.VECTORS_PER_THREAD, triton_amss.NUM_WARPS = vectors, warps
            block = triton_amss._block(torch.float32)
            for _ in range(3):
                ek.amss.mask_gradients(grads, [0.3, 0.7], mode="amss", seed=0, step=1)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    ek.amss.mask_gradients(grads, [0.3, 0.7], mode="amss", seed=0, step=1)
                torch.cuda.synchronize()
            times = {e.key: e.self_device_time_total / 5 for e in prof.key_averages()}
            importance = times.get("_importance_kernel", float("nan"))
            print(f"  BLOCK {block:5d} warps {warps:2d}: importance {importance:6.1f} us "
                  f"({4 * numel / importance / 1e6:.2f} TB/s), apply "
                  f"{times.get('_apply_kernel', float('nan')):6.1f} us")
    finally:
        triton_amss.VECTORS_PER_THREAD, triton_amss.NUM_WARPS = defaults


def _soft_dtw_case(batch, length, dim=4):
    """Random (batch, length, dim) x and y on the GPU, the cells of one call, and a soft-DTW
    forward+backward (gamma = 1) through x."""
    x = torch.randn(batch, length, dim, device="cuda")
    y = torch.randn(batch, length, dim, device="cuda")

    def fwd_bwd():
        x.grad = None
        ek.soft_dtw(x.requires_grad_(), y, 1.0).sum().backward()

    return x, y, batch * length * length, fwd_bwd


def profile_dtw(backends=("cuda",)):
    """G cells/s of hard DTW, soft forward and soft forward+backward; for the CUDA extension
    the backward both fused (E contracted in the kernel, the default) and through E
    (ETHER_KERNELS_DTW_FUSED_BACKWARD=0), soft with 2 rows per thread
    (ETHER_KERNELS_DTW_SOFT_ROWS=2: twice the warps per pair), then the GPU time of the fused
    fwd+bwd by kernel."""
    import os
    torch.manual_seed(0)
    print(f"\n== DTW: {', '.join(backends)} (fp32, D = 4)")
    for batch, length in ((256, 512), (64, 1024), (32, 4096)):
        x, y, cells, fwd_bwd = _soft_dtw_case(batch, length)

        for backend in backends:
            cases = [("hard", lambda: ek.dtw(x.detach(), y)),
                     ("soft fwd", lambda: ek.soft_dtw(x.detach(), y, 1.0)),
                     ("soft fwd+bwd", fwd_bwd)]
            if backend == "cuda":
                cases += [("soft fwd+bwd via E", fwd_bwd), ("soft fwd 2 rows", cases[1][1]),
                          ("soft fwd+bwd 2 rows", fwd_bwd)]
            for name, fn in cases:
                os.environ["ETHER_KERNELS_DTW_FUSED_BACKWARD"] = "0" if "via E" in name else "1"
                os.environ["ETHER_KERNELS_DTW_SOFT_ROWS"] = "2" if "2 rows" in name else "4"
                try:
                    with ek.use_backend(backend):
                        ms = cuda_ms(fn, repeats=5 if length > 1024 else 10, warmup=2)
                    print(f"  {batch}x{length}^2 {backend:6s} {name:19s} {ms:8.3f} ms "
                          f"{cells / ms / 1e6:7.1f} G cells/s")
                except Exception as error:  # report and go on: this is a probe
                    print(f"  {batch}x{length}^2 {backend:6s} {name:19s} failed: {error!r}"[:300])
        os.environ.pop("ETHER_KERNELS_DTW_FUSED_BACKWARD", None)
        os.environ.pop("ETHER_KERNELS_DTW_SOFT_ROWS", None)
        if length == 512 and "cuda" in backends:
            for fused in ("1", "0"):
                os.environ["ETHER_KERNELS_DTW_FUSED_BACKWARD"] = fused
                with ek.use_backend("cuda"), profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fwd_bwd()
                    torch.cuda.synchronize()
                print(f"  soft fwd+bwd {batch}x{length}^2, fused={fused}: GPU time per call:")
                events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
                for e in events[:8]:
                    if e.self_device_time_total > 0:
                        print(f"    {e.self_device_time_total / 3:9.1f} us  x{e.count // 3:2d}  "
                              f"{e.key[:80]}")
            os.environ.pop("ETHER_KERNELS_DTW_FUSED_BACKWARD", None)


def sweep_soft_dtw_rows():
    """Soft-DTW (fp32, D = 4, CUDA extension) forward and forward+backward in G cells/s at
    bench_dtw.py's GPU shapes, with 4 rows per thread (the default) and 2
    (ETHER_KERNELS_DTW_SOFT_ROWS=2: twice the warps per pair), then the GPU time of the
    forward and backward kernels at 256 x 512^2."""
    import os
    torch.manual_seed(0)
    print("\n== soft-DTW rows per thread: cuda (fp32, D = 4)")
    for batch, length in ((256, 512), (1024, 512), (128, 1024), (512, 1024), (128, 2048),
                          (64, 4096), (128, 4096)):
        x, y, cells, fwd_bwd = _soft_dtw_case(batch, length)

        for rows in ("4", "2"):
            os.environ["ETHER_KERNELS_DTW_SOFT_ROWS"] = rows
            label = f"rows {rows}"
            for name, fn in (("fwd", lambda: ek.soft_dtw(x.detach(), y, 1.0)),
                             ("fwd+bwd", fwd_bwd)):
                with ek.use_backend("cuda"):
                    ms = cuda_ms(fn, repeats=5 if length > 1024 else 10, warmup=2)
                print(f"  {batch:5d}x{length}^2 {label:13s} {name:8s} {ms:8.3f} ms "
                      f"{cells / ms / 1e6:7.1f} G cells/s", flush=True)
        if length == 512 and batch == 256:
            os.environ["ETHER_KERNELS_DTW_SOFT_ROWS"] = "4"
            with ek.use_backend("cuda"), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fwd_bwd()
                torch.cuda.synchronize()
            events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
            for e in events[:3]:
                print(f"    {e.self_device_time_total / 3:9.1f} us  {e.key[:70]}")
        os.environ.pop("ETHER_KERNELS_DTW_SOFT_ROWS", None)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    parts = sys.argv[1:] or ["amss", "dtw"]
    if "amss" in parts:
        profile_amss()
        sweep_amss_passes()
    if "dtw" in parts:
        profile_dtw()
    if "dtw-soft" in parts:
        sweep_soft_dtw_rows()
    if "dtw-triton" in parts:  # the Triton fallback as well (slow: ~10x the CUDA kernels)
        profile_dtw(("cuda", "triton"))
