// The Ether loss "finalize" step, shared by the CPU and CUDA backends.
//
// The fused forward pass reduces the inputs to per-channel sums of y_pred (one row of C
// sums for the whole batch, or one row per sample when per_sample=True) and the sum of
// squared errors. Everything else is a function of those few numbers and lives here, in
// plain C++ that compiles for the host and, under nvcc, for the device. No torch headers.
//
// Notation for one row of channel sums S[c] (c < C), each channel holding n elements:
//   group m = the set of channels g_m (from the (channel, group) membership pairs)
//   mean_m  = sum_{c in g_m} S[c] / (|g_m| * n)
//   overall = sum_c S[c] / (C * n)
//   d_m     = mean_m - overall
//   inter   = sum_m w_m * phi(d_m),        phi(x) = |x| ("l1") or x^2 ("l2")
//   s_m     = phi'(d_m)                   sign(d) for l1 (0 at 0), 2 d for l2
// and the gradient of `scale * inter` with respect to one element of channel c is
//   coef[c] = scale * ( sum_{m : c in g_m} w_m s_m / (|g_m| n)  -  sum_m w_m s_m / (C n) ).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ETHER_HOST_DEVICE __host__ __device__
#else
#define ETHER_HOST_DEVICE
#endif

namespace ether_kernels::math {

enum Discrepancy : int64_t { kL1 = 0, kL2 = 1 };
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

// phi(d) for the chosen discrepancy.
ETHER_HOST_DEVICE inline double discrepancy_value(double d, int64_t discrepancy) {
  return discrepancy == kL2 ? d * d : (d < 0 ? -d : d);
}

// phi'(d). For l1 this is torch.abs's subgradient sign(d): 0 at 0, and 0 for a NaN gap too
// (torch.sign(nan) = 0; the NaN element's own gradient is NaN through the MSE term, and the
// loss is NaN). For l2, 2 d (NaN stays NaN, as in autograd's d * d).
ETHER_HOST_DEVICE inline double discrepancy_slope(double d, int64_t discrepancy) {
  if (discrepancy == kL2) return 2.0 * d;
  if (d > 0) return 1.0;
  if (d < 0) return -1.0;
  return 0.0;  // d == 0 or NaN
}

// Finalizes one row of channel sums. Returns inter (unscaled) and writes coef[0..C).
//   channel_sums   [C]  sums of y_pred per channel over the row's scope
//   n              elements per channel in that scope (B * R for the batch, R per sample)
//   member_channel [E]  membership pairs: channel member_channel[e] belongs to group
//   member_group   [E]  member_group[e]
//   group_size     [M]  |g_m| (number of channels of group m, > 0)
//   weights        [M]  w_m
//   group_scratch  [M]  caller-provided scratch, overwritten
//   scale          factor applied to coef (alpha, or alpha / B when averaged per sample)
template <typename coef_t>
ETHER_HOST_DEVICE inline double finalize_row(
    const double* channel_sums, int64_t C, double n,
    const int64_t* member_channel, const int64_t* member_group, int64_t E,
    const double* group_size, const double* weights, int64_t M,
    int64_t discrepancy, double scale, double* group_scratch, coef_t* coef) {
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) total += channel_sums[c];
  const double overall = total / (static_cast<double>(C) * n);

  for (int64_t m = 0; m < M; ++m) group_scratch[m] = 0.0;
  for (int64_t e = 0; e < E; ++e) group_scratch[member_group[e]] += channel_sums[member_channel[e]];

  // Turn each group's sum into w_m * s_m / (|g_m| n) in place, and accumulate inter and
  // the shared term sum_m w_m s_m / (C n).
  double inter = 0.0, shared = 0.0;
  for (int64_t m = 0; m < M; ++m) {
    const double d = group_scratch[m] / (group_size[m] * n) - overall;
    inter += weights[m] * discrepancy_value(d, discrepancy);
    const double ws = weights[m] * discrepancy_slope(d, discrepancy);
    shared += ws;
    group_scratch[m] = ws / (group_size[m] * n);
  }
  shared /= static_cast<double>(C) * n;

  if (scale == 0.0) {  // alpha = 0: exactly the MSE, whose gradient 0 * (a NaN slope) must
    for (int64_t c = 0; c < C; ++c) coef[c] = coef_t(0);  // not turn into NaN everywhere
    return inter;
  }
  for (int64_t c = 0; c < C; ++c) coef[c] = static_cast<coef_t>(-scale * shared);
  for (int64_t e = 0; e < E; ++e) {
    coef[member_channel[e]] += static_cast<coef_t>(scale * group_scratch[member_group[e]]);
  }
  return inter;
}

}  // namespace ether_kernels::math
