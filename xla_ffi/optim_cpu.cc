// CPU handlers of the fused sparse optimizer family: each applies one
// optimizer step to the rows listed in unique_rows[:num_unique] of a table and
// its slots, in place. Same targets, arguments and per-element rules
// (optim_math.h) as optim_cuda.cu.
//
// The outputs alias the inputs (input_output_aliases in the Python wrapper),
// so untouched rows keep their values without a copy. Should a caller not
// alias them, the handler first copies each input into its output.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_types.h"
#include "optim_cpu.h"
#include "optim_math.h"
#include "signatures.h"

namespace sok {
namespace {

ffi::Error CheckRowGrads(const ffi::AnyBuffer& table,
                         ffi::Result<ffi::AnyBuffer>& table_out,
                         const ffi::Buffer<ffi::S32>& unique_rows,
                         const ffi::Buffer<ffi::F32>& row_grads,
                         const ffi::Buffer<ffi::S32>& num_unique,
                         const ffi::Buffer<ffi::F32>& hparams,
                         size_t num_hparams, RowGrads* rg) {
  if (auto e = Rank2(table, "table", &rg->rows, &rg->dim); e.failure())
    return e;
  if (table_out->element_type() != table.element_type() ||
      table_out->element_count() != table.element_count())
    return InvalidArgument("table output must match the table");
  if (unique_rows.dimensions().size() != 1)
    return InvalidArgument("unique_rows must be rank 1");
  int64_t cap = unique_rows.element_count();
  auto gd = row_grads.dimensions();
  if (gd.size() != 2 || gd[0] != cap || gd[1] != rg->dim)
    return InvalidArgument("row_grads must be [len(unique_rows), D]");
  if (num_unique.element_count() < 1)
    return InvalidArgument("num_unique must hold one int32");
  if (hparams.element_count() < num_hparams)
    return InvalidArgument("hparams must hold " + std::to_string(num_hparams) +
                           " float32 values");
  rg->count = ClampCount(num_unique.typed_data()[0], cap);
  rg->unique_rows = unique_rows.typed_data();
  rg->grads = row_grads.typed_data();
  rg->hparams = hparams.typed_data();
  return ffi::Error::Success();
}

// A float32 slot of `count` elements; its output must match it.
ffi::Error CheckSlot(const ffi::Buffer<ffi::F32>& slot,
                     ffi::Result<ffi::Buffer<ffi::F32>>& out,
                     int64_t count, const char* what) {
  if (static_cast<int64_t>(slot.element_count()) != count ||
      out->element_count() != slot.element_count())
    return InvalidArgument(std::string(what) + " must have " +
                           std::to_string(count) + " elements");
  return ffi::Error::Success();
}

// One handler body for the rules with 0, 1 or 2 [R, D] slots.
template <typename Rule>
ffi::Error UpdateImpl(Rule rule, ffi::AnyBuffer table,
                      const ffi::Buffer<ffi::F32>* s0_in,
                      const ffi::Buffer<ffi::F32>* s1_in,
                      ffi::Buffer<ffi::S32> unique_rows,
                      ffi::Buffer<ffi::F32> row_grads,
                      ffi::Buffer<ffi::S32> num_unique,
                      ffi::Buffer<ffi::F32> hparams,
                      ffi::Result<ffi::AnyBuffer> table_out,
                      ffi::Result<ffi::Buffer<ffi::F32>>* s0_out,
                      ffi::Result<ffi::Buffer<ffi::F32>>* s1_out,
                      const char* s0_name, const char* s1_name) {
  RowGrads rg;
  if (auto e = CheckRowGrads(table, table_out, unique_rows, row_grads,
                             num_unique, hparams, Rule::kHparams, &rg);
      e.failure())
    return e;
  const int64_t n = rg.rows * rg.dim;
  if (s0_in)
    if (auto e = CheckSlot(*s0_in, *s0_out, n, s0_name); e.failure()) return e;
  if (s1_in)
    if (auto e = CheckSlot(*s1_in, *s1_out, n, s1_name); e.failure()) return e;
  rule.Bind(rg.hparams);
  return DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename HostType<decltype(tag)>::type;
    CopyIfDistinct(table.untyped_data(), table_out->untyped_data(),
                   table.size_bytes());
    float* s0 = nullptr;
    float* s1 = nullptr;
    if (s0_in) {
      s0 = (*s0_out)->typed_data();
      CopyIfDistinct(s0_in->typed_data(), s0, s0_in->size_bytes());
    }
    if (s1_in) {
      s1 = (*s1_out)->typed_data();
      CopyIfDistinct(s1_in->typed_data(), s1, s1_in->size_bytes());
    }
    ApplyRows<T>(rg, rule, table_out->reinterpret_data<T>(), s0, s1);
    return ffi::Error::Success();
  });
}

ffi::Error SgdImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> unique_rows,
                   ffi::Buffer<ffi::F32> row_grads,
                   ffi::Buffer<ffi::S32> num_unique,
                   ffi::Buffer<ffi::F32> hparams,
                   ffi::Result<ffi::AnyBuffer> table_out) {
  return UpdateImpl(SgdRule{}, table, nullptr, nullptr, unique_rows, row_grads,
                    num_unique, hparams, table_out, nullptr, nullptr, "", "");
}

