// Vectorized element access shared by the CUDA kernels: float math on
// float / bfloat16 / half storage, VEC consecutive elements moved as one
// 16-byte (or narrower) access. No XLA, no nanobind.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sok {
namespace cuda {

// ---------------------------------------------------------------------------
// Element access: float storage or half storage, float math.
__device__ __forceinline__ float Ld(float v) { return v; }
__device__ __forceinline__ float Ld(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float Ld(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T St(float v);
template <>
__device__ __forceinline__ float St<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 St<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half St<__half>(float v) { return __float2half_rn(v); }

// VEC elements of T moved as one access: 16 bytes on the fast path (VEC =
// 16 / sizeof(T)), one element on the scalar path.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// __ldg has no overload for our Pack types; load them through an int4 /
// int2 / int of the same size.
template <typename P>
__device__ __forceinline__ P LdgPack(const P* p) {
  if constexpr (sizeof(P) == 16) {
    int4 r = __ldg(reinterpret_cast<const int4*>(p));
    return *reinterpret_cast<P*>(&r);
  } else if constexpr (sizeof(P) == 8) {
    int2 r = __ldg(reinterpret_cast<const int2*>(p));
    return *reinterpret_cast<P*>(&r);
  } else if constexpr (sizeof(P) == 4) {
    int r = __ldg(reinterpret_cast<const int*>(p));
    return *reinterpret_cast<P*>(&r);
  } else {
    return *p;
  }
}

// Loads of data the kernel only reads go through the read-only cache.
template <typename T, int VEC>
__device__ __forceinline__ void LoadF(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pk = LdgPack(reinterpret_cast<const Pack<T, VEC>*>(p));
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = Ld(pk.v[i]);
}

// Plain loads, for data the same kernel also writes (in-place updates).
template <typename T, int VEC>
__device__ __forceinline__ void LoadFMutable(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = Ld(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void StoreF(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = St<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// The Begin of the backward's sinks (embed_kernels.cuh ReduceRuns) that
// only need the run to name a real row; such a sink stores each pass of a
// row as it is summed unless it says otherwise (kWholeRow).
struct ValidRunsSink {
  static constexpr bool kWholeRow = false;
  template <int VEC>
  __device__ __forceinline__ bool Begin(int64_t u, int64_t valid, uint32_t,
                                        int, int, int64_t, int64_t) const {
    return u < valid;
  }
};

}  // namespace cuda
}  // namespace sok
