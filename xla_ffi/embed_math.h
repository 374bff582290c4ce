// Scalar rules shared by the CPU and CUDA kernels, so both paths compute the
// same function: which ids are valid rows, and how a combiner scales a bag.
// No XLA, no nanobind.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SOK_HD __host__ __device__ __forceinline__
#else
#define SOK_HD inline
#endif

namespace sok {

enum Combiner : int32_t { kSum = 0, kMean = 1, kSqrtn = 2 };

// An id names a row when it lies in [0, num_rows). Padding (-1, or
// 0xFFFFFFFF for uint32) and out-of-range ids give -1 and are skipped.
template <typename K>
SOK_HD int64_t RowOf(K key, int64_t num_rows) {
  int64_t k = static_cast<int64_t>(key);  // uint32 zero-extends
  return (k >= 0 && k < num_rows) ? k : -1;
}

// The factor that multiplies the weighted sum of a bag's rows, given the
// sum of its valid weights and the sum of their squares (TF's rules; an
// empty or zero-weight bag gives 0, so its output is zeros).
SOK_HD float CombinerScale(int32_t combiner, float wsum, float w2sum) {
  if (combiner == kMean) return wsum != 0.f ? 1.f / wsum : 0.f;
  if (combiner == kSqrtn) return w2sum > 0.f ? 1.f / sqrtf(w2sum) : 0.f;
  return 1.f;
}

// d out_b / d w_j contracted with the output cotangent g_b, given
//   gdot_j = <g_b, e_j>  and  s = sum_i w_i gdot_i  over the bag's valid keys.
//   sum:   gdot_j
//   mean:  (gdot_j - s / W) / W                 (W = sum w)
//   sqrtn: gdot_j / r - s * w_j / r^3           (r = sqrt(sum w^2))
SOK_HD float WeightGrad(int32_t combiner, float gdot, float w, float s,
                        float wsum, float w2sum) {
  if (combiner == kMean) {
    if (wsum == 0.f) return 0.f;
    return (gdot - s / wsum) / wsum;
  }
  if (combiner == kSqrtn) {
    if (!(w2sum > 0.f)) return 0.f;
    float r = sqrtf(w2sum);
    return gdot / r - s * w / (w2sum * r);
  }
  return gdot;
}

}  // namespace sok
