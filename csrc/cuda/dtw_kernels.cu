// Batched DTW / soft-DTW on the GPU: the anti-diagonal wavefront with register tiling.
// Semantics: shared/specs/dtw.md; API and precision: kernels_cuda.h.
//
// One thread block per pair; T threads (a multiple of 32), each owning K consecutive rows.
// The rows are swept in stripes of T * K rows, top to bottom, and a stripe is swept column
// by column with a skew: at step s thread t computes column j = j_begin + s - t for its K
// rows, top to bottom. Cell (i, j) needs
//   R[i-1][j-1], R[i-1][j]  (the row above: this thread's previous row, or for its first row
//                            the last row of thread t - 1, computed one step earlier), and
//   R[i][j-1]               (the same row one step earlier: a register per row).
// So each step one value moves down the threads: by a warp shuffle inside a warp, and through
// shared memory (double-buffered, one __syncthreads per step) from lane 31 of a warp to lane
// 0 of the next. The stripe's last row is written to a boundary buffer that the next stripe's
// first thread reads, so N and M have no cap (memory per pair: two rows). Only the columns a
// stripe's band can reach are swept, so a banded pair evaluates ~ n * (band width) local
// costs (the steps per stripe are still ~ T + band width: a barrier each).
//
// Backward (soft): Cuturi & Blondel's Algorithm 2 as a "pull" along the mirrored wavefront
// (stripes bottom to top, columns right to left, the bottom thread leading):
//   E[i][j] = sum over successors s in {(i+1, j), (i, j+1), (i+1, j+1)} of
//             E[s] * exp((S[s] - R[i][j]) / gamma),     S[s] = R[s] - cost[s]
// where S[s] is the soft-min of s's predecessors, so the weight is exactly the forward's
// soft-argmin weight exp(-(R[i][j] - mu) / gamma) / sum_k exp(-(a_k - mu) / gamma); the
// exponent is <= 0 by construction and is clamped to <= 0 against rounding. Each cell
// computes its own cost once and passes (E, S) to its predecessors the way the forward
// passes R. E of the end cell is grad[b]; unreachable cells (R = +inf) get E = 0.
// Backward (hard): one thread per pair backtracks the optimal path through R.
//
// No host synchronisation anywhere; every kernel reads the lengths on the device.
#include "kernels_cuda.h"

#include <cmath>
#include <type_traits>

namespace ether_kernels::cuda {
namespace {

using detail::ceil_div;
using detail::kFullMask;
using detail::kWarpSize;
using detail::max64;
using detail::min64;

constexpr int kMaxThreads = 512;  // threads per pair (16 warps); __launch_bounds__ below
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int kRowsSoft = 4;      // K: rows per thread (soft forward and backward); 2 on request
constexpr int kRowsHard = 16;     // K for hard DTW: a cheaper cell, so more cells per barrier
constexpr int64_t kMaxPairs = 2147483647;  // one block per pair: the grid's x limit
// Boundary rows of fp64 per pair in the workspace: the forward's R (or the backward's S) of
// the last (first) row of a stripe, double-buffered, then the fused backward's E likewise.
constexpr int kEdgeRows = 4;

template <typename T> __device__ __forceinline__ T infinity();
template <> __device__ __forceinline__ float infinity<float>() {
  return __int_as_float(0x7f800000);
}
template <> __device__ __forceinline__ double infinity<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

// exp for the R-based backward (fp64 only: fp32 keeps the weights). exp2 / log2 in the
// element type for soft_cell: one special-function instruction each for fp32 (the scaling
// by log2(e) or ln(2) that __expf / __logf would add is folded into its constants).
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return exp2f(x);
#endif
}
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }
__device__ __forceinline__ float fast_log2(float x) { return __log2f(x); }
__device__ __forceinline__ double fast_log2(double x) { return log2(x); }

// Pair b's lengths and band, as 32-bit ints (the op checks N, M < 2^30): index arithmetic
// inside a pair is 32-bit, which halves the integer instructions of a cell. A pair with
// lengths out of range is marked invalid (NaN value, no gradient), never read out of bounds.
struct PairShape {
  int n, m, lo, hi;
  bool ok;

  __device__ PairShape(const DtwArgs& a, int64_t b) {
    const int64_t n64 = a.x_lengths[b], m64 = a.y_lengths[b];
    ok = n64 >= 1 && n64 <= a.N && m64 >= 1 && m64 <= a.M;
    n = ok ? static_cast<int>(n64) : 1;
    m = ok ? static_cast<int>(m64) : 1;
    const int radius = static_cast<int>(a.band < 0 ? a.N + a.M : min64(a.band, a.N + a.M));
    lo = -radius + min(0, m - n);
    hi = radius + max(0, m - n);
  }
  // Cell (i, j) with 0 <= i < n and 0 <= j < m (the caller's loops guarantee it) is allowed.
  __device__ bool in_band(int i, int j) const { return j - i >= lo && j - i <= hi; }
  __device__ bool allowed(int i, int j) const {
    return i >= 0 && i < n && j >= 0 && j < m && in_band(i, j);
  }
};

// The local cost of cell (i, j) of one pair, from the series, for the K rows a thread owns.
// kSq: the squared Euclidean cost compiled as such (the default metric: no branch and no
// square root per cell); otherwise `metric` is read at run time.
// kD > 0: D == kD (1) or D <= kD: the thread's K rows of x are loaded into registers once
// per stripe (rows(), no reloads in the sweep: neighbouring threads' rows are K * D
// elements apart, so reloading them every step costs many cache lines per load) and the
// features of column j once per step (column()). kD == 0: any D, both read from memory.
template <typename T, int kD, int K, bool kSq>
struct SeriesCost {
  const T* __restrict__ x;  // this pair's (n, D) series
  const T* __restrict__ y;  // this pair's (m, D) series
  int64_t D;
  int metric;
  static constexpr int kRegs = kD > 0 ? kD : 1;
  static constexpr int kRows = K;
  T xr[K][kRegs];
  T yj[kRegs];
  const T* ycol = nullptr;
  int last_row = 0;

  __device__ void rows(int first_row, int n) {
    last_row = n - 1;
    if constexpr (kD > 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int d = 0; d < kD; ++d) {
          xr[k][d] = (first_row + k < n && (kD == 1 || d < D))
                         ? __ldg(x + int64_t(first_row + k) * D + d) : T(0);
        }
      }
    }
  }

  __device__ void column(int j) {
    ycol = y + int64_t(j) * D;
    if constexpr (kD > 0) {
#pragma unroll
      for (int d = 0; d < kD; ++d) yj[d] = (kD == 1 || d < D) ? __ldg(ycol + d) : T(0);
    }
  }

  // Row k of the thread (global row i; rows past the pair's end are computed and discarded
  // by the callers: zeros in registers, row n - 1 from memory).
  __device__ T at(int k, int i) const {
    T total = 0;
    if constexpr (kD > 0) {
#pragma unroll
      for (int d = 0; d < kD; ++d) {
        if (kD == 1 || d < D) total += term(xr[k][d] - yj[d]);
      }
    } else {
      const T* xrow = x + int64_t(min(i, last_row)) * D;
      for (int64_t d = 0; d < D; ++d) total += term(__ldg(xrow + d) - __ldg(ycol + d));
    }
    if constexpr (kSq) return total;
    return metric == 1 ? sqrt(total) : total;
  }

  __device__ T term(T diff) const {
    if constexpr (kSq) return diff * diff;
    return metric == 2 ? fabs(diff) : diff * diff;
  }
};

