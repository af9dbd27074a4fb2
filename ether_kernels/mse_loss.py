"""The fused MSE loss: equal to torch.nn.functional.mse_loss in value and gradient.

The ops ether_kernels::mse_loss_forward (C++ CPU, CUDA C++) and mse_loss_forward_triton:
  forward(input, target, reduction, compute_grad) -> (loss, difference)
With reduction mean/sum and compute_grad, the forward pass also writes
difference = input - target while it has the data in registers, so the backward is one
multiply by 2 times the upstream gradient (and 1 / N for the mean): two reads and one write
in all, against four reads and two writes for the unfused forward + backward. (Not 2 (input -
target): in fp16 that overflows from |input - target| > 32752, where the gradient does not.)
"""

import torch

from . import _dispatch, _double_backward, _extension
from ._checks import check_choice, check_loss_pair
from ._triton_support import triton_import_error
from .reference import mse_loss_reference

_REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
# Automatic dispatch on CPU uses the C++ kernel from this many elements on (see bench/).
CPU_MIN_ELEMENTS = 1 << 20
_OP = "fused_mse_loss"


def fused_mse_loss(input, target, reduction="mean"):
    """mean / sum / none of (input - target)**2; differentiable in input and target."""
    check_loss_pair(input, target, "input", "target", _OP)
    check_choice(reduction, "reduction", tuple(_REDUCTIONS), _OP)
    # On GPUs the CUDA C++ kernel first: on an H200 it ran forward+backward 1.5x faster than
    # the Triton one (bench/results/cuda-nvidia-h200.md).
    backend = _dispatch.select(_OP, input.device, cpu_backends=("cpp",),
                               gpu_backends=("cuda", "triton"))
    if backend == "cpp" and input.numel() < CPU_MIN_ELEMENTS and _dispatch.forced_backend() is None:
        # Below this size the fused kernel's saving is smaller than the fixed cost of a
        # Python-registered autograd op (~30 us per call), and aten's own fused mse_loss is
        # faster: the automatic choice takes it (a forced "cpp" still runs the kernel).
        backend = "reference"
    if backend == "reference":
        return mse_loss_reference(input, target, reduction)
    forward = (torch.ops.ether_kernels.mse_loss_forward_triton if backend == "triton"
               else torch.ops.ether_kernels.mse_loss_forward)
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, difference = forward(input, target, _REDUCTIONS[reduction], compute_grad)
    if (backend == "cpp" and not torch.compiler.is_compiling() and difference.numel() > 0
            and type(difference) is torch.Tensor
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None):
        # dropped here: the backward may overwrite it (not under saved-tensor hooks, whose
        # pack function may keep a reference of its own)
        setattr(difference, _PRIVATE, True)
    return loss


def _forward_fake(input, target, reduction, compute_grad):
    torch._check(input.shape == target.shape)
    loss = input.new_empty(input.shape if reduction == _REDUCTIONS["none"] else ())
    keeps_grad = compute_grad and reduction != _REDUCTIONS["none"]
    return loss, input.new_empty(input.shape if keeps_grad else (0,))


def _setup_context(ctx, inputs, output):
    input, target, reduction, compute_grad = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The second output never gets a gradient: without this, autograd would fill a tensor of
    # zeros of its size on every backward (for the MSE, a whole input-sized pass).
    ctx.set_materialize_grads(False)
    # d loss / d input = 2 * (input - target) * upstream, / N for the mean
    ctx.mean = reduction == _REDUCTIONS["mean"]
    ctx.saved_grad = compute_grad and reduction != _REDUCTIONS["none"]
    ctx.reduction = reduction
    # The forward's input - target is what the backward scales when it was written;
    # the inputs themselves (references, no copy) serve a second derivative, or the
    # backward when nothing was written.
    ctx.save_for_backward(input, target, grad if ctx.saved_grad else None)


# Set by fused_mse_loss on the op's second output, which it drops: nothing but autograd's
# saved copy (the same tensor object) can read that buffer afterwards. See _can_overwrite.
_PRIVATE = "_ether_kernels_private_buffer"


