"""The MultiModal loss (Moon & Lee, "Deep Metric Loss for Multimodal Learning") in plain
PyTorch, line by line the spec's formula (specs/multimodal_loss.md), which is the released
code's behaviour. z: (B, M*C) modality-major class probabilities; W: (M*C, C*K) proxies.
"""

import torch
import torch.nn.functional as F


def multimodal_logits_reference(z, W, num_classes, gamma):
    """logits (B, C) = sim + att."""
    C = num_classes
    K = W.shape[1] // C
    M = W.shape[0] // C
    s = 1.0 / gamma
    w = F.relu(W)
    w = w / torch.clamp(w.norm(dim=0, keepdim=True), min=1e-12)   # unit, non-negative proxies
    S = F.normalize(z, dim=1) @ w                                 # (B, C*K) cosines
    a = torch.softmax(s * S, dim=1) @ w.t()                       # (B, M*C) soft assignment
    att = (z * (1.0 + a)).view(-1, M, C).sum(dim=1)               # (B, C) attention fusion
    S3 = S.view(-1, C, K)                                         # proxy j is class j // K
    Q = torch.softmax(s * S3, dim=1)                              # over the classes
    sim = (Q * S3).sum(dim=2)                                     # (B, C)
    return sim + att


def multimodal_loss_reference(z, labels, W, num_classes, gamma):
    return F.cross_entropy(multimodal_logits_reference(z, W, num_classes, gamma), labels)
