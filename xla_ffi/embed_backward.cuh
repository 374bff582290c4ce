// The backward's shared steps, for the translation units of the embedding
// family's CUDA handlers: embed_cuda.cu (lookup, backward, sparse gradient)
// and embed_update_<dtype>.cu (the backward fused with an optimizer, one
// unit per table dtype so that a build compiles them side by side). Launch
// shapes, the sorted runs of a backward (SortRuns, in embed_cuda.cu) and
// step 3 over them (ReduceAll, with the sink that consumes each run's sum).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "cuda_common.cuh"
#include "embed_checks.h"
#include "embed_kernels.cuh"

namespace sok {
namespace embed_cuda {

constexpr int kBlock = 256;

inline unsigned Blocks(int64_t threads) {
  return static_cast<unsigned>((threads + kBlock - 1) / kBlock);
}

inline bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The sorted runs of one backward call, carved out of the workspace: per
// unique run its key, length, first sorted position and chunk count (long
// runs), the sorted positions with their bag and scale, and the chunk
// partials.
struct Runs {
  uint32_t* ukeys;
  int32_t* counts;
  int32_t* starts;
  int32_t* num_runs;
  int32_t* chunks;
  int32_t* chunk_start;
  int32_t* pos_out;
  int32_t* bag_of;
  float* scale_of;
  float* partial;
  int64_t max_chunks;
};

// Sort + run-length of the positions by row (steps 1 and 2 of the backward,
// embed_kernels.cuh): every position outside the table sorts last under the
// sentinel num_rows. n > 0.
ffi::Error SortRuns(cudaStream_t stream, ffi::AnyBuffer ids,
                    ffi::AnyBuffer offsets, const float* w, int64_t n,
                    int64_t m, int64_t dim, int64_t num_rows, int32_t combiner,
                    ffi::AnyBuffer& workspace, Runs* out);

// Step 3 of the backward: the runs summed and handed to `sink`
// (embed_kernels.cuh: the [N, D] row_grads, the dense cotangent, or an
// optimizer applied in place).
template <typename G, typename Sink>
void ReduceAll(cudaStream_t stream, const G* gp, int64_t dim, int64_t n,
               int64_t num_rows, const Runs& r, const Sink& sink) {
  const uint32_t sentinel = static_cast<uint32_t>(num_rows);
  auto launch = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const int tpb = cuda::ThreadsPerBag(dim / V, cuda::kRunCpl);
    cuda::ReduceRuns<G, V, Sink><<<Blocks(n * tpb), kBlock, 0, stream>>>(
        gp, dim, r.ukeys, r.counts, r.starts, r.num_runs, r.chunks, r.pos_out,
        r.bag_of, r.scale_of, n, sentinel, tpb, sink);
    cuda::ReduceChunks<G, V><<<Blocks(r.max_chunks * 32), kBlock, 0, stream>>>(
        gp, dim, r.counts, r.starts, r.chunks, r.chunk_start, r.num_runs,
        r.pos_out, r.bag_of, r.scale_of, r.max_chunks, r.partial);
    cuda::ReducePartials<V, Sink><<<Blocks(n), kBlock, 0, stream>>>(
        r.ukeys, r.chunks, r.chunk_start, r.num_runs, r.partial, dim, n, sink);
  };
  // 4-wide accesses: 16 bytes of float, 8 of 16-bit data.
  const bool fast = dim % 4 == 0 && Aligned16(gp) && sink.Aligned() &&
                    Aligned16(r.partial);
  if (fast) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// The buffers and attributes of one sok_embed_bwd_update call
// (signatures.h EmbedBwdUpdate), checked by its handler.
struct BwdUpdateCall {
  cudaStream_t stream;
  ffi::AnyBuffer table, s0, s1, grad, ids, offsets, weights;
  ffi::Buffer<ffi::F32> hparams;
  ffi::Result<ffi::AnyBuffer> table_out, s0_out, s1_out, workspace;
  int32_t combiner, rule_id;
  ffi::Span<const float> consts;
  int32_t stochastic_rounding;
  EmbedShape shape;  // as CheckBwdUpdate found it
};

// The fused backward+update of a table of device type T (float,
// __nv_bfloat16, __half): defined in embed_update.cuh, instantiated once
// per T by embed_update_<dtype>.cu.
template <typename T>
ffi::Error BwdUpdateFor(BwdUpdateCall& call);

}  // namespace embed_cuda
}  // namespace sok
