// CUDA kernels of the embedding lookup+combine family. No XLA, no nanobind:
// embed_cuda.cu and embed_update.cuh validate buffers and launch these.
// Several translation units include this file: a kernel that is not a
// template is static.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_vec.cuh"
#include "embed_math.h"

namespace sok {
namespace cuda {

// Mask of the TPB-lane group that `lane` (the warp lane) belongs to.
__device__ __forceinline__ unsigned GroupMask(int tpb) {
  if (tpb == 32) return 0xffffffffu;
  unsigned lane = threadIdx.x & 31u;
  unsigned base = lane & ~static_cast<unsigned>(tpb - 1);
  return ((1u << tpb) - 1u) << base;
}

__device__ __forceinline__ float GroupSum(float v, unsigned mask, int tpb) {
  for (int o = tpb / 2; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o, tpb);
  return v;
}

// The index of this thread's group of `tpb` consecutive lanes in the grid
// (tpb = 1: the thread's own index).
__device__ __forceinline__ int64_t GroupIndex(int tpb) {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / tpb;
}

template <int CPL, int VEC>
__device__ __forceinline__ void ZeroAcc(float (&acc)[CPL][VEC]) {
#pragma unroll
  for (int k = 0; k < CPL; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[k][i] = 0.f;
}

__device__ __forceinline__ void BagRangeDev(const int32_t* off, int64_t b,
                                            int64_t n, int64_t* lo, int64_t* hi) {
  int64_t a = off[b], z = off[b + 1];
  a = a < 0 ? 0 : (a > n ? n : a);
  z = z < a ? a : (z > n ? n : z);
  *lo = a;
  *hi = z;
}

// ---------------------------------------------------------------------------
// Forward: a group of TPB lanes per bag. Each lane owns CPL column chunks of
// VEC elements (chunks lane, lane + TPB, ...); the group loads TPB ids at
// once, broadcasts them with shuffles and walks them U at a time, so a lane
// has CPL * U independent 16-byte loads in flight. Two shapes are built:
//   short bags (about one key each, the common categorical feature): CPL =
//     CplFor(VEC), U = 1: a row is read by few lanes with several loads each
//     and a warp serves several bags at once;
//   longer bags: CPL = 1, U = 4: a row per 32 lanes, 4 rows in flight.
// The combiner's weight sums ride along in the same pass (each lane sums the
// weights of the ids it loaded).
//
// Chunks per lane of the short-bag shape: 64 bytes of a row per lane for
// float rows, 32 for 16-bit rows (whose 8-wide chunks would otherwise spill
// under the 64-register cap).
__host__ __device__ constexpr int CplFor(int vec) { return vec >= 8 ? 2 : 4; }

// Lanes per bag: enough that each lane's `cpl` chunks cover the row once (a
// power of two, at most a warp).
inline int ThreadsPerBag(int64_t chunks, int cpl) {
  int t = 1;
  while (t < 32 && static_cast<int64_t>(t) * cpl < chunks) t *= 2;
  return t;
}

// The forward's inner step: the lane's CPL chunks (c_first, c_first + tpb,
// ...) of U rows (r < 0: none) loaded together, then acc += w * row.
template <typename T, int VEC, int CPL, int U>
__device__ __forceinline__ void AccumulateRows(const T* __restrict__ table,
                                               int64_t dim, const int64_t (&r)[U],
                                               const float (&wv)[U],
                                               int64_t c_first, int tpb,
                                               int64_t chunks,
                                               float (&acc)[CPL][VEC]) {
  float v[U][CPL][VEC];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t c = c_first + static_cast<int64_t>(k) * tpb;
      if (c < chunks && r[u] >= 0) {
        LoadF<T, VEC>(table + r[u] * dim + c * VEC, v[u][k]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[u][k][i] = 0.f;
      }
    }
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int k = 0; k < CPL; ++k)
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[k][i] += wv[u] * v[u][k][i];
}

// The forward's last step: the lane's chunks of the bag's output row, scaled.
template <typename T, int VEC, int CPL>
__device__ __forceinline__ void ScaleStore(T* __restrict__ out_row, float scale,
                                           int64_t c_first, int tpb,
                                           int64_t chunks,
                                           float (&acc)[CPL][VEC]) {
#pragma unroll
  for (int k = 0; k < CPL; ++k) {
    const int64_t c = c_first + static_cast<int64_t>(k) * tpb;
    if (c >= chunks) continue;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[k][i] *= scale;
    StoreF<T, VEC>(out_row + c * VEC, acc[k]);
  }
}

template <typename T, typename K, int VEC, int CPL, int U>
__global__ void __launch_bounds__(256, 4)
    EmbedFwdKernel(const T* __restrict__ table, int64_t rows, int64_t dim,
                   const K* __restrict__ ids, const int32_t* __restrict__ off,
                   const float* __restrict__ w, int64_t n, int64_t m,
                   int32_t combiner, int tpb, T* __restrict__ out) {
  const int lane = threadIdx.x & (tpb - 1);
  const int64_t bag = GroupIndex(tpb);
  if (bag >= m) return;  // whole groups leave together
  const unsigned mask = GroupMask(tpb);
  int64_t lo, hi;
  BagRangeDev(off, bag, n, &lo, &hi);
  const int64_t chunks = dim / VEC;

  for (int64_t c0 = 0; c0 < chunks; c0 += static_cast<int64_t>(tpb) * CPL) {
    const int64_t c_first = c0 + lane;
    float acc[CPL][VEC];
    ZeroAcc(acc);
    float ws = 0.f, w2 = 0.f;
    for (int64_t base = lo; base < hi; base += tpb) {
      const int cnt = static_cast<int>(hi - base < tpb ? hi - base : tpb);
      int64_t my_row = -1;
      float my_w = 0.f;
      if (lane < cnt) {
        my_row = RowOf(ids[base + lane], rows);
        my_w = w ? w[base + lane] : 1.f;
        if (my_row >= 0) {
          ws += my_w;
          w2 += my_w * my_w;
        }
      }
      for (int t = 0; t < cnt; t += U) {
        int64_t r[U];
        float wv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          r[u] = __shfl_sync(mask, my_row, (t + u) & (tpb - 1), tpb);
          wv[u] = __shfl_sync(mask, my_w, (t + u) & (tpb - 1), tpb);
          if (t + u >= cnt) r[u] = -1;
        }
        AccumulateRows<T, VEC, CPL, U>(table, dim, r, wv, c_first, tpb, chunks, acc);
      }
    }
    ws = GroupSum(ws, mask, tpb);
    w2 = GroupSum(w2, mask, tpb);
    ScaleStore<T, VEC, CPL>(out + bag * dim, CombinerScale(combiner, ws, w2),
                            c_first, tpb, chunks, acc);
  }
}

// Forward for bags of one fixed length (padded and BCOO ids, and the
// owner-side gathers of the exchange: bag b holds positions
// [b * nnz, (b + 1) * nnz)). No offsets are read, and every lane of a group
// loads the bag's ids and weights itself (the same addresses across the
// group: one transaction), so the group needs no shuffles and each lane can
// keep its own weight sums. U keys at a time, CPL 16-byte chunks per lane:
// nnz = 1 is a gather with CplFor(VEC) chunks per lane.
template <typename T, typename K, int VEC, int CPL, int U, int MINB = 4>
__global__ void __launch_bounds__(256, MINB)
    EmbedFwdFixedKernel(const T* __restrict__ table, int64_t rows, int64_t dim,
                        const K* __restrict__ ids, const float* __restrict__ w,
                        int64_t nnz, int64_t m, int32_t combiner, int tpb,
                        T* __restrict__ out) {
  const int lane = threadIdx.x & (tpb - 1);
  const int64_t bag = GroupIndex(tpb);
  if (bag >= m) return;
  const int64_t lo = bag * nnz;
  const int64_t chunks = dim / VEC;
  for (int64_t c0 = 0; c0 < chunks; c0 += static_cast<int64_t>(tpb) * CPL) {
    const int64_t c_first = c0 + lane;
    float acc[CPL][VEC];
    ZeroAcc(acc);
    float ws = 0.f, w2 = 0.f;
    for (int64_t t = 0; t < nnz; t += U) {
      int64_t r[U];
      float wv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        r[u] = -1;
        wv[u] = 0.f;
        if (t + u < nnz) {
          r[u] = RowOf(ids[lo + t + u], rows);
          wv[u] = w ? w[lo + t + u] : 1.f;
        }
        if (r[u] >= 0) {
          ws += wv[u];
          w2 += wv[u] * wv[u];
        }
      }
      AccumulateRows<T, VEC, CPL, U>(table, dim, r, wv, c_first, tpb, chunks, acc);
    }
    ScaleStore<T, VEC, CPL>(out + bag * dim, CombinerScale(combiner, ws, w2),
                            c_first, tpb, chunks, acc);
  }
}

