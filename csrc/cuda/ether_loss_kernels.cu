// Ether loss CUDA kernels: the fused forward statistics, the finalize step and the one-pass
// backward. Pure CUDA (no torch); entry points in kernels_cuda.h, binding in ops_cuda.cpp.
//
// The input (B, C, *rest) is viewed as (B, C, R): B rows of L = C * R contiguous elements,
// channel c of row b owning the segment [b L + c R, b L + (c + 1) R).
//
// Forward, four small launches on one stream, no host synchronisation:
//   1. stats: one pass over y_pred and y_true giving sse = sum (p - t)^2 and S[c] = sum of
//      y_pred over channel c (over the batch; over each sample when per_sample). Every block
//      writes its partial sums to its own workspace slots (no atomics). Two kernels, by shape:
//        short channels (R <= kThreads * kVec, i.e. a whole channel fits in one block's
//          width): a block tile is a chunk of rows x a run of whole channels. Thread (ty, tx)
//          owns one unit (kVec columns) and walks the rows ty, ty + TY, ... adding into
//          per-column registers, so loads are coalesced along the row and no per-element
//          channel arithmetic is needed; the column sums then meet in shared memory and
//          become channel sums.
//        long channels (R > kThreads * kVec): a tile is a chunk of rows x one channel x one
//          piece of the channel's columns, so every element of a tile belongs to the same
//          channel: each thread keeps one running sum and the block reduces it once.
//   2. reduce: one warp per output adds that output's tile partials (and one warp the
//      blocks' sse partials) in a fixed order.
//   3. finalize: one thread per row (1, or B when per_sample) runs math::finalize_row:
//      inter_row and coef[c] (ether_loss_math.h has the formulas).
//   4. loss: one block adds the rows' inter terms in a fixed order and writes
//      loss = intra + alpha * inter (exactly intra when alpha == 0), intra = sse / N or sse.
//
// Precision: elements are accumulated in fp32 (fp64 for fp64 inputs); each fp32 running sum
// is folded into an fp64 one every kFlushSteps steps (the CPU kernels do the same), and all
// partial sums from there on are fp64.
//
// Determinism: the grid, the tiles and the order of every addition depend only on the shape
// and dtype (not on timing, nor on the GPU's SM count), so the results are bitwise
// reproducible from run to run. Alignment only chooses between a 16-byte load and element
// loads of the same values, in the same lanes.
//
// Backward: one grid-stride elementwise pass, see backward_kernel.

#include "kernels_cuda.h"

