// Buffer checks shared by the CPU and CUDA embedding handlers: the bag
// layout (ids, offsets, weights) and the combiner.
#pragma once

#include <cstdint>

#include "common.h"
#include "embed_math.h"

namespace sok {

inline ffi::Error CheckBags(const ffi::AnyBuffer& ids,
                            const ffi::AnyBuffer& offsets,
                            const ffi::AnyBuffer& weights, int32_t combiner,
                            int64_t* n, int64_t* m) {
  if (ids.dimensions().size() != 1)
    return InvalidArgument("ids must be rank 1 (flattened)");
  if (offsets.dimensions().size() != 1 || offsets.element_count() < 1 ||
      offsets.element_type() != ffi::DataType::S32)
    return InvalidArgument("offsets must be int32 [num_bags + 1]");
  if (weights.element_type() != ffi::DataType::F32)
    return InvalidArgument("weights must be float32");
  *n = ids.element_count();
  *m = offsets.element_count() - 1;
  if (*n >= INT32_MAX) return InvalidArgument("at most 2^31 - 1 ids per call");
  if (weights.element_count() != 0 && weights.element_count() != *n)
    return InvalidArgument("weights must have as many entries as ids, or none");
  if (combiner < kSum || combiner > kSqrtn)
    return InvalidArgument("combiner must be 0 (sum), 1 (mean) or 2 (sqrtn)");
  return ffi::Error::Success();
}

// fixed_nnz > 0 says bag b holds positions [b * fixed_nnz, (b + 1) * fixed_nnz)
// (offsets are then not read); it must tile the ids exactly.
inline ffi::Error CheckFixedNnz(int64_t fixed_nnz, int64_t n, int64_t m) {
  if (fixed_nnz < 0) return InvalidArgument("fixed_nnz must be >= 0");
  if (fixed_nnz > 0 && n != m * fixed_nnz)
    return InvalidArgument("fixed_nnz > 0 needs len(ids) == num_bags * fixed_nnz");
  return ffi::Error::Success();
}

}  // namespace sok
