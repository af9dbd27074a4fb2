"""Alignment losses for joint embeddings and domain invariance (specs/multimodal_loss.md).

    triplet_loss               = torch.nn.functional.triplet_margin_loss
    batch_hard_triplet_loss    per anchor the farthest positive and the nearest negative
    batch_all_triplet_loss     every valid triplet, mean over those with a positive loss,
                               in O(B^2 log B) time and O(B^2) memory (no B x B x B tensor)
    cross_modal_triplet_loss   anchors from one modality, positives / negatives from another
    contrastive_loss           InfoNCE / CLIP, blockwise: O(B * block) memory for any B
    grad_reverse, GradientReversal   identity forward, -lambda * grad backward
    cca_loss                   deep CCA: -(sum of the top-k canonical correlations)

These are composite PyTorch (autograd Functions where the memory or the numerics need one):
the work is GEMMs, sorts and reductions that ATen already runs at the hardware's speed, so
what a kernel would save is memory traffic of the (B, B) matrices, not arithmetic. The
references (the test oracles) are in reference/alignment.py.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from . import _dispatch
from ._checks import (check_bool, check_choice, check_finite_real, check_int, check_loss_pair,
                      check_non_negative_real, check_positive_real, check_tensor)
from .reference.alignment import contrastive_loss_reference

_REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------- checks

def _check_embeddings(x, name, op):
    check_tensor(x, name, op)
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{op}: {name} must be a non-empty (B, E) tensor, got shape "
                         f"{tuple(x.shape)}")


def _check_same_width(x, y, x_name, y_name, op):
    """Same dtype, device and embedding width (the row counts may differ)."""
    if x.dtype != y.dtype:
        raise TypeError(f"{op}: {x_name} ({x.dtype}) and {y_name} ({y.dtype}) must have the "
                        "same dtype")
    if x.device != y.device:
        raise RuntimeError(f"{op}: {x_name} is on {x.device} but {y_name} is on {y.device}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{op}: {x_name} has shape {tuple(x.shape)} but {y_name} has shape "
                         f"{tuple(y.shape)}: the embedding widths differ")


def _check_labels(labels, rows, name, op, device):
    check_tensor(labels, name, op)
    if labels.dim() != 1 or labels.shape[0] != rows or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be a ({rows},) integer tensor, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if labels.device != device:
        raise RuntimeError(f"{op}: {name} is on {labels.device}, the embeddings on {device}")


def _check_margin(margin, op):
    return check_non_negative_real(margin, "margin", op)


# ------------------------------------------------------------------------ triplet

def triplet_loss(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False,
                 reduction="mean"):
    """relu(d(a, p) - d(a, n) + margin), d(u, v) = ||u - v + eps||_p: exactly
    torch.nn.functional.triplet_margin_loss (same arguments, inputs (B, E) or unbatched (E,),
    broadcast against each other as torch does), with argument checks that name the input."""
    op = "triplet_loss"
    for x, name in ((anchor, "anchor"), (positive, "positive"), (negative, "negative")):
        check_tensor(x, name, op)
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() not in (1, 2) or x.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty (B, E) or (E,) tensor, got "
                             f"shape {tuple(x.shape)}")
    for x, name in ((positive, "positive"), (negative, "negative")):
        if x.dtype != anchor.dtype or x.device != anchor.device:
            raise TypeError(f"{op}: anchor ({anchor.dtype}, {anchor.device}) and {name} "
                            f"({x.dtype}, {x.device}) must have the same dtype and device")
        if x.dim() != anchor.dim() or x.shape[-1] != anchor.shape[-1]:
            raise ValueError(f"{op}: anchor has shape {tuple(anchor.shape)} but {name} has "
                             f"shape {tuple(x.shape)}: the same number of dims and width E")
    try:
        torch.broadcast_shapes(anchor.shape, positive.shape, negative.shape)
    except RuntimeError:
        raise ValueError(f"{op}: the batch sizes of anchor {tuple(anchor.shape)}, positive "
                         f"{tuple(positive.shape)} and negative {tuple(negative.shape)} do not "
                         "broadcast") from None
    margin = _check_margin(margin, op)
    check_bool(swap, "swap", op)
    check_positive_real(p, "p", op, allow_inf=True)  # p = inf: the max norm
    check_choice(reduction, "reduction", _REDUCTIONS, op)
    return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=p, eps=eps,
                                 swap=swap, reduction=reduction)


def pairwise_distances(x, y, squared=False):
    """(P, Q) Euclidean distances by the Gram identity ||x||^2 + ||y||^2 - 2 x.y (one GEMM,
    no (P, Q, E) tensor), clamped at 0 against rounding. The square root's gradient is 0 at
    a zero distance (an anchor against itself), never NaN. As with every Gram-based distance,
    points much closer to each other than to the origin lose relative precision in fp32
    (the squared distance is a difference of large numbers); use fp64 if that matters."""
    op = "pairwise_distances"
    for t, name in ((x, "x"), (y, "y")):
        check_tensor(t, name, op)
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a (rows, E) tensor, got shape "
                             f"{tuple(t.shape)}")
    _check_same_width(x, y, "x", "y", op)
    check_bool(squared, "squared", op)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.t())
    d2 = torch.clamp_min(d2, 0.0)
    if squared:
        return d2
    zero = d2 == 0
    # sqrt of 0 has an infinite derivative: take it of 1 there and put the 0 back
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, d2)))


def _mined(distances, labels_a, labels_b, margin, mining, exclude_self):
    positive = labels_a[:, None] == labels_b[None, :]
    if exclude_self:
        positive = positive & ~torch.eye(labels_a.shape[0], dtype=torch.bool,
                                         device=labels_a.device)
    negative = labels_a[:, None] != labels_b[None, :]
    if mining == "hard":
        # per anchor: the farthest positive, the nearest negative (masked max / min)
        hardest_positive = torch.where(positive, distances, -math.inf).amax(dim=1)
        hardest_negative = torch.where(negative, distances, math.inf).amin(dim=1)
        valid = positive.any(dim=1) & negative.any(dim=1)
        losses = torch.clamp_min(hardest_positive - hardest_negative + margin, 0)
        losses = torch.where(valid, losses, 0.0)
        return losses.sum() / torch.clamp_min(valid.sum(), 1)
    # Batch all without the (A, Q, Q) tensor. For anchor i and positive j the negatives k
    # with a positive loss are those with d_ik < d_ij + margin; with the anchor's negative
    # distances sorted increasingly (non-negatives moved to the end as +inf), their count c_ij
    # is a searchsorted and their distances' sum a prefix sum P_i[c_ij], so
    #   sum_k relu(d_ij - d_ik + margin) = c_ij (d_ij + margin) - P_i[c_ij].
    # The gradient flows through d_ij and through the gathered prefix sums (the sort's
    # values): d/d d_ij = c_ij, d/d d_ik = -(number of positives j that count k).
    sorted_negatives, _ = torch.sort(torch.where(negative, distances, math.inf), dim=1)
    finite = torch.isfinite(sorted_negatives)
    prefix = torch.cumsum(torch.where(finite, sorted_negatives, 0.0), dim=1)
    prefix = torch.cat([prefix.new_zeros(prefix.shape[0], 1), prefix], dim=1)  # P[0] = 0
    threshold = (distances + margin).detach().contiguous()
    counts = torch.searchsorted(sorted_negatives.detach().contiguous(), threshold, side="left")
    counts = torch.where(positive, counts, 0)
    totals = counts * (distances + margin) - torch.gather(prefix, 1, counts)
    totals = torch.where(positive, totals, 0.0)
    # c_ij counts exactly the triplets (i, j, k) with a positive loss
    return totals.sum() / torch.clamp_min(counts.sum(), 1)


def _check_pair_labels(embeddings, labels, op):
    _check_embeddings(embeddings, "embeddings", op)
    _check_labels(labels, embeddings.shape[0], "labels", op, embeddings.device)


def batch_hard_triplet_loss(embeddings, labels, margin=1.0, squared=False):
    """Batch-hard triplet loss over a (B, E) batch: for every anchor with a positive and a
    negative, relu(farthest positive - nearest negative + margin), averaged over those
    anchors. Euclidean distances (squared ones with squared=True); one (B, B) matrix."""
    op = "batch_hard_triplet_loss"
    _check_pair_labels(embeddings, labels, op)
    margin = _check_margin(margin, op)
    check_bool(squared, "squared", op)
    d = pairwise_distances(embeddings, embeddings, squared)
    return _mined(d, labels, labels, margin, "hard", exclude_self=True)


def batch_all_triplet_loss(embeddings, labels, margin=1.0, squared=False):
    """Batch-all triplet loss: relu(d(a, p) - d(a, n) + margin) over every valid triplet,
    averaged over the triplets with a positive loss (0 when there is none). O(B^2 log B)
    time and O(B^2) memory: the B x B x B triplet tensor is never formed (see _mined)."""
    op = "batch_all_triplet_loss"
    _check_pair_labels(embeddings, labels, op)
    margin = _check_margin(margin, op)
    check_bool(squared, "squared", op)
    d = pairwise_distances(embeddings, embeddings, squared)
    return _mined(d, labels, labels, margin, "all", exclude_self=True)


def cross_modal_triplet_loss(anchors, others, anchor_labels, other_labels, margin=1.0,
                             mining="hard", squared=False):
    """Triplets whose anchor comes from one modality (anchors (A, E)) and whose positive and
    negative come from another (others (Q, E)): a positive shares the anchor's label.
    mining "hard" (per anchor the farthest positive, the nearest negative) or "all"."""
    op = "cross_modal_triplet_loss"
    _check_embeddings(anchors, "anchors", op)
    _check_embeddings(others, "others", op)
    _check_same_width(anchors, others, "anchors", "others", op)
    _check_labels(anchor_labels, anchors.shape[0], "anchor_labels", op, anchors.device)
    _check_labels(other_labels, others.shape[0], "other_labels", op, anchors.device)
    margin = _check_margin(margin, op)
    check_choice(mining, "mining", ("hard", "all"), op)
    check_bool(squared, "squared", op)
    d = pairwise_distances(anchors, others, squared)
    return _mined(d, anchor_labels, other_labels, margin, mining, exclude_self=False)


# -------------------------------------------------------------------- contrastive

class _FirstOrderOnly(torch.autograd.Function):
    """grad, tied to the loss's inputs so that differentiating it (a second derivative of
    the contrastive loss) raises instead of silently treating the backward as constant."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("contrastive_loss: second derivatives are not supported (its "
                           "blockwise backward is first order)")