// The local cost read from a precomputed (N, M) matrix of one pair.
template <typename T, int K>
struct MatrixCost {
  static constexpr int kRows = K;
  const T* __restrict__ cost;
  int64_t M;
  const T* col = nullptr;
  int last_row = 0;
  __device__ void rows(int, int n) { last_row = n - 1; }
  __device__ void column(int j) { col = cost + j; }
  // Rows past the pair's end are computed and discarded by the callers: read row n - 1.
  __device__ T at(int, int i) const { return __ldg(col + int64_t(min(i, last_row)) * M); }
};

template <typename T, int kD, int K, bool kSq>
__device__ SeriesCost<T, kD, K, kSq> make_cost(const DtwArgs& a, int64_t b,
                                              SeriesCost<T, kD, K, kSq>*) {
  SeriesCost<T, kD, K, kSq> c;
  c.x = static_cast<const T*>(a.x) + b * a.x_batch_stride;
  c.y = static_cast<const T*>(a.y) + b * a.y_batch_stride;
  c.D = a.D;
  c.metric = static_cast<int>(a.metric);
  return c;
}

template <typename T, int K>
__device__ MatrixCost<T, K> make_cost(const DtwArgs& a, int64_t b, MatrixCost<T, K>*) {
  MatrixCost<T, K> c;
  c.cost = static_cast<const T*>(a.cost) + b * a.N * a.M;
  c.M = a.M;
  return c;
}

// The stripe of rows [i0, i0 + T K) of a pair: its last row, the index of the last thread
// owning a row below n, and the columns its allowed cells can reach.
struct Stripe {
  int i0, i_last, j_begin, j_end, t_last;
  __device__ Stripe(const PairShape& p, int index, int rows_per_stripe, int K) {
    i0 = index * rows_per_stripe;
    i_last = min(p.n, i0 + rows_per_stripe) - 1;
    t_last = (i_last - i0) / K;
    j_begin = max(0, i0 + p.lo);
    j_end = min(p.m - 1, i_last + p.hi);
  }
};

// ---------------------------------------------------------------------- kept R layout
// R is kept "step-major" per stripe, so that the threads of one step (cells (i, j) with
// j + t fixed) touch consecutive addresses: cell (i, j), i = p T K + t K + k, lives at
//   p * stripe_size + ((j + t) * K + k) * T + t,      stripe_size = (M + T - 1) * K * T.
// A row-major R would give every thread of a warp its own cache line per access.
struct KeptLayout {
  int64_t T, K, stripe_size;
  __host__ __device__ KeptLayout(int64_t threads, int64_t rows, int64_t M)
      : T(threads), K(rows), stripe_size((M + threads - 1) * rows * threads) {}
  // The address of (stripe p, thread t, column j); row k of the thread is k * T further.
  __host__ __device__ int64_t at(int64_t p, int64_t t, int64_t j) const {
    return p * stripe_size + (j + t) * K * T + t;
  }
  __host__ __device__ int64_t of_cell(int64_t i, int64_t j) const {
    const int64_t p = i / (T * K), r = i - p * T * K, t = r / K, k = r - t * K;
    return at(p, t, j) + k * T;
  }
};

// ------------------------------------------------------------------------------ forward

// R value type: fp64 for soft-DTW (see kernels_cuda.h), the element type for hard DTW.
template <typename T, bool kSoft> using value_t = std::conditional_t<kSoft, double, T>;

// min(a, b) that returns NaN when either is NaN (fmin returns the other operand): a NaN
// cost makes its pair's value NaN, as in the reference (the NaN convention: see the
// module docstring of ether_kernels/dynamic_time_warping.py).
// soft_cell needs none: its exponentials see a NaN operand through its differences.
template <typename V>
__device__ __forceinline__ V min_propagating_nan(V a, V b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<V, float>) {  // one instruction, as fmin
    float r;
    asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
  }
#endif
  return (a < b || a != a) ? a : b;
}

// fp32 soft-DTW keeps, instead of R, each cell's soft-argmin weights: the share of its
// soft-min that came from the cell above and from the cell to the left (the diagonal's is
// 1 minus both), two fp32 in the 8 bytes an fp64 R would take (kernels_cuda.h says why).
// A cell no predecessor reaches (R = +inf: only with infinite or NaN costs) is marked by
// up = -1 (kUnreachable): the backward gives it no alignment, as the R-based backward does.
struct alignas(8) WeightPair {
  float up, left;
};
constexpr float kUnreachable = -1.0f;

// One soft-DTW cell, R[i][j] = cost + softmin_gamma(diag, up, left) with
// softmin_gamma(a, b, c) = -gamma log sum_k exp(-a_k / gamma), and with kWeights the
// soft-argmin weights exp(-(a_k - softmin) / gamma) of up and left. The soft-min is split
// so that most of it stays off the dependency chain through `up` (the cell the same thread
// has just computed), and so that the exponential of the minimum, exactly 1, is never
// evaluated:
//   m2 = min(diag, left),  q = 2^(-|diag - left| log2(e) / gamma)      (known a step early)
//   d  = up - m2,          t = 2^(-|d| log2(e) / gamma)
//   d >= 0: base = m2, sum = 1 + q + t       (the minimum is diag or left)
//   d <  0: base = up, sum = (1 + q) t + 1    (the minimum is up: the others scale by t)
//   R = base + (cost - gamma ln(2) log2(sum))
// Two exponentials, one logarithm and three fp64 <-> fp32 conversions a cell (three, one
// and five before: the H100 runs special functions and fp64 conversions 16 a clock per SM,
// against 128 fp32 operations); the
// differences in fp64 as before, cost - gamma ln(sum) in T (|.| <= cost + gamma ln 3, so
// its rounding is that of the fp32 cost itself). Equal operands give a zero difference, so
// +inf == +inf gives 0, not inf - inf = NaN: all three +inf give base = +inf, R = +inf
// (unreachable). A NaN operand makes its difference, hence the sum and R, NaN (min
// instructions drop NaN; the exponentials see it). The weights take one fast reciprocal
// (2 ulp; an IEEE division would cost the forward a third of its time).
// inv_gamma_log2e = log2(e) / gamma, gamma_ln2 = gamma ln(2). Measured on an H100
// (2026-11-27, against the three-exponential cell it replaced, same run): the fp32 soft
// forward 1.24x-1.38x faster (1.02x at 128 x 2048^2), forward+backward 1.08x-1.17x.
template <typename T, bool kWeights>
__device__ __forceinline__ double soft_cell(double diag, double up, double left, T cost,
                                            double inv_gamma_log2e, T gamma_ln2,
                                            WeightPair& weights) {
  const double m2 = fmin(diag, left);
  const double gap = diag == left ? 0.0 : fabs(diag - left);
  const T q = fast_exp2(static_cast<T>(-gap * inv_gamma_log2e));
  const double d = up == m2 ? 0.0 : up - m2;
  const T t = fast_exp2(static_cast<T>(-fabs(d) * inv_gamma_log2e));
  const bool up_is_min = d < 0.0;
  const T scale = up_is_min ? t : T(1);  // e of the smaller of diag and left
  const T e_up = up_is_min ? T(1) : t;
  const T sum = (T(1) + q) * scale + e_up;  // in [1, 3] unless NaN
  const double base = up_is_min ? up : m2;
  if constexpr (kWeights) {
    const bool reached = base < infinity<double>() && sum > T(0);  // false for +inf and NaN
    const T inv_sum = __fdividef(1.0f, sum);
    const T e_left = diag <= left ? scale * q : scale;
    weights.up = reached ? e_up * inv_sum : kUnreachable;
    weights.left = reached ? e_left * inv_sum : 0.0f;
  }
  return base + static_cast<double>(cost - gamma_ln2 * fast_log2(sum));
}

