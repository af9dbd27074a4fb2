// A minimal CUDA emulation for testing the kernels' logic on the CPU (no GPU needed): the
// .cu files are compiled as C++20 with their <<<grid, block, 0, stream>>> launches rewritten
// to emu::launch (see tests/test_cuda_kernels_emulated.py). One std::thread per CUDA thread,
// the blocks of a grid run one after another, __syncthreads is a block barrier, a shuffle a
// warp barrier, __shared__ a static (one block at a time), atomics std::atomic_ref.
// What it cannot find: races that need real warp timing, memory-model subtleties, and the
// accuracy of the fast special functions (here the exact std:: ones).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;

namespace emu {
inline thread_local dim3 tIdx, bIdx, bDim, gDim;
struct Block {
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<double> buf;  // 32 x 8 bytes per warp
};
inline Block* g_block = nullptr;
inline int g_launches = 0;
inline int64_t g_max_grid = 0;

template <class... P, class... A>
void launch(dim3 g, dim3 b, void (*k)(P...), A... a) {
  if (g.x == 0 || b.x == 0 || b.x > 1024 || b.x % 32) { std::fprintf(stderr, "bad launch %u %u\n", g.x, b.x); std::abort(); }
  ++g_launches;
  if ((int64_t)g.x > g_max_grid) g_max_grid = g.x;
  Block blk;
  blk.block_bar = std::make_unique<std::barrier<>>(b.x);
  for (unsigned w = 0; w < b.x / 32; ++w) blk.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  blk.buf.assign(b.x, 0.0);
  g_block = &blk;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < b.x; ++t) {
    threads.emplace_back([&, t] {
      tIdx = dim3(t); bDim = b; gDim = g;
      for (unsigned blockid = 0; blockid < g.x; ++blockid) {
        bIdx = dim3(blockid);
        k(a...);
        blk.block_bar->arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
  g_block = nullptr;
}
}  // namespace emu

#define threadIdx (::emu::tIdx)
#define blockIdx (::emu::bIdx)
#define blockDim (::emu::bDim)
#define gridDim (::emu::gDim)

inline void __syncthreads() { emu::g_block->block_bar->arrive_and_wait(); }

template <class T>
inline T emu_shfl(T v, int src_fn_lane_xor, int mode, unsigned delta) {
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  double* buf = emu::g_block->buf.data() + warp * 32;
  static_assert(sizeof(T) <= sizeof(double));
  std::memcpy(&buf[lane], &v, sizeof(T));
  emu::g_block->warp_bar[warp]->arrive_and_wait();
  unsigned src = mode == 0 ? (lane ^ (unsigned)src_fn_lane_xor) : lane + delta;
  T r = v;
  if (src < 32) std::memcpy(&r, &buf[src], sizeof(T));
  emu::g_block->warp_bar[warp]->arrive_and_wait();
  return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) { return emu_shfl(v, lane_mask, 0, 0); }
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) { return emu_shfl(v, 0, 1, delta); }

inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  double* buf = emu::g_block->buf.data() + warp * 32;
  static_assert(sizeof(T) <= sizeof(double));
  std::memcpy(&buf[lane], &v, sizeof(T));
  emu::g_block->warp_bar[warp]->arrive_and_wait();
  T r = v;
  if (lane >= delta) std::memcpy(&r, &buf[lane - delta], sizeof(T));
  emu::g_block->warp_bar[warp]->arrive_and_wait();
  return r;
}
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float x, float y) { return x / y; }
template <class T> inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
using std::exp; using std::fabs; using std::fmin; using std::log; using std::max; using std::min;
using std::sqrt;
