// Batched DTW / soft-DTW CPU kernels on a precomputed cost tensor (B, N, M).
// Compiled once per instruction set (CPU_CAPABILITY = DEFAULT, AVX2, AVX512; see setup.py).
//
// Semantics: shared/specs/dtw.md. For pair b (lengths n, m, band r):
//   R[0][0] = 0, R[i][0] = R[0][j] = +inf, out-of-band cells = +inf,
//   R[i][j] = cost[i][j] + op(R[i-1][j-1], R[i-1][j], R[i][j-1]),
// op = min (hard) or the stable soft-min  mu - g log sum_k exp(-(a_k - mu) / g), +inf when
// mu = +inf. Allowed cells: -r + min(0, m - n) <= j - i <= r + max(0, m - n).
//
// NaN convention (as the reference): a NaN cost in any allowed cell makes the pair's value
// NaN (every allowed cell lies on some path to (n, m)). The min instructions and std::min
// drop a NaN operand, so the scalar paths OR a flag per cell (off the dependency chain)
// and return NaN when it is set; the lanes' minimum (at::vec::minimum) and soft-min
// (softmin3_cells) propagate NaN instead. The gradient of such a pair is made NaN by the
// Python layer (dynamic_time_warping._nan_pairs), whatever the backward computes here.
//
// Forward: one pair per task (at::parallel_for over pairs), two rolling rows of m + 1
// values; only the band's cells are computed, and a row buffer is reset to +inf only over
// the range it held before, so a banded pair costs O(n * band), not O(n * m). Keep mode also
// writes each row into R (+inf outside the band and beyond the lengths). Hard DTW of all
// but small pairs runs in strips of vector lanes instead (forward_hard_strips: the same
// cells and sums, L cells of an anti-diagonal per step).
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
// Precision: values are returned in the input dtype, but all soft-DTW arithmetic is fp64,
// for fp32 inputs too (see Acc below); fp32 costs are read as fp32 and widened. Soft-DTW
// keeps R in fp64 (an fp32 R is not precise enough for the backward's weights at small
// gamma), so the backward never recomputes the forward; hard DTW keeps R in the dtype.
// The fp32 lane groups keep soft-argmin weights, not R; the AVX512 and AVX2 builds sweep
// them as 2^(-R / (gamma ln 2)) instead of R (a sum per cell, no logarithm:
// xy_soft_forward_scaled).
// Kept R layout: (B, N, M), pair b's cell (i, j) at [b, i - 1, j - 1]; except the soft
// series path, which keeps by task (LaneGroups: pairs grouped by length, so a task's pairs
// need not be consecutive): a group of L pairs run in vector lanes keeps its rows
// interleaved in the L * N * M block at its slot: cell (i, j) of lane k at
// ((i - 1) * m + (j - 1)) * L + k, m the longest of the group's lengths (pairs of different
// lengths share one grid, see LaneShape); a pair run alone keeps its (N, M) grid at its
// slot, after the groups. Only the matching backward reads it.

#include "dtw_kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace ether_kernels::cpu {
namespace CPU_CAPABILITY {
namespace {

// Subnormal doubles flushed to zero for the lifetime of the scope (this thread only; the
// caller's floating-point mode is restored). The soft-DTW backward's E decays like
// exp(-excess cost / gamma) away from the optimal path and reaches the subnormal range
// (< 2.2e-308) on ordinary inputs; each subnormal operand costs a ~100-cycle microcode
// assist, which made the backward 2.4x slower. A flushed value changes the result by less
// than 1e-307 absolute.
class FlushSubnormalsScope {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  FlushSubnormalsScope() : saved_(_mm_getcsr()) {
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) and DAZ (bit 6)
  }
  ~FlushSubnormalsScope() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

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
  // The minimum's term is exp(0) = 1 exactly, so only the other two exponentials are
  // evaluated (branch-free selects); the sum is formed in the order a, b, c, bit-identical
  // to exp(.) + exp(.) + exp(.).
  const bool a_min = a == mu, b_min = !a_min && b == mu;
  const T p = a_min ? b : a;
  const T q = (a_min || b_min) ? c : b;
  const T ep = std::exp((mu - p) * inv_gamma), eq = std::exp((mu - q) * inv_gamma);
  const T s = (a_min || b_min) ? (T(1) + ep) + eq : (ep + eq) + T(1);
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
  bool nan_seen = false;
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
      nan_seen |= v != v;  // NaN convention: see the file comment
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
  return nan_seen ? std::numeric_limits<A>::quiet_NaN() : prev[m];
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
      // The minimum's weight is exp(0) = 1 exactly: evaluate only the other two.
      const bool d_min = d == mu, u_min = !d_min && u == mu;
      const A e1 = std::exp(std::min(A(0), (mu - (d_min ? u : d)) * inv_gamma));
      const A e2 = std::exp(std::min(A(0), (mu - ((d_min || u_min) ? l : u)) * inv_gamma));
      const A wd = d_min ? A(1) : e1;
      const A wu = d_min ? e1 : (u_min ? A(1) : e2);
      const A wl = (d_min || u_min) ? e2 : A(1);
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
  const T* R = static_cast<const T*>(a.R);                  // hard: the dtype
  const double* R_soft = static_cast<const double*>(a.R);  // soft: fp64
  T* E = static_cast<T*>(a.E);
  const int64_t B = a.B, N = a.N, M = a.M;
  const A gamma = static_cast<A>(a.gamma);
  const int64_t cells = std::max<int64_t>(1, N * M);
  const int64_t grain = std::max<int64_t>(1, 32768 / cells);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    const FlushSubnormalsScope flush_subnormals;  // see the class comment
    // Soft backward for fp32: E is accumulated in A in an (n, M) scratch buffer.
    std::vector<A> e_scratch;
    for (int64_t b = begin; b < end; ++b) {
      const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
      const int64_t n = pb.n, m = pb.m;
      T* Eb = E + b * N * M;
      std::fill(Eb, Eb + N * M, T(0));
      if (!a.soft) {
        hard_backward_pair<T>(R + b * N * M, M, pb, grad[b], Eb);
      } else if constexpr (kSameType) {
        soft_backward_pair<A>(R_soft + b * N * M, M, pb, gamma, static_cast<A>(grad[b]),
                              reinterpret_cast<A*>(Eb));
      } else {
        e_scratch.assign(n * M, A(0));
        soft_backward_pair<A>(R_soft + b * N * M, M, pb, gamma, static_cast<A>(grad[b]),
                              e_scratch.data());
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < m; ++j) Eb[i * M + j] = static_cast<T>(e_scratch[i * M + j]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// DTW on the series (x, y): the local cost is computed per cell from x[i - 1] and y[j - 1].
// ---------------------------------------------------------------------------------------

enum : int { kSqEuclidean = 0, kEuclidean = 1, kL1 = 2 };

// cost(x_i, y_j) in A; kD1: D == 1 known at compile time.
template <int kMetric, bool kD1, typename A, typename T>
inline A local_cost(const T* xi, const T* yj, int64_t D) {
  if constexpr (kD1) {
    const A t = static_cast<A>(xi[0]) - static_cast<A>(yj[0]);
    if constexpr (kMetric == kL1) return std::abs(t);
    else if constexpr (kMetric == kEuclidean) return std::abs(t);  // sqrt(t^2), exact
    else return t * t;
  } else {
    A s = A(0);
    for (int64_t d = 0; d < D; ++d) {
      const A t = static_cast<A>(xi[d]) - static_cast<A>(yj[d]);
      if constexpr (kMetric == kL1) s += std::abs(t);
      else s += t * t;
    }
    if constexpr (kMetric == kEuclidean) return std::sqrt(s);
    else return s;
  }
}

// One pair on the series: as forward_pair, with cost(i, j) = local_cost(x[i-1], y[j-1]).
// x has row stride D (pair's rows 0..n-1), y likewise (0..m-1).
template <int kMetric, bool kD1, bool kSoft, typename T, typename A, typename O>
A xy_forward_pair(const T* x, const T* y, int64_t D, const PairBand& pb, A gamma, A* prev,
                  A* cur, O* R_out, int64_t ldr, int64_t rows) {
  constexpr A kInf = std::numeric_limits<A>::infinity();
  const A inv_gamma = A(1) / gamma;
  const int64_t n = pb.n, m = pb.m;
  std::fill(prev, prev + m + 1, kInf);
  std::fill(cur, cur + m + 1, kInf);
  prev[0] = A(0);
  int64_t prev_first = 0, prev_last = 0;
  int64_t cur_first = 1, cur_last = 0;
  bool nan_seen = false;
  for (int64_t i = 1; i <= n; ++i) {
    for (int64_t j = cur_first; j <= cur_last; ++j) cur[j] = kInf;
    const int64_t jf = pb.first(i), jl = pb.last(i);
    const T* xi = x + (i - 1) * D;
    A left = kInf;
    for (int64_t j = jf; j <= jl; ++j) {
      const A d = prev[j - 1], u = prev[j];
      A best;
      if constexpr (kSoft) {
        best = softmin3(d, u, left, gamma, inv_gamma);
      } else {
        best = std::min(d, std::min(u, left));
      }
      const A v = local_cost<kMetric, kD1, A>(xi, y + (j - 1) * D, D) + best;
      nan_seen |= v != v;  // NaN convention: see the file comment
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
  return nan_seen ? std::numeric_limits<A>::quiet_NaN() : prev[m];
}

// Calls f(std::integral_constant<int, metric>, std::integral_constant<bool, D == 1>).
template <typename F>
void dispatch_metric_d(int64_t metric, int64_t D, F&& f) {
  using I0 = std::integral_constant<int, kSqEuclidean>;
  using I1 = std::integral_constant<int, kEuclidean>;
  using I2 = std::integral_constant<int, kL1>;
  using D1 = std::true_type;
  using DN = std::false_type;
  const bool d1 = D == 1;
  switch (metric) {
    case kSqEuclidean: d1 ? f(I0{}, D1{}) : f(I0{}, DN{}); break;
    case kEuclidean: d1 ? f(I1{}, D1{}) : f(I1{}, DN{}); break;
    default: d1 ? f(I2{}, D1{}) : f(I2{}, DN{}); break;
  }
}

// The cells a lane task sweeps. A group whose pairs' lengths differ ("ragged") runs on the
// grid of its longest lengths, n = max n_k, m = max m_k: cell (i, j) depends only on cells
// (i', j') with i' <= i and j' <= j, so lane k's R[n_k][m_k] is the same on the larger grid,
// and it is read there (the forward captures each lane's value at its own (n_k, m_k); the
// backward seeds each lane's E there). The rows and columns past a lane's lengths hold
// zeros in its series copy (gather_lanes): finite cells whose E stays 0 (no successor of
// (n_k, m_k) pushes to its predecessors), so they add nothing to any gradient. With a band,
// the sweep covers the union of the lanes' bands (the smallest lo, the largest hi: still a
// band that only moves right) and `masked` sets a lane's cells outside its own band to +inf,
// which gives them zero weight in every successor, as in that pair's own grid.
// V: the lanes' vector type (Vectorized<double> for soft-DTW, Vectorized<T> for hard DTW).
template <typename V>
struct LaneShape {
  using S = typename V::value_type;
  static constexpr int64_t L = V::size();
  PairBand pb;  // the swept grid: the lanes' longest (n, m) and the union of their bands
  bool masked = false;
  int64_t n[L], m[L];  // lane k's lengths
  S lo[L], hi[L];      // lane k's allowed j - i offsets (when masked; see exact_offsets)

  // pairs: the L pairs, lane k running pair pairs[k].
  LaneShape(const int64_t* pairs, const int64_t* xl, const int64_t* yl, int64_t band)
      : pb(xl[pairs[0]], yl[pairs[0]], band) {
    bool ragged = false;
    for (int64_t k = 0; k < L; ++k) {
      const PairBand own(xl[pairs[k]], yl[pairs[k]], band);
      n[k] = own.n;
      m[k] = own.m;
      lo[k] = static_cast<S>(own.lo);
      hi[k] = static_cast<S>(own.hi);
      ragged = ragged || own.n != pb.n || own.m != pb.m;
      pb.lo = std::min(pb.lo, own.lo);
      pb.hi = std::max(pb.hi, own.hi);
    }
    pb.n = *std::max_element(n, n + L);
    pb.m = *std::max_element(m, m + L);
    masked = ragged && pb.banded;
  }
  // The masks compare offsets j - i in S: exact while every offset is below 2^digits
  // (2^24 for float lanes); a caller runs the pairs one by one otherwise.
  bool exact_offsets() const {
    const int64_t limit = int64_t(1) << std::numeric_limits<S>::digits;
    return !masked || std::max(pb.n, pb.m) < limit;
  }
  // The lanes of cell (i, j) outside their own band (all bits set), when masked.
  V outside(int64_t i, int64_t j) const {
    const V offset(static_cast<S>(j - i));
    return (offset < V::loadu(lo)) | (offset > V::loadu(hi));
  }
};

// Interleaves the series of L pairs (lane k: pairs[k]) into xt (n, D, L) and yt (m, D, L)
// on the shape's grid; a lane's rows past its own length are zeros (see LaneShape).
template <typename V, typename T>
void gather_lanes(const T* x, const T* y, int64_t x_stride, int64_t y_stride, int64_t D,
                  const int64_t* pairs, const LaneShape<V>& shape,
                  std::vector<typename V::value_type>& xt,
                  std::vector<typename V::value_type>& yt) {
  using S = typename V::value_type;
  constexpr int64_t L = V::size();
  xt.assign(shape.pb.n * D * L, S(0));
  yt.assign(shape.pb.m * D * L, S(0));
  for (int64_t k = 0; k < L; ++k) {
    const T* xb = x + pairs[k] * x_stride;
    const T* yb = y + pairs[k] * y_stride;
    for (int64_t e = 0; e < shape.n[k] * D; ++e) xt[e * L + k] = static_cast<S>(xb[e]);
    for (int64_t e = 0; e < shape.m[k] * D; ++e) yt[e * L + k] = static_cast<S>(yb[e]);
  }
}


// Hard value-only DTW of L pairs at once, pair k in lane k of at::vec::Vectorized<T>, on
// the shape's grid (LaneShape: lane k's value is R[n_k][m_k]; kMasked: the shape's lanes
// have bands of their own). xt: (n, D, L) and yt: (m, D, L) interleaved copies of the
// pairs' series (gather_lanes); prev / cur: (m + 1) vectors each.
template <int kMetric, bool kMasked, typename T>
void xy_forward_hard_lanes(const T* xt, const T* yt, int64_t D,
                           const LaneShape<at::vec::Vectorized<T>>& shape,
                           at::vec::Vectorized<T>* prev, at::vec::Vectorized<T>* cur, T* out) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t L = V::size();
  const V inf(std::numeric_limits<T>::infinity());
  const PairBand& pb = shape.pb;
  const int64_t n = pb.n, m = pb.m;
  for (int64_t j = 0; j <= m; ++j) {
    prev[j] = inf;
    cur[j] = inf;
  }
  prev[0] = V(T(0));
  int64_t prev_first = 0, prev_last = 0;
  int64_t cur_first = 1, cur_last = 0;
  for (int64_t i = 1; i <= n; ++i) {
    for (int64_t j = cur_first; j <= cur_last; ++j) cur[j] = inf;
    const int64_t jf = pb.first(i), jl = pb.last(i);
    const T* xi = xt + (i - 1) * D * L;
    V left = inf;
    if (D == 1) {
      const V xv = V::loadu(xi);
      for (int64_t j = jf; j <= jl; ++j) {
        const V t = xv - V::loadu(yt + (j - 1) * L);
        V c;
        if constexpr (kMetric == kSqEuclidean) c = t * t;
        else c = t.abs();
        V v = c + at::vec::minimum(at::vec::minimum(prev[j - 1], prev[j]), left);
        if constexpr (kMasked) v = V::blendv(v, inf, shape.outside(i, j));
        cur[j] = v;
        left = v;
      }
    } else {
      for (int64_t j = jf; j <= jl; ++j) {
        const T* yj = yt + (j - 1) * D * L;
        V c(T(0));
        for (int64_t d = 0; d < D; ++d) {
          const V t = V::loadu(xi + d * L) - V::loadu(yj + d * L);
          if constexpr (kMetric == kL1) c = c + t.abs();
          else c = c + t * t;  // no FMA: the same rounding as the scalar path
        }
        if constexpr (kMetric == kEuclidean) c = c.sqrt();
        V v = c + at::vec::minimum(at::vec::minimum(prev[j - 1], prev[j]), left);
        if constexpr (kMasked) v = V::blendv(v, inf, shape.outside(i, j));
        cur[j] = v;
        left = v;
      }
    }
    for (int64_t k = 0; k < L; ++k) {  // the lanes whose last row this is
      if (shape.n[k] == i) {
        alignas(64) T row_values[L];
        cur[shape.m[k]].store(row_values);
        out[k] = row_values[k];
      }
    }
    std::swap(prev, cur);
    cur_first = prev_first;
    cur_last = prev_last;
    prev_first = jf;
    prev_last = jl;
  }
}

// ---------------------------------------------------------------------------------------
// Hard DTW of ONE pair in the lanes of one vector: the value of a pair that runs alone
// (fewer than L pairs, or the B mod L left over), any pair whose R is kept (hard DTW with a
// gradient), and the pairs of a precomputed cost. A strip of L rows at a time, lane
// k sweeping row i0 + k one column behind lane k - 1, so that step s computes the cells
// (i0 + k, s - k) of an anti-diagonal of the strip, each from cells of the two steps before:
//   left (i0 + k,     s - k - 1) = lane k's value at step s - 1
//   up   (i0 + k - 1, s - k)     = lane k - 1's value at step s - 1 (the vector shifted up
//                                  one lane, row i0 - 1 shifted into lane 0)
//   diag (i0 + k - 1, s - k - 1) = up at step s - 1
// One lane shift per step is the only cross-lane work, so a step's dependency chain is a
// shift, a minimum and an add for L cells where the pair-by-pair sweep's is a minimum and
// an add per cell. Row i0 - 1 comes from `row`, which the strip overwrites with its own
// last row (lane L - 1, L - 1 columns behind the reads). Cells outside the band or the
// grid get a +inf cost, so their value is +inf (a NaN cost is recorded off the chain, as
// the scalar path does, since the min instruction drops NaN operands). The cells, their
// costs and the sums are those of xy_forward_pair (forward_pair for a precomputed cost):
// the values are bitwise the same. Offsets are compared in the arithmetic type: exact
// while max(n, m) < 2^(digits - 2) (strips_exact).

// (first, v[0], ..., v[L - 2]): v shifted up one lane, `first` into lane 0.
template <typename T>
inline at::vec::Vectorized<T> shift_in(const at::vec::Vectorized<T>& v, T first) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(
        _mm512_castps_si512(v), _mm512_castps_si512(_mm512_set1_ps(first)), 15));
  } else {
    return _mm512_castsi512_pd(_mm512_alignr_epi64(
        _mm512_castpd_si512(v), _mm512_castpd_si512(_mm512_set1_pd(first)), 7));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 rotated = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6));
    return _mm256_blend_ps(rotated, _mm256_set1_ps(first), 1);
  } else {
    const __m256d rotated = _mm256_permute4x64_pd(v, _MM_SHUFFLE(2, 1, 0, 3));
    return _mm256_blend_pd(rotated, _mm256_set1_pd(first), 1);
  }
#else
  constexpr int64_t L = at::vec::Vectorized<T>::size();
  alignas(64) T lanes[L + 1];
  v.store(lanes + 1);
  lanes[0] = first;
  return at::vec::Vectorized<T>::loadu(lanes);
#endif
}

// min(a, b) lane by lane as the min instruction (a NaN operand dropped: see above).
template <typename T>
inline at::vec::Vectorized<T> min_instruction(const at::vec::Vectorized<T>& a,
                                              const at::vec::Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_min_ps(a, b);
  else return _mm512_min_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_min_ps(a, b);
  else return _mm256_min_pd(a, b);
#else
  return at::vec::minimum(a, b);
#endif
}

// Pairs of fewer cells run pair by pair (the strips' copies of the series would cost more
// than the lanes save).
constexpr int64_t kStripsMinCells = 4096;

template <typename T>
bool strips_exact(const PairBand& pb) {
  return std::max(pb.n, pb.m) < (int64_t(1) << (std::numeric_limits<T>::digits - 2));
}

constexpr int64_t kStripStageSteps = 64;
constexpr int kPrecomputedCost = -1;  // forward_hard_strips' kMetric for a given cost

template <typename T>
struct StripBuffers {
  std::vector<T> xs, yr, row, stage, cost_stage;
  std::vector<at::vec::Vectorized<T>> xv;
};

// The series of one pair for the strips, in A: x transposed, (D, n_pad) with n_pad = n
// rounded up to L, zeros past row n; y reversed and transposed, (D, m + 2 L): y's column j
// (1-based) at L + m - j, so that the L columns s - k of step s are contiguous from
// L + m - s (zeros past both ends).
template <typename A, typename T>
void strip_series(const T* x, const T* y, int64_t D, int64_t n, int64_t m, int64_t L,
                  std::vector<A>& xs, std::vector<A>& yr) {
  const int64_t n_pad = (n + L - 1) / L * L, ldy = m + 2 * L;
  xs.assign(D * n_pad, A(0));
  yr.assign(D * ldy, A(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = 0; d < D; ++d) xs[d * n_pad + i] = static_cast<A>(x[i * D + d]);
  }
  for (int64_t j = 1; j <= m; ++j) {
    for (int64_t d = 0; d < D; ++d) yr[d * ldy + L + m - j] = static_cast<A>(y[(j - 1) * D + d]);
  }
}

