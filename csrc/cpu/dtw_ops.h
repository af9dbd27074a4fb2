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

// DTW / soft-DTW directly on the series, the local cost computed per cell (no (B, N, M)
// cost, no (B, N, M, D) temporary). Schemas (ether_kernels.cpp):
//   dtw_xy_forward(Tensor x, Tensor y, Tensor x_lengths, Tensor y_lengths, int metric,
//                  int band, float gamma, bool soft, bool keep) -> (Tensor, Tensor)
//   dtw_xy_backward(Tensor grad, Tensor x, Tensor y, Tensor R, Tensor x_lengths,
//                   Tensor y_lengths, int metric, int band, float gamma, bool soft,
//                   bool need_x, bool need_y) -> (Tensor, Tensor)
// x (B, N, D), y (B, M, D), same dtype fp32/fp64 (the caller broadcasts a batch of 1);
// metric 0 sqeuclidean, 1 euclidean, 2 l1. Returns (values (B,), R (B, N, M) when keep,
// else an empty tensor); value-only calls keep O(M) state per pair.
std::tuple<at::Tensor, at::Tensor> dtw_xy_forward_cpu(const at::Tensor& x, const at::Tensor& y,
                                                      const at::Tensor& x_lengths,
                                                      const at::Tensor& y_lengths,
                                                      int64_t metric, int64_t band,
                                                      double gamma, bool soft, bool keep);

// Returns (grad_x (B, N, D), grad_y (B, M, D)), each an empty tensor when not needed:
// grad[b] times the gradient of values[b] (expected alignment / optimal path contracted
// with the local cost's gradient); zero rows for padding.
std::tuple<at::Tensor, at::Tensor> dtw_xy_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& R,
    const at::Tensor& x_lengths, const at::Tensor& y_lengths, int64_t metric, int64_t band,
    double gamma, bool soft, bool need_x, bool need_y);

// Soft-DTW on the series, checkpointed (schemas in ether_kernels.cpp): the forward returns
// (values (B,), kept (B, C, M + 1) fp64: R of rows 0, S, 2S, ... of every pair, C =
// ceil(N / S), S = checkpoint_rows, a positive multiple of 4; row 0's last column records S
// for the backward's check); the backward recomputes each segment of S rows from its
// checkpoint. Memory O((N / S + S) M) per pair instead of N M.
std::tuple<at::Tensor, at::Tensor> dtw_xy_soft_forward_checkpointed_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_lengths,
    const at::Tensor& y_lengths, int64_t metric, int64_t band, double gamma,
    int64_t checkpoint_rows);

std::tuple<at::Tensor, at::Tensor> dtw_xy_soft_backward_checkpointed_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& kept,
    const at::Tensor& x_lengths, const at::Tensor& y_lengths, int64_t metric, int64_t band,
    double gamma, int64_t checkpoint_rows, bool need_x, bool need_y);

}  // namespace ether_kernels::cpu