// ---------------------------------------------------------------------------
// Backward, step 1: per position j, the sort key (its row, or num_rows for
// padding / invalid / unowned positions, which sorts last), its bag and its
// scale w_j * f(bag). A warp per bag; positions outside every bag keep the
// sentinel written by PrepFill.
static __global__ void PrepFill(uint32_t* keys, int32_t* pos, int64_t n,
                                uint32_t sentinel) {
  const int64_t j = GroupIndex(1);
  if (j < n) {
    keys[j] = sentinel;
    pos[j] = static_cast<int32_t>(j);
  }
}

// TPB lanes per bag (1 for bags of about one id, more for longer bags).
template <typename K>
__global__ void PrepBags(const K* __restrict__ ids, const int32_t* __restrict__ off,
                         const float* __restrict__ w, int64_t n, int64_t m,
                         int64_t rows, int32_t combiner, int tpb, uint32_t* keys,
                         int32_t* bag_of, float* scale_of) {
  const int lane = threadIdx.x & (tpb - 1);
  const int64_t bag = GroupIndex(tpb);
  if (bag >= m) return;  // whole groups leave together
  const unsigned mask = GroupMask(tpb);
  int64_t lo, hi;
  BagRangeDev(off, bag, n, &lo, &hi);
  float ws = 0.f, w2 = 0.f;
  for (int64_t j = lo + lane; j < hi; j += tpb) {
    if (RowOf(ids[j], rows) < 0) continue;
    float wj = w ? w[j] : 1.f;
    ws += wj;
    w2 += wj * wj;
  }
  ws = GroupSum(ws, mask, tpb);
  w2 = GroupSum(w2, mask, tpb);
  const float f = CombinerScale(combiner, ws, w2);
  for (int64_t j = lo + lane; j < hi; j += tpb) {
    int64_t r = RowOf(ids[j], rows);
    if (r < 0) continue;
    keys[j] = static_cast<uint32_t>(r);
    bag_of[j] = static_cast<int32_t>(bag);
    scale_of[j] = (w ? w[j] : 1.f) * f;
  }
}