// kKeep: R_out is non-null and every element of it is written (the value-only forward is a
// separate instantiation, free of the keeping code: registers matter in the sweep).
template <typename T, bool kSoft, int K, typename Cost, bool kKeep>
__global__ void __launch_bounds__(kMaxThreads)
    dtw_forward_kernel(const DtwArgs args, T* __restrict__ values,
                       value_t<T, kSoft>* __restrict__ R_out) {
  using V = value_t<T, kSoft>;
  // What the kept state holds per cell: R, or for fp32 soft-DTW its soft-argmin weights.
  constexpr bool kKeepWeights = kKeep && kSoft && std::is_same_v<T, float>;
  __shared__ V handoff[2][kMaxWarps];  // lane 31 of warp w -> lane 0 of warp w + 1
  const int64_t b = blockIdx.x;
  const PairShape pair(args, b);
  // The kept R: every element is written (the cells computed, 0 elsewhere: the padding of
  // the step-major layout, rows and stripes past the pair's lengths), so the caller needs no
  // zero fill (a whole extra pass over R) for its content to be deterministic.
  V* R = kKeep ? R_out + b * args.kept_per_pair : nullptr;
  auto zero_range = [&](V* begin, int64_t count) {
    for (int64_t e = threadIdx.x; e < count; e += blockDim.x) begin[e] = V(0);
  };
  if (!pair.ok) {  // block-uniform: the whole block leaves together
    if (threadIdx.x == 0) values[b] = static_cast<T>(NAN);
    if (kKeep) zero_range(R, args.kept_per_pair);
    return;
  }
  const int t = threadIdx.x, lane = t % kWarpSize, warp = t / kWarpSize;
  static_assert(Cost::kRows == K, "the cost source caches the thread's K rows");
  const int rows_per_stripe = blockDim.x * K;
  const int64_t M = args.M;
  const double inv_gamma_log2e = 1.4426950408889634 / args.gamma;  // soft_cell's constants
  const T gamma_ln2 = static_cast<T>(args.gamma * 0.6931471805599453);
  Cost cost = make_cost(args, b, static_cast<Cost*>(nullptr));
  const KeptLayout layout(blockDim.x, K, M);
  const int64_t slots_per_step = int64_t(K) * blockDim.x;  // the (k, t) slots of one step
  // Two boundary rows (no workspace when the pair fits in one stripe: never touched then).
  V* edge = args.workspace != nullptr
                ? reinterpret_cast<V*>(static_cast<double*>(args.workspace) + b * kEdgeRows * M)
                : nullptr;
  const V inf = infinity<V>();

  const int stripes = (pair.n + rows_per_stripe - 1) / rows_per_stripe;
  for (int p = 0; p < stripes; ++p) {
    const Stripe stripe(pair, p, rows_per_stripe, K);
    const V* edge_above = edge + ((p + 1) % 2) * M;  // the previous stripe's last row
    V* edge_below = edge + (p % 2) * M;              // this stripe's last row
    const int first_row = stripe.i0 + t * K;
    const bool owns_rows = t <= stripe.t_last;
    const bool owns_last_row = first_row + K - 1 == stripe.i0 + rows_per_stripe - 1 &&
                               p + 1 < stripes;
    cost.rows(first_row, pair.n);
    const int steps = stripe.j_end - stripe.j_begin + 1 + stripe.t_last;
    if (kKeep) {
      // Step s writes every slot of layout column q = j_begin + s (below); the columns of
      // the layout the sweep never reaches are zeroed here.
      V* R_stripe = R + p * layout.stripe_size;
      const int64_t swept_end = int64_t(stripe.j_begin + steps) * slots_per_step;
      zero_range(R_stripe, int64_t(stripe.j_begin) * slots_per_step);
      zero_range(R_stripe + swept_end, layout.stripe_size - swept_end);
    }

    V left[K];  // R[i_k][j - 1]: +inf left of the stripe's first column (outside the band)
#pragma unroll
    for (int k = 0; k < K; ++k) left[k] = inf;
    // R[first_row - 1][j - 1] for the first column: R[-1][-1] = 0 for the first stripe;
    // the previous stripe's boundary row for thread 0; outside the band for the others.
    V above_left = inf;
    if (t == 0) {
      if (stripe.i0 == 0) {
        above_left = stripe.j_begin == 0 ? V(0) : inf;
      } else if (pair.allowed(stripe.i0 - 1, stripe.j_begin - 1)) {
        above_left = edge_above[stripe.j_begin - 1];
      }
    }
    V out = inf;  // R of this thread's last row at its previous column (passed down)
    for (int s = 0; s < steps; ++s) {
      // R[first_row - 1][j]: thread t - 1's `out` from the previous step.
      V above = __shfl_up_sync(kFullMask, out, 1);
      if (lane == 0 && warp > 0) above = s > 0 ? handoff[(s + 1) % 2][warp - 1] : inf;
      const int j = stripe.j_begin + s - t;
      if (t == 0) {
        above = stripe.i0 > 0 && pair.allowed(stripe.i0 - 1, j) ? edge_above[j] : inf;
      }
      if (owns_rows && j >= stripe.j_begin && j <= stripe.j_end) {
        cost.column(j);
        V* R_here = kKeep ? R + layout.at(p, t, j) : nullptr;
        // Branch-free cells: every cell is computed and an invalid one (outside the band, or
        // a row past the pair's end: only in the last thread of the last stripe) is replaced
        // by +inf; such rows only feed rows below them, which are invalid as well.
        const int offset = j - first_row;       // j - i for k = 0
        const int valid_rows = pair.n - first_row;
        const int end_row = j == pair.m - 1 ? pair.n - 1 - first_row : -1;  // k of (n-1, m-1)
        V up = above, diag = above_left;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const bool ok = k < valid_rows && offset - k >= pair.lo && offset - k <= pair.hi;
          V r;
          WeightPair weights{0.0f, 0.0f};
          if constexpr (kSoft) {
            r = soft_cell<T, kKeepWeights>(diag, up, left[k], cost.at(k, first_row + k),
                                           inv_gamma_log2e, gamma_ln2, weights);
          } else {  // up (the row above) arrives last: min it in last
            r = cost.at(k, first_row + k) +
                min_propagating_nan(min_propagating_nan(diag, left[k]), up);
          }
          r = ok ? r : inf;
          if constexpr (kKeep) {
            if constexpr (kKeepWeights) {  // no weight out of an invalid cell
              reinterpret_cast<WeightPair*>(R_here)[k * int(blockDim.x)] =
                  ok ? weights : WeightPair{0.0f, 0.0f};
            } else {
              R_here[k * int(blockDim.x)] = k < valid_rows ? r : V(0);
            }
          }
          if (k == end_row) values[b] = static_cast<T>(r);
          diag = left[k];
          up = r;
          left[k] = r;
        }
        out = up;
        if (owns_last_row) edge_below[j] = out;
      } else if (kKeep) {  // no cell of this thread at this step: its slots are 0
        V* R_slot = R + layout.at(p, t, j);  // column q = j + t = j_begin + s >= 0
#pragma unroll
        for (int k = 0; k < K; ++k) R_slot[k * int(blockDim.x)] = V(0);
      }
      above_left = above;
      if (lane == kWarpSize - 1) handoff[s % 2][warp] = out;
      __syncthreads();
    }
  }
  if (kKeep) {  // the layout's stripes below the pair's last row
    const int64_t swept = int64_t(stripes) * layout.stripe_size;
    zero_range(R + swept, args.kept_per_pair - swept);
  }
}