def _without_autocast(device):
    """Autocast off for `device`'s type; nothing to turn off where autocast does not exist
    (meta tensors: torch.autocast("meta") raises)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _BlockwiseInfoNCE(torch.autograd.Function):
    """InfoNCE over L = a b^T / T (a, b already normalised), one (block, B) slab of L at a
    time: the forward keeps O(B) statistics, the backward recomputes each slab. With
    p = softmax over a row, q = softmax over a column:
        loss  = w_r mean_i (-log p_ii) + w_c mean_j (-log q_jj)
        dL_ij = (w_r p_ij + w_c q_ij - (w_r + w_c) [i = j]) / B
        da    = dL b / T,  db = dL^T a / T
    (w_r, w_c) = (1/2, 1/2) symmetric, (1, 0) one-directional. Slabs run in fp32 or fp64.

    Precision: a row's softmax is kept as its diagonal term d_i = exp(L_ii - shift_i) and
    the sum of its other terms s_i (the diagonal zeroed before summing), with L_ii taken
    from the slab's own GEMM. Then -log p_ii = log1p(s_i / d_i) and p_ii - 1 = -s_i /
    (d_i + s_i) are accurate when the batch is nearly aligned (p_ii -> 1, small temperature:
    CLIP's 0.01): forming log(sum) - L_ii or p_ii - 1 from the full sum cancels, which cost
    fp32 gradients ~8% at T = 0.0125 (eager fp32: 0.5%). Columns likewise (an online
    maximum across slabs). When |L| <= bound cannot overflow exp (fp32: 2 bound < 80;
    fp64: < 700) the shift is 0: one exponential per entry serves rows and columns.
    When one slab holds all of L (B <= block) the forward forms dL itself and keeps it (the
    memory of that one slab), so the backward is two GEMMs and no recomputation."""

    @staticmethod
    def forward(ctx, a, b, temperature, symmetric, block, bound):
        # in fp32 / fp64 whatever an enclosing autocast says: under fp16 autocast the slab's
        # GEMM would come back in fp16, where exp(L) overflows past L = 11
        with _without_autocast(a.device):
            return _BlockwiseInfoNCE._forward(ctx, a, b, temperature, symmetric, block, bound)

    @staticmethod
    def backward(ctx, grad):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad(), _without_autocast(grad.device):
            grads = _BlockwiseInfoNCE._backward(ctx, grad)
        if create_graph:  # the slabs' in-place work is first order: differentiating raises
            a, b = ctx.saved_tensors[:2]
            grads = tuple(g if g is None else _FirstOrderOnly.apply(g, a, b) for g in grads)
        return grads

    @staticmethod
    def _forward(ctx, a, b, temperature, symmetric, block, bound):
        B = a.shape[0]
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        a_scaled, b_acc = a.to(acc) * (1.0 / temperature), b.to(acc)
        unshifted = bound is not None and 2 * bound < (700.0 if acc == torch.float64 else 80.0)
        w_row, w_col = (0.5, 0.5) if symmetric else (1.0, 0.0)
        diagonal = torch.empty(B, dtype=acc, device=a.device)      # L_ii
        row_shift = None if unshifted else torch.empty_like(diagonal)
        row_d, row_s = torch.empty_like(diagonal), torch.empty_like(diagonal)
        col_shift = None if unshifted or not symmetric else torch.full_like(diagonal, -math.inf)
        col_s = torch.zeros_like(diagonal)
        one_slab = B <= block
        for start in range(0, B, block):
            rows = slice(start, start + block)
            L = torch.mm(a_scaled[rows], b_acc.t())  # (n, B)
            local, index = _slab_diagonal(start, L.shape[0], a.device)
            diagonal[rows] = L[local, index]
            if unshifted:
                E = L.exp_()  # exp(L): every entry in [exp(-bound), exp(bound)]
                row_d[rows] = E[local, index]
                E[local, index] = 0.0
                row_s[rows] = E.sum(dim=1)
                if symmetric:
                    col_s += E.sum(dim=0)
                continue
            if symmetric:  # online column maximum: rescale the running sums
                new_shift = torch.maximum(col_shift, L.amax(dim=0))
                col_s.mul_(torch.exp(col_shift - new_shift))
                E_col = torch.exp(L - new_shift)
                E_col[local, index] = 0.0
                col_s += E_col.sum(dim=0)
                col_shift = new_shift
            row_shift[rows] = L.amax(dim=1)
            E = torch.exp(L - row_shift[rows, None])
            row_d[rows] = E[local, index]
            E[local, index] = 0.0
            row_s[rows] = E.sum(dim=1)
        loss = w_row * _minus_log_p(row_d, row_s, row_shift, diagonal).mean()
        if symmetric:
            col_d = row_d if unshifted else torch.exp(diagonal - col_shift)
            loss = loss + w_col * _minus_log_p(col_d, col_s, col_shift, diagonal).mean()
        # the softmaxes' scales w / (d + s) and the diagonal of w_r p + w_c q - (w_r + w_c)
        row_weight = w_row / (row_d + row_s)
        col_weight = w_col / (col_d + col_s) if symmetric else None
        diagonal_grad = -row_s * row_weight
        if symmetric:
            diagonal_grad -= col_s * col_weight
        ctx.temperature, ctx.symmetric, ctx.block = temperature, symmetric, block
        ctx.kept_gradient = one_slab
        if one_slab:  # dL now, from the one slab (E holds its row exponentials)
            d_logits = _slab_gradient(a_scaled, b_acc, 0, row_weight, col_weight, row_shift,
                                      col_shift, diagonal_grad, exp_rows=E if unshifted else None,
                                      logits=None if unshifted else L)
            ctx.save_for_backward(a, b, d_logits)
        else:
            ctx.save_for_backward(a, b, row_weight, col_weight, row_shift, col_shift,
                                  diagonal_grad)
        return loss.to(a.dtype)

    @staticmethod
    def _backward(ctx, grad):
        T, block = ctx.temperature, ctx.block
        if ctx.kept_gradient:
            a, b, d_logits = ctx.saved_tensors
            acc = d_logits.dtype
            scale = grad.to(acc) / (a.shape[0] * T)
            grad_a = (d_logits @ b.to(acc)) * scale
            grad_b = (d_logits.t() @ a.to(acc)) * scale
            return grad_a.to(a.dtype), grad_b.to(b.dtype), None, None, None, None
        a, b, row_weight, col_weight, row_shift, col_shift, diagonal_grad = ctx.saved_tensors
        acc = row_weight.dtype
        B = a.shape[0]
        a_scaled, b_acc = a.to(acc) * (1.0 / T), b.to(acc)
        grad_a = torch.empty_like(a_scaled)
        grad_b = torch.zeros_like(b_acc)
        for start in range(0, B, block):
            rows = slice(start, start + block)
            d_slab = _slab_gradient(a_scaled[rows], b_acc, start, row_weight[rows], col_weight,
                                    None if row_shift is None else row_shift[rows], col_shift,
                                    diagonal_grad[rows])
            torch.mm(d_slab, b_acc, out=grad_a[rows])
            grad_b.addmm_(d_slab.t(), a_scaled[rows])  # a_scaled carries the 1 / T
        scale = grad.to(acc) / B
        grad_a.mul_(scale / T)
        grad_b.mul_(scale)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), None, None, None, None


def _slab_diagonal(start, rows, device):
    """(local row, column) of the diagonal entries L_ii of the slab of rows start.."""
    index = torch.arange(start, start + rows, device=device)
    return index - start, index


def _minus_log_p(d, s, shift, diagonal):
    """-log(d / (d + s)) = log1p(s / d), accurate as s / d -> 0; where d underflows (the
    diagonal far below the shift), (shift - L_ii) + log(d + s)."""
    if shift is None:  # d = exp(L_ii) >= exp(-bound): no underflow
        return torch.log1p(s / d)
    return torch.where(d > 1e-30, torch.log1p(s / d), (shift - diagonal) + torch.log(d + s))


def _slab_gradient(a_scaled_rows, b_acc, start, row_weight, col_weight, row_shift, col_shift,
                   diagonal_grad, exp_rows=None, logits=None):
    """w_r p + w_c q - (w_r + w_c) I on the slab of rows start.. (row_weight = w_r / (d + s)
    of its rows, col_weight of every column; shifts None when unshifted). When already at
    hand: exp_rows, the slab's exp(L) (unshifted; overwritten), or its logits L (shifted)."""
    if exp_rows is not None:
        d_slab = exp_rows
    else:
        L = torch.mm(a_scaled_rows, b_acc.t()) if logits is None else logits
        d_slab = L.exp_() if row_shift is None else torch.exp(L - row_shift[:, None])
    if row_shift is None:  # one exponential for both softmaxes
        if col_weight is None:
            d_slab.mul_(row_weight[:, None])
        else:
            d_slab.mul_(row_weight[:, None] + col_weight[None, :])
    else:
        d_slab.mul_(row_weight[:, None])
        if col_weight is not None:
            d_slab += torch.exp(L - col_shift[None, :]) * col_weight[None, :]
    local, index = _slab_diagonal(start, d_slab.shape[0], d_slab.device)
    d_slab[local, index] = diagonal_grad  # -(w_r s / (d + s) + w_c s' / (d' + s')), exact
    return d_slab


def contrastive_loss(a, b, temperature=0.07, symmetric=True, *, normalize=True, block=None):
    """InfoNCE between matched rows of a and b (B, E) (CLIP-style): row i of a should pick
    row i of b among all rows of b (and, symmetric, the other way round); logits are cosine
    similarities / temperature (normalize=False: plain dot products). Computed one
    (block, B) slab of logits at a time, forward and backward: O(B * block) memory for any
    B (block=None: sized so a slab holds about 2^24 entries on a GPU, 2^21 on a CPU)."""
    op = "contrastive_loss"
    _check_embeddings(a, "a", op)
    _check_embeddings(b, "b", op)
    check_loss_pair(a, b, "a", "b", op)
    check_positive_real(temperature, "temperature", op)
    B = a.shape[0]
    if block is None:
        # ~2^24 entries per slab on a GPU (few, large GEMMs); ~2^21 (8 MB in fp32) on a CPU,
        # where a slab that stays in the caches beats fewer, larger ones (B = 4096, E = 256,
        # forward+backward on 2 cores: ~158 ms as one slab, ~140 ms in 512-row slabs)
        entries = 1 << (24 if a.is_cuda else 21)
        block = max(1, min(B, entries // B))
    check_int(block, "block", op, minimum=1)
    check_bool(symmetric, "symmetric", op)  # (symmetric="no" ran as True)
    check_bool(normalize, "normalize", op)
    if not torch.compiler.is_compiling() and _dispatch.transformed():
        # forward AD / torch.func: the blockwise Function's backward is reverse-mode only
        return contrastive_loss_reference(a, b, temperature, symmetric, normalize)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    bound = 1.0 / float(temperature) if normalize else None  # |cosine| <= 1
    return _BlockwiseInfoNCE.apply(a, b, float(temperature), bool(symmetric), block, bound)


# ------------------------------------------------------------- gradient reversal

class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(x, lambda_):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.lambda_ = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lambda_ * grad, None


class _GradientReversalUnderTransforms(_GradientReversal):
    """The same with a jvp and a generated vmap rule, for forward-mode AD and torch.func
    (torch.compile cannot trace a Function with a custom jvp, so only there)."""
    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx, x_tangent, _):
        return x_tangent  # the forward is the identity; only the backward is reversed


def grad_reverse(x, lambda_=1.0):
    """Identity in the forward, -lambda * grad in the backward (Ganin & Lempitsky's gradient
    reversal layer, for domain-adversarial training)."""
    check_tensor(x, "x", "grad_reverse")
    if not (x.is_floating_point() or x.is_complex()):
        # an integer tensor has no gradient to reverse: the layer would silently do nothing
        raise TypeError(f"grad_reverse: x must be a floating-point or complex tensor (its "
                        f"gradient is reversed), got {x.dtype}")
    check_finite_real(lambda_, "lambda_", "grad_reverse")
    if not torch.compiler.is_compiling() and _dispatch.transformed():
        return _GradientReversalUnderTransforms.apply(x, float(lambda_))
    return _GradientReversal.apply(x, float(lambda_))


class GradientReversal(torch.nn.Module):
    """nn.Module form of grad_reverse; lambda_ can be changed between steps (a schedule)."""

    def __init__(self, lambda_=1.0):
        super().__init__()
        self.lambda_ = lambda_

    def forward(self, x):
        return grad_reverse(x, self.lambda_)

    def extra_repr(self):
        return f"lambda_={self.lambda_}"


# ---------------------------------------------------------------------- deep CCA

def cca_loss(h1, h2, k=None, eps=1e-4):
    """Deep CCA: -(sum of the top-k canonical correlations) between views h1 (n, d1) and
    h2 (n, d2), k = min(d1, d2) by default. The covariances are regularised (S11 = H1c^T
    H1c / (n - 1) + eps I) and whitened by Cholesky factors, T = L1^-1 S12 L2^-T, whose
    singular values are the canonical correlations (any square root whitens: they do not
    depend on which). Stable on rank-deficient batches: no eigendecomposition, whose
    gradient divides by eigenvalue gaps (all equal to eps in a rank-deficient direction),
    and svdvals' gradient U V^T needs no gaps either. Computed in fp64 for fp32 inputs."""
    op = "cca_loss"
    _check_embeddings(h1, "h1", op)
    _check_embeddings(h2, "h2", op)
    if h1.shape[0] != h2.shape[0]:
        raise ValueError(f"{op}: h1 has {h1.shape[0]} rows but h2 has {h2.shape[0]}; the two "
                         "views must describe the same samples")
    if h1.shape[0] < 2:
        raise ValueError(f"{op}: need at least 2 samples, got {h1.shape[0]}")
    if h1.dtype != h2.dtype or h1.device != h2.device:
        raise TypeError(f"{op}: h1 and h2 must have the same dtype and device")
    check_positive_real(eps, "eps", op)
    full = min(h1.shape[1], h2.shape[1])
    k = full if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= full:
        raise ValueError(f"{op}: k must be an int in [1, min(d1, d2) = {full}], got {k!r}")
    work = torch.float64 if h1.dtype in (torch.float32, torch.float64) else torch.float32
    x, y = h1.to(work), h2.to(work)
    n = x.shape[0]
    xc, yc = x - x.mean(0), y - y.mean(0)
    s11 = xc.t() @ xc / (n - 1) + eps * torch.eye(x.shape[1], dtype=work, device=x.device)
    s22 = yc.t() @ yc / (n - 1) + eps * torch.eye(y.shape[1], dtype=work, device=x.device)
    s12 = xc.t() @ yc / (n - 1)
    if torch.compiler.is_compiling() or x.device.type == "meta":
        # no data-dependent diagnosis in a graph (torch's error) or without data (meta)
        l1, l2 = torch.linalg.cholesky(s11), torch.linalg.cholesky(s22)
    else:
        l1, info1 = torch.linalg.cholesky_ex(s11)
        l2, info2 = torch.linalg.cholesky_ex(s22)
        if bool((info1 != 0) | (info2 != 0)):  # one host read
            _explain_cholesky_failure(op, ((h1, "h1", s11, info1), (h2, "h2", s22, info2)),
                                      eps)
    # T = L1^-1 S12 L2^-T by two triangular solves
    t = torch.linalg.solve_triangular(l1, s12, upper=False)
    t = torch.linalg.solve_triangular(l2, t.t(), upper=False).t()
    correlations = torch.linalg.svdvals(t)  # descending
    return (-correlations[:k].sum()).to(h1.dtype)


def _explain_cholesky_failure(op, views, eps):
    """Why S + eps I had no Cholesky factor, naming the view: non-finite values, or an eps
    below the rounding of the features' variance (S + eps I is positive definite in exact
    arithmetic, not in floating point once eps < ~1e-16 of the largest variance)."""
    for h, name, s, info in views:
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"{op}: {name} contains NaN or inf")
    for h, name, s, info in views:
        if int(info) != 0:
            largest = float(s.diagonal().max())
            raise ValueError(
                f"{op}: the covariance of {name} plus eps I is not positive definite in "
                f"floating point (largest feature variance {largest:.3g}, eps = {eps}): "
                f"{name} is rank-deficient at a scale where eps is below rounding; use a "
                f"larger eps or rescale {name}")