#include "../common/ether_loss_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ether_kernels::cuda {
namespace {

using namespace detail;

// 256 threads = 8 warps: enough warps per block for the fixed-order shared-memory reductions
// to be short, and 8 resident blocks fill an SM (2048 threads on A100/H100) with the
// register budget these kernels use.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
// Stats grid: at most 1024 blocks, about one full wave of 256-thread blocks on an H100 (132
// SMs x 8) or an A100 (108 x 8); larger inputs are covered by the grid-stride loops. It is a
// constant rather than a function of the SM count so that the summation order does not
// depend on the GPU model, and it bounds the partial sums the second stage has to add.
constexpr int64_t kMaxBlocks = 1024;
// fp32 running sums are folded into fp64 every 64 steps: each fp32 partial holds at most
// 64 * kVec (<= 512) terms, which keeps its rounding error near that of a pairwise sum.
constexpr int64_t kFlushSteps = 64;
// Short channels, batch statistics: each thread walks at least 16 rows of a tile, so the
// tile's shared-memory epilogue is amortised over enough loads.
constexpr int64_t kMinRowsPerThread = 16;
// Long channels: a segment is cut into pieces only down to 8 units per thread, for the same
// reason (each tile ends with a block reduction).
constexpr int64_t kMinTileUnits = 8 * kThreads;
// Elementwise (backward) grid cap: two waves' worth of blocks; beyond that the grid-stride
// loop takes over and block scheduling costs nothing more.
constexpr int64_t kElementwiseMaxBlocks = 2048;
// Finalize: 128 threads per block (one row each). The per-thread scratch (2 M doubles for
// the group sizes and finalize_row's group scratch) is capped at 2^20 doubles (8 MiB) in
// all; with more rows than threads, threads take several rows.
constexpr int kFinalizeThreads = 128;
constexpr int64_t kFinalizeScratchDoubles = int64_t(1) << 20;
// Workspace regions start on 256-byte boundaries (the caching allocator's granularity).
constexpr int64_t kWorkspaceAlign = 256;

int64_t pow2_ceil(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

int64_t pow2_floor(int64_t x) {
  int64_t p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}

// Everything the kernels need to know about the decomposition; a function of (shape, dtype,
// per_sample, M) only. Passed to the kernels by value.
struct StatsPlan {
  int64_t B, C, R, L;
  bool per_sample;
  bool short_channels;
  // Short channels: cpb whole channels per tile, channel_blocks = ceil(C / cpb) runs of
  // them, a tx x ty thread layout (tx units across the run, ty rows), and sum_group lanes
  // adding up one channel in the epilogue.
  int64_t cpb, channel_blocks, tx, ty, sum_group;
  // Long channels: units = ceil(R / kVec) per segment, cut into pieces of piece_units.
  int64_t units, pieces, piece_units;
  // Rows per tile and number of row chunks; tiles; stats grid.
  int64_t rows_per_chunk, row_chunks, tiles, grid;
  // Stage 2: outputs[o] = sum_{i < terms_i, j < terms_j} partial[o terms_j + i stride_i + j].
  int64_t outputs, terms_i, terms_j, stride_i, partials;
  // Finalize: rows (1 or B), threads, and groups M.
  int64_t rows, finalize_threads, M;
};

StatsPlan make_plan(int64_t B, int64_t C, int64_t R, bool per_sample, int64_t vec, int64_t M) {
  StatsPlan p{};
  p.B = B;
  p.C = C;
  p.R = R;
  p.L = C * R;
  p.per_sample = per_sample;
  p.M = M;
  const int64_t block_width = kThreads * vec;  // columns one block covers with one unit each
  p.short_channels = R <= block_width;
  if (p.short_channels) {
    p.cpb = min64(C, block_width / R);
    p.channel_blocks = ceil_div(C, p.cpb);
    p.tx = pow2_ceil(ceil_div(p.cpb * R, vec));  // <= kThreads
    p.ty = kThreads / p.tx;
    p.sum_group = pow2_floor(min64(R, kWarpSize));
    if (per_sample) {
      // One row per thread row: the tile's (row, channel) sums are final.
      p.rows_per_chunk = p.ty;
      p.row_chunks = ceil_div(B, p.ty);
      p.outputs = p.terms_i = p.terms_j = p.stride_i = p.partials = 0;
    } else {
      const int64_t chunks =
          clamp64(kMaxBlocks / p.channel_blocks, 1, max64(1, B / (p.ty * kMinRowsPerThread)));
      p.rows_per_chunk = ceil_div(B, chunks);
      p.row_chunks = ceil_div(B, p.rows_per_chunk);
      // partial[chunk][c]: channel c sums row_chunks terms with stride C.
      p.outputs = C;
      p.terms_i = p.row_chunks;
      p.terms_j = 1;
      p.stride_i = C;
      p.partials = p.row_chunks * C;
    }
    p.tiles = p.row_chunks * p.channel_blocks;
  } else {
    p.units = ceil_div(R, vec);
    const int64_t max_pieces = max64(1, p.units / kMinTileUnits);
    // Cut segments only when there are too few (rows x channels) to fill the grid.
    const int64_t pieces =
        clamp64(ceil_div(kMaxBlocks, per_sample ? B * C : C), 1, max_pieces);
    p.piece_units = ceil_div(p.units, pieces);
    p.pieces = ceil_div(p.units, p.piece_units);
    if (per_sample) {
      p.rows_per_chunk = 1;
      p.row_chunks = B;
      // tile (b, c, piece) = (b C + c) P + piece: output b C + c sums its P pieces.
      p.outputs = B * C;
      p.terms_i = 1;
      p.terms_j = p.pieces;
      p.stride_i = 0;
    } else {
      const int64_t chunks = clamp64(ceil_div(kMaxBlocks, C * p.pieces), 1, B);
      p.rows_per_chunk = ceil_div(B, chunks);
      p.row_chunks = ceil_div(B, p.rows_per_chunk);
      // tile (chunk, c, piece) = (chunk C + c) P + piece: channel c sums row_chunks x P.
      p.outputs = C;
      p.terms_i = p.row_chunks;
      p.terms_j = p.pieces;
      p.stride_i = C * p.pieces;
    }
    p.tiles = p.row_chunks * C * p.pieces;
    p.partials = p.tiles;
  }
  p.grid = min64(p.tiles, kMaxBlocks);
  p.rows = per_sample ? B : 1;
  p.finalize_threads = clamp64(kFinalizeScratchDoubles / max64(1, 2 * M), 1, p.rows);
  return p;
}

// Byte offsets of the workspace regions, all fp64, each rounded up to 256 bytes:
//   partials      plan.partials          tile partial sums of y_pred (stage 1 -> 2):
//                                          short channels, batch: row_chunks x C, where
//                                            row_chunks <= max(1, kMaxBlocks / channel_blocks);
//                                          short channels, per sample: none (stage 1 writes
//                                            channel_sums directly);
//                                          long channels: one per tile, row_chunks x C x
//                                            pieces; a tile spans > 256 units, so this is
//                                            below numel / (256 kVec) + C x pieces.
//   sse_partials  plan.grid (<= 1024)    one sse partial per stats block
//   sse           1
//   channel_sums  rows x C               rows = B per sample, else 1
//   inter_rows    rows                   finalize output
//   scratch       finalize_threads x 2M  group sizes + finalize_row's group scratch;
//                                        finalize_threads = clamp(2^20 / 2M, 1, rows)
// Total = 8 bytes x (partials + grid + 1 + rows (C + 1) + finalize_threads 2 M) + padding.
// With batch statistics it is small next to the input (1.5 KiB for a (4096, 8) fp32 batch,
// 10 KiB for (64, 3, 224, 224)); per sample, channel_sums alone holds B x C doubles (as the
// CPU op's host buffer does), i.e. 8 / (R x itemsize) of the input's size.
struct Layout {
  int64_t partials, sse_partials, sse, channel_sums, inter_rows, scratch, bytes;
};

Layout make_layout(const StatsPlan& p) {
  Layout l{};
  int64_t offset = 0;
  auto take = [&offset](int64_t doubles) {
    const int64_t at = offset;
    offset += ceil_div(doubles * static_cast<int64_t>(sizeof(double)), kWorkspaceAlign) *
              kWorkspaceAlign;
    return at;
  };
  l.partials = take(p.partials);
  l.sse_partials = take(p.grid);
  l.sse = take(1);
  l.channel_sums = take(p.rows * p.C);
  l.inter_rows = take(p.rows);
  l.scratch = take(p.finalize_threads * 2 * p.M);
  l.bytes = offset;
  return l;
}

// ---------------------------------------------------------------------------------------
// Stage 1, short channels. Tile = (row chunk, run of cpb whole channels); block threads are
// laid out as ty rows x tx units (tx a power of two, tid = ty * tx + tx_index). Thread
// (ty, tx) owns columns [tx kVec, tx kVec + kVec) of the run and adds rows r_begin + ty,
// r_begin + ty + TY, ... of the chunk into one fp32 register per column.
// Epilogue (shared memory `columns`, pitch tx kVec doubles per row):
//   batch:      the rows of one warp are first combined by shuffles (lanes with the same tx),
//               leaving kThreads / max(tx, 32) <= 8 rows of column sums; channel j of the
//               run then sums its R columns over those rows -> out[chunk C + c].
//   per_sample: each thread row is its own sample: channel j of row y sums its R columns
//               -> out[(r_begin + y) C + c], which is final.
// Channel sums are computed by groups of sum_group lanes (a power of two <= min(R, 32)) that
// stride over the R columns and meet in a shuffle tree.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    stats_short_kernel(const T* __restrict__ pred, const T* __restrict__ target,
                       const StatsPlan plan, double* __restrict__ channel_out,
                       double* __restrict__ sse_partials) {
  using acc = acc_t<T>;
  constexpr int V = kVec<T>;
  __shared__ double columns[kThreads * V];
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int tx = tid % static_cast<int>(plan.tx), ty = tid / static_cast<int>(plan.tx);
  const int64_t pitch = plan.tx * V;
  const int64_t col = static_cast<int64_t>(tx) * V;  // this thread's first column in the run
  // Rows of column sums the batch epilogue adds: 8 warp rows when tx < 32, else ty rows.
  const int row_span = plan.tx > kWarpSize ? static_cast<int>(plan.tx) : kWarpSize;
  const int64_t group = plan.sum_group, groups_per_warp = kWarpSize / group;
  const int64_t sub = lane / group, glane = lane % group;
  double sse_total = 0.0;

  for (int64_t tile = blockIdx.x; tile < plan.tiles; tile += gridDim.x) {
    const int64_t chunk = tile / plan.channel_blocks, cb = tile - chunk * plan.channel_blocks;
    const int64_t c0 = cb * plan.cpb, nch = min64(plan.cpb, plan.C - c0), width = nch * plan.R;
    const int64_t r_begin = chunk * plan.rows_per_chunk;
    const int64_t r_end = min64(plan.B, r_begin + plan.rows_per_chunk);

    // fp64 column sums live in this thread's private slots of `columns` (touched only on a
    // flush, which keeps them out of registers): columns[tid kVec + v], which is also entry
    // [ty][tx kVec + v] of the pitch layout below.
    double* slot = columns + static_cast<int64_t>(tid) * V;
#pragma unroll
    for (int v = 0; v < V; ++v) slot[v] = 0.0;
    double sse = 0.0;
    if (col < width) {
      const int64_t valid = min64(V, width - col);
      acc part[V], p[V], t[V];
      acc sse_part = 0;
#pragma unroll
      for (int v = 0; v < V; ++v) part[v] = 0;
      int64_t steps = 0;
      for (int64_t r = r_begin + ty; r < r_end; r += plan.ty) {
        const int64_t offset = r * plan.L + c0 * plan.R + col;
        load_unit<T, kAligned>(pred + offset, valid, p);
        load_unit<T, kAligned>(target + offset, valid, t);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc d = p[v] - t[v];
          part[v] += p[v];
          sse_part = fma_acc(d, d, sse_part);
        }
        if (++steps == kFlushSteps) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            slot[v] += static_cast<double>(part[v]);
            part[v] = 0;
          }
          sse += static_cast<double>(sse_part);
          sse_part = 0;
          steps = 0;
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) slot[v] += static_cast<double>(part[v]);
      sse += static_cast<double>(sse_part);
    }
    sse_total += sse;

