// The MultiModal loss (Moon & Lee), fused on CPU: forward and gradient in one pass over the
// batch, one sample at a time, so none of the (B, C*K) intermediates (similarities S, the
// proxy softmax P, the class softmax Q) is ever stored. Semantics: the spec's formula,
// ether_kernels/reference/multimodal_loss.py (the oracle). For sample i (s = 1 / gamma):
//   w_j   = relu(W[:, j]) / max(||relu(W[:, j])||, 1e-12)        proxies, computed once
//   zn    = z / max(||z||, 1e-12);  S_j = zn . w_j;  P = softmax(s S)
//   a     = sum_j P_j w_j;  att_c = sum_m z[mC + c] (1 + a[mC + c])
//   Q_ck  = softmax over c of s S_ck;  sim_c = sum_k Q_ck S_ck
//   logit = sim + att;  loss_i = lse(logit) - logit_y;  loss = mean_i loss_i
// The rows run in kernels/multimodal_loss_kernel.cpp (per instruction set). Gradient (g_c = (softmax(logit)_c - [c = y]) / B), in the reverse order:
//   dz_mc += g_c (1 + a_mc);   da_mc = g_c z_mc
//   dW'_j += P_j da;           dP_j = w_j . da;   dS_j += s P_j (dP_j - P . dP)
//   dQ_ck = g_c S_ck;          dS_ck += g_c Q_ck + s Q_ck (dQ_ck - sum_c' Q_c'k dQ_c'k)
//   dzn = sum_j dS_j w_j;      dW'_j += dS_j zn
//   dz += (dzn - zn (zn . dzn)) / ||z||          (dzn / 1e-12 where ||z|| < 1e-12)
// and, once per call, dW'(normalised proxies) -> dW through the column normalisation and
// the relu (zero where W <= 0, as torch's relu backward). Arithmetic in fp64 for every
// dtype (the sizes are small; the loss is a sum of B terms). Rows run in fixed blocks whose
// partial sums are added in block order: the result does not depend on the thread count.
// The gradients are of the mean loss; the autograd backward multiplies them by the
// upstream gradient (Liger's trick: no second pass over the batch).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_capability.h"
#include "kernels/kernel_api.h"
#include "ops_cpu.h"

