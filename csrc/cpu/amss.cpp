// AMSS / AMSS+ gradient masking on the CPU, fused over every tensor of a step
// (semantics: shared/specs/amss.md; the readable version: ether_kernels/reference/amss.py,
// whose counter-based generator this file reproduces bit for bit).
//
//   pass 1  u_j = sum of grad^2 over unit j, for the units of all tensors at once
//           (at::parallel_for over units; accumulated in double)
//   pass 2  per tensor, on its small per-unit arrays: q_j = (u_j + eps) / sum (u + eps),
//           k = ceil(rho N), the selection (Gumbel-top-k, uniform, top-k, or systematic
//           pi-ps sampling for AMSS+ "paper") and the factor of each unit
//   pass 3  grad_unit *= factor_j, skipping units whose factor is exactly 1 (every kept unit
//           in "amss", "uniform" and "topk" mode: no write at all)
// The gradient memory is read once and written once (only where it changes), against the
// eager loop's several small kernels per tensor. Memory-bound passes: compiled once, not per
// instruction set. Units: dim-0 slices of unit_size rows of contiguous tensors (the Python
// layer hands other layouts to the reference).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include "ops_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace ether_kernels::cpu {
namespace {

constexpr double kEps = 1e-12;  // the reference's EPS
enum Mode : int64_t { kAmss = 0, kAmssPlus = 1, kUniform = 2, kTopk = 3 };
enum Scaling : int64_t { kPaper = 0, kReferenceCode = 1 };

// ---- the counter-based generator (reference/amss.py: mix32, _word, uniform) ----
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t word(uint64_t seed, uint64_t step, uint64_t tensor, uint64_t unit,
                     uint64_t stream) {
  const uint64_t offset = (0x9E3779B9ull * (stream + 1)) & 0xFFFFFFFFull;
  uint32_t h = mix32(static_cast<uint32_t>(unit + offset));
  const uint64_t keys[5] = {tensor, step & 0xFFFFFFFFull, step >> 32, seed & 0xFFFFFFFFull,
                            seed >> 32};
  for (const uint64_t key : keys) h = mix32(h ^ static_cast<uint32_t>(key));
  return h;
}

// Uniform in (0, 1) from 52 bits: exactly the reference's float64 value (never 0 or 1).
inline double uniform(uint64_t seed, uint64_t step, uint64_t tensor, uint64_t unit,
                      uint64_t stream) {
  const uint32_t high = word(seed, step, tensor, unit, 2 * stream);
  const uint32_t low = word(seed, step, tensor, unit, 2 * stream + 1);
  const double bits = static_cast<double>(high) * 1048576.0 + static_cast<double>(low >> 12);
  return (bits + 0.5) / 4503599627370496.0;
}

inline double gumbel(uint64_t seed, uint64_t step, uint64_t tensor, uint64_t unit) {
  return -std::log(-std::log(uniform(seed, step, tensor, unit, 0)));
}

int64_t kept_units(double ratio, int64_t n) {
  if (ratio >= 1.0) return n;  // every unit (the tolerance would drop some beyond 2^24)
  const double k = std::ceil(ratio * static_cast<double>(n) * (1.0 - std::ldexp(1.0, -24)));
  return std::min<int64_t>(n, std::max<int64_t>(0, static_cast<int64_t>(k)));
}

// The selection order of the reference (reference.amss: a stable descending sort of the
// keys with NaN as +inf): larger keys first, a NaN key (from a NaN or inf gradient) before
// every other, equal keys by index. A strict total order, so any sort gives that one result.
// (Ties are real: with one inf gradient every other unit's q is 0 and its key -inf.)
struct RanksBefore {
  const double* keys;
  static double key(double value) { return std::isnan(value) ? INFINITY : value; }
  bool operator()(int64_t a, int64_t b) const {
    const double ka = key(keys[a]), kb = key(keys[b]);
    return ka > kb || (ka == kb && a < b);
  }
};

// Indices of the k units that rank first (RanksBefore).
std::vector<int64_t> top_k(const std::vector<double>& keys, int64_t k) {
  std::vector<int64_t> order(keys.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), RanksBefore{keys.data()});
  order.resize(k);
  return order;
}

