// How an update writes its float32 result into a 16-bit table: round to
// nearest even (NearestRounding, the storage types' own conversion) or
// stochastically (StochasticRounding), shared by the CPU and CUDA kernels so
// both write the same bits. sok_jax/ops/rounding.py is the pure-JAX twin,
// operation for operation (uint32 arithmetic only). No XLA, no nanobind.
//
// Stochastic rounding sends x to one of its two neighbours in the 16-bit
// format, lo <= x <= hi, choosing hi with probability (x - lo) / (hi - lo),
// so that E[round(x)] = x. The random word of element (row, col) of the table
// at step t is a pure function of (seed, t, row, col): a counter-based hash,
// so every platform and every launch shape draws the same word. `row` is the
// index of the row in the table the kernel updates (a shard's local row).
// A 16-bit optimizer slot is written the same way, its words those of the
// same (seed, t, row, col) with the row key salted per slot (RoundingSlotKey),
// so a slot never draws the bits its weight draws. A row-wise slot ([R]) is
// column 0 of its row.
//
//   bfloat16: the 16 low random bits are added to the float32 bit pattern,
//     which is then truncated to its high 16 bits. Adding to the magnitude
//     bits carries into the exponent where the mantissa overflows, so this
//     holds across binades, float32 subnormals included; finite values above
//     the largest bfloat16 go to inf with the probability of the same rule
//     (inf standing where the next binade would start). NaN stays NaN (quiet).
//   float16: normal results (|x| >= 2^-14) as bfloat16, with the 13 random
//     bits float16 drops; a rounded magnitude of 2^16 or more is inf, so
//     finite x in (65504, 65536) goes to 65504 or inf in proportion (inf
//     standing at 2^16) and x >= 65536 to inf, where round-to-nearest also
//     gives inf. Below 2^-14 the float16 grid has the fixed step 2^-24: |x| is
//     an integer m times 2^-s steps (s >= 14 dropped bits), rounded up when
//     s random bits fall below the dropped remainder; for s > 31, 32 random
//     bits are compared with the remainder's top 32 bits (a probability short
//     by less than 2^-32 of a step), and float32 subnormals round to zero.
//     NaN stays NaN (quiet), inf stays inf.
// Unbiased exactly wherever the random bits cover the dropped bits: all of
// bfloat16, float16 normals, and float16 subnormal results from |x| >= 2^-32.
#pragma once

#include <cstdint>
#include <cstring>

#include "embed_math.h"  // SOK_HD
#include "hash_math.h"   // Fmix32

namespace sok {

SOK_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

constexpr uint32_t kRoundingSeedSalt = 0x9e3779b9u;  // keeps seed 0 off Fmix32(0)
constexpr uint32_t kRoundingColumnStep = 0x9e3779b9u;  // odd: columns stay distinct

// The hash of (seed, step), then of a row, then of a column: the random word
// of one table element (murmur3's finalizer, Fmix32, a bijection with full
// avalanche, applied once per input).
SOK_HD uint32_t RoundingStepKey(uint32_t seed, uint32_t step) {
  return Fmix32(Fmix32(seed ^ kRoundingSeedSalt) ^ step);
}
SOK_HD uint32_t RoundingRowKey(uint32_t step_key, uint32_t row) {
  return Fmix32(step_key ^ row);
}
SOK_HD uint32_t RoundingWord(uint32_t row_key, uint32_t col) {
  return Fmix32(row_key + col * kRoundingColumnStep);
}

// The row key of optimizer slot `slot` (0 or 1, the rule's order) of the row
// whose key is row_key: one salt per slot (murmur3's constants, odd and far
// from the weights' salt), hashed again so the slots' words share nothing
// with the weight's.
constexpr uint32_t kRoundingSlotSalt0 = 0x85ebca6bu;
constexpr uint32_t kRoundingSlotSalt1 = 0xc2b2ae35u;
SOK_HD uint32_t RoundingSlotKey(uint32_t row_key, int slot) {
  const uint32_t salt = slot == 0 ? kRoundingSlotSalt0 : kRoundingSlotSalt1;
  return Fmix32(row_key ^ salt);
}

// The bfloat16 bits of float32 bits u rounded stochastically with random
// word r (its 16 low bits).
SOK_HD uint16_t StochasticBf16(uint32_t u, uint32_t r) {
  if ((u & 0x7fffffffu) > 0x7f800000u)  // NaN: keep it, quiet
    return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + (r & 0xffffu)) >> 16);
}