ffi::Error AdagradImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> acc,
                       ffi::Buffer<ffi::S32> unique_rows,
                       ffi::Buffer<ffi::F32> row_grads,
                       ffi::Buffer<ffi::S32> num_unique,
                       ffi::Buffer<ffi::F32> hparams,
                       ffi::Result<ffi::AnyBuffer> table_out,
                       ffi::Result<ffi::Buffer<ffi::F32>> acc_out, float eps) {
  AdagradRule rule;
  rule.eps = eps;
  return UpdateImpl(rule, table, &acc, nullptr, unique_rows, row_grads,
                    num_unique, hparams, table_out, &acc_out, nullptr,
                    "accumulator", "");
}

ffi::Error AdamImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> m,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> unique_rows,
                    ffi::Buffer<ffi::F32> row_grads,
                    ffi::Buffer<ffi::S32> num_unique,
                    ffi::Buffer<ffi::F32> hparams,
                    ffi::Result<ffi::AnyBuffer> table_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> m_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> v_out, float b1,
                    float b2, float eps, float eps_root) {
  AdamRule rule;
  rule.b1 = b1;
  rule.b2 = b2;
  rule.eps = eps;
  rule.eps_root = eps_root;
  return UpdateImpl(rule, table, &m, &v, unique_rows, row_grads, num_unique,
                    hparams, table_out, &m_out, &v_out, "m", "v");
}

ffi::Error FtrlImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> acc,
                    ffi::Buffer<ffi::F32> linear,
                    ffi::Buffer<ffi::S32> unique_rows,
                    ffi::Buffer<ffi::F32> row_grads,
                    ffi::Buffer<ffi::S32> num_unique,
                    ffi::Buffer<ffi::F32> hparams,
                    ffi::Result<ffi::AnyBuffer> table_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> acc_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> linear_out,
                    float lr_power, float l1, float l2, float l2_shrinkage,
                    float beta) {
  FtrlRule rule;
  rule.lr_power = lr_power;
  rule.l1 = l1;
  rule.l2 = l2;
  rule.l2_shrinkage = l2_shrinkage;
  rule.beta = beta;
  return UpdateImpl(rule, table, &acc, &linear, unique_rows, row_grads,
                    num_unique, hparams, table_out, &acc_out, &linear_out,
                    "accumulator", "linear");
}

// Row-wise Adagrad: the accumulator is one float per row ([R] or [R, 1]).
template <typename T>
void RowwiseRows(const RowGrads& rg, const RowwiseAdagradRule& rule, T* table,
                 float* acc) {
  for (int64_t u = 0; u < rg.count; ++u) {
    int64_t r = rg.unique_rows[u];
    if (r < 0 || r >= rg.rows) continue;
    T* w = table + r * rg.dim;
    const float* g = rg.grads + u * rg.dim;
    float sum_sq = 0.f;
    for (int64_t d = 0; d < rg.dim; ++d) sum_sq += g[d] * g[d];
    acc[r] = rule.Accumulate(acc[r], sum_sq, rg.dim);
    float scale = AdagradScale(acc[r], rule.eps);
    for (int64_t d = 0; d < rg.dim; ++d)
      w[d] = FromFloat<T>(rule.Step(ToFloat(w[d]), g[d], scale));
  }
}

ffi::Error RowwiseAdagradImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> acc,
                              ffi::Buffer<ffi::S32> unique_rows,
                              ffi::Buffer<ffi::F32> row_grads,
                              ffi::Buffer<ffi::S32> num_unique,
                              ffi::Buffer<ffi::F32> hparams,
                              ffi::Result<ffi::AnyBuffer> table_out,
                              ffi::Result<ffi::Buffer<ffi::F32>> acc_out,
                              float eps) {
  RowGrads rg;
  if (auto e = CheckRowGrads(table, table_out, unique_rows, row_grads,
                             num_unique, hparams, RowwiseAdagradRule::kHparams,
                             &rg);
      e.failure())
    return e;
  if (auto e = CheckSlot(acc, acc_out, rg.rows, "accumulator"); e.failure())
    return e;
  RowwiseAdagradRule rule;
  rule.eps = eps;
  rule.Bind(rg.hparams);
  return DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename HostType<decltype(tag)>::type;
    CopyIfDistinct(table.untyped_data(), table_out->untyped_data(),
                   table.size_bytes());
    CopyIfDistinct(acc.typed_data(), acc_out->typed_data(), acc.size_bytes());
    RowwiseRows<T>(rg, rule, table_out->reinterpret_data<T>(),
                   acc_out->typed_data());
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokSgdUpdateCpu, SgdImpl,
                              sig::SgdUpdate(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokAdagradUpdateCpu, AdagradImpl,
                              sig::AdagradUpdate(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokRowwiseAdagradUpdateCpu, RowwiseAdagradImpl,
                              sig::AdagradUpdate(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokAdamUpdateCpu, AdamImpl,
                              sig::AdamUpdate(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokFtrlUpdateCpu, FtrlImpl,
                              sig::FtrlUpdate(ffi::Ffi::Bind()));

void AppendOptimTargetsCpu(TargetList& out) {
  out.push_back({"sok_sgd_update", reinterpret_cast<void*>(SokSgdUpdateCpu)});
  out.push_back(
      {"sok_adagrad_update", reinterpret_cast<void*>(SokAdagradUpdateCpu)});
  out.push_back({"sok_rowwise_adagrad_update",
                 reinterpret_cast<void*>(SokRowwiseAdagradUpdateCpu)});
  out.push_back({"sok_adam_update", reinterpret_cast<void*>(SokAdamUpdateCpu)});
  out.push_back({"sok_ftrl_update", reinterpret_cast<void*>(SokFtrlUpdateCpu)});
}

}  // namespace sok
