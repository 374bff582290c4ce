// CUDA handlers of the embedding lookup+combine family. Same targets,
// arguments and checks (embed_checks.h) as embed_cpu.cc. Each handler checks
// its buffers, picks the kernel shape from D, the mean bag length and the
// buffers' alignment, and launches embed_kernels.cuh on XLA's stream, ending
// with one LastError check; nothing is read back to the host. The backward
// targets carve their sort keys, runs, cub temporaries and chunk partials out
// of the workspace output (SortRuns); the fused update's kernels are
// instantiated per table dtype apart (embed_update.cuh).
#include <cub/cub.cuh>

#include <algorithm>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda_common.cuh"
#include "embed_backward.cuh"
#include "embed_checks.h"
#include "embed_kernels.cuh"
#include "signatures.h"

namespace sok {
namespace embed_cuda {
namespace {

int EndBit(int64_t sentinel) {
  int b = 1;
  while (b < 32 && (int64_t{1} << b) <= sentinel) ++b;
  return b;
}

}  // namespace

// Sort + run-length of the positions by row (steps 1 and 2 of the backward,
// embed_kernels.cuh): every position outside the table sorts last under the
// sentinel num_rows. n > 0.
ffi::Error SortRuns(cudaStream_t stream, ffi::AnyBuffer ids,
                    ffi::AnyBuffer offsets, const float* w, int64_t n,
                    int64_t m, int64_t dim, int64_t num_rows, int32_t combiner,
                    ffi::AnyBuffer& workspace, Runs* out) {
  const uint32_t sentinel = static_cast<uint32_t>(num_rows);
  const int end_bit = EndBit(num_rows);
  const int64_t max_chunks = n / 64 + 1;

  // Temporary storage sizes of the cub passes.
  size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, (uint32_t*)nullptr,
                                  (uint32_t*)nullptr, (int32_t*)nullptr,
                                  (int32_t*)nullptr, n, 0, end_bit, stream);
  cub::DeviceRunLengthEncode::Encode(nullptr, rle_bytes, (uint32_t*)nullptr,
                                     (uint32_t*)nullptr, (int32_t*)nullptr,
                                     (int32_t*)nullptr, n, stream);
  cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, (int32_t*)nullptr,
                                (int32_t*)nullptr, n, stream);
  const size_t cub_bytes = std::max({sort_bytes, rle_bytes, scan_bytes});
  const size_t total = 256 * 16 + n * (4 * 9) + 4 + cub_bytes +
                       static_cast<size_t>(max_chunks) * dim * 4;
  // The workspace is sized by embed_ops.bwd_workspace_bytes.
  if (auto e = CheckWorkspace("sok_embed_bwd", workspace.size_bytes(), total); e.failure())
    return e;
  Carver cv(workspace.untyped_data());
  uint32_t* keys_in = cv.Take<uint32_t>(n);
  uint32_t* keys_out = cv.Take<uint32_t>(n);
  int32_t* pos_in = cv.Take<int32_t>(n);
  Runs r;
  r.pos_out = cv.Take<int32_t>(n);
  r.bag_of = cv.Take<int32_t>(n);
  r.scale_of = cv.Take<float>(n);
  r.ukeys = cv.Take<uint32_t>(n);
  r.counts = cv.Take<int32_t>(n);
  r.starts = cv.Take<int32_t>(n);
  r.num_runs = cv.Take<int32_t>(1);
  r.chunks = reinterpret_cast<int32_t*>(keys_in);  // free after sort
  r.chunk_start = pos_in;                          // free after sort
  void* cub_tmp = cv.Take<char>(cub_bytes);
  r.partial = cv.Take<float>(static_cast<size_t>(max_chunks) * dim);
  r.max_chunks = max_chunks;

