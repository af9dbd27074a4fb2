// Ether loss CPU kernels: the fused forward reduction and the one-pass backward.
// Compiled once per instruction set (CPU_CAPABILITY = DEFAULT, AVX2, AVX512; see setup.py).
//
// The input (B, C, *rest) is viewed as (B, C, R) with R = prod(rest): B rows of L = C * R
// contiguous elements. Two traversals, chosen by the shape:
//
//   column mode (R < kSegmentMin, batch statistics): the common (B, C) case. Every row is
//     added lane-wise into a block of fp32 column accumulators kept in L1, so the loop is
//     pure vector loads/adds with no horizontal reduction; the accumulators are flushed into
//     doubles every kFlushRows rows (bounding the fp32 rounding error to kFlushRows terms).
//     Work is split into (row chunk x column block) tiles with a fixed row-chunk size, so
//     the result does not depend on the thread count.
//   segment mode (R >= kSegmentMin, or per-sample statistics): each (b, c) owns R contiguous
//     elements; one horizontal reduction per segment, parallel over segments.
//
// Determinism: every partial sum has a fixed place and partials are combined in a fixed
// order, so the result is bitwise reproducible for any thread count.

#include "../vec_utils.h"
#include "kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace ether_kernels::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kSegmentMin = 64;      // R at which one (b, c) is long enough to reduce alone
constexpr int64_t kColumnBlock = 2048;   // column accumulators per tile: 8 KiB of fp32, in L1
constexpr int64_t kFlushRows = 128;      // fp32 column sums flushed to fp64 this often
constexpr int64_t kFlushSteps = 256;     // fp32 segment sums flushed to fp64 this often
constexpr int64_t kMinRowsPerChunk = 256;
constexpr int64_t kMaxRowChunks = 64;
constexpr int64_t kGrainElements = 32768;  // below this, one thread does the work

template <typename Vec>
double horizontal_sum(const Vec& v) {
  using T = typename Vec::value_type;
  alignas(64) T lanes[Vec::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t i = 0; i < Vec::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

// Sum of p and of (p - t)^2 over n contiguous elements, in fp32 (fp64 for double) vector
// lanes, flushed to double every kFlushSteps steps.
template <typename scalar_t>
void reduce_segment(const scalar_t* p, const scalar_t* t, int64_t n, double& sum_out,
                    double& sse_out) {
  using P = OpmathPair<scalar_t>;
  using Vec = typename P::Vec;
  double sum = 0.0, sse = 0.0;
  Vec sum_v(0), sse_v(0);
  int64_t steps = 0, i = 0;
  Vec p_lo, p_hi, t_lo, t_hi;
  for (; i + P::kStep <= n; i += P::kStep) {
    P::load(p + i, p_lo, p_hi);
    P::load(t + i, t_lo, t_hi);
    const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
    sum_v = sum_v + (p_lo + p_hi);
    sse_v = at::vec::fmadd(d_lo, d_lo, at::vec::fmadd(d_hi, d_hi, sse_v));
    if (++steps == kFlushSteps) {
      sum += horizontal_sum(sum_v);
      sse += horizontal_sum(sse_v);
      sum_v = Vec(0);
      sse_v = Vec(0);
      steps = 0;
    }
  }
  if (i < n) {  // ragged tail: missing lanes load as zero and add nothing
    P::load_partial(p + i, n - i, p_lo, p_hi);
    P::load_partial(t + i, n - i, t_lo, t_hi);
    const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
    sum_v = sum_v + (p_lo + p_hi);
    sse_v = at::vec::fmadd(d_lo, d_lo, at::vec::fmadd(d_hi, d_hi, sse_v));
  }
  sum_out = sum + horizontal_sum(sum_v);
  sse_out = sse + horizontal_sum(sse_v);
}

// Column mode: see the file comment.
template <typename scalar_t>
void stats_columns(const scalar_t* pred, const scalar_t* target, int64_t B, int64_t C,
                   int64_t R, double* sse_out, double* channel_sums) {
  using P = OpmathPair<scalar_t>;
  using opmath_t = typename P::opmath_t;
  using Vec = typename P::Vec;
  const int64_t L = C * R;
  const int64_t rows_per_chunk =
      std::max(kMinRowsPerChunk, (B + kMaxRowChunks - 1) / kMaxRowChunks);
  const int64_t row_chunks = (B + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t column_blocks = (L + kColumnBlock - 1) / kColumnBlock;
  const int64_t tiles = row_chunks * column_blocks;

  std::vector<double> column_partial(row_chunks * L, 0.0);  // [row chunk][column]
  std::vector<double> sse_partial(tiles, 0.0);               // [tile]

  const int64_t tile_elements = std::min(rows_per_chunk, B) * std::min(L, kColumnBlock);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, tile_elements));
  at::parallel_for(0, tiles, grain, [&](int64_t tile_begin, int64_t tile_end) {
    alignas(64) opmath_t acc[kColumnBlock];
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t chunk = tile / column_blocks, block = tile % column_blocks;
      const int64_t r0 = chunk * rows_per_chunk, r1 = std::min(B, r0 + rows_per_chunk);
      const int64_t c0 = block * kColumnBlock, width = std::min(kColumnBlock, L - c0);
      double* partial = column_partial.data() + chunk * L + c0;
      std::fill(acc, acc + width, opmath_t(0));
      Vec sse_v(0);
      double sse = 0.0;
      Vec p_lo, p_hi, t_lo, t_hi;

      auto flush = [&]() {
        for (int64_t j = 0; j < width; ++j) partial[j] += static_cast<double>(acc[j]);
        std::fill(acc, acc + width, opmath_t(0));
        sse += horizontal_sum(sse_v);
        sse_v = Vec(0);
      };

      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* p = pred + r * L + c0;
        const scalar_t* t = target + r * L + c0;
        int64_t j = 0;
        for (; j + P::kStep <= width; j += P::kStep) {
          P::load(p + j, p_lo, p_hi);
          P::load(t + j, t_lo, t_hi);
          const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
          sse_v = at::vec::fmadd(d_lo, d_lo, at::vec::fmadd(d_hi, d_hi, sse_v));
          (Vec::loadu(acc + j) + p_lo).store(acc + j);
          (Vec::loadu(acc + j + Vec::size()) + p_hi).store(acc + j + Vec::size());
        }
        if (j < width) {
          const int64_t rest = width - j;
          P::load_partial(p + j, rest, p_lo, p_hi);
          P::load_partial(t + j, rest, t_lo, t_hi);
          const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
          sse_v = at::vec::fmadd(d_lo, d_lo, at::vec::fmadd(d_hi, d_hi, sse_v));
          alignas(64) opmath_t lanes[P::kStep];
          p_lo.store(lanes);
          p_hi.store(lanes + Vec::size());
          for (int64_t k = 0; k < rest; ++k) acc[j + k] += lanes[k];
        }
        if ((r - r0 + 1) % kFlushRows == 0) flush();
      }
      flush();
      sse_partial[tile] = sse;
    }
  });

  double sse = 0.0;
  for (int64_t tile = 0; tile < tiles; ++tile) sse += sse_partial[tile];
  *sse_out = sse;
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0;
    for (int64_t chunk = 0; chunk < row_chunks; ++chunk) {
      const double* partial = column_partial.data() + chunk * L + c * R;
      for (int64_t r = 0; r < R; ++r) s += partial[r];
    }
    channel_sums[c] = s;
  }
}

