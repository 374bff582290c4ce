// CUDA kernels of the fused sparse optimizers. A group of G lanes (G a power
// of two <= 32, a sub-warp for small D) updates one unique row; lanes walk the
// row VEC elements at a time (VEC = 4: one 16-byte float4 per float array, 8
// bytes for a half table; VEC = 1: the scalar fallback for any D). Each unique
// row appears once, so no atomics. num_unique and hparams are read on the
// device. The per-element rules come from optim_math.h and the table's
// rounding policy (Rounding: its hparams after the rule's) from
// rounding_math.h, as on the CPU. No XLA, no nanobind.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda_vec.cuh"
#include "optim_math.h"
#include "rounding_math.h"

namespace sok {
namespace optim {

using cuda::LoadFMutable;
using cuda::StoreF;

// Stores VEC float32 results as columns col.. of the table (or slot) row
// whose key is row_key (RoundingRowKey, or a slot's RoundingSlotKey of it):
// StoreF (round to nearest even) unless the policy is stochastic and the
// storage 16-bit.
template <typename T, int VEC, typename Rounding>
__device__ __forceinline__ void StoreRounded(T* p, const float (&in)[VEC],
                                             const Rounding& rounding,
                                             uint32_t row_key, int64_t col) {
  if constexpr (!Rounding::kStochastic || std::is_same_v<T, float>) {
    StoreF<T, VEC>(p, in);
  } else {
    cuda::Pack<T, VEC> pk;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const uint32_t r = rounding.Word(row_key, col + i);
      if constexpr (std::is_same_v<T, __nv_bfloat16>)
        pk.v[i] = __ushort_as_bfloat16(StochasticBf16(__float_as_uint(in[i]), r));
      else
        pk.v[i] = __ushort_as_half(StochasticF16(__float_as_uint(in[i]), r));
    }
    *reinterpret_cast<cuda::Pack<T, VEC>*>(p) = pk;
  }
}

// Table and (up to two) [R, D] slots of storage type S updated element-wise
// by `rule` (slots loaded to float32 and stored back by `rounding`, each with
// its own words). Launched over num_capacity * group threads; threads of
// rows at or beyond num_unique, or of rows outside [0, rows), exit.
template <typename T, typename S, int VEC, typename Rule, typename Rounding>
__global__ void ElementwiseUpdateKernel(Rule rule, Rounding rounding,
                                        T* __restrict__ table,
                                        S* __restrict__ s0,
                                        S* __restrict__ s1, int64_t rows,
                                        int64_t dim,
                                        const int32_t* __restrict__ unique_rows,
                                        const float* __restrict__ row_grads,
                                        const int32_t* __restrict__ num_unique,
                                        int64_t capacity,
                                        const float* __restrict__ hparams,
                                        int group) {
  int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t u = tid / group;
  int lane = static_cast<int>(tid % group);
  if (u >= ClampCount(num_unique[0], capacity)) return;
  int64_t r = unique_rows[u];
  if (r < 0 || r >= rows) return;
  rule.Bind(hparams);
  rounding.Bind(hparams + Rule::kHparams);
  const uint32_t row_key = rounding.RowKey(r);
  const uint32_t a_key = rounding.SlotKey(row_key, 0);
  const uint32_t b_key = rounding.SlotKey(row_key, 1);
  T* w_row = table + r * dim;
  const float* g_row = row_grads + u * dim;
  S* a_row = Rule::kSlots > 0 ? s0 + r * dim : nullptr;
  S* b_row = Rule::kSlots > 1 ? s1 + r * dim : nullptr;
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < dim;
       d += static_cast<int64_t>(group) * VEC) {
    float w[VEC], g[VEC], a[VEC] = {}, b[VEC] = {};
    LoadFMutable(w_row + d, w);
    LoadFMutable(g_row + d, g);
    if (Rule::kSlots > 0) LoadFMutable(a_row + d, a);
    if (Rule::kSlots > 1) LoadFMutable(b_row + d, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) rule(w[i], a[i], b[i], g[i]);
    StoreRounded<T, VEC>(w_row + d, w, rounding, row_key, d);
    if (Rule::kSlots > 0)
      StoreRounded<S, VEC>(a_row + d, a, rounding, a_key, d);
    if (Rule::kSlots > 1)
      StoreRounded<S, VEC>(b_row + d, b, rounding, b_key, d);
  }
}

