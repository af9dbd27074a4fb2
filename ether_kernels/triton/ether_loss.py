"""Ether loss in Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Registered as the custom ops ether_kernels::ether_loss_forward_triton / _backward_triton
with the same schemas as the C++ ops (csrc/ether_kernels.cpp); fake kernels and autograd
are attached in ether_kernels/ether_loss.py, shared with the C++ ops.

The input (B, C, *rest) is viewed as B rows of L = C * R contiguous elements.

Forward
  1. _stats_kernel, one pass over y_pred and y_true on a (row block x column block) grid:
     each program adds ROWS rows of BLOCK columns into fp32 column sums (fp64 for fp64
     input) and squared errors, and writes one partial row of column sums and one partial
     squared-error sum. No atomics: partials have fixed slots, so the result is
     deterministic.
  2. Small torch reductions fold the partials: columns -> channels (sum over R), row blocks
     -> total; then the finalize (means, discrepancy, per-channel coefficients) on the few
     per-channel numbers, on the device, without a host sync.
  Per-sample statistics use one row per program (ROWS = 1), so the partials are the
  per-sample column sums.
Backward
  3. _backward_kernel, one elementwise pass:
       grad_pred = g * (k * (p - t) + coef[channel]),  grad_true = -g * k * (p - t)
     with k = 2 / N (mean) or 2 (sum) and g the upstream gradient read on the device.
"""

import torch
import triton
import triton.language as tl

from ._launch import accumulator_dtype, as_tl_dtype

# Columns per program: 1024 fp32 lanes = 8 per thread of a 4-warp program, enough loads in
# flight to cover memory latency. Rows per program: enough to amortise the partial writes
# (one row of BLOCK_COLS per program) to under 1/64 of the input traffic.
BLOCK_COLS = 1024
ROWS_PER_PROGRAM = 64
BLOCK_ELEMENTS = 2048  # backward: elements per program


