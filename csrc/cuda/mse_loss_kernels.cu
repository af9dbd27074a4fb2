// Fused MSE CUDA kernels: one pass over input and target that produces the loss and, when the
// input needs a gradient, the gradient itself (the backward is then one multiply by the
// upstream gradient). Pure CUDA (no torch); entry points in kernels_cuda.h.
//
//   mean/sum: sse = sum_e (p_e - t_e)^2,   grad_e = grad_scale * (p_e - t_e)
//             loss = sse / n (mean; NaN for n == 0, as in torch) or sse (sum)
//   none:     out_e = (p_e - t_e)^2
//   backward: out_e = difference_e * (g * factor), g read on the device (mse_backward)
//
// mean/sum take two launches and no host synchronisation: a grid-stride pass in which every
// block writes one fp64 partial sum to the workspace (no atomics), then one block that adds
// the partials in a fixed order and writes the loss. The grid depends only on n (not on
// timing or the SM count), so the result is bitwise reproducible from run to run. Elements
// are accumulated in fp32 (fp64 for fp64 inputs), folded into fp64 every kFlushSteps steps.

#include "kernels_cuda.h"

#include "../common/ether_loss_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ether_kernels::cuda {
namespace {

using namespace detail;

// 256 threads = 8 warps per block: 8 resident blocks fill an SM (2048 threads on A100/H100),
// and the closing block reduction is two short warp trees.
constexpr int kThreads = 256;
// Reduction grid: at most 1024 blocks, about one full wave on an H100 (132 SMs x 8) or an
// A100 (108 x 8); the grid-stride loop covers larger inputs. A constant rather than a
// function of the SM count keeps the summation order independent of the GPU model, and it
// bounds the partials the final block adds (8 KiB).
constexpr int64_t kMaxBlocks = 1024;
// Elementwise (reduction none) grid cap: two waves' worth; beyond that the grid-stride loop
// takes over and block scheduling costs nothing more.
constexpr int64_t kElementwiseMaxBlocks = 2048;
// fp32 running sums are folded into fp64 every 64 steps: each fp32 partial holds at most
// 64 * kVec (<= 512) terms.
constexpr int64_t kFlushSteps = 64;

enum class Mode { kReduce, kReduceGrad, kElementwise };

// Units of kVec elements, grid-stride. kReduce/kReduceGrad: block partial of sum (p - t)^2
// into sse_partials[blockIdx.x] (and grad = grad_scale * (p - t) with kReduceGrad);
// kElementwise: out = (p - t)^2. `out` is the gradient or the elementwise loss.
template <typename T, bool kAligned, Mode kMode>
__global__ void __launch_bounds__(kThreads)
    mse_kernel(const T* __restrict__ input, const T* __restrict__ target, int64_t n,
               acc_t<T> grad_scale, T* __restrict__ out, double* __restrict__ sse_partials) {
  using acc = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t units = ceil_div(n, V);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  acc sse_part = 0;
  double sse = 0.0;
  int64_t steps = 0;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; unit < units;
       unit += stride) {
    const int64_t e = unit * V, valid = min64(V, n - e);
    acc p[V], t[V], y[V];
    load_unit<T, kAligned>(input + e, valid, p);
    load_unit<T, kAligned>(target + e, valid, t);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const acc d = p[v] - t[v];
      if constexpr (kMode == Mode::kElementwise) {
        y[v] = d * d;
      } else {
        sse_part = fma_acc(d, d, sse_part);  // masked lanes have d = 0
        if constexpr (kMode == Mode::kReduceGrad) y[v] = grad_scale * d;
      }
    }
    if constexpr (kMode != Mode::kReduce) store_unit<T, kAligned>(out + e, valid, y);
    if constexpr (kMode != Mode::kElementwise) {
      if (++steps == kFlushSteps) {
        sse += static_cast<double>(sse_part);
        sse_part = 0;
        steps = 0;
      }
    }
  }
  if constexpr (kMode != Mode::kElementwise) {
    const double total = block_sum<kThreads>(sse + static_cast<double>(sse_part));
    if (threadIdx.x == 0) sse_partials[blockIdx.x] = total;
  }
}

// One block: loss = (sum of the partials) / n for mean, or the sum; an empty mean is
// 0 / 0 = NaN, as in torch.nn.functional.mse_loss.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mse_finish_kernel(const double* __restrict__ sse_partials, int64_t count, double n,
                      bool mean, T* __restrict__ loss) {
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < count; k += kThreads) s += sse_partials[k];
  s = block_sum<kThreads>(s);
  if (threadIdx.x == 0) *loss = from_double<T>(mean ? s / n : s);
}

