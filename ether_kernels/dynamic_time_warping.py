"""Batched DTW and soft-DTW: public API, input normalisation and checks.

Semantics and conventions: specs/dtw.md; the readable version is reference/dtw.py.
Inputs: x (B, N, D) and y (B, M, D), or (N, D) / (N,) for a single pair, and a batch of 1
on one side broadcast against B on the other. fp32 and fp64 (fp16 / bf16 are computed in
fp32). Per-pair lengths, Sakoe-Chiba band (tslearn's sakoe_chiba_radius=r, dtaidistance's
window=r+1), local cost "sqeuclidean" (default), "euclidean" or "l1". Hard DTW returns the
accumulated cost R[n][m] (dtaidistance and tslearn return its square root).

Backends: the C++ CPU kernels compute every local cost in place from x and y (value-only
calls keep O(M) state per pair; 16 equal-length pairs share the lanes of one vector for hard
DTW), and take a precomputed cost in the *_from_cost variants. On CUDA tensors the wavefront
kernels of csrc/cuda/dtw_kernels.cu do the same (one thread block per pair, no length cap;
a batch of 1 broadcast against B is read in place, never copied); without the CUDA
extension, the Triton fallback (triton/dtw.py: a diagonal-by-diagonal sweep through global
memory on a PyTorch-formed cost). Otherwise the reference runs.

NaN convention, every backend: a NaN local cost in any cell a pair may use (within its
lengths and band; from a NaN in x or y there, or inf - inf) makes that pair's value NaN, and
its whole gradient slice (of x, y or cost) NaN, so that a NaN loss is never paired with a
finite, meaningless gradient (which AMP's GradScaler would apply); other pairs are
untouched; a NaN pair masked out of the loss (upstream gradient 0) gets the gradient 0
from the kernels (the reference's autograd gives it 0 * NaN = NaN). dtw_path raises for
such a pair (no optimal path exists). Infinite costs are not NaN: a pair whose every path
crosses +inf has the value +inf. A -inf cost (from a -inf precomputed cost) is outside the
soft kernels' domain (their soft-min subtracts the minimum: -inf - -inf is NaN): the
reference gives -inf there, the kernels NaN.
"""

import math
import numbers
import os
import sys

import torch

from . import _dispatch, _double_backward, _extension
from ._checks import check_choice, check_positive_real, check_tensor
from ._triton_support import triton_import_error
from .reference.dtw import (METRICS, allowed_cells, dtw_from_cost_reference, dtw_path_reference,
                            pairwise_cost)

_OP = "dtw"


# ------------------------------------------------------------------------ argument checks

def _as_batch(series, name, op):
    check_tensor(series, name, op)
    if not (series.is_floating_point()):
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {series.dtype}")
    if series.dim() == 1:
        series = series.view(1, -1, 1)
    elif series.dim() == 2:
        series = series.unsqueeze(0)
    elif series.dim() != 3:
        raise ValueError(f"{op}: {name} must be (B, N, D), (N, D) or (N,), got shape "
                         f"{tuple(series.shape)}")
    if series.shape[1] == 0:
        raise ValueError(f"{op}: {name} is an empty sequence (shape {tuple(series.shape)})")
    if series.shape[2] == 0:
        raise ValueError(f"{op}: {name} has no features (D = 0, shape {tuple(series.shape)})")
    if series.dtype in (torch.float16, torch.bfloat16):
        series = series.float()
    return series


def _lengths(lengths, name, batch, full, device, op):
    if lengths is None:
        return torch.full((batch,), full, dtype=torch.int64, device=device)
    check_tensor(lengths, name, op)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"{op}: {name} must have shape ({batch},), one length per pair, got "
                         f"{tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.int64)
    if batch == 0:
        return lengths
    if torch.compiler.is_compiling():
        # No host read while tracing (its data-dependent branch breaks a fullgraph compile):
        # the check runs on the device with the graph and raises there.
        torch._assert_async(((lengths >= 1) & (lengths <= full)).all(),
                            f"{op}: {name} must lie in [1, {full}]")
        return lengths
    low, high = int(lengths.min()), int(lengths.max())  # a host read: lengths are metadata
    if low < 1 or high > full:
        bad = low if low < 1 else high
        raise ValueError(f"{op}: {name} must lie in [1, {full}], got {bad}")
    return lengths


def _band(band, op):
    if band is None:
        return None
    if isinstance(band, bool) or not isinstance(band, numbers.Integral):
        raise TypeError(f"{op}: band must be an int >= 0 or None, got {type(band).__name__}")
    if band < 0:
        raise ValueError(f"{op}: band must be >= 0 (a Sakoe-Chiba radius), got {band}")
    # any radius >= N + M is no constraint: capped so that it fits the ops' int64
    return min(int(band), 2**62)


# The kernels multiply by 1 / gamma: below the smallest normal double it overflows to +inf
# (and a tie of two predecessors gives 0 * inf = NaN).
MIN_GAMMA = sys.float_info.min


def _gamma(gamma, op):
    """gamma > 0 and finite; a symbolic float under torch.compile stays symbolic (a gamma
    that changes between calls of a fullgraph compile)."""
    gamma = check_positive_real(gamma, "gamma", op)
    if gamma < MIN_GAMMA:
        raise ValueError(f"{op}: gamma must be at least {MIN_GAMMA} (1 / gamma must be "
                         f"finite), got {gamma}")
    return gamma


