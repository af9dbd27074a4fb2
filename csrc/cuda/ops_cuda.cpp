// The CUDA implementations of the ether_kernels ops: argument checks (the CPU ops' checks,
// plus devices), outputs and workspaces allocated with torch on the inputs' device, and the
// launches on the current stream (kernels in *.cu, their torch-free API in kernels_cuda.h).
// Built only where both the CUDA toolkit and a CUDA build of torch exist (see setup.py).
//
// Nothing here synchronises with the device: no .item(), no copy to the host. The loss,
// the coefficients and the upstream gradient stay on the device from end to end.
#include "kernels_cuda.h"

#include "../common/ether_loss_math.h"
#include "../common/op_checks.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (c10::cuda, re-exported)
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace ether_kernels::cuda {
namespace {

bool kernel_supports(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;  // callers have checked kernel_supports
  }
}

void check_pair(const at::Tensor& y_pred, const at::Tensor& y_true) {
  check_ether_pair(y_pred, y_true);
  TORCH_CHECK(kernel_supports(y_pred.scalar_type()),
              "ether_loss (CUDA kernel): dtype ", y_pred.scalar_type(),
              " is not supported (float32, float64, float16, bfloat16)");
  TORCH_CHECK(y_pred.is_cuda() && y_true.is_cuda(),
              "ether_loss (CUDA kernel): y_pred and y_true must be CUDA tensors, got ",
              y_pred.device(), " and ", y_true.device());
  TORCH_CHECK(y_pred.device() == y_true.device(), "ether_loss: y_pred (", y_pred.device(),
              ") and y_true (", y_true.device(), ") must be on the same device");
}

// A small int64/float64 argument (membership, weights) on `device`, contiguous. A tensor
// already there is used as is; a CPU tensor is staged through pinned memory and copied
// asynchronously on the current stream (the caching host allocator keeps the pinned block
// alive until the copy has run), so there is no host synchronisation either way.
at::Tensor on_device(const at::Tensor& t, const at::Device& device, const char* name) {
  if (t.is_cuda()) {
    TORCH_CHECK(t.device() == device, "ether_loss: ", name, " is on ", t.device(),
                " but y_pred is on ", device);
    return t.contiguous();
  }
  TORCH_CHECK(t.is_cpu(), "ether_loss: ", name, " must be a CPU or CUDA tensor, got ",
              t.device());
  return t.contiguous().pin_memory().to(t.options().device(device), /*non_blocking=*/true);
}

std::tuple<at::Tensor, at::Tensor> ether_loss_forward_cuda(
    const at::Tensor& y_pred, const at::Tensor& y_true, const at::Tensor& member_channel,
    const at::Tensor& member_group, const at::Tensor& weights, double alpha,
    int64_t discrepancy, int64_t reduction, bool per_sample) {
  check_pair(y_pred, y_true);
  check_ether_options(y_pred, member_channel, member_group, weights, discrepancy, reduction);

  const c10::cuda::CUDAGuard guard(y_pred.device());
  const at::Tensor pred = y_pred.contiguous(), target = y_true.contiguous();
  const Shape3 shape = view3(pred);
  const int64_t E = member_channel.numel(), M = weights.numel();

  // Membership held on the host is validated here exactly as the CPU op does (reading it
  // costs no synchronisation). Membership already on the device cannot be read without one:
  // the finalize kernel checks it instead and turns an invalid one into NaN (see
  // kernels_cuda.h); either way nothing is read out of bounds.
  if (member_channel.is_cpu() && member_group.is_cpu()) {
    const at::Tensor channels = member_channel.contiguous(), groups = member_group.contiguous();
    const int64_t* channel_ptr = channels.data_ptr<int64_t>();
    const int64_t* group_ptr = groups.data_ptr<int64_t>();
    checked_group_sizes(channel_ptr, group_ptr, E, shape.C, M);
  }
  const at::Device device = pred.device();
  const at::Tensor channels = on_device(member_channel, device, "member_channel");
  const at::Tensor groups = on_device(member_group, device, "member_group");
  const at::Tensor w = on_device(weights, device, "weights");

  const at::ScalarType cdtype = coef_dtype(pred.scalar_type());
  at::Tensor coef = per_sample ? at::empty({shape.B, shape.C}, pred.options().dtype(cdtype))
                               : at::empty({shape.C}, pred.options().dtype(cdtype));
  at::Tensor loss = at::empty({}, pred.options());

  EtherForwardArgs args{};
  args.y_pred = pred.data_ptr();
  args.y_true = target.data_ptr();
  args.dtype = kernel_dtype(pred.scalar_type());
  args.B = shape.B;
  args.C = shape.C;
  args.R = shape.R;
  args.per_sample = per_sample;
  args.member_channel = channels.data_ptr<int64_t>();
  args.member_group = groups.data_ptr<int64_t>();
  args.E = E;
  args.weights = w.data_ptr<double>();
  args.M = M;
  args.alpha = alpha;
  args.discrepancy = discrepancy;
  args.reduction = reduction;
  args.loss = loss.data_ptr();
  args.coef = coef.data_ptr();
  // Workspace: tile partial sums, per-block sse partials, channel sums, per-row inter terms
  // and the finalize scratch, all fp64 (sizes in ether_loss_kernels.cu, make_layout). The
  // caching allocator hands it back to this stream when `workspace` goes out of scope, which
  // is safe: later work on the stream runs after these kernels.
  const size_t bytes = ether_loss_forward_workspace_bytes(args);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, pred.options().dtype(at::kByte));
  args.workspace = workspace.data_ptr();
  args.workspace_bytes = bytes;
  C10_CUDA_CHECK(ether_loss_forward(args, at::cuda::getCurrentCUDAStream()));
  return {loss, coef};
}