// Row-wise Adagrad: the group first reduces sum_d g^2 with shuffles (a fixed
// tree, so deterministic), then updates the row. Every thread of a warp takes
// part in the shuffles, so no thread returns before them. acc: one element
// per row of storage type S, written by lane 0 (slot 0's words, column 0).
template <typename T, typename S, int VEC, typename Rounding>
__global__ void RowwiseAdagradKernel(RowwiseAdagradRule rule, Rounding rounding,
                                     T* __restrict__ table,
                                     S* __restrict__ acc, int64_t rows,
                                     int64_t dim,
                                     const int32_t* __restrict__ unique_rows,
                                     const float* __restrict__ row_grads,
                                     const int32_t* __restrict__ num_unique,
                                     int64_t capacity,
                                     const float* __restrict__ hparams,
                                     int group) {
  int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t u = tid / group;
  int lane = static_cast<int>(tid % group);
  bool live = u < ClampCount(num_unique[0], capacity);
  int64_t r = live ? unique_rows[u] : -1;
  live = live && r >= 0 && r < rows;
  const float* g_row = row_grads + u * dim;
  float sum_sq = 0.f;
  if (live) {
    for (int64_t d = static_cast<int64_t>(lane) * VEC; d < dim;
         d += static_cast<int64_t>(group) * VEC) {
      float g[VEC];
      LoadFMutable(g_row + d, g);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum_sq += g[i] * g[i];
    }
  }
  for (int off = group / 2; off > 0; off /= 2)
    sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, off, group);
  if (!live) return;
  rule.Bind(hparams);
  rounding.Bind(hparams + RowwiseAdagradRule::kHparams);
  const uint32_t row_key = rounding.RowKey(r);
  float a[1];
  LoadFMutable<S, 1>(acc + r, a);
  a[0] = rule.Accumulate(a[0], sum_sq, dim);
  float scale = AdagradScale(a[0], rule.eps);
  T* w_row = table + r * dim;
  for (int64_t d = static_cast<int64_t>(lane) * VEC; d < dim;
       d += static_cast<int64_t>(group) * VEC) {
    float w[VEC], g[VEC];
    LoadFMutable(w_row + d, w);
    LoadFMutable(g_row + d, g);
#pragma unroll
    for (int i = 0; i < VEC; ++i) w[i] = rule.Step(w[i], g[i], scale);
    StoreRounded<T, VEC>(w_row + d, w, rounding, row_key, d);
  }
  if (lane == 0)
    StoreRounded<S, 1>(acc + r, a, rounding, rounding.SlotKey(row_key, 0), 0);
}

// The fused backward's sink (embed_kernels.cuh ReduceRuns / ReducePartials):
// the summed gradient of run u goes straight into `rule` applied to row `key`
// of the table and its slots, in place (no [N, D] row_grads written and read
// back). Each run names a distinct row, so no atomics. The lane first loads
// all its chunks of the row and slots, then updates and stores them (loads in
// flight together; the stores could alias the next loads for the compiler).
// Slots have storage type S, loaded to float32 and stored back by the
// rounding policy, each with its own words.
template <typename T, typename S, typename Rule, typename Rounding>
struct UpdateSink : cuda::ValidRunsSink {
  Rule rule;
  Rounding rounding;
  const float* hparams;
  T* table;
  S* s0;
  S* s1;

