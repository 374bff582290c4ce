// Buffer checks shared by the CPU and CUDA handlers of the int8 lookup
// (sok_quant_fwd): the int8 table's two buffers, the bags (embed_checks.h)
// and the float32 output.
#pragma once

#include <cstdint>

#include "common.h"
#include "embed_checks.h"

namespace sok {

// q [rows, D] uint8, scale_bias [rows, 2] float32, the bags, fixed_nnz, and
// out [num_bags, D] float32.
inline ffi::Error CheckQuantFwd(const ffi::AnyBuffer& q,
                                const ffi::AnyBuffer& scale_bias,
                                const ffi::AnyBuffer& ids,
                                const ffi::AnyBuffer& offsets,
                                const ffi::AnyBuffer& weights,
                                const ffi::AnyBuffer& out, int32_t combiner,
                                int64_t fixed_nnz, EmbedShape* s) {
  if (auto e = Rank2(q, "q", &s->rows, &s->dim); e.failure()) return e;
  if (q.element_type() != ffi::DataType::U8)
    return InvalidArgument("q must be uint8 [rows, D]");
  int64_t sb_rows, sb_cols;
  if (auto e = Rank2(scale_bias, "scale_bias", &sb_rows, &sb_cols); e.failure())
    return e;
  if (scale_bias.element_type() != ffi::DataType::F32 || sb_rows != s->rows ||
      sb_cols != 2)
    return InvalidArgument("scale_bias must be float32 [rows, 2] like q's rows");
  if (auto e = CheckBags(ids, offsets, weights, combiner, &s->n, &s->m);
      e.failure())
    return e;
  if (auto e = CheckFixedNnz(fixed_nnz, s->n, s->m); e.failure()) return e;
  if (out.element_type() != ffi::DataType::F32 ||
      out.element_count() != static_cast<size_t>(s->m * s->dim))
    return InvalidArgument("out must be float32 [num_bags, D]");
  return ffi::Error::Success();
}

}  // namespace sok
