// Which copy of the CPU kernels runs: the widest instruction set that both this processor
// (as ATen sees it, so ATEN_CPU_CAPABILITY can lower it) and this build support.
#include "cpu_capability.h"

#include <ATen/Version.h>

namespace ether_kernels::cpu {

namespace {
Capability detect() {
  const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", ...
#if defined(ETHER_KERNELS_HAVE_AVX512) && defined(ETHER_KERNELS_HAVE_AVX2)
  if (aten == "AVX512") return Capability::kAVX512;
  if (aten == "AVX2") return Capability::kAVX2;
#endif
  return Capability::kDefault;
}
}  // namespace

Capability capability() {
  static const Capability chosen = detect();
  return chosen;
}

std::string capability_name() {
  switch (capability()) {
    case Capability::kAVX512: return "AVX512";
    case Capability::kAVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

}  // namespace ether_kernels::cpu
