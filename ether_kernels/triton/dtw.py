"""DTW / soft-DTW in Triton: the fallback for CUDA tensors when the CUDA extension is not
built (CPU tensors under TRITON_INTERPRET=1 in the tests). Semantics: reference/dtw.py.

One program per pair sweeps the anti-diagonals i + j = d in order, BLOCK cells of a
diagonal at a time, with the accumulated cost R in global memory ((B, N + 1, M + 1), the
borders included) and a barrier between diagonals (tl.debug_barrier, __syncthreads: the
writes of diagonal d are visible to the whole program when d + 1 reads them). Simple and
without a length cap, but every cell goes through global memory (L2-resident per pair):
the CUDA C++ wavefront (registers, warp shuffles) is several times faster and runs
whenever the extension is built. The local cost is a (B, N, M) input (the public functions
form it with PyTorch from the series: its gradient flows back through autograd).

Backward (soft): E by the "pull" form of Cuturi & Blondel's Algorithm 2 over the reverse
diagonals: E[i][j] = sum over the successors s of E[s] w_s(i, j), where w_s(i, j) is the
soft-argmin weight of (i, j) among s's three predecessors, recomputed from their R values
(exponents <= 0, no R - cost difference, exactly as the C++ kernels). Backward (hard): a
scalar backtrack of the optimal path per pair (ties: diagonal, then (i - 1, j), then
(i, j - 1)), E = grad on the path. Soft-DTW keeps R in fp64, hard DTW in the cost's dtype.
"""

import torch
import triton
import triton.language as tl

BLOCK = 128  # cells of a diagonal per iteration


@triton.jit
def _band_ok(i, j, n, m, band):
    # -r + min(0, m - n) <= j - i <= r + max(0, m - n), or no band (band < 0)
    lo = -band + tl.minimum(0, m - n)
    hi = band + tl.maximum(0, m - n)
    offset = j - i
    return ((offset * 0 + band) < 0) | ((offset >= lo) & (offset <= hi))  # vector masks


@triton.jit
def _diagonal_rows(d, n, m):
    """The rows i of diagonal i + j = d inside the pair: [i_lo, i_hi]."""
    return tl.maximum(1, d - m), tl.minimum(n, d - 1)


@triton.jit
def _diagonal_cells(start, d, i_hi, n, m, band, BLOCK: tl.constexpr):
    """BLOCK cells (i, j) of diagonal d from row start on, and which of them to compute."""
    i = start + tl.arange(0, BLOCK)
    j = d - i
    return i, j, (i <= i_hi) & _band_ok(i, j, n, m, band)


@triton.jit
def _softmin(a, b, c, gamma, SOFT: tl.constexpr):
    # NaN in, NaN out (dynamic_time_warping.py's NaN convention): a NaN cost makes its pair's
    # value NaN, as in the reference; tl.minimum alone may return the other operand.
    mu = tl.minimum(a, tl.minimum(b, c, propagate_nan=tl.PropagateNan.ALL),
                    propagate_nan=tl.PropagateNan.ALL)
    if SOFT:
        # a finite shift where mu is +inf (no inf - inf); those cells stay +inf below
        shift = tl.where(mu < float("inf"), mu, 0.0)
        s = (tl.exp((shift - a) / gamma) + tl.exp((shift - b) / gamma)
             + tl.exp((shift - c) / gamma))
        finite = mu < float("inf")
        return tl.where(finite, mu - gamma * tl.log(tl.where(finite, s, 1.0)), mu)
    else:
        return mu


