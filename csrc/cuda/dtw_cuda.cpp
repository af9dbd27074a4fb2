// The CUDA implementations of the DTW ops (schemas in csrc/ether_kernels.cpp, CPU twins in
// csrc/cpu/dtw.cpp): argument checks, outputs and workspaces allocated with torch, launches
// of the wavefront kernels of dtw_kernels.cu on the current stream, and for the series ops
// the contraction of the alignment E with the local cost's gradient (batched matmuls; for
// soft-DTW with the squared Euclidean cost and D <= 4, in the backward kernel itself).
//
// Nothing here reads device memory on the host: the lengths are checked for shape and
// dtype only (the Python layer has checked their values; the kernels guard against bad
// ones), so a call never synchronises.
//
// Kept state R: fp64 for soft-DTW whatever the dtype (kernels_cuda.h says why), the input
// dtype for hard DTW, shaped [B, dtw_kept_per_pair] (the kernels' coalesced layout). The
// op's fake kernel (dynamic_time_warping.py) computes the same shape and dtype.
#include "kernels_cuda.h"

#include "../common/op_checks.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>

namespace ether_kernels::cuda {
namespace {

// Threads per pair: 512, or ETHER_KERNELS_DTW_THREADS (a multiple of 32 in [32, 512]) so
// that the tests can make small sequences span several stripes of rows.
int max_threads_per_pair() {
  const char* value = std::getenv("ETHER_KERNELS_DTW_THREADS");
  if (value == nullptr || *value == '\0') return 0;
  const int threads = std::atoi(value);
  TORCH_CHECK(threads >= 32 && threads <= 512 && threads % 32 == 0,
              "ETHER_KERNELS_DTW_THREADS must be a multiple of 32 in [32, 512], got '", value,
              "'");
  return threads;
}

// Rows per thread of the soft-DTW kernels: 4, or ETHER_KERNELS_DTW_SOFT_ROWS=2 (twice the
// threads per pair: more warps per SM when a batch has few pairs; for A/B timings).
int soft_rows_per_thread() {
  const char* value = std::getenv("ETHER_KERNELS_DTW_SOFT_ROWS");
  if (value == nullptr || *value == '\0') return 0;
  const int rows = std::atoi(value);
  TORCH_CHECK(rows == 2 || rows == 4, "ETHER_KERNELS_DTW_SOFT_ROWS must be 2 or 4, got '",
              value, "'");
  return rows;
}

void check_float(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA kernel): ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// The lengths as contiguous int64 on `device` (copied there asynchronously if needed).
at::Tensor device_lengths(const at::Tensor& lengths, const char* name, int64_t B,
                          const at::Device& device, const char* op) {
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) &&
                  !at::isComplexType(lengths.scalar_type()) &&
                  lengths.scalar_type() != at::kBool,
              op, ": ", name, " must be an integer tensor (int64), got ", lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, op, ": ", name,
              " must have shape (B,) = (", B, ",), got ", lengths.sizes());
  return lengths.to(lengths.options().device(device).dtype(at::kLong), /*non_blocking=*/true)
      .contiguous();
}


void check_series(const at::Tensor& x, const at::Tensor& y, int64_t metric, const char* op) {
  check_float(x, "x", op);
  check_float(y, "y", op);
  TORCH_CHECK(x.device() == y.device(), op, ": x (", x.device(), ") and y (", y.device(),
              ") must be on the same device");
  check_dtw_series(x, y, metric, op);
}

void check_cost(const at::Tensor& cost, const char* op) {
  check_float(cost, "cost", op);
  TORCH_CHECK(cost.dim() == 3 && cost.size(1) > 0 && cost.size(2) > 0, op,
              ": cost must be a non-empty (B, N, M) tensor, got shape ", cost.sizes());
}

