// Fused MSE on the CPU: argument checks and the call into the vectorised kernel.
#include "ops_cpu.h"

#include "../common/ether_loss_math.h"
#include "../common/op_checks.h"
#include "cpu_capability.h"
#include "kernels/kernel_api.h"

#include <ATen/ATen.h>

namespace ether_kernels::cpu {

std::tuple<at::Tensor, at::Tensor> mse_loss_forward_cpu(const at::Tensor& input,
                                                        const at::Tensor& target,
                                                        int64_t reduction, bool compute_grad) {
  check_mse_args(input, target, reduction);
  TORCH_CHECK(input.device().is_cpu() && target.device().is_cpu(),
              "fused_mse_loss (CPU kernel): input and target must be CPU tensors, got ",
              input.device(), " and ", target.device());
  const at::Tensor p = input.contiguous(), t = target.contiguous();
  const int64_t n = p.numel();

  if (reduction == math::kNone) {
    at::Tensor out = at::empty(p.sizes(), p.options());
    MseForwardArgs args{p.data_ptr(), t.data_ptr(), p.scalar_type(), n, nullptr,
                        out.data_ptr(), nullptr, 0.0};
    ETHER_CPU_DISPATCH(mse_forward)(args);
    return {out, at::empty({0}, p.options())};
  }
  const bool mean = reduction == math::kMean;
  at::Tensor grad = compute_grad ? at::empty(p.sizes(), p.options()) : at::empty({0}, p.options());
  double sse = 0.0;
  MseForwardArgs args{p.data_ptr(), t.data_ptr(), p.scalar_type(), n, &sse, nullptr,
                      compute_grad ? grad.data_ptr() : nullptr,
                      // p - t, without the gradient's 2 / n: stored in 16 bits, 2 (p - t)
                      // overflows from |p - t| > 32752 (fp16) and 2 (p - t) / n is subnormal
                      // for large n. The backward applies 2 (/ n).
                      1.0};
  ETHER_CPU_DISPATCH(mse_forward)(args);
  // An empty mean is 0 / 0 = NaN, as in torch.nn.functional.mse_loss.
  const double loss = mean ? sse / static_cast<double>(n) : sse;
  return {at::scalar_tensor(loss, p.options()), grad};
}

namespace {

// 2 grad_loss (/ n for the mean), checked: the factor of both backwards (the forward kept
// input - target).
double backward_factor(const char* op, const at::Tensor& grad_loss, const at::Tensor& difference,
                       bool mean) {
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value, got ",
              grad_loss.numel());
  TORCH_CHECK(at::isFloatingType(difference.scalar_type()), op,
              ": difference must be floating point, got ", difference.scalar_type());
  const double g = grad_loss.item<double>();
  return mean ? 2.0 * g / static_cast<double>(difference.numel()) : 2.0 * g;
}

}  // namespace

at::Tensor mse_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& difference,
                                 bool mean) {
  const double factor = backward_factor("mse_loss_backward", grad_loss, difference, mean);
  const at::Tensor in = difference.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
  ScaleArgs args{in.data_ptr(), out.data_ptr(), in.scalar_type(), in.numel(), factor};
  ETHER_CPU_DISPATCH(scale)(args);
  return out;
}

void mse_loss_backward_inplace_cpu(const at::Tensor& difference, const at::Tensor& grad_loss,
                                   bool mean) {
  const double factor = backward_factor("mse_loss_backward_", grad_loss, difference, mean);
  TORCH_CHECK(difference.device().is_cpu() && difference.is_contiguous(),
              "mse_loss_backward_: difference must be a contiguous CPU tensor (the forward's "
              "own buffer), got device ", difference.device(), " and strides ",
              difference.strides());
  // The same kernel with out = in: each element is read, then written at the same place.
  ScaleArgs args{difference.data_ptr(), difference.data_ptr(), difference.scalar_type(),
                 difference.numel(), factor};
  ETHER_CPU_DISPATCH(scale)(args);
}

}  // namespace ether_kernels::cpu