// Segment mode: see the file comment. Also serves per-sample statistics with short
// segments, where a segment may be a single element.
template <typename scalar_t>
void stats_segments(const scalar_t* pred, const scalar_t* target, int64_t B, int64_t C,
                    int64_t R, bool per_sample, double* sse_out, double* channel_sums) {
  const int64_t segments = B * C;
  std::vector<double> segment_sum(per_sample ? 0 : segments);
  std::vector<double> segment_sse(segments);
  double* sums = per_sample ? channel_sums : segment_sum.data();  // [B, C] either way
  const int64_t grain = std::max<int64_t>(1, kGrainElements / R);
  at::parallel_for(0, segments, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const scalar_t* p = pred + s * R;
      const scalar_t* t = target + s * R;
      if (R < kSegmentMin) {  // short segments (per-sample only): a scalar loop is faster
        double sum = 0.0, sse = 0.0;
        for (int64_t r = 0; r < R; ++r) {
          const double pv = static_cast<double>(p[r]);
          const double d = pv - static_cast<double>(t[r]);
          sum += pv;
          sse += d * d;
        }
        sums[s] = sum;
        segment_sse[s] = sse;
      } else {
        reduce_segment(p, t, R, sums[s], segment_sse[s]);
      }
    }
  });
  double sse = 0.0;
  for (int64_t s = 0; s < segments; ++s) sse += segment_sse[s];
  *sse_out = sse;
  if (!per_sample) {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int64_t b = 0; b < B; ++b) s += segment_sum[b * C + c];
      channel_sums[c] = s;
    }
  }
}

