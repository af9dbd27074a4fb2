#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t x; __nv_bfloat16() = default; };
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = uint32_t(b.x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4); __nv_bfloat16 b;
  if (std::isnan(f)) { b.x = 0x7fc0; return b; }
  u += 0x7fffu + ((u >> 16) & 1u); b.x = uint16_t(u >> 16); return b;
}
