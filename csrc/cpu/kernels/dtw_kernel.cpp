// Batched DTW / soft-DTW CPU kernels on a precomputed cost tensor (B, N, M).
// Compiled once per instruction set (CPU_CAPABILITY = DEFAULT, AVX2, AVX512; see setup.py).
//
// Semantics: shared/specs/dtw.md. For pair b (lengths n, m, band r):
//   R[0][0] = 0, R[i][0] = R[0][j] = +inf, out-of-band cells = +inf,
//   R[i][j] = cost[i][j] + op(R[i-1][j-1], R[i-1][j], R[i][j-1]),
// op = min (hard) or the stable soft-min  mu - g log sum_k exp(-(a_k - mu) / g), +inf when
// mu = +inf. Allowed cells: -r + min(0, m - n) <= j - i <= r + max(0, m - n).
//
// Forward: one pair per task (at::parallel_for over pairs), two rolling rows of m + 1
// values; only the band's cells are computed, and a row buffer is reset to +inf only over
// the range it held before, so a banded pair costs O(n * band), not O(n * m). Keep mode also
// writes each row into R (+inf outside the band and beyond the lengths).
//
// Backward (soft): Algorithm 2 of Cuturi & Blondel written as a "push": cells are visited
// in reverse row-major order, so when (p, q) is visited its E is final; its E is then split
// among its three predecessors with the soft-argmin weights recomputed from the very
// predecessor values (read from the kept R) that the forward used for (p, q):
//   w_k = exp(-(a_k - mu) / g) / sum_l exp(-(a_l - mu) / g),  exponents <= 0 by design.
// No R[p][q] - cost[p][q] difference is formed (no inf - inf, no cancellation); a cell whose
// predecessors are all +inf pushes nothing, an unreachable (+inf) predecessor gets weight 0.
// Backward (hard): the optimal path, backtracked from (n, m) through the kept R with ties
// broken diagonal, then (i - 1, j), then (i, j - 1); E = grad[b] on the path, 0 elsewhere.
//
// Precision: values and R are returned in the input dtype, but all arithmetic is fp64, for
// fp32 inputs too (see Acc below); fp32 costs are read as fp32 and widened. The fp32 soft
// backward therefore recomputes the pair's R in fp64 from the cost (the kept fp32 R is not
// precise enough for the weights at small gamma), in O(n m) per-thread scratch; the hard
// backward uses the kept R.

#include "dtw_kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace ether_kernels::cpu {
namespace CPU_CAPABILITY {
namespace {

// The allowed j-range of each row of one pair.
struct PairBand {
  int64_t n, m;
  bool banded;
  int64_t lo, hi;  // allowed j - i offsets (when banded)