// x: (n, D) and y: (m, D) rows of one pair (row stride D); kD1: D == 1. R_out (nullable)
// as xy_forward_pair's: rows 1..n of R with row stride ldr (+inf outside the band and past
// m), then +inf rows up to `rows`. The steps' vectors go to a small stage first and out to
// the rows kStripStageSteps columns at a time: a step's L cells lie in L rows whose
// addresses differ by about ldr elements, which for a power-of-2 ldr map to one cache set
// (written directly, 1 x 4096^2 kept R took 35 ms against 4.6 ms for the values).
// kMetric == kPrecomputedCost: the costs come from `cost` (row stride ldc) instead of x and
// y, staged as the values are, kStripStageSteps steps at a time (each row read in order).
// The arithmetic is in A (T for the series, fp64 for a precomputed fp32 cost, as
// forward_pair); R_out and `cost` are in T.
template <int kMetric, bool kD1, typename A, typename T>
A forward_hard_strips(const T* x, const T* y, int64_t D, const PairBand& pb,
                      StripBuffers<A>& buf, T* R_out = nullptr, int64_t ldr = 0,
                      int64_t rows = 0, const T* cost = nullptr, int64_t ldc = 0) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t L = V::size();
  constexpr A kInf = std::numeric_limits<A>::infinity();
  constexpr bool kCost = kMetric == kPrecomputedCost;
  const int64_t n = pb.n, m = pb.m;
  if constexpr (kCost) D = 0;  // no series to copy
  const int64_t n_pad = (n + L - 1) / L * L, ldy = m + 2 * L;
  strip_series<A, T>(x, y, D, n, m, L, buf.xs, buf.yr);
  buf.row.assign(m + 1, kInf);
  buf.xv.resize(D);
  if (R_out != nullptr) buf.stage.resize(kStripStageSteps * L);
  if constexpr (kCost) buf.cost_stage.resize(kStripStageSteps * L);
  A* stage = buf.stage.data();
  A* cost_stage = buf.cost_stage.data();
  A* row = buf.row.data();
  const A* yr = buf.yr.data();
  alignas(64) A lane_index[L];
  for (int64_t k = 0; k < L; ++k) lane_index[k] = static_cast<A>(k);
  const V lanes = V::loadu(lane_index), one(A(1)), inf(kInf);
  // Allowed offsets j - i (any, unbanded) and columns.
  const A wide = static_cast<A>(n + m + 4 * L);
  const V lo(pb.banded ? static_cast<A>(pb.lo) : -wide);
  const V hi(pb.banded ? static_cast<A>(pb.hi) : wide);
  const V first_column(A(1)), last_column(static_cast<A>(m));
  V nan_cost(A(0));  // lanes that met a NaN cost in an allowed cell (all bits set)
  int64_t held_first = 1, held_last = 0;  // the columns of row i0 - 1 that `row` holds
  A value = kInf;
  for (int64_t i0 = 1; i0 <= n; i0 += L) {
    const bool last_strip = i0 + L > n;
    const int64_t s_first = pb.first(i0);
    const int64_t s_last = last_strip ? m + (n - i0) : pb.last(i0 + L - 1) + (L - 1);
    // R[i0 - 1][s]: row 0 is 0 at column 0, +inf after; other rows +inf where not held.
    auto above = [&](int64_t s) -> A {
      if (i0 == 1) return s == 0 ? A(0) : kInf;
      return s >= held_first && s <= held_last ? row[s] : kInf;
    };
    for (int64_t d = 0; d < D; ++d) buf.xv[d] = V::loadu(buf.xs.data() + d * n_pad + (i0 - 1));
    const int64_t strip_rows = std::min<int64_t>(L, n - i0 + 1);
    if (R_out != nullptr) {  // +inf where the steps write nothing: row i0 + k has s - k
      for (int64_t k = 0; k < strip_rows; ++k) {
        T* rrow = R_out + (i0 + k - 1) * ldr;
        const int64_t written_first = std::max<int64_t>(1, s_first - k);
        const int64_t written_last = std::min<int64_t>(m, s_last - k);
        std::fill(rrow, rrow + (written_first - 1), kInf);
        std::fill(rrow + written_last, rrow + ldr, kInf);
      }
    }
    const V xv0 = D > 0 ? buf.xv[0] : V(A(0));
    const V past_n = lanes > V(static_cast<A>(n - i0));  // rows past n (the last strip)
    V column = V(static_cast<A>(s_first)) - lanes;        // j of lane k at step s
    V offset = column - V(static_cast<A>(i0)) - lanes;   // j - i
    V left = inf;                                        // step s - 1: all outside
    V diag = shift_in(inf, above(s_first - 1));
    // The steps staged_first .. s - 1 into their rows: lane k's cells (i0 + k, s' - k).
    int64_t staged_first = s_first;
    auto flush_stage = [&](int64_t s_end) {
      for (int64_t k = 0; k < strip_rows; ++k) {
        T* rrow = R_out + (i0 + k - 1) * ldr;
        const int64_t j_first = std::max<int64_t>(1, staged_first - k);
        const int64_t j_last = std::min<int64_t>(m, s_end - 1 - k);
        const A* lane = stage + (k - staged_first) * L + k;  // column j at lane[j * L]
        for (int64_t j = j_first; j <= j_last; ++j) rrow[j - 1] = static_cast<T>(lane[j * L]);
      }
      staged_first = s_end;
    };
    // The costs of the steps cost_first .. cost_end - 1 (0 off the grid: masked).
    int64_t cost_first = s_first, cost_end = s_first;
    auto stage_costs = [&](int64_t s_begin) {
      cost_first = s_begin;
      cost_end = std::min(s_last + 1, s_begin + kStripStageSteps);
      std::fill(cost_stage, cost_stage + kStripStageSteps * L, A(0));
      for (int64_t k = 0; k < strip_rows; ++k) {
        const T* crow = cost + (i0 + k - 1) * ldc;
        const int64_t j_first = std::max<int64_t>(1, cost_first - k);
        const int64_t j_last = std::min<int64_t>(m, cost_end - 1 - k);
        A* lane = cost_stage + (k - cost_first) * L + k;  // column j at lane[j * L]
        for (int64_t j = j_first; j <= j_last; ++j) lane[j * L] = static_cast<A>(crow[j - 1]);
      }
    };
    for (int64_t s = s_first; s <= s_last; ++s) {
      const V up = shift_in(left, above(s));
      const A* ys = yr + L + m - s;
      const V outside = (column < first_column) | (column > last_column) | (offset < lo) |
                        (offset > hi) | past_n;
      V c;
      if constexpr (kCost) {
        if (s == cost_end) stage_costs(s);
        c = V::blendv(V::loadu(cost_stage + (s - cost_first) * L), inf, outside);
        nan_cost = nan_cost | (c != c);
      } else if constexpr (kD1) {
        // +inf into the difference, and the NaN test on it, not on the cost: the cost's
        // one use is then t * t + best, as in the pair-by-pair and lane paths, which the
        // compiler fuses the same way (bitwise the same values).
        const V t = V::blendv(xv0 - V::loadu(ys), inf, outside);
        nan_cost = nan_cost | (t != t);
        if constexpr (kMetric == kSqEuclidean) c = t * t;
        else c = t.abs();
      } else {
        c = V(A(0));
        for (int64_t d = 0; d < D; ++d) {
          const V t = buf.xv[d] - V::loadu(ys + d * ldy);
          if constexpr (kMetric == kL1) c = c + t.abs();
          else c = c + t * t;  // no FMA: the same rounding as the scalar path
        }
        if constexpr (kMetric == kEuclidean) c = c.sqrt();
        c = V::blendv(c, inf, outside);
        nan_cost = nan_cost | (c != c);
      }
      const V v = c + min_instruction(min_instruction(diag, left), up);
      if (R_out != nullptr) {
        v.store(stage + (s - staged_first) * L);
        if (s - staged_first == kStripStageSteps - 1 || s == s_last) flush_stage(s + 1);
      }
      if (!last_strip) {
        const int64_t j = s - (L - 1);  // lane L - 1's column: row i0 + L - 1 into `row`
        if (j >= 1 && j <= m) {
          alignas(64) A values[L];
          v.store(values);
          row[j] = values[L - 1];
        }
      }
      diag = up;
      left = v;
      column = column + one;
      offset = offset + one;
    }
    if (last_strip) {
      alignas(64) A values[L];
      left.store(values);
      value = values[n - i0];
    } else {
      held_first = std::max<int64_t>(1, s_first - (L - 1));
      held_last = std::min<int64_t>(m, s_last - (L - 1));
    }
  }
  if (R_out != nullptr && rows > n) {
    std::fill(R_out + n * ldr, R_out + rows * ldr, std::numeric_limits<T>::infinity());
  }
  alignas(64) A flags[L];
  nan_cost.store(flags);
  for (int64_t k = 0; k < L; ++k) {
    if (flags[k] != A(0)) return std::numeric_limits<A>::quiet_NaN();
  }
  return value;
}

// The precomputed-cost forward: pair by pair (forward_pair), hard DTW in strips.
template <typename T>
void forward_impl(const DtwForwardArgs& a) {
  using A = Acc<T>;
  const T* cost = static_cast<const T*>(a.cost);
  T* values = static_cast<T*>(a.values);
  T* R = static_cast<T*>(a.R);               // hard: kept in the dtype
  double* R_soft = static_cast<double*>(a.R);  // soft: kept in fp64
  const int64_t B = a.B, N = a.N, M = a.M;
  const A gamma = static_cast<A>(a.gamma);
  const int64_t cells = std::max<int64_t>(1, N * M);
  const int64_t grain = std::max<int64_t>(1, 32768 / cells);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(2 * (M + 1));
    A* prev = buf.data();
    A* cur = buf.data() + M + 1;
    StripBuffers<A> strips;
    for (int64_t b = begin; b < end; ++b) {
      const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
      const T* cb = cost + b * N * M;
      // Hard DTW in strips of lanes (forward_hard_strips) unless the pair is small.
      if (!a.soft && at::vec::Vectorized<A>::size() > 1 && pb.n * pb.m >= kStripsMinCells &&
          strips_exact<A>(pb)) {
        values[b] = static_cast<T>(forward_hard_strips<kPrecomputedCost, false, A, T>(
            nullptr, nullptr, 0, pb, strips, R != nullptr ? R + b * N * M : nullptr, M, N, cb,
            M));
        continue;
      }
      const A v =
          a.soft ? forward_pair<T, A, double, true>(
                       cb, M, pb, gamma, prev, cur, R != nullptr ? R_soft + b * N * M : nullptr,
                       M, N)
                 : forward_pair<T, A, T, false>(cb, M, pb, gamma, prev, cur,
                                                R != nullptr ? R + b * N * M : nullptr, M, N);
      values[b] = static_cast<T>(v);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Soft-DTW on the series, kLanes pairs at once (pair k in lane k of at::vec::Vectorized
// <double>; the group's grid and lengths: LaneShape). The same recurrence and
// numerics contract as softmin3 / soft_backward_pair, with the vectorised exp / log
// (Sleef u10 in the AVX2 / AVX512 builds, std::exp / std::log in DEFAULT).
// xt: (n, D, L) and yt: (m, D, L) interleaved copies of the pairs' series, widened to A.
// ---------------------------------------------------------------------------------------
using VA = at::vec::Vectorized<double>;
static_assert(sizeof(VA) == VA::size() * sizeof(double), "lanes are read as doubles");

// exp(x) for x <= 0 (the soft-min's and the weights' arguments), inlined: ATen's .exp() is an
// out-of-line Sleef call, and at every cell the call spills the live vectors (3/4 of the
// soft kernels' time went there). Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and
// the degree-12 Taylor polynomial of e^r (truncation < 2e-16 relative), scaled by 2^n.
// Below -708 the result is exactly 0 (-inf included: an unreachable cell adds nothing, and
// no subnormal ever enters the arithmetic); NaN stays NaN.
inline VA exp_nonpositive(const VA& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 0.6931471803691238,
                   kLn2Lo = 1.9082149292705877e-10, kFloor = -708.0;
  // 1 / k! for k = 12 .. 0, the Horner order
  constexpr double kInvFact[13] = {2.08767569878681e-09, 2.505210838544172e-08,
                                   2.755731922398589e-07, 2.755731922398589e-06,
                                   2.48015873015873e-05, 0.0001984126984126984,
                                   0.001388888888888889, 0.008333333333333333,
                                   0.04166666666666666, 0.1666666666666667, 0.5, 1.0, 1.0};
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d v0 = x;
  const __mmask8 under = _mm512_cmp_pd_mask(v0, _mm512_set1_pd(kFloor), _CMP_LT_OQ);
  const __m512d v = _mm512_max_pd(_mm512_set1_pd(kFloor), v0);  // NaN passes through
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(v, _mm512_set1_pd(kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kLn2Hi), v);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kLn2Lo), r);
  __m512d p = _mm512_set1_pd(kInvFact[0]);
  for (int k = 1; k < 13; ++k) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(kInvFact[k]));
  return _mm512_mask_blend_pd(under, _mm512_scalef_pd(p, n), _mm512_setzero_pd());
#else
  const __m256d v0 = x;
  const __m256d under = _mm256_cmp_pd(v0, _mm256_set1_pd(kFloor), _CMP_LT_OQ);
  const __m256d v = _mm256_max_pd(_mm256_set1_pd(kFloor), v0);  // NaN passes through
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(v, _mm256_set1_pd(kLog2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kLn2Hi), v);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kLn2Lo), r);
  __m256d p = _mm256_set1_pd(kInvFact[0]);
  for (int k = 1; k < 13; ++k) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFact[k]));
  // 2^n for n in [-1022, 0]: the exponent field n + 1023 (NaN lanes: any value, see below)
  const __m128i n32 = _mm256_cvtpd_epi32(n);
  const __m256i bits = _mm256_slli_epi64(
      _mm256_add_epi64(_mm256_cvtepi32_epi64(n32), _mm256_set1_epi64x(1023)), 52);
  const __m256d result = _mm256_mul_pd(p, _mm256_castsi256_pd(bits));  // NaN p stays NaN
  return _mm256_blendv_pd(result, _mm256_setzero_pd(), under);
#endif
#else
  return x.exp();
#endif
}

// log(s) for s in [1, 3] (the soft-min's sum 1 + e1 + e2), inlined for the same reason:
// s = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(t), t = (m - 1) / (m + 1),
// |t| <= 0.1716, as an odd series to t^23 (truncation < 1e-18). +inf and NaN propagate.
inline VA log_of_sum(const VA& s) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr double kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
  const __m512d v = s;
  __m512d e = _mm512_getexp_pd(v);                                   // floor(log2 s)
  __m512d m = _mm512_getmant_pd(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
  const __mmask8 big = _mm512_cmp_pd_mask(m, _mm512_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  m = _mm512_mask_mul_pd(m, big, m, _mm512_set1_pd(0.5));
  e = _mm512_mask_add_pd(e, big, e, _mm512_set1_pd(1.0));
  const __m512d one = _mm512_set1_pd(1.0);
  const __m512d t = _mm512_div_pd(_mm512_sub_pd(m, one), _mm512_add_pd(m, one));
  const __m512d t2 = _mm512_mul_pd(t, t);
  __m512d p = _mm512_set1_pd(1.0 / 23);
  for (int k = 21; k >= 1; k -= 2) p = _mm512_fmadd_pd(p, t2, _mm512_set1_pd(1.0 / k));
  const __m512d log_m = _mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(2.0), t), p);
  const __m512d result = _mm512_fmadd_pd(e, _mm512_set1_pd(kLn2Hi),
                                         _mm512_fmadd_pd(e, _mm512_set1_pd(kLn2Lo), log_m));
  // getexp / getmant of +inf give +inf / 1: the result is +inf already; NaN stays NaN.
  return result;
#else
  return s.log();  // AVX2 and DEFAULT: Sleef / std (one call per cell, forward only)
#endif
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Short special functions for the fp32-input lanes' sweep (xy_soft_forward_scaled): their
// weights are stored as fp32 and their values returned as fp32, so ~1e-9 relative per cell
// is enough (errors add along a path of up to n + m cells). Every cell runs them, so their
// instruction count is the sweep's speed (on Zen 4, whose 512-bit units are double pumped,
// the sweep is throughput-bound): Estrin instead of Horner, a reciprocal as rcp14 plus one
// Newton step instead of a 23-cycle division (AVX2 has no double rcp: it divides).

// 1 / s, to 2^-28 relative in the AVX512 build, for s in [1, 6] (a sum of three scaled
// terms, the largest a mantissa in [1, 2)).
inline VA reciprocal_fast(const VA& s) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512d r = _mm512_rcp14_pd(s);
  // r (2 - s r): one Newton step squares the relative error.
  return _mm512_mul_pd(r, _mm512_fnmadd_pd(s, r, _mm512_set1_pd(2.0)));
#else
  return VA(1.0) / s;
#endif
}

// 2^f for |f| <= 1/2: the degree-6 minimax polynomial on [-1/2, 1/2] (Remez; relative
// error < 1.9e-9, below the degree-7 Taylor polynomial's 7e-9), Estrin's scheme. NaN stays
// NaN.
inline VA exp2_reduced_fast(const VA& f) {
  const VA f2 = f * f;
  const VA f4 = f2 * f2;
  // (c0 + c1 f) + f^2 (c2 + c3 f) + f^4 ((c4 + c5 f) + f^2 c6)
  const VA p01 = at::vec::fmadd(f, VA(0.6931472057372674), VA(1.0000000005541665));
  const VA p23 = at::vec::fmadd(f, VA(0.055503287769655504), VA(0.24022646890633997));
  const VA p45 = at::vec::fmadd(f, VA(0.0013399931219127597), VA(0.009618488957128708));
  const VA p46 = at::vec::fmadd(f2, VA(0.00015345811999489706), p45);
  const VA p03 = at::vec::fmadd(f2, p23, p01);
  return at::vec::fmadd(f4, p46, p03);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// softmin_gamma(a, b, c) of kN independent cells at once, on AVX-512 mask registers (ATen's
// comparisons return vectors that every blendv turns back into a mask: two extra
// instructions per select). kN > 1 (the forward's skewed rows) is written stage by stage
// across the cells: one cell's exp -> log chain is ~150 cycles of latency and ~60
// instructions, so cell after cell leaves the out-of-order window holding little more than
// one chain; stage by stage, the independent chains sit next to each other in the
// instruction stream and overlap. softmin3_lanes is the kN = 1 case (without weights).
template <int kN>
inline void softmin3_cells(const __m512d* a, const __m512d* b, const __m512d* c,
                           const VA& gamma, const VA& inv_gamma, __m512d* r) {
  const __m512d v_ig = inv_gamma, v_g = gamma, one = _mm512_set1_pd(1.0);
  const __m512d v_max = _mm512_set1_pd(std::numeric_limits<double>::max());
  __m512d mu[kN], ep[kN], eq[kN];
  __mmask8 k_a[kN], k_b[kN];
  for (int u = 0; u < kN; ++u) {
    mu[u] = _mm512_min_pd(a[u], _mm512_min_pd(b[u], c[u]));
    k_a[u] = _mm512_cmp_pd_mask(a[u], mu[u], _CMP_EQ_OQ);
    k_b[u] = _mm512_mask_cmp_pd_mask(static_cast<__mmask8>(~k_a[u]), b[u], mu[u], _CMP_EQ_OQ);
  }
  // The exponents (mu - p) / gamma <= 0 (p and q: the two operands that are not the
  // minimum), with mu clamped to the largest double: an unreachable cell (mu = p = q =
  // +inf) gets exponents -inf, not inf - inf = NaN, so its sum is 1 and its result
  // mu - gamma log(1) = +inf, with no mask or select.
  // NaN: vminpd returns its second operand when either is NaN, so mu is NaN when c is
  // (the clamp, max first, keeps it), and a NaN a or b is never the minimum: it is p or q
  // and makes the sum NaN, also beside +inf operands (the file's NaN convention).
  auto exponent = [&](const __m512d& m, const __m512d& other) {
    return _mm512_mul_pd(_mm512_sub_pd(_mm512_min_pd(v_max, m), other), v_ig);
  };
  for (int u = 0; u < kN; ++u) {
    const __m512d p = _mm512_mask_blend_pd(k_a[u], a[u], b[u]);
    ep[u] = exp_nonpositive(VA(exponent(mu[u], p)));
  }
  for (int u = 0; u < kN; ++u) {
    const __m512d q = _mm512_mask_blend_pd(k_a[u] | k_b[u], b[u], c[u]);
    eq[u] = exp_nonpositive(VA(exponent(mu[u], q)));
  }
  for (int u = 0; u < kN; ++u) {  // mu - gamma log(1 + e_p + e_q)
    const __m512d sum = _mm512_add_pd(_mm512_add_pd(one, ep[u]), eq[u]);
    r[u] = _mm512_fnmadd_pd(v_g, log_of_sum(VA(sum)), mu[u]);
  }
}
#endif

// softmin_gamma(a, b, c) of every lane. With weights non-null it also returns the soft-argmin
// weights of a and b (the backward's weights of the diagonal and upper predecessors; the
// left one's is 1 - both); a lane whose predecessors are all +inf (E = 0 there) gets
// (0, 0). Weights are kept for fp32 inputs, which the AVX512 and AVX2 builds sweep in
// xy_soft_forward_scaled instead (the AVX512 mask-register version computes values only).
inline VA softmin3_lanes(const VA& a, const VA& b, const VA& c, const VA& gamma,
                         const VA& inv_gamma, VA* weights = nullptr) {
#if defined(CPU_CAPABILITY_AVX512)
  if (weights == nullptr) {
    const __m512d va = a, vb = b, vc = c;
    __m512d r;
    softmin3_cells<1>(&va, &vb, &vc, gamma, inv_gamma, &r);
    return r;
  }
#endif
  const VA inf(std::numeric_limits<double>::infinity());
  const VA one(1.0);
  const VA mu = at::vec::minimum(a, at::vec::minimum(b, c));
  const VA a_min = (a == mu);
  const VA b_min = VA::blendv(b == mu, VA(0.0), a_min);  // !a_min && b == mu
  const VA ab_min = a_min | b_min;
  const VA p = VA::blendv(a, b, a_min);
  const VA q = VA::blendv(b, c, ab_min);
  // (mu - inf) * inv_gamma = -inf and exp(-inf) = 0; mu = +inf lanes are replaced below.
  const VA ep = exp_nonpositive((mu - p) * inv_gamma);
  const VA eq = exp_nonpositive((mu - q) * inv_gamma);
  const VA s = (one + ep) + eq;
  const VA r = mu - gamma * log_of_sum(s);
  const VA unreachable = mu == inf;
  if (weights != nullptr) {
    // p is b when a is the minimum, else a; q is c when a or b is, else b (see above).
    const VA zero(0.0), inv_s = one / s;
    const VA wp = ep * inv_s, wq = eq * inv_s;
    const VA wa = VA::blendv(wp, inv_s, a_min);
    const VA wb = VA::blendv(VA::blendv(wq, inv_s, b_min), wp, a_min);
    weights[0] = VA::blendv(wa, zero, unreachable);
    weights[1] = VA::blendv(wb, zero, unreachable);
  }
  return VA::blendv(r, inf, unreachable);
}

// max(a, b) lane by lane as the max instruction: one instruction where at::vec::maximum
// takes four to propagate NaN (here b's NaN is returned, a's dropped; used where a NaN
// does not matter: a NaN pair's gradient is set by the Python layer).
inline VA max_instruction(const VA& a, const VA& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_pd(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// The two weights of a cell's lanes as 2 L floats (the L doubles of one kept cell slot).
inline void store_weights(float* dst, const VA& wa, const VA& wb) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_storeu_ps(dst, _mm512_cvtpd_ps(wa));
  _mm256_storeu_ps(dst + 8, _mm512_cvtpd_ps(wb));
#elif defined(CPU_CAPABILITY_AVX2)
  _mm_storeu_ps(dst, _mm256_cvtpd_ps(wa));
  _mm_storeu_ps(dst + 4, _mm256_cvtpd_ps(wb));
#else
  constexpr int64_t L = VA::size();
  alignas(64) double tmp[2 * L];
  wa.store(tmp);
  wb.store(tmp + L);
  for (int64_t k = 0; k < 2 * L; ++k) dst[k] = static_cast<float>(tmp[k]);
#endif
}

inline void load_weights(const float* src, VA& wa, VA& wb) {
#if defined(CPU_CAPABILITY_AVX512)
  wa = _mm512_cvtps_pd(_mm256_loadu_ps(src));
  wb = _mm512_cvtps_pd(_mm256_loadu_ps(src + 8));
#elif defined(CPU_CAPABILITY_AVX2)
  wa = _mm256_cvtps_pd(_mm_loadu_ps(src));
  wb = _mm256_cvtps_pd(_mm_loadu_ps(src + 4));
#else
  constexpr int64_t L = VA::size();
  alignas(64) double tmp[2 * L];
  for (int64_t k = 0; k < 2 * L; ++k) tmp[k] = static_cast<double>(src[k]);
  wa = VA::loadu(tmp);
  wb = VA::loadu(tmp + L);
#endif
}

// Local cost of cell (i, j) for all lanes; xi: (D, L), yj: (D, L).
// kDim > 0: D known at compile time (see contract_column).
template <int kMetric, int kDim = 0>
inline VA local_cost_lanes(const double* xi, const double* yj, int64_t D_runtime) {
  const int64_t D = kDim > 0 ? kDim : D_runtime;
  constexpr int64_t L = VA::size();
  VA c(0.0);
  for (int64_t d = 0; d < D; ++d) {
    const VA t = VA::loadu(xi + d * L) - VA::loadu(yj + d * L);
    if constexpr (kMetric == kL1) c = c + t.abs();
    else c = at::vec::fmadd(t, t, c);
  }
  if constexpr (kMetric == kEuclidean) c = c.sqrt();
  return c;
}
// ------------------------------------------------------------ lane tasks
// Pairs run L at a time in the L lanes of one vector, on the grid of the group's longest
// lengths (LaneShape): a group costs max n * max m * L cells. So the pairs are grouped by
// length, not by batch position, in two levels: `order` sorts them by n, then m, longest
// first; the B - groups L shortest are left over as tasks of their own (task t >= groups:
// pair order[groups L + t - groups]); the rest is cut into bands of K L pairs of similar
// n, each sorted by m, then n, and cut into groups of L (task t < groups: pairs
// order[t L .. t L + L - 1]). K = round(sqrt(groups)) balances the spread of n across a
// band against the spread of m within a group: on 64 pairs with n and m drawn
// independently from 64..512, the grids cover 1.50x the pairs' own cells (sorting by n
// alone: 1.75x; the batch order: 2.6x; 1024 pairs: 1.12x). Every sort is stable: an
// equal-length batch groups consecutive pairs, as before. With no groups the order is the
// batch order (pair b is task b). The order depends on the lengths alone, so the forward
// and the backward build the same tasks.
// A soft-DTW forward keeps task t's state at slot(t) N M in the (B, N, M) buffer: a group
// its L pairs' interleaved block, a single pair its own grid after all the groups.
// partial_last (the checkpointed kernels, whose state is per pair, not per lane): the B mod
// L pairs left over make one more group instead of tasks of their own, its spare lanes
// repeating its last pair (LaneTask::distinct): one task's work instead of one per pair.
struct LaneGroups {
  int64_t L, B, groups;
  bool partial_last;
  std::vector<int64_t> order;

  LaneGroups(int64_t lanes, int64_t batch, int64_t group_count, const int64_t* x_lengths,
             const int64_t* y_lengths, bool partial = false)
      : L(lanes), B(batch), groups(partial ? (batch + lanes - 1) / lanes : group_count),
        partial_last(partial), order(batch) {
    for (int64_t b = 0; b < B; ++b) order[b] = b;
    if (groups == 0) return;
    auto longer = [](const int64_t* first, const int64_t* second) {
      return [first, second](int64_t p, int64_t q) {
        if (first[p] != first[q]) return first[p] > first[q];
        return second[p] > second[q];
      };
    };
    std::stable_sort(order.begin(), order.end(), longer(x_lengths, y_lengths));
    const int64_t K = std::max<int64_t>(1, std::llround(std::sqrt(static_cast<double>(groups))));
    const int64_t grouped = std::min(groups * L, B);
    for (int64_t s = 0; s < grouped; s += K * L) {
      std::stable_sort(order.begin() + s, order.begin() + std::min(s + K * L, grouped),
                       longer(y_lengths, x_lengths));
    }
  }
  int64_t tasks() const { return partial_last ? groups : groups + (B - groups * L); }
  bool single(int64_t t) const { return t >= groups; }
  int64_t single_pair(int64_t t) const { return order[groups * L + (t - groups)]; }
  int64_t slot(int64_t t) const { return t < groups ? t * L : groups * L + (t - groups); }
};

// The L pairs (lane k: pair lanes[k]) a task runs; `distinct` lanes own their outputs: L
// for a group, fewer for a partial last group (its last pair repeated), 1 for a single pair
// copied into every lane.
struct LaneTask {
  int64_t lanes[VA::size()];
  int64_t distinct;
};

inline LaneTask lane_task(const LaneGroups& lg, int64_t t) {
  LaneTask task{};
  constexpr int64_t L = VA::size();
  const bool group = !lg.single(t);
  for (int64_t k = 0; k < L; ++k) {
    task.lanes[k] = group ? lg.order[std::min(t * L + k, lg.B - 1)] : lg.single_pair(t);
  }
  task.distinct = group ? std::min(L, lg.B - t * L) : 1;
  return task;
}

// Runs the tasks 0 .. tasks - 1 on up to at::get_num_threads() workers (at least `grain`
// tasks per worker); each worker calls `worker(next_task)` once and takes tasks with
// next_task() (-1 when none is left) in increasing order, whichever worker is free: the
// longest groups come first, so this is a longest-processing-time-first schedule (a static
// split into contiguous ranges would hand one thread all the long groups). Each task
// writes only its own outputs, so the results do not depend on which worker ran it.
template <typename Worker>
void for_each_task(int64_t tasks, int64_t grain, const Worker& worker) {
  if (tasks <= 0) return;
  const int64_t wanted = (tasks + grain - 1) / grain;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), wanted));
  std::atomic<int64_t> next{0};
  auto next_task = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    return t < tasks ? t : -1;
  };
  if (workers == 1) {  // on this thread, outside any parallel region (see RowRing)
    worker(next_task);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next_task); });
}