namespace ether_kernels::cpu {
namespace {

constexpr int64_t kRowsPerBlock = 64;  // rows per partial sum (fixed: thread-independent)
constexpr double kNormFloor = 1e-12;   // F.normalize's eps, and the proxies' clamp

void run(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& W,
         int64_t num_classes, double gamma, bool grad, at::Tensor& loss_out,
         at::Tensor& grad_z, at::Tensor& grad_W) {
  const int64_t B = z.size(0), MC = W.size(0), CK = W.size(1);
  // The proxies: w = relu(W) / max(column norms, eps), and the norms for the backward.
  const at::Tensor W64 = W.to(at::kDouble).contiguous();
  const double* Wd = W64.data_ptr<double>();
  std::vector<double> w(MC * CK), col_norm(CK);
  for (int64_t j = 0; j < CK; ++j) {
    double n2 = 0.0;
    for (int64_t r = 0; r < MC; ++r) {
      const double v = std::max(Wd[r * CK + j], 0.0);
      n2 += v * v;
    }
    col_norm[j] = std::sqrt(n2);
    const double d = std::max(col_norm[j], kNormFloor);
    for (int64_t r = 0; r < MC; ++r) w[r * CK + j] = std::max(Wd[r * CK + j], 0.0) / d;
  }
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<double> block_loss(blocks, 0.0);
  std::vector<double> block_gw(grad ? blocks * MC * CK : 0, 0.0);
  MultimodalRowsArgs args{z.data_ptr(), labels.data_ptr<int64_t>(), z.scalar_type(),
                          w.data(), B, num_classes, CK / num_classes, MC, CK, kRowsPerBlock,
                          1.0 / gamma, grad, block_loss.data(),
                          grad ? block_gw.data() : nullptr,
                          grad ? grad_z.data_ptr() : nullptr};
  ETHER_CPU_DISPATCH(multimodal_loss_rows)(args);
  double total = 0.0;  // block order: independent of the thread count
  for (const double v : block_loss) total += v;
  loss_out.fill_(total / static_cast<double>(B));
  if (!grad) return;
  std::vector<double> gw(MC * CK, 0.0);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    for (int64_t e = 0; e < MC * CK; ++e) gw[e] += block_gw[blk * MC * CK + e];
  }
  // w_j = r_j / max(||r_j||, eps), r = relu(W): dr_j = (gw_j - w_j (w_j . gw_j)) / ||r_j||
  // (gw_j / eps where the norm is below eps); dW = dr where W > 0, else 0.
  at::Tensor gW64 = at::empty({MC, CK}, W.options().dtype(at::kDouble));
  double* gWd = gW64.data_ptr<double>();
  for (int64_t j = 0; j < CK; ++j) {
    double dot = 0.0;
    for (int64_t r = 0; r < MC; ++r) dot += w[r * CK + j] * gw[r * CK + j];
    for (int64_t r = 0; r < MC; ++r) {
      const double dr = col_norm[j] > kNormFloor
                            ? (gw[r * CK + j] - w[r * CK + j] * dot) / col_norm[j]
                            : gw[r * CK + j] / kNormFloor;
      gWd[r * CK + j] = Wd[r * CK + j] > 0.0 ? dr : 0.0;
    }
  }
  grad_W.copy_(gW64);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> multimodal_loss_forward_cpu(
    const at::Tensor& z, const at::Tensor& labels, const at::Tensor& W, int64_t num_classes,
    double gamma, bool compute_grad) {
  const char* op = "multimodal_loss_forward";
  TORCH_CHECK(z.device().is_cpu() && labels.device().is_cpu() && W.device().is_cpu(), op,
              ": z, labels and W must be CPU tensors");
  TORCH_CHECK(num_classes >= 1, op, ": num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(gamma > 0 && std::isfinite(gamma), op, ": gamma must be > 0, got ", gamma);
  TORCH_CHECK(W.dim() == 2 && W.size(0) % num_classes == 0 && W.size(1) % num_classes == 0 &&
                  W.size(0) > 0 && W.size(1) > 0,
              op, ": W must be (M*C, C*K) with C = ", num_classes, ", got ", W.sizes());
  TORCH_CHECK(z.dim() == 2 && z.size(1) == W.size(0) && z.size(0) > 0, op,
              ": z must be a non-empty (B, M*C) = (B, ", W.size(0), ") tensor, got ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && z.scalar_type() == W.scalar_type(), op,
              ": z and W must be floating point of the same dtype, got ", z.scalar_type(),
              " and ", W.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0) &&
                  labels.scalar_type() == at::kLong,
              op, ": labels must be a (", z.size(0), ",) int64 tensor");
  const at::Tensor zc = z.contiguous();
  const at::Tensor yc = labels.contiguous();
  const int64_t B = z.size(0);
  {
    const int64_t* yp = yc.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      TORCH_CHECK(yp[i] >= 0 && yp[i] < num_classes, op, ": labels[", i, "] = ", yp[i],
                  " is outside [0, ", num_classes, ")");
    }
  }
  at::Tensor loss = at::empty({}, z.options());
  at::Tensor grad_z = compute_grad ? at::empty_like(zc) : at::empty({0}, z.options());
  at::Tensor grad_W = compute_grad ? at::empty_like(W, at::MemoryFormat::Contiguous)
                                   : at::empty({0}, W.options());
  run(zc, yc, W, num_classes, gamma, compute_grad, loss, grad_z, grad_W);
  return {loss, grad_z, grad_W};
}

}  // namespace ether_kernels::cpu
