// The MultiModal loss's rows, fused: forward and gradient of one sample at a time, none of
// the (B, C*K) intermediates stored. Compiled once per instruction set (see setup.py); the
// math, the op and the final reductions are in ../multimodal_loss.cpp. The exponentials of
// a row go through at::vec (Sleef on AVX2 / AVX-512), everything else is short loops over
// C*K or M*C contiguous doubles that the compiler vectorises.
#include "kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ether_kernels::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr double kNormFloor = 1e-12;  // F.normalize's eps

// v <- exp(v) over n doubles, a vector at a time.
void exp_in_place(double* v, int64_t n) {
  using Vec = at::vec::Vectorized<double>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(v + i).exp().store(v + i);
  if (i < n) Vec::loadu(v + i, n - i).exp().store(v + i, n - i);
}

// softmax of n values with the given stride, in place (scalar: the rare small-gamma path).
void softmax_in_place(double* v, int64_t n, int64_t stride) {
  double hi = -std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < n; ++t) hi = std::max(hi, v[t * stride]);
  double sum = 0.0;
  for (int64_t t = 0; t < n; ++t) sum += (v[t * stride] = std::exp(v[t * stride] - hi));
  for (int64_t t = 0; t < n; ++t) v[t * stride] /= sum;
}

struct Sizes {
  int64_t B, C, K, MC, CK;
  double s;
};

template <typename T>
double sample(const T* z_row, int64_t y, const double* w, const Sizes& sz, bool grad,
              double* scratch, double* dz, double* gw) {
  const int64_t MC = sz.MC, CK = sz.CK, C = sz.C, K = sz.K;
  const double s = sz.s;
  double* z = scratch;            // MC
  double* zn = z + MC;            // MC
  double* S = zn + MC;            // CK
  double* P = S + CK;             // CK
  double* a = P + CK;             // MC
  double* Q = a + MC;             // CK (laid out like S: c * K + k)
  double* logit = Q + CK;         // C
  double* dS = logit + C;         // CK
  double* da = dS + CK;           // MC
  double* dzn = da + MC;          // MC
  double norm2 = 0.0;
  for (int64_t r = 0; r < MC; ++r) {
    z[r] = static_cast<double>(z_row[r]);
    norm2 += z[r] * z[r];
  }
  const double norm = std::sqrt(norm2);
  const double denom = std::max(norm, kNormFloor);
  for (int64_t r = 0; r < MC; ++r) zn[r] = z[r] / denom;
  // S = zn^T w; P = softmax(s S)
  std::fill(S, S + CK, 0.0);
  for (int64_t r = 0; r < MC; ++r) {
    const double* wr = w + r * CK;
    for (int64_t j = 0; j < CK; ++j) S[j] += zn[r] * wr[j];
  }
  // P = softmax(s S) over all C K proxies. |S_j| <= 1 (unit vectors), so s S - s lies in
  // [-2 s, 0]: exp(s S - s) neither overflows nor, while 2 s < 700, underflows, and the
  // same exponentials then also give the class softmax Q of every k (one exp per proxy).
  const bool shared_exp = 2.0 * s < 700.0;
  double hi = s;
  if (!shared_exp) {
    hi = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < CK; ++j) hi = std::max(hi, s * S[j]);
  }
  for (int64_t j = 0; j < CK; ++j) P[j] = s * S[j] - hi;
  exp_in_place(P, CK);
  double p_sum = 0.0;
  for (int64_t j = 0; j < CK; ++j) p_sum += P[j];
  if (shared_exp) std::copy(P, P + CK, Q);  // exp(s S - s), normalised per k below
  const double inv_p_sum = 1.0 / p_sum;
  for (int64_t j = 0; j < CK; ++j) P[j] *= inv_p_sum;
  // a = w P; att
  for (int64_t r = 0; r < MC; ++r) {
    const double* wr = w + r * CK;
    double acc = 0.0;
    for (int64_t j = 0; j < CK; ++j) acc += P[j] * wr[j];
    a[r] = acc;
  }
  // Q: softmax over the classes c of s S[c K + k], for each k; sim
  if (shared_exp) {
    double* col_sum = dS;  // scratch (dS is written only in the backward below)
    std::fill(col_sum, col_sum + K, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < K; ++k) col_sum[k] += Q[c * K + k];
    }
    for (int64_t k = 0; k < K; ++k) col_sum[k] = 1.0 / col_sum[k];
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < K; ++k) Q[c * K + k] *= col_sum[k];
    }
  } else {  // gamma < 1 / 350: per-k maxima
    for (int64_t j = 0; j < CK; ++j) Q[j] = s * S[j];
    for (int64_t k = 0; k < K; ++k) softmax_in_place(Q + k, C, K);
  }
  for (int64_t c = 0; c < C; ++c) {
    double sim = 0.0, att = 0.0;
    for (int64_t k = 0; k < K; ++k) sim += Q[c * K + k] * S[c * K + k];
    for (int64_t m = 0; m < MC / C; ++m) att += z[m * C + c] * (1.0 + a[m * C + c]);
    logit[c] = sim + att;
  }
  double top = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < C; ++c) top = std::max(top, logit[c]);
  double sum = 0.0;
  for (int64_t c = 0; c < C; ++c) sum += std::exp(logit[c] - top);
  const double lse = top + std::log(sum);
  const double loss = lse - logit[y];
  if (!grad) return loss;

  const double inv_B = 1.0 / static_cast<double>(sz.B);
  double* g = logit;  // reuse: g_c = (softmax_c - [c = y]) / B
  for (int64_t c = 0; c < C; ++c) g[c] = (std::exp(logit[c] - lse) - (c == y ? 1.0 : 0.0)) * inv_B;
  // attention fusion
  for (int64_t m = 0; m < MC / C; ++m) {
    for (int64_t c = 0; c < C; ++c) {
      dz[m * C + c] = g[c] * (1.0 + a[m * C + c]);
      da[m * C + c] = g[c] * z[m * C + c];
    }
  }
  // a = sum_j P_j w_j
  std::fill(dS, dS + CK, 0.0);  // dP_j = w_j . da for now
  for (int64_t r = 0; r < MC; ++r) {
    const double* wr = w + r * CK;
    for (int64_t j = 0; j < CK; ++j) dS[j] += wr[j] * da[r];
  }
  double p_dot = 0.0;
  for (int64_t j = 0; j < CK; ++j) p_dot += P[j] * dS[j];
  for (int64_t j = 0; j < CK; ++j) dS[j] = s * P[j] * (dS[j] - p_dot);
  for (int64_t r = 0; r < MC; ++r) {
    double* gr = gw + r * CK;
    for (int64_t j = 0; j < CK; ++j) gr[j] += P[j] * da[r];
  }
  // sim_c = sum_k Q_ck S_ck and the class softmax Q
  for (int64_t k = 0; k < K; ++k) {
    double q_dot = 0.0;
    for (int64_t c = 0; c < C; ++c) q_dot += Q[c * K + k] * g[c] * S[c * K + k];
    for (int64_t c = 0; c < C; ++c) {
      const int64_t j = c * K + k;
      dS[j] += g[c] * Q[j] + s * Q[j] * (g[c] * S[j] - q_dot);
    }
  }
  // S_j = zn . w_j
  for (int64_t r = 0; r < MC; ++r) {
    const double* wr = w + r * CK;
    double* gr = gw + r * CK;
    double acc = 0.0;
    for (int64_t j = 0; j < CK; ++j) {
      acc += dS[j] * wr[j];
      gr[j] += dS[j] * zn[r];
    }
    dzn[r] = acc;
  }
  // zn = z / max(||z||, eps)
  if (norm > kNormFloor) {
    double dot = 0.0;
    for (int64_t r = 0; r < MC; ++r) dot += zn[r] * dzn[r];
    for (int64_t r = 0; r < MC; ++r) dz[r] += (dzn[r] - zn[r] * dot) / norm;
  } else {
    for (int64_t r = 0; r < MC; ++r) dz[r] += dzn[r] / kNormFloor;
  }
  return loss;
}

