"""The MultiModal loss (Moon & Lee, "Deep Metric Loss for Multimodal Learning"): instances
subgrouped by their unimodal contributions through learned non-negative proxies over the
modalities' class scores. The formula is the released code's (specs/multimodal_loss.md):

    w_j    = relu(W[:, j]) / max(||relu(W[:, j])||, 1e-12)        unit, non-negative proxies
    S_ij   = cos(z_i, w_j)                                          (B, C*K)
    a_i    = sum_j softmax_j(S_ij / gamma) w_j                      soft subgroup assignment
    att_ic = sum_m z_i[m*C + c] (1 + a_i[m*C + c])                  attention-weighted fusion
    sim_ic = sum_k softmax_c(S_ick / gamma) S_ick                   class-axis softmax
    loss   = mean_i CE(sim_i + att_i, y_i)

Backends: on CPU the fused C++ op (csrc/cpu/multimodal_loss.cpp), on CUDA tensors the fused
Triton kernel (triton/multimodal_loss.py): one pass over the batch, one sample at a time,
forms the loss and its gradients for z and W (the backward only scales them), so none of
the (B, C*K) intermediates is stored at all. predict() runs the reference (composite
PyTorch, differentiable).

One deliberate difference from the released code's gradients: where an entry of W is
exactly 0, relu (the spec) passes no gradient to it, while the released fc.clamp(min=0)
does (and then, for a column that is all zeros, through its two normalisations of a zero
vector, a gradient of size ~1/eps^2 = 1e24). Values agree everywhere; a W initialised to
exact zeros does not train here (the default initialisation is kaiming_uniform_).
"""

import math

import torch

from . import _dispatch, _double_backward, _extension
from ._checks import check_class_labels, check_positive_real, check_tensor
from ._triton_support import triton_import_error
from .reference.multimodal_loss import multimodal_logits_reference, multimodal_loss_reference

_OP = "multimodal_loss"


def _forward_fake(z, labels, W, num_classes, gamma, compute_grad):
    # the ops' gradients are contiguous, whatever the inputs' strides
    if compute_grad:
        return z.new_empty(()), z.new_empty(z.shape), W.new_empty(W.shape)
    return z.new_empty(()), z.new_empty(0), W.new_empty(0)


def _setup_context(ctx, inputs, output):
    z, labels, W, num_classes, gamma, _ = inputs
    _, grad_z, grad_W = output
    ctx.mark_non_differentiable(grad_z, grad_W)
    ctx.set_materialize_grads(False)
    ctx.options = (num_classes, gamma)
    # the inputs (references) serve a second derivative through the reference
    ctx.save_for_backward(grad_z, grad_W, z, labels, W)


def _backward(ctx, grad_loss, _grad_z, _grad_W):
    if grad_loss is None:  # the loss itself was not used
        return (None,) * 6
    grad_z, grad_W, z, labels, W = ctx.saved_tensors
    need_z, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    # create_graph=True, or an op called with compute_grad=False (no gradients formed): through
    # the reference
    if _double_backward.wants_graph() or (need_z and grad_z.shape != z.shape) or \
            (need_W and grad_W.shape != W.shape):
        a, b = _double_backward.distinct_nodes(z, W)
        grad_z, grad_W = _double_backward.reference_gradients(
            lambda: multimodal_loss_reference(a, labels, b, *ctx.options), (a, b), grad_loss)
        return (grad_z if need_z else None, None, grad_W if need_W else None, None, None, None)
    # the forward formed d mean-loss / d z and / d W: scale them by the upstream gradient
    return (grad_z * grad_loss if need_z else None, None,
            grad_W * grad_loss if need_W else None, None, None, None)


_CPU_BACKENDS = ()
if _extension.cpp_available and hasattr(torch.ops.ether_kernels, "multimodal_loss_forward"):
    _CPU_BACKENDS = ("cpp",)
    torch.library.register_fake("ether_kernels::multimodal_loss_forward")(_forward_fake)
    torch.library.register_autograd("ether_kernels::multimodal_loss_forward", _backward,
                                    setup_context=_setup_context)