// ------------------------------------------------- fused gradient (both soft backwards)

// Column j's share of grad_y from this thread's rows (column_grad, kG features). Column j is
// visited by threads t_last, t_last - 1, ..., 0 at consecutive steps (thread t at step
// t_last - t + j_end - j): the first starts the column's ring slot, each adds its rows,
// thread 0 adds the stripe's sum to grad_y (gy: the pair's (M, D) rows; the stripes run one
// after another). The in-flight columns at one step are distinct and span at most
// blockDim <= kMaxThreads consecutive columns, so their slots (j mod kMaxThreads) differ; a
// slot is reused kMaxThreads columns later, after thread 0 has read it. A fixed order, so
// the sums are deterministic without atomics.
template <typename T, int kG>
__device__ __forceinline__ void add_column_grad(T (*column_ring)[kG], int j, int t, int t_last,
                                                const T (&column_grad)[kG], T* gy, int D) {
  T* slot = column_ring[j % kMaxThreads];
#pragma unroll
  for (int d = 0; d < kG; ++d) {
    const T sum = (t == t_last ? T(0) : slot[d]) + column_grad[d];
    if (t > 0) {
      slot[d] = sum;
    } else if (d < D) {
      gy[int64_t(j) * D + d] += sum;
    }
  }
}

// The thread's rows' grad_x at the end of a stripe: each row belongs to one thread of one
// stripe, so plain stores (gx: the pair's (N, D) rows).
template <typename T, int K, int kG>
__device__ __forceinline__ void store_row_grad(const T (&row_grad)[K][kG], int first_row,
                                               int valid_rows, T* gx, int D) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k >= valid_rows) continue;
#pragma unroll
    for (int d = 0; d < kG; ++d) {
      if (d < D) gx[int64_t(first_row + k) * D + d] = row_grad[k][d];
    }
  }
}

// ----------------------------------------------------------------------- backward (soft)

