"""The Ether loss in plain PyTorch, written to read like the spec (specs/ether_loss.md).

    loss    = intra + alpha * inter
    intra   = MSE(y_pred, y_true)                       (mean, or sum with reduction="sum")
    inter   = sum_m w_m * phi(mean_m - overall)
    mean_m  = mean of y_pred over the channels of modality m (every other dim averaged)
    overall = mean of y_pred over all elements
    phi     = |x| ("l1") or x**2 ("l2")

With per_sample=True, mean_m and overall are taken per sample (over dims 1..) and the inter
term is averaged over the batch. Half and bfloat16 inputs are computed in float32 and the
loss is returned in the input dtype; the means are taken in float64 (as the kernels
accumulate them), so that equal means give a gap of exactly 0, whose L1 subgradient is 0.
Autograd gives the gradients.
"""

import torch


def ether_loss_reference(y_pred, y_true, groups, weights, alpha, discrepancy="l1",
                         reduction="mean", per_sample=False):
    """groups: one 1-D int64 tensor of channel indices per modality (on y_pred's device)."""
    out_dtype = y_pred.dtype
    if y_pred.dtype in (torch.float16, torch.bfloat16):
        y_pred, y_true = y_pred.float(), y_true.float()

    intra = torch.nn.functional.mse_loss(y_pred, y_true, reduction=reduction)
    if alpha == 0:
        return intra.to(out_dtype)

    # Dims that a mean averages over: all of them, or all but the batch dim per sample.
    dims = tuple(range(1, y_pred.dim())) if per_sample else tuple(range(y_pred.dim()))
    values = y_pred.double() if y_pred.device.type != "mps" else y_pred  # MPS has no fp64
    overall = values.mean(dim=dims)
    inter = torch.zeros_like(overall)
    for weight, channels in zip(weights, groups):
        mean_m = values.index_select(1, channels).mean(dim=dims)
        gap = mean_m - overall
        inter = inter + weight * (gap.abs() if discrepancy == "l1" else gap * gap)
    if per_sample:
        inter = inter.mean()
    return (intra + alpha * inter).to(out_dtype)
