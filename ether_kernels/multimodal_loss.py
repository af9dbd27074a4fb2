"""The MultiModal loss (Moon & Lee, "Deep Metric Loss for Multimodal Learning"): instances
subgrouped by their unimodal contributions through learned non-negative proxies over the
modalities' class scores. The formula is the released code's (specs/multimodal_loss.md):

    w_j    = relu(W[:, j]) / max(||relu(W[:, j])||, 1e-12)        unit, non-negative proxies
    S_ij   = cos(z_i, w_j)                                          (B, C*K)
    a_i    = sum_j softmax_j(S_ij / gamma) w_j                      soft subgroup assignment
    att_ic = sum_m z_i[m*C + c] (1 + a_i[m*C + c])                  attention-weighted fusion
    sim_ic = sum_k softmax_c(S_ick / gamma) S_ick                   class-axis softmax
    loss   = mean_i CE(sim_i + att_i, y_i)

Today this is composite PyTorch (two GEMMs and row softmaxes, which ATen runs at speed);
the fused epilogue (issue 5) is still to come.
"""

import math
import numbers

import torch

from ._checks import check_tensor
from .reference.multimodal_loss import multimodal_logits_reference


class MultiModalLoss(torch.nn.Module):
    """MultiModalLoss(num_classes, num_modalities, proxies_per_class=20, gamma=0.1).

    One parameter W (M*C, C*K), initialised like nn.init.kaiming_uniform_(W, a=sqrt(5)).
    forward(z, labels) -> scalar loss; predict(z) -> (B, C) logits. z: (B, M*C), the
    modality-major concatenation of the M unimodal class-probability vectors.
    """

    def __init__(self, num_classes, num_modalities, proxies_per_class=20, gamma=0.1):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_modalities", num_modalities),
                            ("proxies_per_class", proxies_per_class)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MultiModalLoss: {name} must be an int >= 1, got {value!r}")
        if not isinstance(gamma, numbers.Real) or not gamma > 0 or not math.isfinite(gamma):
            raise ValueError(f"MultiModalLoss: gamma must be a finite number > 0, got {gamma!r}")
        self.num_classes, self.num_modalities = num_classes, num_modalities
        self.proxies_per_class, self.gamma = proxies_per_class, float(gamma)
        self.W = torch.nn.Parameter(torch.empty(num_modalities * num_classes,
                                                num_classes * proxies_per_class))
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))

    def _check_z(self, z, op):
        check_tensor(z, "z")
        width = self.num_modalities * self.num_classes
        if z.dim() != 2 or z.shape[1] != width or z.shape[0] == 0:
            raise ValueError(f"MultiModalLoss.{op}: z must be a non-empty (B, M*C) = (B, "
                             f"{width}) tensor, got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"MultiModalLoss.{op}: z must be floating point, got {z.dtype}")

    def predict(self, z):
        """(B, C) logits sim + att."""
        self._check_z(z, "predict")
        return multimodal_logits_reference(z, self.W.to(z.dtype), self.num_classes, self.gamma)

    def forward(self, z, labels):
        self._check_z(z, "forward")
        check_tensor(labels, "labels")
        if labels.dim() != 1 or labels.shape[0] != z.shape[0] or labels.is_floating_point():
            raise ValueError(f"MultiModalLoss.forward: labels must be a ({z.shape[0]},) integer "
                             f"tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        return torch.nn.functional.cross_entropy(self.predict(z), labels)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, num_modalities={self.num_modalities}, "
                f"proxies_per_class={self.proxies_per_class}, gamma={self.gamma}")