// kFusedD = 0: E is written to E_out (B, N, M). kFusedD = D' > 0 (the squared Euclidean
// series cost with D <= D' features in registers): E is contracted on the fly into
// grad_x / grad_y (kernels_cuda.h, soft_dtw_backward_series) and never stored; the stripes'
// boundary rows of E go through the workspace like those of S.
template <typename T, int K, typename Cost, int kFusedD>
__global__ void __launch_bounds__(kMaxThreads)
    soft_dtw_backward_kernel(const DtwArgs args, const T* __restrict__ grad,
                             const double* __restrict__ R_in, T* __restrict__ E_out,
                             T* __restrict__ grad_x, T* __restrict__ grad_y) {
  constexpr bool kFused = kFusedD > 0;
  constexpr int kG = kFused ? kFusedD : 1;  // gradient features kept per row / column
  __shared__ T handoff_E[2][kMaxWarps];  // lane 0 of warp w -> lane 31 of warp w - 1
  __shared__ double handoff_S[2][kMaxWarps];
  // Fused: the partial grad_y of the columns in flight (add_column_grad)
  __shared__ T column_ring[kFused ? kMaxThreads : 1][kG];
  const int64_t b = blockIdx.x;
  const PairShape pair(args, b);
  if (!pair.ok) return;
  const int t = threadIdx.x, lane = t % kWarpSize, warp = t / kWarpSize;
  static_assert(Cost::kRows == K, "the cost source caches the thread's K rows");
  const int warps = blockDim.x / kWarpSize;
  const int rows_per_stripe = blockDim.x * K;
  const int64_t N = args.N, M = args.M;
  const double inv_gamma = 1.0 / args.gamma;
  Cost cost = make_cost(args, b, static_cast<Cost*>(nullptr));
  const KeptLayout layout(blockDim.x, K, M);
  const double* R = R_in + b * args.kept_per_pair;
  T* E = kFused ? nullptr : E_out + b * N * M;
  T* gx = kFused ? grad_x + b * N * args.D : nullptr;
  T* gy = kFused ? grad_y + b * M * args.D : nullptr;
  const int D = static_cast<int>(args.D);
  double* edge = args.workspace != nullptr  // S (and E when fused) of the boundary rows
                     ? static_cast<double*>(args.workspace) + b * kEdgeRows * M
                     : nullptr;
  const T seed = grad[b];
  const double inf = infinity<double>();

  // exp((S_succ - R_ij) / gamma), the exponent clamped to <= 0 (it is <= 0 in exact math).
  auto weight = [&](double S_succ, double R_ij) -> T {
    return fast_exp(static_cast<T>(fmin(0.0, (S_succ - R_ij) * inv_gamma)));
  };

  const int stripes = (pair.n + rows_per_stripe - 1) / rows_per_stripe;
  for (int p = stripes - 1; p >= 0; --p) {
    const Stripe stripe(pair, p, rows_per_stripe, K);
    const double* edge_below = edge + ((p + 1) % 2) * M;  // S of the next stripe's first row
    double* edge_above = edge + (p % 2) * M;               // S of this stripe's first row
    const double* edge_E_below = edge + (2 + (p + 1) % 2) * M;  // fused: E of those rows
    double* edge_E_above = edge + (2 + p % 2) * M;
    const int first_row = stripe.i0 + t * K;
    const bool owns_rows = t <= stripe.t_last;
    const int lag = stripe.t_last - t;  // the last owning thread leads
    const int below_row = stripe.i_last + 1;  // first row of the stripe below (if < n)
    cost.rows(first_row, pair.n);

    // (E, S) at column j + 1 of each row: outside the band / range right of j_end.
    T right_E[K];
    double right_S[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      right_E[k] = T(0);
      right_S[k] = inf;
    }
    // (E, S) of the row below this thread's rows at column j + 1, for the first column.
    T below_right_E = T(0);
    double below_right_S = inf;
    if (t == stripe.t_last && pair.allowed(below_row, stripe.j_end + 1)) {
      below_right_E = kFused ? static_cast<T>(edge_E_below[stripe.j_end + 1])
                             : E[below_row * M + stripe.j_end + 1];  // int64: M is
      below_right_S = edge_below[stripe.j_end + 1];
    }
    // Fused: this thread's rows' gradient, sum over the stripe's columns of 2 E (x_i - y_j).
    T row_grad[K][kG];
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int d = 0; d < kG; ++d) row_grad[k][d] = T(0);
    }
    T out_E = T(0);  // (E, S) of this thread's first row at its previous column (passed up)
    double out_S = inf;
    // R of the thread's K rows at column j, read one step ahead: the loads of the next
    // step's column are issued before this step's cells and land during its arithmetic and
    // barrier (issued at use, their latency stalled every step: Nsight on the H200 put half
    // the backward's stalls on them). Only cells the forward wrote are read.
    const int valid_rows = pair.n - first_row;
    auto load_R = [&](int j, double (&dst)[K]) {
      const bool active = owns_rows && j >= stripe.j_begin && j <= stripe.j_end;
      const double* src = active ? R + layout.at(p, t, j) : nullptr;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        dst[k] = active && k < valid_rows ? src[k * int(blockDim.x)] : inf;
      }
    };
    double R_now[K], R_next[K];
    load_R(stripe.j_end + lag, R_now);  // the column of step 0
    const int steps = stripe.j_end - stripe.j_begin + 1 + stripe.t_last;
    for (int s = 0; s < steps; ++s) {
      T below_E = __shfl_down_sync(kFullMask, out_E, 1);
      double below_S = __shfl_down_sync(kFullMask, out_S, 1);
      if (lane == kWarpSize - 1 && warp + 1 < warps) {
        below_E = s > 0 ? handoff_E[(s + 1) % 2][warp + 1] : T(0);
        below_S = s > 0 ? handoff_S[(s + 1) % 2][warp + 1] : inf;
      }
      const int j = stripe.j_end - (s - lag);
      if (t == stripe.t_last) {  // the row below the stripe: written by the previous stripe
        const bool ok = pair.allowed(below_row, j);
        below_E = ok ? (kFused ? static_cast<T>(edge_E_below[j]) : E[below_row * M + j]) : T(0);
        below_S = ok ? edge_below[j] : inf;
      }
      load_R(j - 1, R_next);  // the next step's column
      if (owns_rows && j >= stripe.j_begin && j <= stripe.j_end) {
        cost.column(j);
        T* E_here = kFused ? nullptr : E + int64_t(first_row) * M + j;
        const bool last_column = j == pair.m - 1;
        T column_grad[kG];  // fused: minus the sum over this thread's rows of 2 E (x_i - y_j)
#pragma unroll
        for (int d = 0; d < kG; ++d) column_grad[d] = T(0);
        // Branch-free cells, as in the forward: invalid cells (outside the band, rows past
        // the pair's end) become (E, S) = (0, +inf), so they pass nothing on.
        const int offset = j - first_row;
        const int end_row = last_column ? pair.n - 1 - first_row : -1;
        T down_E = below_E, diag_E = below_right_E;
        double down_S = below_S, diag_S = below_right_S;
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
          const bool ok = k < valid_rows && offset - k >= pair.lo && offset - k <= pair.hi;
          const double r = ok ? R_now[k] : inf;
          T e = down_E * weight(down_S, r) + right_E[k] * weight(right_S[k], r) +
                diag_E * weight(diag_S, r);
          e = r < inf ? e : T(0);  // unreachable (or invalid): no alignment
          e = k == end_row ? seed : e;
          const double S = ok ? r - static_cast<double>(cost.at(k, first_row + k)) : inf;
          if constexpr (kFused) {
            // d cost / d x_i = 2 (x_i - y_j) = -d cost / d y_j; e is 0 on invalid cells, and
            // rows past the pair's end (zeros in registers) are masked out by ok as well.
            const T w = ok ? T(2) * e : T(0);
#pragma unroll
            for (int d = 0; d < kG; ++d) {
              const T diff = cost.xr[k][d] - cost.yj[d];  // 0 - 0 for features d >= D
              row_grad[k][d] += w * diff;
              column_grad[d] -= w * diff;
            }
          } else if (ok) {
            E_here[k * M] = e;
          }
          diag_E = right_E[k];
          diag_S = right_S[k];
          down_E = e;
          down_S = S;
          right_E[k] = e;
          right_S[k] = S;
        }
        out_E = down_E;
        out_S = down_S;
        if (t == 0 && p > 0) {
          edge_above[j] = out_S;
          if constexpr (kFused) edge_E_above[j] = static_cast<double>(out_E);
        }
        if constexpr (kFused) {
          add_column_grad<T, kG>(column_ring, j, t, stripe.t_last, column_grad, gy, D);
        }
      }
      below_right_E = below_E;
      below_right_S = below_S;
      if (lane == 0) {
        handoff_E[s % 2][warp] = out_E;
        handoff_S[s % 2][warp] = out_S;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) R_now[k] = R_next[k];
      __syncthreads();
    }
    if constexpr (kFused) {
      if (owns_rows) store_row_grad<T, K, kG>(row_grad, first_row, valid_rows, gx, D);
    }
  }
}

// ------------------------------------------------------- backward (soft, fp32: weights)