  PairBand(int64_t n_, int64_t m_, int64_t band) : n(n_), m(m_), banded(band >= 0) {
    lo = banded ? -band + std::min<int64_t>(0, m - n) : 0;
    hi = banded ? band + std::max<int64_t>(0, m - n) : 0;
  }
  // 1-based row i: allowed columns [first(i), last(i)] (never empty for 1 <= i <= n).
  int64_t first(int64_t i) const { return banded ? std::max<int64_t>(1, i + lo) : 1; }
  int64_t last(int64_t i) const { return banded ? std::min<int64_t>(m, i + hi) : m; }
  bool allowed(int64_t i, int64_t j) const {
    return !banded || (j - i >= lo && j - i <= hi);
  }
};

// The arithmetic type: fp64 for fp32 inputs too. The soft-argmin weights are exponentials
// of R differences divided by gamma, so an fp32 R (ulp ~ 1e-5 at R ~ 100) would give errors
// ~ 1e-2 in the weights at gamma = 1e-3; the spec asks fp32 gradients within 1e-4 of fp64.
template <typename T>
using Acc = double;

template <typename T>
inline T softmin3(T a, T b, T c, T gamma, T inv_gamma) {
  const T mu = std::min(a, std::min(b, c));
  if (mu == std::numeric_limits<T>::infinity()) return mu;
  // (mu - inf) * inv_gamma = -inf and exp(-inf) = 0: an unreachable predecessor adds 0.
  const T s = std::exp((mu - a) * inv_gamma) + std::exp((mu - b) * inv_gamma) +
              std::exp((mu - c) * inv_gamma);
  return mu - gamma * std::log(s);
}

// One pair, computed in A (double for fp32 inputs, see the file comment). cost has row
// stride M; prev and cur hold m + 1 values. R_out (nullable) has row stride ldr and gets
// rows 1..n (+inf outside the band / beyond m), then +inf rows up to `rows`.
template <typename T, typename A, typename O, bool kSoft>
A forward_pair(const T* cost, int64_t M, const PairBand& pb, A gamma, A* prev, A* cur,
               O* R_out, int64_t ldr, int64_t rows) {
  constexpr A kInf = std::numeric_limits<A>::infinity();
  const A inv_gamma = A(1) / gamma;
  const int64_t n = pb.n, m = pb.m;
  std::fill(prev, prev + m + 1, kInf);
  std::fill(cur, cur + m + 1, kInf);
  prev[0] = A(0);                    // row 0: R[0][0] = 0, the rest +inf
  int64_t prev_first = 0, prev_last = 0;
  int64_t cur_first = 1, cur_last = 0;  // the range of stale values cur holds (none yet)
  for (int64_t i = 1; i <= n; ++i) {
    for (int64_t j = cur_first; j <= cur_last; ++j) cur[j] = kInf;  // drop row i - 2
    const int64_t jf = pb.first(i), jl = pb.last(i);
    const T* crow = cost + (i - 1) * M;
    A left = kInf;  // R[i][jf - 1]: out of band or column 0
    for (int64_t j = jf; j <= jl; ++j) {
      const A d = prev[j - 1], u = prev[j];
      A best;
      if constexpr (kSoft) {
        best = softmin3(d, u, left, gamma, inv_gamma);
      } else {
        best = std::min(d, std::min(u, left));
      }
      const A v = static_cast<A>(crow[j - 1]) + best;
      cur[j] = v;
      left = v;
    }
    if (R_out != nullptr) {
      O* rrow = R_out + (i - 1) * ldr;
      std::fill(rrow, rrow + (jf - 1), std::numeric_limits<O>::infinity());
      for (int64_t j = jf; j <= jl; ++j) rrow[j - 1] = static_cast<O>(cur[j]);
      std::fill(rrow + jl, rrow + ldr, std::numeric_limits<O>::infinity());
    }
    std::swap(prev, cur);
    cur_first = prev_first;
    cur_last = prev_last;
    prev_first = jf;
    prev_last = jl;
  }
  if (R_out != nullptr && rows > n) {
    std::fill(R_out + n * ldr, R_out + rows * ldr, std::numeric_limits<O>::infinity());
  }
  return prev[m];
}

template <typename T>
void forward_impl(const DtwForwardArgs& a) {
  using A = Acc<T>;
  const T* cost = static_cast<const T*>(a.cost);
  T* values = static_cast<T*>(a.values);
  T* R = static_cast<T*>(a.R);
  const int64_t B = a.B, N = a.N, M = a.M;
  const A gamma = static_cast<A>(a.gamma);
  const int64_t cells = std::max<int64_t>(1, N * M);
  const int64_t grain = std::max<int64_t>(1, 32768 / cells);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(2 * (M + 1));
    A* prev = buf.data();
    A* cur = buf.data() + M + 1;
    for (int64_t b = begin; b < end; ++b) {
      const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
      const T* cb = cost + b * N * M;
      T* Rb = R != nullptr ? R + b * N * M : nullptr;
      const A v = a.soft ? forward_pair<T, A, T, true>(cb, M, pb, gamma, prev, cur, Rb, M, N)
                         : forward_pair<T, A, T, false>(cb, M, pb, gamma, prev, cur, Rb, M, N);
      values[b] = static_cast<T>(v);
    }
  });
}

// R[i][j] for 1-based (i, j) with the boundary and band conventions.
template <typename T>
inline T r_at(const T* Rb, int64_t M, const PairBand& pb, int64_t i, int64_t j) {
  if (i == 0 || j == 0) {
    return (i == 0 && j == 0) ? T(0) : std::numeric_limits<T>::infinity();
  }
  if (!pb.allowed(i, j)) return std::numeric_limits<T>::infinity();
  return Rb[(i - 1) * M + (j - 1)];
}