// The lane gradients gx (n, D) and gy (m, D) vectors of the task's grid into the outputs
// (B, N, D) and (B, M, D) (either may be null) of its distinct pairs: lane k's rows below
// its own lengths, zeros after them.
template <typename T>
void scatter_task_gradients(const LaneTask& task, const LaneShape<VA>& shape, const VA* gx,
                            const VA* gy, int64_t N, int64_t M, int64_t D, T* gx_out,
                            T* gy_out) {
  constexpr int64_t L = VA::size();
  auto scatter = [&](const VA* lanes, int64_t k, int64_t rows, int64_t total, T* out) {
    alignas(64) double tmp[L];
    for (int64_t e = 0; e < rows * D; ++e) {
      lanes[e].store(tmp);
      out[e] = static_cast<T>(tmp[k]);
    }
    std::fill(out + rows * D, out + total * D, T(0));
  };
  for (int64_t k = 0; k < task.distinct; ++k) {
    const int64_t b = task.lanes[k];
    if (gx_out != nullptr) scatter(gx, k, shape.n[k], N, gx_out + b * N * D);
    if (gy_out != nullptr) scatter(gy, k, shape.m[k], M, gy_out + b * M * D);
  }
}

// f(std::integral_constant<int, D>) for the feature counts compiled with D fixed (1 to 4),
// f(std::integral_constant<int, 0>) otherwise (see contract_column).
template <typename F>
decltype(auto) with_fixed_dim(int64_t D, F&& f) {
  switch (D) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}


// Rows are computed kSkewRows at a time, each one column behind the row above: at step j,
// row i + s computes cell (i + s, j - s), which depends only on cells computed at earlier
// steps, so the kSkewRows exp -> log dependency chains (one per row) overlap instead of
// running back to back (a cell's latency, ~200 cycles, not the vector units' throughput,
// bounds a single chain). `rows` holds kSkewRows + 1 rolling rows of m + 1 vectors (1-based
// R with column 0; cells outside the band are +inf). When `kept` is non-null, cell (i, j)
// of the group keeps the L doubles at kept + ((i - 1) m + j - 1) L: its R (kWeights
// false), or its two soft-argmin weights as 2 L floats (kWeights true: the backward then
// needs no exponential at all; fp32 inputs, whose gradients need 1e-4, not fp64 weights;
// the AVX512 and AVX2 builds sweep those in xy_soft_forward_scaled, whose rows take twice
// the room: callers allocate 2 kRollingRows (m + 1) vectors). Returns each lane's
// R[n_k][m_k] (the grid and the lanes' lengths: LaneShape).
// A sweep may also cover only rows i0 + 1 .. i_end, starting from row i0's values (the
// checkpointed backward recomputes one segment of rows at a time: SweepRows); kept rows are
// then stored relative to i0 (row i at kept + (i - i0 - 1) m L), and only the lanes whose
// last row is swept get their value (the others: 0).
constexpr int64_t kSkewRows = 4;
constexpr int64_t kRollingRows = kSkewRows + 1;

// Weights mode: a lane whose end cell is unreachable (its value +inf: every path crosses a
// +inf cost) must push nothing from it, as the reference's soft-min (its gradient stops at
// +inf, so the seed only meets that cell's own local cost); its kept weights, (0, 0) like
// every unreachable cell's, would hand the whole seed to its left neighbour. So the forward
// marks that cell's diagonal weight kUnreachableEnd (kept weights lie in [0, 1]), and the
// backward contracts the lane's seed at the end cell alone instead of pushing it.
constexpr float kUnreachableEnd = -1.0f;

// kept_cell: the L doubles of a kept cell (store_weights' layout: L diagonal weights first).
inline void mark_unreachable_end(double* kept_cell, int64_t lane) {
  reinterpret_cast<float*>(kept_cell)[lane] = kUnreachableEnd;
}

inline bool is_unreachable_end(const double* kept_cell, int64_t lane) {
  return reinterpret_cast<const float*>(kept_cell)[lane] == kUnreachableEnd;
}

// Rows i0 + 1 .. i_end (i_end < 0: the pair's n) from `start`, row i0's m + 1 values (null:
// row 0, R[0][0] = 0 and +inf). When `checkpoints` is non-null, every row i < i_end that is
// a multiple of `every` (itself a multiple of kSkewRows, so that such rows end a block of
// kSkewRows rows) is copied, m + 1 vectors, to checkpoints + (i / every) (m + 1): the rows
// the segments after the first start from.
struct SweepRows {
  int64_t i0 = 0, i_end = -1;
  const VA* start = nullptr;
  VA* checkpoints = nullptr;
  int64_t every = 0;
};

// Weights mode: the kept slots of a row (m cells of L doubles) outside its band range
// [first, last] get zeros (deterministic state).
inline void clear_kept_outside(double* row, int64_t m, int64_t first, int64_t last) {
  constexpr int64_t L = VA::size();
  std::fill(row, row + (first - 1) * L, 0.0);
  std::fill(row + last * L, row + m * L, 0.0);
}

// The steps j of a block of kSkewRows skewed rows (row i + s at column j - s, its range
// [first[s], last[s]]) at which every row has a cell: [full_first, full_last].
inline void full_steps_of(const int64_t* first, const int64_t* last, int64_t last_step,
                          int64_t& full_first, int64_t& full_last) {
  full_first = first[0];
  full_last = last_step;
  for (int64_t s = 0; s < kSkewRows; ++s) {
    full_first = std::max(full_first, first[s] + s);
    full_last = std::min(full_last, last[s] + s);
  }
}

// ------------------------------------------------------------ rows across threads
// A lane group's sweeps run its rows in steps of a few rows (a block of kSkewRows rows in
// the forward, a pass of one or two rows in the backward), each step after the one before
// it only through one boundary row, which the next step reads column by column as it
// sweeps. So W workers can run W consecutive steps at once, each a few columns behind the
// one before (a wavefront of blocks across threads): a group's rows are shared by the
// threads when the groups are fewer than the threads (8 pairs on 2 cores used one core,
// 64 pairs on 16 cores used 8). The boundary rows live in a ring of W + 2 shared slots:
// step q reads slot q mod S (written by step q - 1; slot 0 holds the sweep's start row,
// written before the workers start, "step -1") and writes its own boundary row to slot
// (q + 1) mod S, publishing how many of its columns are final (`ready`). A slot is written
// again only after its last writer and its reader both released it (`released`).
// Workers claim steps in increasing order, and a step waits only on lower steps, all of
// them claimed by running workers: no deadlock, whatever number of threads really runs
// (one thread runs every step in order). One worker is the sequential sweep.
//
// Contention: the workers run in lock step, so a worker that loses its core to another
// process (a data loader's worker, another job) stalls the others for the scheduler's time
// slice (milliseconds), again and again: with one busy process beside it, 1 pair of 2048^2
// on 2 threads took 150 ms where one thread took 54. So a second wait longer than
// contended_wait() (~1 ms, where a batch takes microseconds; one such wait in several calls
// comes with no other process running, two in one call hardly ever) marks the ring
// `contended`: from then on a step is claimed only once every step before it is finished
// (the steps run one at a time, on whichever worker is running), and later sweeps with
// this ring run on one thread (its caller's check: contended()). Every cell is computed
// the same way on any schedule, so the results do not change.
struct RowRing {
  struct alignas(64) Counter {  // one cache line each: no false sharing between slots
    std::atomic<int64_t> value{0};
  };
  int64_t slots = 0, width = 0, columns = 0;
  std::vector<VA> data;                       // slots x width vectors
  std::vector<int64_t> held_first, held_last;  // forward: the columns a slot holds X != 0 in
  std::unique_ptr<Counter[]> ready, released;
  Counter next, finished;
  // Waits longer than contended_after, kept across reset() (see above). Mutable: the const
  // waits count them.
  mutable std::atomic<int> long_waits{0};
  std::chrono::nanoseconds contended_after = contended_wait();
  std::chrono::microseconds publish_delay = publish_delay_for_tests();

  // `workers` threads, slots of `slot_width` vectors, rows of `row_columns` + 1 columns
  // (0 .. row_columns); every slot reads `fill` (its cleared state).
  void reset(int64_t workers, int64_t slot_width, int64_t row_columns) {
    const int64_t wanted = workers + 2;
    if (wanted != slots) {
      slots = wanted;
      ready.reset(new Counter[slots]);
      released.reset(new Counter[slots]);
    }
    width = slot_width;
    columns = row_columns;
    data.resize(slots * width);
    held_first.assign(slots, 1);
    held_last.assign(slots, 0);
    for (int64_t s = 0; s < slots; ++s) {
      ready[s].value.store(0, std::memory_order_relaxed);
      released[s].value.store(0, std::memory_order_relaxed);
    }
    // Slot 0 holds the start row (step -1): written, its writer's release given.
    ready[0].value.store(columns + 1, std::memory_order_relaxed);
    released[0].value.store(1, std::memory_order_relaxed);
    next.value.store(0, std::memory_order_relaxed);
    finished.value.store(0, std::memory_order_relaxed);
  }
  VA* slot(int64_t s) { return data.data() + s * width; }
  bool contended() const { return long_waits.load(std::memory_order_relaxed) >= 2; }
  // The next step to run, -1 when all `steps` are claimed; once contended, only when every
  // step claimed before it is finished.
  int64_t claim(int64_t steps) {
    if (!contended()) {
      const int64_t q = next.value.fetch_add(1, std::memory_order_acq_rel);
      return q < steps ? q : -1;
    }
    for (int spins = 0;; ++spins) {
      int64_t q = next.value.load(std::memory_order_acquire);
      if (q >= steps) return -1;
      if (finished.value.load(std::memory_order_acquire) == q &&
          next.value.compare_exchange_weak(q, q + 1, std::memory_order_acq_rel)) {
        return q;
      }
      pause_or_yield(spins);
    }
  }
  // The step just run is done (called after its releases).
  void finish() { finished.value.fetch_add(1, std::memory_order_acq_rel); }
  // Step q's input row (step q - 1's boundary row) and output row.
  int64_t input_slot(int64_t q) const { return q % slots; }
  int64_t output_slot(int64_t q) const { return (q + 1) % slots; }
  // Ready counts are tagged by the writing step, (q + 1) (columns + 1) + count, so that a
  // slot's count from an earlier use never passes for the current one.
  int64_t tag(int64_t q) const { return (q + 1) * (columns + 1); }
  // Blocks until step q - 1 has published `count` final columns of q's input row.
  void wait_input(int64_t q, int64_t count) const {
    spin_until(ready[input_slot(q)].value, tag(q - 1) + count);
  }
  // Blocks until step q's output slot is free: its u earlier uses released twice each.
  void wait_output(int64_t q) const {
    const int64_t uses = (q + 1) / slots;
    spin_until(released[output_slot(q)].value, 2 * uses);
  }
  void publish(int64_t q, int64_t count) {
    ready[output_slot(q)].value.store(tag(q) + count, std::memory_order_release);
    if (publish_delay.count() > 0) std::this_thread::sleep_for(publish_delay);
  }
  void release_input(int64_t q) {
    released[input_slot(q)].value.fetch_add(1, std::memory_order_acq_rel);
  }
  void release_output(int64_t q) {
    released[output_slot(q)].value.fetch_add(1, std::memory_order_acq_rel);
  }

  // A worker ahead of its input waits a few hundred cycles at most; one whose input's writer
  // lost its core (more workers than free cores) yields it.
  static void pause_or_yield(int spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
  // A wait this long counts as a long wait (the second marks the ring contended): 1 ms, or
  // ETHER_KERNELS_DTW_CONTENDED_WAIT_US microseconds (0: every wait counts, as in a test).
  static std::chrono::nanoseconds contended_wait() {
    const char* value = std::getenv("ETHER_KERNELS_DTW_CONTENDED_WAIT_US");
    const long long us = value != nullptr ? std::atoll(value) : 1000;
    return std::chrono::microseconds(std::max(0LL, us));
  }
  // For tests: ETHER_KERNELS_DTW_PUBLISH_DELAY_US stalls a writer that long after each
  // publish, before it writes the next columns, so a reader that read past what was
  // published (a wait one column short) would find the slot's stale contents there, not
  // columns written a moment before: the tests comparing with one thread bit for bit then
  // fail. Unset (0) in use.
  static std::chrono::microseconds publish_delay_for_tests() {
    const char* value = std::getenv("ETHER_KERNELS_DTW_PUBLISH_DELAY_US");
    return std::chrono::microseconds(value != nullptr ? std::max(0LL, std::atoll(value)) : 0);
  }
  void spin_until(const std::atomic<int64_t>& counter, int64_t target) const {
    if (counter.load(std::memory_order_acquire) >= target) return;
    const auto start = std::chrono::steady_clock::now();
    bool counted = false;
    for (int spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
      if ((spins & 255) == 0 && !counted &&
          std::chrono::steady_clock::now() - start >= contended_after) {
        long_waits.fetch_add(1, std::memory_order_relaxed);
        counted = true;
      }
      pause_or_yield(spins);
    }
  }
};

// Columns per published batch: small enough that W workers, each a batch or two behind
// the one before, all fit in the row's m columns; large enough that the batch's cells (4 x
// 16 .. 4 x 64) hide the atomic that hands the cache line over.
inline int64_t ring_batch(int64_t workers, int64_t m) {
  return std::clamp<int64_t>(m / (4 * workers), 16, 64);
}

// Runs body(w) for the workers w = 0 .. workers - 1 on up to `workers` threads of the
// pool (any that at::parallel_for gives; the ring needs no more than one).
template <typename Body>
void run_ring_workers(int64_t workers, const Body& body) {
  if (workers <= 1) {
    body(0);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormalsScope flush_subnormals;  // see the class comment
    for (int64_t w = begin; w < end; ++w) body(w);
  });
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// ------------------------------------------------------------ fp32 lanes: X = 2^(-R')
// The fp32-input lanes of the AVX512 and AVX2 builds sweep X = 2^(-R') with R' = R / (gamma
// ln 2) instead of R, held as a mantissa and an exponent: X = mant 2^expo, mant in [1, 2)
// and expo an integer in a double, so that R' = -(expo + log2 mant) keeps any range (a
// double alone would underflow past R' = 1074). The soft-min becomes a sum,
//   X(i, j) = 2^(-cost'(i, j)) (X(i-1, j-1) + X(i-1, j) + X(i, j-1)),  cost' = cost / (gamma ln 2),
// the three terms brought to the largest exponent by a power of 2 (exact: scale_by_pow2),
// the cost's factor split as 2^-k 2^f with k = round(cost') and |f| <= 1/2, the product
// renormalised (split_pow2): one exp2 polynomial per cell, no logarithm (the R sweep takes
// two exponentials and a logarithm). The soft-argmin weights are the terms over their sum.
// Precision: the terms are exact, the sum rounds twice, and 2^f's polynomial (1.9e-9
// relative) is the one approximation; no R' difference is formed, so no cancellation at
// large R' or small gamma. An unreachable cell (X = 0) is mant 0 (or 1) with expo -inf; a
// +inf cost gives X = 0; a NaN cost gives mant NaN, which every later cell's sum carries.
// Row slot r of `rows` holds m + 1 mantissas at rows + 2 r (m + 1), then m + 1 exponents.
// Values, checkpoint rows and start rows are in R' (converted once per row).

// m 2^d for d <= 0 an integer or -inf (the exponent differences; a NaN d only beside a NaN
// m). AVX2 has no scalef: 2^d is built in the exponent field, d floored at -1022 (so an
// m = 0 gives 0, and a term more than 2^1022 below the largest counts 2^-1022 of it).
inline VA scale_by_pow2(const VA& m, const VA& d) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_pd(m, d);
#else
  const __m256d floored = _mm256_max_pd(d, _mm256_set1_pd(-1022.0));
  // 2^52 + 1023 + d holds 1023 + d in its low mantissa bits: shifted into the exponent field.
  const __m256d biased = _mm256_add_pd(floored, _mm256_set1_pd(4503599627371519.0));
  const __m256i pow2 = _mm256_slli_epi64(_mm256_castpd_si256(biased), 52);
  return _mm256_mul_pd(m, _mm256_castsi256_pd(pow2));
#endif
}

