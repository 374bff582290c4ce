// CPU handlers of the embedding lookup+combine family. Same targets, same
// arguments and the same arithmetic order as embed_cuda.cu.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common.h"
#include "cpu_types.h"
#include "embed_checks.h"
#include "embed_math.h"
#include "optim_cpu.h"
#include "signatures.h"

namespace sok {
namespace {

// The [lo, hi) range of bag b, clamped to the ids buffer.
inline void BagRange(const int32_t* off, int64_t b, int64_t n, int64_t* lo,
                     int64_t* hi) {
  *lo = std::min<int64_t>(std::max<int32_t>(off[b], 0), n);
  *hi = std::min<int64_t>(std::max<int64_t>(off[b + 1], *lo), n);
}

// Sum of valid weights and of their squares over one bag.
template <typename K>
void BagWeights(const K* ids, const float* w, int64_t lo, int64_t hi,
                int64_t rows, float* wsum, float* w2sum) {
  float s = 0.f, s2 = 0.f;
  for (int64_t j = lo; j < hi; ++j) {
    if (RowOf(ids[j], rows) < 0) continue;
    float wj = w ? w[j] : 1.f;
    s += wj;
    s2 += wj * wj;
  }
  *wsum = s;
  *w2sum = s2;
}

// fixed_nnz > 0: bag b is [b * fixed_nnz, (b + 1) * fixed_nnz) (checked to
// tile the ids), offsets unread, as on the GPU.
template <typename T, typename K>
void Forward(const T* table, int64_t rows, int64_t dim, const K* ids,
             const int32_t* off, const float* w, int64_t n, int64_t m,
             int32_t combiner, int64_t fixed_nnz, T* out) {
  std::vector<float> acc(dim);
  for (int64_t b = 0; b < m; ++b) {
    int64_t lo = b * fixed_nnz, hi = lo + fixed_nnz;
    if (fixed_nnz == 0) BagRange(off, b, n, &lo, &hi);
    std::fill(acc.begin(), acc.end(), 0.f);
    float wsum = 0.f, w2sum = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      int64_t r = RowOf(ids[j], rows);
      if (r < 0) continue;
      float wj = w ? w[j] : 1.f;
      wsum += wj;
      w2sum += wj * wj;
      const T* row = table + r * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += wj * ToFloat(row[d]);
    }
    float scale = CombinerScale(combiner, wsum, w2sum);
    for (int64_t d = 0; d < dim; ++d)
      out[b * dim + d] = FromFloat<T>(acc[d] * scale);
  }
}

ffi::Error FwdImpl(ffi::AnyBuffer table, ffi::AnyBuffer ids,
                   ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                   ffi::Result<ffi::AnyBuffer> out, int32_t combiner,
                   int64_t fixed_nnz) {
  EmbedShape sh;
  if (auto e = CheckFwd(table, ids, offsets, weights, *out, combiner,
                        fixed_nnz, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  const float* w = OptionalWeights(weights);
  return DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename HostType<decltype(tag)>::type;
    return DispatchKey(ids.element_type(), "ids", [&](auto key) {
      using K = decltype(key);
      Forward<T, K>(table.reinterpret_data<T>(), rows, dim,
                    ids.reinterpret_data<K>(), offsets.typed_data<int32_t>(), w,
                    n, m, combiner, fixed_nnz, out->reinterpret_data<T>());
      return ffi::Error::Success();
    });
  });
}

// Per unique row, the sum over the positions that looked it up of
// scale_j * grad_out[bag(j)], in position order.
template <typename G, typename K>
void Backward(const G* grad, int64_t dim, const K* ids, const int32_t* off,
              const float* w, int64_t n, int64_t m, int64_t rows,
              int32_t combiner, int32_t* unique_rows, float* row_grads,
              int32_t* num_unique) {
  struct Hit {
    int64_t row;
    int64_t bag;
    float scale;
  };
  std::vector<Hit> hits;
  hits.reserve(n);
  for (int64_t b = 0; b < m; ++b) {
    int64_t lo, hi;
    BagRange(off, b, n, &lo, &hi);
    float wsum, w2sum;
    BagWeights(ids, w, lo, hi, rows, &wsum, &w2sum);
    float f = CombinerScale(combiner, wsum, w2sum);
    for (int64_t j = lo; j < hi; ++j) {
      int64_t r = RowOf(ids[j], rows);
      if (r < 0) continue;
      hits.push_back({r, b, (w ? w[j] : 1.f) * f});
    }
  }
  // Hits were produced in position order; a stable sort keeps it per row.
  std::stable_sort(hits.begin(), hits.end(),
                   [](const Hit& a, const Hit& b) { return a.row < b.row; });
  int64_t u = -1;
  for (size_t i = 0; i < hits.size(); ++i) {
    if (i == 0 || hits[i].row != hits[i - 1].row) {
      ++u;
      unique_rows[u] = static_cast<int32_t>(hits[i].row);
      std::fill(row_grads + u * dim, row_grads + (u + 1) * dim, 0.f);
    }
    const G* g = grad + hits[i].bag * dim;
    float* acc = row_grads + u * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] += hits[i].scale * ToFloat(g[d]);
  }
  int64_t count = u + 1;
  for (int64_t i = count; i < n; ++i) unique_rows[i] = -1;
  std::fill(row_grads + count * dim, row_grads + n * dim, 0.f);
  *num_unique = static_cast<int32_t>(count);
}