std::tuple<at::Tensor, at::Tensor> ether_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& y_pred, const at::Tensor& y_true,
    const at::Tensor& coef, int64_t reduction, bool per_sample, bool need_pred_grad,
    bool need_true_grad) {
  check_pair(y_pred, y_true);
  TORCH_CHECK(grad_loss.numel() == 1, "ether_loss_backward: grad_loss must hold one value");
  const c10::cuda::CUDAGuard guard(y_pred.device());
  const at::Tensor pred = y_pred.contiguous(), target = y_true.contiguous();
  const Shape3 shape = view3(pred);
  const at::Tensor coef_c = coef.contiguous();
  TORCH_CHECK(coef_c.scalar_type() == coef_dtype(pred.scalar_type()),
              "ether_loss_backward: coef has dtype ", coef_c.scalar_type());
  TORCH_CHECK(coef_c.numel() == (per_sample ? shape.B * shape.C : shape.C),
              "ether_loss_backward: coef has ", coef_c.numel(), " values");
  TORCH_CHECK(coef_c.device() == pred.device(), "ether_loss_backward: coef is on ",
              coef_c.device(), " but y_pred is on ", pred.device());
  // The kernel reads the upstream gradient on the device, in the input dtype. For the usual
  // 0-dim gradient of the loss this is a no-op; a CPU scalar is copied asynchronously.
  const at::Tensor upstream = grad_loss.to(pred.options(), /*non_blocking=*/true).contiguous();

  at::Tensor grad_pred = need_pred_grad ? at::empty(pred.sizes(), pred.options())
                                        : at::empty({0}, pred.options());
  at::Tensor grad_true = need_true_grad ? at::empty(pred.sizes(), pred.options())
                                        : at::empty({0}, pred.options());
  if ((need_pred_grad || need_true_grad) && pred.numel() > 0) {
    EtherBackwardArgs args{};
    args.grad_loss = upstream.data_ptr();
    args.y_pred = pred.data_ptr();
    args.y_true = target.data_ptr();
    args.dtype = kernel_dtype(pred.scalar_type());
    args.B = shape.B;
    args.C = shape.C;
    args.R = shape.R;
    args.per_sample = per_sample;
    args.coef = coef_c.data_ptr();
    args.intra_scale = intra_scale(reduction, pred.numel());  // a double kernel argument
    args.grad_pred = need_pred_grad ? grad_pred.data_ptr() : nullptr;
    args.grad_true = need_true_grad ? grad_true.data_ptr() : nullptr;
    C10_CUDA_CHECK(ether_loss_backward(args, at::cuda::getCurrentCUDAStream()));
  }
  return {grad_pred, grad_true};
}