inline VA round_to_integer(const VA& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  return _mm256_round_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
}

// X = sum 2^top 2^-cost' as mant, expo: sum >= 0 (or NaN), cost' >= 0 (+inf: X = 0; NaN).
inline void split_pow2(const VA& sum, const VA& top, const VA& cost, VA& mant, VA& expo) {
  const VA k = round_to_integer(cost);
  const VA x = sum * exp2_reduced_fast(k - cost);  // a +inf cost: k = +inf, x NaN
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask8 finite = _mm512_cmp_pd_mask(
      cost, _mm512_set1_pd(std::numeric_limits<double>::infinity()), _CMP_NEQ_UQ);  // NaN: kept
  mant = _mm512_maskz_getmant_pd(finite, x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  expo = (top - k) + VA(_mm512_maskz_getexp_pd(finite, x));  // x = 0: getexp -inf
#else
  // x = (x 2^(1023 - E)) 2^(E - 1023), E the exponent field (x >= 0: no sign bit).
  const __m256i field = _mm256_srli_epi64(_mm256_castpd_si256(x), 52);
  const __m256i two52 = _mm256_castpd_si256(_mm256_set1_pd(4503599627370496.0));
  const VA e = VA(_mm256_castsi256_pd(_mm256_or_si256(field, two52))) -
               VA(4503599627371519.0);  // E - 1023 as a double
  const __m256i down = _mm256_slli_epi64(_mm256_sub_epi64(_mm256_set1_epi64x(2046), field), 52);
  const VA m = x * VA(_mm256_castsi256_pd(down));  // [1, 2); NaN (E = 2047): NaN
  const VA zero = (x == VA(0.0)) | (cost == VA(std::numeric_limits<double>::infinity()));
  mant = VA::blendv(m, VA(0.0), zero);
  expo = VA::blendv((top - k) + e, VA(-std::numeric_limits<double>::infinity()), zero);
#endif
}

// kN cells at once, stage by stage across the cells as in softmin3_cells. ma, ea: the
// diagonal predecessors (i - 1, j - 1), mb, eb: the upper ones, mc, ec: the left ones;
// cost: the cells' cost'. With wa / wb non-null, the weights of the diagonal and upper
// predecessors (an unreachable cell gets (0, 0): its E is 0).
template <int kN>
inline void scaled_cells(const VA* ma, const VA* ea, const VA* mb, const VA* eb, const VA* mc,
                         const VA* ec, const VA* cost, VA* m_out, VA* e_out, VA* wa, VA* wb) {
  // -DBL_MAX floors the largest exponent: with all three -inf, -inf - -inf would be NaN.
  const VA lowest(-std::numeric_limits<double>::max()), one(1.0);
  VA top[kN], ta[kN], tb[kN], sum[kN];
  for (int u = 0; u < kN; ++u) {
    top[u] = max_instruction(lowest, max_instruction(ea[u], max_instruction(eb[u], ec[u])));
  }
  for (int u = 0; u < kN; ++u) {
    ta[u] = scale_by_pow2(ma[u], ea[u] - top[u]);
    tb[u] = scale_by_pow2(mb[u], eb[u] - top[u]);
    sum[u] = (ta[u] + tb[u]) + scale_by_pow2(mc[u], ec[u] - top[u]);
  }
  for (int u = 0; u < kN; ++u) split_pow2(sum[u], top[u], cost[u], m_out[u], e_out[u]);
  if (wa == nullptr) return;
  for (int u = 0; u < kN; ++u) {
    // sum >= 1 where reachable (its largest term is a mantissa), 0 elsewhere.
    const VA inv = reciprocal_fast(max_instruction(one, sum[u]));
    wa[u] = ta[u] * inv;
    wb[u] = tb[u] * inv;
  }
}

// R' = -(expo + log2 mant) of every lane (+inf where X = 0), precise.
inline VA scaled_to_r(const VA& mant, const VA& expo) {
  return VA(0.0) - (expo + mant.log2());
}

// The inverse: mant, expo from R' (+inf: X = 0).
inline void r_to_scaled(const VA& r, VA& mant, VA& expo) {
  const VA inf(std::numeric_limits<double>::infinity());
  const VA neg = VA(0.0) - r, k = neg.floor();
  const VA zero_x = r == inf;
  mant = VA::blendv((neg - k).exp2(), VA(0.0), zero_x);
  expo = VA::blendv(k, VA(0.0) - inf, zero_x);
}

// xy_soft_forward_lanes for fp32 inputs (kept weights), sweeping X: the same arguments and
// results, the same skewed rows (in the AVX2 build too: here the cells' chains are short
// enough to overlap), run as chunks of `chunk_blocks` blocks of kSkewRows rows claimed
// from `ring` (rows across threads: RowRing; each worker calls this with its own `rows`,
// chunk_blocks kSkewRows - 1 rows of 2 (m + 1) vectors, and gets the values of the lanes
// whose last row it swept, 0 for the others). Slot 0 of the ring holds the start row
// (start_scaled_ring); a chunk's last row goes to the ring, its other rows to `rows`.
// A chunk's blocks sweep the columns together, `batch` steps at a time, block b kSkewRows
// b steps behind block 0 (its first row reads block b - 1's last row, final up to
// kSkewRows - 1 columns behind block b - 1's step): a chunk of several blocks hands one
// boundary row to the next worker per several blocks.
// On the EPYC (2 threads, 8 pairs, fp32 forward): 256 x 256 0.61 -> 0.52 ms, 2048 x 256
// 4.9 -> 3.8 ms, 1024 x 1024 (D = 1) 7.3 -> 5.8 ms from 1 to 4 blocks a chunk; but 256 x
// 2048 3.7 -> 4.0 ms, whose 15 own rows (3.9 MB) stream through more than the caches
// hold: chunk_blocks_for keeps a chunk's rows within ~2 MB.
constexpr int64_t kMaxChunkBlocks = 4;

inline int64_t chunk_blocks_for(int64_t m) {
  const int64_t block_bytes = kSkewRows * 2 * (m + 1) * static_cast<int64_t>(sizeof(VA));
  return std::clamp<int64_t>((int64_t(2) << 20) / block_bytes, 1, kMaxChunkBlocks);
}

template <int kMetric, int kDim = 0>
VA xy_soft_forward_scaled(const double* xt, const double* yt, int64_t D_runtime,
                          const LaneShape<VA>& shape, double gamma, VA* rows, double* kept,
                          const SweepRows& sweep, RowRing& ring, int64_t chunk_blocks,
                          int64_t batch) {
  const int64_t D = kDim > 0 ? kDim : D_runtime;
  constexpr int64_t L = VA::size();
  const PairBand& pb = shape.pb;
  alignas(64) double values[L] = {};  // lane k's R'[n_k][m_k], taken when row n_k is done
  const VA zero(0.0), minus_inf(-std::numeric_limits<double>::infinity());
  const double unit = gamma * 0.6931471805599453;  // gamma ln 2
  const VA per_unit(1.0 / unit);
  const int64_t m = pb.m, ld = m + 1;
  const int64_t i0 = sweep.i0, n = sweep.i_end < 0 ? pb.n : sweep.i_end;
  const int64_t chunk_rows = chunk_blocks * kSkewRows;
  const int64_t chunks = (n - i0 + chunk_rows - 1) / chunk_rows;
  const int64_t own_rows = chunk_rows - 1;
  auto own = [&](int64_t r) { return rows + 2 * r * ld; };
  // A row's m + 1 mantissas, then its m + 1 exponents; X = 0 is (0, -inf).
  auto set_zero = [&](VA* row, int64_t j) {
    row[j] = zero;
    row[ld + j] = minus_inf;
  };
  // The column range each own row holds nonzero values in (to reset before reuse).
  int64_t own_first[kMaxChunkBlocks * kSkewRows], own_last[kMaxChunkBlocks * kSkewRows];
  for (int64_t r = 0; r < own_rows; ++r) {
    for (int64_t j = 0; j <= m; ++j) set_zero(own(r), j);
    own_first[r] = 1;
    own_last[r] = 0;
  }
  // Row `row` cleared to X = 0 over the range it held, then set to hold [first, last].
  auto take = [&](VA* row, int64_t& held_first, int64_t& held_last, int64_t first,
                  int64_t last) {
    for (int64_t j = held_first; j <= held_last; ++j) set_zero(row, j);
    held_first = first;
    held_last = last;
    return row;
  };
  // Block b of the chunk: its first row i[b] and its rows i[b] + s: their column ranges,
  // buffers, the buffers above them, their left values (carried from batch to batch), the
  // steps where all of them have a cell [full_first, full_last] (none in a short block).
  int64_t i[kMaxChunkBlocks], rows_now[kMaxChunkBlocks], last_step[kMaxChunkBlocks];
  int64_t full_first[kMaxChunkBlocks], full_last[kMaxChunkBlocks];
  int64_t first[kMaxChunkBlocks][kSkewRows], last[kMaxChunkBlocks][kSkewRows];
  VA* cur[kMaxChunkBlocks][kSkewRows];
  const VA* above[kMaxChunkBlocks][kSkewRows];
  VA left_m[kMaxChunkBlocks][kSkewRows], left_e[kMaxChunkBlocks][kSkewRows];
  // Block b's steps ja .. jb (step j: cell (i + s, j - s) of each row s).
  auto run_steps = [&](int64_t b, int64_t ja, int64_t jb) {
    const int64_t ib = i[b], rows_b = rows_now[b];
    const int64_t* fb = first[b];
    const int64_t* lb = last[b];
    const VA* ab[kSkewRows];
    VA* cb[kSkewRows];
    VA lm[kSkewRows], le[kSkewRows];
    for (int64_t s = 0; s < kSkewRows; ++s) {
      ab[s] = above[b][s];
      cb[s] = cur[b][s];
      lm[s] = left_m[b][s];
      le[s] = left_e[b][s];
    }
    // Step j: cells (ib + s, j - s) of the kN rows s0 .. s0 + kN - 1 (see
    // xy_soft_forward_lanes for the order), their weights kept when kKeep.
    auto cells = [&](auto n_c, auto keep_c, int64_t s0, int64_t j) {
      constexpr int kN = decltype(n_c)::value;
      constexpr bool kKeep = decltype(keep_c)::value;
      VA ma[kN], ea[kN], mb[kN], eb[kN], cost[kN], mo[kN], eo[kN], wa[kN], wb[kN];
      for (int u = 0; u < kN; ++u) {
        const int64_t s = s0 + u, col = j - s;
        ma[u] = ab[s][col - 1];
        ea[u] = ab[s][ld + col - 1];
        mb[u] = ab[s][col];
        eb[u] = ab[s][ld + col];
        cost[u] = local_cost_lanes<kMetric, kDim>(xt + (ib + s - 1) * D * L,
                                                  yt + (col - 1) * D * L, D) * per_unit;
      }
      scaled_cells<kN>(ma, ea, mb, eb, lm + s0, le + s0, cost, mo, eo, kKeep ? wa : nullptr,
                       kKeep ? wb : nullptr);
      for (int u = 0; u < kN; ++u) {
        const int64_t s = s0 + u, col = j - s;
        if (shape.masked) {  // lanes outside their own band: X = 0
          const VA outside = shape.outside(ib + s, col);
          mo[u] = VA::blendv(mo[u], zero, outside);
          eo[u] = VA::blendv(eo[u], minus_inf, outside);
        }
        lm[s] = mo[u];
        le[s] = eo[u];
        cb[s][col] = mo[u];
        cb[s][ld + col] = eo[u];
        if constexpr (kKeep) {
          store_weights(reinterpret_cast<float*>(kept + ((ib + s - i0 - 1) * m + (col - 1)) * L),
                        wa[u], wb[u]);
        }
      }
    };
    using One = std::integral_constant<int, 1>;
    using All = std::integral_constant<int, kSkewRows>;
    auto step_by_cell = [&](int64_t j) {
      for (int64_t s = 0; s < rows_b; ++s) {
        const int64_t col = j - s;
        if (col < fb[s] || col > lb[s]) continue;
        if (kept != nullptr) cells(One{}, std::true_type{}, s, j);
        else cells(One{}, std::false_type{}, s, j);
      }
    };
    int64_t j = ja;
    for (; j <= jb && j < full_first[b]; ++j) step_by_cell(j);  // the ramp
    const int64_t full_end = std::min(jb, full_last[b]);
    // Compiled twice (keeping weights or not): a run-time test in the loop would keep both
    // variants' registers live.
    if (kept != nullptr) {
      for (; j <= full_end; ++j) cells(All{}, std::true_type{}, 0, j);
    } else {
      for (; j <= full_end; ++j) cells(All{}, std::false_type{}, 0, j);
    }
    for (; j <= jb; ++j) step_by_cell(j);
    for (int64_t s = 0; s < kSkewRows; ++s) {
      left_m[b][s] = lm[s];
      left_e[b][s] = le[s];
    }
  };
  for (int64_t q; (q = ring.claim(chunks)) >= 0;) {
    const int64_t i_chunk = i0 + 1 + q * chunk_rows;
    const int64_t blocks_now =
        std::min(chunk_blocks, (n - i_chunk + kSkewRows) / kSkewRows);
    // The chunk's last row goes to the ring's output slot, once that slot's earlier reader
    // and writer are done; its first row reads the input slot (chunk q - 1's last row).
    ring.wait_output(q);
    const int64_t out = ring.output_slot(q);
    int64_t steps_end = 0;  // in block 0's steps: the chunk's last step
    for (int64_t b = 0; b < blocks_now; ++b) {
      i[b] = i_chunk + b * kSkewRows;
      rows_now[b] = std::min(kSkewRows, n - i[b] + 1);
      last_step[b] = 0;
      for (int64_t s = 0; s < rows_now[b]; ++s) {
        const int64_t r = b * kSkewRows + s;  // the row's index in the chunk
        first[b][s] = pb.first(i[b] + s);
        last[b][s] = pb.last(i[b] + s);
        above[b][s] = s > 0 ? cur[b][s - 1]
                      : b > 0 ? cur[b - 1][kSkewRows - 1]
                              : ring.slot(ring.input_slot(q));
        cur[b][s] = b == blocks_now - 1 && s == rows_now[b] - 1
                        ? take(ring.slot(out), ring.held_first[out], ring.held_last[out],
                               first[b][s], last[b][s])
                        : take(own(r), own_first[r], own_last[r], first[b][s], last[b][s]);
        left_m[b][s] = zero;
        left_e[b][s] = minus_inf;
        last_step[b] = std::max(last_step[b], last[b][s] + s);
        if (kept != nullptr) {
          clear_kept_outside(kept + (i[b] + s - i0 - 1) * m * L, m, first[b][s], last[b][s]);
        }
      }
      full_first[b] = last_step[b] + 1;
      full_last[b] = last_step[b];
      if (rows_now[b] == kSkewRows) {
        full_steps_of(first[b], last[b], last_step[b], full_first[b], full_last[b]);
      }
      steps_end = std::max(steps_end, last_step[b] + b * kSkewRows);
    }
    const int64_t lb = blocks_now - 1;  // the block that writes the ring
    for (int64_t ja = first[0][0]; ja <= steps_end; ja += batch) {
      const int64_t jb = ja + batch - 1;
      // Block 0's first row reads columns j - 1 and j of the row above at step j.
      ring.wait_input(q, std::min(jb, m) + 1);
      for (int64_t b = 0; b < blocks_now; ++b) {
        const int64_t lag = b * kSkewRows;
        const int64_t from = std::max(ja - lag, first[b][0]);
        const int64_t to = std::min(jb - lag, last_step[b]);
        if (from <= to) run_steps(b, from, to);
      }
      // After step jb - lag, the last row's columns up to that step - (rows - 1) are final.
      ring.publish(q, std::clamp<int64_t>(jb - lb * kSkewRows - rows_now[lb] + 2, 0, ld));
    }
    ring.publish(q, ld);
    ring.release_input(q);
    for (int64_t b = 0; b < blocks_now; ++b) {
      for (int64_t s = 0; s < rows_now[b]; ++s) {
        for (int64_t k = 0; k < L; ++k) {
          if (shape.n[k] == i[b] + s) {
            alignas(64) double lane_m[L], lane_e[L];
            cur[b][s][shape.m[k]].store(lane_m);
            cur[b][s][ld + shape.m[k]].store(lane_e);
            values[k] = -(lane_e[k] + std::log2(lane_m[k]));
            if (kept != nullptr && values[k] == std::numeric_limits<double>::infinity()) {
              mark_unreachable_end(kept + ((i[b] + s - i0 - 1) * m + shape.m[k] - 1) * L, k);
            }
          }
        }
      }
      const int64_t block_end = i[b] + rows_now[b] - 1;
      if (sweep.checkpoints != nullptr && block_end % sweep.every == 0 && block_end < n) {
        VA* dst = sweep.checkpoints + (block_end / sweep.every) * ld;
        const VA* src = cur[b][rows_now[b] - 1];
        for (int64_t c = 0; c <= m; ++c) dst[c] = scaled_to_r(src[c], src[ld + c]);
      }
    }
    ring.release_output(q);
    ring.finish();
  }
  return VA::loadu(values) * VA(unit);
}

// Sets `ring` up for a sweep of xy_soft_forward_scaled on `workers` threads: every slot
// X = 0, slot 0 the start row (row i0's R, or row 0: X[0][0] = 1).
inline void start_scaled_ring(RowRing& ring, int64_t workers, int64_t m, const VA* start) {
  const int64_t ld = m + 1;
  ring.reset(workers, 2 * ld, m);
  const VA zero(0.0), minus_inf(-std::numeric_limits<double>::infinity());
  for (int64_t s = 0; s < ring.slots; ++s) {
    VA* row = ring.slot(s);
    std::fill(row, row + ld, zero);
    std::fill(row + ld, row + 2 * ld, minus_inf);
  }
  VA* row0 = ring.slot(0);
  if (start != nullptr) {
    for (int64_t j = 0; j <= m; ++j) r_to_scaled(start[j], row0[j], row0[ld + j]);
    ring.held_first[0] = 0;
    ring.held_last[0] = m;
  } else {
    row0[0] = VA(1.0);
    row0[ld] = zero;
    ring.held_first[0] = ring.held_last[0] = 0;
  }
}
#endif

template <int kMetric, bool kWeights, int kDim = 0>
VA xy_soft_forward_lanes(const double* xt, const double* yt, int64_t D_runtime,
                         const LaneShape<VA>& shape, double gamma, VA* rows, double* kept,
                         const SweepRows& sweep = SweepRows{}) {
  const int64_t D = kDim > 0 ? kDim : D_runtime;  // kDim > 0: see contract_column
  constexpr int64_t L = VA::size();
  const PairBand& pb = shape.pb;
  alignas(64) double values[L] = {};  // lane k's R[n_k][m_k], taken when row n_k is done
  const VA inf(std::numeric_limits<double>::infinity());
  const VA g(gamma), ig(1.0 / gamma);
  const int64_t m = pb.m, ld = m + 1;
  const int64_t i0 = sweep.i0, n = sweep.i_end < 0 ? pb.n : sweep.i_end;
  for (int64_t e = 0; e < kRollingRows * ld; ++e) rows[e] = inf;
  // The column range each buffer holds finite values in (to reset before reuse).
  int64_t held_first[kRollingRows], held_last[kRollingRows];
  for (int64_t k = 0; k < kRollingRows; ++k) held_first[k] = 1, held_last[k] = 0;
  if (sweep.start != nullptr) {  // buffer 0 holds row i0
    std::memcpy(rows, sweep.start, ld * sizeof(VA));
    held_first[0] = 0;
    held_last[0] = m;
  } else {
    rows[0] = VA(0.0);  // buffer 0 holds row 0: R[0][0] = 0
    held_first[0] = held_last[0] = 0;
  }
  auto take = [&](int64_t slot, int64_t first, int64_t last) {
    VA* row = rows + slot * ld;
    for (int64_t j = held_first[slot]; j <= held_last[slot]; ++j) row[j] = inf;
    held_first[slot] = first;
    held_last[slot] = last;
    return row;
  };
  // Cell (i, j) from the row above and its left neighbour; in weights mode its weights go
  // to the kept slot.
  auto cell = [&](const VA* above, VA left, const double* xi, int64_t i, int64_t j) {
    VA w[2];
    VA v = local_cost_lanes<kMetric, kDim>(xi, yt + (j - 1) * D * L, D) +
           softmin3_lanes(above[j - 1], above[j], left, g, ig,
                          kWeights && kept != nullptr ? w : nullptr);
    if (shape.masked) v = VA::blendv(v, inf, shape.outside(i, j));
    if constexpr (kWeights) {
      if (kept != nullptr) {
        store_weights(reinterpret_cast<float*>(kept + ((i - i0 - 1) * m + (j - 1)) * L), w[0],
                      w[1]);
      }
    }
    return v;
  };
  int64_t prev_slot = 0;
  for (int64_t i = i0 + 1; i <= n; i += kSkewRows) {
    const int64_t rows_now = std::min(kSkewRows, n - i + 1);
    // Row i + s: its column range, its buffer, the buffer above it and its x row.
    int64_t first[kSkewRows], last[kSkewRows];
    VA* cur[kSkewRows];
    const VA* above[kSkewRows];
    VA left[kSkewRows];
    int64_t last_step = 0;
    for (int64_t s = 0; s < rows_now; ++s) {
      first[s] = pb.first(i + s);
      last[s] = pb.last(i + s);
      const int64_t slot = (prev_slot + 1 + s) % kRollingRows;
      above[s] = s == 0 ? rows + prev_slot * ld : cur[s - 1];
      cur[s] = take(slot, first[s], last[s]);
      left[s] = inf;
      last_step = std::max(last_step, last[s] + s);
      if (kWeights && kept != nullptr) {
        clear_kept_outside(kept + (i + s - i0 - 1) * m * L, m, first[s], last[s]);
      }
    }
    // Step j: cell (i + s, j - s) of every row whose range holds j - s. A row starts and
    // ends no earlier than the row above (the band only moves right), so every value of
    // the row above it reads was computed one step earlier (or is +inf outside its range).
    auto step_by_cell = [&](int64_t j) {
      for (int64_t s = 0; s < rows_now; ++s) {
        const int64_t col = j - s;
        if (col >= first[s] && col <= last[s]) {
          left[s] = cell(above[s], left[s], xt + (i + s - 1) * D * L, i + s, col);
          cur[s][col] = left[s];
        }
      }
    };
    int64_t j = first[0];
#if defined(CPU_CAPABILITY_AVX512)
    // The steps where all kSkewRows rows have a cell: the cells' soft-mins side by side
    // (softmin3_cells, values only: this build sweeps kept weights in
    // xy_soft_forward_scaled). The first and last steps of the sweep take the loop below.
    if (!kWeights && rows_now == kSkewRows) {
      int64_t full_first, full_last;
      full_steps_of(first, last, last_step, full_first, full_last);
      for (; j < full_first; ++j) step_by_cell(j);  // the ramp
      for (; j <= full_last; ++j) {
        __m512d a[kSkewRows], b[kSkewRows], c[kSkewRows], r[kSkewRows];
        for (int64_t s = 0; s < kSkewRows; ++s) {
          const int64_t col = j - s;
          a[s] = above[s][col - 1];
          b[s] = above[s][col];
          c[s] = left[s];
        }
        softmin3_cells<kSkewRows>(a, b, c, g, ig, r);
        for (int64_t s = 0; s < kSkewRows; ++s) {
          const int64_t col = j - s;
          left[s] = local_cost_lanes<kMetric, kDim>(xt + (i + s - 1) * D * L,
                                                    yt + (col - 1) * D * L, D) + VA(r[s]);
          if (shape.masked) left[s] = VA::blendv(left[s], inf, shape.outside(i + s, col));
          cur[s][col] = left[s];
        }
      }
    }
#endif
    for (; j <= last_step; ++j) step_by_cell(j);
    if (!kWeights && kept != nullptr) {
      for (int64_t s = 0; s < rows_now; ++s) {
        std::memcpy(kept + (i + s - i0 - 1) * m * L, cur[s] + 1, m * sizeof(VA));
      }
    }
    for (int64_t s = 0; s < rows_now; ++s) {
      for (int64_t k = 0; k < L; ++k) {
        if (shape.n[k] == i + s) {
          alignas(64) double row_values[L];
          cur[s][shape.m[k]].store(row_values);
          values[k] = row_values[k];
          if (kWeights && kept != nullptr && values[k] == std::numeric_limits<double>::infinity()) {
            mark_unreachable_end(kept + ((i + s - i0 - 1) * m + shape.m[k] - 1) * L, k);
          }
        }
      }
    }
    const int64_t block_end = i + rows_now - 1;
    if (sweep.checkpoints != nullptr && block_end % sweep.every == 0 && block_end < n) {
      std::memcpy(sweep.checkpoints + (block_end / sweep.every) * ld, cur[rows_now - 1],
                  ld * sizeof(VA));
    }
    prev_slot = (prev_slot + rows_now) % kRollingRows;
  }
  return VA::loadu(values);
}

// The forward sweep of one lane group: xy_soft_forward_lanes, or for fp32 inputs (kWeights)
// in the AVX512 and AVX2 builds xy_soft_forward_scaled (same arguments, same results).
// One lane group's rows and their threads (rows across threads: RowRing).
struct SweepWork {
  RowRing ring;
  std::vector<std::vector<VA>> rows;  // each worker's rows
  std::vector<VA> values;             // each worker's lane values
  int64_t workers = 1;
};

// Whether the lanes of T inputs sweep their rows on several threads (RowRing): the fp32
// lanes of the AVX512 and AVX2 builds (xy_soft_forward_scaled, and the weights backward).
template <typename T>
constexpr bool rows_across_threads() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return std::is_same_v<T, float>;
#else
  return false;
#endif
}