// The fp32 soft backward from the forward's weights, as a "push" along the same mirrored
// wavefront: a cell's E is the sum of what its three successors pushed into it,
//   E[i][j] = E[i+1][j] w_up[i+1][j] + E[i][j+1] w_left[i][j+1] + E[i+1][j+1] w_diag[i+1][j+1]
// (w: the successor's soft-argmin weight of that predecessor, stored by the forward), so a
// cell costs two loads, three multiplies and three adds: no exp, no fp64, no local cost
// (but for the fused gradient's x_i - y_j). Pushes travel like the pull version's messages:
// up to the next row of the same step (the row above's thread through a shuffle), left to
// the same row at the next step (a register), diagonally to the row above at the next step.
// kFusedD as in soft_dtw_backward_kernel.
template <int K, typename Cost, int kFusedD>
__global__ void __launch_bounds__(kMaxThreads)
    soft_dtw_backward_weights_kernel(const DtwArgs args, const float* __restrict__ grad,
                                     const WeightPair* __restrict__ W_in,
                                     float* __restrict__ E_out, float* __restrict__ grad_x,
                                     float* __restrict__ grad_y) {
  using T = float;
  constexpr bool kFused = kFusedD > 0;
  constexpr int kG = kFused ? kFusedD : 1;
  // lane 0 of warp w -> lane 31 of warp w - 1: the pushes of a thread's top row
  __shared__ T handoff_up[2][kMaxWarps];
  __shared__ T handoff_diag[2][kMaxWarps];
  __shared__ T column_ring[kFused ? kMaxThreads : 1][kG];  // add_column_grad
  const int64_t b = blockIdx.x;
  const PairShape pair(args, b);
  if (!pair.ok) return;
  const int t = threadIdx.x, lane = t % kWarpSize, warp = t / kWarpSize;
  static_assert(Cost::kRows == K, "the cost source caches the thread's K rows");
  const int warps = blockDim.x / kWarpSize;
  const int rows_per_stripe = blockDim.x * K;
  const int64_t N = args.N, M = args.M;
  Cost cost = make_cost(args, b, static_cast<Cost*>(nullptr));
  const KeptLayout layout(blockDim.x, K, M);
  const WeightPair* W = W_in + b * args.kept_per_pair;
  T* E = kFused ? nullptr : E_out + b * N * M;
  T* gx = kFused ? grad_x + b * N * args.D : nullptr;
  T* gy = kFused ? grad_y + b * M * args.D : nullptr;
  const int D = static_cast<int>(args.D);
  // The pushes out of a stripe's top row into the stripe above (up, then diagonal),
  // double-buffered like the forward's boundary rows.
  T* edge = args.workspace != nullptr
                ? reinterpret_cast<T*>(static_cast<double*>(args.workspace) + b * kEdgeRows * M)
                : nullptr;
  const T seed = grad[b];

  const int stripes = (pair.n + rows_per_stripe - 1) / rows_per_stripe;
  for (int p = stripes - 1; p >= 0; --p) {
    const Stripe stripe(pair, p, rows_per_stripe, K);
    const T* edge_up_below = edge + ((p + 1) % 2) * M;  // the stripe below's top-row pushes
    const T* edge_diag_below = edge + (2 + (p + 1) % 2) * M;
    T* edge_up_above = edge + (p % 2) * M;  // this stripe's, for the stripe above
    T* edge_diag_above = edge + (2 + p % 2) * M;
    const int first_row = stripe.i0 + t * K;
    const bool owns_rows = t <= stripe.t_last;
    const int lag = stripe.t_last - t;  // the last owning thread leads
    const int below_row = stripe.i_last + 1;
    const int valid_rows = pair.n - first_row;
    if constexpr (kFused) cost.rows(first_row, pair.n);

    // Pushes into row k at the coming step: from (k, j + 1) and from (k + 1, j + 1).
    T from_right[K], from_diag[K];
    T row_grad[K][kG];  // fused: as in soft_dtw_backward_kernel
#pragma unroll
    for (int k = 0; k < K; ++k) {
      from_right[k] = T(0);
      from_diag[k] = T(0);
#pragma unroll
      for (int d = 0; d < kG; ++d) row_grad[k][d] = T(0);
    }
    // The last row's diagonal push at the first column comes from (below_row, j_end + 1),
    // which a band can allow beyond this stripe's last column.
    if (t == stripe.t_last && pair.allowed(below_row, stripe.j_end + 1)) {
      from_diag[K - 1] = edge_diag_below[stripe.j_end + 1];
    }
    T out_up = T(0), out_diag = T(0);  // this thread's top-row pushes at its previous step
    // The weights of the thread's K rows at column j, read one step ahead (see the R
    // lookahead of soft_dtw_backward_kernel); only cells the forward wrote are read.
    auto load_weights = [&](int j, WeightPair (&dst)[K]) {
      const bool active = owns_rows && j >= stripe.j_begin && j <= stripe.j_end;
      const WeightPair* src = active ? W + layout.at(p, t, j) : nullptr;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        dst[k] = active && k < valid_rows ? src[k * int(blockDim.x)] : WeightPair{0.0f, 0.0f};
      }
    };
    WeightPair W_now[K], W_next[K];
    load_weights(stripe.j_end + lag, W_now);
    const int steps = stripe.j_end - stripe.j_begin + 1 + stripe.t_last;
    for (int s = 0; s < steps; ++s) {
      // The pushes of the row below this thread's rows at its previous step: into
      // (last row, j) now, and into (last row, j - 1) at the next step.
      T in_up = __shfl_down_sync(kFullMask, out_up, 1);
      T in_diag = __shfl_down_sync(kFullMask, out_diag, 1);
      if (lane == kWarpSize - 1 && warp + 1 < warps) {
        in_up = s > 0 ? handoff_up[(s + 1) % 2][warp + 1] : T(0);
        in_diag = s > 0 ? handoff_diag[(s + 1) % 2][warp + 1] : T(0);
      }
      const int j = stripe.j_end - (s - lag);
      if (t == stripe.t_last) {  // the row below the stripe: pushed by the previous stripe
        const bool ok = pair.allowed(below_row, j);
        in_up = ok ? edge_up_below[j] : T(0);
        in_diag = ok ? edge_diag_below[j] : T(0);
      }
      load_weights(j - 1, W_next);
      if (owns_rows && j >= stripe.j_begin && j <= stripe.j_end) {
        if constexpr (kFused) cost.column(j);
        T* E_here = kFused ? nullptr : E + int64_t(first_row) * M + j;
        const int offset = j - first_row;
        const int end_row = j == pair.m - 1 ? pair.n - 1 - first_row : -1;
        T column_grad[kG];
#pragma unroll
        for (int d = 0; d < kG; ++d) column_grad[d] = T(0);
        T below = in_up;    // the push into (k, j) from (k + 1, j)
        T carry = in_diag;  // the push into (k, j - 1) from (k + 1, j): next step's from_diag[k]
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
          const bool ok = k < valid_rows && offset - k >= pair.lo && offset - k <= pair.hi;
          const WeightPair w = W_now[k];
          const bool reached = w.up >= 0.0f;  // see kUnreachable
          T e = below + from_right[k] + from_diag[k];
          e = reached ? e : T(0);  // as the R-based backward: no alignment through R = +inf
          e = k == end_row ? seed : e;
          e = ok ? e : T(0);  // invalid cells push nothing (their weights are 0 as well)
          const T w_up = reached ? w.up : T(0), w_left = reached ? w.left : T(0);
          const T w_diag = reached ? fmaxf(0.0f, 1.0f - w.up - w.left) : T(0);  // sum to 1
          from_diag[k] = carry;
          below = e * w_up;
          from_right[k] = e * w_left;
          carry = e * w_diag;
          if constexpr (kFused) {
            const T g = ok ? T(2) * e : T(0);
#pragma unroll
            for (int d = 0; d < kG; ++d) {
              const T diff = cost.xr[k][d] - cost.yj[d];
              row_grad[k][d] += g * diff;
              column_grad[d] -= g * diff;
            }
          } else if (ok) {
            E_here[k * M] = e;
          }
        }
        out_up = below;
        out_diag = carry;
        if (t == 0 && p > 0) {
          edge_up_above[j] = out_up;
          edge_diag_above[j] = out_diag;
        }
        if constexpr (kFused) {
          add_column_grad<T, kG>(column_ring, j, t, stripe.t_last, column_grad, gy, D);
        }
      } else {
        out_up = T(0);  // no cell at this step: nothing pushed up
        out_diag = T(0);
      }
      if (lane == 0) {
        handoff_up[s % 2][warp] = out_up;
        handoff_diag[s % 2][warp] = out_diag;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) W_now[k] = W_next[k];
      __syncthreads();
    }
    if constexpr (kFused) {
      if (owns_rows) store_row_grad<T, K, kG>(row_grad, first_row, valid_rows, gx, D);
    }
  }
}

