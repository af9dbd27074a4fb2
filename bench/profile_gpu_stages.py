"""Where the GPU time of two fused paths goes (run on a GPU machine; prints tables).

1. The AMSS step on two ResNet18 encoders' gradients (40 tensors, 22M fp32): wall time of
   one step (host included, CUDA-synchronised), the GPU time of its kernels by name
   (torch.profiler), and the number of launches, so the selection stage's small torch ops
   can be weighed against the two passes over gradient memory.
2. DTW / soft-DTW on the same inputs through the CUDA extension and the Triton fallback
   (median of CUDA-event timings), in G cells/s.

Usage: python3 bench/profile_gpu_stages.py [amss|dtw]   (both without an argument)
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


def profile_dtw():
    torch.manual_seed(0)
    print("\n== DTW: CUDA extension vs Triton fallback (fp32, D = 4)")
    for batch, length in ((256, 512), (64, 1024)):
        x = torch.randn(batch, length, 4, device="cuda")
        y = torch.randn(batch, length, 4, device="cuda")
        cells = batch * length * length
        for backend in ("cuda", "triton"):
            for name, fn in (
                ("hard", lambda: ek.dtw(x, y)),
                ("soft fwd", lambda: ek.soft_dtw(x, y, 1.0)),
                ("soft fwd+bwd", lambda: ek.soft_dtw(x.requires_grad_(), y, 1.0).sum().backward()),
            ):
                try:
                    with ek.use_backend(backend):
                        ms = cuda_ms(fn, repeats=10, warmup=2)
                    print(f"  {batch}x{length}^2 {backend:6s} {name:13s} {ms:8.3f} ms "
                          f"{cells / ms / 1e6:7.1f} G cells/s")
                except Exception as error:  # report and go on: this is a probe
                    print(f"  {batch}x{length}^2 {backend:6s} {name:13s} failed: {error!r}"[:300])
                x.grad = None


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    parts = sys.argv[1:] or ["amss", "dtw"]
    if "amss" in parts:
        profile_amss()
    if "dtw" in parts:
        profile_dtw()
