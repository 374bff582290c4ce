// CPU handler of the int8 inference lookup (sok_quant_fwd): each bag's rows
// dequantized (quant_math.h) as they are combined, with the float lookup's
// rules (embed_math.h: valid rows, combiner scale) and its summation order:
// per bag, positions in order, then the combiner's factor.
#include <algorithm>
#include <vector>

#include "common.h"
#include "embed_math.h"
#include "quant_checks.h"
#include "quant_math.h"
#include "signatures.h"

namespace sok {
namespace {

template <typename K>
void QuantForward(const uint8_t* q, const float* sb, int64_t rows, int64_t dim,
                  const K* ids, const int32_t* off, const float* w, int64_t n,
                  int64_t m, int32_t combiner, int64_t fixed_nnz, float* out) {
  for (int64_t b = 0; b < m; ++b) {
    int64_t lo = b * fixed_nnz, hi = lo + fixed_nnz;
    if (fixed_nnz == 0) {  // offsets clamped to the ids, as the float lookup
      lo = std::min<int64_t>(std::max<int32_t>(off[b], 0), n);
      hi = std::min<int64_t>(std::max<int64_t>(off[b + 1], lo), n);
    }
    float* acc = out + b * dim;
    std::fill(acc, acc + dim, 0.f);
    float wsum = 0.f, w2sum = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t r = RowOf(ids[j], rows);
      if (r < 0) continue;
      const float wj = w ? w[j] : 1.f;
      wsum += wj;
      w2sum += wj * wj;
      const uint8_t* row = q + r * dim;
      const float scale = sb[2 * r], bias = sb[2 * r + 1];
      for (int64_t d = 0; d < dim; ++d) acc[d] += wj * Dequant(row[d], scale, bias);
    }
    const float f = CombinerScale(combiner, wsum, w2sum);
    for (int64_t d = 0; d < dim; ++d) acc[d] *= f;
  }
}

ffi::Error QuantFwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer scale_bias,
                        ffi::AnyBuffer ids, ffi::AnyBuffer offsets,
                        ffi::AnyBuffer weights, ffi::Result<ffi::AnyBuffer> out,
                        int32_t combiner, int64_t fixed_nnz) {
  EmbedShape sh;
  if (auto e = CheckQuantFwd(q, scale_bias, ids, offsets, weights, *out,
                             combiner, fixed_nnz, &sh);
      e.failure())
    return e;
  return DispatchKey(ids.element_type(), "ids", [&](auto key) {
    using K = decltype(key);
    QuantForward<K>(q.typed_data<uint8_t>(), scale_bias.typed_data<float>(),
                    sh.rows, sh.dim, ids.reinterpret_data<K>(),
                    offsets.typed_data<int32_t>(), OptionalWeights(weights),
                    sh.n, sh.m, combiner, fixed_nnz, out->typed_data<float>());
    return ffi::Error::Success();
  });
}

}  // namespace

SOK_QUANT_TARGETS(SOK_CPU_HANDLER)

void AppendQuantTargetsCpu(TargetList& out) {
  out.insert(out.end(), {SOK_QUANT_TARGETS(SOK_CPU_TARGET)});
}

}  // namespace sok
