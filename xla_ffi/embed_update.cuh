// The backward fused with the optimizer (sok_embed_bwd_update) for a table
// of device type T: sort + run-length as the plain backward (SortRuns), then
// each run's sum goes straight into the rule on its table row (UpdateSink;
// RowwiseUpdateSink for row-wise Adagrad, which needs the whole row's sum
// first). Outputs alias the table and slots; copied first should they not.
// Included only by embed_update_<dtype>.cu, each instantiating one T: the
// rules x roundings x slot dtypes x gradient dtypes of one table dtype are a
// build's largest compile, split three ways.
#pragma once

#include <type_traits>

#include "embed_backward.cuh"
#include "embed_checks.h"
#include "optim_kernels.cuh"

namespace sok {
namespace embed_cuda {

template <typename T>
ffi::Error BwdUpdateFor(BwdUpdateCall& c) {
  const int64_t rows = c.shape.rows, dim = c.shape.dim, n = c.shape.n, m = c.shape.m;
  const float* w = OptionalWeights(c.weights);
  return WithUpdateRule<DevType>(
      c.rule_id, c.consts, c.stochastic_rounding, c.hparams, c.table,
      c.table_out, c.s0, c.s1, c.s0_out, c.s1_out, rows, dim,
      StreamCopy{c.stream},
      [&](auto rule, auto rounding, auto slot) -> ffi::Error {
        using Rule = decltype(rule);
        using Rounding = decltype(rounding);
        using S = std::remove_pointer_t<std::decay_t<decltype(slot[0])>>;
        if (n == 0 || dim == 0) return ffi::Error::Success();
        Runs r;
        if (auto e = SortRuns(c.stream, c.ids, c.offsets, w, n, m, dim, rows,
                              c.combiner, *c.workspace, &r);
            e.failure())
          return e;
        auto reduce = [&](const auto& sink) {
          if (c.shape.grad_f32)  // e.g. the exchanged float32 sums of a 16-bit table
            ReduceAll(c.stream, c.grad.typed_data<float>(), dim, n, rows, r, sink);
          else
            ReduceAll(c.stream, c.grad.reinterpret_data<T>(), dim, n, rows, r, sink);
        };
        T* tp = c.table_out->reinterpret_data<T>();
        const float* hp = c.hparams.typed_data();
        if constexpr (Rule::kPerRow)
          reduce(optim::RowwiseUpdateSink<T, S, Rounding>{rule, rounding, hp, tp,
                                                       slot[0]});
        else
          reduce(optim::UpdateSink<T, S, Rule, Rounding>{rule, rounding, hp, tp,
                                                      slot[0], slot[1]});
        return ffi::Error::Success();
      });
}

}  // namespace embed_cuda
}  // namespace sok
