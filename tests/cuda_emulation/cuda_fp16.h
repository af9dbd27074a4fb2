#pragma once
struct __half { _Float16 x; __half() = default; };
inline float __half2float(__half h) { return (float)h.x; }
inline __half __float2half_rn(float f) { __half h; h.x = (_Float16)f; return h; }
