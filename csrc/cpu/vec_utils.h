// SIMD helpers shared by the CPU kernels (included only by files under kernels/, which are
// compiled once per instruction set: see setup.py and cpu_capability.h).
//
// Every kernel walks its data in steps of kStep elements and sees each step as two
// Vectorized<opmath_t> registers ("lo" and "hi"), whatever the storage type:
//   float, double  -> two plain loads
//   Half, BFloat16 -> one load of kStep 16-bit values, widened to two float vectors
// so low precision is always accumulated in fp32 and one code path serves all four dtypes.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float definitions
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ether_kernels::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
struct OpmathPair {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<scalar_t>;
  static constexpr int64_t kStep = 2 * Vec::size();
  static_assert(!kReduced || Vectorized<scalar_t>::size() == kStep,
                "a 16-bit vector must widen to exactly two float vectors");

  static inline void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    } else {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + Vec::size());
    }
  }

  // Loads n < kStep elements; the missing lanes read as zero.
  static inline void load_partial(const scalar_t* p, int64_t n, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, n));
    } else if (n <= Vec::size()) {
      lo = Vec::loadu(p, n);
      hi = Vec(opmath_t(0));
    } else {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + Vec::size(), n - Vec::size());
    }
  }

  static inline void store(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + Vec::size());
    }
  }

  static inline void store_partial(scalar_t* p, int64_t n, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p, n);
    } else if (n <= Vec::size()) {
      lo.store(p, n);
    } else {
      lo.store(p);
      hi.store(p + Vec::size(), n - Vec::size());
    }
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace ether_kernels::cpu