@triton.jit
def _forward_kernel(cost_ptr, xl_ptr, yl_ptr, R_ptr, values_ptr, N, M, band, gamma_ptr,
                    SOFT: tl.constexpr, BLOCK: tl.constexpr):
    gamma = tl.load(gamma_ptr)                # in R's dtype (see _gamma_on_device)
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(xl_ptr + b).to(tl.int32)
    m = tl.load(yl_ptr + b).to(tl.int32)
    ld = M + 1
    R = R_ptr + b * (N + 1) * ld              # R[i][j] at i * ld + j; +inf everywhere but
    cost = cost_ptr + b * N * M               # R[0][0] = 0 (set by the host)
    for d in range(2, n + m + 1):
        i_lo, i_hi = _diagonal_rows(d, n, m)
        for start in range(i_lo, i_hi + 1, BLOCK):
            i, j, mask = _diagonal_cells(start, d, i_hi, n, m, band, BLOCK)
            c = tl.load(cost + (i - 1) * M + (j - 1), mask=mask, other=0.0).to(R.dtype.element_ty)
            diag = tl.load(R + (i - 1) * ld + (j - 1), mask=mask, other=float("inf"))
            up = tl.load(R + (i - 1) * ld + j, mask=mask, other=float("inf"))
            left = tl.load(R + i * ld + (j - 1), mask=mask, other=float("inf"))
            tl.store(R + i * ld + j, c + _softmin(diag, up, left, gamma, SOFT), mask=mask)
        tl.debug_barrier()  # diagonal d is written before d + 1 reads it
    tl.store(values_ptr + b, tl.load(R + n * ld + m).to(values_ptr.dtype.element_ty))


@triton.jit
def _weight(R, ld, p, q, self_value, gamma):
    """The soft-argmin weight of self_value (one of the predecessors of (p, q)) among the
    three predecessors of (p, q); 0 where they are all +inf."""
    a = tl.load(R + (p - 1) * ld + (q - 1))
    b = tl.load(R + (p - 1) * ld + q)
    c = tl.load(R + p * ld + (q - 1))
    mu = tl.minimum(a, tl.minimum(b, c))
    shift = tl.where(mu < float("inf"), mu, 0.0)  # no inf - inf where every one is +inf
    s = tl.exp((shift - a) / gamma) + tl.exp((shift - b) / gamma) + tl.exp((shift - c) / gamma)
    reachable = (mu < float("inf")) & (self_value < float("inf"))
    w = tl.exp(tl.minimum((shift - self_value) / gamma, 0.0)) / tl.where(reachable, s, 1.0)
    return tl.where(reachable, w, 0.0)


@triton.jit
def _soft_backward_kernel(grad_ptr, xl_ptr, yl_ptr, R_ptr, E_ptr, N, M, band, gamma_ptr,
                          BLOCK: tl.constexpr):
    gamma = tl.load(gamma_ptr)
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(xl_ptr + b).to(tl.int32)
    m = tl.load(yl_ptr + b).to(tl.int32)
    ld = M + 1
    R = R_ptr + b * (N + 1) * ld
    E = E_ptr + b * (N + 1) * ld              # same layout as R, zero-filled by the host
    tl.store(E + n * ld + m, tl.load(grad_ptr + b).to(E.dtype.element_ty))
    tl.debug_barrier()
    for t in range(0, n + m - 2):
        d = n + m - 1 - t                     # diagonals n + m - 1 down to 2
        i_lo, i_hi = _diagonal_rows(d, n, m)
        for start in range(i_lo, i_hi + 1, BLOCK):
            i, j, mask = _diagonal_cells(start, d, i_hi, n, m, band, BLOCK)
            r = tl.load(R + i * ld + j, mask=mask, other=float("inf"))
            e = tl.zeros((BLOCK,), dtype=E.dtype.element_ty)
            # successor (i + 1, j)
            ok = mask & (i + 1 <= n)
            e += tl.where(ok, tl.load(E + (i + 1) * ld + j, mask=ok, other=0.0) *
                          _weight(R, ld, tl.where(ok, i + 1, 1), tl.where(ok, j, 1), r, gamma),
                          0.0)
            ok = mask & (j + 1 <= m)
            e += tl.where(ok, tl.load(E + i * ld + j + 1, mask=ok, other=0.0) *
                          _weight(R, ld, tl.where(ok, i, 1), tl.where(ok, j + 1, 1), r, gamma),
                          0.0)
            ok = mask & (i + 1 <= n) & (j + 1 <= m)
            e += tl.where(ok, tl.load(E + (i + 1) * ld + j + 1, mask=ok, other=0.0) *
                          _weight(R, ld, tl.where(ok, i + 1, 1), tl.where(ok, j + 1, 1), r,
                                  gamma), 0.0)
            tl.store(E + i * ld + j, tl.where(r < float("inf"), e, 0.0), mask=mask)
        tl.debug_barrier()