def _two_batches(x, y, x_name, y_name, op):
    """x and y as (B, N, D) batches of one dtype, device and feature count."""
    x, y = _as_batch(x, x_name, op), _as_batch(y, y_name, op)
    if x.dtype != y.dtype:
        raise TypeError(f"{op}: {x_name} ({x.dtype}) and {y_name} ({y.dtype}) must have the "
                        "same dtype")
    if x.device != y.device:
        raise RuntimeError(f"{op}: {x_name} is on {x.device} but {y_name} is on {y.device}")
    if x.shape[2] != y.shape[2]:
        raise ValueError(f"{op}: {x_name} has {x.shape[2]} features per step but {y_name} has "
                         f"{y.shape[2]}")
    return x, y


def _pairs(x, y, x_lengths, y_lengths, band, metric, op):
    """Normalised (x, y, x_lengths, y_lengths, band) of B pairs; checks every argument."""
    x, y = _two_batches(x, y, "x", "y", op)
    if x.shape[0] != y.shape[0]:
        if x.shape[0] == 1:
            x = x.expand(y.shape[0], -1, -1)
        elif y.shape[0] == 1:
            y = y.expand(x.shape[0], -1, -1)
        else:
            raise ValueError(f"{op}: x has {x.shape[0]} series but y has {y.shape[0]}; they must "
                             "match or one must be 1")
    check_choice(metric, "metric", METRICS, op)
    B = x.shape[0]
    # Padding is never read: zero it before the cost is formed, so that whatever it holds
    # (NaN, inf) can reach neither the values nor, through 0 * NaN, the gradients.
    padded_x, padded_y = x_lengths is not None, y_lengths is not None
    x_lengths = _lengths(x_lengths, "x_lengths", B, x.shape[1], x.device, op)
    y_lengths = _lengths(y_lengths, "y_lengths", B, y.shape[1], x.device, op)
    if padded_x:
        x = _zero_padding(x, x_lengths)
    if padded_y:
        y = _zero_padding(y, y_lengths)
    return x, y, x_lengths, y_lengths, _band(band, op)


def _zero_padding(series, lengths):
    steps = torch.arange(series.shape[1], device=series.device).view(1, -1, 1)
    return torch.where(steps < lengths.view(-1, 1, 1), series, 0.0)


def _cost_pairs(cost, x_lengths, y_lengths, band, op):
    check_tensor(cost, "cost", op)
    if not cost.is_floating_point():
        raise TypeError(f"{op}: cost must be a floating-point tensor, got {cost.dtype}")
    if cost.dim() == 2:
        cost = cost.unsqueeze(0)
    if cost.dim() != 3 or cost.shape[1] == 0 or cost.shape[2] == 0:
        raise ValueError(f"{op}: cost must be a non-empty (B, N, M) tensor, got shape "
                         f"{tuple(cost.shape)}")
    if cost.dtype in (torch.float16, torch.bfloat16):
        cost = cost.float()
    B, N, M = cost.shape
    x_lengths = _lengths(x_lengths, "x_lengths", B, N, cost.device, op)
    y_lengths = _lengths(y_lengths, "y_lengths", B, M, cost.device, op)
    return cost, x_lengths, y_lengths, _band(band, op)


# --------------------------------------------------------------------------- NaN pairs

def _nan_pairs_gradient(grad, nan_pairs, grad_values):
    """grad (B, ...) with the slices of the NaN pairs (nan_pairs: (B,) bool, saved by the
    forward) set to NaN where the upstream gradient of the pair is not 0 (the NaN convention
    above), for the kernels' backward, which may push nothing through NaN. A NaN pair that
    the loss masks out (torch.where(values.isnan(), 0, values), upstream 0) gets the
    gradient 0: masking NaN pairs out of a loss leaves a finite gradient."""
    if grad is None:
        return None
    shape = (-1,) + (1,) * (grad.dim() - 1)
    nan, zero = grad.new_full((), math.nan), grad.new_zeros(())
    nan_or_zero = torch.where((grad_values != 0).view(shape), nan, zero)
    return torch.where(nan_pairs.view(shape), nan_or_zero, grad)


def _with_nan_pair_gradients(values, inputs):
    """The reference's values, with the NaN convention's gradient: autograd through the
    recurrence leaves a NaN pair's gradient partly finite (torch.where routes zeros past
    NaN). For a NaN pair this adds NaN * sum(input slice), whose gradient is NaN in every
    element; for the others the term is never selected and passes an exact 0. Plain torch
    ops: forward AD, torch.func and torch.compile take it as they take the reference.
    Unlike the kernels' backward, a NaN pair masked out of the loss still gets NaN here
    (0 * NaN): the reference is the readable oracle, not a place for special cases.
    Under forward AD or a torch.func transform the inputs carry tangents, not
    requires_grad: every input takes part then."""
    nan_pairs = values.isnan()
    scale = torch.where(nan_pairs, values.detach(), 0.0)  # NaN there, else 0 (values' dtype)
    every_input = not torch.compiler.is_compiling() and _dispatch.transformed()
    total = sum(t.flatten(1).sum(1) for t in inputs if every_input or t.requires_grad)
    if isinstance(total, int):  # nothing requires grad
        return values
    return torch.where(nan_pairs, values + scale * total, values)


# ------------------------------------------------------------------------------- kernels

