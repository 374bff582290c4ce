// CUDA handlers of the fused sparse optimizer family. Same targets, arguments,
// checks (optim_checks.h) and per-element rules (optim_math.h) as
// optim_cpu.cc; the kernels live in optim_kernels.cuh. Handlers validate
// shapes, launch on the XLA stream and never read num_unique or hparams on
// the host.
//
// The outputs alias the inputs (input_output_aliases in the Python wrapper),
// so untouched rows keep their values without a copy. Should a caller not
// alias them, the handler first copies each input into its output on the
// stream.
#include <initializer_list>

#include "common.h"
#include "cuda_common.cuh"
#include "optim_checks.h"
#include "optim_kernels.cuh"
#include "signatures.h"

namespace sok {
namespace {

// One handler body for every rule: slots [R, D] (kSlots of them), or one
// [R] or [R, 1] accumulator for a kPerRow rule; the table written with the
// rounding `stochastic` picks (its hparams after the rule's, read on the
// device).
template <typename Rule>
ffi::Error UpdateImpl(cudaStream_t stream, const char* name, const Rule& rule,
                      int32_t stochastic, const UpdateArgs& a,
                      std::initializer_list<SlotArg> slots) {
  auto err = VisitRounding(stochastic, [&](auto rounding) {
    using Rounding = decltype(rounding);
    return WithRowUpdate<DevType>(
        a, Rule::kHparams + Rounding::kHparams, slots,
        Rule::kPerRow ? SlotShape::kPerRow : SlotShape::kPerElement,
        StreamCopy{stream},
        [&](auto* table, const RowGrads& rg, auto slot) {
          if constexpr (Rule::kPerRow)
            optim::LaunchRowwiseAdagrad(stream, rule, rounding, table, slot[0],
                                        rg.rows, rg.dim, rg.unique_rows,
                                        rg.grads, rg.num_unique, rg.capacity,
                                        rg.hparams);
          else
            optim::LaunchElementwise(stream, rule, rounding, table, slot[0],
                                     slot[1], rg.rows, rg.dim, rg.unique_rows,
                                     rg.grads, rg.num_unique, rg.capacity,
                                     rg.hparams);
          return ffi::Error::Success();
        });
  });
  if (err.failure()) return err;
  return LastError(name);
}

ffi::Error SgdImpl(cudaStream_t stream, ffi::AnyBuffer table,
                   ffi::Buffer<ffi::S32> unique_rows,
                   ffi::Buffer<ffi::F32> row_grads,
                   ffi::Buffer<ffi::S32> num_unique,
                   ffi::Buffer<ffi::F32> hparams,
                   ffi::Result<ffi::AnyBuffer> table_out,
                   int32_t stochastic_rounding) {
  return UpdateImpl(
      stream, "sok_sgd_update", SgdRule(), stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out}, {});
}

ffi::Error AdagradImpl(cudaStream_t stream, ffi::AnyBuffer table,
                       ffi::AnyBuffer acc,
                       ffi::Buffer<ffi::S32> unique_rows,
                       ffi::Buffer<ffi::F32> row_grads,
                       ffi::Buffer<ffi::S32> num_unique,
                       ffi::Buffer<ffi::F32> hparams,
                       ffi::Result<ffi::AnyBuffer> table_out,
                       ffi::Result<ffi::AnyBuffer> acc_out, float eps,
                       int32_t stochastic_rounding) {
  return UpdateImpl(
      stream, "sok_adagrad_update", AdagradRule(eps), stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}});
}

ffi::Error AdamImpl(cudaStream_t stream, ffi::AnyBuffer table,
                    ffi::AnyBuffer m, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::S32> unique_rows,
                    ffi::Buffer<ffi::F32> row_grads,
                    ffi::Buffer<ffi::S32> num_unique,
                    ffi::Buffer<ffi::F32> hparams,
                    ffi::Result<ffi::AnyBuffer> table_out,
                    ffi::Result<ffi::AnyBuffer> m_out,
                    ffi::Result<ffi::AnyBuffer> v_out, float b1,
                    float b2, float eps, float eps_root,
                    int32_t stochastic_rounding) {
  return UpdateImpl(
      stream, "sok_adam_update", AdamRule(b1, b2, eps, eps_root),
      stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{m, m_out, "m"}, {v, v_out, "v"}});
}

ffi::Error FtrlImpl(cudaStream_t stream, ffi::AnyBuffer table,
                    ffi::AnyBuffer acc, ffi::AnyBuffer linear,
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
      stream, "sok_ftrl_update", FtrlRule(lr_power, l1, l2, l2_shrinkage, beta),
      stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}, {linear, linear_out, "linear"}});
}

ffi::Error RowwiseAdagradImpl(cudaStream_t stream, ffi::AnyBuffer table,
                              ffi::AnyBuffer acc,
                              ffi::Buffer<ffi::S32> unique_rows,
                              ffi::Buffer<ffi::F32> row_grads,
                              ffi::Buffer<ffi::S32> num_unique,
                              ffi::Buffer<ffi::F32> hparams,
                              ffi::Result<ffi::AnyBuffer> table_out,
                              ffi::Result<ffi::AnyBuffer> acc_out,
                              float eps, int32_t stochastic_rounding) {
  return UpdateImpl(
      stream, "sok_rowwise_adagrad_update", RowwiseAdagradRule(eps),
      stochastic_rounding,
      {table, unique_rows, row_grads, num_unique, hparams, table_out},
      {{acc, acc_out, "accumulator"}});
}

}  // namespace

SOK_OPTIM_TARGETS(SOK_CUDA_HANDLER)

void AppendOptimTargetsCuda(TargetList& out) {
  out.insert(out.end(), {SOK_OPTIM_TARGETS(SOK_CUDA_TARGET)});
}

}  // namespace sok