  auto err = DispatchKey(ids.element_type(), "ids", [&](auto key) {
    using K = decltype(key);
    cuda::PrepFill<<<Blocks(n), kBlock, 0, stream>>>(keys_in, pos_in, n, sentinel);
    // Lanes per bag by the mean bag length: one for about one id.
    const int tpb = n <= 2 * m ? 1 : (n <= 8 * m ? 4 : 32);
    if (m > 0)
      cuda::PrepBags<K><<<Blocks(m * tpb), kBlock, 0, stream>>>(
          ids.reinterpret_data<K>(), offsets.typed_data<int32_t>(), w, n, m,
          num_rows, combiner, tpb, keys_in, r.bag_of, r.scale_of);
    return ffi::Error::Success();
  });
  if (err.failure()) return err;
  size_t bytes = cub_bytes;
  cub::DeviceRadixSort::SortPairs(cub_tmp, bytes, keys_in, keys_out, pos_in,
                                  r.pos_out, n, 0, end_bit, stream);
  bytes = cub_bytes;
  cub::DeviceRunLengthEncode::Encode(cub_tmp, bytes, keys_out, r.ukeys, r.counts,
                                     r.num_runs, n, stream);
  bytes = cub_bytes;
  cub::DeviceScan::ExclusiveSum(cub_tmp, bytes, r.counts, r.starts, n, stream);
  cuda::ChunkCounts<<<Blocks(n), kBlock, 0, stream>>>(
      r.ukeys, r.counts, r.num_runs, n, sentinel, r.chunks);
  bytes = cub_bytes;
  cub::DeviceScan::ExclusiveSum(cub_tmp, bytes, r.chunks, r.chunk_start, n,
                                stream);
  *out = r;
  return ffi::Error::Success();
}

}  // namespace embed_cuda