def _run(cost, x_lengths, y_lengths, band, gamma):
    """Hard (gamma None) or soft DTW of every pair of a checked (B, N, M) cost."""
    backend = _dispatch.select(_OP, cost.device, cpu_backends=_CPU_BACKENDS,
                               gpu_backends=_GPU_BACKENDS)
    if backend == "reference":
        return _with_nan_pair_gradients(
            dtw_from_cost_reference(cost, x_lengths, y_lengths, band, gamma), (cost,))
    forward = (torch.ops.ether_kernels.dtw_forward_triton if backend == "triton" else
               torch.ops.ether_kernels.dtw_forward)
    values, _ = forward(
        cost.contiguous(), x_lengths, y_lengths, -1 if band is None else band,
        1.0 if gamma is None else gamma, gamma is not None,
        torch.is_grad_enabled() and cost.requires_grad)
    return values


_METRIC_CODES = {"sqeuclidean": 0, "euclidean": 1, "l1": 2}


# CPU soft-DTW with a gradient keeps 8 bytes per cell of every pair for its backward; beyond
# this many cells per pair (64 MiB of kept state) it keeps checkpoint rows instead and the
# backward recomputes the rows in between (one more forward pass; memory O(sqrt(N) M)).
CPU_CHECKPOINT_CELLS = 1 << 23


def cpu_checkpoint_rows(N, M):
    """Rows between the checkpoints of the C++ soft-DTW forward for pairs of N rows (the
    longer side) and M columns: 0 (keep everything) up to CPU_CHECKPOINT_CELLS cells, else
    ~sqrt(N) rounded up to a multiple of 4 (the kernels' block of rows), which balances the
    checkpoints (N / S rows per pair) against one recomputed segment (S rows per worker).
    Skinny pairs (fewer than 256 columns) keep everything: their grid is no larger than the
    lanes' copies of the long series the checkpointed kernels make (8 lanes of x, of its
    gradient), and their short rows are all overhead there."""
    if N * M <= CPU_CHECKPOINT_CELLS or min(N, M) < 256:
        return 0
    return _segment_rows(N)


