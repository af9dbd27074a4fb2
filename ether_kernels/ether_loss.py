"""The Ether loss: public function, modality groups, and the ops' fake kernels and autograd.

    loss = MSE(y_pred, y_true) + alpha * sum_m w_m * phi(mean_m(y_pred) - mean(y_pred))

Semantics: specs/ether_loss.md; the readable version is reference/ether_loss.py. The fast
paths are the ops ether_kernels::ether_loss_forward / _backward (C++ CPU, CUDA C++) and
their *_triton twins, all with the same schemas:

  forward(y_pred, y_true, member_channel, member_group, weights, alpha, discrepancy,
          reduction, per_sample) -> (loss, coef)
  backward(grad_loss, y_pred, y_true, coef, reduction, per_sample, need_pred_grad,
           need_true_grad) -> (grad_pred, grad_true)

The forward reads the inputs once and returns, next to the loss, the per-channel
coefficient coef[c] = d(alpha * inter) / d y_pred[e] for any element e of channel c; the
backward is then one elementwise pass (spec, "closed form of the gradient"):
  d loss / d y_pred = g * (k * (y_pred - y_true) + coef[channel])
  d loss / d y_true = -g * k * (y_pred - y_true)
with k = 2 / N for reduction="mean" and 2 for "sum".
"""

import numbers

import torch

from . import _dispatch, _double_backward, _extension
from ._checks import check_choice, check_loss_pair, check_non_negative_real
from ._triton_support import triton_import_error
from .reference import ether_loss_reference

_DISCREPANCIES = {"l1": 0, "l2": 1}
_REDUCTIONS = {"mean": 0, "sum": 1}
_OP = "ether_loss"