namespace {

using embed_cuda::Aligned16;
using embed_cuda::Blocks;
using embed_cuda::kBlock;
using embed_cuda::ReduceAll;
using embed_cuda::Runs;
using embed_cuda::SortRuns;

ffi::Error FwdImpl(cudaStream_t stream, ffi::AnyBuffer table, ffi::AnyBuffer ids,
                   ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                   ffi::Result<ffi::AnyBuffer> out, int32_t combiner,
                   int64_t fixed_nnz) {
  EmbedShape sh;
  if (auto e = CheckFwd(table, ids, offsets, weights, *out, combiner,
                        fixed_nnz, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  if (m == 0 || dim == 0) return ffi::Error::Success();
  const float* w = OptionalWeights(weights);
  auto err = DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    return DispatchKey(ids.element_type(), "ids", [&](auto key) {
      using K = decltype(key);
      constexpr int kVec = 16 / sizeof(T);
      const T* tp = table.reinterpret_data<T>();
      T* op = out->reinterpret_data<T>();
      const bool fast = dim % kVec == 0 && Aligned16(tp) && Aligned16(op);
      const int64_t chunks = fast ? dim / kVec : dim;
      constexpr int kCpl = cuda::CplFor(kVec);
      constexpr int kCpl1 = cuda::CplFor(1);
      if (fixed_nnz > 0) {
        // Bags of one length: no offsets, no shuffles (EmbedFwdFixedKernel).
        auto launch = [&](auto kernel, int cpl) {
          const int tpb = cuda::ThreadsPerBag(chunks, cpl);
          kernel<<<Blocks(m * tpb), kBlock, 0, stream>>>(
              tp, rows, dim, ids.reinterpret_data<K>(), w, fixed_nnz, m,
              combiner, tpb, op);
        };
        // Float rows: one id per bag, 2 chunks per lane at 8 blocks per SM
        // (a plain gather); longer bags, 2 chunks x 4 ids per lane. 16-bit
        // rows keep the register-safe shapes. The shapes are the fastest
        // of benchmarks/kernel_variants.cu (RESULTS.md, fixed-length
        // forward).
        constexpr bool kF32 = kVec == 4;
        constexpr int kCplOne = kF32 ? 2 : kCpl;
        constexpr int kMinbOne = kF32 ? 8 : 4;
        constexpr int kCplMany = kF32 ? 2 : 1;
        const bool single = fixed_nnz == 1;
        if (fast && single)
          launch(cuda::EmbedFwdFixedKernel<T, K, kVec, kCplOne, 1, kMinbOne>, kCplOne);
        else if (fast)
          launch(cuda::EmbedFwdFixedKernel<T, K, kVec, kCplMany, 4>, kCplMany);
        else if (single)
          launch(cuda::EmbedFwdFixedKernel<T, K, 1, kCpl1, 1>, kCpl1);
        else
          launch(cuda::EmbedFwdFixedKernel<T, K, 1, 1, 4>, 1);
        return ffi::Error::Success();
      }
      // Short bags (under 2 ids on average): the several-bags-per-warp shape.
      const bool short_bags = n < 2 * m;
      auto launch = [&](auto kernel, int cpl) {
        const int tpb = cuda::ThreadsPerBag(chunks, cpl);
        kernel<<<Blocks(m * tpb), kBlock, 0, stream>>>(
            tp, rows, dim, ids.reinterpret_data<K>(),
            offsets.typed_data<int32_t>(), w, n, m, combiner, tpb, op);
      };
      if (fast && short_bags)
        launch(cuda::EmbedFwdKernel<T, K, kVec, kCpl, 1>, kCpl);
      else if (fast)
        launch(cuda::EmbedFwdKernel<T, K, kVec, 1, 4>, 1);
      else if (short_bags)
        launch(cuda::EmbedFwdKernel<T, K, 1, kCpl1, 1>, kCpl1);
      else
        launch(cuda::EmbedFwdKernel<T, K, 1, 1, 4>, 1);
      return ffi::Error::Success();
    });
  });
  if (err.failure()) return err;
  return LastError("sok_embed_fwd");
}

ffi::Error BwdImpl(cudaStream_t stream, ffi::AnyBuffer grad, ffi::AnyBuffer ids,
                   ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                   ffi::Result<ffi::Buffer<ffi::S32>> unique_rows,
                   ffi::Result<ffi::Buffer<ffi::F32>> row_grads,
                   ffi::Result<ffi::Buffer<ffi::S32>> num_unique,
                   ffi::Result<ffi::AnyBuffer> workspace, int32_t combiner,
                   int64_t num_rows) {
  EmbedShape sh;
  if (auto e = CheckBwd(grad, ids, offsets, weights, *unique_rows, *row_grads,
                        combiner, &sh);
      e.failure())
    return e;
  if (num_rows < 0 || num_rows >= INT32_MAX)
    return InvalidArgument("num_rows must lie in [0, 2^31 - 1)");
  const int64_t dim = sh.dim, n = sh.n, m = sh.m;
  if (n == 0) {
    cudaMemsetAsync(num_unique->typed_data(), 0, sizeof(int32_t), stream);
    return LastError("sok_embed_bwd");
  }
  const float* w = OptionalWeights(weights);
  Runs r;
  if (auto e = SortRuns(stream, ids, offsets, w, n, m, dim, num_rows, combiner,
                        *workspace, &r);
      e.failure())
    return e;
  auto err = DispatchFloat(grad.element_type(), "grad_out", [&](auto tag) {
    using G = typename DevType<decltype(tag)>::type;
    ReduceAll(stream, grad.reinterpret_data<G>(), dim, n, num_rows, r,
              cuda::RowGradSink<float>{row_grads->typed_data(),
                                       unique_rows->typed_data(),
                                       num_unique->typed_data()});
    return ffi::Error::Success();
  });
  if (err.failure()) return err;
  return LastError("sok_embed_bwd");
}

// The dense table cotangent straight from the runs: a memset, then each
// touched row written once by the lanes that sum it (no [N, D]
// intermediate, no second scatter pass).
ffi::Error BwdDenseImpl(cudaStream_t stream, ffi::AnyBuffer grad,
                        ffi::AnyBuffer ids, ffi::AnyBuffer offsets,
                        ffi::AnyBuffer weights, ffi::Result<ffi::AnyBuffer> dense,
                        ffi::Result<ffi::AnyBuffer> workspace,
                        int32_t combiner) {
  EmbedShape sh;
  if (auto e = CheckBwdDense(grad, ids, offsets, weights, *dense, combiner, &sh);
      e.failure())
    return e;
  const int64_t num_rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  cudaMemsetAsync(dense->untyped_data(), 0, dense->size_bytes(), stream);
  if (n == 0 || dim == 0) return LastError("sok_embed_bwd_dense");
  const float* w = OptionalWeights(weights);
  Runs r;
  if (auto e = SortRuns(stream, ids, offsets, w, n, m, dim, num_rows, combiner,
                        *workspace, &r);
      e.failure())
    return e;
  auto err = DispatchFloat(dense->element_type(), "dense", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    ReduceAll(stream, grad.reinterpret_data<T>(), dim, n, num_rows, r,
              cuda::DenseSink<T>{dense->reinterpret_data<T>()});
    return ffi::Error::Success();
  });
  if (err.failure()) return err;
  return LastError("sok_embed_bwd_dense");
}