// pi_j = min(1, c q_j) with sum pi = k (reference: inclusion_probabilities).
std::vector<double> inclusion_probabilities(const std::vector<double>& q, int64_t k) {
  const int64_t n = static_cast<int64_t>(q.size());
  std::vector<double> pi(n, 0.0);
  std::vector<char> capped(n, 0);
  for (int64_t round = 0; round < n; ++round) {
    double free_mass = 0.0;
    int64_t num_capped = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (capped[j]) ++num_capped;
      else free_mass += q[j];
    }
    bool newly = false;
    for (int64_t j = 0; j < n; ++j) {
      pi[j] = capped[j] ? 1.0 : static_cast<double>(k - num_capped) * q[j] / free_mass;
      if (!capped[j] && pi[j] > 1.0) newly = true;
    }
    if (!newly) break;
    for (int64_t j = 0; j < n; ++j) {
      if (!capped[j] && pi[j] > 1.0) capped[j] = 1;
    }
  }
  for (double& p : pi) p = std::min(p, 1.0);
  return pi;
}

// The factor of every unit of one tensor (reference: unit_factors).
void unit_factors(const double* u, int64_t n, double ratio, int64_t mode, int64_t scaling,
                  uint64_t seed, uint64_t step, uint64_t tensor, double* factors) {
  std::fill(factors, factors + n, 0.0);
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) total += u[j] + kEps;
  std::vector<double> q(n);
  for (int64_t j = 0; j < n; ++j) q[j] = (u[j] + kEps) / total;
  const int64_t k = kept_units(ratio, n);
  if (k == 0) return;
  if (mode == kTopk) {
    for (const int64_t j : top_k(q, k)) factors[j] = 1.0;
    return;
  }
  if (mode == kAmssPlus && scaling == kPaper) {
    const std::vector<double> pi = inclusion_probabilities(q, k);
    std::vector<double> noise(n);
    for (int64_t j = 0; j < n; ++j) noise[j] = gumbel(seed, step, tensor, j);
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return noise[a] < noise[b]; });
    const double start = uniform(seed, step, tensor, static_cast<uint64_t>(n), 1);
    double cumulated = 0.0, previous = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = order[i];
      cumulated += pi[j];
      const double below = std::min<double>(k, std::max(0.0, std::ceil(cumulated - start)));
      if (below - previous > 0) factors[j] = 1.0 / pi[j];
      previous = below;
    }
    return;
  }
  std::vector<double> keys(n);
  for (int64_t j = 0; j < n; ++j) {
    const double g = gumbel(seed, step, tensor, j);
    keys[j] = mode == kUniform ? g : std::log(q[j]) + g;
  }
  for (const int64_t j : top_k(keys, k)) {
    factors[j] = mode == kAmssPlus ? 1.0 / (q[j] + 1.0 / static_cast<double>(n)) : 1.0;
  }
}

// Eight independent double accumulators: one running sum would be a single dependency
// chain (an add's latency per element) that the compiler may not reorder into vectors.
template <typename T>
double unit_sum_of_squares(const T* x, int64_t count) {
  constexpr int64_t kLanes = 8;
  double partial[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + kLanes <= count; e += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const double v = static_cast<double>(x[e + k]);
      partial[k] += v * v;
    }
  }
  for (; e < count; ++e) {
    const double v = static_cast<double>(x[e]);
    partial[0] += v * v;
  }
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

template <typename T>
void scale_unit(T* x, int64_t count, double factor) {
  for (int64_t e = 0; e < count; ++e) x[e] = static_cast<T>(static_cast<double>(x[e]) * factor);
}

