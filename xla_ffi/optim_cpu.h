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

// The element of storage type T (a table's or a slot's) for the float32
// result v of column `col` of the row whose key is `key` (a RoundingRowKey,
// or a slot's RoundingSlotKey of it): the storage type's round-to-nearest-
// even conversion, or stochastic rounding; float32 stores v either way.
template <typename T, typename Rounding>
T RoundTo(const Rounding& rounding, uint32_t key, int64_t col, float v) {
  if constexpr (!Rounding::kStochastic || std::is_same_v<T, float>) {
    return FromFloat<T>(v);
  } else {
    const uint32_t r = rounding.Word(key, col);
    if constexpr (std::is_same_v<T, bf16_t>)
      return bf16_t{StochasticBf16(FloatBits(v), r)};
    else
      return f16_t{StochasticF16(FloatBits(v), r)};
  }
}

// Row-wise Adagrad on every valid unique row: acc is one element per row
// ([R] or [R, 1], storage type S, slot 0's rounding), sum_d g^2 taken in
// column order.
template <typename T, typename S, typename Rounding>
void RowwiseRows(const RowGrads& rg, const RowwiseAdagradRule& rule,
                 const Rounding& rounding, T* table, S* acc) {
  ForEachRow(rg, table, [&](int64_t r, T* w, const float* g) {
    float sum_sq = 0.f;
    for (int64_t d = 0; d < rg.dim; ++d) sum_sq += g[d] * g[d];
    const float a = rule.Accumulate(ToFloat(acc[r]), sum_sq, rg.dim);
    const float scale = AdagradScale(a, rule.eps);
    const uint32_t key = rounding.RowKey(r);
    acc[r] = RoundTo<S>(rounding, rounding.SlotKey(key, 0), 0, a);
    for (int64_t d = 0; d < rg.dim; ++d)
      w[d] = RoundTo<T>(rounding, key, d,
                        rule.Step(ToFloat(w[d]), g[d], scale));
  });
}

// Applies `rule` to every valid unique row: element by element, slots s0, s1
// [R, D] of storage type S (nullptr when the rule has fewer); a kPerRow rule
// row by row (RowwiseRows, s0 [R]). Each slot element is loaded to float32,
// updated with the weight, and stored back like the table: by `rounding`
// (bound to its hparams by the caller), each slot with its own words.
template <typename T, typename S, typename Rule, typename Rounding>
void ApplyRows(const RowGrads& rg, const Rule& rule, const Rounding& rounding,
               T* table, S* s0, S* s1) {
  if constexpr (Rule::kPerRow) {
    RowwiseRows(rg, rule, rounding, table, s0);
  } else {
    ForEachRow(rg, table, [&](int64_t r, T* w, const float* g) {
      S* a = s0 ? s0 + r * rg.dim : nullptr;
      S* b = s1 ? s1 + r * rg.dim : nullptr;
      const uint32_t key = rounding.RowKey(r);
      const uint32_t key_a = rounding.SlotKey(key, 0);
      const uint32_t key_b = rounding.SlotKey(key, 1);
      for (int64_t d = 0; d < rg.dim; ++d) {
        float wv = ToFloat(w[d]);
        float av = a ? ToFloat(a[d]) : 0.f;
        float bv = b ? ToFloat(b[d]) : 0.f;
        rule(wv, av, bv, g[d]);
        w[d] = RoundTo<T>(rounding, key, d, wv);
        if (a) a[d] = RoundTo<S>(rounding, key_a, d, av);
        if (b) b[d] = RoundTo<S>(rounding, key_b, d, bv);
      }
    });
  }
}

}  // namespace sok
