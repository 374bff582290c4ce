// CUDA kernel of the int8 inference lookup (quant_math.h row format). No
// XLA, no nanobind: quant_cuda.cu validates buffers and launches it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "embed_math.h"
#include "quant_math.h"

// Not embed_kernels.cuh: it defines non-template kernels, which a second
// translation unit of the module may not define again.
namespace sok {
namespace cuda {

// Bag b's positions [lo, hi): its offsets clamped to the ids, the float
// lookup's rule (embed_cpu.cc BagRange).
__device__ __forceinline__ void QuantBagRange(const int32_t* off, int64_t b, int64_t n,
                                              int64_t* lo, int64_t* hi) {
  const int64_t a = off[b] < 0 ? 0 : (off[b] > n ? n : off[b]);
  *lo = a;
  *hi = off[b + 1] < a ? a : (off[b + 1] > n ? n : off[b + 1]);
}

// VEC consecutive codes of one row (VEC = 4: one 4-byte load, which needs
// the row and chunk start 4-byte aligned; the handler checks).
template <int VEC>
__device__ __forceinline__ void LoadCodes(const uint8_t* __restrict__ p,
                                          float (&v)[VEC]) {
  if constexpr (VEC == 4) {
    const uchar4 c = *reinterpret_cast<const uchar4*>(p);
    v[0] = c.x;
    v[1] = c.y;
    v[2] = c.z;
    v[3] = c.w;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = p[i];
  }
}

// A group of `tpb` lanes per bag; lane l owns the column chunks l, l + tpb,
// ... of VEC codes. Every lane walks the bag's positions in order (so each
// output element is summed in position order, as on the CPU: no atomics,
// deterministic), dequantizes its chunk of each valid row and accumulates
// w * value; then scales by the combiner's factor of the bag's valid
// weights, which every lane sums itself over the same positions.
// fixed_nnz > 0: bag b is [b * fixed_nnz, (b + 1) * fixed_nnz), offsets unread.
template <typename K, int VEC>
__global__ void __launch_bounds__(256)
    QuantFwdKernel(const uint8_t* __restrict__ q,
                   const float* __restrict__ scale_bias, int64_t rows,
                   int64_t dim, const K* __restrict__ ids,
                   const int32_t* __restrict__ off, const float* __restrict__ w,
                   int64_t n, int64_t m, int64_t fixed_nnz, int32_t combiner,
                   int tpb, float* __restrict__ out) {
  const int lane = threadIdx.x & (tpb - 1);
  const int64_t bag = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / tpb;
  if (bag >= m) return;
  int64_t lo = bag * fixed_nnz, hi = lo + fixed_nnz;
  if (fixed_nnz == 0) QuantBagRange(off, bag, n, &lo, &hi);
  float ws = 0.f, w2 = 0.f;
  for (int64_t j = lo; j < hi; ++j) {
    if (RowOf(ids[j], rows) < 0) continue;
    const float wj = w ? w[j] : 1.f;
    ws += wj;
    w2 += wj * wj;
  }
  const float f = CombinerScale(combiner, ws, w2);
  const int64_t chunks = dim / VEC;
  for (int64_t c = lane; c < chunks; c += tpb) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t r = RowOf(ids[j], rows);
      if (r < 0) continue;
      const float wj = w ? w[j] : 1.f;
      const float scale = scale_bias[2 * r], bias = scale_bias[2 * r + 1];
      float v[VEC];
      LoadCodes<VEC>(q + r * dim + c * VEC, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += wj * (v[i] * scale + bias);
    }
    float* o = out + bag * dim + c * VEC;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = acc[i] * f;
  }
}

}  // namespace cuda
}  // namespace sok