// ----------------------------------------------------------------------- backward (hard)

// One thread per pair walks the optimal path back from (n - 1, m - 1) through R, choosing
// the smallest predecessor (ties: diagonal, then (i - 1, j), then (i, j - 1)), and writes
// grad[b] on every cell of it.
template <typename T>
__global__ void hard_dtw_backtrack_kernel(const DtwArgs args, const T* __restrict__ grad,
                                          const T* __restrict__ R_in, T* __restrict__ E_out) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= args.B) return;
  const PairShape pair(args, b);
  if (!pair.ok) return;
  const int64_t M = args.M;
  const KeptLayout layout(args.threads, args.rows, M);
  const T* R = R_in + b * args.kept_per_pair;
  T* E = E_out + b * args.N * M;
  const T g = grad[b];
  int i = pair.n - 1, j = pair.m - 1;
  while (true) {
    E[i * M + j] = g;
    if (i == 0 && j == 0) break;
    int move = -1;
    T best = T(0);
    if (pair.allowed(i - 1, j - 1)) {
      best = R[layout.of_cell(i - 1, j - 1)];
      move = 0;
    }
    if (pair.allowed(i - 1, j)) {
      const T v = R[layout.of_cell(i - 1, j)];
      if (move < 0 || v < best) {
        best = v;
        move = 1;
      }
    }
    if (pair.allowed(i, j - 1)) {
      const T v = R[layout.of_cell(i, j - 1)];
      if (move < 0 || v < best) {
        best = v;
        move = 2;
      }
    }
    if (move < 0) break;  // unreachable for a valid pair: (i, j) != (0, 0) has a neighbour
    if (move != 2) --i;
    if (move != 1) --j;
  }
}

// ------------------------------------------------------------------------------ launchers

int threads_for(const DtwArgs& a, int K) {
  // Whole warps only (the shuffles use the full mask), at most kMaxThreads.
  const int cap = a.max_threads > 0
                      ? static_cast<int>(min64(max64(a.max_threads / kWarpSize, 1), kMaxWarps)) *
                            kWarpSize
                      : kMaxThreads;
  const int64_t wanted = ceil_div(ceil_div(a.N, K), kWarpSize) * kWarpSize;
  return static_cast<int>(min64(max64(wanted, kWarpSize), cap));
}

// K: 4 rows per thread for soft-DTW; 16 for hard DTW on a precomputed cost or D = 1, 8 for
// D > 1 (16 rows of D <= 4 cached features would not fit in the registers).
int rows_per_thread(const DtwArgs& a) {
  if (a.soft) return a.soft_rows == 2 ? 2 : kRowsSoft;
  return a.cost != nullptr || a.D == 1 ? kRowsHard : kRowsHard / 2;
}

}  // namespace

int64_t dtw_kept_per_pair(const DtwArgs& args) {
  const int K = rows_per_thread(args);
  const int T = threads_for(args, K);
  return ceil_div(args.N, int64_t(T) * K) * KeptLayout(T, K, args.M).stripe_size;
}

