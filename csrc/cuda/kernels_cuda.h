// Entry points of the CUDA kernels (ether_loss_kernels.cu, mse_loss_kernels.cu), the CUDA
// twin of csrc/cpu/kernels/kernel_api.h. Plain structs of raw device pointers and sizes: no
// torch here, so the .cu files build with nvcc alone; ops_cuda.cpp is the torch-facing side.
//
// Every launcher enqueues its kernels on `stream`, never synchronises (no host round trip,
// no cudaMemcpy to the host), and returns the first launch error (cudaSuccess when every
// launch was accepted). Outputs and workspaces are allocated by the caller; a workspace
// must be at least the size that the matching *_workspace_bytes function returns for the
// same arguments, and needs no initialisation (every byte that is read is written first).
//
// All tensors are contiguous. Sizes and indices are int64 throughout.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ether_kernels::cuda {

// The element types the kernels are compiled for. The accumulation ("opmath") type is
// float for the 16-bit types and float32, double for float64, as in ATen.
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Ether loss forward. The input (B, C, *rest) is viewed as (B, C, R), R = prod(rest): B rows
// of L = C * R elements, channel c of a row owning elements [c R, (c + 1) R).
//   loss = intra + alpha * inter (exactly intra when alpha == 0), intra = sse / N (reduction
//   0, mean) or sse (1, sum); inter and coef come from math::finalize_row over the channel
//   sums of the whole batch (one row) or of every sample (B rows, inter averaged over B).
struct EtherForwardArgs {
  const void* y_pred;  // [B, C, R], dtype
  const void* y_true;  // [B, C, R], dtype
  DType dtype;
  int64_t B, C, R;     // each > 0
  bool per_sample;
  // Modalities as membership pairs: channel member_channel[e] belongs to group
  // member_group[e] (e < E); weights[m] for m < M. Device memory. They are validated on the
  // device as well: an out-of-range index or an empty group makes the coefficients and the
  // inter term NaN (the loss too unless alpha == 0) instead of reading out of bounds.
  const int64_t* member_channel;
  const int64_t* member_group;
  int64_t E;
  const double* weights;
  int64_t M;
  double alpha;
  int64_t discrepancy;  // math::kL1 or math::kL2
  int64_t reduction;    // math::kMean or math::kSum
  void* loss;           // out: 0-dim, dtype
  void* coef;           // out: [C] or [B, C] (per_sample); float, double for kFloat64
  void* workspace;      // ether_loss_forward_workspace_bytes(*this) bytes, 256-byte aligned
  size_t workspace_bytes;
};

// Bytes of workspace ether_loss_forward needs. Depends only on dtype, B, C, R, per_sample
// and M (not on pointers), so it can be called before anything is allocated.
size_t ether_loss_forward_workspace_bytes(const EtherForwardArgs& args);
cudaError_t ether_loss_forward(const EtherForwardArgs& args, cudaStream_t stream);

// Ether loss backward, one elementwise pass (g = *grad_loss, read on the device):
//   grad_pred[e] = g * (intra_scale * (p - t) + coef[chan(e)])
//   grad_true[e] = -g * intra_scale * (p - t)
// chan(e) = (e / R) % C, or the (b, c) row-major index e / R into coef [B, C] when
// per_sample. coef is float (double for kFloat64), as ether_loss_forward wrote it.
struct EtherBackwardArgs {
  const void* grad_loss;  // one element, dtype
  const void* y_pred;
  const void* y_true;
  DType dtype;
  int64_t B, C, R;
  bool per_sample;
  const void* coef;
  double intra_scale;  // 2 / N for reduction mean, 2 for sum
  void* grad_pred;     // may be null: not requested
  void* grad_true;     // may be null: not requested
};

cudaError_t ether_loss_backward(const EtherBackwardArgs& args, cudaStream_t stream);

// Fused MSE forward over n contiguous elements.
//   reduction mean (0) / sum (1): *loss = sse / n or sse (dtype; NaN for an empty mean, as in
//                     torch); when grad is non-null also grad[e] = grad_scale * (p - t)
//                     (the op keeps grad_scale = 1 for both: p - t, the gradient's 2 (/ n)
//                     is applied by mse_backward, so 16-bit values neither overflow nor
//                     become subnormal)
//   reduction none (2): out[e] = (p - t)^2
struct MseForwardArgs {
  const void* input;
  const void* target;
  DType dtype;
  int64_t n;
  int64_t reduction;
  void* loss;         // mean/sum: 0-dim, dtype
  void* out;          // none: [n], dtype
  void* grad;         // mean/sum, may be null
  double grad_scale;  // 1 in the op (see above)
  void* workspace;    // mse_forward_workspace_bytes(*this) bytes (0 for reduction none)
  size_t workspace_bytes;
};

size_t mse_forward_workspace_bytes(const MseForwardArgs& args);
cudaError_t mse_forward(const MseForwardArgs& args, cudaStream_t stream);

