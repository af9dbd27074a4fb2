// Run-time choice of the instruction set for the CPU kernels.
//
// Each file in csrc/cpu/kernels/ is compiled three times by setup.py: for the x86-64
// baseline (DEFAULT), for AVX2+FMA and for AVX-512, each time inside its own namespace
// ether_kernels::cpu::<CAPABILITY> (the same trick ATen uses for its own kernels). At run
// time we call the widest version this processor supports, as ATen reports it: the
// ATEN_CPU_CAPABILITY environment variable (default, avx2, avx512) lowers it for testing.
// No -march=native: what a user installs runs on any x86-64.
#pragma once

#include <string>

namespace ether_kernels::cpu {

enum class Capability { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// The capability the kernels run with (computed once, then cached).
Capability capability();

// "DEFAULT", "AVX2" or "AVX512": what info() reports.
std::string capability_name();

// Calls `fn` with the namespace-qualified kernel of the chosen capability, e.g.
//   ETHER_CPU_DISPATCH(ether_loss_stats)(args...)
#if defined(ETHER_KERNELS_HAVE_AVX512) && defined(ETHER_KERNELS_HAVE_AVX2)
#define ETHER_CPU_DISPATCH(fn)                                                              \
  (::ether_kernels::cpu::capability() == ::ether_kernels::cpu::Capability::kAVX512          \
       ? &::ether_kernels::cpu::AVX512::fn                                                  \
       : ::ether_kernels::cpu::capability() == ::ether_kernels::cpu::Capability::kAVX2      \
             ? &::ether_kernels::cpu::AVX2::fn                                              \
             : &::ether_kernels::cpu::DEFAULT::fn)
#else
#define ETHER_CPU_DISPATCH(fn) (&::ether_kernels::cpu::DEFAULT::fn)
#endif

}  // namespace ether_kernels::cpu
