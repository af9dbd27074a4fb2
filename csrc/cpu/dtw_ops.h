// Host-side CPU ops for batched DTW / soft-DTW on a precomputed cost tensor (dtw.cpp).
// To be registered in register_cpu.cpp (schemas in ether_kernels.cpp):
//   dtw_forward(Tensor cost, Tensor x_lengths, Tensor y_lengths, int band, float gamma,
//               bool soft, bool keep) -> (Tensor, Tensor)
//   dtw_backward(Tensor grad, Tensor cost, Tensor R, Tensor x_lengths, Tensor y_lengths,
//                int band, float gamma, bool soft) -> Tensor
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace ether_kernels::cpu {

// cost (B, N, M) fp32/fp64; x_lengths, y_lengths (B,) integer with 1 <= len <= N (resp. M);
// band >= 0 (Sakoe-Chiba radius, widened by |m - n|) or -1 for none; gamma > 0 when soft.
// Returns (values (B,) in the cost dtype, R (B, N, M) when keep, else an empty tensor).
std::tuple<at::Tensor, at::Tensor> dtw_forward_cpu(const at::Tensor& cost,
                                                   const at::Tensor& x_lengths,
                                                   const at::Tensor& y_lengths, int64_t band,
                                                   double gamma, bool soft, bool keep);

// grad (B,), R the forward's kept (B, N, M). Returns d(sum_b grad[b] * values[b]) / d cost,
// (B, N, M): the expected alignment (soft) or the optimal-path indicator (hard), times grad.
at::Tensor dtw_backward_cpu(const at::Tensor& grad, const at::Tensor& cost, const at::Tensor& R,
                            const at::Tensor& x_lengths, const at::Tensor& y_lengths,
                            int64_t band, double gamma, bool soft);

}  // namespace ether_kernels::cpu
