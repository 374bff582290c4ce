// Shared by the CPU handlers: host storage types for bfloat16 and float16
// tables, with conversions to and from float (round to nearest even), and the
// host twin of cuda_common.cuh CopyIfDistinct. No kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace sok {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float ToFloat(float v) { return v; }
inline float ToFloat(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float ToFloat(f16_t v) {
  uint32_t h = v.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | ((127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
inline T FromFloat(float f);
template <>
inline float FromFloat<float>(float f) {
  return f;
}
template <>
inline bf16_t FromFloat<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40)};
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>((u + rounding) >> 16)};
}
template <>
inline f16_t FromFloat<f16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu >= 0x7f800000u) {  // inf or nan
    return f16_t{static_cast<uint16_t>(sign | 0x7c00u |
                                       (absu > 0x7f800000u ? 0x200u : 0u))};
  }
  if (absu >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};
  if (absu < 0x38800000u) {  // subnormal or zero in half
    float a;
    std::memcpy(&a, &absu, 4);
    // Scale into the subnormal grid and round to nearest even.
    float scaled = a * 16777216.0f;  // 2^24
    uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
    return f16_t{static_cast<uint16_t>(sign | m)};
  }
  uint32_t exp = ((absu >> 23) - 127 + 15);
  uint32_t man = absu & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return f16_t{static_cast<uint16_t>(sign | h)};
}

// Makes `out` hold `in` (a no-op when XLA aliased them, the normal case for
// the in-place updates).
inline void CopyIfDistinct(const void* in, void* out, size_t bytes) {
  if (in != out && bytes) std::memcpy(out, in, bytes);
}

// CopyIfDistinct as the copy(in, out, bytes) the shared handler bodies take
// (embed_checks.h, optim_checks.h, hash_checks.h).
struct HostCopy {
  void operator()(const void* in, void* out, size_t bytes) const {
    CopyIfDistinct(in, out, bytes);
  }
};

template <typename Tag>
struct HostType;
template <>
struct HostType<F32Tag> {
  using type = float;
};
template <>
struct HostType<BF16Tag> {
  using type = bf16_t;
};
template <>
struct HostType<F16Tag> {
  using type = f16_t;
};

}  // namespace sok