  UpdateSink(Rule r, Rounding rd, const float* hp, T* t, S* a, S* b)
      : rule(r), rounding(rd), hparams(hp), table(t), s0(a), s1(b) {}
  bool Aligned() const {
    return Aligned(table, 4 * sizeof(T)) && Aligned(s0, 4 * sizeof(S)) &&
           Aligned(s1, 4 * sizeof(S));
  }
  template <int VEC, int CPL>
  __device__ __forceinline__ void Store(int64_t, uint32_t key, int64_t dim,
                                        int64_t c_first, int tpb, int64_t cols,
                                        float (&g)[CPL][VEC]) const {
    Rule r = rule;
    r.Bind(hparams);
    Rounding rd = rounding;
    rd.Bind(hparams + Rule::kHparams);
    const uint32_t row_key = rd.RowKey(key);
    const uint32_t a_key = rd.SlotKey(row_key, 0);
    const uint32_t b_key = rd.SlotKey(row_key, 1);
    const int64_t base = static_cast<int64_t>(key) * dim;
    float w[CPL][VEC], a[CPL][VEC] = {}, b[CPL][VEC] = {};
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t c = c_first + static_cast<int64_t>(k) * tpb;
      if (c >= cols) continue;
      LoadFMutable<T, VEC>(table + base + c * VEC, w[k]);
      if (Rule::kSlots > 0) LoadFMutable<S, VEC>(s0 + base + c * VEC, a[k]);
      if (Rule::kSlots > 1) LoadFMutable<S, VEC>(s1 + base + c * VEC, b[k]);
    }
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t c = c_first + static_cast<int64_t>(k) * tpb;
      if (c >= cols) continue;
#pragma unroll
      for (int i = 0; i < VEC; ++i) r(w[k][i], a[k][i], b[k][i], g[k][i]);
      StoreRounded<T, VEC>(table + base + c * VEC, w[k], rd, row_key, c * VEC);
      if (Rule::kSlots > 0)
        StoreRounded<S, VEC>(s0 + base + c * VEC, a[k], rd, a_key, c * VEC);
      if (Rule::kSlots > 1)
        StoreRounded<S, VEC>(s1 + base + c * VEC, b[k], rd, b_key, c * VEC);
    }
  }

 private:
  static bool Aligned(const void* p, size_t bytes) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
  }
};

// The fused backward's sink for row-wise Adagrad (a kWholeRow sink: the
// kernels hand it the row's sum of g^2 before any of its columns): RowScale
// updates row `key`'s accumulator once, on the group's lane 0, and shares the
// step's scale with the group by a shuffle (no lane reads the accumulator
// after it is written); Store applies the step to the lane's chunks of the
// row in place. Each run names a distinct row, so no atomics. acc has
// storage type S (slot 0's words, column 0).
template <typename T, typename S, typename Rounding>
struct RowwiseUpdateSink : cuda::ValidRunsSink {
  static constexpr bool kWholeRow = true;
  RowwiseAdagradRule rule;
  Rounding rounding;
  const float* hparams;
  T* table;
  S* acc;

  RowwiseUpdateSink(RowwiseAdagradRule r, Rounding rd, const float* hp, T* t,
                    S* a)
      : rule(r), rounding(rd), hparams(hp), table(t), acc(a) {}
  bool Aligned() const {
    return reinterpret_cast<uintptr_t>(table) % (4 * sizeof(T)) == 0;
  }
  __device__ __forceinline__ float RowScale(uint32_t key, int64_t dim,
                                            float sum_sq, int lane,
                                            unsigned mask, int tpb) const {
    float a[1] = {0.f};
    if (lane == 0) {
      Rounding rd = rounding;
      rd.Bind(hparams + RowwiseAdagradRule::kHparams);
      LoadFMutable<S, 1>(acc + key, a);
      a[0] = rule.Accumulate(a[0], sum_sq, dim);
      StoreRounded<S, 1>(acc + key, a, rd, rd.SlotKey(rd.RowKey(key), 0), 0);
    }
    a[0] = __shfl_sync(mask, a[0], 0, tpb);
    return AdagradScale(a[0], rule.eps);
  }
  template <int VEC, int CPL>
  __device__ __forceinline__ void Store(int64_t, uint32_t key, int64_t dim,
                                        int64_t c_first, int tpb, int64_t cols,
                                        const float (&g)[CPL][VEC],
                                        float scale) const {
    RowwiseAdagradRule r = rule;
    r.Bind(hparams);
    Rounding rd = rounding;
    rd.Bind(hparams + RowwiseAdagradRule::kHparams);
    const uint32_t row_key = rd.RowKey(key);
    const int64_t base = static_cast<int64_t>(key) * dim;
    float w[CPL][VEC];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t c = c_first + static_cast<int64_t>(k) * tpb;
      if (c < cols) LoadFMutable<T, VEC>(table + base + c * VEC, w[k]);
    }
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t c = c_first + static_cast<int64_t>(k) * tpb;
      if (c >= cols) continue;
#pragma unroll
      for (int i = 0; i < VEC; ++i) w[k][i] = r.Step(w[k][i], g[k][i], scale);
      StoreRounded<T, VEC>(table + base + c * VEC, w[k], rd, row_key, c * VEC);
    }
  }
};

