// Ether loss on the CPU: argument checks, the fused statistics pass (kernels/), the tiny
// finalize step (common/ether_loss_math.h) and the one-pass backward.
#include "ops_cpu.h"

#include "../common/ether_loss_math.h"
#include "../common/op_checks.h"
#include "cpu_capability.h"
#include "kernels/kernel_api.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace ether_kernels::cpu {

namespace {

void check_pair(const at::Tensor& y_pred, const at::Tensor& y_true) {
  check_ether_pair(y_pred, y_true);
  TORCH_CHECK(y_pred.device().is_cpu() && y_true.device().is_cpu(),
              "ether_loss (CPU kernel): y_pred and y_true must be CPU tensors, got ",
              y_pred.device(), " and ", y_true.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ether_loss_forward_cpu(
    const at::Tensor& y_pred, const at::Tensor& y_true, const at::Tensor& member_channel,
    const at::Tensor& member_group, const at::Tensor& weights, double alpha,
    int64_t discrepancy, int64_t reduction, bool per_sample) {
  check_pair(y_pred, y_true);
  check_ether_options(y_pred, member_channel, member_group, weights, discrepancy, reduction);

  const at::Tensor pred = y_pred.contiguous(), target = y_true.contiguous();
  const auto [B, C, R] = view3(pred);
  const at::Tensor channels = member_channel.contiguous(), groups = member_group.contiguous();
  const at::Tensor w = weights.contiguous();
  const int64_t E = channels.numel(), M = w.numel();
  const int64_t* channel_ptr = channels.data_ptr<int64_t>();
  const int64_t* group_ptr = groups.data_ptr<int64_t>();
  const std::vector<double> group_size = checked_group_sizes(channel_ptr, group_ptr, E, C, M);

  // 1. One pass over the data: sum of squared errors and sums per channel (or per sample
  //    and channel).
  const int64_t rows = per_sample ? B : 1;
  std::vector<double> channel_sums(rows * C);
  double sse = 0.0;
  EtherStatsArgs stats{pred.data_ptr(), target.data_ptr(), pred.scalar_type(), B, C, R,
                       per_sample, &sse, channel_sums.data()};
  ETHER_CPU_DISPATCH(ether_loss_stats)(stats);

  // 2. Finalize: the inter term and the per-channel gradient coefficients.
  const at::ScalarType cdtype = coef_dtype(pred.scalar_type());
  at::Tensor coef = per_sample ? at::empty({B, C}, pred.options().dtype(cdtype))
                               : at::empty({C}, pred.options().dtype(cdtype));
  const double n = per_sample ? static_cast<double>(R) : static_cast<double>(B * R);
  const double scale = per_sample ? alpha / static_cast<double>(B) : alpha;
  std::vector<double> inter_rows(rows);
  AT_DISPATCH_FLOATING_TYPES(cdtype, "ether_loss_finalize", [&] {
    scalar_t* coef_ptr = coef.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(M);
      for (int64_t r = begin; r < end; ++r) {
        inter_rows[r] = math::finalize_row(channel_sums.data() + r * C, C, n, channel_ptr,
                                           group_ptr, E, group_size.data(), w.data_ptr<double>(),
                                           M, discrepancy, scale, scratch.data(),
                                           coef_ptr + r * C);
      }
    });
  });
  double inter = 0.0;
  for (double v : inter_rows) inter += v;
  if (per_sample) inter /= static_cast<double>(B);

  const double numel = static_cast<double>(pred.numel());
  const double intra = reduction == math::kMean ? sse / numel : sse;
  // alpha = 0 gives exactly the MSE, even if the inter term is not finite.
  const double loss = alpha == 0.0 ? intra : intra + alpha * inter;
  return {at::scalar_tensor(loss, pred.options()), coef};
}

std::tuple<at::Tensor, at::Tensor> ether_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& y_pred, const at::Tensor& y_true,
    const at::Tensor& coef, int64_t reduction, bool per_sample, bool need_pred_grad,
    bool need_true_grad) {
  check_pair(y_pred, y_true);
  TORCH_CHECK(grad_loss.numel() == 1, "ether_loss_backward: grad_loss must hold one value");
  const double k = intra_scale(reduction, y_pred.numel());
  const at::Tensor pred = y_pred.contiguous(), target = y_true.contiguous();
  const auto [B, C, R] = view3(pred);
  const at::Tensor coef_c = coef.contiguous();
  TORCH_CHECK(coef_c.scalar_type() == coef_dtype(pred.scalar_type()),
              "ether_loss_backward: coef has dtype ", coef_c.scalar_type());
  TORCH_CHECK(coef_c.numel() == (per_sample ? B * C : C),
              "ether_loss_backward: coef has ", coef_c.numel(), " values");

  at::Tensor grad_pred = need_pred_grad ? at::empty(pred.sizes(), pred.options())
                                        : at::empty({0}, pred.options());
  at::Tensor grad_true = need_true_grad ? at::empty(pred.sizes(), pred.options())
                                        : at::empty({0}, pred.options());
  if (need_pred_grad || need_true_grad) {
    EtherBackwardArgs args{pred.data_ptr(), target.data_ptr(), pred.scalar_type(), B, C, R,
                           per_sample, coef_c.data_ptr(), grad_loss.item<double>(), k,
                           need_pred_grad ? grad_pred.data_ptr() : nullptr,
                           need_true_grad ? grad_true.data_ptr() : nullptr};
    ETHER_CPU_DISPATCH(ether_loss_backward)(args);
  }
  return {grad_pred, grad_true};
}

}  // namespace ether_kernels::cpu