namespace {

// Calls body(Cost*) with the cost source matching the arguments (K rows per thread).
template <typename T, int K, bool kSq, typename Body>
cudaError_t with_series_cost(const DtwArgs& a, Body&& body) {
  if (a.D == 1) return body(static_cast<SeriesCost<T, 1, K, kSq>*>(nullptr));
  if (a.D <= 4) return body(static_cast<SeriesCost<T, 4, K, kSq>*>(nullptr));
  return body(static_cast<SeriesCost<T, 0, K, kSq>*>(nullptr));
}

template <typename T, int K, typename Body>
cudaError_t with_cost(const DtwArgs& a, Body&& body) {
  if (a.cost != nullptr) return body(static_cast<MatrixCost<T, K>*>(nullptr));
  if (a.metric == 0) return with_series_cost<T, K, true>(a, body);
  return with_series_cost<T, K, false>(a, body);
}

// Calls body(std::integral_constant<int, K>) with the soft-DTW rows per thread K of `a`
// (resolved: a.rows), so the kernels are compiled for K = 4 (the default) and K = 2.
template <typename Body>
cudaError_t with_soft_rows(const DtwArgs& a, Body&& body) {
  if (a.rows == 2) return body(std::integral_constant<int, 2>{});
  return body(std::integral_constant<int, kRowsSoft>{});
}

// The arguments with the launch-derived fields filled in.
DtwArgs resolved(const DtwArgs& args) {
  DtwArgs a = args;
  a.rows = rows_per_thread(a);
  a.threads = threads_for(a, a.rows);
  a.kept_per_pair = dtw_kept_per_pair(a);
  return a;
}

template <typename T>
cudaError_t forward_typed(const DtwArgs& args, void* values, void* R, cudaStream_t stream) {
  const DtwArgs a = resolved(args);
  if (a.soft) {
    return with_soft_rows(a, [&](auto rows) {
      constexpr int K = decltype(rows)::value;
      return with_cost<T, K>(a, [&](auto* cost_tag) {
        using Cost = std::remove_pointer_t<decltype(cost_tag)>;
        if (R != nullptr) {
          dtw_forward_kernel<T, true, K, Cost, true><<<a.B, a.threads, 0, stream>>>(
              a, static_cast<T*>(values), static_cast<double*>(R));
        } else {
          dtw_forward_kernel<T, true, K, Cost, false><<<a.B, a.threads, 0, stream>>>(
              a, static_cast<T*>(values), nullptr);
        }
        return cudaGetLastError();
      });
    });
  }
  auto hard = [&](auto* cost_tag) {
    using Cost = std::remove_pointer_t<decltype(cost_tag)>;
    if (R != nullptr) {
      dtw_forward_kernel<T, false, Cost::kRows, Cost, true><<<a.B, a.threads, 0, stream>>>(
          a, static_cast<T*>(values), static_cast<T*>(R));
    } else {
      dtw_forward_kernel<T, false, Cost::kRows, Cost, false><<<a.B, a.threads, 0, stream>>>(
          a, static_cast<T*>(values), nullptr);
    }
    return cudaGetLastError();
  };
  constexpr int kWide = kRowsHard / 2;  // rows per thread when D > 1 (see rows_per_thread)
  if (a.cost != nullptr) return hard(static_cast<MatrixCost<T, kRowsHard>*>(nullptr));
  if (a.D == 1) {
    if (a.metric == 0) return hard(static_cast<SeriesCost<T, 1, kRowsHard, true>*>(nullptr));
    return hard(static_cast<SeriesCost<T, 1, kRowsHard, false>*>(nullptr));
  }
  if (a.metric == 0) {
    if (a.D <= 4) return hard(static_cast<SeriesCost<T, 4, kWide, true>*>(nullptr));
    return hard(static_cast<SeriesCost<T, 0, kWide, true>*>(nullptr));
  }
  if (a.D <= 4) return hard(static_cast<SeriesCost<T, 4, kWide, false>*>(nullptr));
  return hard(static_cast<SeriesCost<T, 0, kWide, false>*>(nullptr));
}

template <typename T>
cudaError_t backward_typed(const DtwArgs& args, const void* grad, const void* R, void* E,
                           cudaStream_t stream) {
  const DtwArgs a = resolved(args);
  if (!a.soft) {
    constexpr int kThreads = 128;
    hard_dtw_backtrack_kernel<T><<<ceil_div(a.B, kThreads), kThreads, 0, stream>>>(
        a, static_cast<const T*>(grad), static_cast<const T*>(R), static_cast<T*>(E));
    return cudaGetLastError();
  }
  return with_soft_rows(a, [&](auto rows) {
    constexpr int K = decltype(rows)::value;
    return with_cost<T, K>(a, [&](auto* cost_tag) {
      using Cost = std::remove_pointer_t<decltype(cost_tag)>;
      if constexpr (std::is_same_v<T, float>) {  // the forward kept the weights
        soft_dtw_backward_weights_kernel<K, Cost, 0><<<a.B, a.threads, 0, stream>>>(
            a, static_cast<const float*>(grad), static_cast<const WeightPair*>(R),
            static_cast<float*>(E), nullptr, nullptr);
      } else {
        soft_dtw_backward_kernel<T, K, Cost, 0><<<a.B, a.threads, 0, stream>>>(
            a, static_cast<const T*>(grad), static_cast<const double*>(R), static_cast<T*>(E),
            nullptr, nullptr);
      }
      return cudaGetLastError();
    });
  });
}

template <typename T>
cudaError_t fused_backward_typed(const DtwArgs& args, const void* grad, const void* R,
                                 void* grad_x, void* grad_y, cudaStream_t stream) {
  const DtwArgs a = resolved(args);
  return with_soft_rows(a, [&](auto rows) {
    constexpr int K = decltype(rows)::value;
    auto launch = [&](auto* cost_tag, auto dims) {
      using Cost = std::remove_pointer_t<decltype(cost_tag)>;
      constexpr int kD = decltype(dims)::value;
      if constexpr (std::is_same_v<T, float>) {
        soft_dtw_backward_weights_kernel<K, Cost, kD><<<a.B, a.threads, 0, stream>>>(
            a, static_cast<const float*>(grad), static_cast<const WeightPair*>(R), nullptr,
            static_cast<float*>(grad_x), static_cast<float*>(grad_y));
      } else {
        soft_dtw_backward_kernel<T, K, Cost, kD><<<a.B, a.threads, 0, stream>>>(
            a, static_cast<const T*>(grad), static_cast<const double*>(R), nullptr,
            static_cast<T*>(grad_x), static_cast<T*>(grad_y));
      }
      return cudaGetLastError();
    };
    if (a.D == 1) {
      return launch(static_cast<SeriesCost<T, 1, K, true>*>(nullptr),
                    std::integral_constant<int, 1>{});
    }
    return launch(static_cast<SeriesCost<T, 4, K, true>*>(nullptr),
                  std::integral_constant<int, 4>{});
  });
}

}  // namespace

size_t dtw_workspace_bytes(const DtwArgs& args) {
  const int K = rows_per_thread(args);
  if (args.N <= int64_t(threads_for(args, K)) * K) return 0;  // one stripe: no boundary
  return static_cast<size_t>(args.B) * kEdgeRows * static_cast<size_t>(args.M) *
         sizeof(double);
}

bool dtw_fused_backward_supported(const DtwArgs& args) {
  return args.soft && args.cost == nullptr && args.metric == 0 && args.D >= 1 &&
         args.D <= 4 && args.x_batch_stride == args.N * args.D &&
         args.y_batch_stride == args.M * args.D;
}

cudaError_t soft_dtw_backward_series(const DtwArgs& args, const void* grad, const void* R,
                                     void* grad_x, void* grad_y, cudaStream_t stream) {
  if (!dtw_fused_backward_supported(args)) return cudaErrorInvalidValue;
  if (args.B == 0) return cudaSuccess;
  if (args.B > kMaxPairs) return cudaErrorInvalidValue;
  if (args.dtype == DType::kFloat64) {
    return fused_backward_typed<double>(args, grad, R, grad_x, grad_y, stream);
  }
  return fused_backward_typed<float>(args, grad, R, grad_x, grad_y, stream);
}

cudaError_t dtw_forward(const DtwArgs& args, void* values, void* R, cudaStream_t stream) {
  if (args.B == 0) return cudaSuccess;
  if (args.B > kMaxPairs) return cudaErrorInvalidValue;
  if (args.dtype == DType::kFloat64) return forward_typed<double>(args, values, R, stream);
  return forward_typed<float>(args, values, R, stream);
}

cudaError_t dtw_backward(const DtwArgs& args, const void* grad, const void* R, void* E,
                         cudaStream_t stream) {
  if (args.B == 0) return cudaSuccess;
  if (args.B > kMaxPairs) return cudaErrorInvalidValue;
  if (args.dtype == DType::kFloat64) return backward_typed<double>(args, grad, R, E, stream);
  return backward_typed<float>(args, grad, R, E, stream);
}

}  // namespace ether_kernels::cuda