// The float16 bits of float32 bits u rounded stochastically with random
// word r.
SOK_HD uint16_t StochasticF16(uint32_t u, uint32_t r) {
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x38800000u) {  // a float16 normal, or overflow
    const uint32_t t = a + (r & 0x1fffu);
    if (t >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);
    return static_cast<uint16_t>(sign | (((t >> 23) - 112u) << 10) |
                                 ((t >> 13) & 0x3ffu));
  }
  const uint32_t e = a >> 23;
  if (e == 0) return static_cast<uint16_t>(sign);  // float32 subnormal
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;   // |x| = m * 2^(e - 150)
  const uint32_t s = 126u - e;                       // |x| = m / 2^s steps
  uint32_t q, up;
  if (s < 32u) {
    const uint32_t mask = (1u << s) - 1u;
    q = m >> s;
    up = (r & mask) < (m & mask) ? 1u : 0u;
  } else {
    q = 0u;
    const uint32_t top = s - 32u < 24u ? m >> (s - 32u) : 0u;
    up = r < top ? 1u : 0u;
  }
  return static_cast<uint16_t>(sign | (q + up));
}

// The rounding policies of the update kernels. Bind reads the policy's
// kHparams words from the update's hparams (after the rule's own), RowKey
// hashes a table row, SlotKey salts a row key for one of the row's slots,
// Word gives the random word of a column of that row (or slot row).

// Round to nearest even: the storage type's conversion; takes no hparams.
struct NearestRounding {
  static constexpr bool kStochastic = false;
  static constexpr int kHparams = 0;
  SOK_HD void Bind(const float*) {}
  SOK_HD uint32_t RowKey(int64_t) const { return 0u; }
  SOK_HD uint32_t SlotKey(uint32_t, int) const { return 0u; }
  SOK_HD uint32_t Word(uint32_t, int64_t) const { return 0u; }
};

// Stochastic rounding. Its hparams are the seed and the step, each as two
// 16-bit halves (low first) held exactly as float32 integers in [0, 65535]:
// [seed_lo, seed_hi, step_lo, step_hi].
struct StochasticRounding {
  static constexpr bool kStochastic = true;
  static constexpr int kHparams = 4;
  uint32_t step_key = 0u;

  SOK_HD static uint32_t Word32(const float* halves) {
    return static_cast<uint32_t>(halves[0]) |
           (static_cast<uint32_t>(halves[1]) << 16);
  }
  SOK_HD void Bind(const float* hp) {
    step_key = RoundingStepKey(Word32(hp), Word32(hp + 2));
  }
  SOK_HD uint32_t RowKey(int64_t row) const {
    return RoundingRowKey(step_key, static_cast<uint32_t>(row));
  }
  SOK_HD uint32_t SlotKey(uint32_t row_key, int slot) const {
    return RoundingSlotKey(row_key, slot);
  }
  SOK_HD uint32_t Word(uint32_t row_key, int64_t col) const {
    return RoundingWord(row_key, static_cast<uint32_t>(col));
  }
};

// Calls f(NearestRounding()) or, when `stochastic` is non-zero,
// f(StochasticRounding()) (unbound: the kernel binds it to its hparams).
template <typename F>
auto VisitRounding(int32_t stochastic, F&& f) {
  if (stochastic) return f(StochasticRounding());
  return f(NearestRounding());
}

}  // namespace sok
