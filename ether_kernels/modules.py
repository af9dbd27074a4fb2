"""nn.Module wrappers of the losses."""

import torch

from .ether_loss import ModalityGroups, ether_loss_checked, normalize_weights
from .mse_loss import fused_mse_loss
from ._checks import check_choice, check_non_negative_real


class EtherLoss(torch.nn.Module):
    """Drop-in for the published `Ether(modalities, alpha)` loss module.

    loss = MSE(y_pred, y_true) + alpha * sum_m w_m * phi(mean_m(y_pred) - mean(y_pred)).
    The modalities, alpha and options are checked here, at construction, so that a bad
    configuration fails before training starts. See ether_kernels.ether_loss for the
    arguments.
    """

    def __init__(self, modalities, alpha=1.0, *, discrepancy="l1", weights=None,
                 reduction="mean", per_sample=False):
        super().__init__()
        self.modalities = ModalityGroups(modalities)
        self.alpha = check_non_negative_real(alpha, "alpha", "EtherLoss")
        check_choice(discrepancy, "discrepancy", ("l1", "l2"), "EtherLoss")
        check_choice(reduction, "reduction", ("mean", "sum"), "EtherLoss")
        if not isinstance(per_sample, bool):
            raise TypeError(f"EtherLoss: per_sample must be a bool, got {type(per_sample).__name__}")
        self.discrepancy = discrepancy
        self.weights = normalize_weights(weights, self.modalities.num_modalities)
        self.reduction = reduction
        self.per_sample = per_sample

    def forward(self, y_pred, y_true):
        return ether_loss_checked(y_pred, y_true, self.modalities, self.alpha, self.discrepancy,
                                  self.weights, self.reduction, self.per_sample)

    def extra_repr(self):
        return (f"modalities={self.modalities!r}, alpha={self.alpha}, "
                f"discrepancy={self.discrepancy!r}, reduction={self.reduction!r}, "
                f"per_sample={self.per_sample}")


class FusedMSELoss(torch.nn.Module):
    """Drop-in for torch.nn.MSELoss(reduction=...), fused."""

    def __init__(self, reduction="mean"):
        super().__init__()
        check_choice(reduction, "reduction", ("mean", "sum", "none"), "FusedMSELoss")
        self.reduction = reduction

    def forward(self, input, target):
        return fused_mse_loss(input, target, self.reduction)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