    // Batch statistics with tx < 32: a warp holds 32 / tx rows of the same columns; combine
    // them (xor over the row bits of the lane) and let the warp's first row write them as
    // row `warp` of the pitch layout. Otherwise the private slots already are that layout
    // (row ty).
    if (!plan.per_sample && plan.tx < kWarpSize) {
      double sums[V];
#pragma unroll
      for (int v = 0; v < V; ++v) sums[v] = slot[v];
      __syncthreads();  // every slot read before any is overwritten
      for (int offset = static_cast<int>(plan.tx); offset < kWarpSize; offset *= 2) {
#pragma unroll
        for (int v = 0; v < V; ++v) sums[v] += __shfl_xor_sync(kFullMask, sums[v], offset);
      }
      if (lane < plan.tx) {
#pragma unroll
        for (int v = 0; v < V; ++v) columns[warp * pitch + col + v] = sums[v];
      }
    }
    __syncthreads();

    // Channel sums: `jobs` (row, channel) pairs per sample, or channels for the batch.
    const int64_t rows_in_tile = r_end - r_begin;
    const int64_t srows = kThreads / row_span;  // rows of column sums left (batch)
    const int64_t jobs = plan.per_sample ? rows_in_tile * nch : nch;
    // `base` is the same for all lanes of a warp, so every lane reaches the shuffles.
    for (int64_t base = warp * groups_per_warp; base < jobs; base += kWarps * groups_per_warp) {
      const int64_t job = base + sub;
      double s = 0.0;
      if (job < jobs) {
        if (plan.per_sample) {
          const int64_t y = job / nch, j = job - y * nch;
          const double* row = columns + y * pitch + j * plan.R;
          for (int64_t k = glane; k < plan.R; k += group) s += row[k];
        } else {
          for (int64_t k = glane; k < plan.R; k += group) {
            for (int64_t y = 0; y < srows; ++y) s += columns[y * pitch + job * plan.R + k];
          }
        }
      }
      for (int64_t offset = group / 2; offset > 0; offset /= 2) {
        s += __shfl_xor_sync(kFullMask, s, static_cast<int>(offset));
      }
      if (job < jobs && glane == 0) {
        if (plan.per_sample) {
          const int64_t y = job / nch, j = job - y * nch;
          channel_out[(r_begin + y) * plan.C + c0 + j] = s;
        } else {
          channel_out[chunk * plan.C + c0 + job] = s;
        }
      }
    }
    __syncthreads();  // `columns` is rewritten by the next tile
  }

  const double sse = block_sum<kThreads>(sse_total);
  if (tid == 0) sse_partials[blockIdx.x] = sse;
}