// Rb: R of the pair in A with row stride ldr; Eb: (n, ldr) accumulators in A, zeroed.
template <typename A>
void soft_backward_pair(const A* Rb, int64_t ldr, const PairBand& pb, A gamma, A g, A* Eb) {
  constexpr A kInf = std::numeric_limits<A>::infinity();
  const A inv_gamma = A(1) / gamma;
  const int64_t n = pb.n, m = pb.m;
  Eb[(n - 1) * ldr + (m - 1)] = g;
  for (int64_t p = n; p >= 1; --p) {
    const int64_t jf = pb.first(p), jl = pb.last(p);
    A* erow = Eb + (p - 1) * ldr;
    for (int64_t q = jl; q >= jf; --q) {
      const A e = erow[q - 1];
      if (e == A(0)) continue;
      const A d = r_at(Rb, ldr, pb, p - 1, q - 1);
      const A u = r_at(Rb, ldr, pb, p - 1, q);
      const A l = r_at(Rb, ldr, pb, p, q - 1);
      const A mu = std::min(d, std::min(u, l));
      if (!(mu < kInf)) continue;  // no reachable predecessor (or NaN): push nothing
      const A wd = std::exp(std::min(A(0), (mu - d) * inv_gamma));
      const A wu = std::exp(std::min(A(0), (mu - u) * inv_gamma));
      const A wl = std::exp(std::min(A(0), (mu - l) * inv_gamma));
      const A scale = e / (wd + wu + wl);  // the sum is >= 1
      if (p > 1 && q > 1 && wd > A(0)) Eb[(p - 2) * ldr + (q - 2)] += scale * wd;
      if (p > 1 && wu > A(0)) Eb[(p - 2) * ldr + (q - 1)] += scale * wu;
      if (q > 1 && wl > A(0)) erow[q - 2] += scale * wl;
    }
  }
}

template <typename T>
void hard_backward_pair(const T* Rb, int64_t M, const PairBand& pb, T g, T* Eb) {
  int64_t i = pb.n, j = pb.m;
  while (true) {
    Eb[(i - 1) * M + (j - 1)] = g;
    if (i == 1 && j == 1) break;
    if (i == 1) {
      --j;
    } else if (j == 1) {
      --i;
    } else {
      const T d = r_at(Rb, M, pb, i - 1, j - 1);
      const T u = r_at(Rb, M, pb, i - 1, j);
      const T l = r_at(Rb, M, pb, i, j - 1);
      if (d <= u && d <= l) {
        --i;
        --j;
      } else if (u <= l) {
        --i;
      } else {
        --j;
      }
    }
  }
}

template <typename T>
void backward_impl(const DtwBackwardArgs& a) {
  using A = Acc<T>;
  constexpr bool kSameType = std::is_same_v<T, A>;
  const T* grad = static_cast<const T*>(a.grad);
  const T* cost = static_cast<const T*>(a.cost);
  const T* R = static_cast<const T*>(a.R);
  T* E = static_cast<T*>(a.E);
  const int64_t B = a.B, N = a.N, M = a.M;
  const A gamma = static_cast<A>(a.gamma);
  const int64_t cells = std::max<int64_t>(1, N * M);
  const int64_t grain = std::max<int64_t>(1, 32768 / cells);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    // Soft backward when T != A (fp32): the kept R is only rounded, so the pair's R is
    // recomputed in A (bit-identical to what the forward computed before rounding), and E
    // is accumulated in A, both in (n, m) scratch buffers.
    std::vector<A> rows, r_scratch, e_scratch;
    for (int64_t b = begin; b < end; ++b) {
      const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
      const int64_t n = pb.n, m = pb.m;
      T* Eb = E + b * N * M;
      std::fill(Eb, Eb + N * M, T(0));
      const T* Rb = R + b * N * M;
      if (!a.soft) {
        hard_backward_pair<T>(Rb, M, pb, grad[b], Eb);
      } else if constexpr (kSameType) {
        soft_backward_pair<A>(reinterpret_cast<const A*>(Rb), M, pb, gamma,
                              static_cast<A>(grad[b]), reinterpret_cast<A*>(Eb));
      } else {
        rows.resize(2 * (m + 1));
        r_scratch.resize(n * m);
        e_scratch.assign(n * m, A(0));
        forward_pair<T, A, A, true>(cost + b * N * M, M, pb, gamma, rows.data(),
                                    rows.data() + m + 1, r_scratch.data(), m, n);
        soft_backward_pair<A>(r_scratch.data(), m, pb, gamma, static_cast<A>(grad[b]),
                              e_scratch.data());
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < m; ++j) Eb[i * M + j] = static_cast<T>(e_scratch[i * m + j]);
        }
      }
    }
  });
}

}  // namespace

void dtw_forward(const DtwForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.dtype, "dtw_forward", [&] { forward_impl<scalar_t>(args); });
}

void dtw_backward(const DtwBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.dtype, "dtw_backward",
                             [&] { backward_impl<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace ether_kernels::cpu