@triton.jit
def _stats_kernel(pred_ptr, true_ptr, partial_cols_ptr, partial_sse_ptr, B, L, ROWS,
                  BLOCK_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < L
    col_sum = tl.zeros([BLOCK_COLS], dtype=ACC_DTYPE)
    sq_err = tl.zeros([BLOCK_COLS], dtype=ACC_DTYPE)
    first_row = row_block.to(tl.int64) * ROWS
    for i in range(0, tl.minimum(ROWS, B - first_row)):  # the last row block may be short
        offsets = (first_row + i) * L + cols
        p = tl.load(pred_ptr + offsets, mask=col_mask, other=0.0).to(ACC_DTYPE)
        t = tl.load(true_ptr + offsets, mask=col_mask, other=0.0).to(ACC_DTYPE)
        diff = p - t
        col_sum += p
        sq_err += diff * diff
    tl.store(partial_cols_ptr + row_block.to(tl.int64) * L + cols, col_sum, mask=col_mask)
    tl.store(partial_sse_ptr + row_block * tl.num_programs(1) + col_block, tl.sum(sq_err, axis=0))


@triton.jit
def _backward_kernel(pred_ptr, true_ptr, coef_ptr, upstream_ptr, grad_pred_ptr, grad_true_ptr,
                     N, C, R, intra_scale, PER_SAMPLE: tl.constexpr, NEED_PRED: tl.constexpr,
                     NEED_TRUE: tl.constexpr, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    p = tl.load(pred_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    t = tl.load(true_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(upstream_ptr).to(ACC_DTYPE)
    g_diff = (g * intra_scale) * (p - t)
    if NEED_PRED:
        segment = offsets // R  # b * C + c
        coef_index = segment if PER_SAMPLE else segment % C
        a = tl.load(coef_ptr + coef_index, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(grad_pred_ptr + offsets, (g_diff + g * a).to(grad_pred_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_TRUE:
        tl.store(grad_true_ptr + offsets, (-g_diff).to(grad_true_ptr.dtype.element_ty), mask=mask)


def _finalize(channel_sums, sse, numel, member_channel, member_group, weights, alpha,
              discrepancy, reduction, per_sample, C, elements_per_channel, batch):
    """Loss and coefficients from the (rows, C) channel sums, in fp64 torch ops on the device.

    The same math as csrc/common/ether_loss_math.h (see there for the derivation).
    """
    sums = channel_sums.double()
    rows = sums.shape[0]
    n = float(elements_per_channel)
    M = weights.numel()
    ones = torch.ones_like(member_group, dtype=torch.float64)
    group_size = torch.zeros(M, dtype=torch.float64, device=sums.device).index_add_(
        0, member_group, ones)
    overall = sums.sum(dim=1, keepdim=True) / (C * n)
    group_sum = torch.zeros(rows, M, dtype=torch.float64, device=sums.device).index_add_(
        1, member_group, sums.index_select(1, member_channel))
    gap = group_sum / (group_size * n) - overall
    if discrepancy == 0:
        inter_rows = (weights * gap.abs()).sum(dim=1)
        slope = torch.sign(gap)  # 0 at 0, NaN stays NaN
    else:
        inter_rows = (weights * gap * gap).sum(dim=1)
        slope = 2.0 * gap
    weighted_slope = weights * slope
    scale = alpha / batch if per_sample else alpha
    per_member = (weighted_slope / (group_size * n)).index_select(1, member_group)
    coef = torch.zeros(rows, C, dtype=torch.float64, device=sums.device).index_add_(
        1, member_channel, per_member)
    coef = scale * (coef - weighted_slope.sum(dim=1, keepdim=True) / (C * n))
    inter = inter_rows.mean() if per_sample else inter_rows[0]
    intra = sse / numel if reduction == 0 else sse
    loss = intra if alpha == 0 else intra + alpha * inter
    return loss, (coef if per_sample else coef[0])


@torch.library.custom_op("ether_kernels::ether_loss_forward_triton", mutates_args=())
def ether_loss_forward_triton(y_pred: torch.Tensor, y_true: torch.Tensor,
                              member_channel: torch.Tensor, member_group: torch.Tensor,
                              weights: torch.Tensor, alpha: float, discrepancy: int,
                              reduction: int, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = y_pred.contiguous(), y_true.contiguous()
    B, C = pred.shape[0], pred.shape[1]
    L = pred.numel() // B
    R = L // C
    acc = accumulator_dtype(pred.dtype)
    rows = 1 if per_sample else min(ROWS_PER_PROGRAM, B)
    row_blocks = triton.cdiv(B, rows)
    col_blocks = triton.cdiv(L, BLOCK_COLS)
    partial_cols = torch.empty(row_blocks, L, dtype=acc, device=pred.device)
    partial_sse = torch.empty(row_blocks * col_blocks, dtype=acc, device=pred.device)
    _stats_kernel[(row_blocks, col_blocks)](
        pred, target, partial_cols, partial_sse, B, L, rows,
        BLOCK_COLS=BLOCK_COLS, ACC_DTYPE=as_tl_dtype(acc))
    if per_sample:
        channel_sums = partial_cols.view(B, C, R).sum(dim=2)
    else:
        channel_sums = partial_cols.sum(dim=0).view(1, C, R).sum(dim=2)
    loss, coef = _finalize(channel_sums, partial_sse.double().sum(), pred.numel(),
                           member_channel, member_group, weights, alpha, discrepancy, reduction,
                           per_sample, C, R if per_sample else B * R, B)
    return loss.to(pred.dtype), coef.to(acc)


@torch.library.custom_op("ether_kernels::ether_loss_backward_triton", mutates_args=())
def ether_loss_backward_triton(grad_loss: torch.Tensor, y_pred: torch.Tensor,
                               y_true: torch.Tensor, coef: torch.Tensor, intra_scale: float,
                               per_sample: bool, need_pred_grad: bool,
                               need_true_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = y_pred.contiguous(), y_true.contiguous()
    B, C = pred.shape[0], pred.shape[1]
    N = pred.numel()
    R = N // (B * C)
    empty = pred.new_empty(0)
    grad_pred = torch.empty_like(pred) if need_pred_grad else empty
    grad_true = torch.empty_like(pred) if need_true_grad else empty.clone()
    if need_pred_grad or need_true_grad:
        _backward_kernel[(triton.cdiv(N, BLOCK_ELEMENTS),)](
            pred, target, coef.contiguous(), grad_loss.reshape(1), grad_pred if need_pred_grad else pred,
            grad_true if need_true_grad else pred, N, C, R, intra_scale,
            PER_SAMPLE=per_sample, NEED_PRED=need_pred_grad, NEED_TRUE=need_true_grad,
            BLOCK=BLOCK_ELEMENTS, ACC_DTYPE=as_tl_dtype(accumulator_dtype(pred.dtype)))
    return grad_pred, grad_true