// Stage 1, long channels. Tile t = (chunk C + c) P + piece covers rows
// [chunk rows_per_chunk, ...) of channel c, units [piece piece_units, ...) of each segment.
// The block's threads walk the tile's (row, unit) pairs in row-major order, kThreads apart,
// so consecutive threads read consecutive 16-byte units; all elements of the tile are in
// channel c, so a thread keeps a single running sum. partial[t] = block sum.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    stats_long_kernel(const T* __restrict__ pred, const T* __restrict__ target,
                      const StatsPlan plan, double* __restrict__ tile_sums,
                      double* __restrict__ sse_partials) {
  using acc = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t tiles_per_chunk = plan.C * plan.pieces;
  double sse_total = 0.0;

  for (int64_t tile = blockIdx.x; tile < plan.tiles; tile += gridDim.x) {
    const int64_t chunk = tile / tiles_per_chunk, rest = tile - chunk * tiles_per_chunk;
    const int64_t c = rest / plan.pieces, piece = rest - c * plan.pieces;
    const int64_t u_begin = piece * plan.piece_units;
    const int64_t width = min64(plan.units, u_begin + plan.piece_units) - u_begin;
    const int64_t r_begin = chunk * plan.rows_per_chunk;
    const int64_t rows = min64(plan.B, r_begin + plan.rows_per_chunk) - r_begin;

    acc sum_part = 0, sse_part = 0;
    double sum = 0.0, sse = 0.0;
    int64_t steps = 0;
    int64_t row = threadIdx.x / width, unit = threadIdx.x - row * width;
    while (row < rows) {
      const int64_t elem = (u_begin + unit) * V;  // offset in the segment
      const int64_t valid = min64(V, plan.R - elem);
      const int64_t offset = (r_begin + row) * plan.L + c * plan.R + elem;
      acc p[V], t[V];
      load_unit<T, kAligned>(pred + offset, valid, p);
      load_unit<T, kAligned>(target + offset, valid, t);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc d = p[v] - t[v];
        sum_part += p[v];
        sse_part = fma_acc(d, d, sse_part);
      }
      if (++steps == kFlushSteps) {
        sum += static_cast<double>(sum_part);
        sse += static_cast<double>(sse_part);
        sum_part = sse_part = 0;
        steps = 0;
      }
      unit += kThreads;
      while (unit >= width) {  // one step unless the tile is narrower than the block
        unit -= width;
        ++row;
      }
    }
    sum += static_cast<double>(sum_part);
    sse_total += sse + static_cast<double>(sse_part);
    const double tile_sum = block_sum<kThreads>(sum);
    if (threadIdx.x == 0) tile_sums[tile] = tile_sum;
  }

  const double sse = block_sum<kThreads>(sse_total);
  if (threadIdx.x == 0) sse_partials[blockIdx.x] = sse;
}