void check_backward_inputs(const at::Tensor& grad, const at::Tensor& R, int64_t B,
                           int64_t kept, at::ScalarType dtype, bool soft,
                           const at::Device& device, const char* op) {
  TORCH_CHECK(R.device() == device && R.dim() == 2 && R.size(0) == B && R.size(1) == kept, op,
              ": R must be the CUDA forward's kept (B, ", kept, ") = (", B, ", ", kept,
              ") tensor on ", device, " (keep=True), got shape ", R.sizes(), " on ",
              R.device());
  TORCH_CHECK(R.scalar_type() == dtw_kept_dtype(dtype, soft), op, ": R must be ",
              dtw_kept_dtype(dtype, soft),
              " (the CUDA forward keeps soft-DTW's R in float64), got ",
              R.scalar_type());
  TORCH_CHECK(grad.device() == device && grad.numel() == B && grad.dim() <= 1, op,
              ": grad must be a (B,) = (", B, ",) tensor on ", device, ", got shape ",
              grad.sizes(), " on ", grad.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op,
              ": grad must be a floating-point tensor, got ", grad.scalar_type());
}

DtwArgs base_args(at::ScalarType dtype, int64_t B, int64_t N, int64_t M, int64_t D,
                  const at::Tensor& xl, const at::Tensor& yl, int64_t metric, int64_t band,
                  double gamma, bool soft) {
  TORCH_CHECK(B <= 2147483647, "dtw (CUDA kernel): at most 2^31 - 1 pairs per call (one thread "
              "block each), got ", B);
  TORCH_CHECK(N < (int64_t(1) << 30) && M < (int64_t(1) << 30),
              "dtw (CUDA kernel): sequence lengths must be below 2^30 (32-bit indices within a "
              "pair), got N = ", N, ", M = ", M);
  DtwArgs a{};
  a.dtype = dtype == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  a.B = B;
  a.N = N;
  a.M = M;
  a.D = D;
  a.x_lengths = xl.data_ptr<int64_t>();
  a.y_lengths = yl.data_ptr<int64_t>();
  a.metric = metric;
  a.band = band;
  a.gamma = soft ? gamma : 1.0;
  a.soft = soft;
  a.max_threads = max_threads_per_pair();
  a.soft_rows = soft_rows_per_thread();
  return a;
}

// Allocates the workspace the kernels need for `a` and points `a` at it.
at::Tensor attach_workspace(DtwArgs& a, const at::TensorOptions& options) {
  const size_t bytes = dtw_workspace_bytes(a);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  a.workspace = bytes > 0 ? workspace.data_ptr() : nullptr;
  a.workspace_bytes = bytes;
  return workspace;
}

std::tuple<at::Tensor, at::Tensor> run_forward(DtwArgs& a, const at::TensorOptions& options,
                                               bool keep) {
  at::Tensor values = at::empty({a.B}, options);
  // No zero fill: the forward kernel writes every element of R (0 where no cell is kept),
  // so its content is deterministic (torch.compile / opcheck compare it).
  at::Tensor R = keep ? at::empty({a.B, dtw_kept_per_pair(a)},
                                  options.dtype(dtw_kept_dtype(
                                      options.dtype().toScalarType(), a.soft)))
                      : at::empty({0}, options);
  const at::Tensor workspace = attach_workspace(a, options);
  C10_CUDA_CHECK(dtw_forward(a, values.data_ptr(), keep ? R.data_ptr() : nullptr,
                             at::cuda::getCurrentCUDAStream()));
  return {values, R};
}

// ETHER_KERNELS_DTW_FUSED_BACKWARD=0 turns the fused soft-DTW backward off (the E path
// instead), for A/B timings and as a way out should it ever misbehave.
bool fused_backward_enabled() {
  const char* value = std::getenv("ETHER_KERNELS_DTW_FUSED_BACKWARD");
  return value == nullptr || std::string(value) != "0";
}

