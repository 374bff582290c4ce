// CUDA handlers of the fused sparse optimizer family. Same targets, arguments
// and per-element rules (optim_math.h) as optim_cpu.cc; the kernels live in
// optim_kernels.cuh. Handlers validate shapes, launch on the XLA stream and
// never read num_unique or hparams on the host.
//
// The outputs alias the inputs (input_output_aliases in the Python wrapper),
// so untouched rows keep their values without a copy. Should a caller not
// alias them, the handler first copies each input into its output on the
// stream.
#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "optim_kernels.cuh"
#include "signatures.h"

namespace sok {
namespace {

// Shapes of one step's unique-row gradient, checked against the table.
struct RowGrads {
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t capacity = 0;  // len(unique_rows); valid entries are on the device
  const int32_t* unique_rows = nullptr;
  const float* grads = nullptr;
  const int32_t* num_unique = nullptr;
  const float* hparams = nullptr;
};

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
  rg->capacity = unique_rows.element_count();
  auto gd = row_grads.dimensions();
  if (gd.size() != 2 || gd[0] != rg->capacity || gd[1] != rg->dim)
    return InvalidArgument("row_grads must be [len(unique_rows), D]");
  if (num_unique.element_count() < 1)
    return InvalidArgument("num_unique must hold one int32");
  if (hparams.element_count() < num_hparams)
    return InvalidArgument("hparams must hold " + std::to_string(num_hparams) +
                           " float32 values");
  rg->unique_rows = unique_rows.typed_data();
  rg->grads = row_grads.typed_data();
  rg->num_unique = num_unique.typed_data();
  rg->hparams = hparams.typed_data();
  return ffi::Error::Success();
}

ffi::Error CheckSlot(const ffi::Buffer<ffi::F32>& slot,
                     ffi::Result<ffi::Buffer<ffi::F32>>& out, int64_t count,
                     const char* what) {
  if (static_cast<int64_t>(slot.element_count()) != count ||
      out->element_count() != slot.element_count())
    return InvalidArgument(std::string(what) + " must have " +
                           std::to_string(count) + " elements");
  return ffi::Error::Success();
}

// One handler body for the rules with 0, 1 or 2 [R, D] slots.
template <typename Rule>
ffi::Error UpdateImpl(cudaStream_t stream, Rule rule, const char* name,
                      ffi::AnyBuffer table, const ffi::Buffer<ffi::F32>* s0_in,
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
  auto dispatched = DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    CopyIfDistinct(stream, table.untyped_data(), table_out->untyped_data(),
                   table.size_bytes());
    float* s0 = nullptr;
    float* s1 = nullptr;
    if (s0_in) {
      s0 = (*s0_out)->typed_data();
      CopyIfDistinct(stream, s0_in->typed_data(), s0, s0_in->size_bytes());
    }
    if (s1_in) {
      s1 = (*s1_out)->typed_data();
      CopyIfDistinct(stream, s1_in->typed_data(), s1, s1_in->size_bytes());
    }
    optim::LaunchElementwise<T>(stream, rule, table_out->reinterpret_data<T>(),
                                s0, s1, rg.rows, rg.dim, rg.unique_rows,
                                rg.grads, rg.num_unique, rg.capacity,
                                rg.hparams);
    return ffi::Error::Success();
  });
  if (dispatched.failure()) return dispatched;
  return LastError(name);
}

ffi::Error SgdImpl(cudaStream_t stream, ffi::AnyBuffer table,
                   ffi::Buffer<ffi::S32> unique_rows,
                   ffi::Buffer<ffi::F32> row_grads,
                   ffi::Buffer<ffi::S32> num_unique,
                   ffi::Buffer<ffi::F32> hparams,
                   ffi::Result<ffi::AnyBuffer> table_out) {
  return UpdateImpl(stream, SgdRule{}, "sok_sgd_update", table, nullptr,
                    nullptr, unique_rows, row_grads, num_unique, hparams,
                    table_out, nullptr, nullptr, "", "");
}

ffi::Error AdagradImpl(cudaStream_t stream, ffi::AnyBuffer table,
                       ffi::Buffer<ffi::F32> acc,
                       ffi::Buffer<ffi::S32> unique_rows,
                       ffi::Buffer<ffi::F32> row_grads,
                       ffi::Buffer<ffi::S32> num_unique,
                       ffi::Buffer<ffi::F32> hparams,
                       ffi::Result<ffi::AnyBuffer> table_out,
                       ffi::Result<ffi::Buffer<ffi::F32>> acc_out, float eps) {
  AdagradRule rule;
  rule.eps = eps;
  return UpdateImpl(stream, rule, "sok_adagrad_update", table, &acc, nullptr,
                    unique_rows, row_grads, num_unique, hparams, table_out,
                    &acc_out, nullptr, "accumulator", "");
}

ffi::Error AdamImpl(cudaStream_t stream, ffi::AnyBuffer table,
                    ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> unique_rows,
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
  return UpdateImpl(stream, rule, "sok_adam_update", table, &m, &v,
                    unique_rows, row_grads, num_unique, hparams, table_out,
                    &m_out, &v_out, "m", "v");
}

ffi::Error FtrlImpl(cudaStream_t stream, ffi::AnyBuffer table,
                    ffi::Buffer<ffi::F32> acc, ffi::Buffer<ffi::F32> linear,
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
  return UpdateImpl(stream, rule, "sok_ftrl_update", table, &acc, &linear,
                    unique_rows, row_grads, num_unique, hparams, table_out,
                    &acc_out, &linear_out, "accumulator", "linear");
}

ffi::Error RowwiseAdagradImpl(cudaStream_t stream, ffi::AnyBuffer table,
                              ffi::Buffer<ffi::F32> acc,
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
  auto dispatched = DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    CopyIfDistinct(stream, table.untyped_data(), table_out->untyped_data(),
                   table.size_bytes());
    CopyIfDistinct(stream, acc.typed_data(), acc_out->typed_data(),
                   acc.size_bytes());
    optim::LaunchRowwiseAdagrad<T>(
        stream, rule, table_out->reinterpret_data<T>(), acc_out->typed_data(),
        rg.rows, rg.dim, rg.unique_rows, rg.grads, rg.num_unique, rg.capacity,
        rg.hparams);
    return ffi::Error::Success();
  });
  if (dispatched.failure()) return dispatched;
  return LastError("sok_rowwise_adagrad_update");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokSgdUpdateCuda, SgdImpl,
                              sig::SgdUpdate(CudaBind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokAdagradUpdateCuda, AdagradImpl,
                              sig::AdagradUpdate(CudaBind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokRowwiseAdagradUpdateCuda, RowwiseAdagradImpl,
                              sig::AdagradUpdate(CudaBind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokAdamUpdateCuda, AdamImpl,
                              sig::AdamUpdate(CudaBind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokFtrlUpdateCuda, FtrlImpl,
                              sig::FtrlUpdate(CudaBind()));

void AppendOptimTargetsCuda(TargetList& out) {
  out.push_back({"sok_sgd_update", reinterpret_cast<void*>(SokSgdUpdateCuda)});
  out.push_back(
      {"sok_adagrad_update", reinterpret_cast<void*>(SokAdagradUpdateCuda)});
  out.push_back({"sok_rowwise_adagrad_update",
                 reinterpret_cast<void*>(SokRowwiseAdagradUpdateCuda)});
  out.push_back(
      {"sok_adam_update", reinterpret_cast<void*>(SokAdamUpdateCuda)});
  out.push_back(
      {"sok_ftrl_update", reinterpret_cast<void*>(SokFtrlUpdateCuda)});
}

}  // namespace sok