// Fused MSE backward, one pass over n contiguous elements:
//   out[e] = difference[e] * s,   s = g * factor rounded once to the accumulation type,
// g = *grad_loss read on the device (factor = 2 / n for the mean, 2 for the sum), so the
// product is formed in fp32 (fp64 for fp64) and rounded once to the element type.
struct MseBackwardArgs {
  const void* grad_loss;   // one element, dtype
  const void* difference;  // [n], dtype
  DType dtype;
  int64_t n;
  double factor;
  void* out;               // [n], dtype
};

cudaError_t mse_backward(const MseBackwardArgs& args, cudaStream_t stream);

// Batched DTW / soft-DTW (dtw_kernels.cu). Semantics: shared/specs/dtw.md. Pair b uses rows
// i < n = x_lengths[b] and columns j < m = y_lengths[b]; cell (i, j) is allowed when
// lo <= j - i <= hi, lo = -band + min(0, m - n), hi = band + max(0, m - n) (band < 0: all).
// The local cost comes either from a precomputed cost (B, N, M) (`cost` non-null) or from the
// series x (B, N, D) and y (B, M, D) with `metric` (0 sqeuclidean, 1 euclidean, 2 l1), formed
// cell by cell in the kernel. A pair's series start x_batch_stride (y_batch_stride) elements
// apart: 0 broadcasts one series against every pair without a copy.
//
// Precision: hard DTW runs in the element type. Soft-DTW runs R in fp64 for every dtype:
// the soft-min's weights exp(-(a_k - softmin) / gamma) need differences of neighbouring R
// far below fp32's resolution at small gamma (R ~ 1e3 has an fp32 ulp of 6e-5; gamma may be
// 1e-3). The exp / log themselves run in the element type (their arguments are O(1) after
// the fp64 subtraction), so fp32 soft-DTW still uses the fast fp32 special-function units.
// What the forward keeps for the backward (8 bytes per cell either way): fp64 soft-DTW keeps
// R (the backward recomputes the weights from it); fp32 soft-DTW keeps each cell's weights
// of its up and left predecessors as two fp32 (the diagonal's is 1 minus both), so its
// backward is a few multiply-adds per cell (no exp, no fp64); hard DTW keeps R.
//
// Lengths live on the device and are not read on the host; a pair whose lengths are out of
// range [1, N] x [1, M] gets a NaN value and no gradient instead of an out-of-bounds read
// (the Python layer has already rejected such lengths with a clear error).
// B is at most 2^31 - 1 (one thread block per pair; cudaErrorInvalidValue beyond).
struct DtwArgs {
  const void* cost;  // [B, N, M] dtype, or nullptr: cost formed from x and y
  const void* x;     // [B, N, D] dtype (pair b at x + b * x_batch_stride)
  const void* y;     // [B, M, D] dtype
  int64_t x_batch_stride, y_batch_stride;
  DType dtype;       // kFloat32 or kFloat64
  int64_t B, N, M, D;
  const int64_t* x_lengths;  // [B], device
  const int64_t* y_lengths;  // [B], device
  int64_t metric;
  int64_t band;      // >= 0, or -1 for none
  double gamma;      // > 0 when soft
  bool soft;
  int max_threads;   // threads per pair (a multiple of 32, <= 512); 0 = the default 512
  int soft_rows;     // rows per thread for soft-DTW: 2 or 4 (0 = the default 4); fewer rows
                     // give a pair more threads (more warps per SM for small batches)
  void* workspace;   // dtw_workspace_bytes(*this) bytes (four boundary rows per pair)
  size_t workspace_bytes;
  // Set by the launchers (callers leave them 0): threads and rows per thread of a pair's
  // block, kept R elements per pair.
  int threads, rows;
  int64_t kept_per_pair;
};

// Elements of the kept R per pair: R is kept in the kernels' own "step-major" layout (see
// dtw_kernels.cu), slightly larger than N * M: ceil(N / (T K)) * (M + T - 1) * T * K for T
// threads of K rows (K = soft_rows or 4 soft; hard: 16 for a precomputed cost or D = 1, else 8;
// T = min(max_threads, 32 * ceil(N / (32 K)))).
// The kept R is a [B, dtw_kept_per_pair(args)] tensor.
int64_t dtw_kept_per_pair(const DtwArgs& args);

// Forward: values [B] (dtype); R [B, dtw_kept_per_pair] (8-byte elements when soft: fp64 R,
// or for fp32 the two fp32 weights above; dtype when hard)
// when non-null: every element is written (R on the allowed cells of each pair, +inf on
// the band's excluded cells the sweep passes, 0 on the layout's padding; for fp32 soft-DTW
// the weights, {0, 0} on excluded cells), so it needs no initialisation and its content is
// deterministic.
cudaError_t dtw_forward(const DtwArgs& args, void* values, void* R, cudaStream_t stream);