// Soft-DTW with the squared Euclidean cost, D <= 4, one series per pair: the kernel
// contracts E into the gradients as it goes (no (B, N, M) tensor, no matmuls).
std::tuple<at::Tensor, at::Tensor> run_fused_backward(DtwArgs& a, const at::Tensor& grad,
                                                      const at::Tensor& R,
                                                      const at::TensorOptions& options,
                                                      bool need_x, bool need_y) {
  const at::Tensor g = grad.reshape({a.B}).to(options).contiguous();
  const at::Tensor r = R.contiguous();
  at::Tensor gx = at::zeros({a.B, a.N, a.D}, options);  // rows past a pair's length stay 0
  at::Tensor gy = at::zeros({a.B, a.M, a.D}, options);  // the kernel adds each stripe's sum
  const at::Tensor workspace = attach_workspace(a, options);
  C10_CUDA_CHECK(soft_dtw_backward_series(a, g.data_ptr(), r.data_ptr(), gx.data_ptr(),
                                          gy.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return {need_x ? gx : at::empty({0}, options), need_y ? gy : at::empty({0}, options)};
}

// E = grad[b] * d values[b] / d cost, (B, N, M) in the inputs' dtype.
at::Tensor run_backward(DtwArgs& a, const at::Tensor& grad, const at::Tensor& R,
                        const at::TensorOptions& options) {
  const at::Tensor g = grad.reshape({a.B}).to(options).contiguous();
  const at::Tensor r = R.contiguous();
  at::Tensor E = at::zeros({a.B, a.N, a.M}, options);  // only allowed cells are written
  const at::Tensor workspace = attach_workspace(a, options);
  C10_CUDA_CHECK(dtw_backward(a, g.data_ptr(), r.data_ptr(), E.data_ptr(),
                              at::cuda::getCurrentCUDAStream()));
  return E;
}

std::tuple<at::Tensor, at::Tensor> dtw_forward_cuda(const at::Tensor& cost,
                                                    const at::Tensor& x_lengths,
                                                    const at::Tensor& y_lengths, int64_t band,
                                                    double gamma, bool soft, bool keep) {
  constexpr const char* op = "dtw_forward";
  check_cost(cost, op);
  check_dtw_options(band, gamma, soft, op);
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const at::Tensor xl = device_lengths(x_lengths, "x_lengths", B, cost.device(), op);
  const at::Tensor yl = device_lengths(y_lengths, "y_lengths", B, cost.device(), op);
  const at::Tensor c = cost.contiguous();
  DtwArgs a = base_args(c.scalar_type(), B, N, M, 1, xl, yl, 0, band, gamma, soft);
  a.cost = c.data_ptr();
  return run_forward(a, c.options(), keep);
}

at::Tensor dtw_backward_cuda(const at::Tensor& grad, const at::Tensor& cost, const at::Tensor& R,
                             const at::Tensor& x_lengths, const at::Tensor& y_lengths,
                             int64_t band, double gamma, bool soft) {
  constexpr const char* op = "dtw_backward";
  check_cost(cost, op);
  check_dtw_options(band, gamma, soft, op);
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const at::Tensor xl = device_lengths(x_lengths, "x_lengths", B, cost.device(), op);
  const at::Tensor yl = device_lengths(y_lengths, "y_lengths", B, cost.device(), op);
  const at::Tensor c = cost.contiguous();
  DtwArgs a = base_args(c.scalar_type(), B, N, M, 1, xl, yl, 0, band, gamma, soft);
  check_backward_inputs(grad, R, B, dtw_kept_per_pair(a), cost.scalar_type(), soft,
                        cost.device(), op);
  a.cost = c.data_ptr();
  return run_backward(a, grad, R, c.options());
}

std::tuple<at::Tensor, at::Tensor> dtw_xy_forward_cuda(const at::Tensor& x, const at::Tensor& y,
                                                       const at::Tensor& x_lengths,
                                                       const at::Tensor& y_lengths,
                                                       int64_t metric, int64_t band,
                                                       double gamma, bool soft, bool keep) {
  constexpr const char* op = "dtw_xy_forward";
  check_series(x, y, metric, op);
  check_dtw_options(band, gamma, soft, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  const at::Tensor xl = device_lengths(x_lengths, "x_lengths", B, x.device(), op);
  const at::Tensor yl = device_lengths(y_lengths, "y_lengths", B, x.device(), op);
  const auto [xs, x_stride] = dtw_batched_series(x);
  const auto [ys, y_stride] = dtw_batched_series(y);
  DtwArgs a = base_args(x.scalar_type(), B, N, M, D, xl, yl, metric, band, gamma, soft);
  a.x = xs.data_ptr();
  a.y = ys.data_ptr();
  a.x_batch_stride = x_stride;
  a.y_batch_stride = y_stride;
  return run_forward(a, x.options(), keep);
}

// d values / d x and d values / d y from E (already scaled by grad): for cell (i, j) the
// local cost's gradient in x_i is 2 (x_i - y_j) (sqeuclidean), (x_i - y_j) / c_ij
// (euclidean; 0 where c_ij = 0, as in the reference) or sign(x_i - y_j) (l1), and minus
// that in y_j. The first two are batched matmuls; l1 goes feature by feature.
std::tuple<at::Tensor, at::Tensor> contract(const at::Tensor& E, const at::Tensor& x,
                                            const at::Tensor& y, int64_t metric, bool need_x,
                                            bool need_y) {
  at::Tensor gx, gy;
  if (metric == 2) {
    const int64_t D = x.size(2);
    if (need_x) gx = at::empty(x.sizes(), x.options());
    if (need_y) gy = at::empty(y.sizes(), y.options());
    for (int64_t d = 0; d < D; ++d) {
      const at::Tensor xd = x.select(2, d).unsqueeze(2), yd = y.select(2, d).unsqueeze(1);
      const at::Tensor weighted = E * at::sign(xd - yd);  // (B, N, M)
      if (need_x) gx.select(2, d).copy_(weighted.sum(2));
      if (need_y) gy.select(2, d).copy_(weighted.sum(1).neg());
    }
  } else {
    at::Tensor W = E;
    double scale = 2.0;
    if (metric == 1) {
      const at::Tensor distance = at::cdist(x, y, 2.0, /*compute_mode=*/2);  // no matmul trick
      W = at::where(distance > 0, E / distance, at::zeros({}, E.options()));
      scale = 1.0;
    }
    if (need_x) gx = (x * W.sum(2).unsqueeze(2) - at::bmm(W, y)).mul_(scale);
    if (need_y) gy = (y * W.sum(1).unsqueeze(2) - at::bmm(W.transpose(1, 2), x)).mul_(scale);
  }
  if (!need_x) gx = at::empty({0}, x.options());
  if (!need_y) gy = at::empty({0}, y.options());
  return {gx, gy};
}

std::tuple<at::Tensor, at::Tensor> dtw_xy_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& R,
    const at::Tensor& x_lengths, const at::Tensor& y_lengths, int64_t metric, int64_t band,
    double gamma, bool soft, bool need_x, bool need_y) {
  constexpr const char* op = "dtw_xy_backward";
  check_series(x, y, metric, op);
  check_dtw_options(band, gamma, soft, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  if (B == 0 || (!need_x && !need_y)) {
    return {need_x ? at::zeros(x.sizes(), x.options()) : at::empty({0}, x.options()),
            need_y ? at::zeros(y.sizes(), y.options()) : at::empty({0}, y.options())};
  }
  const at::Tensor xl = device_lengths(x_lengths, "x_lengths", B, x.device(), op);
  const at::Tensor yl = device_lengths(y_lengths, "y_lengths", B, x.device(), op);
  const auto [xs, x_stride] = dtw_batched_series(x);
  const auto [ys, y_stride] = dtw_batched_series(y);
  DtwArgs a = base_args(x.scalar_type(), B, N, M, D, xl, yl, metric, band, gamma, soft);
  check_backward_inputs(grad, R, B, dtw_kept_per_pair(a), x.scalar_type(), soft, x.device(),
                        op);
  a.x = xs.data_ptr();
  a.y = ys.data_ptr();
  a.x_batch_stride = x_stride;
  a.y_batch_stride = y_stride;
  if (dtw_fused_backward_supported(a) && fused_backward_enabled()) {
    return run_fused_backward(a, grad, R, x.options(), need_x, need_y);
  }
  const at::Tensor E = run_backward(a, grad, R, x.options());
  return contract(E, x, y, metric, need_x, need_y);
}

}  // namespace
}  // namespace ether_kernels::cuda

TORCH_LIBRARY_IMPL(ether_kernels, CUDA, m) {
  m.impl("dtw_forward", &ether_kernels::cuda::dtw_forward_cuda);
  m.impl("dtw_backward", &ether_kernels::cuda::dtw_backward_cuda);
  m.impl("dtw_xy_forward", &ether_kernels::cuda::dtw_xy_forward_cuda);
  m.impl("dtw_xy_backward", &ether_kernels::cuda::dtw_xy_backward_cuda);
}
