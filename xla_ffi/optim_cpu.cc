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
#include "rounding_math.h"
#include "signatures.h"

namespace sok {
namespace {

// One handler body for every rule: slots [R, D] (kSlots of them), or one
// [R] or [R, 1] accumulator for a kPerRow rule; the table written with the
// rounding `stochastic` picks (its hparams after the rule's).
template <typename Rule>
ffi::Error UpdateImpl(Rule rule, int32_t stochastic, const UpdateArgs& a,
                      std::initializer_list<SlotArg> slots) {
  return VisitRounding(stochastic, [&](auto rounding) {
    using Rounding = decltype(rounding);
    return WithRowUpdate<HostType>(
        a, Rule::kHparams + Rounding::kHparams, slots,
        Rule::kPerRow ? SlotShape::kPerRow : SlotShape::kPerElement,
        HostCopy{}, [&](auto* table, const RowGrads& rg, auto slot) {
          rule.Bind(rg.hparams);
          rounding.Bind(rg.hparams + Rule::kHparams);
          ApplyRows(rg, rule, rounding, table, slot[0], slot[1]);
          return ffi::Error::Success();
        });
  });
}

ffi::Error SgdImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> unique_rows,
                   ffi::Buffer<ffi::F32> row_grads,
                   ffi::Buffer<ffi::S32> num_unique,
                   ffi::Buffer<ffi::F32> hparams,
                   ffi::Result<ffi::AnyBuffer> table_out,
                   int32_t stochastic_rounding) {
  return UpdateImpl(
      SgdRule(), stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out}, {});
}

ffi::Error AdagradImpl(ffi::AnyBuffer table, ffi::AnyBuffer acc,
                       ffi::Buffer<ffi::S32> unique_rows,
                       ffi::Buffer<ffi::F32> row_grads,
                       ffi::Buffer<ffi::S32> num_unique,
                       ffi::Buffer<ffi::F32> hparams,
                       ffi::Result<ffi::AnyBuffer> table_out,
                       ffi::Result<ffi::AnyBuffer> acc_out, float eps,
                       int32_t stochastic_rounding) {
  return UpdateImpl(
      AdagradRule(eps), stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}});
}

ffi::Error AdamImpl(ffi::AnyBuffer table, ffi::AnyBuffer m,
                    ffi::AnyBuffer v, ffi::Buffer<ffi::S32> unique_rows,
                    ffi::Buffer<ffi::F32> row_grads,
                    ffi::Buffer<ffi::S32> num_unique,
                    ffi::Buffer<ffi::F32> hparams,
                    ffi::Result<ffi::AnyBuffer> table_out,
                    ffi::Result<ffi::AnyBuffer> m_out,
                    ffi::Result<ffi::AnyBuffer> v_out, float b1,
                    float b2, float eps, float eps_root,
                    int32_t stochastic_rounding) {
  return UpdateImpl(
      AdamRule(b1, b2, eps, eps_root), stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{m, m_out, "m"}, {v, v_out, "v"}});
}

ffi::Error FtrlImpl(ffi::AnyBuffer table, ffi::AnyBuffer acc,
                    ffi::AnyBuffer linear,
                    ffi::Buffer<ffi::S32> unique_rows,
                    ffi::Buffer<ffi::F32> row_grads,
                    ffi::Buffer<ffi::S32> num_unique,
                    ffi::Buffer<ffi::F32> hparams,
                    ffi::Result<ffi::AnyBuffer> table_out,
                    ffi::Result<ffi::AnyBuffer> acc_out,
                    ffi::Result<ffi::AnyBuffer> linear_out,
                    float lr_power, float l1, float l2, float l2_shrinkage,
                    float beta, int32_t stochastic_rounding) {
  return UpdateImpl(
      FtrlRule(lr_power, l1, l2, l2_shrinkage, beta), stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}, {linear, linear_out, "linear"}});
}

ffi::Error RowwiseAdagradImpl(ffi::AnyBuffer table, ffi::AnyBuffer acc,
                              ffi::Buffer<ffi::S32> unique_rows,
                              ffi::Buffer<ffi::F32> row_grads,
                              ffi::Buffer<ffi::S32> num_unique,
                              ffi::Buffer<ffi::F32> hparams,
                              ffi::Result<ffi::AnyBuffer> table_out,
                              ffi::Result<ffi::AnyBuffer> acc_out,
                              float eps, int32_t stochastic_rounding) {
  return UpdateImpl(
      RowwiseAdagradRule(eps), stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}});
}

}  // namespace

SOK_OPTIM_TARGETS(SOK_CPU_HANDLER)

void AppendOptimTargetsCpu(TargetList& out) {
  out.insert(out.end(), {SOK_OPTIM_TARGETS(SOK_CPU_TARGET)});
}

}  // namespace sok
