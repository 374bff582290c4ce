// The FFI signature of every sok_jax target, written once for both platforms.
// Each function appends a target's arguments, results and attributes to a
// binding (FFI bindings are built from rvalues, hence the moves): the CPU
// handlers pass `ffi::Ffi::Bind()`, the CUDA handlers pass `CudaBind()`
// (cuda_common.cuh: the same with the stream as context). The Python wrappers
// in sok_jax/ops/ call these targets with exactly this order.
//
// Each family also lists its targets once, SOK_<FAMILY>_TARGETS(X) calling
// X(target name, handler stem, Impl function, signature) per target: each
// platform file defines its handlers `<stem>Cpu` / `<stem>Cuda` from its own
// Impl functions and appends them to its target list with it (common.h
// SOK_CPU_HANDLER / SOK_CPU_TARGET, cuda_common.cuh SOK_CUDA_HANDLER /
// SOK_CUDA_TARGET), so both modules register the same names.
#pragma once

#include <utility>

#include "common.h"

namespace sok {
namespace sig {

// ---------------------------------------------------------------- embed
template <typename B>
auto EmbedFwd(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // table
      .template Arg<ffi::AnyBuffer>()      // ids
      .template Arg<ffi::AnyBuffer>()      // offsets
      .template Arg<ffi::AnyBuffer>()      // weights
      .template Ret<ffi::AnyBuffer>()      // out
      .template Attr<int32_t>("combiner")
      .template Attr<int64_t>("fixed_nnz");  // 0: ragged (read offsets)
}

template <typename B>
auto EmbedBwd(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()     // grad_out
      .template Arg<ffi::AnyBuffer>()         // ids
      .template Arg<ffi::AnyBuffer>()         // offsets
      .template Arg<ffi::AnyBuffer>()         // weights
      .template Ret<ffi::Buffer<ffi::S32>>()  // unique_rows
      .template Ret<ffi::Buffer<ffi::F32>>()  // row_grads
      .template Ret<ffi::Buffer<ffi::S32>>()  // num_unique
      .template Ret<ffi::AnyBuffer>()         // workspace (CUDA only uses it)
      .template Attr<int32_t>("combiner")
      .template Attr<int64_t>("num_rows");
}

// The backward straight to the dense [num_rows, D] table cotangent.
template <typename B>
auto EmbedBwdDense(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // grad_out
      .template Arg<ffi::AnyBuffer>()      // ids
      .template Arg<ffi::AnyBuffer>()      // offsets
      .template Arg<ffi::AnyBuffer>()      // weights
      .template Ret<ffi::AnyBuffer>()      // dense (the table's dtype)
      .template Ret<ffi::AnyBuffer>()      // workspace (CUDA only uses it)
      .template Attr<int32_t>("combiner");
}

// The backward fused with an optimizer (optim_math.h VisitRule): per
// distinct row of the table, the summed gradient applied to the row and its
// slots in place. Slots are [R, D], or [R] for a row-wise rule, float32,
// bfloat16 or float16 (all of one dtype); slots the rule does not use are
// [0]. stochastic_rounding: 0 writes the table and 16-bit slots with
// round-to-nearest-even, 1 stochastically (rounding_math.h), its words after
// the rule's in hparams.
template <typename B>
auto EmbedBwdUpdate(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()    // table
      .template Arg<ffi::AnyBuffer>()          // slot 0
      .template Arg<ffi::AnyBuffer>()          // slot 1
      .template Arg<ffi::AnyBuffer>()          // grad_out (the table's dtype)
      .template Arg<ffi::AnyBuffer>()          // ids
      .template Arg<ffi::AnyBuffer>()          // offsets
      .template Arg<ffi::AnyBuffer>()          // weights
      .template Arg<ffi::Buffer<ffi::F32>>()   // hparams (learning rate, step)
      .template Ret<ffi::AnyBuffer>()          // table
      .template Ret<ffi::AnyBuffer>()          // slot 0
      .template Ret<ffi::AnyBuffer>()          // slot 1
      .template Ret<ffi::AnyBuffer>()          // workspace (CUDA only uses it)
      .template Attr<int32_t>("combiner")
      .template Attr<int32_t>("rule")
      .template Attr<ffi::Span<const float>>("consts")
      .template Attr<int32_t>("stochastic_rounding");
}

template <typename B>
auto EmbedWgrad(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()     // table
      .template Arg<ffi::AnyBuffer>()         // grad_out
      .template Arg<ffi::AnyBuffer>()         // ids
      .template Arg<ffi::AnyBuffer>()         // offsets
      .template Arg<ffi::AnyBuffer>()         // weights
      .template Ret<ffi::Buffer<ffi::F32>>()  // weight_grad
      .template Attr<int32_t>("combiner");
}

template <typename B>
auto RowsToDense(B b) {
  return std::move(b).template Arg<ffi::Buffer<ffi::S32>>()  // unique_rows
      .template Arg<ffi::Buffer<ffi::F32>>()      // row_grads
      .template Arg<ffi::Buffer<ffi::S32>>()      // num_unique
      .template Ret<ffi::AnyBuffer>();            // dense
}

#define SOK_EMBED_TARGETS(X)                                              \
  X("sok_embed_fwd", SokEmbedFwd, FwdImpl, EmbedFwd)                      \
  X("sok_embed_bwd", SokEmbedBwd, BwdImpl, EmbedBwd)                      \
  X("sok_embed_bwd_dense", SokEmbedBwdDense, BwdDenseImpl, EmbedBwdDense) \
  X("sok_embed_bwd_update", SokEmbedBwdUpdate, BwdUpdateImpl,             \
    EmbedBwdUpdate)                                                       \
  X("sok_embed_wgrad", SokEmbedWgrad, WgradImpl, EmbedWgrad)              \
  X("sok_rows_to_dense", SokRowsToDense, DenseImpl, RowsToDense)

// ------------------------------------------------------------ optimizers
// The touched rows every update reads after its slots, then the per-step
// hyperparameters (float32: learning rate, and Adam's step; then, with
// stochastic rounding, its words: rounding_math.h StochasticRounding). Every
// update's last attribute, stochastic_rounding (0 or 1), picks how the
// table's new values, and a 16-bit slot's, are written (rounding_math.h).
// Slots are float32, bfloat16 or float16, all of one dtype.
template <typename B>
auto RowsAndHparams(B b) {
  return std::move(b).template Arg<ffi::Buffer<ffi::S32>>()  // unique_rows
      .template Arg<ffi::Buffer<ffi::F32>>()      // row_grads
      .template Arg<ffi::Buffer<ffi::S32>>()      // num_unique
      .template Arg<ffi::Buffer<ffi::F32>>();     // hparams
}

template <typename B>
auto SgdUpdate(B b) {
  return RowsAndHparams(std::move(b).template Arg<ffi::AnyBuffer>())  // table
      .template Ret<ffi::AnyBuffer>()                       // table
      .template Attr<int32_t>("stochastic_rounding");
}

// Adagrad ([R, D] accumulator) and row-wise Adagrad ([R] accumulator).
template <typename B>
auto AdagradUpdate(B b) {
  return RowsAndHparams(std::move(b).template Arg<ffi::AnyBuffer>()  // table
                            .template Arg<ffi::AnyBuffer>())  // accumulator
      .template Ret<ffi::AnyBuffer>()                                // table
      .template Ret<ffi::AnyBuffer>()                                // accumulator
      .template Attr<float>("eps")
      .template Attr<int32_t>("stochastic_rounding");
}

template <typename B>
auto AdamUpdate(B b) {
  return RowsAndHparams(std::move(b).template Arg<ffi::AnyBuffer>()  // table
                            .template Arg<ffi::AnyBuffer>()   // m
                            .template Arg<ffi::AnyBuffer>())  // v
      .template Ret<ffi::AnyBuffer>()                                // table
      .template Ret<ffi::AnyBuffer>()                                // m
      .template Ret<ffi::AnyBuffer>()                                // v
      .template Attr<float>("b1")
      .template Attr<float>("b2")
      .template Attr<float>("eps")
      .template Attr<float>("eps_root")
      .template Attr<int32_t>("stochastic_rounding");
}

template <typename B>
auto FtrlUpdate(B b) {
  return RowsAndHparams(std::move(b).template Arg<ffi::AnyBuffer>()  // table
                            .template Arg<ffi::AnyBuffer>()   // accumulator
                            .template Arg<ffi::AnyBuffer>())  // linear
      .template Ret<ffi::AnyBuffer>()                                // table
      .template Ret<ffi::AnyBuffer>()                                // accumulator
      .template Ret<ffi::AnyBuffer>()                                // linear
      .template Attr<float>("learning_rate_power")
      .template Attr<float>("l1_regularization_strength")
      .template Attr<float>("l2_regularization_strength")
      .template Attr<float>("l2_shrinkage_regularization_strength")
      .template Attr<float>("beta")
      .template Attr<int32_t>("stochastic_rounding");
}

// Row-wise Adagrad takes Adagrad's signature ([R] or [R, 1] accumulator).
#define SOK_OPTIM_TARGETS(X)                                               \
  X("sok_sgd_update", SokSgdUpdate, SgdImpl, SgdUpdate)                    \
  X("sok_adagrad_update", SokAdagradUpdate, AdagradImpl, AdagradUpdate)    \
  X("sok_rowwise_adagrad_update", SokRowwiseAdagradUpdate,                 \
    RowwiseAdagradImpl, AdagradUpdate)                                     \
  X("sok_adam_update", SokAdamUpdate, AdamImpl, AdamUpdate)                \
  X("sok_ftrl_update", SokFtrlUpdate, FtrlImpl, FtrlUpdate)

// ------------------------------------------------------------------ hash
// Find-or-insert with the optional per-row scores (last_seen, count: [R] or
// [0]) and admission sketch ([depth * width] or [0]), aliased to their
// outputs; hash_math.h has the insertion rule.
template <typename B>
auto HashFindOrInsert(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()     // slot_keys
      .template Arg<ffi::Buffer<ffi::S32>>()  // last_seen
      .template Arg<ffi::Buffer<ffi::S32>>()  // count
      .template Arg<ffi::Buffer<ffi::S32>>()  // sketch
      .template Arg<ffi::AnyBuffer>()         // keys
      .template Arg<ffi::Buffer<ffi::S32>>()  // step [1]
      .template Ret<ffi::AnyBuffer>()         // slot_keys_out
      .template Ret<ffi::Buffer<ffi::S32>>()  // last_seen_out
      .template Ret<ffi::Buffer<ffi::S32>>()  // count_out
      .template Ret<ffi::Buffer<ffi::S32>>()  // sketch_out
      .template Ret<ffi::Buffer<ffi::S32>>()  // rows
      .template Ret<ffi::Buffer<ffi::S32>>()  // is_new
      .template Ret<ffi::AnyBuffer>()         // evicted (key dtype)
      .template Ret<ffi::Buffer<ffi::S32>>()  // status
      .template Ret<ffi::AnyBuffer>()         // workspace (CUDA only uses it)
      .template Attr<int32_t>("insert")
      .template Attr<int32_t>("policy")
      .template Attr<int32_t>("admit_after")
      .template Attr<int32_t>("sketch_depth");
}

#define SOK_HASH_TARGETS(X)                                          \
  X("sok_hash_find_or_insert", SokHashFindOrInsert, FindOrInsertImpl, \
    HashFindOrInsert)

// ------------------------------------------------------------------ rows
// The row movers of the host storage tiers (rows_checks.h): whole rows
// between two row-major tables of one element type, either of which may be
// in pinned host memory.
template <typename B>
auto RowsGather(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()     // src [R, W] or [R]
      .template Arg<ffi::Buffer<ffi::S32>>()  // rows [K]
      .template Ret<ffi::AnyBuffer>();        // out [K, W] or [K]
}

template <typename B>
auto RowsScatter(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()     // dst [R, W] or [R]
      .template Arg<ffi::Buffer<ffi::S32>>()  // rows [K], distinct where in range
      .template Arg<ffi::AnyBuffer>()         // values [K, W] or [K]
      .template Ret<ffi::AnyBuffer>();        // dst_out (aliases dst)
}

template <typename B>
auto RowsCopy(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()     // dst [R, W] or [R]
      .template Arg<ffi::Buffer<ffi::S32>>()  // dst_rows [K], distinct where in range
      .template Arg<ffi::AnyBuffer>()         // src [S, W] or [S]
      .template Arg<ffi::Buffer<ffi::S32>>()  // src_rows [K]
      .template Arg<ffi::Buffer<ffi::S32>>()  // count [1]: pairs i < count are read
      .template Ret<ffi::AnyBuffer>();        // dst_out (aliases dst)
}

// x, unchanged, once every sok_rows_scatter_async launched before it on the
// stream has finished; the other operands are only held alive until then
// (the async scatters' rows and values).
template <typename B>
auto RowsJoin(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // x
      .RemainingArgs()                                // kept: read by pending moves
      .template Ret<ffi::AnyBuffer>();                // x_out (aliases x)
}

// sok_rows_scatter_async: sok_rows_scatter, which on a GPU may still be
// writing dst_out after the call returns: dst_out is complete, and rows and
// values may be freed, only after a later sok_rows_join (CPU: at once).
// sok_rows_copy_async: sok_rows_copy, which on a GPU may still be writing
// dst_out after the call returns (complete after a later sok_rows_join); it
// reads its own copies of the row lists and count, so those may be freed at
// once, but src must not be written before the join.
#define SOK_ROWS_TARGETS(X)                                                     \
  X("sok_rows_gather", SokRowsGather, GatherImpl, RowsGather)                  \
  X("sok_rows_scatter", SokRowsScatter, ScatterImpl, RowsScatter)              \
  X("sok_rows_scatter_async", SokRowsScatterAsync, ScatterAsyncImpl, RowsScatter) \
  X("sok_rows_join", SokRowsJoin, JoinImpl, RowsJoin)                          \
  X("sok_rows_copy", SokRowsCopy, CopyImpl, RowsCopy)                          \
  X("sok_rows_copy_async", SokRowsCopyAsync, CopyAsyncImpl, RowsCopy)

// ----------------------------------------------------------------- quant
// The lookup of a read-only int8 table (quant_math.h: q uint8 [R, D] and a
// float32 (scale, bias) per row), combined as sok_embed_fwd combines; the
// output is float32.
template <typename B>
auto QuantFwd(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()      // scale_bias
      .template Arg<ffi::AnyBuffer>()      // ids
      .template Arg<ffi::AnyBuffer>()      // offsets
      .template Arg<ffi::AnyBuffer>()      // weights
      .template Ret<ffi::AnyBuffer>()      // out (float32)
      .template Attr<int32_t>("combiner")
      .template Attr<int64_t>("fixed_nnz");  // 0: ragged (read offsets)
}

#define SOK_QUANT_TARGETS(X) X("sok_quant_fwd", SokQuantFwd, QuantFwdImpl, QuantFwd)

}  // namespace sig
}  // namespace sok