def _can_overwrite(difference, grad_loss):
    """Whether the backward may write the gradient over the forward's input - target
    instead of a fresh tensor. On the CPU a fresh input-sized tensor is fresh memory from
    the system, whose page faults cost more than the scaling pass (4096 x 1024 fp32: the
    backward took twice the pass). Only when nothing else can read the buffer afterwards:
    it is fused_mse_loss's private buffer (a caller of the op itself may hold it, and so may
    a saved-tensors pack hook), autograd frees it after this backward (no retain_graph: a
    second backward would read it), eager mode (a traced backward is functional), the C++
    kernel's device, an upstream gradient that is not vmap-batched (is_grads_batched: the
    in-place op has no batching rule; the out-of-place one does). (Reading
    loss.grad_fn.saved_tensors and keeping them past the backward
    would see the gradient: autograd's internals, not an API of this loss.)

    The inputs are saved as torch.nn.functional.mse_loss saves them (the same in-place
    checks, and a second derivative needs them); with the buffer turned into the gradient,
    the peak memory is eager's."""
    return (getattr(difference, _PRIVATE, False) and difference.device.type == "cpu"
            and _extension.cpp_available and not torch.compiler.is_compiling()
            and not torch._C._autograd._get_current_graph_task_keep_graph()
            and not _is_batched(grad_loss))


def _is_batched(tensor):
    """A vmap-batched tensor (torch.func.vmap, or autograd.grad(is_grads_batched=True), which
    still batches with the legacy batched tensors)."""
    return (torch._C._functorch.is_batchedtensor(tensor)
            or torch._C._functorch.is_legacy_batchedtensor(tensor))


def _inplace_backward_fake(difference, grad_loss, mean):
    return None


def _backward_fake(grad_loss, difference, mean):
    return torch.empty_like(difference)


def _make_backward(backward_op):
    def backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None:  # the loss itself was not used (grads are not materialized)
            return None, None, None, None
        input, target, difference = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if _double_backward.wants_graph():  # create_graph=True: through the reference
            reduction = next(k for k, v in _REDUCTIONS.items() if v == ctx.reduction)
            a, b = _double_backward.distinct_nodes(input, target)
            grad_input, grad_target = _double_backward.reference_gradients(
                lambda: mse_loss_reference(a, b, reduction), (a, b), grad_loss)
            return (grad_input if need_input else None, grad_target if need_target else None,
                    None, None)
        if ctx.saved_grad and _can_overwrite(difference, grad_loss):
            # One pass: difference * 2 grad_loss (/ N), rounded once, written in place.
            torch.ops.ether_kernels.mse_loss_backward_(difference, grad_loss, ctx.mean)
            grad_input = difference
        elif ctx.saved_grad:
            grad_input = backward_op(grad_loss, difference, ctx.mean)
        else:  # the forward kept nothing (reduction "none", or no gradient was expected)
            # formed in fp32 for 16-bit inputs, rounded once, as the kernels do (2 (input -
            # target) would overflow in fp16 from 32752, 2 / N be subnormal for large N)
            compute = torch.promote_types(input.dtype, torch.float32)
            factor = 2.0 * grad_loss.to(compute)
            if ctx.mean:
                factor = factor / input.numel()
            grad_input = ((input.to(compute) - target.to(compute)) * factor).to(input.dtype)
        return (grad_input if need_input else None, -grad_input if need_target else None,
                None, None)
    return backward


def _register(forward_name, backward_name, backward_op):
    torch.library.register_fake(forward_name)(_forward_fake)
    torch.library.register_fake(backward_name)(_backward_fake)
    torch.library.register_autograd(forward_name, _make_backward(backward_op),
                                    setup_context=_setup_context)


if _extension.cpp_available:
    _register("ether_kernels::mse_loss_forward", "ether_kernels::mse_loss_backward",
              torch.ops.ether_kernels.mse_loss_backward)
    torch.library.register_fake("ether_kernels::mse_loss_backward_")(_inplace_backward_fake)
if triton_import_error is None:
    from .triton import mse_loss as _triton_mse_loss

    _register("ether_kernels::mse_loss_forward_triton", "ether_kernels::mse_loss_backward_triton",
              _triton_mse_loss.mse_loss_backward_triton)
