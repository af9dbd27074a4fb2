// Fused MSE CPU kernel: one pass over input and target that produces the loss and, when the
// input needs a gradient, grad_scale (p - t) (the ops keep p - t: the backward is then one
// multiply by 2 times the upstream gradient). Compiled once per instruction set (setup.py).
//
//   mean/sum: sse = sum_e (p_e - t_e)^2,   grad_e = grad_scale * (p_e - t_e)
//   none:     out_e = (p_e - t_e)^2
//
// The elements are cut into fixed chunks of kChunk; each chunk's sum has its own slot and
// the slots are added in order, so the result does not depend on the thread count.

#include "../vec_utils.h"
#include "kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace ether_kernels::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kChunk = 16384;       // elements per partial sum (fp32 lanes stay accurate)
constexpr int64_t kGrainChunks = 4;     // 64K elements before a second thread helps

// One chunk. Three loop variants (elementwise / sum + gradient / sum) keep the hot loops free
// of branches, and the accumulators are plain locals the stores cannot alias.
template <typename scalar_t>
double mse_chunk(const scalar_t* p, const scalar_t* t, int64_t n, scalar_t* out, scalar_t* grad,
                 at::opmath_type<scalar_t> grad_scale) {
  using P = OpmathPair<scalar_t>;
  using Vec = typename P::Vec;
  const int64_t full = n - n % P::kStep;
  const int64_t tail = n - full;
  Vec p_lo, p_hi, t_lo, t_hi;
  if (out) {  // reduction "none": out = (p - t)^2
    for (int64_t i = 0; i < full; i += P::kStep) {
      P::load(p + i, p_lo, p_hi);
      P::load(t + i, t_lo, t_hi);
      const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
      P::store(out + i, d_lo * d_lo, d_hi * d_hi);
    }
    if (tail) {
      P::load_partial(p + full, tail, p_lo, p_hi);
      P::load_partial(t + full, tail, t_lo, t_hi);
      const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
      P::store_partial(out + full, tail, d_lo * d_lo, d_hi * d_hi);
    }
    return 0.0;
  }
  const Vec scale(grad_scale);
  Vec sse_lo(0), sse_hi(0);  // two independent accumulator chains
  if (grad) {
    for (int64_t i = 0; i < full; i += P::kStep) {
      P::load(p + i, p_lo, p_hi);
      P::load(t + i, t_lo, t_hi);
      const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
      sse_lo = at::vec::fmadd(d_lo, d_lo, sse_lo);
      sse_hi = at::vec::fmadd(d_hi, d_hi, sse_hi);
      P::store(grad + i, scale * d_lo, scale * d_hi);
    }
  } else {
    for (int64_t i = 0; i < full; i += P::kStep) {
      P::load(p + i, p_lo, p_hi);
      P::load(t + i, t_lo, t_hi);
      const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
      sse_lo = at::vec::fmadd(d_lo, d_lo, sse_lo);
      sse_hi = at::vec::fmadd(d_hi, d_hi, sse_hi);
    }
  }
  if (tail) {  // missing lanes load as zero and add nothing
    P::load_partial(p + full, tail, p_lo, p_hi);
    P::load_partial(t + full, tail, t_lo, t_hi);
    const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
    sse_lo = at::vec::fmadd(d_lo, d_lo, sse_lo);
    sse_hi = at::vec::fmadd(d_hi, d_hi, sse_hi);
    if (grad) P::store_partial(grad + full, tail, scale * d_lo, scale * d_hi);
  }
  alignas(64) typename P::opmath_t lanes[Vec::size()];
  (sse_lo + sse_hi).store(lanes);
  double sse = 0.0;
  for (int64_t k = 0; k < Vec::size(); ++k) sse += static_cast<double>(lanes[k]);
  return sse;
}

template <typename scalar_t>
void mse_impl(const MseForwardArgs& args) {
  const auto* p = static_cast<const scalar_t*>(args.input);
  const auto* t = static_cast<const scalar_t*>(args.target);
  auto* out = static_cast<scalar_t*>(args.out);
  auto* grad = static_cast<scalar_t*>(args.grad);
  const auto grad_scale = static_cast<at::opmath_type<scalar_t>>(args.grad_scale);
  const int64_t chunks = (args.n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t start = k * kChunk, count = std::min(kChunk, args.n - start);
      partial[k] = mse_chunk<scalar_t>(p + start, t + start, count, out ? out + start : nullptr,
                                       grad ? grad + start : nullptr, grad_scale);
    }
  });
  if (args.sse) {
    double sse = 0.0;
    for (double s : partial) sse += s;
    *args.sse = sse;
  }
}

template <typename scalar_t>
void scale_impl(const ScaleArgs& args) {
  using P = OpmathPair<scalar_t>;
  using Vec = typename P::Vec;
  const auto* in = static_cast<const scalar_t*>(args.in);
  auto* out = static_cast<scalar_t*>(args.out);
  const Vec factor(static_cast<typename P::opmath_t>(args.scale));
  at::parallel_for(0, args.n, kGrainChunks * kChunk, [&](int64_t begin, int64_t end) {
    Vec lo, hi;
    int64_t i = begin;
    for (; i + P::kStep <= end; i += P::kStep) {
      P::load(in + i, lo, hi);
      P::store(out + i, lo * factor, hi * factor);
    }
    if (i < end) {
      P::load_partial(in + i, end - i, lo, hi);
      P::store_partial(out + i, end - i, lo * factor, hi * factor);
    }
  });
}

}  // namespace

void scale(const ScaleArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "scale",
                                  [&] { scale_impl<scalar_t>(args); });
}

void mse_forward(const MseForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "mse_forward",
                                  [&] { mse_impl<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace ether_kernels::cpu