// Segments longer than this are split into chunks summed in parallel, then
// the chunk partials are summed in order: hot (Zipf) rows would otherwise
// serialise on one warp. Fixed partition, so the result is deterministic.
constexpr int kChunk = 128;

// Per unique run u: number of chunks (0 = short run summed directly, and
// always 0 for the sentinel run of skipped positions, whose bag and scale
// were never written).
static __global__ void ChunkCounts(const uint32_t* __restrict__ ukeys,
                                   const int32_t* __restrict__ counts,
                                   const int32_t* __restrict__ num_runs, int64_t n,
                                   uint32_t sentinel, int32_t* chunks) {
  const int64_t u = GroupIndex(1);
  if (u >= n) return;
  int32_t c = 0;
  if (u < *num_runs && ukeys[u] != sentinel) {
    int32_t k = counts[u];
    c = k > kChunk ? (k + kChunk - 1) / kChunk : 0;
  }
  chunks[u] = c;
}

// Sum of scale[pos] * grad[bag[pos]] over sorted positions [p0, p1) into
// acc, for the lane's CPL chunks (c_first, c_first + tpb, ...), in position
// order; U positions' rows loaded together.
template <typename G, int VEC, int CPL, int U>
__device__ __forceinline__ void SumRun(const G* __restrict__ grad, int64_t dim,
                                       const int32_t* __restrict__ spos,
                                       const int32_t* __restrict__ bag_of,
                                       const float* __restrict__ scale_of,
                                       int64_t p0, int64_t p1, int64_t c_first,
                                       int tpb, int64_t chunks,
                                       float (&acc)[CPL][VEC]) {
  ZeroAcc(acc);
  for (int64_t p = p0; p < p1; p += U) {
    int64_t b[U];
    float sc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      b[u] = -1;
      sc[u] = 0.f;
      if (p + u < p1) {
        const int32_t q = spos[p + u];
        b[u] = bag_of[q];
        sc[u] = scale_of[q];
      }
    }
    AccumulateRows<G, VEC, CPL, U>(grad, dim, b, sc, c_first, tpb, chunks, acc);
  }
}