class ModalityGroups:
    """Which channels (dim 1 of y_pred) make up each modality.

    Accepts the published list form (one entry per modality: an int, a slice, a list or
    tuple of ints, or a 1-D integer tensor; negative ints count from the end) or a 1-D
    integer tensor of modality ids, one per channel, in [0, M). Everything that can be
    checked without knowing the channel count is checked here, at construction; the rest
    (ranges, negative indices, slices) when the channel count is first seen.
    """

    def __init__(self, modalities):
        self._ids = None
        self._entries = None
        self._resolved = {}  # channel count -> tuple of channel tuples
        self._tensors = {}  # (channel count, device) -> tensors for the kernels / reference
        self._weights = {}  # (channel count, device) -> (the last weights, their tensor)
        if isinstance(modalities, ModalityGroups):
            self._ids, self._entries = modalities._ids, modalities._entries
        elif isinstance(modalities, torch.Tensor):
            self._ids = self._parse_ids(modalities)
        elif isinstance(modalities, (list, tuple)):
            if len(modalities) == 0:
                raise ValueError("modalities must name at least one modality, got an empty list")
            self._entries = tuple(self._parse_entry(entry, i) for i, entry in enumerate(modalities))
        else:
            raise TypeError("modalities must be a list (one int, slice, list of ints or integer "
                            "tensor per modality) or an integer tensor of modality ids, got "
                            f"{type(modalities).__name__}")

    @staticmethod
    def _parse_ids(ids):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"modalities: a modality-id tensor must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("modalities: a modality-id tensor must be 1-D with one id per channel, "
                             f"got shape {tuple(ids.shape)}")
        ids = tuple(int(v) for v in ids.tolist())
        if min(ids) < 0:
            raise ValueError(f"modalities: modality ids must be >= 0, got {min(ids)}")
        present = sorted(set(ids))
        if len(present) != present[-1] + 1:  # then some id below the largest is missing
            missing = next(m for m, v in enumerate(present) if m != v)
            raise ValueError(f"modalities: modality ids must cover 0..{present[-1]}; modality "
                             f"{missing} has no channel (an empty group)")
        return ids

    @staticmethod
    def _parse_entry(entry, i):
        where = f"modalities[{i}]"
        if isinstance(entry, bool):
            raise TypeError(f"{where} must be an int, slice, list of ints or integer tensor, got bool")
        if isinstance(entry, numbers.Integral):
            return int(entry)
        if isinstance(entry, slice):
            for part in (entry.start, entry.stop, entry.step):
                if part is not None and (isinstance(part, bool) or not isinstance(part, numbers.Integral)):
                    raise TypeError(f"{where}: slice bounds must be ints or None, got {entry}")
            if entry.step == 0:
                raise ValueError(f"{where}: slice step cannot be zero")
            start, stop, step = entry.start, entry.stop, entry.step or 1
            # (a missing start is 0 going up, the last channel going down: not known yet)
            if start is None and step > 0:
                start = 0
            if start is not None and stop is not None and start >= 0 and stop >= 0 and \
                    len(range(start, stop, step)) == 0:
                raise ValueError(f"{where} = {entry} selects no channel (an empty group)")
            return entry
        if isinstance(entry, torch.Tensor):
            if entry.dtype.is_floating_point or entry.dtype.is_complex or entry.dtype == torch.bool:
                raise TypeError(f"{where} must hold integer channel indices, got {entry.dtype}")
            if entry.dim() > 1:
                raise ValueError(f"{where} must be a 1-D tensor of channel indices, got shape "
                                 f"{tuple(entry.shape)}")
            entry = [int(v) for v in entry.reshape(-1).tolist()]
        if isinstance(entry, (list, tuple)):
            if len(entry) == 0:
                raise ValueError(f"{where} is empty: every modality needs at least one channel")
            for value in entry:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise TypeError(f"{where} must hold ints, got {type(value).__name__}")
            seen = set()
            for value in entry:
                if int(value) in seen:
                    raise ValueError(f"{where} lists channel {int(value)} twice")
                seen.add(int(value))
            return tuple(int(v) for v in entry)
        raise TypeError(f"{where} must be an int, slice, list of ints or integer tensor, got "
                        f"{type(entry).__name__}")

    @property
    def num_modalities(self):
        return (max(self._ids) + 1) if self._ids is not None else len(self._entries)

    def channels(self, num_channels):
        """One tuple of channel indices (non-negative, sorted as given) per modality."""
        groups = self._resolved.get(num_channels)
        if groups is None:
            groups = self._resolve(num_channels)
            self._resolved[num_channels] = groups
        return groups

    def _resolve(self, C):
        if self._ids is not None:
            if len(self._ids) != C:
                raise ValueError(f"modalities: the modality-id tensor has {len(self._ids)} entries "
                                 f"but y_pred has {C} channels (dim 1)")
            return tuple(tuple(c for c in range(C) if self._ids[c] == m)
                         for m in range(self.num_modalities))
        groups = []
        for i, entry in enumerate(self._entries):
            where = f"modalities[{i}]"
            if isinstance(entry, slice):
                channels = tuple(range(*entry.indices(C)))
                if not channels:
                    raise ValueError(f"{where} = {entry} selects no channel of y_pred's {C} "
                                     "(an empty group)")
            else:
                indices = (entry,) if isinstance(entry, int) else entry
                channels = []
                for index in indices:
                    if not -C <= index < C:
                        raise IndexError(f"{where}: channel index {index} is out of range for "
                                         f"y_pred with {C} channels (dim 1)")
                    channels.append(index % C)
                if len(set(channels)) != len(channels):
                    raise ValueError(f"{where} names the same channel twice (after resolving "
                                     f"negative indices against {C} channels)")
                channels = tuple(channels)
            groups.append(channels)
        return tuple(groups)

    def tensors(self, num_channels, device, weights):
        """(member_channel, member_group, weights, index tensor per group) on `device`.

        Cached, so that a training loop builds them once (on a GPU, building them means a
        host-to-device copy). The weights tensor is kept for the last weights seen only: a
        weight schedule gets a new one per change, not one more cache entry per step.
        """
        key = (num_channels, str(device))
        cached = self._tensors.get(key)
        if cached is None:
            groups = self.channels(num_channels)
            member_channel = [c for g in groups for c in g]
            member_group = [m for m, g in enumerate(groups) for _ in g]
            cached = self._tensors[key] = (
                torch.tensor(member_channel, dtype=torch.int64, device=device),
                torch.tensor(member_group, dtype=torch.int64, device=device),
                [torch.tensor(g, dtype=torch.int64, device=device) for g in groups],
            )
        last_weights = self._weights.get(key)
        if last_weights is None or last_weights[0] != weights:
            last_weights = self._weights[key] = (
                weights, torch.tensor(weights, dtype=torch.float64, device=device))
        member_channel, member_group, index_tensors = cached
        return member_channel, member_group, last_weights[1], index_tensors

    def key(self):
        """A hashable description of the groups (equal groups, equal keys)."""
        if self._ids is not None:
            return ("ids", self._ids)
        return ("entries",) + tuple(
            ("slice", e.start, e.stop, e.step) if isinstance(e, slice) else e for e in self._entries)

    def __repr__(self):
        if self._ids is not None:
            return f"ModalityGroups(ids={list(self._ids)})"
        return f"ModalityGroups({list(self._entries)})"


