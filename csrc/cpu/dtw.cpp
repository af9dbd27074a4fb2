// Batched DTW / soft-DTW on the CPU: argument checks and the calls into kernels/dtw_kernel.cpp.
#include "dtw_ops.h"

#include "cpu_capability.h"
#include "../common/op_checks.h"
#include "kernels/dtw_kernel_api.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace ether_kernels::cpu {

namespace {

void check_cost(const at::Tensor& cost, const char* op) {
  TORCH_CHECK(cost.device().is_cpu(), op, " (CPU kernel): cost must be a CPU tensor, got ",
              cost.device());
  TORCH_CHECK(cost.dim() == 3, op, ": cost must be (B, N, M), got shape ", cost.sizes());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble, op,
              ": cost must be float32 or float64, got ", cost.scalar_type());
}

// Returns the lengths as a contiguous int64 CPU tensor, checked against 1 <= len <= limit.
at::Tensor checked_lengths(const at::Tensor& lengths, const char* name, int64_t B,
                           int64_t limit, const char* dim, const char* op) {
  TORCH_CHECK(lengths.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
              lengths.device());
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) &&
                  !at::isComplexType(lengths.scalar_type()) &&
                  lengths.scalar_type() != at::kBool,
              op, ": ", name, " must be an integer tensor (int64), got ", lengths.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, op, ": ", name,
              " must have shape (B,) = (", B, ",), got ", lengths.sizes());
  at::Tensor out = lengths.to(at::kLong).contiguous();
  const int64_t* p = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(p[b] >= 1 && p[b] <= limit, op, ": ", name, "[", b, "] = ", p[b],
                " is out of range; need 1 <= ", name, " <= ", dim, " = ", limit);
  }
  return out;
}