// Chunks per lane and positions in flight of the run-summing kernels.
constexpr int kRunCpl = 2;
constexpr int kRunU = 2;

// Number of runs that name a real row (the sentinel run, if any, is last).
__device__ __forceinline__ int64_t ValidRuns(const uint32_t* unique_keys,
                                             const int32_t* num_runs,
                                             uint32_t sentinel) {
  int64_t r = *num_runs;
  if (r > 0 && unique_keys[r - 1] == sentinel) --r;
  return r;
}

// Where step 3 puts a run's summed gradient: a sink, with
//   Begin(u, valid, key, lane, tpb, dim, cols): called by every lane of run
//     u's group first; false: nothing to sum for u (u >= valid);
//   Store<VEC, CPL>(u, key, dim, c_first, tpb, cols, acc): the lane's CPL
//     column chunks (c_first, c_first + tpb, ...) of the sum of run u;
//   Aligned(): whether its rows allow 4-wide accesses (host);
//   kWholeRow: false, or true for a sink whose stores depend on the whole
//     row (row-wise Adagrad). Such a sink instead has
//     RowScale(key, dim, sum_sq, lane, mask, tpb): called once per run by
//       every lane of its group (`mask`), sum_sq being the sum over the row
//       of the squared summed gradient (the same on every lane); returns
//       the row's scale on every lane;
//     Store<VEC, CPL>(u, key, dim, c_first, tpb, cols, acc, scale): as
//       above, after RowScale, with its scale.
//   The kernels then sum a run twice where its row takes more than one pass
//   of its group (RunWholeRow) and always for a long run (ReducePartials):
//   once for sum_sq, once to store; both sums are the same operations in
//   the same order.
//
// RowGradSink: row u of the [N, D] float32 row_grads, with unique_rows (-1
// beyond the valid runs), zero rows beyond them and num_unique.
template <typename O>
struct RowGradSink {
  static constexpr bool kWholeRow = false;
  O* out_rows;
  int32_t* unique_rows;
  int32_t* num_unique;

  bool Aligned() const { return (reinterpret_cast<uintptr_t>(out_rows) & 15u) == 0; }
  template <int VEC>
  __device__ __forceinline__ bool Begin(int64_t u, int64_t valid, uint32_t key,
                                        int lane, int tpb, int64_t dim,
                                        int64_t cols) const {
    if (u == 0 && lane == 0) *num_unique = static_cast<int32_t>(valid);
    if (u >= valid) {
      if (lane == 0) unique_rows[u] = -1;
      float z[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = 0.f;
      for (int64_t c = lane; c < cols; c += tpb)
        StoreF<O, VEC>(out_rows + u * dim + c * VEC, z);
      return false;
    }
    if (lane == 0) unique_rows[u] = static_cast<int32_t>(key);
    return true;
  }
  template <int VEC, int CPL>
  __device__ __forceinline__ void Store(int64_t u, uint32_t, int64_t dim,
                                        int64_t c_first, int tpb, int64_t cols,
                                        float (&acc)[CPL][VEC]) const {
    ScaleStore<O, VEC, CPL>(out_rows + u * dim, 1.f, c_first, tpb, cols, acc);
  }
};

// DenseSink: row `key` of the dense [num_rows, D] cotangent, which a memset
// zeroed before (cheaper than a kernel writing every row once: RESULTS.md,
// sok_embed_bwd_dense).
template <typename O>
struct DenseSink : ValidRunsSink {
  O* dense;

