// Entry points of the batched DTW / soft-DTW CPU kernels, one copy per instruction set
// (see cpu_capability.h). Plain structs of raw pointers: the kernels see no tensors.
//
// Conventions (shared/specs/dtw.md): pair b uses lengths n_b = x_lengths[b] (1 <= n_b <= N)
// and m_b = y_lengths[b] (1 <= m_b <= M). 1-based cell (i, j) is allowed when
//   -r + min(0, m - n) <= j - i <= r + max(0, m - n)      (r = band; band < 0: no band).
// R[i][j] for 1-based cell (i, j) lives at [b, i - 1, j - 1] of a contiguous (B, N, M) array.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace ether_kernels::cpu {

// Forward: values[b] = R[n_b][m_b] (hard DTW when !soft, soft-DTW with gamma when soft).
// When R is non-null the full (B, N, M) matrix is written (cells outside the band or the
// lengths = +inf), for the backward; otherwise each pair keeps O(M) state.
struct DtwForwardArgs {
  const void* cost;            // (B, N, M) contiguous, dtype
  c10::ScalarType dtype;       // kFloat or kDouble; the kernel computes in this dtype
  int64_t B, N, M;
  const int64_t* x_lengths;    // (B,)
  const int64_t* y_lengths;    // (B,)
  int64_t band;                // < 0: no band
  double gamma;                // > 0, used when soft
  bool soft;
  void* values;                // (B,), dtype
  void* R;                     // (B, N, M), dtype, or null (value-only)
};

// Backward: E (B, N, M) = grad[b] * d R[n_b][m_b] / d cost[b], from the cost and the R the
// forward kept. Soft: the expected alignment (Cuturi & Blondel, Algorithm 2). Hard: the 0/1
// indicator of the optimal path (ties: diagonal, then (i-1, j), then (i, j-1)). Every
// element of E is written (zero outside the band / lengths and on unreachable cells).
struct DtwBackwardArgs {
  const void* grad;            // (B,), dtype
  const void* cost;            // (B, N, M), dtype
  const void* R;               // (B, N, M), dtype
  c10::ScalarType dtype;
  int64_t B, N, M;
  const int64_t* x_lengths;
  const int64_t* y_lengths;
  int64_t band;
  double gamma;
  bool soft;
  void* E;                     // (B, N, M), dtype
};

// DTW / soft-DTW directly on the series: the local cost of cell (i, j) is computed inside
// the kernel from x[b, i - 1] and y[b, j - 1] (a D-length loop); nothing of size N * M * D
// is ever formed. metric: 0 sqeuclidean sum_d (x - y)^2, 1 euclidean (its sqrt),
// 2 l1 sum_d |x - y|. Precision: soft-DTW computes fp32 inputs in fp64 (as above); hard
// DTW computes in the input dtype (min is exact, so only the cost sums round).
struct DtwXYForwardArgs {
  const void* x;               // (B, N, D), pair b at x + b * x_batch_stride, dtype
  const void* y;               // (B, M, D), pair b at y + b * y_batch_stride, dtype
  c10::ScalarType dtype;       // kFloat or kDouble
  int64_t B, N, M, D;
  const int64_t* x_lengths;    // (B,)
  const int64_t* y_lengths;    // (B,)
  int64_t metric;
  int64_t band;
  double gamma;
  bool soft;
  void* values;                // (B,), dtype
  void* R;                     // (B, N, M), dtype, or null (value-only, O(M) state per pair)
  // Elements between consecutive pairs' series: N D and M D for contiguous inputs, 0 for a
  // series broadcast against every pair (read in place, never copied).
  int64_t x_batch_stride, y_batch_stride;
  // Soft-DTW with R: > 0 keeps only every checkpoint_rows-th row of R (a multiple of 4),
  // R then being (B, ceil(N / checkpoint_rows), M + 1) fp64 (rows 0, S, 2S, ... with their
  // column 0); the backward recomputes the rows in between, one segment at a time.
  int64_t checkpoint_rows = 0;
};

// grad_x[b, i] = grad[b] sum_j E_ij d cost(x_i, y_j) / d x_i, grad_y likewise, with E the
// soft-DTW expected alignment or the hard optimal-path indicator (see DtwBackwardArgs).
// Padding rows are zeroed. Gradients of the cost: sqeuclidean 2 (x - y); euclidean
// (x - y) / |x - y| (0 when |x - y| = 0); l1 sign(x - y) (sign(0) = 0).
struct DtwXYBackwardArgs {
  const void* grad;            // (B,), dtype
  const void* x;               // (B, N, D)
  const void* y;               // (B, M, D)
  const void* R;               // (B, N, M), the forward's kept R
  c10::ScalarType dtype;
  int64_t B, N, M, D;
  const int64_t* x_lengths;
  const int64_t* y_lengths;
  int64_t metric;
  int64_t band;
  double gamma;
  bool soft;
  void* grad_x;                // (B, N, D) or null
  void* grad_y;                // (B, M, D) or null
  int64_t x_batch_stride, y_batch_stride;  // as in DtwXYForwardArgs
  int64_t checkpoint_rows = 0;             // as in DtwXYForwardArgs (R in that layout)
};

#define ETHER_DTW_KERNELS_DECLARE(ns)          \
  namespace ns {                               \
  void dtw_forward(const DtwForwardArgs&);     \
  void dtw_backward(const DtwBackwardArgs&);   \
  void dtw_xy_forward(const DtwXYForwardArgs&);   \
  void dtw_xy_backward(const DtwXYBackwardArgs&); \
  }

ETHER_DTW_KERNELS_DECLARE(DEFAULT)
ETHER_DTW_KERNELS_DECLARE(AVX2)
ETHER_DTW_KERNELS_DECLARE(AVX512)
#undef ETHER_DTW_KERNELS_DECLARE

}  // namespace ether_kernels::cpu
