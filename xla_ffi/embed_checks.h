// Buffer checks shared by the CPU and CUDA embedding handlers: the bag
// layout (ids, offsets, weights) and the combiner, each target's buffers
// against them, and the rule part of the fused backward+update.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"
#include "embed_math.h"
#include "optim_checks.h"
#include "optim_math.h"
#include "rounding_math.h"

namespace sok {

inline ffi::Error CheckBags(const ffi::AnyBuffer& ids,
                            const ffi::AnyBuffer& offsets,
                            const ffi::AnyBuffer& weights, int32_t combiner,
                            int64_t* n, int64_t* m) {
  if (ids.dimensions().size() != 1)
    return InvalidArgument("ids must be rank 1 (flattened)");
  if (offsets.dimensions().size() != 1 || offsets.element_count() < 1 ||
      offsets.element_type() != ffi::DataType::S32)
    return InvalidArgument("offsets must be int32 [num_bags + 1]");
  if (weights.element_type() != ffi::DataType::F32)
    return InvalidArgument("weights must be float32");
  *n = ids.element_count();
  *m = offsets.element_count() - 1;
  if (*n >= INT32_MAX) return InvalidArgument("at most 2^31 - 1 ids per call");
  if (weights.element_count() != 0 && weights.element_count() != *n)
    return InvalidArgument("weights must have as many entries as ids, or none");
  if (combiner < kSum || combiner > kSqrtn)
    return InvalidArgument("combiner must be 0 (sum), 1 (mean) or 2 (sqrtn)");
  return ffi::Error::Success();
}

// The per-id weights, or nullptr for an unweighted call (weights [0]).
inline const float* OptionalWeights(const ffi::AnyBuffer& weights) {
  return weights.element_count() ? weights.typed_data<float>() : nullptr;
}

// fixed_nnz > 0 says bag b holds positions [b * fixed_nnz, (b + 1) * fixed_nnz)
// (offsets are then not read); it must tile the ids exactly.
inline ffi::Error CheckFixedNnz(int64_t fixed_nnz, int64_t n, int64_t m) {
  if (fixed_nnz < 0) return InvalidArgument("fixed_nnz must be >= 0");
  if (fixed_nnz > 0 && n != m * fixed_nnz)
    return InvalidArgument("fixed_nnz > 0 needs len(ids) == num_bags * fixed_nnz");
  return ffi::Error::Success();
}

// The sizes every embedding target is checked against: the table's (or the
// dense cotangent's) rows and D, N ids, M bags, and whether grad_out is
// float32 while the table is not (the fused backward+update only).
struct EmbedShape {
  int64_t rows = 0, dim = 0, n = 0, m = 0;
  bool grad_f32 = false;
};

// The forward (sok_embed_fwd): table [rows, D], the bags, fixed_nnz, and
// out [num_bags, D] of the table's dtype.
inline ffi::Error CheckFwd(const ffi::AnyBuffer& table,
                           const ffi::AnyBuffer& ids,
                           const ffi::AnyBuffer& offsets,
                           const ffi::AnyBuffer& weights,
                           const ffi::AnyBuffer& out, int32_t combiner,
                           int64_t fixed_nnz, EmbedShape* s) {
  if (auto e = Rank2(table, "table", &s->rows, &s->dim); e.failure()) return e;
  if (auto e = CheckBags(ids, offsets, weights, combiner, &s->n, &s->m);
      e.failure())
    return e;
  if (auto e = CheckFixedNnz(fixed_nnz, s->n, s->m); e.failure()) return e;
  if (out.element_type() != table.element_type() ||
      out.element_count() != static_cast<size_t>(s->m * s->dim))
    return InvalidArgument("out must be [num_bags, D] of the table's dtype");
  return ffi::Error::Success();
}

// The sparse backward (sok_embed_bwd): grad_out [num_bags, D], the bags, and
// unique_rows [N] / row_grads [N, D]. s->rows is left to the caller (the
// num_rows attribute, whose range each platform checks).
inline ffi::Error CheckBwd(const ffi::AnyBuffer& grad, const ffi::AnyBuffer& ids,
                           const ffi::AnyBuffer& offsets,
                           const ffi::AnyBuffer& weights,
                           const ffi::Buffer<ffi::S32>& unique_rows,
                           const ffi::Buffer<ffi::F32>& row_grads,
                           int32_t combiner, EmbedShape* s) {
  int64_t m_g;
  if (auto e = Rank2(grad, "grad_out", &m_g, &s->dim); e.failure()) return e;
  if (auto e = CheckBags(ids, offsets, weights, combiner, &s->n, &s->m);
      e.failure())
    return e;
  if (m_g != s->m) return InvalidArgument("grad_out must have num_bags rows");
  if (unique_rows.element_count() != static_cast<size_t>(s->n) ||
      row_grads.element_count() != static_cast<size_t>(s->n * s->dim))
    return InvalidArgument("unique_rows/row_grads must be [N] and [N, D]");
  return ffi::Error::Success();
}

// A [rows, D] buffer (`what`: the table, or the dense cotangent), grad_out
// [num_bags, D] and the bags; `msg` when grad_out's shape disagrees or its
// dtype is not `dtype_ok` (the caller's rule).
inline ffi::Error CheckGradBags(const ffi::AnyBuffer& rows_buf,
                                const char* what, const ffi::AnyBuffer& grad,
                                const ffi::AnyBuffer& ids,
                                const ffi::AnyBuffer& offsets,
                                const ffi::AnyBuffer& weights, int32_t combiner,
                                bool dtype_ok, const char* msg, EmbedShape* s) {
  int64_t m_g, d_g;
  if (auto e = Rank2(rows_buf, what, &s->rows, &s->dim); e.failure()) return e;
  if (auto e = Rank2(grad, "grad_out", &m_g, &d_g); e.failure()) return e;
  if (auto e = CheckBags(ids, offsets, weights, combiner, &s->n, &s->m);
      e.failure())
    return e;
  if (m_g != s->m || d_g != s->dim || !dtype_ok) return InvalidArgument(msg);
  return ffi::Error::Success();
}

// The backward to the dense cotangent (sok_embed_bwd_dense): grad_out
// [num_bags, D] of the dtype of dense [rows, D], and the bags.
inline ffi::Error CheckBwdDense(const ffi::AnyBuffer& grad,
                                const ffi::AnyBuffer& ids,
                                const ffi::AnyBuffer& offsets,
                                const ffi::AnyBuffer& weights,
                                const ffi::AnyBuffer& dense, int32_t combiner,
                                EmbedShape* s) {
  if (auto e = CheckGradBags(
          dense, "dense", grad, ids, offsets, weights, combiner,
          grad.element_type() == dense.element_type(),
          "grad_out must be [num_bags, D] of the dense dtype", s);
      e.failure())
    return e;
  if (s->rows >= INT32_MAX)
    return InvalidArgument("dense may have at most 2^31 - 2 rows");
  return ffi::Error::Success();
}

// The fused backward+update (sok_embed_bwd_update): table [rows, D] and its
// output, grad_out [num_bags, D] of the table's dtype or float32, the bags.
inline ffi::Error CheckBwdUpdate(const ffi::AnyBuffer& table,
                                 const ffi::AnyBuffer& grad,
                                 const ffi::AnyBuffer& ids,
                                 const ffi::AnyBuffer& offsets,
                                 const ffi::AnyBuffer& weights,
                                 ffi::Result<ffi::AnyBuffer>& table_out,
                                 int32_t combiner, EmbedShape* s) {
  s->grad_f32 = grad.element_type() == ffi::DataType::F32;
  if (auto e = CheckGradBags(
          table, "table", grad, ids, offsets, weights, combiner,
          grad.element_type() == table.element_type() || s->grad_f32,
          "grad_out must be [num_bags, D] of the table's dtype or float32", s);
      e.failure())
    return e;
  if (table_out->element_type() != table.element_type() ||
      table_out->element_count() != table.element_count())
    return InvalidArgument("table output must match the table");
  if (s->rows >= INT32_MAX)
    return InvalidArgument("table may have at most 2^31 - 2 rows");
  return ffi::Error::Success();
}

// The weight gradient (sok_embed_wgrad): table [rows, D], grad_out
// [num_bags, D] of the table's dtype, and bags with weights.
inline ffi::Error CheckWgrad(const ffi::AnyBuffer& table,
                             const ffi::AnyBuffer& grad,
                             const ffi::AnyBuffer& ids,
                             const ffi::AnyBuffer& offsets,
                             const ffi::AnyBuffer& weights, int32_t combiner,
                             EmbedShape* s) {
  if (auto e = CheckGradBags(
          table, "table", grad, ids, offsets, weights, combiner,
          grad.element_type() == table.element_type(),
          "grad_out must be [num_bags, D] of the table's dtype", s);
      e.failure())
    return e;
  if (weights.element_count() != static_cast<size_t>(s->n))
    return InvalidArgument("weights are required for the weight gradient");
  return ffi::Error::Success();
}

// The sparse gradient written out dense (sok_rows_to_dense): dense [rows, D]
// and row_grads [len(unique_rows), D]; s->n is len(unique_rows).
inline ffi::Error CheckRowsToDense(const ffi::Buffer<ffi::S32>& unique_rows,
                                   const ffi::Buffer<ffi::F32>& row_grads,
                                   const ffi::AnyBuffer& dense, EmbedShape* s) {
  if (auto e = Rank2(dense, "dense", &s->rows, &s->dim); e.failure()) return e;
  s->n = unique_rows.element_count();
  if (row_grads.element_count() != static_cast<size_t>(s->n * s->dim))
    return InvalidArgument("row_grads must be [len(unique_rows), D]");
  return ffi::Error::Success();
}

// The rule part of sok_embed_bwd_update, the same on both platforms: the
// rule named by rule_id and consts (optim_math.h VisitRule), its hparams and
// the rule's slots checked against the table's [rows, D] (slots of a kPerRow
// rule: one element per row) and the first slot's dtype (optim_checks.h
// CheckSlot; slots the rule does not use are ignored), every output made to
// hold its input by copy(in, out, bytes) (a no-op when XLA aliased them),
// then body(rule, rounding, slot) with the rounding policy `stochastic` picks
// (rounding_math.h VisitRounding; its hparams follow the rule's, both
// checked here, neither bound) and the slot outputs as the platform's storage
// type of the slot dtype, StorageOf<Tag>::type* (nullptr beyond the rule's).
template <template <typename> class StorageOf, typename Copy, typename Body>
ffi::Error WithUpdateRule(int32_t rule_id, ffi::Span<const float> consts,
                          int32_t stochastic,
                          const ffi::Buffer<ffi::F32>& hparams,
                          const ffi::AnyBuffer& table,
                          ffi::Result<ffi::AnyBuffer>& table_out,
                          const ffi::AnyBuffer& s0, const ffi::AnyBuffer& s1,
                          ffi::Result<ffi::AnyBuffer>& s0_out,
                          ffi::Result<ffi::AnyBuffer>& s1_out, int64_t rows,
                          int64_t dim, Copy&& copy, Body&& body) {
  const ffi::AnyBuffer* in[2] = {&s0, &s1};
  ffi::Result<ffi::AnyBuffer>* out[2] = {&s0_out, &s1_out};
  ffi::Error result = ffi::Error::Success();
  const bool known = VisitRule(rule_id, consts.begin(), consts.size(), [&](auto rule) {
    using Rule = decltype(rule);
    result = VisitRounding(stochastic, [&](auto rounding) -> ffi::Error {
      using Rounding = decltype(rounding);
      const size_t num_hparams = Rule::kHparams + Rounding::kHparams;
      if (hparams.element_count() < num_hparams)
        return InvalidArgument("hparams must hold " +
                               std::to_string(num_hparams) + " float32 values");
      const int64_t count = Rule::kPerRow ? rows : rows * dim;
      const ffi::DataType slot_dtype = s0.element_type();
      for (int k = 0; k < Rule::kSlots; ++k)
        if (auto e = CheckSlot(*in[k], *out[k], count, slot_dtype,
                               "slot " + std::to_string(k));
            e.failure())
          return e;
      return DispatchSlots(slot_dtype, [&](auto slot_tag) {
        using S = typename StorageOf<decltype(slot_tag)>::type;
        S* slot[2] = {nullptr, nullptr};
        for (int k = 0; k < Rule::kSlots; ++k) {
          slot[k] = (*out[k])->template reinterpret_data<S>();
          copy(in[k]->untyped_data(), slot[k], in[k]->size_bytes());
        }
        copy(table.untyped_data(), table_out->untyped_data(),
             table.size_bytes());
        return body(rule, rounding, static_cast<S* const*>(slot));
      });
    });
  });
  if (!known)
    return InvalidArgument("unknown rule " + std::to_string(rule_id) +
                           " or too few constants (" +
                           std::to_string(consts.size()) + ")");
  return result;
}

}  // namespace sok