  explicit DenseSink(O* d) : dense(d) {}
  bool Aligned() const { return (reinterpret_cast<uintptr_t>(dense) & 15u) == 0; }
  template <int VEC, int CPL>
  __device__ __forceinline__ void Store(int64_t, uint32_t key, int64_t dim,
                                        int64_t c_first, int tpb, int64_t cols,
                                        float (&acc)[CPL][VEC]) const {
    ScaleStore<O, VEC, CPL>(dense + static_cast<int64_t>(key) * dim, 1.f,
                            c_first, tpb, cols, acc);
  }
};

template <int CPL, int VEC>
__device__ __forceinline__ float SumSquares(const float (&acc)[CPL][VEC]) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < CPL; ++k)
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += acc[k][i] * acc[k][i];
  return s;
}

// A short run into a kWholeRow sink: the group's sum over the row of the
// squared sums (chunks past the row hold zeros), the sink's RowScale, then
// the stores; a row of one pass keeps its sums in registers, a wider row is
// summed again pass by pass.
template <typename G, int VEC, typename Sink>
__device__ __forceinline__ void RunWholeRow(
    const G* __restrict__ grad, int64_t dim, const int32_t* __restrict__ spos,
    const int32_t* __restrict__ bag_of, const float* __restrict__ scale_of,
    int64_t p0, int64_t p1, int64_t u, uint32_t key, int lane, int tpb,
    int64_t cols, const Sink& sink) {
  const int64_t pass = static_cast<int64_t>(tpb) * kRunCpl;
  float acc[kRunCpl][VEC];
  float sq = 0.f;
  for (int64_t c0 = 0; c0 < cols; c0 += pass) {
    SumRun<G, VEC, kRunCpl, kRunU>(grad, dim, spos, bag_of, scale_of, p0, p1,
                                   c0 + lane, tpb, cols, acc);
    sq += SumSquares(acc);
  }
  const unsigned mask = GroupMask(tpb);
  sq = GroupSum(sq, mask, tpb);
  const float scale = sink.RowScale(key, dim, sq, lane, mask, tpb);
  if (cols <= pass) {
    sink.template Store<VEC, kRunCpl>(u, key, dim, lane, tpb, cols, acc, scale);
    return;
  }
  for (int64_t c0 = 0; c0 < cols; c0 += pass) {
    SumRun<G, VEC, kRunCpl, kRunU>(grad, dim, spos, bag_of, scale_of, p0, p1,
                                   c0 + lane, tpb, cols, acc);
    sink.template Store<VEC, kRunCpl>(u, key, dim, c0 + lane, tpb, cols, acc,
                                      scale);
  }
}

// Step 3a: TPB lanes per unique run u; short runs are summed and handed to
// the sink, long runs are left to the chunk kernels.
template <typename G, int VEC, typename Sink>
__global__ void __launch_bounds__(256, 4)
    ReduceRuns(const G* __restrict__ grad, int64_t dim,
               const uint32_t* __restrict__ ukeys,
               const int32_t* __restrict__ counts,
               const int32_t* __restrict__ starts,
               const int32_t* __restrict__ num_runs,
               const int32_t* __restrict__ chunks,
               const int32_t* __restrict__ spos,
               const int32_t* __restrict__ bag_of,
               const float* __restrict__ scale_of, int64_t n, uint32_t sentinel,
               int tpb, Sink sink) {
  const int lane = threadIdx.x & (tpb - 1);
  const int64_t u = GroupIndex(tpb);
  if (u >= n) return;
  const int64_t valid = ValidRuns(ukeys, num_runs, sentinel);
  const int64_t cols = dim / VEC;
  const uint32_t key = u < valid ? ukeys[u] : sentinel;
  if (!sink.template Begin<VEC>(u, valid, key, lane, tpb, dim, cols)) return;
  if (chunks[u] != 0) return;
  const int64_t p0 = starts[u], p1 = p0 + counts[u];
  if constexpr (Sink::kWholeRow) {
    RunWholeRow<G, VEC>(grad, dim, spos, bag_of, scale_of, p0, p1, u, key,
                        lane, tpb, cols, sink);
  } else {
    for (int64_t c0 = 0; c0 < cols; c0 += static_cast<int64_t>(tpb) * kRunCpl) {
      float acc[kRunCpl][VEC];
      SumRun<G, VEC, kRunCpl, kRunU>(grad, dim, spos, bag_of, scale_of, p0, p1,
                                     c0 + lane, tpb, cols, acc);
      sink.template Store<VEC, kRunCpl>(u, key, dim, c0 + lane, tpb, cols, acc);
    }
  }
}