_GPU_BACKENDS = ()
if triton_import_error is None:
    from .triton import multimodal_loss as _triton_multimodal_loss  # noqa: F401 (registers)

    _GPU_BACKENDS = ("triton",)
    torch.library.register_autograd("ether_kernels::multimodal_loss_forward_triton", _backward,
                                    setup_context=_setup_context)


def _check_labels(labels, num_classes):
    """Every label in [0, C) (check_class_labels). (cross_entropy's ignore_index -100 is not
    a label here: the loss is the mean over every row.)"""
    if _dispatch.transformed():
        return  # (no host read of vmap-batched labels)
    check_class_labels(labels, num_classes, "labels", _OP)


def multimodal_loss(z, labels, W, num_classes, gamma):
    """The MultiModal loss with the proxies W (M*C, C*K), on the backend chosen by device."""
    backend = _dispatch.select(_OP, z.device, cpu_backends=_CPU_BACKENDS,
                               gpu_backends=_GPU_BACKENDS)
    labels = labels.long()  # int32 / int16 / uint8 labels on every backend
    _check_labels(labels, num_classes)
    if backend in ("cpp", "triton"):
        # the kernels read row-major z and W (a transposed view is copied once)
        z, weight = z.contiguous(), W.to(z.dtype).contiguous()
        compute_grad = torch.is_grad_enabled() and (z.requires_grad or weight.requires_grad)
        op = (torch.ops.ether_kernels.multimodal_loss_forward if backend == "cpp" else
              torch.ops.ether_kernels.multimodal_loss_forward_triton)
        loss, _, _ = op(z, labels, weight, num_classes, float(gamma), compute_grad)
        return loss
    return multimodal_loss_reference(z, labels, W.to(z.dtype), num_classes, gamma)


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
        gamma = check_positive_real(gamma, "gamma", "MultiModalLoss")  # (a bool ran as 1.0)
        self.num_classes, self.num_modalities = num_classes, num_modalities
        self.proxies_per_class, self.gamma = proxies_per_class, float(gamma)
        self.W = torch.nn.Parameter(torch.empty(num_modalities * num_classes,
                                                num_classes * proxies_per_class))
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))

    def _check_z(self, z, op):
        check_tensor(z, "z", f"MultiModalLoss.{op}")
        width = self.num_modalities * self.num_classes
        if z.dim() != 2 or z.shape[1] != width or z.shape[0] == 0:
            raise ValueError(f"MultiModalLoss.{op}: z must be a non-empty (B, M*C) = (B, "
                             f"{width}) tensor, got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"MultiModalLoss.{op}: z must be floating point, got {z.dtype}")

    def _check_device(self, z, op, labels=None):
        # A meta / other-device argument would reach the fake kernel or a kernel that reads
        # it as z's: an uninitialised "loss" instead of an error.
        for name, t in (("labels", labels), ("W (the module's parameter)", self.W)):
            if t is not None and t.device != z.device:
                raise RuntimeError(f"MultiModalLoss.{op}: {name} is on {t.device} but z is on "
                                   f"{z.device}")

    def predict(self, z):
        """(B, C) logits sim + att."""
        self._check_z(z, "predict")
        self._check_device(z, "predict")
        return multimodal_logits_reference(z, self.W.to(z.dtype), self.num_classes, self.gamma)

    def forward(self, z, labels):
        self._check_z(z, "forward")
        check_tensor(labels, "labels", "MultiModalLoss.forward")
        if labels.dim() != 1 or labels.shape[0] != z.shape[0] or labels.is_floating_point() or \
                labels.is_complex() or labels.dtype == torch.bool:  # (bools ran as classes 0, 1)
            raise ValueError(f"MultiModalLoss.forward: labels must be a ({z.shape[0]},) integer "
                             f"tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        self._check_device(z, "forward", labels)
        return multimodal_loss(z, labels, self.W, self.num_classes, self.gamma)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, num_modalities={self.num_modalities}, "
                f"proxies_per_class={self.proxies_per_class}, gamma={self.gamma}")