// Threads per lane group: all of them for `tasks` groups of up to (n, m) cells where the
// groups alone would leave a quarter of the threads idle (tasks / (rounds * threads) <
// 3/4; e.g. 1 group on 2 threads, 8 on 16), else one. At most m / 32 threads (each works
// a batch or two behind the one before it: ring_batch), and one for small grids, whose
// parallel region would cost more than the rows it shares.
template <typename T>
int64_t row_workers_for(int64_t tasks, int64_t n, int64_t m) {
  const int64_t threads = at::get_num_threads();
  if (!rows_across_threads<T>() || threads <= 1 || tasks <= 0 || n * m < (1 << 15)) return 1;
  const int64_t rounds = (tasks + threads - 1) / threads;
  if (4 * tasks >= 3 * rounds * threads) return 1;
  return std::max<int64_t>(1, std::min(threads, m / 32));
}

// One lane group's forward: R (fp64, or fp32 lanes outside the AVX512 and AVX2 builds:
// xy_soft_forward_lanes) or X (fp32 lanes: xy_soft_forward_scaled, its rows on
// work.workers threads). Same arguments and results as xy_soft_forward_lanes, the rows in
// `work`.
template <int kMetric, bool kWeights, int kDim = 0>
VA xy_soft_forward_sweep(const double* xt, const double* yt, int64_t D_runtime,
                         const LaneShape<VA>& shape, double gamma, double* kept,
                         SweepWork& work, const SweepRows& sweep = SweepRows{}) {
  const int64_t m = shape.pb.m, ld = m + 1;
  // One thread once a sweep found the threads contended (RowRing): same results.
  const int64_t workers = work.ring.contended() ? 1 : std::max<int64_t>(1, work.workers);
  if (static_cast<int64_t>(work.rows.size()) < workers) work.rows.resize(workers);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kWeights) {
    start_scaled_ring(work.ring, workers, m, sweep.start);
    work.values.assign(workers, VA(0.0));
    // One worker needs no hand-over: its blocks sweep their columns in one batch.
    const int64_t batch = workers > 1 ? ring_batch(workers, m) : m + kSkewRows;
    const int64_t chunk_blocks = workers > 1 ? chunk_blocks_for(m) : 1;
    run_ring_workers(workers, [&](int64_t w) {
      std::vector<VA>& rows = work.rows[w];
      rows.resize(2 * (chunk_blocks * kSkewRows - 1) * ld);
      work.values[w] = xy_soft_forward_scaled<kMetric, kDim>(xt, yt, D_runtime, shape, gamma,
                                                             rows.data(), kept, sweep,
                                                             work.ring, chunk_blocks, batch);
    });
    VA value(0.0);  // each lane's value comes from one worker, 0 from the others
    for (const VA& v : work.values) value = value + v;
    return value;
  } else
#endif
  {
    std::vector<VA>& rows = work.rows[0];
    rows.resize(2 * kRollingRows * ld);
    return xy_soft_forward_lanes<kMetric, kWeights, kDim>(xt, yt, D_runtime, shape, gamma,
                                                          rows.data(), kept, sweep);
  }
}

// Adds e_c * d cost(x_c, y_j) / d x_c to gx_c (D vectors each) for the kCells cells
// (x_c, y_j) of one column j, and minus their sum to gyj (read and written once for all of
// them), with one FMA per term (this runs at every cell of the backward).
// kDim > 0: D known at compile time (the loops unroll and gx_c can live in registers).
template <int kMetric, int kCells, int kDim = 0>
inline void contract_column(const double* const (&x)[kCells], const double* yj,
                            int64_t D_runtime, const VA (&e)[kCells], VA* const (&gx)[kCells],
                            VA* gyj) {
  const int64_t D = kDim > 0 ? kDim : D_runtime;
  constexpr int64_t L = VA::size();
  const VA zero(0.0), one(1.0);
  // d cost / d x_c = scale * gd(t) with t = x_c - y_j: gd = t, scale = e / |t| (euclidean,
  // 0 where t = 0); gd = 2 t (sqeuclidean, as scale = 2 e); gd = sign(t) (L1).
  VA scale[kCells];
  for (int c = 0; c < kCells; ++c) {
    scale[c] = e[c];
    if constexpr (kMetric == kEuclidean) {
      VA s = zero;
      for (int64_t d = 0; d < D; ++d) {
        const VA t = VA::loadu(x[c] + d * L) - VA::loadu(yj + d * L);
        s = at::vec::fmadd(t, t, s);
      }
      scale[c] = VA::blendv(zero, e[c] / s.sqrt(), s > zero);
    } else if constexpr (kMetric == kSqEuclidean) {
      scale[c] = e[c] + e[c];
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    const VA y = VA::loadu(yj + d * L);
    VA gy = gyj[d];
    for (int c = 0; c < kCells; ++c) {
      const VA t = VA::loadu(x[c] + d * L) - y;
      VA gd = t;
      if constexpr (kMetric == kL1) {
        gd = VA::blendv(zero, one, t > zero) - VA::blendv(zero, one, t < zero);
      }
      gx[c][d] = at::vec::fmadd(scale[c], gd, gx[c][d]);
      gy = at::vec::fnmadd(scale[c], gd, gy);
    }
    gyj[d] = gy;
  }
}

// Backward of one lane group, streaming: R is read row by row from `kept` (as written by
// xy_soft_forward_lanes) into two rolling rows with the recurrence's border, E lives in two
// rolling rows, and each cell's final E is contracted with the local cost's gradient as
// soon as it is known (cells are visited in reverse row-major order, so E[p][q] is final
// when (p, q) is visited). work: 4 * (m + 1) vectors. gx (n, D), gy (m, D) vectors get
// sum_j E_ij dcost/dx_i and -sum_i E_ij dcost/dx_i.
// kDim > 0: D == kDim known at compile time (see contract_column).
// A call may also cover only rows p_hi down to p_lo (BackRows: one segment of the
// checkpointed backward, whose kept rows start at row p_lo). It starts from the pushes
// into row p_hi in work[2 (m + 1) ...] and leaves there the pushes into row p_lo - 1;
// gx and gy accumulate (the caller, xy_soft_backward_sweep, zeroes them and the pushes).
constexpr int64_t kPrefetchCells = 32;  // see the weights' prefetch below

struct BackRows {
  int64_t p_lo = 1, p_hi = -1;  // p_hi < 0: the pair's n
  const VA* above = nullptr;    // R mode: row p_lo - 1's m + 1 values (null: row 0)
  bool first = true;            // the task's last row is in this call: zero E and gx / gy
};

template <int kMetric, int kDim = 0>
void xy_soft_backward_lanes(const double* xt, const double* yt, int64_t D,
                            const LaneShape<VA>& shape, double gamma, const VA& g,
                            const double* kept, VA* work, VA* gx, VA* gy,
                            const BackRows& range = BackRows{}) {
  constexpr int64_t L = VA::size();
  const PairBand& pb = shape.pb;
  alignas(64) double seeds[L];  // lane k's dL / dR[n_k][m_k], added to E when row n_k starts
  g.store(seeds);
  const VA inf(std::numeric_limits<double>::infinity());
  const VA zero(0.0), one(1.0), ig(1.0 / gamma);
  const int64_t m = pb.m, ld = m + 1;
  const int64_t n = range.p_hi < 0 ? pb.n : range.p_hi, p_lo = range.p_lo;
  VA* r_cur = work;           // R row p (1-based columns, [0] the border)
  VA* r_up = work + ld;       // R row p - 1
  VA* e_cur = work + 2 * ld;  // E row p: pushes received from row p + 1
  VA* e_up = work + 3 * ld;   // E row p - 1: pushes from row p
  auto load_row = [&](int64_t i, VA* dst) {
    if (i == p_lo - 1 && range.above != nullptr) {  // the segment's row above
      std::memcpy(dst, range.above, ld * sizeof(VA));
      return;
    }
    if (i == 0) {  // R[0][0] = 0, R[0][j] = +inf
      for (int64_t j = 0; j <= m; ++j) dst[j] = inf;
      dst[0] = zero;
      return;
    }
    dst[0] = inf;
    std::memcpy(dst + 1, kept + (i - p_lo) * m * L, m * sizeof(VA));
  };
  // Row p - 1 gets row p's pushes (see xy_soft_backward_weights), the diagonal push and
  // the left one carried from cell to cell in registers (diag, carry).
  auto clear_pushes_outside = [&](int64_t jf, int64_t jl) {
    for (int64_t j = 0; j < jf - 1; ++j) e_up[j] = zero;
    for (int64_t j = jl + 1; j <= m; ++j) e_up[j] = zero;
  };
  load_row(n, r_cur);
  for (int64_t p = n; p >= p_lo;) {
    for (int64_t k = 0; k < L; ++k) {  // lanes whose last row is p: their seed
      if (shape.n[k] == p) {
        alignas(64) double e_end[L];
        e_cur[shape.m[k]].store(e_end);
        e_end[k] += seeds[k];
        e_cur[shape.m[k]] = VA::loadu(e_end);
      }
    }
    load_row(p - 1, r_up);
    const int64_t jf = pb.first(p), jl = pb.last(p);
    const double* xp = xt + (p - 1) * D * L;
    VA* gxp = gx + (p - 1) * D;
    VA carry = zero, diag = zero;  // see above
    clear_pushes_outside(jf, jl);
    for (int64_t q = jl; q >= jf; --q) {
      const VA e = e_cur[q] + carry;  // final: every successor has pushed
      const VA d = r_up[q - 1], u = r_up[q], l = r_cur[q - 1];
      const VA mu = at::vec::minimum(d, at::vec::minimum(u, l));
      const VA valid = mu < inf;  // false for NaN too: push nothing
      const VA d_min = (d == mu);
      const VA u_min = VA::blendv(u == mu, zero, d_min);
      const VA du_min = d_min | u_min;
      const VA x1 = VA::blendv(d, u, d_min);
      const VA x2 = VA::blendv(u, l, du_min);
      // Invalid lanes (mu = +inf gives inf - inf = NaN here) get zero weights.
      const VA e1 = VA::blendv(zero, at::vec::minimum(zero, (mu - x1) * ig).exp(), valid);
      const VA e2 = VA::blendv(zero, at::vec::minimum(zero, (mu - x2) * ig).exp(), valid);
      const VA wd = VA::blendv(e1, one, d_min);
      const VA wu = VA::blendv(VA::blendv(e2, one, u_min), e1, d_min);
      const VA wl = VA::blendv(one, e2, du_min);
      // 1 / sum (the sum is >= 1) does not depend on e; invalid lanes push nothing.
      const VA inv = VA::blendv(zero, one / ((wd + wu) + wl), valid);
      const VA scale = e * inv;
      e_up[q] = at::vec::fmadd(scale, wu, diag);
      diag = scale * wd;
      carry = scale * wl;
      contract_column<kMetric, 1>({xp}, yt + (q - 1) * D * L, D, {e}, {gxp}, gy + (q - 1) * D);
    }
    e_up[jf - 1] = diag;
    std::swap(e_cur, e_up);
    std::swap(r_cur, r_up);
    --p;
  }
  // E's pushes into row p_lo - 1, where the next segment's call starts from them
  if (e_cur != work + 2 * ld) std::memcpy(work + 2 * ld, e_cur, ld * sizeof(VA));
}

// Weights mode (fp32 lanes: the forward's soft-argmin weights, no exponential, no
// division): the same backward, its rows in passes of one or two rows claimed from `ring`
// (rows across threads: RowRing), bottom pass first. Pass t reads the pushes into its first
// row from the ring's input slot (slot 0: the pushes into row p_hi from below, zeros or
// the segment below's) and writes its pushes into the row above it to its output slot,
// right to left, publishing how many columns from the right are final. The gx rows are the
// passes' own; gy (every row adds to every column) is split into `buckets` partial sums,
// pass t adding to gy_buckets[t mod buckets]: as many as workers, so that no two passes
// in flight share one (passes t and t + buckets never run at once: a worker claims t +
// buckets only after some pass in t .. t + buckets - 1 is done, which waited on pass t's
// last column), and the same for any order the workers take the passes in (the caller
// sums the buckets in order: the results do not depend on the schedule).
// `passes`: each pass's first row p and its rows (weights_passes). A pass of two rows p,
// p - 1 goes once over the columns, right to left: at column q, cell (p, q) and then
// (p - 1, q), whose push from (p, q) stays in a register, as do the two cells' gx rows
// and x rows (kDim > 0); both cells share column q's y and gy, read and written once. So
// two rows per pass halve the memory operations on gy and on E's rows, which bound this
// loop more than its arithmetic.
struct WeightsPass {
  int64_t p, rows;
};

// The passes over rows p_hi down to p_lo: two rows, unless the second is outside the call
// or is some lane's last row (its seed must join E before the row is swept).
inline std::vector<WeightsPass> weights_passes(const LaneShape<VA>& shape, int64_t p_lo,
                                               int64_t p_hi) {
  auto ends_at = [&](int64_t p) {
    for (int64_t k = 0; k < VA::size(); ++k) {
      if (shape.n[k] == p) return true;
    }
    return false;
  };
  std::vector<WeightsPass> passes;
  for (int64_t p = p_hi; p >= p_lo;) {
    const int64_t rows = p - 1 >= p_lo && !ends_at(p - 1) ? 2 : 1;
    passes.push_back({p, rows});
    p -= rows;
  }
  return passes;
}

template <int kMetric, int kDim = 0>
void xy_soft_backward_weights(const double* xt, const double* yt, int64_t D,
                              const LaneShape<VA>& shape, const VA& g, const double* kept,
                              VA* gx, VA* const* gy_buckets, int64_t buckets, int64_t p_lo,
                              const std::vector<WeightsPass>& passes, RowRing& ring,
                              int64_t batch) {
  constexpr int64_t L = VA::size();
  const PairBand& pb = shape.pb;
  alignas(64) double seeds[L];  // lane k's dL / dR[n_k][m_k], added to E when row n_k starts
  g.store(seeds);
  const VA zero(0.0), one(1.0);
  const int64_t m = pb.m, ld = m + 1;
  const int64_t count = static_cast<int64_t>(passes.size());
  VA* gy = nullptr;  // the running pass's bucket of gy
  // Rows p, p - 1, .. (row r = p - r) of pass t, given the pushes into row p (e_cur);
  // writes the pushes into row p - kRows (e_up). Row p - 1 gets row p's pushes: (p, q)
  // pushes up to (p - 1, q) and diagonally to (p - 1, q - 1), so e_up[q] = E(p, q)
  // w_up(p, q) + E(p, q + 1) w_diag(p, q + 1) for jf <= q <= jl, and e_up[jf - 1] =
  // E(p, jf) w_diag(p, jf). Each is written once, the diagonal push carried to the next
  // cell in `diag` (a register), not accumulated in memory, and the push of (p, q + 1) to
  // its left neighbour (p, q) likewise in `carry`, so the only dependency from one cell to
  // the next is an add and two multiplies. The rest of row p - 1 gets no push (zero).
  auto weights_rows = [&](int64_t t, int64_t p, auto rows_c, const VA* e_cur, VA* e_up) {
    constexpr int kRows = decltype(rows_c)::value;
    constexpr int64_t kX = kDim > 0 ? kDim : 1;
    int64_t jf[kRows], jl[kRows];
    const float* wrow[kRows];
    const double* xr[kRows];
    VA* gxr[kRows];
    VA carry[kRows], diag[kRows];
    // Row p - r's gx and x in registers (kDim > 0): the stores of gy and E cannot alias
    // locals (through xt they could, and x would be reloaded at every cell).
    VA gx_row[kRows][kX];
    alignas(64) double x_row[kRows][kX * L];
    for (int r = 0; r < kRows; ++r) {
      jf[r] = pb.first(p - r);
      jl[r] = pb.last(p - r);
      wrow[r] = reinterpret_cast<const float*>(kept + (p - r - p_lo) * m * L);
      carry[r] = diag[r] = zero;
      for (VA& v : gx_row[r]) v = zero;
      if constexpr (kDim > 0) {
        std::memcpy(x_row[r], xt + (p - r - 1) * D * L, sizeof(x_row[r]));
        xr[r] = x_row[r];
        gxr[r] = gx_row[r];
      } else {
        xr[r] = xt + (p - r - 1) * D * L;
        gxr[r] = gx + (p - r - 1) * D;
      }
    }
    constexpr int kLast = kRows - 1;  // the row whose pushes go to e_up
    for (int64_t j = 0; j < jf[kLast] - 1; ++j) e_up[j] = zero;
    for (int64_t j = jl[kLast] + 1; j <= m; ++j) e_up[j] = zero;
    // Cell (p - r, q), given the pushes it got from the row below: returns its final E
    // (every successor has pushed), sets `up` to its push into (p - r - 1, q) plus the
    // diagonal one of (p - r, q + 1), and carries its left and diagonal pushes.
    auto cell = [&](int r, int64_t q, const VA& from_below, VA& up) {
      VA e = from_below + carry[r];
      // A lane's masked cell (LaneShape) has E = 0 in exact arithmetic; the fp32 weights'
      // left share 1 - wd - wu (~1e-8 from rounding where it is 0) would give it some.
      if (shape.masked) e = VA::blendv(e, zero, shape.outside(p - r, q));
      VA wd, wu;
      load_weights(wrow[r] + (q - 1) * 2 * L, wd, wu);
      // The kept weights come from memory (L N M doubles per group: past the caches),
      // read backwards; a prefetch kPrefetchCells cells ahead (into the row above at the
      // row's start, the next one read) took ~1/6 off the backward on the EPYC.
      if ((p - r - p_lo) * m + q - 1 >= kPrefetchCells) {
        __builtin_prefetch(wrow[r] + (q - 1 - kPrefetchCells) * 2 * L);
      }
      // An unreachable cell has E = 0, so its weights ((0, 0, 1)) push nothing.
      const VA wl = max_instruction(zero, (one - wd) - wu);
      up = at::vec::fmadd(e, wu, diag[r]);
      diag[r] = e * wd;
      carry[r] = e * wl;
      return e;
    };
    auto contract = [&](int r, int64_t q, const VA& e) {  // one cell of column q
      contract_column<kMetric, 1, kDim>({xr[r]}, yt + (q - 1) * D * L, D, {e}, {gxr[r]},
                                        gy + (q - 1) * D);
    };
    // Columns q_hi down to q_lo.
    auto run_columns = [&](int64_t q_hi, int64_t q_lo) {
      if constexpr (kRows == 1) {
        for (int64_t q = std::min(q_hi, jl[0]); q >= std::max(q_lo, jf[0]); --q) {
          contract(0, q, cell(0, q, e_cur[q], e_up[q]));
        }
      } else {
        // Rows start and end no later than the rows below them: jf[1] <= jf[0], jl[1] <=
        // jl[0]. Columns of row p only: the pushes up leave row p - 1's range, but the
        // diagonal one of (p, jl[1] + 1) stays in diag[0] for (p - 1, jl[1]).
        VA dropped;
        for (int64_t q = std::min(q_hi, jl[0]); q >= std::max(q_lo, std::max(jl[1] + 1, jf[0]));
             --q) {
          contract(0, q, cell(0, q, e_cur[q], dropped));
        }
        for (int64_t q = std::min(q_hi, jl[1]); q >= std::max(q_lo, jf[0]); --q) {  // both rows
          VA up;
          const VA e[2] = {cell(0, q, e_cur[q], up), cell(1, q, up, e_up[q])};
          contract_column<kMetric, 2, kDim>(xr, yt + (q - 1) * D * L, D, e, gxr,
                                            gy + (q - 1) * D);
        }
        // Columns of row p - 1 only: row p's one push there is the diagonal one of (p, jf[0]).
        for (int64_t q = std::min(q_hi, std::min(jf[0] - 1, jl[1])); q >= std::max(q_lo, jf[1]);
             --q) {
          contract(1, q, cell(1, q, q == jf[0] - 1 ? diag[0] : zero, e_up[q]));
        }
      }
    };
    const int64_t q_top = jl[0], q_bottom = jf[kLast];
    for (int64_t q_hi = q_top; q_hi >= q_bottom; q_hi -= batch) {
      const int64_t q_lo = std::max(q_bottom, q_hi - batch + 1);
      ring.wait_input(t, ld - q_lo);  // row p reads e_cur[q] for q >= q_lo
      // The pushes just published come from another core's cache (~100 ns each, the
      // loads would wait one by one): fetched at once (one batch: one thread, its own).
      if (batch <= m) {
        for (int64_t q = q_lo; q <= q_hi; ++q) __builtin_prefetch(e_cur + q);
      }
      run_columns(q_hi, q_lo);
      // e_up is final from column q_lo (from jl + 1 before the last row's first cell).
      ring.publish(t, ld - (q_lo <= jl[kLast] ? std::max(q_lo, jf[kLast]) : jl[kLast] + 1));
    }
    e_up[jf[kLast] - 1] = diag[kLast];
    if constexpr (kDim > 0) {
      for (int r = 0; r < kRows; ++r) {
        VA* gxp = gx + (p - r - 1) * D;  // which may hold an unreachable end's seed
        for (int64_t d = 0; d < kDim; ++d) gxp[d] = gxp[d] + gx_row[r][d];
      }
    }
  };
  for (int64_t t; (t = ring.claim(count)) >= 0;) {
    const int64_t p = passes[t].p;
    gy = gy_buckets[t % buckets];
    ring.wait_output(t);
    VA* e_cur = ring.slot(ring.input_slot(t));
    VA* e_up = ring.slot(ring.output_slot(t));
    bool seeded = false;
    for (int64_t k = 0; k < L; ++k) {  // lanes whose last row is p: their seed
      if (shape.n[k] != p) continue;
      if (!seeded) {  // this pass adds to its input row: the pass below must be done with it
        ring.wait_input(t, ld);
        seeded = true;
      }
      const int64_t q = shape.m[k];
      if (is_unreachable_end(kept + ((p - p_lo) * m + q - 1) * L, k)) {  // see kUnreachableEnd
        alignas(64) double e_lane[L] = {};
        e_lane[k] = seeds[k];
        contract_column<kMetric, 1>({xt + (p - 1) * D * L}, yt + (q - 1) * D * L, D,
                                    {VA::loadu(e_lane)}, {gx + (p - 1) * D}, gy + (q - 1) * D);
        continue;
      }
      alignas(64) double e_end[L];
      e_cur[q].store(e_end);
      e_end[k] += seeds[k];
      e_cur[q] = VA::loadu(e_end);
    }
    if (passes[t].rows == 2) {
      weights_rows(t, p, std::integral_constant<int, 2>{}, e_cur, e_up);
    } else {
      weights_rows(t, p, std::integral_constant<int, 1>{}, e_cur, e_up);
    }
    ring.publish(t, ld);
    ring.release_input(t);
    ring.release_output(t);
    ring.finish();
  }
}

// One lane group's backward over rows range.p_hi down to range.p_lo (the pair's n
// down to 1 by default): weights mode (xy_soft_backward_weights, its rows on work.workers
// threads) or R mode (xy_soft_backward_lanes). work.carry holds the pushes into the row
// above the call when it returns, the pushes from below at the start of a call with
// range.first false; range.first zeroes gx and gy first.
struct BackWork {
  RowRing ring;
  std::vector<std::vector<VA>> gy;  // gy's buckets (two or more workers)
  std::vector<VA> r_mode;           // R mode's 4 (m + 1) vectors
  std::vector<VA> carry;            // m + 1 pushes
  int64_t workers = 1;
};

template <int kMetric, bool kWeights, int kDim = 0>
void xy_soft_backward_sweep(const double* xt, const double* yt, int64_t D,
                            const LaneShape<VA>& shape, double gamma, const VA& g,
                            const double* kept, VA* gx, VA* gy, BackWork& work,
                            const BackRows& range = BackRows{}) {
  const int64_t n = range.p_hi < 0 ? shape.pb.n : range.p_hi, m = shape.pb.m, ld = m + 1;
  const VA zero(0.0);
  if (range.first) {
    std::fill(gx, gx + shape.pb.n * D, zero);
    std::fill(gy, gy + m * D, zero);
    work.carry.assign(ld, zero);
  }
  if constexpr (!kWeights) {
    work.r_mode.resize(4 * ld);
    std::copy(work.carry.begin(), work.carry.end(), work.r_mode.begin() + 2 * ld);
    xy_soft_backward_lanes<kMetric, kDim>(xt, yt, D, shape, gamma, g, kept, work.r_mode.data(),
                                          gx, gy, range);
    std::copy(work.r_mode.begin() + 2 * ld, work.r_mode.begin() + 3 * ld, work.carry.begin());
  } else {
    const int64_t workers = std::max<int64_t>(1, work.workers);
    const std::vector<WeightsPass> passes = weights_passes(shape, range.p_lo, n);
    RowRing& ring = work.ring;
    ring.reset(workers, ld, m);
    std::copy(work.carry.begin(), work.carry.end(), ring.slot(0));
    // gy's buckets: gy itself for one worker, else `workers` partial sums added to gy
    std::vector<VA*> buckets(1, gy);
    if (workers > 1) {
      work.gy.resize(workers);
      buckets.resize(workers);
      for (int64_t w = 0; w < workers; ++w) {
        work.gy[w].assign(m * D, zero);
        buckets[w] = work.gy[w].data();
      }
    }
    // One thread once a sweep found the threads contended (RowRing); gy keeps its
    // `workers` buckets, so that the results do not change.
    const int64_t threads = ring.contended() ? 1 : workers;
    const int64_t batch = threads > 1 ? ring_batch(threads, m) : m + 1;  // see the forward
    run_ring_workers(threads, [&](int64_t) {
      xy_soft_backward_weights<kMetric, kDim>(xt, yt, D, shape, g, kept, gx, buckets.data(),
                                              static_cast<int64_t>(buckets.size()), range.p_lo,
                                              passes, ring, batch);
    });
    if (workers > 1) {
      for (int64_t w = 0; w < workers; ++w) {
        for (int64_t e = 0; e < m * D; ++e) gy[e] = gy[e] + work.gy[w][e];
      }
    }
    const VA* above = ring.slot(ring.output_slot(static_cast<int64_t>(passes.size()) - 1));
    std::copy(above, above + ld, work.carry.begin());
  }
}


// Pair b's gradient in a (B, rows_out, D) output (null: not wanted): scale * g for its
// `rows` rows, zeros for the padding rows after them.
template <typename T, typename A>
void write_pair_gradient(const A* g, A scale, int64_t rows, int64_t rows_out, int64_t D,
                         T* out, int64_t b) {
  if (out == nullptr) return;
  T* o = out + b * rows_out * D;
  for (int64_t e = 0; e < rows * D; ++e) o[e] = static_cast<T>(scale * g[e]);
  std::fill(o + rows * D, o + rows_out * D, T(0));
}

// ------------------------------------------------------------ soft-DTW of a pair in strips
// A few pairs fill few of a lane group's L lanes: a group costs L pairs' work whatever its
// lanes hold (the spare lanes repeat a pair or run empty ones). A pair that runs alone
// is swept instead like forward_hard_strips: L rows at a time, lane k one column behind
// lane k - 1, so one step computes L cells of an anti-diagonal, cell (i0 + k, s - k) in
// lane k at step s, from
//   left (i0 + k, s - k - 1):     lane k of step s - 1,
//   up   (i0 + k - 1, s - k):     lane k - 1 of step s - 1 (lane 0: row i0 - 1, in `rows`),
//   diag (i0 + k - 1, s - k - 1): lane k - 1 of step s - 2 (step s - 1's up).
// The cells are the lane groups': fp32 inputs sweep X = 2^(-R') (scaled_cells) in the AVX512
// and AVX2 builds, the rest R in fp64 (softmin3_lanes: precise exp / log); kStripsInFlight
// strips run at once (see there). The backward recomputes: the forward keeps R's rows 0, S,
// 2S, ... (S a multiple of L: rows that end a strip; the checkpointed ops' layout; R' when
// the sweep is in X); the backward sweeps
// one segment of S rows again from its checkpoint, keeping its cells' soft-argmin weights
// (8 bytes a cell for fp32 inputs, 16 for fp64; two segments' worth: the next segment's
// recompute may run beside a walk), then walks the segment's strips back:
//   E(i, j) = E(i, j + 1) wl(i, j + 1) + E(i + 1, j) wu(i + 1, j)
//             + E(i + 1, j + 1) wd(i + 1, j + 1)
// (each successor's weight of (i, j) among its predecessors), in reverse step order
//   E_s = E_{s+1} wl_{s+1} + down(Pu_{s+1} + Pd_{s+2}, below[s - L + 1]),
// Pu = E wu, Pd = E wd, down() moving lane k + 1 into lane k and `below` (the pushes of the
// strip below into its row above) into lane L - 1; lane 0's Pu and Pd go up into `above`
// (column s of row i0 - 1 takes Pu_s + Pd_(s+1): the same sum, lane 0).
// The gradient is contracted per cell: gx of the strip's rows in lanes, gy in a register
// whose lane k holds column s - k, one column leaving through lane 0 per step.
// Memory per pair: (n / S + 1) (m + 1) kept doubles; in the backward S (m + L) cells'
// weights per segment buffer.
// Threads: pairs go one per thread, or, where that would keep fewer than two threads busy
// (1 or 3 pairs on 2 threads: strips_pairs_share_threads), one after the other, each on
// two: its forward's strip groups across both (soft_strips_forward's RowRing), its
// backward's recomputes beside its walks (soft_strips_pair_backward).

// (v[1], ..., v[L - 1], last): v shifted down one lane, `last` into lane L - 1.
inline VA shift_out(const VA& v, double last) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_pd(_mm512_alignr_epi64(
      _mm512_castpd_si512(_mm512_set1_pd(last)), _mm512_castpd_si512(v), 1));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256d rotated = _mm256_permute4x64_pd(v, _MM_SHUFFLE(0, 3, 2, 1));
  return _mm256_blend_pd(rotated, _mm256_set1_pd(last), 8);
#else
  constexpr int64_t L = VA::size();
  alignas(64) double lanes[2 * L];
  v.store(lanes);
  lanes[L] = last;
  return VA::loadu(lanes + 1);
#endif
}