// Stage 2: warp o < outputs writes out[o] = sum_{i, j} partial[o terms_j + i stride_i + j];
// warp `outputs` writes *sse = sum of the n_sse block partials. Lane k adds terms k, k + 32,
// ... and the warp tree finishes: a fixed order. The number of terms per output is bounded by
// the plan (about kMaxBlocks / C, or the pieces of one segment).
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(const double* __restrict__ partials, int64_t outputs, int64_t terms_i,
                  int64_t terms_j, int64_t stride_i, double* __restrict__ out,
                  const double* __restrict__ sse_partials, int64_t n_sse,
                  double* __restrict__ sse_out) {
  const int64_t w = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (w > outputs) return;  // whole warps only
  double s = 0.0;
  if (w < outputs) {
    const int64_t terms = terms_i * terms_j;
    for (int64_t q = lane; q < terms; q += kWarpSize) {
      const int64_t i = q / terms_j, j = q - i * terms_j;
      s += partials[w * terms_j + i * stride_i + j];
    }
  } else {
    for (int64_t q = lane; q < n_sse; q += kWarpSize) s += sse_partials[q];
  }
  s = warp_sum(s);
  if (lane == 0) {
    if (w < outputs) out[w] = s;
    else *sse_out = s;
  }
}

__device__ __forceinline__ double quiet_nan() { return __longlong_as_double(0x7ff8000000000000LL); }

// Stage 3: thread k < finalize_threads finalizes rows k, k + finalize_threads, ... with
// math::finalize_row (n elements per channel in a row's scope, coef scaled by `scale`).
// Each thread first counts the group sizes into its scratch and checks the membership: an
// index out of range or an empty group gives NaN coefficients and a NaN inter term (the host
// validates CPU-resident memberships before the launch; device-resident ones can only be
// checked here without a host synchronisation).
template <typename coef_t>
__global__ void finalize_kernel(const double* __restrict__ channel_sums, int64_t rows,
                                int64_t threads, int64_t C, double n,
                                const int64_t* __restrict__ member_channel,
                                const int64_t* __restrict__ member_group, int64_t E,
                                const double* __restrict__ weights, int64_t M,
                                int64_t discrepancy, double scale, double* __restrict__ scratch,
                                coef_t* __restrict__ coef, double* __restrict__ inter_rows) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= threads || k >= rows) return;
  double* group_size = scratch + k * 2 * M;
  double* group_scratch = group_size + M;
  bool valid = true;
  for (int64_t m = 0; m < M; ++m) group_size[m] = 0.0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t ch = member_channel[e], g = member_group[e];
    if (ch < 0 || ch >= C || g < 0 || g >= M) {
      valid = false;
      break;
    }
    group_size[g] += 1.0;
  }
  for (int64_t m = 0; valid && m < M; ++m) valid = group_size[m] > 0.0;

  for (int64_t row = k; row < rows; row += threads) {
    coef_t* row_coef = coef + row * C;
    if (!valid) {
      for (int64_t c = 0; c < C; ++c) row_coef[c] = static_cast<coef_t>(quiet_nan());
      inter_rows[row] = quiet_nan();
      continue;
    }
    inter_rows[row] = math::finalize_row<coef_t>(
        channel_sums + row * C, C, n, member_channel, member_group, E, group_size, weights, M,
        discrepancy, scale, group_scratch, row_coef);
  }
}