// A small cache of freed kept-state buffers (R of the soft forward). A training loop
// allocates the same large R every step, and fresh pages cost more than the kernel's own
// stores: glibc hands blocks above 32 MB straight back to the OS, so every step page-faults
// its whole R in again (~7 ms for 33 MB on the CI machine, a third of the forward). At most
// kMaxBlocks blocks and kMaxBytes are kept; ETHER_KERNELS_KEPT_CACHE=0 turns it off.
class KeptStateCache {
 public:
  static KeptStateCache& get() {
    static KeptStateCache* cache = new KeptStateCache();  // never destroyed: blocks may
    return *cache;                                        // outlive static destruction
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    if (!enabled_) return at::empty(sizes, options);
    int64_t numel = 1;
    for (const int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (bytes < kMinBytes) return at::empty(sizes, options);
    void* block = take(bytes);
    if (block == nullptr) block = std::aligned_alloc(kAlignment, rounded(bytes));
    TORCH_CHECK(block != nullptr, "dtw: out of memory allocating the kept state (", bytes,
                " bytes)");
    return at::from_blob(
        block, sizes, [bytes](void* p) { KeptStateCache::get().give_back(p, bytes); },
        options);
  }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // small blocks: the allocator is fine
  static constexpr size_t kAlignment = 64;
  static size_t rounded(size_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }
  static constexpr size_t kMaxBlocks = 2;
  static constexpr size_t kMaxBytes = size_t(1) << 30;

  KeptStateCache() {
    const char* flag = std::getenv("ETHER_KERNELS_KEPT_CACHE");
    enabled_ = flag == nullptr || std::string(flag) != "0";
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t k = 0; k < blocks_.size(); ++k) {
      if (blocks_[k].second == bytes) {
        void* block = blocks_[k].first;
        cached_bytes_ -= bytes;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(k));
        return block;
      }
    }
    return nullptr;
  }

  void give_back(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (blocks_.size() < kMaxBlocks && cached_bytes_ + bytes <= kMaxBytes) {
        blocks_.emplace_back(block, bytes);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  bool enabled_ = true;
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t cached_bytes_ = 0;
};

// The forward's kept accumulated cost R (B, N, M).
void check_kept_R(const at::Tensor& R, int64_t B, int64_t N, int64_t M, at::ScalarType dtype,
                  bool soft, const char* op) {
  TORCH_CHECK(R.device().is_cpu() && R.dim() == 3 && R.size(0) == B && R.size(1) == N &&
                  R.size(2) == M,
              op, ": R must be the forward's kept (B, N, M) = (", B, ", ", N, ", ", M,
              ") CPU tensor (keep=True), got shape ", R.sizes(), " on ", R.device());
  TORCH_CHECK(R.scalar_type() == dtw_kept_dtype(dtype, soft), op, ": R must be ",
              dtw_kept_dtype(dtype, soft), " (soft-DTW keeps R in float64), got ", R.scalar_type());
}

// The backward's upstream gradient (B,).
void check_upstream_grad(const at::Tensor& grad, int64_t B, const char* op) {
  TORCH_CHECK(grad.device().is_cpu() && grad.numel() == B && grad.dim() <= 1, op,
              ": grad must be a (B,) = (", B, ",) CPU tensor, got shape ", grad.sizes(),
              " on ", grad.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op,
              ": grad must be a floating-point tensor, got ", grad.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dtw_forward_cpu(const at::Tensor& cost,
                                                   const at::Tensor& x_lengths,
                                                   const at::Tensor& y_lengths, int64_t band,
                                                   double gamma, bool soft, bool keep) {
  constexpr const char* op = "dtw_forward";
  check_cost(cost, op);
  check_dtw_options(band, gamma, soft, op);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  const at::Tensor xl = checked_lengths(x_lengths, "x_lengths", B, N, "N", op);
  const at::Tensor yl = checked_lengths(y_lengths, "y_lengths", B, M, "M", op);
  const at::Tensor c = cost.contiguous();
  at::Tensor values = at::empty({B}, c.options());
  at::Tensor R = keep ? KeptStateCache::get().empty(
                             {B, N, M}, c.options().dtype(dtw_kept_dtype(c.scalar_type(), soft)))
                      : at::empty({0}, c.options());
  if (B == 0) return {values, R};
  DtwForwardArgs args{c.data_ptr(),
                      c.scalar_type(),
                      B,
                      N,
                      M,
                      xl.data_ptr<int64_t>(),
                      yl.data_ptr<int64_t>(),
                      band,
                      gamma,
                      soft,
                      values.data_ptr(),
                      keep ? R.data_ptr() : nullptr};
  ETHER_CPU_DISPATCH(dtw_forward)(args);
  return {values, R};
}

at::Tensor dtw_backward_cpu(const at::Tensor& grad, const at::Tensor& cost, const at::Tensor& R,
                            const at::Tensor& x_lengths, const at::Tensor& y_lengths,
                            int64_t band, double gamma, bool soft) {
  constexpr const char* op = "dtw_backward";
  check_cost(cost, op);
  check_dtw_options(band, gamma, soft, op);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  check_kept_R(R, B, N, M, cost.scalar_type(), soft, op);
  check_upstream_grad(grad, B, op);
  const at::Tensor xl = checked_lengths(x_lengths, "x_lengths", B, N, "N", op);
  const at::Tensor yl = checked_lengths(y_lengths, "y_lengths", B, M, "M", op);
  const at::Tensor c = cost.contiguous();
  const at::Tensor r = R.contiguous();
  const at::Tensor g = grad.reshape({B}).to(c.scalar_type()).contiguous();
  at::Tensor E = at::empty({B, N, M}, c.options());
  if (B == 0) return E;
  DtwBackwardArgs args{g.data_ptr(),
                       c.data_ptr(),
                       r.data_ptr(),
                       c.scalar_type(),
                       B,
                       N,
                       M,
                       xl.data_ptr<int64_t>(),
                       yl.data_ptr<int64_t>(),
                       band,
                       gamma,
                       soft,
                       E.data_ptr()};
  ETHER_CPU_DISPATCH(dtw_backward)(args);
  return E;
}

namespace {

void check_series(const at::Tensor& x, const at::Tensor& y, int64_t metric, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op,
              " (CPU kernel): x and y must be CPU tensors, got ", x.device(), " and ",
              y.device());
  check_dtw_series(x, y, metric, op);
}

}  // namespace

namespace {

int64_t checkpoint_count(int64_t N, int64_t checkpoint_rows, const char* op) {
  TORCH_CHECK(checkpoint_rows > 0 && checkpoint_rows % 4 == 0, op,
              ": checkpoint_rows must be a positive multiple of 4, got ", checkpoint_rows);
  return (N + checkpoint_rows - 1) / checkpoint_rows;
}

// The checkpointed forward's kept state (B, C, M + 1) fp64, S recorded by every pair (row 0,
// column M): the backward must get the same S (another S can give the same C).
void check_checkpoints(const at::Tensor& kept, int64_t B, int64_t C, int64_t M,
                       int64_t checkpoint_rows, const char* op) {
  TORCH_CHECK(kept.device().is_cpu() && kept.dim() == 3 && kept.size(0) == B &&
                  kept.size(1) == C && kept.size(2) == M + 1 &&
                  kept.scalar_type() == at::kDouble,
              op, ": kept must be the forward's (B, C, M + 1) = (", B, ", ", C, ", ", M + 1,
              ") float64 CPU tensor, got ", kept.scalar_type(), " of shape ", kept.sizes(),
              " on ", kept.device());
  const at::Tensor k = kept.contiguous();
  const double* k_data = k.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(k_data[b * C * (M + 1) + M] == static_cast<double>(checkpoint_rows), op,
                ": kept was made with another checkpoint_rows (pair ", b, " records ",
                k_data[b * C * (M + 1) + M], "), got ", checkpoint_rows,
                ": pass the forward's value");
  }
}

// The series forward ops: checks, normalised series, the kept state (none, the (B, N, M)
// grid, or with checkpoint_rows > 0 the checkpoints), the kernel.
std::tuple<at::Tensor, at::Tensor> run_xy_forward(const at::Tensor& x, const at::Tensor& y,
                                                  const at::Tensor& x_lengths,
                                                  const at::Tensor& y_lengths, int64_t metric,
                                                  int64_t band, double gamma, bool soft,
                                                  bool keep, int64_t checkpoint_rows,
                                                  const char* op) {
  check_series(x, y, metric, op);
  check_dtw_options(band, gamma, soft, op);
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  const int64_t C = checkpoint_rows > 0 ? checkpoint_count(N, checkpoint_rows, op) : 0;
  const at::Tensor xl = checked_lengths(x_lengths, "x_lengths", B, N, "N", op);
  const at::Tensor yl = checked_lengths(y_lengths, "y_lengths", B, M, "M", op);
  const auto [xc, x_stride] = dtw_batched_series(x);
  const auto [yc, y_stride] = dtw_batched_series(y);
  at::Tensor values = at::empty({B}, xc.options());
  const auto kept_options = xc.options().dtype(dtw_kept_dtype(xc.scalar_type(), soft));
  at::Tensor R = !keep                ? at::empty({0}, xc.options())
                 : checkpoint_rows > 0 ? at::empty({B, C, M + 1}, kept_options)
                                       : KeptStateCache::get().empty({B, N, M}, kept_options);
  if (B == 0) return {values, R};
  DtwXYForwardArgs args{xc.data_ptr(),
                        yc.data_ptr(),
                        xc.scalar_type(),
                        B,
                        N,
                        M,
                        D,
                        xl.data_ptr<int64_t>(),
                        yl.data_ptr<int64_t>(),
                        metric,
                        band,
                        gamma,
                        soft,
                        values.data_ptr(),
                        keep ? R.data_ptr() : nullptr,
                        x_stride,
                        y_stride,
                        checkpoint_rows};
  ETHER_CPU_DISPATCH(dtw_xy_forward)(args);
  return {values, R};
}

// The series backward ops, R being the forward's kept state of the same kind.
std::tuple<at::Tensor, at::Tensor> run_xy_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& R,
    const at::Tensor& x_lengths, const at::Tensor& y_lengths, int64_t metric, int64_t band,
    double gamma, bool soft, bool need_x, bool need_y, int64_t checkpoint_rows,
    const char* op) {
  check_series(x, y, metric, op);
  check_dtw_options(band, gamma, soft, op);
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), D = x.size(2);
  if (checkpoint_rows > 0) {
    check_checkpoints(R, B, checkpoint_count(N, checkpoint_rows, op), M, checkpoint_rows, op);
  } else {
    check_kept_R(R, B, N, M, x.scalar_type(), soft, op);
  }
  check_upstream_grad(grad, B, op);
  const at::Tensor xl = checked_lengths(x_lengths, "x_lengths", B, N, "N", op);
  const at::Tensor yl = checked_lengths(y_lengths, "y_lengths", B, M, "M", op);
  const auto [xc, x_stride] = dtw_batched_series(x);
  const auto [yc, y_stride] = dtw_batched_series(y);
  const at::Tensor r = R.contiguous();
  const at::Tensor g = grad.reshape({B}).to(xc.scalar_type()).contiguous();
  at::Tensor gx = need_x ? at::empty({B, N, D}, xc.options()) : at::empty({0}, xc.options());
  at::Tensor gy = need_y ? at::empty({B, M, D}, xc.options()) : at::empty({0}, xc.options());
  if (B == 0 || (!need_x && !need_y)) return {gx, gy};
  DtwXYBackwardArgs args{g.data_ptr(),
                         xc.data_ptr(),
                         yc.data_ptr(),
                         r.data_ptr(),
                         xc.scalar_type(),
                         B,
                         N,
                         M,
                         D,
                         xl.data_ptr<int64_t>(),
                         yl.data_ptr<int64_t>(),
                         metric,
                         band,
                         gamma,
                         soft,
                         need_x ? gx.data_ptr() : nullptr,
                         need_y ? gy.data_ptr() : nullptr,
                         x_stride,
                         y_stride,
                         checkpoint_rows};
  ETHER_CPU_DISPATCH(dtw_xy_backward)(args);
  return {gx, gy};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dtw_xy_forward_cpu(const at::Tensor& x, const at::Tensor& y,
                                                      const at::Tensor& x_lengths,
                                                      const at::Tensor& y_lengths,
                                                      int64_t metric, int64_t band,
                                                      double gamma, bool soft, bool keep) {
  return run_xy_forward(x, y, x_lengths, y_lengths, metric, band, gamma, soft, keep, 0,
                        "dtw_xy_forward");
}

std::tuple<at::Tensor, at::Tensor> dtw_xy_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& R,
    const at::Tensor& x_lengths, const at::Tensor& y_lengths, int64_t metric, int64_t band,
    double gamma, bool soft, bool need_x, bool need_y) {
  return run_xy_backward(grad, x, y, R, x_lengths, y_lengths, metric, band, gamma, soft,
                         need_x, need_y, 0, "dtw_xy_backward");
}

std::tuple<at::Tensor, at::Tensor> dtw_xy_soft_forward_checkpointed_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_lengths,
    const at::Tensor& y_lengths, int64_t metric, int64_t band, double gamma,
    int64_t checkpoint_rows) {
  constexpr const char* op = "dtw_xy_soft_forward_checkpointed";
  checkpoint_count(x.size(1), checkpoint_rows, op);  // 0 is not "no checkpoints" here
  return run_xy_forward(x, y, x_lengths, y_lengths, metric, band, gamma, true, true,
                        checkpoint_rows, op);
}

std::tuple<at::Tensor, at::Tensor> dtw_xy_soft_backward_checkpointed_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& kept,
    const at::Tensor& x_lengths, const at::Tensor& y_lengths, int64_t metric, int64_t band,
    double gamma, int64_t checkpoint_rows, bool need_x, bool need_y) {
  constexpr const char* op = "dtw_xy_soft_backward_checkpointed";
  checkpoint_count(x.size(1), checkpoint_rows, op);
  return run_xy_backward(grad, x, y, kept, x_lengths, y_lengths, metric, band, gamma, true,
                         need_x, need_y, checkpoint_rows, op);
}

}  // namespace ether_kernels::cpu
