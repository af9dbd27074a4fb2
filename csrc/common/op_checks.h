// Host-side argument checks and shape helpers shared by the CPU and CUDA ops (torch headers;
// not for the pure .cu kernels). Each message names the op and the argument.
#pragma once

#include "ether_loss_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>
#include <vector>

namespace ether_kernels {

// (B, C, R) view of a (B, C, *rest) input: B rows of C channels of R contiguous elements.
struct Shape3 {
  int64_t B, C, R;
};

inline Shape3 view3(const at::Tensor& t) {
  const int64_t B = t.size(0), C = t.size(1);
  return {B, C, B * C == 0 ? 0 : t.numel() / (B * C)};
}

// The per-channel coefficients are kept in the accumulation type: fp64 for fp64, else fp32.
inline at::ScalarType coef_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Shape, dtype and rank of the Ether loss inputs (devices are checked by each backend).
inline void check_ether_pair(const at::Tensor& y_pred, const at::Tensor& y_true) {
  TORCH_CHECK(y_pred.dim() >= 2, "ether_loss: y_pred must have at least 2 dims (B, C, ...), got ",
              y_pred.sizes());
  TORCH_CHECK(y_pred.sizes() == y_true.sizes(), "ether_loss: y_pred ", y_pred.sizes(),
              " and y_true ", y_true.sizes(), " must have the same shape");
  TORCH_CHECK(y_pred.scalar_type() == y_true.scalar_type(), "ether_loss: y_pred (",
              y_pred.scalar_type(), ") and y_true (", y_true.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(at::isFloatingType(y_pred.scalar_type()),
              "ether_loss: y_pred must be floating point, got ", y_pred.scalar_type());
}

// The non-tensor options of ether_loss_forward and the types of its small tensors.
inline void check_ether_options(const at::Tensor& y_pred, const at::Tensor& member_channel,
                                const at::Tensor& member_group, const at::Tensor& weights,
                                int64_t discrepancy, int64_t reduction) {
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
}

// Validates host-resident membership pairs against C channels and M modalities and returns
// the size of every group (each must be > 0).
inline std::vector<double> checked_group_sizes(const int64_t* channel, const int64_t* group,
                                               int64_t E, int64_t C, int64_t M) {
  std::vector<double> size(M, 0.0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(channel[e] >= 0 && channel[e] < C, "ether_loss: member_channel[", e, "] = ",
                channel[e], " is out of range for ", C, " channels");
    TORCH_CHECK(group[e] >= 0 && group[e] < M, "ether_loss: member_group[", e, "] = ", group[e],
                " is out of range for ", M, " modalities");
    size[group[e]] += 1.0;
  }
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(size[m] > 0, "ether_loss: modality ", m, " has no channel");
  }
  return size;
}

// The backward's integer reduction code -> k in k * (p - t).
inline double intra_scale(int64_t reduction, int64_t numel) {
  TORCH_CHECK(reduction == math::kMean || reduction == math::kSum,
              "ether_loss_backward: reduction code must be 0 (mean) or 1 (sum), got ", reduction);
  return reduction == math::kMean ? 2.0 / static_cast<double>(numel) : 2.0;
}

// Shape, dtype and reduction of the fused MSE inputs.
inline void check_mse_args(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  TORCH_CHECK(input.sizes() == target.sizes(), "fused_mse_loss: input ", input.sizes(),
              " and target ", target.sizes(), " must have the same shape");
  TORCH_CHECK(input.scalar_type() == target.scalar_type(), "fused_mse_loss: input (",
              input.scalar_type(), ") and target (", target.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fused_mse_loss: input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(reduction == math::kMean || reduction == math::kSum || reduction == math::kNone,
              "fused_mse_loss: reduction code must be 0, 1 or 2, got ", reduction);
}

// DTW: the kept state's dtype: float64 for soft-DTW (the backward's weights need it at small
// gamma), the inputs' dtype for hard DTW. The same on both devices.
inline at::ScalarType dtw_kept_dtype(at::ScalarType dtype, bool soft) {
  return soft ? at::kDouble : dtype;
}

// DTW: a series (B, L, D) and the elements between its pairs. A batch broadcast by expand()
// (stride 0 over a contiguous series, as cdist_dtw passes one row against all of Y) is read
// in place; anything else is made contiguous.
inline std::pair<at::Tensor, int64_t> dtw_batched_series(const at::Tensor& s) {
  if (s.size(0) > 1 && s.stride(0) == 0 && s.select(0, 0).is_contiguous()) return {s, 0};
  at::Tensor c = s.contiguous();
  return {c, s.size(1) * s.size(2)};
}

// DTW: band (-1: none) and, for soft-DTW, gamma.
inline void check_dtw_options(int64_t band, double gamma, bool soft, const char* op) {
  TORCH_CHECK(band >= -1, op, ": band must be >= 0, or -1 for no band, got ", band);
  if (soft) {
    TORCH_CHECK(gamma > 0.0 && std::isfinite(gamma), op,
                ": gamma must be a finite number > 0 for soft-DTW, got ", gamma);
  }
}

// DTW series ops: x (B, N, D) and y (B, M, D) of one float dtype, non-empty, and the metric
// code (devices are checked by each backend).
inline void check_dtw_series(const at::Tensor& x, const at::Tensor& y, int64_t metric,
                             const char* op) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3, op, ": x must be (B, N, D) and y (B, M, D), got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": y must have x's dtype ",
              x.scalar_type(), ", got ", y.scalar_type());
  TORCH_CHECK(x.size(0) == y.size(0), op, ": x and y must have the same batch size B, got ",
              x.size(0), " and ", y.size(0), " (broadcast a batch of 1 before the call)");
  TORCH_CHECK(x.size(2) == y.size(2), op, ": x and y must have the same feature size D, got ",
              x.size(2), " and ", y.size(2));
  TORCH_CHECK(x.size(1) > 0 && y.size(1) > 0, op, ": x and y must be non-empty sequences");
  TORCH_CHECK(metric >= 0 && metric <= 2, op,
              ": metric must be 0 (sqeuclidean), 1 (euclidean) or 2 (l1), got ", metric);
}

}  // namespace ether_kernels