// Step 3b: a warp per chunk of a long run: partial sums into `partial`.
template <typename G, int VEC>
__global__ void ReduceChunks(const G* __restrict__ grad, int64_t dim,
                             const int32_t* __restrict__ counts,
                             const int32_t* __restrict__ starts,
                             const int32_t* __restrict__ chunks,
                             const int32_t* __restrict__ chunk_start,
                             const int32_t* __restrict__ num_runs,
                             const int32_t* __restrict__ spos,
                             const int32_t* __restrict__ bag_of,
                             const float* __restrict__ scale_of,
                             int64_t max_chunks, float* partial) {
  const int lane = threadIdx.x & 31;
  const int64_t k = GroupIndex(32);
  const int64_t runs = *num_runs;
  if (runs == 0 || k >= max_chunks) return;
  const int64_t total = chunk_start[runs - 1] + chunks[runs - 1];
  if (k >= total) return;
  // The run holding chunk k: last u with chunk_start[u] <= k and chunks > 0.
  int64_t lo = 0, hi = runs - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= k) lo = mid; else hi = mid - 1;
  }
  // Runs with no chunks share chunk_start with the next run that has some,
  // and come before it, so the last run starting at or before k owns k.
  const int64_t u = lo;
  const int64_t i = k - chunk_start[u];
  const int64_t p0 = starts[u] + i * kChunk;
  const int64_t p1 = min(p0 + kChunk, static_cast<int64_t>(starts[u]) + counts[u]);
  const int64_t cols = dim / VEC;
  for (int64_t c = lane; c < cols; c += 32) {
    float acc[1][VEC];
    SumRun<G, VEC, 1, 4>(grad, dim, spos, bag_of, scale_of, p0, p1, c, 32, cols, acc);
    StoreF<float, VEC>(partial + k * dim + c * VEC, acc[0]);
  }
}