// Stage 4 (one block): inter = sum of the rows' inter terms (averaged over B when
// per_sample), intra = sse / numel (mean) or sse (sum), loss = intra + alpha * inter, or
// exactly intra when alpha == 0 (even if inter is not finite).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(const double* __restrict__ sse, const double* __restrict__ inter_rows,
                int64_t rows, bool per_sample, double numel, int64_t reduction, double alpha,
                T* __restrict__ loss) {
  double s = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) s += inter_rows[r];
  s = block_sum<kThreads>(s);
  if (threadIdx.x == 0) {
    const double inter = per_sample ? s / static_cast<double>(rows) : s;
    const double intra = reduction == math::kMean ? *sse / numel : *sse;
    *loss = from_double<T>(alpha == 0.0 ? intra : intra + alpha * inter);
  }
}

// Backward: grid-stride over units of kVec elements (int64 indices). For element e the
// coefficient index is chan = (e / R) % C, or e / R per sample; instead of dividing per
// element, each thread tracks (segment, offset in segment, channel) and advances them by
// carries: by one within a unit, by the grid stride (pre-divided once) between units.
//   a = g * coef[chan], grad_pred = gk (p - t) + a, grad_true = -gk (p - t),
//   g = upstream, gk = upstream * intra_scale (rounded once to the accumulation type, as on
//   the CPU).
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ pred, const T* __restrict__ target,
                    const T* __restrict__ grad_loss, const acc_t<T>* __restrict__ coef, int64_t n,
                    int64_t C, int64_t R, bool per_sample, double intra_scale,
                    T* __restrict__ grad_pred, T* __restrict__ grad_true) {
  using acc = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t units = ceil_div(n, V);
  int64_t unit = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (unit >= units) return;
  const double upstream = static_cast<double>(to_acc(*grad_loss));
  const acc g = static_cast<acc>(upstream);
  const acc gk = static_cast<acc>(upstream * intra_scale);

  const int64_t unit_stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t step = unit_stride * V;  // elements between a thread's consecutive units
  const int64_t step_seg = step / R, step_off = step - step_seg * R, step_chan = step_seg % C;
  int64_t e = unit * V;
  int64_t seg = e / R, off = e - seg * R, chan = seg % C;

  for (; unit < units; unit += unit_stride) {
    const int64_t valid = min64(V, n - e);
    acc p[V], t[V], gp[V], gt[V];
    load_unit<T, kAligned>(pred + e, valid, p);
    load_unit<T, kAligned>(target + e, valid, t);
    int64_t s = seg, o = off, c = chan;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const acc d = p[v] - t[v];
      gp[v] = v < valid ? fma_acc(gk, d, g * coef[per_sample ? s : c]) : acc(0);
      gt[v] = -gk * d;
      if (++o == R) {
        o = 0;
        ++s;
        if (++c == C) c = 0;
      }
    }
    if (grad_pred != nullptr) store_unit<T, kAligned>(grad_pred + e, valid, gp);
    if (grad_true != nullptr) store_unit<T, kAligned>(grad_true + e, valid, gt);

    e += step;
    seg += step_seg;
    off += step_off;
    chan += step_chan;
    if (off >= R) {
      off -= R;
      ++seg;
      ++chan;
    }
    if (chan >= C) chan -= C;
  }
}

// Launch errors (bad configuration, no kernel image for the device, ...) are reported by
// cudaGetLastError right after the launch; return the first one.
#define ETHER_RETURN_IF_LAUNCH_FAILED()                     \
  do {                                                      \
    const cudaError_t launch_error = cudaGetLastError();    \
    if (launch_error != cudaSuccess) return launch_error;   \
  } while (0)

// Stage 3, batch statistics with few modalities (rows == 1, M <= kBlockFinalizeMaxGroups):
// the same math as math::finalize_row, spread over one block instead of one thread (a
// single thread walking C, E and M through global memory costs hundreds of microseconds
// for C in the thousands). Deterministic: integer atomics for the group sizes, fixed-order
// tree reductions for the sums, and the coefficient scatter done one group at a time
// (a channel appears at most once in a group, so no two threads touch it at once).
constexpr int kBlockFinalizeThreads = 256;
constexpr int64_t kBlockFinalizeMaxGroups = 64;