ffi::Error BwdImpl(ffi::AnyBuffer grad, ffi::AnyBuffer ids,
                   ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                   ffi::Result<ffi::Buffer<ffi::S32>> unique_rows,
                   ffi::Result<ffi::Buffer<ffi::F32>> row_grads,
                   ffi::Result<ffi::Buffer<ffi::S32>> num_unique,
                   ffi::Result<ffi::AnyBuffer> /*workspace: CUDA only*/,
                   int32_t combiner, int64_t num_rows) {
  EmbedShape sh;
  if (auto e = CheckBwd(grad, ids, offsets, weights, *unique_rows, *row_grads,
                        combiner, &sh);
      e.failure())
    return e;
  if (num_rows < 0 || num_rows > INT32_MAX)
    return InvalidArgument("num_rows must lie in [0, 2^31)");
  const int64_t dim = sh.dim, n = sh.n, m = sh.m;
  const float* w = OptionalWeights(weights);
  return DispatchFloat(grad.element_type(), "grad_out", [&](auto tag) {
    using G = typename HostType<decltype(tag)>::type;
    return DispatchKey(ids.element_type(), "ids", [&](auto key) {
      using K = decltype(key);
      Backward<G, K>(grad.reinterpret_data<G>(), dim, ids.reinterpret_data<K>(),
                     offsets.typed_data<int32_t>(), w, n, m, num_rows,
                     combiner, unique_rows->typed_data(),
                     row_grads->typed_data(), num_unique->typed_data());
      return ffi::Error::Success();
    });
  });
}

template <typename T, typename K>
void WeightGradKernel(const T* table, int64_t rows, int64_t dim, const T* grad,
                      const K* ids, const int32_t* off, const float* w,
                      int64_t n, int64_t m, int32_t combiner, float* gw) {
  std::fill(gw, gw + n, 0.f);
  for (int64_t b = 0; b < m; ++b) {
    int64_t lo, hi;
    BagRange(off, b, n, &lo, &hi);
    float wsum, w2sum;
    BagWeights(ids, w, lo, hi, rows, &wsum, &w2sum);
    const T* g = grad + b * dim;
    float s = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      int64_t r = RowOf(ids[j], rows);
      if (r < 0) continue;
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d)
        dot += ToFloat(g[d]) * ToFloat(table[r * dim + d]);
      gw[j] = dot;
      s += w[j] * dot;
    }
    for (int64_t j = lo; j < hi; ++j) {
      if (RowOf(ids[j], rows) < 0) continue;
      gw[j] = WeightGrad(combiner, gw[j], w[j], s, wsum, w2sum);
    }
  }
}

ffi::Error WgradImpl(ffi::AnyBuffer table, ffi::AnyBuffer grad,
                     ffi::AnyBuffer ids, ffi::AnyBuffer offsets,
                     ffi::AnyBuffer weights,
                     ffi::Result<ffi::Buffer<ffi::F32>> gw, int32_t combiner) {
  EmbedShape sh;
  if (auto e = CheckWgrad(table, grad, ids, offsets, weights, combiner, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  return DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename HostType<decltype(tag)>::type;
    return DispatchKey(ids.element_type(), "ids", [&](auto key) {
      using K = decltype(key);
      WeightGradKernel<T, K>(table.reinterpret_data<T>(), rows, dim,
                             grad.reinterpret_data<T>(), ids.reinterpret_data<K>(),
                             offsets.typed_data<int32_t>(),
                             weights.typed_data<float>(), n, m, combiner,
                             gw->typed_data());
      return ffi::Error::Success();
    });
  });
}

// Zero `out` [rows, D], then write the first `count` unique rows' gradients.
template <typename T>
void WriteDense(const int32_t* ur, const float* g, int64_t count, int64_t rows,
                int64_t dim, T* out) {
  std::fill(out, out + rows * dim, FromFloat<T>(0.f));
  for (int64_t u = 0; u < count; ++u) {
    int64_t r = ur[u];
    if (r < 0 || r >= rows) continue;
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = FromFloat<T>(g[u * dim + d]);
  }
}

