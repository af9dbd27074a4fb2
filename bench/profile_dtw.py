"""Where the time of a CUDA soft-DTW forward+backward goes: the torch.profiler kernel table.

Usage on a GPU machine: python3 bench/profile_dtw.py [pairs] [n] [dim]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import ether_kernels as ek


def main(pairs=256, n=512, dim=4):
    x = torch.randn(pairs, n, dim, device="cuda")
    y = torch.randn(pairs, n, dim, device="cuda")

    def step():
        a = x.clone().requires_grad_(True)
        torch.autograd.grad(ek.soft_dtw(a, y, 1.0).sum(), (a,))
        with torch.no_grad():
            ek.dtw(x, y)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"soft-DTW fwd+bwd and hard DTW, {pairs} x {n} x {n}, D = {dim}, 3 repetitions")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15,
                                      max_name_column_width=60)
    print(table)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
