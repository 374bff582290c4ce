// CPU handlers of the fused sparse optimizer family: each applies one
// optimizer step to the rows listed in unique_rows[:num_unique] of a table and
// its slots, in place. Same targets, arguments, checks (optim_checks.h) and
// per-element rules (optim_math.h) as optim_cuda.cu.
//
// The outputs alias the inputs (input_output_aliases in the Python wrapper),
// so untouched rows keep their values without a copy. Should a caller not
// alias them, the handler first copies each input into its output.
#include <cstdint>

#include "common.h"
#include "cpu_types.h"
#include "optim_checks.h"
#include "optim_cpu.h"
#include "optim_math.h"
#include "signatures.h"

namespace sok {
namespace {

// One handler body for the rules with 0, 1 or 2 [R, D] slots.
template <typename Rule>
ffi::Error UpdateImpl(Rule rule, const UpdateArgs& a,
                      std::initializer_list<SlotArg> slots) {
  return WithRowUpdate<HostType>(
      a, Rule::kHparams, slots, SlotShape::kPerElement, HostCopy{},
      [&](auto* table, const RowGrads& rg, float* const* slot) {
        rule.Bind(rg.hparams);
        ApplyRows(rg, rule, table, slot[0], slot[1]);
        return ffi::Error::Success();
      });
}

ffi::Error SgdImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> unique_rows,
                   ffi::Buffer<ffi::F32> row_grads,
                   ffi::Buffer<ffi::S32> num_unique,
                   ffi::Buffer<ffi::F32> hparams,
                   ffi::Result<ffi::AnyBuffer> table_out) {
  return UpdateImpl(
      SgdRule(), {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {});
}

ffi::Error AdagradImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> acc,
                       ffi::Buffer<ffi::S32> unique_rows,
                       ffi::Buffer<ffi::F32> row_grads,
                       ffi::Buffer<ffi::S32> num_unique,
                       ffi::Buffer<ffi::F32> hparams,
                       ffi::Result<ffi::AnyBuffer> table_out,
                       ffi::Result<ffi::Buffer<ffi::F32>> acc_out, float eps) {
  return UpdateImpl(
      AdagradRule(eps),
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}});
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
  return UpdateImpl(
      AdamRule(b1, b2, eps, eps_root),
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{m, m_out, "m"}, {v, v_out, "v"}});
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
  return UpdateImpl(
      FtrlRule(lr_power, l1, l2, l2_shrinkage, beta),
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}, {linear, linear_out, "linear"}});
}

ffi::Error RowwiseAdagradImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> acc,
                              ffi::Buffer<ffi::S32> unique_rows,
                              ffi::Buffer<ffi::F32> row_grads,
                              ffi::Buffer<ffi::S32> num_unique,
                              ffi::Buffer<ffi::F32> hparams,
                              ffi::Result<ffi::AnyBuffer> table_out,
                              ffi::Result<ffi::Buffer<ffi::F32>> acc_out,
                              float eps) {
  RowwiseAdagradRule rule(eps);
  return WithRowUpdate<HostType>(
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      RowwiseAdagradRule::kHparams, {{acc, acc_out, "accumulator"}},
      SlotShape::kPerRow, HostCopy{},
      [&](auto* table_data, const RowGrads& rg, float* const* slot) {
        rule.Bind(rg.hparams);
        ApplyRows(rg, rule, table_data, slot[0], nullptr);
        return ffi::Error::Success();
      });
}

}  // namespace

SOK_OPTIM_TARGETS(SOK_CPU_HANDLER)

void AppendOptimTargetsCpu(TargetList& out) {
  out.insert(out.end(), {SOK_OPTIM_TARGETS(SOK_CPU_TARGET)});
}

}  // namespace sok
