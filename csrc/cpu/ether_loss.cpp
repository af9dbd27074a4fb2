// Ether loss on the CPU: argument checks, the fused statistics pass (kernels/), the tiny
// finalize step (common/ether_loss_math.h) and the one-pass backward.
#include "ops_cpu.h"

#include "../common/ether_loss_math.h"
#include "cpu_capability.h"
#include "kernels/kernel_api.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace ether_kernels::cpu {

namespace {

// (B, C, R) view of a (B, C, *rest) input.
struct Shape3 {
  int64_t B, C, R;
};

Shape3 view3(const at::Tensor& t) {
  const int64_t B = t.size(0), C = t.size(1);
  return {B, C, B * C == 0 ? 0 : t.numel() / (B * C)};
}

void check_pair(const at::Tensor& y_pred, const at::Tensor& y_true) {
  TORCH_CHECK(y_pred.dim() >= 2, "ether_loss: y_pred must have at least 2 dims (B, C, ...), got ",
              y_pred.sizes());
  TORCH_CHECK(y_pred.sizes() == y_true.sizes(), "ether_loss: y_pred ", y_pred.sizes(),
              " and y_true ", y_true.sizes(), " must have the same shape");
  TORCH_CHECK(y_pred.scalar_type() == y_true.scalar_type(), "ether_loss: y_pred (",
              y_pred.scalar_type(), ") and y_true (", y_true.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(at::isFloatingType(y_pred.scalar_type()),
              "ether_loss: y_pred must be floating point, got ", y_pred.scalar_type());
  TORCH_CHECK(y_pred.device().is_cpu() && y_true.device().is_cpu(),
              "ether_loss (CPU kernel): y_pred and y_true must be CPU tensors");
}

at::ScalarType coef_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ether_loss_forward_cpu(
    const at::Tensor& y_pred, const at::Tensor& y_true, const at::Tensor& member_channel,
    const at::Tensor& member_group, const at::Tensor& weights, double alpha,
    int64_t discrepancy, int64_t reduction, bool per_sample) {
  check_pair(y_pred, y_true);
  TORCH_CHECK(member_channel.scalar_type() == at::kLong && member_group.scalar_type() == at::kLong,
              "ether_loss: member_channel and member_group must be int64");
  TORCH_CHECK(member_channel.numel() == member_group.numel(),
              "ether_loss: member_channel and member_group must have the same length");
  TORCH_CHECK(weights.scalar_type() == at::kDouble && weights.dim() == 1,
              "ether_loss: weights must be a 1-D float64 tensor");
  TORCH_CHECK(discrepancy == math::kL1 || discrepancy == math::kL2,
              "ether_loss: discrepancy code must be 0 (l1) or 1 (l2), got ", discrepancy);
  TORCH_CHECK(reduction == math::kMean || reduction == math::kSum,
              "ether_loss: reduction code must be 0 (mean) or 1 (sum), got ", reduction);
  TORCH_CHECK(y_pred.numel() > 0, "ether_loss: y_pred must not be empty");

  const at::Tensor pred = y_pred.contiguous(), target = y_true.contiguous();
  const auto [B, C, R] = view3(pred);
  const at::Tensor channels = member_channel.contiguous(), groups = member_group.contiguous();
  const at::Tensor w = weights.contiguous();
  const int64_t E = channels.numel(), M = w.numel();
  const int64_t* channel_ptr = channels.data_ptr<int64_t>();
  const int64_t* group_ptr = groups.data_ptr<int64_t>();
  std::vector<double> group_size(M, 0.0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(channel_ptr[e] >= 0 && channel_ptr[e] < C, "ether_loss: member_channel[", e,
                "] = ", channel_ptr[e], " is out of range for ", C, " channels");
    TORCH_CHECK(group_ptr[e] >= 0 && group_ptr[e] < M, "ether_loss: member_group[", e, "] = ",
                group_ptr[e], " is out of range for ", M, " modalities");
    group_size[group_ptr[e]] += 1.0;
  }
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(group_size[m] > 0, "ether_loss: modality ", m, " has no channel");
  }

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
  TORCH_CHECK(reduction == math::kMean || reduction == math::kSum,
              "ether_loss_backward: reduction code must be 0 (mean) or 1 (sum), got ", reduction);
  const double intra_scale =
      reduction == math::kMean ? 2.0 / static_cast<double>(y_pred.numel()) : 2.0;
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
                           per_sample, coef_c.data_ptr(), grad_loss.item<double>(), intra_scale,
                           need_pred_grad ? grad_pred.data_ptr() : nullptr,
                           need_true_grad ? grad_true.data_ptr() : nullptr};
    ETHER_CPU_DISPATCH(ether_loss_backward)(args);
  }
  return {grad_pred, grad_true};
}

}  // namespace ether_kernels::cpu