std::tuple<at::Tensor, at::Tensor> mse_loss_forward_cuda(const at::Tensor& input,
                                                         const at::Tensor& target,
                                                         int64_t reduction, bool compute_grad) {
  check_mse_args(input, target, reduction);
  TORCH_CHECK(kernel_supports(input.scalar_type()), "fused_mse_loss (CUDA kernel): dtype ",
              input.scalar_type(), " is not supported (float32, float64, float16, bfloat16)");
  TORCH_CHECK(input.is_cuda() && target.is_cuda(),
              "fused_mse_loss (CUDA kernel): input and target must be CUDA tensors, got ",
              input.device(), " and ", target.device());
  TORCH_CHECK(input.device() == target.device(), "fused_mse_loss: input (", input.device(),
              ") and target (", target.device(), ") must be on the same device");

  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor p = input.contiguous(), t = target.contiguous();
  const int64_t n = p.numel();

  MseForwardArgs args{};
  args.input = p.data_ptr();
  args.target = t.data_ptr();
  args.dtype = kernel_dtype(p.scalar_type());
  args.n = n;
  args.reduction = reduction;

  if (reduction == math::kNone) {
    at::Tensor out = at::empty(p.sizes(), p.options());
    if (n > 0) {
      args.out = out.data_ptr();
      C10_CUDA_CHECK(mse_forward(args, at::cuda::getCurrentCUDAStream()));
    }
    return {out, at::empty({0}, p.options())};
  }
  at::Tensor grad = compute_grad ? at::empty(p.sizes(), p.options()) : at::empty({0}, p.options());
  at::Tensor loss = at::empty({}, p.options());
  args.loss = loss.data_ptr();
  args.grad = compute_grad && n > 0 ? grad.data_ptr() : nullptr;
  // p - t, as on the CPU: stored in 16 bits, 2 (p - t) overflows from |p - t| > 32752
  // (fp16) and 2 (p - t) / n is subnormal for large n. mse_loss_backward applies 2 (/ n).
  args.grad_scale = 1.0;
  // Workspace: one fp64 partial sum per block of the reduction pass (at most 8 KiB).
  const size_t bytes = mse_forward_workspace_bytes(args);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, p.options().dtype(at::kByte));
  args.workspace = workspace.data_ptr();
  args.workspace_bytes = bytes;
  // Runs for n == 0 too: it writes the loss (NaN for mean, 0 for sum).
  C10_CUDA_CHECK(mse_forward(args, at::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

at::Tensor mse_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& difference,
                                  bool mean) {
  TORCH_CHECK(grad_loss.numel() == 1, "mse_loss_backward: grad_loss must hold one value, got ",
              grad_loss.numel());
  TORCH_CHECK(at::isFloatingType(difference.scalar_type()),
              "mse_loss_backward: difference must be floating point");
  TORCH_CHECK(kernel_supports(difference.scalar_type()),
              "mse_loss_backward (CUDA kernel): dtype ", difference.scalar_type(),
              " is not supported (float32, float64, float16, bfloat16)");
  TORCH_CHECK(difference.is_cuda(), "mse_loss_backward (CUDA kernel): difference must be a CUDA "
              "tensor, got ", difference.device());
  const c10::cuda::CUDAGuard guard(difference.device());
  const at::Tensor in = difference.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  // Read on the device in difference's dtype (the loss's dtype, so a no-op for autograd's
  // gradient); the CPU op's .item() would be a host synchronisation here.
  const at::Tensor upstream = grad_loss.to(in.options(), /*non_blocking=*/true).contiguous();
  if (in.numel() > 0) {
    MseBackwardArgs args{};
    args.grad_loss = upstream.data_ptr();
    args.difference = in.data_ptr();
    args.dtype = kernel_dtype(in.scalar_type());
    args.n = in.numel();
    args.factor = mean ? 2.0 / static_cast<double>(in.numel()) : 2.0;
    args.out = out.data_ptr();
    C10_CUDA_CHECK(mse_backward(args, at::cuda::getCurrentCUDAStream()));
  }
  return out;
}

}  // namespace
}  // namespace ether_kernels::cuda

TORCH_LIBRARY_IMPL(ether_kernels, CUDA, m) {
  m.impl("ether_loss_forward", &ether_kernels::cuda::ether_loss_forward_cuda);
  m.impl("ether_loss_backward", &ether_kernels::cuda::ether_loss_backward_cuda);
  m.impl("mse_loss_forward", &ether_kernels::cuda::mse_loss_forward_cuda);
  m.impl("mse_loss_backward", &ether_kernels::cuda::mse_loss_backward_cuda);
}