inline double first_lane(const VA& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtsd_f64(v);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtsd_f64(v);
#else
  alignas(64) double lanes[VA::size()];
  v.store(lanes);
  return lanes[0];
#endif
}

// The steps of the strip of rows i0 .. i0 + L - 1 (the last strip: to n): lane k's first
// allowed column is first(i0 + k) >= first(i0) + k, so steps before first(i0) hold none;
// its last is last(i0 + k) <= last(i0 + L - 1) (the last strip: m, at step m + n - i0).
// Steps interior_first .. interior_last have every lane's cell allowed (a full strip: lane
// k's cells are allowed for s in [first(i0 + k) + k, last(i0 + k) + k], and first and last
// do not decrease with the row): no masking there.
struct StripSteps {
  int64_t rows = 0, first = 0, last = -1, interior_first = 0, interior_last = -1;
  bool holds_end = false;  // the strip holds row n, and the end cell (n, m) at its last step
  StripSteps() = default;
  StripSteps(const PairBand& pb, int64_t i0, int64_t L) {
    holds_end = i0 + L > pb.n;
    rows = std::min<int64_t>(L, pb.n - i0 + 1);
    first = pb.first(i0);
    last = holds_end ? pb.m + (pb.n - i0) : pb.last(i0 + L - 1) + (L - 1);
    if (rows == L) {
      interior_first = pb.first(i0 + L - 1) + (L - 1);
      interior_last = pb.last(i0);
    }
  }
  bool interior(int64_t s) const { return s >= interior_first && s <= interior_last; }
};

// A pair's series for the strips (strip_series) and the sweeps' rows and accumulators.
struct SoftStrips {
  struct Sweeper {               // one forward worker's own state
    std::vector<double> rows;    // the rows between a group's strips
    std::vector<VA> xv;          // x of the group's strips' rows, per feature
  };
  int64_t n_pad = 0, ldy = 0;
  std::vector<double> xs, yr;
  RowRing ring;                  // the forward's rows between groups (one slot a row)
  std::vector<Sweeper> sweepers;
  std::vector<double> above;     // the backward's pushes into the row above a strip
  std::vector<VA> xv, t, gx, gy;  // per feature (backward)
};

// Kept weights per strip: up to m + L - 1 steps of L (diagonal, up) pairs.
inline int64_t strip_weight_count(int64_t m) { return (m + VA::size()) * 2 * VA::size(); }

// A step's weights as fp32 (store_weights' layout) or fp64 (the two vectors).
inline void store_step_weights(float* dst, const VA& wa, const VA& wb) {
  store_weights(dst, wa, wb);
}
inline void store_step_weights(double* dst, const VA& wa, const VA& wb) {
  wa.store(dst);
  wb.store(dst + VA::size());
}
inline void load_step_weights(const float* src, VA& wa, VA& wb) { load_weights(src, wa, wb); }
inline void load_step_weights(const double* src, VA& wa, VA& wb) {
  wa = VA::loadu(src);
  wb = VA::loadu(src + VA::size());
}

// The masks of lanes outside the grid or the band at step s (see forward_hard_strips).
struct StripMask {
  VA lanes, lo, hi, m, rows;
  StripMask() = default;
  StripMask(const PairBand& pb, int64_t rows_in_strip) {
    constexpr int64_t L = VA::size();
    alignas(64) double lane_index[L];
    for (int64_t k = 0; k < L; ++k) lane_index[k] = static_cast<double>(k);
    lanes = VA::loadu(lane_index);
    const double wide = static_cast<double>(pb.n + pb.m + 4 * L);
    lo = VA(pb.banded ? static_cast<double>(pb.lo) : -wide);
    hi = VA(pb.banded ? static_cast<double>(pb.hi) : wide);
    m = VA(static_cast<double>(pb.m));
    rows = VA(static_cast<double>(rows_in_strip - 1));
  }
  // column: s - k per lane; offset: column - (i0 + k).
  VA outside(const VA& column, const VA& offset) const {
    return (column < VA(1.0)) | (column > m) | (offset < lo) | (offset > hi) | (lanes > rows);
  }
};

template <typename T>
void prepare_soft_strips(const T* x, const T* y, int64_t D, const PairBand& pb,
                         SoftStrips& w) {
  strip_series<double, T>(x, y, D, pb.n, pb.m, VA::size(), w.xs, w.yr);
  constexpr int64_t L = VA::size();
  w.n_pad = (pb.n + L - 1) / L * L;
  w.ldy = pb.m + 2 * L;
  w.xv.resize(std::max<int64_t>(1, D));
  w.t.resize(std::max<int64_t>(1, D));
  w.gx.resize(std::max<int64_t>(1, D));
  w.gy.resize(std::max<int64_t>(1, D));
}

// The local costs of a step's lanes: xv, x's D vectors of the strip's rows; ys, y's
// columns s - k (row stride ldy).
template <int kMetric>
inline VA strip_cost(const VA* xv, const double* ys, int64_t ldy, int64_t D) {
  VA c(0.0);
  for (int64_t d = 0; d < D; ++d) {
    const VA t = xv[d] - VA::loadu(ys + d * ldy);
    if constexpr (kMetric == kL1) c = c + t.abs();
    else c = at::vec::fmadd(t, t, c);
  }
  if constexpr (kMetric == kEuclidean) c = c.sqrt();
  return c;
}

// Strips swept at once: each step of a strip waits for its previous step's soft-min (an
// exp -> log chain of ~150 cycles), so one strip alone is latency-bound (~0.14 G cells/s
// on the EPYC). Strip u + 1 of a group runs L steps behind strip u, reading the row that
// strip u wrote one iteration before: the group's K chains are independent within an
// iteration and overlap in the out-of-order window.
constexpr int kStripsInFlight = 4;

// Whether the strips sweep X = 2^(-R') (the fp32 lanes' representation, see "fp32 lanes"
// above: one exp2 polynomial a cell, no logarithm) or R (the precise exp / log): as the lane
// groups, fp32 inputs in the AVX512 and AVX2 builds.
template <typename T>
constexpr bool strips_sweep_scaled() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return std::is_same_v<T, float>;
#else
  return false;
#endif
}

// Rows i_begin .. i_end of the pair (i_begin = 1 mod L) from `start`, row i_begin - 1 (m + 1
// values; null: row 0). Returns R[n][m] when i_end = n. checkpoints (nullable): row i for
// every i < n that is a multiple of `every` goes to checkpoints + (i / every) ld. Start and
// checkpoint rows hold R, or R' = R / (gamma ln 2) when kScaled (converted once per row).
// weights (nullable): strip t of the call (0-based) keeps step s's diagonal and up weights
// (store_step_weights) at weights + t strip_weight_count(m) + (s - first) 2 L.
// The rows run in groups of kStripsInFlight strips, each group reading the row above it
// (the group before's last row) and writing its last row: `workers` threads sweep
// consecutive groups at once, each a batch of columns (ring_batch) behind the one before,
// the rows between groups handed over column by column in w.ring (RowRing: its claims,
// waits and fallback to one thread at a time when a worker loses its core). Every cell is
// computed the same way on any number of workers: the same results.
template <int kMetric, bool kScaled, typename W = float>
double soft_strips_forward(SoftStrips& w, int64_t D_arg, const PairBand& pb, double gamma,
                           int64_t i_begin, int64_t i_end, const double* start,
                           double* checkpoints, int64_t every, int64_t ld,
                           W* weights_arg = nullptr, int64_t workers = 1) {
  [[maybe_unused]] const int64_t D = D_arg;  // (D_arg, weights_arg: see the workers' copies below)
  constexpr int64_t L = VA::size();
  constexpr int K = kStripsInFlight;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const int64_t m = pb.m, ldr = m + 1;
  // A row of the sweep: R (ldr values), or X's mantissas then exponents (2 ldr).
  constexpr int64_t kParts = kScaled ? 2 : 1;
  const int64_t row_size = kParts * ldr;
  const double r_unit = kScaled ? gamma * std::log(2.0) : 1.0;  // R = r_unit R'
  // Row r of R or R' from / into a sweep row, L columns at a time (r_to_scaled,
  // scaled_to_r; a scalar exp2 or log2 a column cost ~1 ms of the 1 x 2048^2 backward's
  // recomputes at S = 48).
  auto load_row = [&](const double* r, double* row) {
    if constexpr (kScaled) {  // X = 2^-R' = mant 2^expo
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      for (int64_t j = 0; j < ldr; j += L) {
        const int count = static_cast<int>(std::min<int64_t>(L, ldr - j));
        VA mant, expo;
        r_to_scaled(VA::loadu(r + j, count), mant, expo);
        mant.store(row + j, count);
        expo.store(row + ldr + j, count);
      }
#endif
    } else {
      std::copy(r, r + ldr, row);
    }
  };
  auto store_row = [&](const double* row, double* r) {
    if constexpr (kScaled) {  // R' = -(expo + log2 mant)
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      for (int64_t j = 0; j < ldr; j += L) {
        const int count = static_cast<int>(std::min<int64_t>(L, ldr - j));
        scaled_to_r(VA::loadu(row + j, count), VA::loadu(row + ldr + j, count))
            .store(r + j, count);
      }
#endif
    } else {
      std::copy(row, row + ldr, r);
    }
  };
  auto clear_row = [&](double* row) {  // every cell unreachable: R = +inf, X = 0
    std::fill(row, row + ldr, kScaled ? 0.0 : kInf);
    if constexpr (kScaled) std::fill(row + ldr, row + 2 * ldr, -kInf);
  };
  const int64_t group_rows = K * L;
  const int64_t groups = (i_end - i_begin + group_rows) / group_rows;
  // One thread once a sweep with this work area found the threads contended (RowRing,
  // kept across its reset: the next pairs of a batch too): the same results.
  workers = w.ring.contended() ? 1 : std::max<int64_t>(1, std::min(workers, groups));
  RowRing& ring = w.ring;
  ring.reset(workers, (row_size + L - 1) / L, m);
  auto slot = [&](int64_t q) { return reinterpret_cast<double*>(ring.slot(q)); };
  if (start != nullptr) {  // slot 0: the first group's input
    load_row(start, slot(0));
  } else {  // row 0: R[0][0] = 0 (X = 1)
    clear_row(slot(0));
    slot(0)[0] = kScaled ? 1.0 : 0.0;
    if constexpr (kScaled) slot(0)[ldr] = 0.0;
  }
  // One worker sweeps each group's columns in one batch (no hand-over).
  const int64_t batch = workers > 1 ? ring_batch(workers, m) : m + (K + 1) * L;
  if (static_cast<int64_t>(w.sweepers.size()) < workers) w.sweepers.resize(workers);
  double value = kInf;  // written by the worker whose group holds row n
  run_ring_workers(workers, [&](int64_t worker) {
    // The sweep's constants are the worker's own locals (shadowing the function's): read
    // through the closure's references (or captured by value) they were reloaded every
    // step, 1 x 2048^2 fp32 forward 5.4 -> 6.5 ms (9.3 by value).
    const VA inf(kInf), one(1.0), g(gamma), inv_g(1.0 / gamma), inv_unit(1.0 / r_unit);
    const int64_t m = pb.m, ldr = m + 1, D = D_arg, n_pad = w.n_pad, ldy = w.ldy;
    const double* const xs = w.xs.data();
    const double* const yr = w.yr.data();
    W* const weights = weights_arg;
    SoftStrips::Sweeper& own = w.sweepers[worker];
    own.rows.resize((K - 1) * row_size);
    own.xv.resize(K * std::max<int64_t>(1, D));
    for (int64_t q; (q = ring.claim(groups)) >= 0;) {
      const int64_t g0 = i_begin + q * group_rows;
      const int strips = static_cast<int>(std::min<int64_t>(K, (i_end - g0 + L) / L));
      // Its last row goes to the ring's output slot once that slot's earlier reader and
      // writer are done.
      ring.wait_output(q);
      // rows[u]: the row above strip u (rows[0]: the group's input, group q - 1's last
      // row; rows[strips]: the row below its last strip, the next group's input).
      double* rows[K + 1];
      rows[0] = slot(ring.input_slot(q));
      for (int u = 1; u < strips; ++u) rows[u] = own.rows.data() + (u - 1) * row_size;
      rows[strips] = slot(ring.output_slot(q));
      StripSteps steps[K];
      StripMask mask[K];
      // Per strip: the previous step's cells (R, or X's mantissas) and the one before's up
      // neighbours; left_e, diag_e: X's exponents.
      [[maybe_unused]] VA left[K], diag[K], left_e[K], diag_e[K], column[K], offset[K];
      int64_t t_last = 0;
      for (int u = 0; u < strips; ++u) {
        const int64_t i0 = g0 + u * L;
        steps[u] = StripSteps(pb, i0, L);
        mask[u] = StripMask(pb, steps[u].rows);
        for (int64_t d = 0; d < D; ++d) {
          own.xv[u * D + d] = VA::loadu(xs + d * n_pad + (i0 - 1));
        }
        clear_row(rows[u + 1]);
        column[u] = VA(static_cast<double>(steps[u].first)) - mask[u].lanes;  // s - k
        offset[u] = column[u] - VA(static_cast<double>(i0)) - mask[u].lanes;  // - (i0 + k)
        left[u] = kScaled ? VA(0.0) : inf;
        left_e[u] = VA(-kInf);
        t_last = std::max(t_last, steps[u].last + u * L);
      }
      // Iteration t runs step t - u L of strip u.
      for (int64_t ta = steps[0].first; ta <= t_last; ta += batch) {
        const int64_t tb = std::min(t_last, ta + batch - 1);
        // Strip 0 reads columns s - 1 and s of the row above at its step s = t.
        ring.wait_input(q, std::min(tb, m) + 1);
        for (int64_t t = ta; t <= tb; ++t) {
#pragma GCC unroll 4
          for (int u = 0; u < K; ++u) {
            const int64_t s = t - u * L;
            if (u >= strips || s < steps[u].first || s > steps[u].last) continue;
            const double* above = rows[u];  // row i0 - 1
            const bool first_step = s == steps[u].first;
            VA c = strip_cost<kMetric>(own.xv.data() + u * D, yr + L + m - s, ldy,
                                       D);
            if (!steps[u].interior(s)) {
              c = VA::blendv(c, inf, mask[u].outside(column[u], offset[u]));
            }
            VA v, v_e, wts[2];
            if constexpr (kScaled) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
              if (first_step) {
                diag[u] = shift_in(VA(0.0), above[s - 1]);
                diag_e[u] = shift_in(VA(-kInf), above[ldr + s - 1]);
              }
              const VA up = shift_in(left[u], s <= m ? above[s] : 0.0);
              const VA up_e = shift_in(left_e[u], s <= m ? above[ldr + s] : -kInf);
              const VA cost = c * inv_unit;
              scaled_cells<1>(&diag[u], &diag_e[u], &up, &up_e, &left[u], &left_e[u], &cost,
                              &v, &v_e, weights != nullptr ? &wts[0] : nullptr, &wts[1]);
              diag[u] = up;
              diag_e[u] = up_e;
              left_e[u] = v_e;
#endif
            } else {
              if (first_step) diag[u] = shift_in(inf, above[s - 1]);
              const VA up = shift_in(left[u], s <= m ? above[s] : kInf);
              v = c + softmin3_lanes(diag[u], up, left[u], g, inv_g,
                                     weights != nullptr ? wts : nullptr);
              diag[u] = up;
            }
            left[u] = v;
            if (weights != nullptr) {
              W* kept = weights + ((g0 - i_begin) / L + u) * strip_weight_count(m);
              store_step_weights(kept + (s - steps[u].first) * 2 * L, wts[0], wts[1]);
            }
            const int64_t j = s - (L - 1);  // lane L - 1's column: row i0 + L - 1
            if (!steps[u].holds_end && j >= 1 && j <= m) {
              alignas(64) double lanes[L];
              v.store(lanes);
              double* out = rows[u + 1];
              out[j] = lanes[L - 1];
              if constexpr (kScaled) {
                v_e.store(lanes);
                out[ldr + j] = lanes[L - 1];
              }
            }
            if (steps[u].holds_end && s == steps[u].last) {
              alignas(64) double lanes[L];
              if constexpr (kScaled) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
                (scaled_to_r(v, v_e) * VA(r_unit)).store(lanes);
#endif
              } else {
                v.store(lanes);
              }
              value = lanes[pb.n - (g0 + u * L)];
            }
            column[u] = column[u] + one;
            offset[u] = offset[u] + one;
          }
        }
        // The last strip's lane L - 1 is at column tb - (strips - 1) L - (L - 1): its
        // row's columns up to there are final.
        ring.publish(q, std::clamp<int64_t>(tb - (strips - 1) * L - L + 2, 0, ldr));
      }
      ring.publish(q, ldr);
      ring.release_input(q);
      for (int u = 1; u <= strips; ++u) {
        const int64_t row = g0 + u * L - 1;  // the row in rows[u]
        if (checkpoints != nullptr && row % every == 0 && row < pb.n) {
          store_row(rows[u], checkpoints + row / every * ld);
        }
      }
      ring.release_output(q);
      ring.finish();
    }
  });
  return value;
}