// Backward: E [B, N, M] (dtype) = grad[b] * d values[b] / d cost, the expected alignment
// (soft) or the optimal path's indicator (hard, ties broken diagonal, then (i - 1, j), then
// (i, j - 1)). E must be zero-filled by the caller: only allowed cells are written. R is
// the forward's. grad [B] (dtype) on the device.
cudaError_t dtw_backward(const DtwArgs& args, const void* grad, const void* R, void* E,
                         cudaStream_t stream);

// Soft-DTW backward contracted in the kernel: grad_x [B, N, D] and grad_y [B, M, D] (dtype,
// zero-filled by the caller) = d values / d x and d y scaled by grad, for the squared
// Euclidean cost, without E: cell (i, j) adds 2 E_ij (x_i - y_j) to grad_x[i] (registers of
// the thread owning row i) and subtracts it from grad_y[j] (a shared-memory ring of columns:
// a column is visited by one thread per step, bottom thread first, so the sums need no
// atomics and are deterministic), accumulated in the element type (the E path's matmuls
// accumulate in it too). Needs soft, no cost matrix, metric 0,
// D <= 4 and a series per pair (batch strides N D and M D); anything else returns
// cudaErrorInvalidValue (dtw_fused_backward_supported says beforehand).
bool dtw_fused_backward_supported(const DtwArgs& args);
cudaError_t soft_dtw_backward_series(const DtwArgs& args, const void* grad, const void* R,
                                     void* grad_x, void* grad_y, cudaStream_t stream);

// Workspace bytes of dtw_forward / dtw_backward / soft_dtw_backward_series for these sizes
// (0 when every pair fits in one stripe of rows): four boundary rows of fp64 per pair.
size_t dtw_workspace_bytes(const DtwArgs& args);

}  // namespace ether_kernels::cuda

// ---------------------------------------------------------------------------------------
// Device-side helpers shared by the two .cu files (nvcc only; the host compiler that builds
// ops_cuda.cpp never sees this part).
#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ether_kernels::cuda::detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }
__host__ __device__ constexpr int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return min64(max64(x, lo), hi);
}
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Accumulation type per element type (ATen's opmath_type).
template <typename T> struct AccType;
template <> struct AccType<float> { using type = float; };
template <> struct AccType<double> { using type = double; };
template <> struct AccType<__half> { using type = float; };
template <> struct AccType<__nv_bfloat16> { using type = float; };
template <typename T> using acc_t = typename AccType<T>::type;

// Elements per 16-byte load: 4 fp32, 2 fp64, 8 fp16/bf16. The kernels work in "units" of
// kVec consecutive elements, loaded with one 128-bit instruction when aligned.
template <typename T> constexpr int kVec = static_cast<int>(16 / sizeof(T));

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even conversions back to the element type, like c10::Half/BFloat16.
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
// A double result (the loss) in the element type: through the accumulation type, as the CPU
// op's at::scalar_tensor(double) does (double -> float -> half for the 16-bit types).
template <typename T> __device__ __forceinline__ T from_double(double x) {
  return from_acc<T>(static_cast<acc_t<T>>(x));
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename T> struct alignas(16) Pack {
  T v[kVec<T>];
};

__host__ __device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Loads the first `valid` (<= kVec) elements at src as accumulation values; missing lanes
// read as 0, which adds nothing to any sum. One 16-byte load when the caller knows the
// address is aligned (kAligned) and the unit is full; element loads otherwise. Both paths
// give the same values in the same lanes, so alignment never changes a result.
template <typename T, bool kAligned>
__device__ __forceinline__ void load_unit(const T* __restrict__ src, int64_t valid,
                                          acc_t<T> (&x)[kVec<T>]) {
  if (kAligned && valid == kVec<T>) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(src);
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) x[v] = to_acc(pack.v[v]);
  } else {
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) x[v] = v < valid ? to_acc(src[v]) : acc_t<T>(0);
  }
}

// Stores the first `valid` lanes of x at dst, converted to T.
template <typename T, bool kAligned>
__device__ __forceinline__ void store_unit(T* __restrict__ dst, int64_t valid,
                                           const acc_t<T> (&x)[kVec<T>]) {
  if (kAligned && valid == kVec<T>) {
    Pack<T> pack;
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) pack.v[v] = from_acc<T>(x[v]);
    *reinterpret_cast<Pack<T>*>(dst) = pack;
  } else {
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) {
      if (v < valid) dst[v] = from_acc<T>(x[v]);
    }
  }
}

// Sum over the 32 lanes of a warp, in a fixed tree order; the total lands in lane 0.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(kFullMask, v, offset);
  }
  return v;
}

// Sum over a block of kThreads threads in a fixed order (warp trees, then a tree over the
// warp totals); the total is valid in thread 0. Every thread of the block must call it. It
// ends with a barrier, so it can be called again right away.
template <int kThreads>
__device__ __forceinline__ double block_sum(double v) {
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize, "block size");
  __shared__ double warp_totals[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (warp == 0) total = warp_sum(lane < kThreads / kWarpSize ? warp_totals[lane] : 0.0);
  __syncthreads();
  return total;
}

}  // namespace ether_kernels::cuda::detail

#endif  // __CUDACC__