template <typename T>
void rows_impl(const MultimodalRowsArgs& args) {
  const Sizes sz{args.B, args.C, args.K, args.MC, args.CK, args.s};
  const int64_t MC = sz.MC, CK = sz.CK, B = sz.B, per_block = args.rows_per_block;
  const T* zp = static_cast<const T*>(args.z);
  T* gzp = static_cast<T*>(args.grad_z);
  const int64_t blocks = (B + per_block - 1) / per_block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(5 * MC + 4 * CK + sz.C), dz(MC);
    for (int64_t blk = begin; blk < end; ++blk) {
      double total = 0.0;
      double* gw = args.grad ? args.block_gw + blk * MC * CK : nullptr;
      if (gw != nullptr) std::fill(gw, gw + MC * CK, 0.0);
      const int64_t row_end = std::min(B, (blk + 1) * per_block);
      for (int64_t i = blk * per_block; i < row_end; ++i) {
        total += sample<T>(zp + i * MC, args.labels[i], args.w, sz, args.grad, scratch.data(),
                           dz.data(), gw);
        if (args.grad) {
          for (int64_t r = 0; r < MC; ++r) gzp[i * MC + r] = static_cast<T>(dz[r]);
        }
      }
      args.block_loss[blk] = total;
    }
  });
}

}  // namespace

void multimodal_loss_rows(const MultimodalRowsArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "multimodal_loss_rows",
                                  [&] { rows_impl<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace ether_kernels::cpu