__device__ double block_sum(double value, double* buffer) {
  buffer[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kBlockFinalizeThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) buffer[threadIdx.x] += buffer[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = buffer[0];
  __syncthreads();  // buffer is reused by the next call
  return total;
}

template <typename coef_t>
__global__ void finalize_batch_kernel(const double* __restrict__ channel_sums, int64_t C,
                                      double n, const int64_t* __restrict__ member_channel,
                                      const int64_t* __restrict__ member_group, int64_t E,
                                      const double* __restrict__ weights, int64_t M,
                                      int64_t discrepancy, double scale,
                                      coef_t* __restrict__ coef, double* __restrict__ inter_out) {
  __shared__ double buffer[kBlockFinalizeThreads];
  __shared__ unsigned long long count[kBlockFinalizeMaxGroups];
  __shared__ double group_sum[kBlockFinalizeMaxGroups];
  __shared__ double member_term[kBlockFinalizeMaxGroups];  // w_m s_m / (|g_m| n)
  __shared__ double shared_term;
  __shared__ int valid;
  const int64_t tid = threadIdx.x, step = blockDim.x;

  // 1. Group sizes, and whether the membership is valid (else NaN, as finalize_kernel).
  if (tid == 0) valid = 1;
  for (int64_t m = tid; m < M; m += step) count[m] = 0;
  __syncthreads();
  for (int64_t e = tid; e < E; e += step) {
    const int64_t ch = member_channel[e], g = member_group[e];
    if (ch < 0 || ch >= C || g < 0 || g >= M) {
      valid = 0;
    } else {
      atomicAdd(&count[g], 1ULL);
    }
  }
  __syncthreads();
  for (int64_t m = tid; m < M; m += step) {
    if (count[m] == 0) valid = 0;
  }
  __syncthreads();
  if (!valid) {
    for (int64_t c = tid; c < C; c += step) coef[c] = static_cast<coef_t>(quiet_nan());
    if (tid == 0) inter_out[0] = quiet_nan();
    return;
  }

  // 2. The overall mean and every group's sum.
  double partial = 0.0;
  for (int64_t c = tid; c < C; c += step) partial += channel_sums[c];
  const double overall = block_sum(partial, buffer) / (static_cast<double>(C) * n);
  for (int64_t m = 0; m < M; ++m) {
    partial = 0.0;
    for (int64_t e = tid; e < E; e += step) {
      if (member_group[e] == m) partial += channel_sums[member_channel[e]];
    }
    const double total = block_sum(partial, buffer);
    if (tid == 0) group_sum[m] = total;
  }
  __syncthreads();

  // 3. Gaps, inter term and per-group gradient terms (M is small: one thread, in order).
  if (tid == 0) {
    double inter = 0.0, shared = 0.0;
    for (int64_t m = 0; m < M; ++m) {
      const double size = static_cast<double>(count[m]);
      const double d = group_sum[m] / (size * n) - overall;
      inter += weights[m] * math::discrepancy_value(d, discrepancy);
      const double ws = weights[m] * math::discrepancy_slope(d, discrepancy);
      shared += ws;
      member_term[m] = ws / (size * n);
    }
    shared_term = shared / (static_cast<double>(C) * n);
    inter_out[0] = inter;
  }
  __syncthreads();

  // 4. coef[c] = scale * (sum over c's groups of member_term - shared_term).
  for (int64_t c = tid; c < C; c += step) coef[c] = static_cast<coef_t>(-scale * shared_term);
  __syncthreads();
  for (int64_t m = 0; m < M; ++m) {
    const coef_t add = static_cast<coef_t>(scale * member_term[m]);
    for (int64_t e = tid; e < E; e += step) {
      if (member_group[e] == m) coef[member_channel[e]] += add;
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t forward_impl(const EtherForwardArgs& a, cudaStream_t stream) {
  using coef_t = acc_t<T>;
  constexpr int V = kVec<T>;
  if (a.B <= 0 || a.C <= 0 || a.R <= 0 || a.E < 0 || a.M < 0) return cudaErrorInvalidValue;
  const StatsPlan plan = make_plan(a.B, a.C, a.R, a.per_sample, V, a.M);
  const Layout layout = make_layout(plan);
  if (a.workspace == nullptr || a.workspace_bytes < static_cast<size_t>(layout.bytes)) {
    return cudaErrorInvalidValue;
  }
  char* ws = static_cast<char*>(a.workspace);
  double* partials = reinterpret_cast<double*>(ws + layout.partials);
  double* sse_partials = reinterpret_cast<double*>(ws + layout.sse_partials);
  double* sse = reinterpret_cast<double*>(ws + layout.sse);
  double* channel_sums = reinterpret_cast<double*>(ws + layout.channel_sums);
  double* inter_rows = reinterpret_cast<double*>(ws + layout.inter_rows);
  double* scratch = reinterpret_cast<double*>(ws + layout.scratch);
  const T* pred = static_cast<const T*>(a.y_pred);
  const T* target = static_cast<const T*>(a.y_true);
  const bool base_aligned = aligned16(pred) && aligned16(target);
  const dim3 grid(static_cast<unsigned>(plan.grid)), block(kThreads);

  // 1. Statistics.
  if (plan.short_channels) {
    // Vector loads need every row start and every run start on a 16-byte boundary.
    const bool vector = base_aligned && plan.L % V == 0 && (plan.cpb * plan.R) % V == 0;
    double* out = plan.per_sample ? channel_sums : partials;
    if (vector) {
      stats_short_kernel<T, true><<<grid, block, 0, stream>>>(pred, target, plan, out,
                                                              sse_partials);
    } else {
      stats_short_kernel<T, false><<<grid, block, 0, stream>>>(pred, target, plan, out,
                                                               sse_partials);
    }
  } else {
    const bool vector = base_aligned && plan.R % V == 0;  // every segment start aligned
    if (vector) {
      stats_long_kernel<T, true><<<grid, block, 0, stream>>>(pred, target, plan, partials,
                                                             sse_partials);
    } else {
      stats_long_kernel<T, false><<<grid, block, 0, stream>>>(pred, target, plan, partials,
                                                              sse_partials);
    }
  }
  ETHER_RETURN_IF_LAUNCH_FAILED();

  // 2. Channel sums and sse.
  const int64_t reduce_blocks = ceil_div(plan.outputs + 1, kWarps);
  reduce_kernel<<<static_cast<unsigned>(reduce_blocks), kThreads, 0, stream>>>(
      partials, plan.outputs, plan.terms_i, plan.terms_j, plan.stride_i, channel_sums,
      sse_partials, plan.grid, sse);
  ETHER_RETURN_IF_LAUNCH_FAILED();

  // 3. Finalize every row: n elements per channel in its scope, coef scaled by alpha (or
  //    alpha / B, the per-sample average).
  const double n = a.per_sample ? static_cast<double>(a.R) : static_cast<double>(a.B * a.R);
  const double scale = a.per_sample ? a.alpha / static_cast<double>(a.B) : a.alpha;
  if (plan.rows == 1 && a.M <= kBlockFinalizeMaxGroups) {
    finalize_batch_kernel<coef_t><<<1, kBlockFinalizeThreads, 0, stream>>>(
        channel_sums, a.C, n, a.member_channel, a.member_group, a.E, a.weights, a.M,
        a.discrepancy, scale, static_cast<coef_t*>(a.coef), inter_rows);
  } else {
    const int64_t finalize_blocks = ceil_div(plan.finalize_threads, kFinalizeThreads);
    finalize_kernel<coef_t><<<static_cast<unsigned>(finalize_blocks), kFinalizeThreads, 0,
                              stream>>>(
        channel_sums, plan.rows, plan.finalize_threads, a.C, n, a.member_channel,
        a.member_group, a.E, a.weights, a.M, a.discrepancy, scale, scratch,
        static_cast<coef_t*>(a.coef), inter_rows);
  }
  ETHER_RETURN_IF_LAUNCH_FAILED();

  // 4. The loss.
  loss_kernel<T><<<1, kThreads, 0, stream>>>(sse, inter_rows, plan.rows, a.per_sample,
                                             static_cast<double>(a.B * a.C * a.R), a.reduction,
                                             a.alpha, static_cast<T*>(a.loss));
  ETHER_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
}

template <typename T>
cudaError_t backward_impl(const EtherBackwardArgs& a, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const int64_t n = a.B * a.C * a.R;
  if (n == 0 || (a.grad_pred == nullptr && a.grad_true == nullptr)) return cudaSuccess;
  const T* pred = static_cast<const T*>(a.y_pred);
  const T* target = static_cast<const T*>(a.y_true);
  T* grad_pred = static_cast<T*>(a.grad_pred);
  T* grad_true = static_cast<T*>(a.grad_true);
  const bool vector = aligned16(pred) && aligned16(target) &&
                      (grad_pred == nullptr || aligned16(grad_pred)) &&
                      (grad_true == nullptr || aligned16(grad_true));
  const int64_t blocks = min64(ceil_div(ceil_div(n, V), kThreads), kElementwiseMaxBlocks);
  const auto* grad_loss = static_cast<const T*>(a.grad_loss);
  const auto* coef = static_cast<const acc_t<T>*>(a.coef);
  if (vector) {
    backward_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pred, target, grad_loss, coef, n, a.C, a.R, a.per_sample, a.intra_scale, grad_pred,
        grad_true);
  } else {
    backward_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        pred, target, grad_loss, coef, n, a.C, a.R, a.per_sample, a.intra_scale, grad_pred,
        grad_true);
  }
  ETHER_RETURN_IF_LAUNCH_FAILED();
  return cudaSuccess;
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

}  // namespace

size_t ether_loss_forward_workspace_bytes(const EtherForwardArgs& args) {
  const int64_t vec = vec_of(args.dtype);
  if (vec == 0 || args.B <= 0 || args.C <= 0 || args.R <= 0 || args.M < 0) return 0;
  return static_cast<size_t>(
      make_layout(make_plan(args.B, args.C, args.R, args.per_sample, vec, args.M)).bytes);
}

cudaError_t ether_loss_forward(const EtherForwardArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return forward_impl<float>(args, stream);
    case DType::kFloat64: return forward_impl<double>(args, stream);
    case DType::kFloat16: return forward_impl<__half>(args, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ether_loss_backward(const EtherBackwardArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return backward_impl<float>(args, stream);
    case DType::kFloat64: return backward_impl<double>(args, stream);
    case DType::kFloat16: return backward_impl<__half>(args, stream);
    case DType::kBFloat16: return backward_impl<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ether_kernels::cuda
