// The int8 row format of the read-only inference tables, shared by the CPU
// and CUDA kernels: row r is q [R, D] uint8 codes with a per-row float32
// (scale, bias) in scale_bias [R, 2], and element d of it is
//   q[r, d] * scale[r] + bias[r]      (q in 0..255),
// as FBGEMM's int8 rows (sok_jax/distributed/quantized.py quantizes to it).
// No XLA, no nanobind.
#pragma once

#include <cstdint>

#include "embed_math.h"

namespace sok {

SOK_HD float Dequant(uint8_t q, float scale, float bias) {
  return static_cast<float>(q) * scale + bias;
}

}  // namespace sok