// The backward fused with an optimizer: checked here, run by the
// instantiation for the table's dtype (embed_update.cuh).
ffi::Error BwdUpdateImpl(cudaStream_t stream, ffi::AnyBuffer table,
                         ffi::AnyBuffer s0, ffi::AnyBuffer s1,
                         ffi::AnyBuffer grad, ffi::AnyBuffer ids,
                         ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                         ffi::Buffer<ffi::F32> hparams,
                         ffi::Result<ffi::AnyBuffer> table_out,
                         ffi::Result<ffi::AnyBuffer> s0_out,
                         ffi::Result<ffi::AnyBuffer> s1_out,
                         ffi::Result<ffi::AnyBuffer> workspace, int32_t combiner,
                         int32_t rule_id, ffi::Span<const float> consts,
                         int32_t stochastic_rounding) {
  EmbedShape sh;
  if (auto e = CheckBwdUpdate(table, grad, ids, offsets, weights, table_out,
                              combiner, &sh);
      e.failure())
    return e;
  embed_cuda::BwdUpdateCall call{
      stream,    table,    s0,      s1,     grad,      ids,
      offsets,   weights,  hparams, table_out, s0_out, s1_out,
      workspace, combiner, rule_id, consts, stochastic_rounding, sh};
  auto result = DispatchFloat(table.element_type(), "table", [&](auto tag) {
    return embed_cuda::BwdUpdateFor<typename DevType<decltype(tag)>::type>(call);
  });
  if (result.failure()) return result;
  return LastError("sok_embed_bwd_update");
}

ffi::Error WgradImpl(cudaStream_t stream, ffi::AnyBuffer table,
                     ffi::AnyBuffer grad, ffi::AnyBuffer ids,
                     ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                     ffi::Result<ffi::Buffer<ffi::F32>> gw, int32_t combiner) {
  EmbedShape sh;
  if (auto e = CheckWgrad(table, grad, ids, offsets, weights, combiner, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  if (n == 0) return ffi::Error::Success();
  // Positions outside every bag get a zero gradient.
  cudaMemsetAsync(gw->typed_data(), 0, n * sizeof(float), stream);
  if (m == 0) return LastError("sok_embed_wgrad");
  auto err = DispatchFloat(table.element_type(), "table", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    return DispatchKey(ids.element_type(), "ids", [&](auto key) {
      using K = decltype(key);
      cuda::WeightGradKernel<T, K><<<Blocks(m * 32), kBlock, 0, stream>>>(
          table.reinterpret_data<T>(), rows, dim, grad.reinterpret_data<T>(),
          ids.reinterpret_data<K>(), offsets.typed_data<int32_t>(),
          weights.typed_data<float>(), n, m, combiner, gw->typed_data());
      return ffi::Error::Success();
    });
  });
  if (err.failure()) return err;
  return LastError("sok_embed_wgrad");
}

ffi::Error DenseImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> unique_rows,
                     ffi::Buffer<ffi::F32> row_grads,
                     ffi::Buffer<ffi::S32> num_unique,
                     ffi::Result<ffi::AnyBuffer> dense) {
  EmbedShape sh;
  if (auto e = CheckRowsToDense(unique_rows, row_grads, *dense, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, u_cap = sh.n;
  cudaMemsetAsync(dense->untyped_data(), 0, dense->size_bytes(), stream);
  if (u_cap == 0 || dim == 0) return LastError("sok_rows_to_dense");
  auto err = DispatchFloat(dense->element_type(), "dense", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    cuda::ScatterRows<T><<<Blocks(u_cap * 32), kBlock, 0, stream>>>(
        unique_rows.typed_data(), row_grads.typed_data(),
        num_unique.typed_data(), u_cap, rows, dim, dense->reinterpret_data<T>());
    return ffi::Error::Success();
  });
  if (err.failure()) return err;
  return LastError("sok_rows_to_dense");
}

}  // namespace

SOK_EMBED_TARGETS(SOK_CUDA_HANDLER)

void AppendEmbedTargetsCuda(TargetList& out) {
  out.insert(out.end(), {SOK_EMBED_TARGETS(SOK_CUDA_TARGET)});
}

}  // namespace sok