def _segment_rows(N):
    """~sqrt(N) rounded up to a multiple of 4 (see cpu_checkpoint_rows)."""
    root = math.isqrt(N - 1) + 1  # ceil(sqrt(N))
    return max(4, -(-root // 4) * 4)


# The C++ soft-DTW runs a batch of up to this many pairs pair by pair, each in strips of
# rows swept along anti-diagonals in the lanes of a vector (soft_strips_forward in
# csrc/cpu/kernels/dtw_kernel.cpp), not in a lane group of 8, which costs 8 pairs' work
# whatever its lanes hold: (one thread, two or more) per arithmetic dtype (fp16 / bf16
# inputs compute in fp32). Measured on 2 threads (Xeon, D = 4, fwd+bwd, best of 12, the same
# process): fp32 5 pairs of 1024^2 in lane groups 23.9 ms, in strips 21.0; 6 pairs 26.5 /
# 23.7; 7 pairs 26.4 / 28.6 (512^2: 5 pairs 6.75 / 5.79, 6 pairs 7.15 / 6.54, 7 pairs
# 7.15 / 8.16); the forward alone 8.9 / 6.8 ms (5 pairs), 9.7 / 6.3 (6). fp64, whose lane
# groups use the precise exp / log: 5 pairs of 1024^2 105 / 39 ms, 8 pairs 105 / 76 (512^2:
# 8 pairs 27.1 / 17.9, 10 pairs 32.1 / 25.8, 12 pairs 31.9 / 30.4, 16 pairs 32.5 / 40.6).
# On one thread a strip costs ~2x a full group per cell (512^2 fwd+bwd, fp32: 5 pairs 8.7
# / 10.2 ms, 6 pairs 8.8 / 12.0; fp64 8 pairs 27.3 / 36.0): 4 pairs, where a group would
# be half empty. The C++ checkpointed ops take strips for up to 6 / 8 pairs (their
# soft_strips_max_pairs, whatever the threads: a forward and its backward must agree), so
# a batch of 5 to 8 long pairs on one thread may still run in strips there. A batch whose
# padded N M is below CPU_SOFT_STRIP_MIN_CELLS (its kStripsMinCells) is filled into a lane
# group as before; in the value op a pair of fewer cells (by its own lengths) runs scalar.
CPU_SOFT_STRIP_PAIRS = {torch.float32: (4, 6), torch.float64: (4, 8)}
CPU_SOFT_STRIP_MIN_CELLS = 4096


@torch.compiler.assume_constant_result
def _torch_threads():
    # torch.compile cannot trace torch.get_num_threads (an int from a torch.* call breaks a
    # fullgraph compile): a compiled graph keeps the count it was traced with. Only the
    # choice of strips or lane groups hangs on it, a matter of speed: both are exact.
    return torch.get_num_threads()


def cpu_soft_strip_pairs(dtype):
    """The most pairs of this (fp32 or fp64) dtype a C++ soft-DTW call runs in strips, for
    the current torch thread count (see CPU_SOFT_STRIP_PAIRS)."""
    one_thread, threaded = CPU_SOFT_STRIP_PAIRS[dtype]
    return one_thread if _torch_threads() == 1 else threaded


def _runs_in_strips(B, N, M, dtype):
    return 1 <= B <= cpu_soft_strip_pairs(dtype) and N * M >= CPU_SOFT_STRIP_MIN_CELLS


def _strip_segment_rows(N):
    """~sqrt(N) rounded up to a multiple of 8 (the strips' rows in AVX-512; AVX2 and the
    portable x86 build run 4, NEON 2): the rows between the strips' checkpoints."""
    root = math.isqrt(N - 1) + 1  # ceil(sqrt(N))
    return max(8, -(-root // 8) * 8)


def _run_series(x, y, x_lengths, y_lengths, band, gamma, metric):
    """Hard or soft DTW of every pair of checked series: the C++ kernels form each local cost
    in place from x and y; the reference forms the (B, N, M) cost with PyTorch."""
    backend = _dispatch.select(_OP, x.device, cpu_backends=_CPU_BACKENDS,
                               gpu_backends=_GPU_BACKENDS)
    if backend == "reference":
        return _with_nan_pair_gradients(
            dtw_from_cost_reference(pairwise_cost(x, y, metric), x_lengths, y_lengths, band,
                                    gamma), (x, y))
    if backend == "triton":  # the cost formed by PyTorch (autograd takes it back to x, y)
        return _run(pairwise_cost(x, y, metric), x_lengths, y_lengths, band, gamma)
    keep = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    # Long pairs: bounded memory (cpu_checkpoint_rows), checkpoints along the longer side.
    # soft-DTW is symmetric (the metrics are, and so is the band: tslearn's convention), so
    # sdtw(x, y) = sdtw(y, x) and autograd takes the gradients back to x and y either way.
    N, M = x.shape[1], y.shape[1]
    strips = (backend == "cpp" and gamma is not None
              and _runs_in_strips(x.shape[0], N, M, x.dtype))
    rows = cpu_checkpoint_rows(max(N, M), min(N, M)) if backend == "cpp" else 0
    if strips and keep:
        # A few pairs (cpu_soft_strip_pairs): each swept alone in strips of rows (the C++
        # checkpointed ops run them so for segments of whole strips), not in a lane group.
        rows = _strip_segment_rows(max(N, M))
    elif backend == "cpp" and keep and gamma is not None and rows == 0 and \
            _lane_fill(x.shape[0], N, M, keep) is None and \
            (x.dtype != torch.float64 or x.shape[0] >= 3):
        # (Since the strips above take 1 to 4 pairs of 4096 cells or more, this is reached
        # only where CPU_CHECKPOINT_CELLS is lowered, as a test does, or CPU_SOFT_STRIP_PAIRS.)
        # 1 to 3 long pairs, too long to fill up to 8 (their kept state would grow 8-fold):
        # the checkpointed kernels run them in strips where S is a multiple of the lanes,
        # else as one partial lane group (its spare lanes repeat a pair; their state is per
        # pair), not one by one on the scalar path (~16x slower per cell). fp32, 2 threads, D = 4, fwd+bwd: 1 pair of 2000^2 246 -> 112 ms,
        # 3 pairs of 1500^2 293 -> 69 ms. In fp64 the lanes' exp / log are the precise ones:
        # 3 pairs 278 -> 206 ms, but 1 pair 248 -> 399 ms, so one or two stay scalar.
        rows = _segment_rows(max(N, M))
    if keep and gamma is not None and rows > 0:
        long_x = N >= M
        first, second = (x, y) if long_x else (y, x)
        first_lengths, second_lengths = (x_lengths, y_lengths) if long_x else (y_lengths,
                                                                              x_lengths)
        values, _ = torch.ops.ether_kernels.dtw_xy_soft_forward_checkpointed(
            first, second, first_lengths, second_lengths, _METRIC_CODES[metric],
            -1 if band is None else band, gamma, rows)
        return values
    B = x.shape[0]
    if backend == "cpp" and gamma is not None and not strips:
        x, y, x_lengths, y_lengths = _fill_lane_groups(x, y, x_lengths, y_lengths, keep)
    # Both C++ ops read a broadcast (stride-0) batch in place: cdist_dtw copies nothing.
    values, _ = torch.ops.ether_kernels.dtw_xy_forward(
        x, y, x_lengths, y_lengths, _METRIC_CODES[metric],
        -1 if band is None else band, 1.0 if gamma is None else gamma, gamma is not None, keep)
    return values if values.shape[0] == B else values[:B]


# Pairs per vector group of the C++ soft-DTW lanes: 8 doubles in AVX-512 (AVX2 and the
# portable build run 4, which divides it).
CPU_LANE_GROUP = 8


def _lane_fill(B, N, M, keep):
    """The empty pairs _fill_lane_groups adds: 0 for a multiple of 8, None where it would
    not fill (a kept state more than doubled, by more than CPU_CHECKPOINT_CELLS cells)."""
    fill = -B % CPU_LANE_GROUP
    if keep and fill > B and fill * N * M > CPU_CHECKPOINT_CELLS:
        return None
    return fill


def _fill_lane_groups(x, y, x_lengths, y_lengths, keep):
    """The C++ soft-DTW runs pairs 8 at a time in the lanes of a vector; the B mod 8 pairs
    left over ran one by one on the scalar path, ~16x slower per cell (64 x 256^2, D = 4,
    forward+backward: 7 pairs took 36 ms, 8 pairs 2.8 ms). The batch is filled up to a
    multiple of 8 with empty pairs: zeros of length 1, which cost nothing, since a group
    runs on the grid of its longest pair and the lanes put the shortest pairs together
    (LaneGroups). Their values and (through torch.cat) their gradients are dropped. Not
    when a kept state for the backward would grow by more than the real pairs' own and by
    more than CPU_CHECKPOINT_CELLS cells (a few long pairs): those run checkpointed."""
    fill = _lane_fill(x.shape[0], x.shape[1], y.shape[1], keep)
    if not fill:
        return x, y, x_lengths, y_lengths

    def filled(t, value):
        return torch.cat([t, t.new_full((fill,) + tuple(t.shape[1:]), value)])
    return filled(x, 0), filled(y, 0), filled(x_lengths, 1), filled(y_lengths, 1)


# ---------------------------------------------------------------------------- public API

def dtw(x, y, *, band=None, x_lengths=None, y_lengths=None, metric="sqeuclidean"):
    """Hard DTW of every pair: the accumulated local cost of the best path, shape (B,)."""
    x, y, x_lengths, y_lengths, band = _pairs(x, y, x_lengths, y_lengths, band, metric, "dtw")
    return _run_series(x, y, x_lengths, y_lengths, band, None, metric)


def soft_dtw(x, y, gamma=1.0, *, band=None, x_lengths=None, y_lengths=None, metric="sqeuclidean"):
    """Soft-DTW (Cuturi & Blondel 2017) of every pair, shape (B,); differentiable in x and y."""
    gamma = _gamma(gamma, "soft_dtw")
    x, y, x_lengths, y_lengths, band = _pairs(x, y, x_lengths, y_lengths, band, metric, "soft_dtw")
    return _run_series(x, y, x_lengths, y_lengths, band, gamma, metric)


def soft_dtw_divergence(x, y, gamma=1.0, *, band=None, x_lengths=None, y_lengths=None,
                        metric="sqeuclidean"):
    """sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2 (Blondel et al. 2021): >= 0, 0 when x == y."""
    op = "soft_dtw_divergence"
    gamma = _gamma(gamma, op)
    x, y, x_lengths, y_lengths, band = _pairs(x, y, x_lengths, y_lengths, band, metric, op)
    xy = _run_series(x, y, x_lengths, y_lengths, band, gamma, metric)
    xx = _run_series(x, x, x_lengths, x_lengths, band, gamma, metric)
    yy = _run_series(y, y, y_lengths, y_lengths, band, gamma, metric)
    return xy - 0.5 * (xx + yy)


def dtw_from_cost(cost, *, band=None, x_lengths=None, y_lengths=None):
    """Hard DTW of every pair from a precomputed (B, N, M) local cost."""
    cost, x_lengths, y_lengths, band = _cost_pairs(cost, x_lengths, y_lengths, band, "dtw_from_cost")
    return _run(cost, x_lengths, y_lengths, band, None)


def soft_dtw_from_cost(cost, gamma=1.0, *, band=None, x_lengths=None, y_lengths=None):
    """Soft-DTW of every pair from a precomputed (B, N, M) cost; differentiable in it."""
    gamma = _gamma(gamma, "soft_dtw_from_cost")
    cost, x_lengths, y_lengths, band = _cost_pairs(cost, x_lengths, y_lengths, band,
                                                   "soft_dtw_from_cost")
    return _run(cost, x_lengths, y_lengths, band, gamma)


def soft_dtw_alignment(x, y, gamma=1.0, *, band=None, x_lengths=None, y_lengths=None,
                       metric="sqeuclidean"):
    """The expected alignment E = d soft_dtw / d cost of every pair, shape (B, N, M)."""
    gamma = _gamma(gamma, "soft_dtw_alignment")
    x, y, x_lengths, y_lengths, band = _pairs(x, y, x_lengths, y_lengths, band, metric,
                                              "soft_dtw_alignment")
    # E is a gradient: autograd runs here even under no_grad or inference_mode (evaluation),
    # on clones of inference tensors (which a backward may not save).
    with torch.inference_mode(False), torch.enable_grad():
        x, y, x_lengths, y_lengths = (t.clone() if t.is_inference() else t
                                      for t in (x.detach(), y.detach(), x_lengths, y_lengths))
        cost = pairwise_cost(x, y, metric).requires_grad_(True)
        values = _run(cost, x_lengths, y_lengths, band, gamma)
        (alignment,) = torch.autograd.grad(values.sum(), (cost,))
    return alignment


def dtw_path(x, y, *, band=None, x_lengths=None, y_lengths=None, metric="sqeuclidean",
             return_matrix=False):
    """The optimal alignment path of every pair.

    Returns a list of (L_b, 2) int64 tensors of 0-based (i, j) index pairs from (0, 0) to
    (n_b - 1, m_b - 1); with return_matrix=True, the (B, N, M) 0/1 path matrices instead.
    Ties prefer the diagonal step, then advancing x, then advancing y. The C++ and CUDA
    backends read the path off their hard-DTW backward (one pass, no Python loop).
    """
    if not isinstance(return_matrix, bool):
        raise TypeError(f"dtw_path: return_matrix must be a bool, got "
                        f"{type(return_matrix).__name__}")
    x, y, x_lengths, y_lengths, band = _pairs(x, y, x_lengths, y_lengths, band, metric, "dtw_path")
    with torch.no_grad():
        cost = pairwise_cost(x.detach(), y.detach(), metric)
        _check_no_nan_cost(cost, x_lengths, y_lengths, band)
        backend = _dispatch.select(_OP, cost.device, cpu_backends=_CPU_BACKENDS,
                                   gpu_backends=_GPU_BACKENDS)
        if backend == "reference":
            paths = dtw_path_reference(cost, x_lengths, y_lengths, band)
            matrix = None
        else:
            # The C++ / CUDA hard backward with an upstream gradient of 1 is the optimal
            # path's 0/1 indicator (same tie rule as the reference).
            cost = cost.contiguous()
            code = -1 if band is None else band
            ops = torch.ops.ether_kernels
            forward, backward = ((ops.dtw_forward_triton, ops.dtw_backward_triton)
                                 if backend == "triton" else (ops.dtw_forward, ops.dtw_backward))
            values, R = forward(cost, x_lengths, y_lengths, code, 1.0, False, True)
            matrix = backward(torch.ones_like(values), cost, R, x_lengths, y_lengths, code, 1.0,
                              False)
            # a monotone path in row-major order is the path in order
            paths = None if return_matrix else [torch.nonzero(m != 0) for m in matrix]
    if not return_matrix:
        return paths
    if matrix is None:
        matrix = torch.zeros(x.shape[0], x.shape[1], y.shape[1], dtype=x.dtype, device=x.device)
        for b, path in enumerate(paths):
            matrix[b, path[:, 0], path[:, 1]] = 1
    return (matrix != 0).to(x.dtype)


def _check_no_nan_cost(cost, x_lengths, y_lengths, band):
    """dtw_path: a pair with a NaN cost in a cell it may use has no optimal path (a host
    read, as the paths themselves are)."""
    nan_pairs = (cost.isnan() & allowed_cells(x_lengths, y_lengths, cost.shape[1],
                                              cost.shape[2], band)).flatten(1).any(1)
    if bool(nan_pairs.any()):
        pairs = nan_pairs.nonzero().flatten().tolist()
        raise ValueError(f"dtw_path: the local cost of pair(s) {pairs[:8]} is NaN in a cell "
                         "the path may use (NaN in x or y within the lengths, or inf - inf): "
                         "no optimal path exists")


def cdist_dtw(X, Y, *, band=None, metric="sqeuclidean"):
    """(P, Q) hard DTW between every series of X (P, N, D) and every series of Y (Q, M, D).
    An (N, D) or (N,) tensor is one series, as everywhere in this module (so P univariate
    series of length N are passed as (P, N, 1), not (P, N)).

    Each row is computed against all of Y at once with X[p] broadcast: a stride-0 view the
    C++ and CUDA kernels read in place, so the inputs are never copied (the reference backend
    forms one (Q, N, M) cost at a time).
    """
    op = "cdist_dtw"
    X, Y = _two_batches(X, Y, "X", "Y", op)  # (N, D) / (N,): one series
    check_choice(metric, "metric", METRICS, op)
    band = _band(band, op)
    P, Q = X.shape[0], Y.shape[0]
    if P == 0 or Q == 0:
        return X.new_zeros((P, Q))
    x_lengths = torch.full((Q,), X.shape[1], dtype=torch.int64, device=X.device)
    y_lengths = torch.full((Q,), Y.shape[1], dtype=torch.int64, device=X.device)
    rows = [_run_series(X[p:p + 1].expand(Q, -1, -1), Y, x_lengths, y_lengths, band, None,
                        metric) for p in range(P)]
    return torch.stack(rows)


class SoftDTWLoss(torch.nn.Module):
    """Soft-DTW (or, with normalize=True, the soft-DTW divergence) as a loss over a batch."""

    def __init__(self, gamma=1.0, normalize=False, band=None, reduction="mean",
                 metric="sqeuclidean"):
        super().__init__()
        self.gamma = _gamma(gamma, "SoftDTWLoss")
        self.band = _band(band, "SoftDTWLoss")
        check_choice(reduction, "reduction", ("mean", "sum", "none"), "SoftDTWLoss")
        check_choice(metric, "metric", METRICS, "SoftDTWLoss")
        if not isinstance(normalize, bool):
            raise TypeError(f"SoftDTWLoss: normalize must be a bool, got {type(normalize).__name__}")
        self.normalize, self.reduction, self.metric = normalize, reduction, metric

    def forward(self, x, y, x_lengths=None, y_lengths=None):
        fn = soft_dtw_divergence if self.normalize else soft_dtw
        values = fn(x, y, self.gamma, band=self.band, x_lengths=x_lengths, y_lengths=y_lengths,
                    metric=self.metric)
        if self.reduction == "mean":
            return values.mean()
        return values.sum() if self.reduction == "sum" else values

    def extra_repr(self):
        return (f"gamma={self.gamma}, normalize={self.normalize}, band={self.band}, "
                f"reduction={self.reduction!r}, metric={self.metric!r}")


# ---- registration of the C++ ops: fake kernels and autograd --------------------------------

def _cuda_threads_per_pair():
    """csrc/cuda/dtw_cuda.cpp's threads per pair: ETHER_KERNELS_DTW_THREADS or 512."""
    value = os.environ.get("ETHER_KERNELS_DTW_THREADS", "").strip()
    return int(value) if value else 512


def _cuda_soft_rows():
    """csrc/cuda/dtw_cuda.cpp's rows per thread for soft-DTW: ETHER_KERNELS_DTW_SOFT_ROWS or 4."""
    value = os.environ.get("ETHER_KERNELS_DTW_SOFT_ROWS", "").strip()
    return int(value) if value in ("2", "4") else 4


def cuda_kept_per_pair(N, M, soft, D=None):
    """Elements of the CUDA kernels' kept R per pair (dtw_kept_per_pair in
    csrc/cuda/kernels_cuda.h): ceil(N / (T K)) (M + T - 1) T K for K rows per thread
    (soft: 4, or 2 with ETHER_KERNELS_DTW_SOFT_ROWS=2; hard: 16 on a precomputed cost (D
    None) or D = 1, else 8) and T = min(cap, 32 ceil(N / (32 K))) threads."""
    K = _cuda_soft_rows() if soft else (16 if D is None or D == 1 else 8)
    cap = _cuda_threads_per_pair() // 32 * 32
    threads = torch.sym_min(torch.sym_max(-(-(-(-N // K)) // 32) * 32, 32), cap)
    rows = threads * K
    return (-(-N // rows)) * (M + threads - 1) * rows


def _kept_R(like, B, N, M, soft, D=None):
    """An empty tensor shaped like the kept R of the backend `like` lives on.

    CPU: (B, N, M); CUDA: (B, L) in the kernels' coalesced layout, L = cuda_kept_per_pair.
    Float64 for soft-DTW whatever the dtype (the backward's weights need it at small gamma;
    on CUDA an fp32 forward keeps in each 8-byte element the cell's two fp32 soft-argmin
    weights instead of its R: kernels_cuda.h), else the dtype.
    """
    if like.device.type != "cuda":  # soft-DTW keeps R in float64 on the CPU as well
        return like.new_empty((B, N, M), dtype=torch.float64 if soft else like.dtype)
    kept = cuda_kept_per_pair(N, M, soft, D)
    return like.new_empty((B, kept), dtype=torch.float64 if soft else like.dtype)


def _forward_fake(cost, x_lengths, y_lengths, band, gamma, soft, keep):
    torch._check(cost.dim() == 3)
    B, N, M = cost.shape
    R = _kept_R(cost, B, N, M, soft) if keep else cost.new_empty((0,))
    return cost.new_empty(B), R


def _backward_fake(grad, cost, R, x_lengths, y_lengths, band, gamma, soft):
    return torch.empty_like(cost)


def _setup_context(ctx, inputs, output):
    cost, x_lengths, y_lengths, band, gamma, soft, keep = inputs
    values, R = output
    ctx.mark_non_differentiable(R)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cost, R, x_lengths, y_lengths, values.isnan())
    ctx.options = (band, gamma, soft, keep)


def _make_backward(backward_op):
    def backward(ctx, grad_values, _grad_R):
        band, gamma, soft, keep = ctx.options
        if grad_values is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        if not keep:
            raise RuntimeError("dtw_forward was called without keep=True, so it kept no "
                               "accumulated cost for the backward")
        cost, R, x_lengths, y_lengths, nan_pairs = ctx.saved_tensors
        if _double_backward.wants_graph():  # create_graph=True: through the reference
            (grad_cost,) = _double_backward.reference_gradients(
                lambda: dtw_from_cost_reference(cost, x_lengths, y_lengths,
                                                None if band < 0 else band,
                                                gamma if soft else None),
                (cost,), grad_values)
        else:
            grad_cost = backward_op(grad_values.contiguous(), cost, R, x_lengths, y_lengths,
                                    band, gamma, soft)
        return ((_nan_pairs_gradient(grad_cost, nan_pairs, grad_values),)
                + (None,) * 6)
    return backward


def _series_reference_gradients(x, y, x_lengths, y_lengths, metric, band, gamma, need_x, need_y,
                                grad_values):
    """The series ops' gradients for a second derivative (ether_kernels/_double_backward.py):
    the reference DTW (gamma None) or soft-DTW from the op's arguments (metric code, band -1
    for none); None for a gradient not needed."""
    metric_name = next(name for name, code in _METRIC_CODES.items() if code == metric)
    x_in, y_in = _double_backward.distinct_nodes(x, y)
    wanted = [t for t, need in ((x_in, need_x), (y_in, need_y)) if need]
    grads = iter(_double_backward.reference_gradients(
        lambda: dtw_from_cost_reference(pairwise_cost(x_in, y_in, metric_name), x_lengths,
                                        y_lengths, None if band < 0 else band, gamma),
        wanted, grad_values))
    return next(grads) if need_x else None, next(grads) if need_y else None


def _checkpointed_forward_fake(x, y, x_lengths, y_lengths, metric, band, gamma, rows):
    torch._check(x.dim() == 3 and y.dim() == 3)
    checkpoints = -(-x.shape[1] // rows)
    return (x.new_empty(x.shape[0]),
            x.new_empty((x.shape[0], checkpoints, y.shape[1] + 1), dtype=torch.float64))


def _checkpointed_setup_context(ctx, inputs, output):
    x, y, x_lengths, y_lengths, metric, band, gamma, rows = inputs
    values, kept = output
    ctx.mark_non_differentiable(kept)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, y, kept, x_lengths, y_lengths, values.isnan())
    ctx.options = (metric, band, gamma, rows)


def _checkpointed_backward(ctx, grad_values, _grad_kept):
    metric, band, gamma, rows = ctx.options
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_values is None or not (need_x or need_y):
        return (None,) * 8
    x, y, kept, x_lengths, y_lengths, nan_pairs = ctx.saved_tensors
    if _double_backward.wants_graph():  # create_graph=True: through the reference
        grad_x, grad_y = _series_reference_gradients(x, y, x_lengths, y_lengths, metric, band,
                                                     gamma, need_x, need_y, grad_values)
    else:
        grad_x, grad_y = torch.ops.ether_kernels.dtw_xy_soft_backward_checkpointed(
            grad_values.contiguous(), x, y, kept, x_lengths, y_lengths, metric, band, gamma,
            rows, need_x, need_y)
    return (_nan_pairs_gradient(grad_x, nan_pairs, grad_values) if need_x else None,
            _nan_pairs_gradient(grad_y, nan_pairs, grad_values) if need_y else None,
            None, None, None, None, None, None)


def _xy_forward_fake(x, y, x_lengths, y_lengths, metric, band, gamma, soft, keep):
    torch._check(x.dim() == 3 and y.dim() == 3)
    R = (_kept_R(x, x.shape[0], x.shape[1], y.shape[1], soft, x.shape[2]) if keep
         else x.new_empty((0,)))
    return x.new_empty(x.shape[0]), R


def _xy_backward_fake(grad, x, y, R, x_lengths, y_lengths, metric, band, gamma, soft, need_x,
                      need_y):
    return x.new_empty(x.shape if need_x else (0,)), y.new_empty(y.shape if need_y else (0,))


def _xy_backward_fake_checkpointed(grad, x, y, kept, x_lengths, y_lengths, metric, band, gamma,
                                   rows, need_x, need_y):
    return _xy_backward_fake(grad, x, y, kept, x_lengths, y_lengths, metric, band, gamma, True,
                             need_x, need_y)


def _xy_setup_context(ctx, inputs, output):
    x, y, x_lengths, y_lengths, metric, band, gamma, soft, keep = inputs
    values, R = output
    ctx.mark_non_differentiable(R)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, y, R, x_lengths, y_lengths, values.isnan())
    ctx.options = (metric, band, gamma, soft, keep)


def _xy_backward(ctx, grad_values, _grad_R):
    metric, band, gamma, soft, keep = ctx.options
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_values is None or not (need_x or need_y):
        return (None,) * 9
    if not keep:
        raise RuntimeError("dtw_xy_forward was called without keep=True, so it kept no "
                           "accumulated cost for the backward")
    x, y, R, x_lengths, y_lengths, nan_pairs = ctx.saved_tensors
    if _double_backward.wants_graph():  # create_graph=True: through the reference
        grad_x, grad_y = _series_reference_gradients(x, y, x_lengths, y_lengths, metric, band,
                                                     gamma if soft else None, need_x, need_y,
                                                     grad_values)
    else:
        grad_x, grad_y = torch.ops.ether_kernels.dtw_xy_backward(
            grad_values.contiguous(), x, y, R, x_lengths, y_lengths, metric, band, gamma, soft,
            need_x, need_y)
    return (_nan_pairs_gradient(grad_x, nan_pairs, grad_values) if need_x else None,
            _nan_pairs_gradient(grad_y, nan_pairs, grad_values) if need_y else None,
            None, None, None, None, None, None, None)


_CPU_BACKENDS = ()
_GPU_BACKENDS = ("cuda",)  # the CUDA C++ wavefront first; Triton when it is not built
if triton_import_error is None:
    from .triton import dtw as _triton_dtw

    _GPU_BACKENDS = ("cuda", "triton")
    torch.library.register_autograd("ether_kernels::dtw_forward_triton",
                                    _make_backward(_triton_dtw.dtw_backward_triton),
                                    setup_context=_setup_context)
if _extension.cpp_available and hasattr(torch.ops.ether_kernels, "dtw_xy_forward"):
    _CPU_BACKENDS = ("cpp",)
    for _name, _fake in (("dtw_forward", _forward_fake), ("dtw_backward", _backward_fake),
                         ("dtw_xy_forward", _xy_forward_fake),
                         ("dtw_xy_backward", _xy_backward_fake)):
        torch.library.register_fake(f"ether_kernels::{_name}")(_fake)
    torch.library.register_autograd("ether_kernels::dtw_forward",
                                    _make_backward(torch.ops.ether_kernels.dtw_backward),
                                    setup_context=_setup_context)
    torch.library.register_autograd("ether_kernels::dtw_xy_forward", _xy_backward,
                                    setup_context=_xy_setup_context)
    if hasattr(torch.ops.ether_kernels, "dtw_xy_soft_forward_checkpointed"):
        torch.library.register_fake("ether_kernels::dtw_xy_soft_forward_checkpointed")(
            _checkpointed_forward_fake)
        torch.library.register_fake("ether_kernels::dtw_xy_soft_backward_checkpointed")(
            _xy_backward_fake_checkpointed)
        torch.library.register_autograd("ether_kernels::dtw_xy_soft_forward_checkpointed",
                                        _checkpointed_backward,
                                        setup_context=_checkpointed_setup_context)


__all__ = ["dtw", "soft_dtw", "soft_dtw_divergence", "dtw_from_cost", "soft_dtw_from_cost",
           "soft_dtw_alignment", "dtw_path", "cdist_dtw", "SoftDTWLoss", "allowed_cells"]