// The backward over the strips of rows i_begin .. i_end, whose weights soft_strips_forward
// kept. w.above on entry: the pushes into row i_end from row i_end + 1 (m + 1 values; zeros
// below the pair's last row); on return: those into row i_begin - 1. seed: the gradient of
// the pair's value, given to the end cell when the rows hold it; end_unreachable: that
// cell is +inf, so it pushes nothing (its weights, (0, 0) like every unreachable cell's,
// would hand the seed to its left neighbour; the reference's soft-min passes no gradient
// through +inf) and only its own cost takes the seed. gx (n, D) and gy (m, D) accumulate
// E d cost / d x_i (metric_scale applied by the caller). kDim > 0: D known at compile time
// (with_fixed_dim), so x's rows and the gx / gy accumulators stay in registers (1 x 2048^2,
// D = 4, one thread: the walk 8.0 -> 4.4 ms, by perf).
template <int kMetric, int kDim, typename W>
void soft_strips_backward(SoftStrips& w, int64_t D_runtime, const PairBand& pb,
                          int64_t i_begin, int64_t i_end, const W* weights, double seed,
                          bool end_unreachable, double* gx, double* gy) {
  constexpr int64_t L = VA::size();
  const int64_t D = kDim > 0 ? kDim : D_runtime;
  const int64_t n = pb.n, m = pb.m;
  const VA zero(0.0), one(1.0);
  // Per feature: x's rows of the strip, the strip's gx and gy (lane k: column s - k).
  constexpr int kLocal = kDim > 0 ? kDim : 1;
  VA xv_fixed[kLocal], gx_fixed[kLocal], gy_fixed[kLocal];
  VA* const xv = kDim > 0 ? xv_fixed : w.xv.data();
  VA* const gxv = kDim > 0 ? gx_fixed : w.gx.data();
  VA* const gyv = kDim > 0 ? gy_fixed : w.gy.data();
  std::vector<double> below;
  const int64_t last_strip_i0 = i_begin + (i_end - i_begin) / L * L;
  for (int64_t i0 = last_strip_i0; i0 >= i_begin; i0 -= L) {
    const StripSteps steps(pb, i0, L);
    const StripMask mask(pb, steps.rows);
    for (int64_t d = 0; d < D; ++d) {
      xv[d] = VA::loadu(w.xs.data() + d * w.n_pad + (i0 - 1));
      gxv[d] = zero;
      gyv[d] = zero;
    }
    below.swap(w.above);  // the pushes into this strip's last row
    w.above.assign(m + 1, 0.0);
    double* above = w.above.data();
    const W* kept = weights + (i0 - i_begin) / L * strip_weight_count(m);
    // The previous step's E, left weight and pushes down (q = Pu_s + Pd_(s+1): the cells
    // of step s - 1 one row below take lane k + 1, and row i0 - 1 takes lane 0).
    VA e1 = zero, wl1 = zero, q1 = zero, pd1 = zero;
    VA end_lane = zero;  // all bits set in the end cell's lane
    if (steps.holds_end) {
      alignas(64) double lanes[L] = {};
      std::memset(lanes + (n - i0), 0xff, sizeof(double));
      end_lane = VA::loadu(lanes);
    }
    for (int64_t s = steps.last; s >= steps.first; --s) {
      const int64_t j_below = s - (L - 1);
      const double from_below = j_below >= 1 && j_below <= m ? below[j_below] : 0.0;
      VA e = at::vec::fmadd(e1, wl1, shift_out(q1, from_below));
      const bool at_end = steps.holds_end && s == steps.last;
      if (at_end) e = e + (VA(seed) & end_lane);
      const bool interior = steps.interior(s);
      VA outside = zero;
      if (!interior) {
        const VA column = VA(static_cast<double>(s)) - mask.lanes;  // s - k
        outside = mask.outside(column, column - VA(static_cast<double>(i0)) - mask.lanes);
        e = VA::blendv(e, zero, outside);
      }
      VA wd, wu;
      load_step_weights(kept + (s - steps.first) * 2 * L, wd, wu);
      VA wl = max_instruction(zero, (one - wd) - wu);
      if (at_end && end_unreachable) {
        wd = VA::blendv(wd, zero, end_lane);
        wu = VA::blendv(wu, zero, end_lane);
        wl = VA::blendv(wl, zero, end_lane);
      }
      const VA pd = e * wd, q = at::vec::fmadd(e, wu, pd1);
      // Row i0 - 1's column s takes (i0, s)'s up push and (i0, s + 1)'s diagonal one: lane
      // 0 of q (for s = m + 1 only the latter, to column m, at step m + 1 below).
      if (s <= m) above[s] = first_lane(q);
      if (s == m + 1) above[m] = first_lane(pd);
      // E d cost / d x of every lane's cell into gx and gy (d / d y is its negative: the
      // caller's sign).
      const double* ys = w.yr.data() + L + m - s;
      // x - y of the lanes' cells; 0 outside the grid or band (whose e is 0: 0 * t would
      // be NaN for an infinite x or y there).
      auto difference = [&](int64_t d) {
        const VA t = xv[d] - VA::loadu(ys + d * w.ldy);
        return interior ? t : VA::blendv(t, zero, outside);
      };
      if constexpr (kMetric == kEuclidean) {
        VA t_fixed[kLocal];
        VA* const t = kDim > 0 ? t_fixed : w.t.data();
        VA sum = zero;
        for (int64_t d = 0; d < D; ++d) {
          t[d] = difference(d);
          sum = at::vec::fmadd(t[d], t[d], sum);
        }
        const VA c = sum.sqrt();
        const VA scale = VA::blendv(zero, e / c, c > zero);
        for (int64_t d = 0; d < D; ++d) {
          gxv[d] = at::vec::fmadd(scale, t[d], gxv[d]);
          gyv[d] = at::vec::fmadd(scale, t[d], gyv[d]);
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const VA t = difference(d);
          if constexpr (kMetric == kL1) {
            const VA u = e * (((t > zero) & one) - ((t < zero) & one));
            gxv[d] = gxv[d] + u;
            gyv[d] = gyv[d] + u;
          } else {  // e t, the factor 2 applied by the caller
            gxv[d] = at::vec::fmadd(e, t, gxv[d]);
            gyv[d] = at::vec::fmadd(e, t, gyv[d]);
          }
        }
      }
      // Column s leaves through lane 0; lane k takes lane k + 1's column s - 1 - k.
      for (int64_t d = 0; d < D; ++d) {
        if (s >= 1 && s <= m) gy[(s - 1) * D + d] += first_lane(gyv[d]);
        gyv[d] = shift_out(gyv[d], 0.0);
      }
      pd1 = pd;
      q1 = q;
      e1 = e;
      wl1 = wl;
    }
    // Row i0 - 1's column first - 1 takes the diagonal push of (i0, first) alone.
    if (steps.first - 1 <= m) above[steps.first - 1] = first_lane(pd1);
    // Left in gyv: the columns first - 1 - k, left of every row's band (nothing added).
    alignas(64) double lanes[L];
    for (int64_t d = 0; d < D; ++d) {
      gxv[d].store(lanes);
      for (int64_t k = 0; k < steps.rows; ++k) gx[(i0 + k - 1) * D + d] += lanes[k];
    }
  }
}

// Whether a checkpointed op runs its pairs in strips (each pair alone) instead of lane
// groups of 8: up to 6 pairs with fp32 arithmetic, 8 with fp64, with segments of whole
// strips. A lane group costs 8 pairs' work whatever its lanes hold; per cell a strip costs
// ~1.3x a full group's on 2 threads (fp32; fp64's groups use the precise exp / log, strips
// are cheaper there), ~2x on one (dynamic_time_warping.cpu_soft_strip_pairs gives the
// measurements, and asks for strips only up to 4 pairs on one thread). Not the thread
// count: a forward and its backward must agree on the checkpoints' layout. More pairs run
// in lane groups, and so does a segment length that is not a multiple of L (tests use that
// to reach them).
template <typename T>
constexpr int64_t soft_strips_max_pairs() { return std::is_same_v<T, double> ? 8 : 6; }

template <typename T>
bool soft_strips_for(int64_t B, int64_t S) {
  return B <= soft_strips_max_pairs<T>() && S % VA::size() == 0;
}

// A pair of fewer cells stays on one thread: a parallel region would cost more than its
// rows (as row_workers_for's lane groups).
constexpr int64_t kStripsSharedMinCells = 1 << 15;

// Whether B pairs in strips run one after the other, each on two threads (the forward's
// strip groups across them, the backward's recomputes beside its walks: ~1.8x one thread
// for 1 x 2048^2), or one pair per thread: two a pair where one per thread would keep
// fewer than two threads busy on average (B / ceil(B / P) < 2: on 2 threads 1, 3, 5 or 7
// pairs; 3 pairs one per thread take 2 pairs' time, each on both 1.5), and only where
// every pair has kStripsSharedMinCells cells (by its own lengths): smaller pairs would each
// run on one thread, one after the other, so they go one per thread instead.
inline bool strips_pairs_share_threads(int64_t B, const int64_t* x_lengths,
                                       const int64_t* y_lengths) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || B >= 2 * ((B + threads - 1) / threads)) return false;
  for (int64_t b = 0; b < B; ++b) {
    if (x_lengths[b] * y_lengths[b] < kStripsSharedMinCells) return false;
  }
  return true;
}

inline int64_t strips_pair_workers(bool shared) { return shared ? 2 : 1; }

template <int kMetric>
constexpr double strips_metric_scale() { return kMetric == kSqEuclidean ? 2.0 : 1.0; }

template <typename T, int kMetric>
void xy_soft_forward_strips(const DtwXYForwardArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* values = static_cast<T*>(a.values);
  double* kept = static_cast<double*>(a.R);  // (B, C, M + 1)
  const int64_t N = a.N, M = a.M, D = a.D, S = a.checkpoint_rows;
  const int64_t C = (N + S - 1) / S;
  const double inf = std::numeric_limits<double>::infinity();
  const bool shared = strips_pairs_share_threads(a.B, a.x_lengths, a.y_lengths);
  auto pairs = [&](int64_t begin, int64_t end) {
    const FlushSubnormalsScope flush_subnormals;  // see the class comment
    SoftStrips w;
    for (int64_t b = begin; b < end; ++b) {
      const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
      double* pair_kept = kept + b * C * (M + 1);
      std::fill(pair_kept, pair_kept + C * (M + 1), inf);
      pair_kept[0] = 0.0;  // row 0: R[0][0] = 0
      prepare_soft_strips(x + b * a.x_batch_stride, y + b * a.y_batch_stride, D, pb, w);
      const double value = soft_strips_forward<kMetric, strips_sweep_scaled<T>()>(
          w, D, pb, a.gamma, 1, pb.n, nullptr, pair_kept, S, M + 1, static_cast<float*>(nullptr),
          strips_pair_workers(shared));
      values[b] = static_cast<T>(value);
      // Row 0's last column records S (see xy_soft_forward_checkpointed).
      pair_kept[M] = static_cast<double>(S);
    }
  };
  if (shared) {
    pairs(0, a.B);  // one pair after the other, each on two of the pool's threads
  } else {
    at::parallel_for(0, a.B, 1, pairs);
  }
}

// The backward of one pair in strips (soft_strips_backward), segment by segment from the
// last: recompute segment c from its checkpoint keeping its weights (R_c), then walk it back
// (B_c). A segment is one item, R_c and B_c on the same thread: the weights R_c writes
// (~0.8 MB for m = 2048, S = 48) are read back from that core's own L2. (Handing them to
// the other core, R on one thread and B on the other, cost more than the overlap won: 1 x
// 2048^2, D = 4, 2 threads, 14.2 ms against 15.9 on one; as items 8.1 ms.) With two
// workers, R_(c-1) runs beside B_c: items are claimed in order, R_c waits for the walk
// kStripsBuffers segments below (which last used its weight buffer and work area), B_c for
// the walk below it (the pushes into its last row; gx / gy are added in one order: bitwise
// the result of one thread). Each waits only for items claimed before it, so one worker,
// or a worker the pool never starts, cannot deadlock it. recompute, back: the work areas of
// the recomputes and of the walks, prepared with the pair's series (prepare_soft_strips).
// gx (n, D), gy (m, D): E d cost / d x summed per row and per column.
// (3 buffers, a faster core recomputing further ahead, measured no better than 2.)
constexpr int64_t kStripsBuffers = 2;

template <int kMetric, bool kScaled, typename W>
void soft_strips_pair_backward(SoftStrips (&recompute)[kStripsBuffers], SoftStrips& back,
                               int64_t D, const PairBand& pb, double gamma,
                               const double* pair_kept, int64_t S, int64_t ld, double seed,
                               int64_t workers, std::vector<W> (&weights)[kStripsBuffers],
                               double* gx, double* gy) {
  constexpr int64_t L = VA::size();
  const int64_t n = pb.n, m = pb.m;
  const int64_t segments = (n + S - 1) / S;
  // One worker alternates nothing: one buffer and work area stay in its caches.
  const int64_t buffers = workers > 1 ? kStripsBuffers : 1;
  for (int64_t k = 0; k < buffers; ++k) weights[k].resize(S / L * strip_weight_count(m));
  back.above.assign(m + 1, 0.0);
  std::atomic<int64_t> next_segment{0}, walked{0};
  // Written by R of the last segment (item 0) before its walk; every walk reads it, on
  // either thread: each walk waits (acquire) for the one below, item 0's walk first, whose
  // release of `walked` follows the write.
  bool end_unreachable = false;
  auto wait_until = [](const std::atomic<int64_t>& count, int64_t target) {
    while (count.load(std::memory_order_acquire) < target) std::this_thread::yield();
  };
  auto worker = [&]() {
    const FlushSubnormalsScope flush_subnormals;  // see the class comment
    for (int64_t k; (k = next_segment.fetch_add(1)) < segments;) {  // k-th from the last
      const int64_t c = segments - 1 - k;
      const int64_t i_begin = c * S + 1, i_end = std::min(n, (c + 1) * S);
      W* buffer = weights[k % buffers].data();
      wait_until(walked, k - (buffers - 1));  // B_(k - 2): its buffer, work area
      const double value = soft_strips_forward<kMetric, kScaled>(
          recompute[k % buffers], D, pb, gamma, i_begin, i_end,
          c > 0 ? pair_kept + c * ld : nullptr, nullptr, S, ld, buffer);
      if (k == 0) end_unreachable = value == std::numeric_limits<double>::infinity();
      wait_until(walked, k);  // B of segment k - 1: the pushes into this segment's last row
      with_fixed_dim(D, [&](auto dim_c) {
        soft_strips_backward<kMetric, decltype(dim_c)::value>(
            back, D, pb, i_begin, i_end, buffer, seed, end_unreachable, gx, gy);
      });
      walked.fetch_add(1, std::memory_order_release);
    }
  };
  if (workers > 1) {
    at::parallel_for(0, 2, 1, [&](int64_t, int64_t) { worker(); });
  } else {
    worker();
  }
}

template <typename T, int kMetric>
void xy_soft_backward_strips(const DtwXYBackwardArgs& a) {
  const T* grad = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  const double* kept = static_cast<const double*>(a.R);  // (B, C, M + 1)
  T* gx_out = static_cast<T*>(a.grad_x);
  T* gy_out = static_cast<T*>(a.grad_y);
  const int64_t N = a.N, M = a.M, D = a.D, S = a.checkpoint_rows;
  const int64_t C = (N + S - 1) / S;
  constexpr double kScale = strips_metric_scale<kMetric>();
  const bool shared = strips_pairs_share_threads(a.B, a.x_lengths, a.y_lengths);
  auto pairs = [&](int64_t begin, int64_t end) {
    SoftStrips recompute[kStripsBuffers], back;
    // One segment's soft-argmin weights: fp32 for fp32 inputs (as the lane groups keep
    // them), fp64 for fp64 ones (fp32 weights would cost ~1e-7 relative in the gradient).
    using W = std::conditional_t<std::is_same_v<T, float>, float, double>;
    std::vector<W> weights[kStripsBuffers];
    std::vector<double> gx, gy;
    for (int64_t b = begin; b < end; ++b) {
      const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
      const int64_t n = pb.n, m = pb.m;
      const int64_t workers = strips_pair_workers(shared);
      for (int64_t k = 0; k < (workers > 1 ? kStripsBuffers : 1); ++k) {
        prepare_soft_strips(x + b * a.x_batch_stride, y + b * a.y_batch_stride, D, pb,
                            recompute[k]);
      }
      prepare_soft_strips(x + b * a.x_batch_stride, y + b * a.y_batch_stride, D, pb, back);
      gx.assign(n * D, 0.0);
      gy.assign(m * D, 0.0);
      soft_strips_pair_backward<kMetric, strips_sweep_scaled<T>()>(
          recompute, back, D, pb, a.gamma, kept + b * C * (M + 1), S, M + 1,
          static_cast<double>(grad[b]), workers, weights, gx.data(), gy.data());
      write_pair_gradient(gx.data(), kScale, n, N, D, gx_out, b);
      write_pair_gradient(gy.data(), -kScale, m, M, D, gy_out, b);
    }
  };
  if (shared) {
    pairs(0, a.B);  // one pair after the other, each on two of the pool's threads
  } else {
    at::parallel_for(0, a.B, 1, pairs);
  }
}


