// Host-side pieces of the sparse optimizers shared by the CPU handlers
// (optim_cpu.cc, and the fused backward+update in embed_cpu.cc): the unique
// rows of one step and the element-wise rule applied to them. No handlers.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_types.h"
#include "optim_math.h"

namespace sok {

// The unique-row gradient of one step, checked against the table's [R, D].
struct RowGrads {
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t count = 0;  // valid entries of unique_rows
  const int32_t* unique_rows = nullptr;
  const float* grads = nullptr;
  const float* hparams = nullptr;
};

// Makes `out` hold `in` (a no-op when XLA aliased them, the normal case).
inline void CopyIfDistinct(const void* in, void* out, size_t bytes) {
  if (in != out && bytes) std::memcpy(out, in, bytes);
}

// Applies `rule` element by element to every valid unique row; slots s0, s1
// are [R, D] float32 (nullptr when the rule has fewer).
template <typename T, typename Rule>
void ApplyRows(const RowGrads& rg, const Rule& rule, T* table, float* s0,
               float* s1) {
  float dummy0 = 0.f, dummy1 = 0.f;
  for (int64_t u = 0; u < rg.count; ++u) {
    int64_t r = rg.unique_rows[u];
    if (r < 0 || r >= rg.rows) continue;
    T* w = table + r * rg.dim;
    const float* g = rg.grads + u * rg.dim;
    float* a = s0 ? s0 + r * rg.dim : nullptr;
    float* b = s1 ? s1 + r * rg.dim : nullptr;
    for (int64_t d = 0; d < rg.dim; ++d) {
      float wv = ToFloat(w[d]);
      float& av = a ? a[d] : dummy0;
      float& bv = b ? b[d] : dummy1;
      rule(wv, av, bv, g[d]);
      w[d] = FromFloat<T>(wv);
    }
  }
}

}  // namespace sok