_SHARED_GROUPS = {}  # key -> ModalityGroups, so that the functional API reuses its tensors
_SHARED_GROUPS_MAX = 256


def shared_groups(modalities):
    """The ModalityGroups for `modalities`, one instance per distinct grouping: its cached
    device tensors are built once, not on every call of the functional API (on a GPU,
    building them is a host-to-device copy, i.e. a synchronisation)."""
    groups = ModalityGroups(modalities)
    key = groups.key()
    cached = _SHARED_GROUPS.get(key)
    if cached is None:
        if len(_SHARED_GROUPS) >= _SHARED_GROUPS_MAX:
            _SHARED_GROUPS.clear()
        cached = _SHARED_GROUPS[key] = groups
    return cached


def normalize_weights(weights, num_modalities):
    """Per-modality weights as a tuple of floats (all ones by default)."""
    if weights is None:
        return (1.0,) * num_modalities
    if isinstance(weights, torch.Tensor):
        if weights.requires_grad:
            raise ValueError("ether_loss: weights must be constants (a tensor that requires grad "
                             "is not supported)")
        weights = weights.detach().reshape(-1).tolist()
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"ether_loss: weights must be a sequence of {num_modalities} numbers, got "
                        f"{type(weights).__name__}")
    if len(weights) != num_modalities:
        raise ValueError(f"ether_loss: weights has {len(weights)} entries but there are "
                         f"{num_modalities} modalities")
    return tuple(check_non_negative_real(w, f"weights[{i}]", "ether_loss")
                 for i, w in enumerate(weights))


def ether_loss(y_pred, y_true, modalities, alpha=1.0, *, discrepancy="l1", weights=None,
               reduction="mean", per_sample=False):
    """The Ether multimodal loss: MSE + alpha * sum_m w_m * phi(mean_m - overall mean).

    Args:
        y_pred, y_true: (B, C, *rest) floating-point tensors (fp32, fp64, fp16, bf16).
        modalities: one entry per modality indexing dim 1 (int, slice, list of ints,
            integer tensor), or an integer tensor of modality ids of shape (C,), or a
            ModalityGroups. Groups may overlap and need not cover every channel.
        alpha: weight of the inter-modal term, >= 0 (0 gives exactly the MSE).
        discrepancy: "l1" (|x|, the published loss) or "l2" (x**2).
        weights: per-modality weights w_m (length M, >= 0); default all ones.
        reduction: "mean" (published) or "sum" for the MSE term.
        per_sample: align every sample's modality means (averaged over the batch) instead
            of the batch means.
    Returns: a 0-dim tensor in the input dtype, differentiable in y_pred and y_true.
    """
    alpha = check_non_negative_real(alpha, "alpha", _OP)
    check_choice(discrepancy, "discrepancy", tuple(_DISCREPANCIES), _OP)
    check_choice(reduction, "reduction", tuple(_REDUCTIONS), _OP)
    if not isinstance(per_sample, bool):
        raise TypeError(f"{_OP}: per_sample must be a bool, got {type(per_sample).__name__}")
    groups = modalities if isinstance(modalities, ModalityGroups) else shared_groups(modalities)
    weights = normalize_weights(weights, groups.num_modalities)
    return ether_loss_checked(y_pred, y_true, groups, alpha, discrepancy, weights, reduction,
                              per_sample)


def ether_loss_checked(y_pred, y_true, groups, alpha, discrepancy, weights, reduction, per_sample):
    """ether_loss once the options are known to be valid (EtherLoss checks them once, at
    construction); only the tensors are checked here."""
    check_loss_pair(y_pred, y_true, "y_pred", "y_true", _OP)
    if y_pred.dim() < 2:
        raise ValueError(f"{_OP}: y_pred must have at least 2 dimensions (batch, channels, ...), "
                         f"got shape {tuple(y_pred.shape)}")
    if y_pred.numel() == 0:
        raise ValueError(f"{_OP}: y_pred must not be empty, got shape {tuple(y_pred.shape)}")
    member_channel, member_group, weights_tensor, index_tensors = groups.tensors(
        y_pred.shape[1], y_pred.device, weights)

    # On GPUs the CUDA C++ kernels first: on an H200 they ran forward+backward 1.9x to 3.8x
    # faster than the Triton ones (bench/results/cuda-nvidia-h200.md).
    backend = _dispatch.select(_OP, y_pred.device, cpu_backends=("cpp",),
                               gpu_backends=("cuda", "triton"))
    if backend == "reference":
        return ether_loss_reference(y_pred, y_true, index_tensors, weights, alpha, discrepancy,
                                    reduction, per_sample)
    forward = (torch.ops.ether_kernels.ether_loss_forward_triton if backend == "triton"
               else torch.ops.ether_kernels.ether_loss_forward)
    loss, _ = forward(y_pred, y_true, member_channel, member_group, weights_tensor, alpha,
                      _DISCREPANCIES[discrepancy], _REDUCTIONS[reduction], per_sample)
    return loss


