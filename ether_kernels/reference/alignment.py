"""The alignment losses in plain PyTorch, written like their formulas (specs/multimodal_loss.md).
They are the test oracles; the fast versions live in ether_kernels/alignment.py.

    triplet:      relu(d(a, p) - d(a, n) + margin), d the p-norm distance (torch's eps)
    batch-hard:   per anchor, the farthest positive and the nearest negative
    batch-all:    every valid (anchor, positive, negative), averaged over those with a
                  positive loss (the usual "batch all" convention)
    InfoNCE:      CE(a_n b_n^T / T, identity), symmetric: the mean of both directions
    deep CCA:     -(sum of the top-k canonical correlations of the regularised covariances)
"""

import torch
import torch.nn.functional as F


def pairwise_distances_reference(x, y, squared=False):
    """(P, Q) Euclidean distances between the rows of x (P, E) and y (Q, E), written out."""
    diff = x[:, None, :] - y[None, :, :]
    d2 = (diff * diff).sum(-1)
    if squared:
        return d2
    # a zero distance (a point against itself) gets a zero gradient, not sqrt's infinite one
    # (tested with == 0, so that a NaN stays NaN: d2 > 0 made it 0)
    zero = d2 == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, d2).sqrt())


def triplet_loss_reference(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6,
                           swap=False, reduction="mean"):
    """torch.nn.functional.triplet_margin_loss's formula, written out."""
    def dist(u, v):
        return ((u - v + eps).abs() ** p).sum(-1) ** (1.0 / p)
    d_ap, d_an = dist(anchor, positive), dist(anchor, negative)
    if swap:
        d_an = torch.minimum(d_an, dist(positive, negative))
    losses = torch.clamp(d_ap - d_an + margin, min=0)
    return {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()


def _valid_masks(labels_a, labels_b, exclude_self):
    same = labels_a[:, None] == labels_b[None, :]
    if exclude_self:
        same = same & ~torch.eye(len(labels_a), dtype=torch.bool, device=labels_a.device)
    different = labels_a[:, None] != labels_b[None, :]
    return same, different


def batch_hard_triplet_reference(distances, labels_a, labels_b, margin, exclude_self):
    """Per anchor i: max over positives j of d_ij, min over negatives of d_ij; the loss is the
    mean of relu(hardest positive - hardest negative + margin) over anchors with both."""
    positive, negative = _valid_masks(labels_a, labels_b, exclude_self)
    losses = []
    for i in range(distances.shape[0]):
        if positive[i].any() and negative[i].any():
            hardest_positive = distances[i][positive[i]].max()
            hardest_negative = distances[i][negative[i]].min()
            losses.append(torch.clamp(hardest_positive - hardest_negative + margin, min=0))
    if not losses:
        return distances.sum() * 0.0
    return torch.stack(losses).mean()


def batch_all_triplet_reference(distances, labels_a, labels_b, margin, exclude_self):
    """The (A, Q, Q) tensor of every triplet's loss relu(d_ij - d_ik + margin) over valid
    (positive j, negative k), averaged over the triplets whose loss is positive."""
    positive, negative = _valid_masks(labels_a, labels_b, exclude_self)
    # relu, whose derivative at 0 is 0: a triplet at exactly zero loss is not counted below,
    # so it passes no gradient either (torch.clamp's derivative at the bound is 1)
    losses = torch.relu(distances[:, :, None] - distances[:, None, :] + margin)
    valid = positive[:, :, None] & negative[:, None, :]
    losses = torch.where(valid, losses, 0.0)
    count = (losses > 0).sum()
    return losses.sum() / torch.clamp(count, min=1)


def contrastive_loss_reference(a, b, temperature=0.07, symmetric=True, normalize=True):
    """InfoNCE between matched rows of a and b (CLIP): the full (B, B) logits."""
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.t(), target)) / 2
    return loss


def cca_loss_reference(h1, h2, k=None, eps=1e-4):
    """-(sum of the top-k canonical correlations): the singular values of
    S11^-1/2 S12 S22^-1/2 with S11 = H1c^T H1c / (n - 1) + eps I (likewise S22), whitened by
    the symmetric inverse square roots (eigendecomposition)."""
    n = h1.shape[0]
    h1c, h2c = h1 - h1.mean(0), h2 - h2.mean(0)
    s11 = h1c.t() @ h1c / (n - 1) + eps * torch.eye(h1.shape[1], dtype=h1.dtype, device=h1.device)
    s22 = h2c.t() @ h2c / (n - 1) + eps * torch.eye(h2.shape[1], dtype=h2.dtype, device=h2.device)
    s12 = h1c.t() @ h2c / (n - 1)

    def inv_sqrt(s):
        values, vectors = torch.linalg.eigh(s)
        return vectors @ torch.diag(values.rsqrt()) @ vectors.t()
    t = inv_sqrt(s11) @ s12 @ inv_sqrt(s22)
    correlations = torch.linalg.svdvals(t)
    k = correlations.numel() if k is None else k
    return -correlations[:k].sum()