@triton.jit
def _hard_backward_kernel(grad_ptr, xl_ptr, yl_ptr, R_ptr, E_ptr, N, M):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(xl_ptr + b).to(tl.int32)
    m = tl.load(yl_ptr + b).to(tl.int32)
    ld = M + 1
    R = R_ptr + b * (N + 1) * ld
    E = E_ptr + b * (N + 1) * ld
    g = tl.load(grad_ptr + b).to(E.dtype.element_ty)
    i = n
    j = m
    tl.store(E + i * ld + j, g)
    while (i > 1) | (j > 1):
        diag = tl.load(R + (i - 1) * ld + (j - 1))
        up = tl.load(R + (i - 1) * ld + j)
        left = tl.load(R + i * ld + (j - 1))
        take_diag = (diag <= up) & (diag <= left)
        take_up = ~take_diag & (up <= left)
        # On the first row or column the only way is left or up (the +inf borders say so,
        # but a NaN R compares false everywhere: without these the walk would leave the
        # pair's grid and write into another pair's E).
        take_up = (take_up | (j == 1)) & (i > 1)
        take_diag = take_diag & (i > 1) & (j > 1)
        i_next = tl.where(take_diag | take_up, i - 1, i)
        j_next = tl.where(take_up, j, j - 1)
        i = i_next
        j = j_next
        tl.store(E + i * ld + j, g)


def _gamma_on_device(gamma, R):
    """gamma as a one-element tensor of R's dtype: a Python float argument reaches a compiled
    Triton kernel as fp32 (0.1 would become 0.100000001); torch.full writes it on the device
    without a host copy."""
    return torch.full((1,), gamma, dtype=R.dtype, device=R.device)


def _contiguous_lengths(x_lengths, y_lengths):
    return x_lengths.contiguous(), y_lengths.contiguous()


@torch.library.custom_op("ether_kernels::dtw_forward_triton", mutates_args=())
def dtw_forward_triton(cost: torch.Tensor, x_lengths: torch.Tensor, y_lengths: torch.Tensor,
                       band: int, gamma: float, soft: bool, keep: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of ether_kernels::dtw_forward; R is kept as (B, N + 1, M + 1)."""
    B, N, M = cost.shape
    dtype = torch.float64 if soft else cost.dtype
    R = torch.full((B, N + 1, M + 1), float("inf"), dtype=dtype, device=cost.device)
    R[:, 0, 0] = 0.0
    values = torch.empty(B, dtype=cost.dtype, device=cost.device)
    xl, yl = _contiguous_lengths(x_lengths, y_lengths)
    if B > 0:
        _forward_kernel[(B,)](cost.contiguous(), xl, yl, R, values, N, M, band,
                              _gamma_on_device(gamma, R),
                              SOFT=soft, BLOCK=BLOCK)
    return values, (R if keep else cost.new_empty((0,)))


@dtw_forward_triton.register_fake
def _(cost, x_lengths, y_lengths, band, gamma, soft, keep):
    B, N, M = cost.shape
    R = cost.new_empty((B, N + 1, M + 1), dtype=torch.float64 if soft else cost.dtype)
    return cost.new_empty(B), (R if keep else cost.new_empty((0,)))


@torch.library.custom_op("ether_kernels::dtw_backward_triton", mutates_args=())
def dtw_backward_triton(grad: torch.Tensor, cost: torch.Tensor, R: torch.Tensor,
                        x_lengths: torch.Tensor, y_lengths: torch.Tensor, band: int,
                        gamma: float, soft: bool) -> torch.Tensor:
    """The Triton twin of ether_kernels::dtw_backward: d value / d cost scaled by grad."""
    B, N, M = cost.shape
    E = torch.zeros((B, N + 1, M + 1), dtype=R.dtype, device=cost.device)
    xl, yl = _contiguous_lengths(x_lengths, y_lengths)
    if B > 0:
        if soft:
            _soft_backward_kernel[(B,)](grad.contiguous(), xl, yl, R, E, N, M, band,
                                        _gamma_on_device(gamma, R),
                                        BLOCK=BLOCK)
        else:
            _hard_backward_kernel[(B,)](grad.contiguous(), xl, yl, R, E, N, M)
    return E[:, 1:, 1:].to(cost.dtype).contiguous()


@dtw_backward_triton.register_fake
def _(grad, cost, R, x_lengths, y_lengths, band, gamma, soft):
    return torch.empty_like(cost)