# ---- registration: fake kernels (shapes for torch.compile / meta) and autograd ----------

def _forward_fake(y_pred, y_true, member_channel, member_group, weights, alpha, discrepancy,
                  reduction, per_sample):
    torch._check(y_pred.shape == y_true.shape)
    torch._check(y_pred.dim() >= 2)
    coef_dtype = torch.float64 if y_pred.dtype == torch.float64 else torch.float32
    coef_shape = (y_pred.shape[0], y_pred.shape[1]) if per_sample else (y_pred.shape[1],)
    return y_pred.new_empty(()), y_pred.new_empty(coef_shape, dtype=coef_dtype)


def _backward_fake(grad_loss, y_pred, y_true, coef, reduction, per_sample, need_pred_grad,
                   need_true_grad):
    torch._check(y_pred.shape == y_true.shape)
    grad_pred = y_pred.new_empty(y_pred.shape if need_pred_grad else (0,))
    grad_true = y_pred.new_empty(y_pred.shape if need_true_grad else (0,))
    return grad_pred, grad_true


def _setup_context(ctx, inputs, output):
    y_pred, y_true, member_channel, member_group, weights, alpha, discrepancy, reduction, \
        per_sample = inputs
    _, coef = output
    # the options, for a second derivative through the reference (_reference_loss)
    ctx.groups = (member_channel, member_group, weights, alpha, discrepancy)
    ctx.mark_non_differentiable(coef)
    # The second output never gets a gradient: without this, autograd would fill a tensor of
    # zeros of its size on every backward (for the MSE, a whole input-sized pass).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y_pred, y_true, coef)
    ctx.reduction = reduction
    ctx.per_sample = per_sample


def _reference_loss(y_pred, y_true, ctx):
    """The reference Ether loss with the op's options (its group tensors turned back into
    one channel index tensor per modality)."""
    member_channel, member_group, weights, alpha, discrepancy = ctx.groups
    groups = [member_channel[member_group == g] for g in range(weights.numel())]
    return ether_loss_reference(
        y_pred, y_true, groups, weights.tolist(), alpha,
        next(k for k, v in _DISCREPANCIES.items() if v == discrepancy),
        next(k for k, v in _REDUCTIONS.items() if v == ctx.reduction), ctx.per_sample)


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _grad_coef):
        if grad_loss is None:  # the loss itself was not used (grads are not materialized)
            return (None,) * 9
        y_pred, y_true, coef = ctx.saved_tensors
        need_pred, need_true = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if _double_backward.wants_graph():  # create_graph=True: through the reference
            a, b = _double_backward.distinct_nodes(y_pred, y_true)
            grad_pred, grad_true = _double_backward.reference_gradients(
                lambda: _reference_loss(a, b, ctx), (a, b), grad_loss)
            return (grad_pred if need_pred else None, grad_true if need_true else None,
                    None, None, None, None, None, None, None)
        grad_pred, grad_true = backward_op(grad_loss, y_pred, y_true, coef, ctx.reduction,
                                           ctx.per_sample, need_pred, need_true)
        return (grad_pred if need_pred else None, grad_true if need_true else None,
                None, None, None, None, None, None, None)
    return backward


def _register(forward_name, backward_name, backward_op):
    torch.library.register_fake(forward_name)(_forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    torch.library.register_autograd(forward_name, _make_backward(backward_op),
                                    setup_context=_setup_context)


if _extension.cpp_available:
    _register("ether_kernels::ether_loss_forward", "ether_kernels::ether_loss_backward",
              torch.ops.ether_kernels.ether_loss_backward)
if triton_import_error is None:
    from .triton import ether_loss as _triton_ether_loss

    _register("ether_kernels::ether_loss_forward_triton",
              "ether_kernels::ether_loss_backward_triton",
              _triton_ether_loss.ether_loss_backward_triton)