// Units per parallel task: about 32k elements.
int64_t unit_grain(at::TensorList grads, int64_t units) {
  int64_t total = 0;
  for (const at::Tensor& g : grads) total += g.numel();
  const int64_t per_unit = std::max<int64_t>(1, total / std::max<int64_t>(1, units));
  return std::max<int64_t>(1, 32768 / per_unit);
}

}  // namespace

namespace {

// The units of every tensor of a step, numbered globally (tensor t owns [first[t],
// first[t + 1])), and each unit's factor: passes 1 and 2 of the file comment.
struct StepUnits {
  std::vector<int64_t> first, per_unit, owner;
  std::vector<double> factors;
};

StepUnits unit_factors_of_step(at::TensorList grads, at::IntArrayRef group_of_tensor,
                               at::ArrayRef<double> ratios, int64_t mode, int64_t scaling,
                               int64_t seed, int64_t step, int64_t unit_size, const char* op) {
  const int64_t T = static_cast<int64_t>(grads.size());
  TORCH_CHECK(static_cast<int64_t>(group_of_tensor.size()) == T, op,
              ": group_of_tensor must give the modality of each of the ", T, " tensors");
  TORCH_CHECK(mode >= 0 && mode <= 3, op, ": sampling must be 0..3, got ", mode);
  TORCH_CHECK(scaling == 0 || scaling == 1, op, ": scaling must be 0 or 1, got ", scaling);
  TORCH_CHECK(unit_size >= 1, op, ": unit_size must be >= 1, got ", unit_size);
  StepUnits s;
  s.first.assign(T + 1, 0);
  s.per_unit.assign(T, 0);
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& g = grads[t];
    TORCH_CHECK(g.device().is_cpu() && g.is_contiguous() && g.dim() >= 1, op, ": grads[", t,
                "] must be a contiguous CPU tensor with at least one dimension");
    TORCH_CHECK(at::isFloatingType(g.scalar_type()), op, ": grads[", t,
                "] must be floating point, got ", g.scalar_type());
    TORCH_CHECK(g.size(0) % unit_size == 0, op, ": grads[", t, "] has ", g.size(0),
                " rows, not a multiple of unit_size ", unit_size);
    const int64_t group = group_of_tensor[t];
    TORCH_CHECK(group >= 0 && group < static_cast<int64_t>(ratios.size()), op,
                ": group_of_tensor[", t, "] = ", group, " has no ratio");
    const double r = ratios[group];
    TORCH_CHECK(r >= 0.0 && r <= 1.0, op, ": ratios[", group, "] = ", r, " is outside [0, 1]");
    const int64_t units = g.size(0) / unit_size;
    s.per_unit[t] = units > 0 ? g.numel() / units : 0;
    s.first[t + 1] = s.first[t] + units;
  }
  const int64_t U = s.first[T];
  s.owner.resize(U);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(s.owner.begin() + s.first[t], s.owner.begin() + s.first[t + 1], t);
  }
  s.factors.assign(U, 0.0);
  if (U == 0) return s;
  std::vector<double> u(U);
  // pass 1
  at::parallel_for(0, U, unit_grain(grads, U), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t t = s.owner[j];
      const at::Tensor& g = grads[t];
      const int64_t local = j - s.first[t];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                      "amss_unit_importance", [&] {
        u[j] = unit_sum_of_squares(g.const_data_ptr<scalar_t>() + local * s.per_unit[t],
                                   s.per_unit[t]);
      });
    }
  });
  // pass 2: the small per-unit arrays, one tensor per task
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      unit_factors(u.data() + s.first[t], s.first[t + 1] - s.first[t],
                   ratios[group_of_tensor[t]], mode, scaling, static_cast<uint64_t>(seed),
                   static_cast<uint64_t>(step), static_cast<uint64_t>(t),
                   s.factors.data() + s.first[t]);
    }
  });
  return s;
}

}  // namespace

