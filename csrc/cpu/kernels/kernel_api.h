// Entry points of the CPU kernels, one copy per instruction set (see cpu_capability.h).
// Plain structs of raw pointers: the kernels see no tensors, only memory and sizes.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace ether_kernels::cpu {

// Ether loss forward, reduction part. The input is viewed as (B, C, R): B rows of
// L = C * R contiguous elements, channel c of a row owning elements [c R, (c + 1) R).
struct EtherStatsArgs {
  const void* y_pred;
  const void* y_true;
  c10::ScalarType dtype;
  int64_t B, C, R;
  bool per_sample;
  // Outputs (doubles, overwritten): the sum of squared errors and the sums of y_pred per
  // channel: [C] over the whole batch, or [B, C] (one row per sample) when per_sample.
  double* sse;
  double* channel_sums;
};

// Ether loss backward, one elementwise pass:
//   grad_pred[e] = g * (intra_scale * (p - t) + coef[chan(e)])
//   grad_true[e] = -g * intra_scale * (p - t)
// coef is [C] or [B, C] (per_sample) in opmath precision (double for fp64, else float).
struct EtherBackwardArgs {
  const void* y_pred;
  const void* y_true;
  c10::ScalarType dtype;
  int64_t B, C, R;
  bool per_sample;
  const void* coef;
  double upstream;     // g, the gradient flowing into the loss
  double intra_scale;  // 2 / N for reduction="mean", 2 for "sum"
  void* grad_pred;     // may be null: not requested
  void* grad_true;     // may be null: not requested
};

// Fused MSE forward over n contiguous elements.
//   reduction mean/sum: *sse = sum (p - t)^2; when grad is non-null also
//                       grad[e] = grad_scale * (p - t)    (the ops pass grad_scale = 1)
//   reduction none:     out[e] = (p - t)^2
struct MseForwardArgs {
  const void* input;
  const void* target;
  c10::ScalarType dtype;
  int64_t n;
  double* sse;        // used unless elementwise
  void* out;          // elementwise loss (reduction none), else null
  void* grad;         // may be null
  double grad_scale;
};

// out[e] = in[e] * scale over n contiguous elements (the fused MSE's backward).
struct ScaleArgs {
  const void* in;
  void* out;
  c10::ScalarType dtype;
  int64_t n;
  double scale;
};

// The MultiModal loss, every row of the batch (multimodal_loss_kernel.cpp): rows are cut
// into blocks of rows_per_block; block b writes its loss sum to block_loss[b] and, with
// grad, its part of the gradient for the normalised proxies to block_gw[b] (MC x CK) and
// the rows' gradients (of the mean loss) to grad_z. w: (MC, CK) normalised proxies, fp64.
struct MultimodalRowsArgs {
  const void* z;           // (B, MC), dtype
  const int64_t* labels;   // (B,), in [0, C)
  c10::ScalarType dtype;
  const double* w;
  int64_t B, C, K, MC, CK, rows_per_block;
  double s;                // 1 / gamma
  bool grad;
  double* block_loss;      // (blocks,)
  double* block_gw;        // (blocks, MC, CK) or null
  void* grad_z;            // (B, MC), dtype, or null
};

#define ETHER_KERNELS_DECLARE(ns)                  \
  namespace ns {                                   \
  void ether_loss_stats(const EtherStatsArgs&);    \
  void ether_loss_backward(const EtherBackwardArgs&); \
  void mse_forward(const MseForwardArgs&);         \
  void scale(const ScaleArgs&);                    \
  void multimodal_loss_rows(const MultimodalRowsArgs&); \
  }

ETHER_KERNELS_DECLARE(DEFAULT)
ETHER_KERNELS_DECLARE(AVX2)
ETHER_KERNELS_DECLARE(AVX512)
#undef ETHER_KERNELS_DECLARE

}  // namespace ether_kernels::cpu