// grad_pred = gk * (p - t) + a,  grad_true = -gk * (p - t) over n elements, where a is
// either one value for all n (kBroadcast) or one value per element (a_ptr).
template <typename scalar_t, bool kBroadcast>
void backward_span(const scalar_t* p, const scalar_t* t, int64_t n,
                   const at::opmath_type<scalar_t>* a_ptr, at::opmath_type<scalar_t> a_value,
                   at::opmath_type<scalar_t> gk, scalar_t* grad_pred, scalar_t* grad_true) {
  using P = OpmathPair<scalar_t>;
  using Vec = typename P::Vec;
  const Vec gk_v(gk), neg_gk_v(-gk), a_v(a_value);
  Vec p_lo, p_hi, t_lo, t_hi;
  auto a_lo = [&](int64_t i) { return kBroadcast ? a_v : Vec::loadu(a_ptr + i); };
  auto a_hi = [&](int64_t i) { return kBroadcast ? a_v : Vec::loadu(a_ptr + i + Vec::size()); };
  int64_t i = 0;
  for (; i + P::kStep <= n; i += P::kStep) {
    P::load(p + i, p_lo, p_hi);
    P::load(t + i, t_lo, t_hi);
    const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
    if (grad_pred) {
      P::store(grad_pred + i, at::vec::fmadd(gk_v, d_lo, a_lo(i)),
               at::vec::fmadd(gk_v, d_hi, a_hi(i)));
    }
    if (grad_true) P::store(grad_true + i, neg_gk_v * d_lo, neg_gk_v * d_hi);
  }
  if (i < n) {
    const int64_t rest = n - i;
    P::load_partial(p + i, rest, p_lo, p_hi);
    P::load_partial(t + i, rest, t_lo, t_hi);
    const Vec d_lo = p_lo - t_lo, d_hi = p_hi - t_hi;
    if (grad_pred) {
      alignas(64) at::opmath_type<scalar_t> a_tail[P::kStep] = {};
      for (int64_t k = 0; k < rest; ++k) a_tail[k] = kBroadcast ? a_value : a_ptr[i + k];
      P::store_partial(grad_pred + i, rest, at::vec::fmadd(gk_v, d_lo, Vec::loadu(a_tail)),
                       at::vec::fmadd(gk_v, d_hi, Vec::loadu(a_tail + Vec::size())));
    }
    if (grad_true) P::store_partial(grad_true + i, rest, neg_gk_v * d_lo, neg_gk_v * d_hi);
  }
}

template <typename scalar_t>
void backward_impl(const EtherBackwardArgs& args) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto* pred = static_cast<const scalar_t*>(args.y_pred);
  const auto* target = static_cast<const scalar_t*>(args.y_true);
  const auto* coef = static_cast<const opmath_t*>(args.coef);
  auto* grad_pred = static_cast<scalar_t*>(args.grad_pred);
  auto* grad_true = static_cast<scalar_t*>(args.grad_true);
  const int64_t B = args.B, C = args.C, R = args.R, L = C * R;
  const auto g = static_cast<opmath_t>(args.upstream);
  const auto gk = static_cast<opmath_t>(args.upstream * args.intra_scale);
  auto offset_ptr = [](auto* base, int64_t offset) { return base ? base + offset : base; };

  if (R >= kSegmentMin) {
    // One broadcast coefficient per (b, c) segment.
    const int64_t grain = std::max<int64_t>(1, 2 * kGrainElements / R);
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const opmath_t a = g * coef[args.per_sample ? s : s % C];
        backward_span<scalar_t, true>(pred + s * R, target + s * R, R, nullptr, a, gk,
                                      offset_ptr(grad_pred, s * R), offset_ptr(grad_true, s * R));
      }
    });
    return;
  }
  // Short channels: expand the coefficients to one per column of a row (L values), once
  // for batch statistics, once per row (in a per-thread buffer) for per-sample ones.
  auto expand = [&](const opmath_t* row_coef, opmath_t* columns) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t r = 0; r < R; ++r) columns[c * R + r] = g * row_coef[c];
  };
  std::vector<opmath_t> shared_columns;
  if (!args.per_sample && grad_pred) {
    shared_columns.resize(L);
    expand(coef, shared_columns.data());
  }
  const int64_t grain = std::max<int64_t>(1, 2 * kGrainElements / L);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> row_columns(args.per_sample && grad_pred ? L : 0);
    for (int64_t b = begin; b < end; ++b) {
      const opmath_t* columns = shared_columns.data();
      if (args.per_sample && grad_pred) {
        expand(coef + b * C, row_columns.data());
        columns = row_columns.data();
      }
      backward_span<scalar_t, false>(pred + b * L, target + b * L, L, columns, opmath_t(0), gk,
                                     offset_ptr(grad_pred, b * L), offset_ptr(grad_true, b * L));
    }
  });
}

}  // namespace

void ether_loss_stats(const EtherStatsArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "ether_loss_stats", [&] {
    const auto* pred = static_cast<const scalar_t*>(args.y_pred);
    const auto* target = static_cast<const scalar_t*>(args.y_true);
    if (args.per_sample || args.R >= kSegmentMin) {
      stats_segments(pred, target, args.B, args.C, args.R, args.per_sample, args.sse,
                     args.channel_sums);
    } else {
      stats_columns(pred, target, args.B, args.C, args.R, args.sse, args.channel_sums);
    }
  });
}

void ether_loss_backward(const EtherBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "ether_loss_backward",
                                  [&] { backward_impl<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace ether_kernels::cpu