// Column chunk c of the chunk partials k0 .. k1 - 1 of one run, summed in
// order.
template <int VEC>
__device__ __forceinline__ void SumPartials(const float* __restrict__ partial,
                                            int64_t dim, int64_t k0, int64_t k1,
                                            int64_t c, float (&acc)[1][VEC]) {
  ZeroAcc(acc);
  for (int64_t k = k0; k < k1; ++k) {
    float v[VEC];
    LoadF<float, VEC>(partial + k * dim + c * VEC, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[0][i] += v[i];
  }
}

// Step 3c: each warp looks at 32 consecutive runs at once and sums the
// chunk partials of the long ones among them, in order, into the sink (a
// kWholeRow sink: the warp's sum of squares over the row first, then the
// sums again into its stores).
template <int VEC, typename Sink>
__global__ void ReducePartials(const uint32_t* __restrict__ ukeys,
                               const int32_t* __restrict__ chunks,
                               const int32_t* __restrict__ chunk_start,
                               const int32_t* __restrict__ num_runs,
                               const float* __restrict__ partial, int64_t dim,
                               int64_t n, Sink sink) {
  const int lane = threadIdx.x & 31;
  const int64_t base = GroupIndex(32) * 32;
  if (base >= n) return;  // whole warps leave together
  const int64_t runs = min(static_cast<int64_t>(*num_runs), n);
  const bool is_long = base + lane < runs && chunks[base + lane] != 0;
  unsigned todo = __ballot_sync(0xffffffffu, is_long);
  const int64_t cols = dim / VEC;
  while (todo) {
    const int64_t u = base + __ffs(todo) - 1;
    todo &= todo - 1;
    const int64_t k0 = chunk_start[u], k1 = k0 + chunks[u];
    const uint32_t key = ukeys[u];
    if constexpr (Sink::kWholeRow) {
      float sq = 0.f;
      for (int64_t c = lane; c < cols; c += 32) {
        float acc[1][VEC];
        SumPartials<VEC>(partial, dim, k0, k1, c, acc);
        sq += SumSquares(acc);
      }
      sq = GroupSum(sq, 0xffffffffu, 32);
      const float scale = sink.RowScale(key, dim, sq, lane, 0xffffffffu, 32);
      for (int64_t c = lane; c < cols; c += 32) {
        float acc[1][VEC];
        SumPartials<VEC>(partial, dim, k0, k1, c, acc);
        sink.template Store<VEC, 1>(u, key, dim, c, 32, cols, acc, scale);
      }
    } else {
      for (int64_t c = lane; c < cols; c += 32) {
        float acc[1][VEC];
        SumPartials<VEC>(partial, dim, k0, k1, c, acc);
        sink.template Store<VEC, 1>(u, key, dim, c, 32, cols, acc);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Weight gradient: a warp per bag; gdot_j = <g_b, e_j> by a warp reduction,
// then the combiner's correction (embed_math.h WeightGrad).
template <typename T, typename K>
__global__ void WeightGradKernel(const T* __restrict__ table, int64_t rows,
                                 int64_t dim, const T* __restrict__ grad,
                                 const K* __restrict__ ids,
                                 const int32_t* __restrict__ off,
                                 const float* __restrict__ w, int64_t n,
                                 int64_t m, int32_t combiner, float* gw) {
  const int lane = threadIdx.x & 31;
  const int64_t bag = GroupIndex(32);
  if (bag >= m) return;
  int64_t lo, hi;
  BagRangeDev(off, bag, n, &lo, &hi);
  float ws = 0.f, w2 = 0.f;
  for (int64_t j = lo + lane; j < hi; j += 32) {
    if (RowOf(ids[j], rows) < 0) continue;
    ws += w[j];
    w2 += w[j] * w[j];
  }
  ws = GroupSum(ws, 0xffffffffu, 32);
  w2 = GroupSum(w2, 0xffffffffu, 32);
  const T* g = grad + bag * dim;
  float s = 0.f;  // sum_j w_j gdot_j, accumulated in position order
  for (int64_t j = lo; j < hi; ++j) {
    int64_t r = RowOf(ids[j], rows);
    if (r < 0) {
      if (lane == 0) gw[j] = 0.f;
      continue;
    }
    float dot = 0.f;
    for (int64_t d = lane; d < dim; d += 32) dot += Ld(g[d]) * Ld(table[r * dim + d]);
    dot = GroupSum(dot, 0xffffffffu, 32);
    if (lane == 0) gw[j] = dot;
    s += w[j] * dot;
  }
  __syncwarp();
  for (int64_t j = lo + lane; j < hi; j += 32) {
    if (RowOf(ids[j], rows) < 0) continue;
    gw[j] = WeightGrad(combiner, gw[j], w[j], s, ws, w2);
  }
}

// Dense cotangent: a warp per unique row writes its gradient (after the
// whole buffer was zeroed with cudaMemsetAsync). Rows are unique, so the
// writes never collide.
template <typename T>
__global__ void ScatterRows(const int32_t* __restrict__ unique_rows,
                            const float* __restrict__ row_grads,
                            const int32_t* __restrict__ num_unique,
                            int64_t u_cap, int64_t rows, int64_t dim, T* dense) {
  const int lane = threadIdx.x & 31;
  const int64_t u = GroupIndex(32);
  if (u >= u_cap || u >= *num_unique) return;
  const int64_t r = unique_rows[u];
  if (r < 0 || r >= rows) return;
  for (int64_t d = lane; d < dim; d += 32)
    dense[r * dim + d] = St<T>(row_grads[u * dim + d]);
}

}  // namespace cuda
}  // namespace sok