void amss_mask_gradients_cpu(at::TensorList grads, at::IntArrayRef group_of_tensor,
                             at::ArrayRef<double> ratios, int64_t mode, int64_t scaling,
                             int64_t seed, int64_t step, int64_t unit_size) {
  constexpr const char* op = "amss_mask_gradients";
  const StepUnits s = unit_factors_of_step(grads, group_of_tensor, ratios, mode, scaling, seed,
                                           step, unit_size, op);
  const int64_t U = static_cast<int64_t>(s.factors.size());
  // pass 3
  at::parallel_for(0, U, unit_grain(grads, U), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (s.factors[j] == 1.0) continue;  // kept as is: no write
      const int64_t t = s.owner[j];
      const at::Tensor& g = grads[t];
      const int64_t local = j - s.first[t];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), op, [&] {
        scalar_t* x = g.data_ptr<scalar_t>() + local * s.per_unit[t];
        if (s.factors[j] == 0.0) {
          std::fill(x, x + s.per_unit[t], scalar_t(0));
        } else {
          scale_unit(x, s.per_unit[t], s.factors[j]);
        }
      });
    }
  });
}

void amss_masked_sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                              at::IntArrayRef fresh, at::IntArrayRef group_of_tensor,
                              at::ArrayRef<double> ratios, int64_t mode, int64_t scaling,
                              int64_t seed, int64_t step, int64_t unit_size, double lr,
                              double momentum, double dampening, double weight_decay,
                              bool nesterov) {
  constexpr const char* op = "amss_masked_sgd_step";
  const int64_t T = static_cast<int64_t>(grads.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == T, op, ": params and grads differ in length");
  const bool use_momentum = momentum != 0.0;
  TORCH_CHECK(!use_momentum || (static_cast<int64_t>(buffers.size()) == T &&
                                static_cast<int64_t>(fresh.size()) == T),
              op, ": with momentum, one buffer and one fresh flag per tensor");
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(params[t].sizes() == grads[t].sizes() && params[t].is_contiguous() &&
                    params[t].scalar_type() == grads[t].scalar_type(),
                op, ": params[", t, "] must be contiguous with its gradient's shape and dtype");
    TORCH_CHECK(!use_momentum || (buffers[t].sizes() == params[t].sizes() &&
                                  buffers[t].is_contiguous() &&
                                  buffers[t].scalar_type() == params[t].scalar_type()),
                op, ": buffers[", t, "] must be contiguous with the parameter's shape and dtype");
  }
  const StepUnits s = unit_factors_of_step(grads, group_of_tensor, ratios, mode, scaling, seed,
                                           step, unit_size, op);
  const int64_t U = static_cast<int64_t>(s.factors.size());
  // pass 3: the SGD rule on the kept units only (reference: masked_sgd_step_reference)
  at::parallel_for(0, U, unit_grain(grads, U), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const double f = s.factors[j];
      if (f == 0.0) continue;  // left out: parameter and buffer do not move
      const int64_t t = s.owner[j];
      const int64_t offset = (j - s.first[t]) * s.per_unit[t];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[t].scalar_type(), op, [&] {
        const scalar_t* g = grads[t].const_data_ptr<scalar_t>() + offset;
        scalar_t* p = params[t].data_ptr<scalar_t>() + offset;
        scalar_t* b = use_momentum ? buffers[t].data_ptr<scalar_t>() + offset : nullptr;
        const bool first_step = use_momentum && fresh[t] != 0;
        for (int64_t e = 0; e < s.per_unit[t]; ++e) {
          const double d = static_cast<double>(g[e]) * f + weight_decay * static_cast<double>(p[e]);
          double direction = d;
          if (use_momentum) {
            const double nb =
                first_step ? d : momentum * static_cast<double>(b[e]) + (1.0 - dampening) * d;
            b[e] = static_cast<scalar_t>(nb);
            direction = nesterov ? d + momentum * nb : nb;
          }
          p[e] = static_cast<scalar_t>(static_cast<double>(p[e]) - lr * direction);
        }
      });
    }
  });
}

}  // namespace ether_kernels::cpu

