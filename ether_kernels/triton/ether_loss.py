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
  2. torch reductions fold the partials: row blocks -> one row, columns -> channels (sum
     over R); then _finalize_kernel (one program per row of channel sums) computes the
     means, the discrepancy, the loss and the per-channel coefficients on the device,
     without a host sync.
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

from ._launch import accumulator_dtype, as_tl_dtype, device_of, target_programs

# Columns per program: 1024 fp32 lanes = 8 per thread of a 4-warp program, enough loads in
# flight to cover memory latency. Rows per program: enough to amortise the partial writes
# (one row of BLOCK_COLS per program) to under 1/64 of the input traffic.
TILE_ELEMENTS = 2048   # forward: elements one program loads per step (rows x columns)
MAX_BLOCK_COLS = 1024  # forward: columns per program at most
BLOCK_ELEMENTS = 2048  # backward: elements per program
FINALIZE_BLOCK = 256   # finalize: channels / pairs / groups per step of its one program per row
NUM_WARPS = 8          # 2048-element tiles: 8 per thread, several 16-byte loads in flight


@triton.jit(do_not_specialize=["B", "L", "ROWS", "col_blocks"])
def _stats_kernel(pred_ptr, true_ptr, partial_cols_ptr, partial_sse_ptr, B, L, ROWS, col_blocks,
                  BLOCK_COLS: tl.constexpr, ROW_TILE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # A flat grid (row block major): the second grid dimension of a GPU is capped at 65535.
    pid = tl.program_id(0)
    row_block = pid // col_blocks
    col_block = pid % col_blocks
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < L
    col_sum = tl.zeros([ROW_TILE, BLOCK_COLS], dtype=ACC_DTYPE)
    sq_err = tl.zeros([ROW_TILE, BLOCK_COLS], dtype=ACC_DTYPE)
    first_row = row_block.to(tl.int64) * ROWS
    last_row = tl.minimum(first_row + ROWS, B)  # the last row block may be short
    for r0 in range(first_row, last_row, ROW_TILE):
        rows = r0 + tl.arange(0, ROW_TILE)
        mask = (rows < last_row)[:, None] & col_mask[None, :]
        offsets = rows[:, None] * L + cols[None, :]
        p = tl.load(pred_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        t = tl.load(true_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        diff = p - t
        col_sum += p
        sq_err += diff * diff
    tl.store(partial_cols_ptr + row_block.to(tl.int64) * L + cols, tl.sum(col_sum, axis=0),
             mask=col_mask)
    tl.store(partial_sse_ptr + pid, tl.sum(tl.sum(sq_err, axis=1), axis=0))


@triton.jit(do_not_specialize=["N", "C", "R"])
def _backward_kernel(pred_ptr, true_ptr, coef_ptr, upstream_ptr, grad_pred_ptr, grad_true_ptr,
                     N, C, R, MEAN: tl.constexpr, PER_SAMPLE: tl.constexpr, NEED_PRED: tl.constexpr,
                     NEED_TRUE: tl.constexpr, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < N
    p = tl.load(pred_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    t = tl.load(true_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    g = tl.load(upstream_ptr).to(ACC_DTYPE)
    intra_scale = 2.0 / N.to(ACC_DTYPE) if MEAN else 2.0
    g_diff = (g * intra_scale) * (p - t)
    if NEED_PRED:
        segment = offsets // R  # b * C + c
        coef_index = segment if PER_SAMPLE else segment % C
        a = tl.load(coef_ptr + coef_index, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(grad_pred_ptr + offsets, (g_diff + g * a).to(grad_pred_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_TRUE:
        tl.store(grad_true_ptr + offsets, (-g_diff).to(grad_true_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_sse", "E", "M", "C", "n", "B", "numel"])
def _finalize_kernel(sums_ptr, sse_ptr, n_sse, member_channel_ptr, member_group_ptr, E,
                     weights_ptr, M, scratch_ptr, coef_ptr, inter_ptr, loss_ptr, C, n, B,
                     alpha_ptr, numel, L2: tl.constexpr, MEAN: tl.constexpr,
                     PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of channel sums: the math of csrc/common/ether_loss_math.h.

    scratch (fp64, zeroed) holds per row [group sums (M) | group sizes (M) | coef (C)].
    Groups are gathered and scattered through the membership pairs with fp64 atomics of
    this program only, so the cost is O(C + E + M) whatever the number of modalities.
    Every scalar is fp64: sizes come in as integers and alpha through a device tensor (a
    Python float argument would reach the kernel rounded to fp32).
    """
    row = tl.program_id(0).to(tl.int64)
    alpha = tl.load(alpha_ptr)
    scale = alpha / B.to(tl.float64) if PER_SAMPLE else alpha
    channel_elements = C.to(tl.float64) * n.to(tl.float64)  # C * (elements per channel)
    n = n.to(tl.float64)
    lanes = tl.arange(0, BLOCK)
    sums = sums_ptr + row * C
    group_sum = scratch_ptr + row * (2 * M + C)
    group_size = group_sum + M
    coef_acc = group_size + M

    # 1. The overall mean.
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for c0 in range(0, C, BLOCK):
        total += tl.load(sums + c0 + lanes, mask=c0 + lanes < C, other=0.0).to(tl.float64)
    overall = tl.sum(total, axis=0) / channel_elements

    # 2. Sum and size of every group, through the membership pairs.
    for e0 in range(0, E, BLOCK):
        mask = e0 + lanes < E
        channel = tl.load(member_channel_ptr + e0 + lanes, mask=mask, other=0)
        group = tl.load(member_group_ptr + e0 + lanes, mask=mask, other=0)
        value = tl.load(sums + channel, mask=mask, other=0.0).to(tl.float64)
        tl.atomic_add(group_sum + group, value, mask=mask)
        tl.atomic_add(group_size + group, tl.full([BLOCK], 1.0, tl.float64), mask=mask)
    tl.debug_barrier()

    # 3. Gaps, the inter term, and w_m s_m / (|g_m| n) kept in place of the group sums.
    inter = tl.zeros([BLOCK], dtype=tl.float64)
    shared = tl.zeros([BLOCK], dtype=tl.float64)
    for m0 in range(0, M, BLOCK):
        mask = m0 + lanes < M
        size = tl.load(group_size + m0 + lanes, mask=mask, other=1.0)
        gap = tl.load(group_sum + m0 + lanes, mask=mask, other=0.0) / (size * n) - overall
        weight = tl.load(weights_ptr + m0 + lanes, mask=mask, other=0.0)
        if L2:
            inter += tl.where(mask, weight * gap * gap, 0.0)
            slope = 2.0 * gap
        else:
            inter += tl.where(mask, weight * tl.abs(gap), 0.0)
            # sign(gap): 0 at 0 and for a NaN gap (torch.sign's convention, as the reference)
            slope = tl.where(gap > 0, 1.0, tl.where(gap < 0, -1.0, 0.0))
        weighted = tl.where(mask, weight * slope, 0.0)
        shared += weighted
        tl.store(group_sum + m0 + lanes, weighted / (size * n), mask=mask)
    shared_term = tl.sum(shared, axis=0) / channel_elements
    tl.debug_barrier()

    # 4. coef[c] = scale * (sum over c's groups of w s / (|g| n) - shared term).
    for e0 in range(0, E, BLOCK):
        mask = e0 + lanes < E
        channel = tl.load(member_channel_ptr + e0 + lanes, mask=mask, other=0)
        group = tl.load(member_group_ptr + e0 + lanes, mask=mask, other=0)
        tl.atomic_add(coef_acc + channel, tl.load(group_sum + group, mask=mask, other=0.0), mask=mask)
    tl.debug_barrier()
    for c0 in range(0, C, BLOCK):
        mask = c0 + lanes < C
        value = scale * (tl.load(coef_acc + c0 + lanes, mask=mask, other=0.0) - shared_term)
        value = tl.where(scale == 0.0, 0.0, value)  # alpha = 0: exactly the MSE (0 * NaN)
        tl.store(coef_ptr + row * C + c0 + lanes, value.to(coef_ptr.dtype.element_ty), mask=mask)

    inter_total = tl.sum(inter, axis=0)
    tl.store(inter_ptr + row, inter_total)
    if not PER_SAMPLE:  # batch statistics: one row, so this program also has the whole loss
        sse = tl.zeros([BLOCK], dtype=tl.float64)
        for i0 in range(0, n_sse, BLOCK):
            sse += tl.load(sse_ptr + i0 + lanes, mask=i0 + lanes < n_sse, other=0.0).to(tl.float64)
        intra = tl.sum(sse, axis=0)
        if MEAN:
            intra = intra / numel.to(tl.float64)
        loss = tl.where(alpha == 0.0, intra, intra + alpha * inter_total)  # alpha 0: exactly the MSE
        tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@torch.library.custom_op("ether_kernels::ether_loss_forward_triton", mutates_args=())
def ether_loss_forward_triton(y_pred: torch.Tensor, y_true: torch.Tensor,
                              member_channel: torch.Tensor, member_group: torch.Tensor,
                              weights: torch.Tensor, alpha: float, discrepancy: int,
                              reduction: int, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with device_of(y_pred):  # Triton launches on the current device: make it the inputs'
        return _forward(y_pred, y_true, member_channel, member_group, weights, alpha,
                        discrepancy, reduction, per_sample)


def _forward(y_pred, y_true, member_channel, member_group, weights, alpha, discrepancy,
             reduction, per_sample):
    pred, target = y_pred.contiguous(), y_true.contiguous()
    B, C = pred.shape[0], pred.shape[1]
    L = pred.numel() // B
    R = L // C
    acc = accumulator_dtype(pred.dtype)
    # Tiles: up to MAX_BLOCK_COLS columns, and as many rows as fill TILE_ELEMENTS. Batch
    # statistics give each program enough rows that the grid is about 4 programs per SM
    # (every SM busy, few partial rows to fold); per-sample ones one row per program.
    block_cols = min(MAX_BLOCK_COLS, triton.next_power_of_2(L))
    col_blocks = triton.cdiv(L, block_cols)
    if per_sample:
        row_tile, rows_per_program = 1, 1
    else:
        row_tile = max(1, min(TILE_ELEMENTS // block_cols, triton.next_power_of_2(B)))
        wanted = max(1, triton.cdiv(B * col_blocks, target_programs(pred.device)))
        rows_per_program = triton.cdiv(max(wanted, row_tile), row_tile) * row_tile
    row_blocks = triton.cdiv(B, rows_per_program)
    partial_cols = torch.empty(row_blocks, L, dtype=acc, device=pred.device)
    partial_sse = torch.empty(row_blocks * col_blocks, dtype=acc, device=pred.device)
    _stats_kernel[(row_blocks * col_blocks,)](
        pred, target, partial_cols, partial_sse, B, L, rows_per_program, col_blocks,
        BLOCK_COLS=block_cols, ROW_TILE=row_tile, ACC_DTYPE=as_tl_dtype(acc),
        num_warps=NUM_WARPS)
    # Fold the partials into channel sums: (rows, C) with rows = B or 1.
    if per_sample:
        channel_sums = partial_cols.view(B, C, R)
    else:
        channel_sums = partial_cols.sum(dim=0).view(1, C, R) if row_blocks > 1 else partial_cols.view(1, C, R)
    if R > 1:
        channel_sums = channel_sums.sum(dim=2)
    channel_sums = channel_sums.reshape(-1, C)
    rows = channel_sums.shape[0]

    M = weights.numel()
    scratch = torch.zeros(rows, 2 * M + C, dtype=torch.float64, device=pred.device)
    coef = torch.empty(rows, C, dtype=acc, device=pred.device)
    inter_rows = torch.empty(rows, dtype=torch.float64, device=pred.device)
    loss = torch.empty((), dtype=pred.dtype, device=pred.device)
    elements_per_channel = R if per_sample else B * R
    alpha_on_device = torch.full((), alpha, dtype=torch.float64, device=pred.device)  # no copy
    _finalize_kernel[(rows,)](
        channel_sums, partial_sse, partial_sse.numel(), member_channel, member_group,
        member_channel.numel(), weights, M, scratch, coef, inter_rows, loss, C,
        elements_per_channel, B, alpha_on_device, pred.numel(),
        L2=discrepancy == 1, MEAN=reduction == 0, PER_SAMPLE=per_sample, BLOCK=FINALIZE_BLOCK)
    if not per_sample:
        return loss, coef.view(C)
    # Per-sample statistics: the inter term is the mean of the rows' terms.
    sse = partial_sse.double().sum()
    intra = sse / pred.numel() if reduction == 0 else sse
    total = intra if alpha == 0 else intra + alpha * inter_rows.mean()
    return total.to(pred.dtype), coef


@torch.library.custom_op("ether_kernels::ether_loss_backward_triton", mutates_args=())
def ether_loss_backward_triton(grad_loss: torch.Tensor, y_pred: torch.Tensor,
                               y_true: torch.Tensor, coef: torch.Tensor, reduction: int,
                               per_sample: bool, need_pred_grad: bool,
                               need_true_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with device_of(y_pred):
        return _backward(grad_loss, y_pred, y_true, coef, reduction, per_sample, need_pred_grad,
                         need_true_grad)


def _backward(grad_loss, y_pred, y_true, coef, reduction, per_sample, need_pred_grad,
              need_true_grad):
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
            grad_true if need_true_grad else pred, N, C, R, MEAN=reduction == 0,
            PER_SAMPLE=per_sample, NEED_PRED=need_pred_grad, NEED_TRUE=need_true_grad,
            BLOCK=BLOCK_ELEMENTS, ACC_DTYPE=as_tl_dtype(accumulator_dtype(pred.dtype)),
            num_warps=NUM_WARPS)
    return grad_pred, grad_true