// Backward: out = difference * s with s = upstream * factor (in double, then rounded once
// to the accumulation type, like the CPU kernel's scale), grid-stride over units.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    mse_backward_kernel(const T* __restrict__ grad_loss, const T* __restrict__ difference,
                        int64_t n, double factor, T* __restrict__ out) {
  using acc = acc_t<T>;
  constexpr int V = kVec<T>;
  const acc s = static_cast<acc>(static_cast<double>(to_acc(*grad_loss)) * factor);
  const int64_t units = ceil_div(n, V);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; unit < units;
       unit += stride) {
    const int64_t e = unit * V, valid = min64(V, n - e);
    acc x[V];
    load_unit<T, kAligned>(difference + e, valid, x);
#pragma unroll
    for (int v = 0; v < V; ++v) x[v] *= s;
    store_unit<T, kAligned>(out + e, valid, x);
  }
}

// Blocks of the reduction pass (0 for an empty input); the workspace holds one fp64 per block.
int64_t reduce_blocks(int64_t n, int64_t vec) {
  return min64(ceil_div(ceil_div(n, vec), kThreads), kMaxBlocks);
}

int64_t vec_of(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return kVec<float>;
    case DType::kFloat64: return kVec<double>;
    case DType::kFloat16: return kVec<__half>;
    case DType::kBFloat16: return kVec<__nv_bfloat16>;
  }
  return 0;
}

template <typename T, bool kAligned, Mode kMode>
void launch_pass(int64_t blocks, const MseForwardArgs& a, T* out, double* partials,
                 cudaStream_t stream) {
  mse_kernel<T, kAligned, kMode><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(a.input), static_cast<const T*>(a.target), a.n,
      static_cast<acc_t<T>>(a.grad_scale), out, partials);
}

template <typename T, Mode kMode>
void launch_pass(bool aligned, int64_t blocks, const MseForwardArgs& a, T* out,
                 double* partials, cudaStream_t stream) {
  if (aligned) launch_pass<T, true, kMode>(blocks, a, out, partials, stream);
  else launch_pass<T, false, kMode>(blocks, a, out, partials, stream);
}

template <typename T>
cudaError_t forward_impl(const MseForwardArgs& a, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  if (a.n < 0) return cudaErrorInvalidValue;
  const bool elementwise = a.reduction == math::kNone;
  T* out = static_cast<T*>(elementwise ? a.out : a.grad);
  const bool aligned = aligned16(a.input) && aligned16(a.target) &&
                       (out == nullptr || aligned16(out));

  if (elementwise) {
    if (a.n == 0) return cudaSuccess;
    const int64_t blocks = min64(ceil_div(ceil_div(a.n, V), kThreads), kElementwiseMaxBlocks);
    launch_pass<T, Mode::kElementwise>(aligned, blocks, a, out, nullptr, stream);
    return cudaGetLastError();
  }

  const int64_t blocks = reduce_blocks(a.n, V);
  if (a.workspace_bytes < static_cast<size_t>(blocks) * sizeof(double) ||
      (blocks > 0 && a.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  double* partials = static_cast<double*>(a.workspace);
  if (blocks > 0) {
    if (out != nullptr) {
      launch_pass<T, Mode::kReduceGrad>(aligned, blocks, a, out, partials, stream);
    } else {
      launch_pass<T, Mode::kReduce>(aligned, blocks, a, out, partials, stream);
    }
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  mse_finish_kernel<T><<<1, kThreads, 0, stream>>>(partials, blocks, static_cast<double>(a.n),
                                                   a.reduction == math::kMean,
                                                   static_cast<T*>(a.loss));
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const MseBackwardArgs& a, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  if (a.n < 0) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  const auto* grad_loss = static_cast<const T*>(a.grad_loss);
  const auto* in = static_cast<const T*>(a.difference);
  auto* out = static_cast<T*>(a.out);
  const int64_t blocks = min64(ceil_div(ceil_div(a.n, V), kThreads), kElementwiseMaxBlocks);
  if (aligned16(in) && aligned16(out)) {
    mse_backward_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        grad_loss, in, a.n, a.factor, out);
  } else {
    mse_backward_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        grad_loss, in, a.n, a.factor, out);
  }
  return cudaGetLastError();
}

}  // namespace

// mean/sum: one fp64 partial per block of the reduction pass, i.e. 8 bytes x
// min(ceil(ceil(n / kVec) / 256), 1024) (at most 8 KiB). none: no workspace.
size_t mse_forward_workspace_bytes(const MseForwardArgs& args) {
  const int64_t vec = vec_of(args.dtype);
  if (vec == 0 || args.n <= 0 || args.reduction == math::kNone) return 0;
  return static_cast<size_t>(reduce_blocks(args.n, vec)) * sizeof(double);
}

cudaError_t mse_forward(const MseForwardArgs& args, cudaStream_t stream) {
  if (args.reduction != math::kMean && args.reduction != math::kSum &&
      args.reduction != math::kNone) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case DType::kFloat32: return forward_impl<float>(args, stream);
    case DType::kFloat64: return forward_impl<double>(args, stream);
    case DType::kFloat16: return forward_impl<__half>(args, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t mse_backward(const MseBackwardArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return backward_impl<float>(args, stream);
    case DType::kFloat64: return backward_impl<double>(args, stream);
    case DType::kFloat16: return backward_impl<__half>(args, stream);
    case DType::kBFloat16: return backward_impl<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ether_kernels::cuda