ffi::Error DenseImpl(ffi::Buffer<ffi::S32> unique_rows,
                     ffi::Buffer<ffi::F32> row_grads,
                     ffi::Buffer<ffi::S32> num_unique,
                     ffi::Result<ffi::AnyBuffer> dense) {
  EmbedShape sh;
  if (auto e = CheckRowsToDense(unique_rows, row_grads, *dense, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, u_cap = sh.n;
  return DispatchFloat(dense->element_type(), "dense", [&](auto tag) {
    using T = typename HostType<decltype(tag)>::type;
    int64_t count = std::min<int64_t>(num_unique.typed_data()[0], u_cap);
    WriteDense<T>(unique_rows.typed_data(), row_grads.typed_data(), count, rows,
                  dim, dense->reinterpret_data<T>());
    return ffi::Error::Success();
  });
}

// The backward straight to the dense table cotangent (the CUDA handler
// fuses the two steps; here the sparse form is built and written out).
ffi::Error BwdDenseImpl(ffi::AnyBuffer grad, ffi::AnyBuffer ids,
                        ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                        ffi::Result<ffi::AnyBuffer> dense,
                        ffi::Result<ffi::AnyBuffer> /*workspace: CUDA only*/,
                        int32_t combiner) {
  EmbedShape sh;
  if (auto e = CheckBwdDense(grad, ids, offsets, weights, *dense, combiner, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  const float* w = OptionalWeights(weights);
  std::vector<int32_t> ur(n);
  std::vector<float> g(static_cast<size_t>(n * dim));
  int32_t count = 0;
  return DispatchFloat(grad.element_type(), "grad_out", [&](auto tag) {
    using G = typename HostType<decltype(tag)>::type;
    return DispatchKey(ids.element_type(), "ids", [&](auto key) {
      using K = decltype(key);
      Backward<G, K>(grad.reinterpret_data<G>(), dim, ids.reinterpret_data<K>(),
                     offsets.typed_data<int32_t>(), w, n, m, rows, combiner,
                     ur.data(), g.data(), &count);
      WriteDense<G>(ur.data(), g.data(), count, rows, dim,
                    dense->reinterpret_data<G>());
      return ffi::Error::Success();
    });
  });
}

// The backward fused with an optimizer (optim_math.h VisitRule, row-wise
// Adagrad included): the same function as the CUDA handler; here the sparse
// form is built (Backward) and the rule applied to its rows (ApplyRows).
ffi::Error BwdUpdateImpl(ffi::AnyBuffer table, ffi::AnyBuffer s0,
                         ffi::AnyBuffer s1, ffi::AnyBuffer grad,
                         ffi::AnyBuffer ids, ffi::AnyBuffer offsets,
                         ffi::AnyBuffer weights, ffi::Buffer<ffi::F32> hparams,
                         ffi::Result<ffi::AnyBuffer> table_out,
                         ffi::Result<ffi::AnyBuffer> s0_out,
                         ffi::Result<ffi::AnyBuffer> s1_out,
                         ffi::Result<ffi::AnyBuffer> /*workspace: CUDA only*/,
                         int32_t combiner, int32_t rule_id,
                         ffi::Span<const float> consts,
                         int32_t stochastic_rounding) {
  EmbedShape sh;
  if (auto e = CheckBwdUpdate(table, grad, ids, offsets, weights, table_out,
                              combiner, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  const float* w = OptionalWeights(weights);
  return WithUpdateRule<HostType>(rule_id, consts, stochastic_rounding,
                                  hparams, table, table_out, s0, s1, s0_out,
                                  s1_out, rows, dim, HostCopy{},
                                  [&](auto rule, auto rounding, auto slot) {
    rule.Bind(hparams.typed_data());
    rounding.Bind(hparams.typed_data() + decltype(rule)::kHparams);
    std::vector<int32_t> ur(n);
    std::vector<float> g(static_cast<size_t>(n * dim));
    int32_t count = 0;
    return DispatchFloat(table.element_type(), "table", [&](auto tag) {
      using T = typename HostType<decltype(tag)>::type;
      return DispatchKey(ids.element_type(), "ids", [&](auto key) {
        using K = decltype(key);
        if (sh.grad_f32)  // e.g. the exchanged float32 sums of a 16-bit table
          Backward<float, K>(grad.typed_data<float>(), dim,
                             ids.reinterpret_data<K>(),
                             offsets.typed_data<int32_t>(), w, n, m, rows,
                             combiner, ur.data(), g.data(), &count);
        else
          Backward<T, K>(grad.reinterpret_data<T>(), dim,
                         ids.reinterpret_data<K>(), offsets.typed_data<int32_t>(),
                         w, n, m, rows, combiner, ur.data(), g.data(), &count);
        RowGrads rg;
        rg.rows = rows;
        rg.dim = dim;
        rg.capacity = n;
        rg.unique_rows = ur.data();
        rg.grads = g.data();
        rg.num_unique = &count;
        ApplyRows<T>(rg, rule, rounding, table_out->reinterpret_data<T>(),
                     slot[0], slot[1]);
        return ffi::Error::Success();
      });
    });
  });
}

}  // namespace

SOK_EMBED_TARGETS(SOK_CPU_HANDLER)

void AppendEmbedTargetsCpu(TargetList& out) {
  out.insert(out.end(), {SOK_EMBED_TARGETS(SOK_CPU_TARGET)});
}

}  // namespace sok