// Lanes per row: enough to cover D in one pass of VEC-wide accesses, rounded
// up to a power of two, at most a warp.
inline int GroupSize(int64_t dim, int vec) {
  int64_t need = (dim + vec - 1) / vec;
  int g = 1;
  while (g < 32 && g < need) g *= 2;
  return g;
}

constexpr int kBlock = 256;

inline bool Aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Launches the element-wise kernel with the widest access D and the buffers'
// alignment allow.
template <typename T, typename S, typename Rule, typename Rounding>
void LaunchElementwise(cudaStream_t stream, const Rule& rule,
                       const Rounding& rounding, T* table,
                       S* s0, S* s1, int64_t rows, int64_t dim,
                       const int32_t* unique_rows, const float* row_grads,
                       const int32_t* num_unique, int64_t capacity,
                       const float* hparams) {
  if (capacity == 0 || dim == 0) return;
  bool vec4 = dim % 4 == 0 && Aligned(table, 4 * sizeof(T)) &&
              Aligned(s0, 4 * sizeof(S)) && Aligned(s1, 4 * sizeof(S)) &&
              Aligned(row_grads, 16);
  int vec = vec4 ? 4 : 1;
  int group = GroupSize(dim, vec);
  int64_t threads = capacity * group;
  unsigned blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  if (vec4)
    ElementwiseUpdateKernel<T, S, 4, Rule, Rounding><<<blocks, kBlock, 0, stream>>>(
        rule, rounding, table, s0, s1, rows, dim, unique_rows, row_grads, num_unique,
        capacity, hparams, group);
  else
    ElementwiseUpdateKernel<T, S, 1, Rule, Rounding><<<blocks, kBlock, 0, stream>>>(
        rule, rounding, table, s0, s1, rows, dim, unique_rows, row_grads, num_unique,
        capacity, hparams, group);
}

template <typename T, typename S, typename Rounding>
void LaunchRowwiseAdagrad(cudaStream_t stream, const RowwiseAdagradRule& rule,
                          const Rounding& rounding, T* table, S* acc, int64_t rows, int64_t dim,
                          const int32_t* unique_rows, const float* row_grads,
                          const int32_t* num_unique, int64_t capacity,
                          const float* hparams) {
  if (capacity == 0 || dim == 0) return;
  bool vec4 = dim % 4 == 0 && Aligned(table, 4 * sizeof(T)) &&
              Aligned(row_grads, 16);
  int vec = vec4 ? 4 : 1;
  int group = GroupSize(dim, vec);
  int64_t threads = capacity * group;
  unsigned blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  if (vec4)
    RowwiseAdagradKernel<T, S, 4, Rounding><<<blocks, kBlock, 0, stream>>>(
        rule, rounding, table, acc, rows, dim, unique_rows, row_grads, num_unique,
        capacity, hparams, group);
  else
    RowwiseAdagradKernel<T, S, 1, Rounding><<<blocks, kBlock, 0, stream>>>(
        rule, rounding, table, acc, rows, dim, unique_rows, row_grads, num_unique,
        capacity, hparams, group);
}

}  // namespace optim
}  // namespace sok