// ------------------------------------------------------------ checkpointed soft-DTW
// For long pairs the kept state of the whole (n, m) grid (8 bytes per cell) is replaced by
// checkpoints: the forward keeps R of every S-th row (rows 0, S, 2S, ...: C = ceil(N / S)
// rows of M + 1 values per pair); the backward recomputes one segment of S rows at a time
// from its checkpoint (keeping that segment's weights or R) and runs the streaming backward
// over it, bottom segment first, E's boundary row carried from one segment to the next.
// Memory: C (M + 1) per pair plus S m per worker instead of N M per pair (S ~ sqrt(N): two
// passes of O(sqrt(N) M)); time: one more forward. Every pair runs in the lanes code: a
// group of L pairs (LaneShape), or a single pair copied into all L lanes (for fp32 that
// is still faster than the scalar path, whose soft-min chain is not vectorised).

template <typename T, int kMetric>
void xy_soft_forward_checkpointed(const DtwXYForwardArgs& a) {
  constexpr int64_t L = VA::size();
  constexpr bool kWeights = std::is_same_v<T, float>;
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* values = static_cast<T*>(a.values);
  double* kept = static_cast<double*>(a.R);  // (B, C, M + 1)
  const int64_t N = a.N, M = a.M, D = a.D, S = a.checkpoint_rows;
  const int64_t C = (N + S - 1) / S;
  const double inf = std::numeric_limits<double>::infinity();
  const LaneGroups lg(L, a.B, a.B / L, a.x_lengths, a.y_lengths, /*partial=*/true);
  const int64_t row_workers = row_workers_for<T>(lg.tasks(), N, M);
  for_each_task(lg.tasks(), row_workers > 1 ? lg.tasks() : 1, [&](auto next_task) {
    const FlushSubnormalsScope flush_subnormals;  // see the class comment
    std::vector<double> xt, yt;
    std::vector<VA> checkpoints;
    SweepWork work;
    work.workers = row_workers;
    for (int64_t t; (t = next_task()) >= 0;) {
      const LaneTask task = lane_task(lg, t);
      const LaneShape<VA> shape(task.lanes, a.x_lengths, a.y_lengths, a.band);
      const int64_t m = shape.pb.m, ld = m + 1;
      gather_lanes(x, y, a.x_batch_stride, a.y_batch_stride, D, task.lanes, shape, xt, yt);
      checkpoints.assign(C * ld, VA(inf));
      checkpoints[0] = VA(0.0);  // row 0: R[0][0] = 0, the rest +inf
      SweepRows sweep;
      sweep.checkpoints = checkpoints.data();
      sweep.every = S;
      const VA value = with_fixed_dim(D, [&](auto dim_c) {
        return xy_soft_forward_sweep<kMetric, kWeights, decltype(dim_c)::value>(
            xt.data(), yt.data(), D, shape, a.gamma, nullptr, work, sweep);
      });
      alignas(64) double lane_values[L], lane_row[L];
      value.store(lane_values);
      // Each checkpoint vector is split into the distinct lanes' (C, M + 1) rows, once.
      auto kept_row = [&](int64_t k, int64_t c) {
        return kept + (task.lanes[k] * C + c) * (M + 1);
      };
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j <= m; ++j) {
          checkpoints[c * ld + j].store(lane_row);
          for (int64_t k = 0; k < task.distinct; ++k) kept_row(k, c)[j] = lane_row[k];
        }
        for (int64_t k = 0; k < task.distinct; ++k) {
          std::fill(kept_row(k, c) + m + 1, kept_row(k, c) + M + 1, inf);
        }
      }
      for (int64_t k = 0; k < task.distinct; ++k) {
        values[task.lanes[k]] = static_cast<T>(lane_values[k]);
        // Row 0's last column (R[0][M] = +inf, never read: the first segment starts from
        // row 0 itself) records S, so that the backward can check it gets the same S.
        kept_row(k, 0)[M] = static_cast<double>(S);
      }
    }
  });
}

template <typename T, int kMetric>
void xy_soft_backward_checkpointed(const DtwXYBackwardArgs& a) {
  constexpr int64_t L = VA::size();
  constexpr bool kWeights = std::is_same_v<T, float>;
  const T* grad = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  const double* kept = static_cast<const double*>(a.R);  // (B, C, M + 1)
  T* gx_out = static_cast<T*>(a.grad_x);
  T* gy_out = static_cast<T*>(a.grad_y);
  const int64_t N = a.N, M = a.M, D = a.D, S = a.checkpoint_rows;
  const int64_t C = (N + S - 1) / S;
  const LaneGroups lg(L, a.B, a.B / L, a.x_lengths, a.y_lengths, /*partial=*/true);
  const int64_t row_workers = row_workers_for<T>(lg.tasks(), N, M);
  for_each_task(lg.tasks(), row_workers > 1 ? lg.tasks() : 1, [&](auto next_task) {
    const FlushSubnormalsScope flush_subnormals;  // see the class comment
    std::vector<double> xt, yt, segment;
    std::vector<VA> above, gxl, gyl;
    SweepWork sweep_work;
    BackWork back_work;
    sweep_work.workers = back_work.workers = row_workers;
    for (int64_t t; (t = next_task()) >= 0;) {
      const LaneTask task = lane_task(lg, t);
      const LaneShape<VA> shape(task.lanes, a.x_lengths, a.y_lengths, a.band);
      const int64_t n = shape.pb.n, m = shape.pb.m, ld = m + 1;
      gather_lanes(x, y, a.x_batch_stride, a.y_batch_stride, D, task.lanes, shape, xt, yt);
      above.resize(ld);
      gxl.resize(n * D);
      gyl.resize(m * D);
      segment.resize(S * m * L);  // one segment's kept rows (weights or R)
      alignas(64) double lane_values[L];
      for (int64_t k = 0; k < L; ++k) lane_values[k] = static_cast<double>(grad[task.lanes[k]]);
      const VA g = VA::loadu(lane_values);
      const int64_t segments = (n + S - 1) / S;
      for (int64_t c = segments - 1; c >= 0; --c) {
        const int64_t i0 = c * S, i_end = std::min(n, i0 + S);
        if (c > 0) {  // row i0 from the lanes' checkpoints
          for (int64_t j = 0; j <= m; ++j) {
            for (int64_t k = 0; k < L; ++k) {
              lane_values[k] = kept[(task.lanes[k] * C + c) * (M + 1) + j];
            }
            above[j] = VA::loadu(lane_values);
          }
        }
        SweepRows sweep;
        sweep.i0 = i0;
        sweep.i_end = i_end;
        sweep.start = c > 0 ? above.data() : nullptr;
        BackRows back;
        back.p_lo = i0 + 1;
        back.p_hi = i_end;
        back.above = sweep.start;
        back.first = c == segments - 1;
        with_fixed_dim(D, [&](auto dim_c) {
          constexpr int kDim = decltype(dim_c)::value;
          xy_soft_forward_sweep<kMetric, kWeights, kDim>(xt.data(), yt.data(), D, shape,
                                                         a.gamma, segment.data(), sweep_work,
                                                         sweep);
          xy_soft_backward_sweep<kMetric, kWeights, kDim>(xt.data(), yt.data(), D, shape,
                                                          a.gamma, g, segment.data(),
                                                          gxl.data(), gyl.data(), back_work,
                                                          back);
        });
      }
      scatter_task_gradients(task, shape, gxl.data(), gyl.data(), N, M, D, gx_out, gy_out);
    }
  });
}

template <typename T>
void xy_forward_impl(const DtwXYForwardArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* values = static_cast<T*>(a.values);
  T* R = static_cast<T*>(a.R);
  const int64_t B = a.B, N = a.N, M = a.M, D = a.D;
  const int64_t cells = std::max<int64_t>(1, N * M * std::max<int64_t>(1, D));
  dispatch_metric_d(a.metric, D, [&](auto metric_c, auto d1_c) {
    constexpr int kMetric = decltype(metric_c)::value;
    constexpr bool kD1 = decltype(d1_c)::value;
    if (a.soft && a.checkpoint_rows > 0 && a.R != nullptr) {
      if (soft_strips_for<T>(a.B, a.checkpoint_rows)) xy_soft_forward_strips<T, kMetric>(a);
      else xy_soft_forward_checkpointed<T, kMetric>(a);
      return;
    }
    if (a.soft) {
      using A = Acc<T>;
      const A gamma = static_cast<A>(a.gamma);
      const int64_t grain = std::max<int64_t>(1, 32768 / cells);
      constexpr int64_t LA = VA::size();
      const LaneGroups lg(LA, B, LA > 1 ? B / LA : 0, a.x_lengths, a.y_lengths);
      // Rows across threads for lane groups only: a batch of single pairs (1 to 4 pairs in
      // strips, unfilled) spreads its pairs over the threads.
      const int64_t row_workers = lg.groups > 0 ? row_workers_for<T>(lg.tasks(), N, M) : 1;
      // 1 or 3 single pairs (on 2 threads; strips_pairs_share_threads): one task at a time,
      // each pair in strips on two threads.
      const bool shared = lg.groups == 0 && a.R == nullptr && VA::size() > 1 &&
                          strips_pairs_share_threads(B, a.x_lengths, a.y_lengths);
      for_each_task(lg.tasks(), row_workers > 1 || shared ? lg.tasks() : grain,
                    [&](auto next_task) {
        const FlushSubnormalsScope flush_subnormals;  // see the class comment
        std::vector<A> buf(2 * (M + 1));
        std::vector<double> xt, yt;
        SweepWork work;
        work.workers = row_workers;
        SoftStrips strips;
        double* R_soft = static_cast<double*>(a.R);  // soft-DTW keeps R in fp64
        auto single = [&](int64_t b, int64_t slot) {  // kept at its task's slot
          const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
          double* Rb = R_soft != nullptr ? R_soft + slot * N * M : nullptr;
          if (Rb == nullptr && VA::size() > 1 && pb.n * pb.m >= kStripsMinCells) {
            // The value alone, in strips (see soft_strips_forward), on two threads where
            // the pairs are too few to spread (`shared`: run one task at a time).
            prepare_soft_strips(x + b * a.x_batch_stride, y + b * a.y_batch_stride, D, pb,
                                strips);
            values[b] = static_cast<T>(soft_strips_forward<kMetric, strips_sweep_scaled<T>()>(
                strips, D, pb, a.gamma, 1, pb.n, nullptr, nullptr, 0, 0,
                static_cast<float*>(nullptr), strips_pair_workers(shared)));
            return;
          }
          values[b] = static_cast<T>(xy_forward_pair<kMetric, kD1, true, T, A, double>(
              x + b * a.x_batch_stride, y + b * a.y_batch_stride, D, pb, gamma, buf.data(),
              buf.data() + M + 1, Rb,
              M, N));
        };
        for (int64_t t; (t = next_task()) >= 0;) {
          if (lg.single(t)) {
            single(lg.single_pair(t), lg.slot(t));
            continue;
          }
          const LaneTask task = lane_task(lg, t);
          const LaneShape<VA> shape(task.lanes, a.x_lengths, a.y_lengths, a.band);
          const int64_t n = shape.pb.n, m = shape.pb.m;
          gather_lanes(x, y, a.x_batch_stride, a.y_batch_stride, D, task.lanes, shape, xt, yt);
          alignas(64) double out[LA];
          // Kept interleaved at the task's slot (see the file comment), row by row.
          double* group = R_soft != nullptr ? R_soft + lg.slot(t) * N * M : nullptr;
          // The common small feature counts compiled with D fixed (see contract_column).
          const VA value = with_fixed_dim(D, [&](auto dim_c) {
            return xy_soft_forward_sweep<kMetric, std::is_same_v<T, float>,
                                         decltype(dim_c)::value>(xt.data(), yt.data(), D, shape,
                                                                 a.gamma, group, work);
          });
          value.store(out);
          if (group != nullptr) {
            // The rest of the block (pairs shorter than N x M) gets +inf: the kept state
            // holds no allocator garbage.
            std::fill(group + n * m * LA, group + LA * N * M,
                      std::numeric_limits<double>::infinity());
          }
          for (int64_t k = 0; k < LA; ++k) values[task.lanes[k]] = static_cast<T>(out[k]);
        }
      });
      return;
    }
    // Hard DTW, computed in T. Value-only: groups of L pairs of similar lengths run in the
    // lanes of one vector (on the grid of their longest lengths, see LaneShape and
    // LaneGroups), or pair by pair when their band masks would not be exact (see
    // LaneShape::exact_offsets); the other pairs run one by one. Keeping R: pair by pair,
    // R kept by pair (no groups, the batch order). A pair run alone sweeps in strips of L
    // rows (forward_hard_strips) unless it is small.
    using V = at::vec::Vectorized<T>;
    constexpr int64_t L = V::size();
    const LaneGroups lg(L, B, (R == nullptr && L > 1) ? B / L : 0, a.x_lengths, a.y_lengths);
    const int64_t grain = std::max<int64_t>(1, 32768 / cells);
    for_each_task(lg.tasks(), grain, [&](auto next_task) {
      std::vector<T> buf(2 * (M + 1));
      std::vector<V> vbuf;
      std::vector<T> xt, yt;
      StripBuffers<T> strips;
      auto single = [&](int64_t b) {
        const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
        T* Rb = R != nullptr ? R + b * N * M : nullptr;
        if (L > 1 && pb.n * pb.m >= kStripsMinCells && strips_exact<T>(pb)) {
          values[b] = forward_hard_strips<kMetric, kD1, T, T>(
              x + b * a.x_batch_stride, y + b * a.y_batch_stride, D, pb, strips, Rb, M, N);
          return;
        }
        values[b] = xy_forward_pair<kMetric, kD1, false, T, T, T>(
            x + b * a.x_batch_stride, y + b * a.y_batch_stride, D, pb, T(1), buf.data(),
            buf.data() + M + 1, Rb, M,
            N);
      };
      for (int64_t t; (t = next_task()) >= 0;) {
        if (lg.single(t)) {
          single(lg.single_pair(t));
          continue;
        }
        int64_t pairs[L];
        for (int64_t k = 0; k < L; ++k) pairs[k] = lg.order[t * L + k];
        const LaneShape<V> shape(pairs, a.x_lengths, a.y_lengths, a.band);
        if (!shape.exact_offsets()) {
          for (int64_t k = 0; k < L; ++k) single(pairs[k]);
          continue;
        }
        gather_lanes(x, y, a.x_batch_stride, a.y_batch_stride, D, pairs, shape, xt, yt);
        const int64_t m = shape.pb.m;
        vbuf.resize(2 * (m + 1));
        alignas(64) T out[L];
        if (shape.masked) {
          xy_forward_hard_lanes<kMetric, true, T>(xt.data(), yt.data(), D, shape, vbuf.data(),
                                                  vbuf.data() + m + 1, out);
        } else {
          xy_forward_hard_lanes<kMetric, false, T>(xt.data(), yt.data(), D, shape, vbuf.data(),
                                                   vbuf.data() + m + 1, out);
        }
        for (int64_t k = 0; k < L; ++k) values[pairs[k]] = out[k];
      }
    });
  });
}

// d cost(x_i, y_j) / d x_i into gd (D values); d / d y_j = -gd.
template <int kMetric, typename A, typename T>
inline void local_cost_grad(const T* xi, const T* yj, int64_t D, A* gd) {
  if constexpr (kMetric == kEuclidean) {
    A s = A(0);
    for (int64_t d = 0; d < D; ++d) {
      const A t = static_cast<A>(xi[d]) - static_cast<A>(yj[d]);
      gd[d] = t;
      s += t * t;
    }
    if (s > A(0)) {
      const A inv = A(1) / std::sqrt(s);
      for (int64_t d = 0; d < D; ++d) gd[d] *= inv;
    } else {
      for (int64_t d = 0; d < D; ++d) gd[d] = A(0);
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      const A t = static_cast<A>(xi[d]) - static_cast<A>(yj[d]);
      if constexpr (kMetric == kL1) gd[d] = A((t > A(0)) - (t < A(0)));
      else gd[d] = A(2) * t;
    }
  }
}

template <typename T>
void xy_backward_impl(const DtwXYBackwardArgs& a) {
  using A = Acc<T>;
  const T* grad = static_cast<const T*>(a.grad);
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  const T* R = static_cast<const T*>(a.R);                  // hard: the dtype
  const double* R_soft = static_cast<const double*>(a.R);  // soft: fp64 (file comment)
  T* gx_out = static_cast<T*>(a.grad_x);
  T* gy_out = static_cast<T*>(a.grad_y);
  const int64_t B = a.B, N = a.N, M = a.M, D = a.D;
  const A gamma = static_cast<A>(a.gamma);
  const int64_t cells = std::max<int64_t>(1, N * M * std::max<int64_t>(1, D));
  const int64_t grain = std::max<int64_t>(1, 32768 / cells);
  dispatch_metric_d(a.metric, D, [&](auto metric_c, auto d1_c) {
    constexpr int kMetric = decltype(metric_c)::value;
    if (a.soft && a.checkpoint_rows > 0) {
      if (soft_strips_for<T>(a.B, a.checkpoint_rows)) xy_soft_backward_strips<T, kMetric>(a);
      else xy_soft_backward_checkpointed<T, kMetric>(a);
      return;
    }
    constexpr int64_t LA = VA::size();
    const LaneGroups lg(LA, B, (a.soft && LA > 1) ? B / LA : 0, a.x_lengths, a.y_lengths);
    // The passes over the whole kept grid on several threads (RowRing) only for D >= 16.
    // A pass (1 or 2 rows) hands its boundary row to another core: ~2 x 513 lines of 64
    // bytes per pass at 512 columns, by the timings ~17 us more per pass on the EPYC,
    // against ~9 us of work per pass at D = 4, where sharing made the backward slower
    // (8 pairs of 512^2: 2.0-2.8 -> 3.3 ms on 2 threads; 256^2: 0.55 -> 1.0); at D = 16
    // the work per pass is larger (512^2: 7.1-10.7 -> 4.8-6.4 ms; 256^2: 2.0-2.3 -> 1.6),
    // at D = 32 too
    // (12.5-15.5 -> 8.6-11.8 ms); D = 8 won at 512^2 (5.5-6.1 -> 4.3) but lost at 256^2
    // (0.8 -> 1.2). A checkpointed segment's passes share well (they follow a recompute).
    // Sharing at small D needs passes of several rows per hand-over (not done).
    constexpr int64_t kSharedGridPassesMinDim = 16;
    const int64_t row_workers = a.soft && D >= kSharedGridPassesMinDim
                                    ? row_workers_for<T>(lg.tasks(), N, M) : 1;
    for_each_task(lg.tasks(), row_workers > 1 ? lg.tasks() : grain, [&](auto next_task) {
      const FlushSubnormalsScope flush_subnormals;  // see the class comment
      std::vector<A> e_scratch, gx, gy, gd(std::max<int64_t>(1, D));
      std::vector<double> xt, yt;
      std::vector<VA> gxl, gyl;
      BackWork back_work;
      back_work.workers = row_workers;
      auto single = [&](int64_t b, int64_t slot) {  // soft: kept at its task's slot
        const PairBand pb(a.x_lengths[b], a.y_lengths[b], a.band);
        const int64_t n = pb.n, m = pb.m;
        const T* xb = x + b * a.x_batch_stride;
        const T* yb = y + b * a.y_batch_stride;
        const T* Rb = R + b * N * M;  // hard only
        gx.assign(n * D, A(0));
        gy.assign(m * D, A(0));
        // Adds e * d cost(i, j) (1-based) to gx[i], gy[j].
        auto push = [&](int64_t i, int64_t j, A e) {
          const T* xi = xb + (i - 1) * D;
          const T* yj = yb + (j - 1) * D;
          local_cost_grad<kMetric, A>(xi, yj, D, gd.data());
          A* gxi = gx.data() + (i - 1) * D;
          A* gyj = gy.data() + (j - 1) * D;
          for (int64_t d = 0; d < D; ++d) {
            gxi[d] += e * gd[d];
            gyj[d] -= e * gd[d];
          }
        };
        const A g = static_cast<A>(grad[b]);
        if (!a.soft) {
          int64_t i = n, j = m;
          while (true) {
            push(i, j, g);
            if (i == 1 && j == 1) break;
            if (i == 1) {
              --j;
            } else if (j == 1) {
              --i;
            } else {
              const T dd = r_at(Rb, M, pb, i - 1, j - 1);
              const T uu = r_at(Rb, M, pb, i - 1, j);
              const T ll = r_at(Rb, M, pb, i, j - 1);
              if (dd <= uu && dd <= ll) {
                --i;
                --j;
              } else if (uu <= ll) {
                --i;
              } else {
                --j;
              }
            }
          }
        } else {
          const A* Ra = R_soft + slot * N * M;
          const int64_t ldr = M;
          e_scratch.assign(n * ldr, A(0));
          soft_backward_pair<A>(Ra, ldr, pb, gamma, g, e_scratch.data());
          for (int64_t i = 1; i <= n; ++i) {
            const int64_t jf = pb.first(i), jl = pb.last(i);
            const A* erow = e_scratch.data() + (i - 1) * ldr;
            for (int64_t j = jf; j <= jl; ++j) {
              const A e = erow[j - 1];
              if (e != A(0)) push(i, j, e);
            }
          }
        }
        write_pair_gradient(gx.data(), A(1), n, N, D, gx_out, b);
        write_pair_gradient(gy.data(), A(1), m, M, D, gy_out, b);
      };
      for (int64_t t; (t = next_task()) >= 0;) {
        if (lg.single(t)) {
          single(lg.single_pair(t), lg.slot(t));
          continue;
        }
        const LaneTask task = lane_task(lg, t);
        const LaneShape<VA> shape(task.lanes, a.x_lengths, a.y_lengths, a.band);
        const int64_t n = shape.pb.n, m = shape.pb.m;
        gather_lanes(x, y, a.x_batch_stride, a.y_batch_stride, D, task.lanes, shape, xt, yt);
        alignas(64) double gv[LA];
        for (int64_t k = 0; k < LA; ++k) gv[k] = static_cast<double>(grad[task.lanes[k]]);
        gxl.resize(n * D);
        gyl.resize(m * D);
        // The common small feature counts compiled with D fixed (see contract_column).
        with_fixed_dim(D, [&](auto dim_c) {
          xy_soft_backward_sweep<kMetric, std::is_same_v<T, float>, decltype(dim_c)::value>(
              xt.data(), yt.data(), D, shape, a.gamma, VA::loadu(gv),
              R_soft + lg.slot(t) * N * M, gxl.data(), gyl.data(), back_work);
        });
        scatter_task_gradients(task, shape, gxl.data(), gyl.data(), N, M, D, gx_out, gy_out);
      }
    });
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

void dtw_xy_forward(const DtwXYForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.dtype, "dtw_xy_forward",
                             [&] { xy_forward_impl<scalar_t>(args); });
}

void dtw_xy_backward(const DtwXYBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES(args.dtype, "dtw_xy_backward",
                             [&] { xy_backward_impl<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace ether_kernels::cpu
