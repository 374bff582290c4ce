// Host-side pieces of the sparse optimizers shared by the CPU handlers
// (optim_cpu.cc, and the fused backward+update in embed_cpu.cc): the
// rule applied to the unique rows of one step, its results written with a
// rounding policy (rounding_math.h). No handlers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu_types.h"
#include "optim_checks.h"
#include "optim_math.h"
#include "rounding_math.h"

namespace sok {

// How many entries of rg.unique_rows are valid, read on the host.
inline int64_t HostCount(const RowGrads& rg) {
  return ClampCount(rg.num_unique[0], rg.capacity);
}

// Calls fn(r, w, g) for every valid unique row, in order: r its index, w the
// table row, g its gradient row.
template <typename T, typename Fn>
void ForEachRow(const RowGrads& rg, T* table, Fn&& fn) {
  const int64_t count = HostCount(rg);
  for (int64_t u = 0; u < count; ++u) {
    const int64_t r = rg.unique_rows[u];
    if (r < 0 || r >= rg.rows) continue;
    fn(r, table + r * rg.dim, rg.grads + u * rg.dim);
  }
}

// The table element for the float32 result v of column `col` of the row
// whose RoundingRowKey is row_key: the storage type's round-to-nearest-even
// conversion, or stochastic rounding; float32 tables store v either way.
template <typename T, typename Rounding>
T RoundTo(const Rounding& rounding, uint32_t row_key, int64_t col, float v) {
  if constexpr (!Rounding::kStochastic || std::is_same_v<T, float>) {
    return FromFloat<T>(v);
  } else {
    const uint32_t r = rounding.Word(row_key, col);
    if constexpr (std::is_same_v<T, bf16_t>)
      return bf16_t{StochasticBf16(FloatBits(v), r)};
    else
      return f16_t{StochasticF16(FloatBits(v), r)};
  }
}

// Row-wise Adagrad on every valid unique row: acc is one float per row
// ([R] or [R, 1]), sum_d g^2 taken in column order.
template <typename T, typename Rounding>
void RowwiseRows(const RowGrads& rg, const RowwiseAdagradRule& rule,
                 const Rounding& rounding, T* table, float* acc) {
  ForEachRow(rg, table, [&](int64_t r, T* w, const float* g) {
    float sum_sq = 0.f;
    for (int64_t d = 0; d < rg.dim; ++d) sum_sq += g[d] * g[d];
    acc[r] = rule.Accumulate(acc[r], sum_sq, rg.dim);
    float scale = AdagradScale(acc[r], rule.eps);
    const uint32_t key = rounding.RowKey(r);
    for (int64_t d = 0; d < rg.dim; ++d)
      w[d] = RoundTo<T>(rounding, key, d,
                        rule.Step(ToFloat(w[d]), g[d], scale));
  });
}

// Applies `rule` to every valid unique row: element by element, slots s0, s1
// [R, D] float32 (nullptr when the rule has fewer); a kPerRow rule row by
// row (RowwiseRows, s0 [R]). The table's new values are written by
// `rounding`, bound to its hparams by the caller.
template <typename T, typename Rule, typename Rounding>
void ApplyRows(const RowGrads& rg, const Rule& rule, const Rounding& rounding,
               T* table, float* s0, float* s1) {
  if constexpr (Rule::kPerRow) {
    RowwiseRows(rg, rule, rounding, table, s0);
  } else {
    float dummy0 = 0.f, dummy1 = 0.f;
    ForEachRow(rg, table, [&](int64_t r, T* w, const float* g) {
      float* a = s0 ? s0 + r * rg.dim : nullptr;
      float* b = s1 ? s1 + r * rg.dim : nullptr;
      const uint32_t key = rounding.RowKey(r);
      for (int64_t d = 0; d < rg.dim; ++d) {
        float wv = ToFloat(w[d]);
        float& av = a ? a[d] : dummy0;
        float& bv = b ? b[d] : dummy1;
        rule(wv, av, bv, g[d]);
        w[d] = RoundTo<T>(rounding, key, d, wv);
      }
    });
  }
}

}  // namespace sok
