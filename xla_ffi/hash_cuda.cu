// CUDA handler of the hash find-or-insert target. Same target, arguments,
// checks (hash_checks.h) and probe rule (hash_math.h) as hash_cpu.cc. With
// insert=1, keys new to the table race for slots, so which free slot a new
// key gets may vary run to run; every key still gets exactly one row and
// exactly one position reports is_new=1.
#include <cuda_runtime.h>

#include <type_traits>

#include "common.h"
#include "cuda_common.cuh"
#include "hash_checks.h"
#include "hash_kernels.cuh"
#include "signatures.h"

namespace sok {
namespace {

ffi::Error FindOrInsertImpl(cudaStream_t stream, ffi::AnyBuffer slot_keys,
                            ffi::AnyBuffer keys,
                            ffi::Result<ffi::AnyBuffer> slot_keys_out,
                            ffi::Result<ffi::Buffer<ffi::S32>> rows,
                            ffi::Result<ffi::Buffer<ffi::S32>> is_new,
                            ffi::Result<ffi::Buffer<ffi::S32>> num_failed,
                            int32_t insert) {
  auto err = WithHashTable(
      slot_keys, keys, slot_keys_out, rows, is_new, num_failed, insert,
      StreamCopy{stream},
      [&](auto* slots, const auto* k, int32_t cap, int64_t n) {
        using K = std::remove_const_t<std::remove_pointer_t<decltype(k)>>;
        using namespace hash_kernels;
        int32_t* failed = num_failed->typed_data();
        cudaMemsetAsync(failed, 0, sizeof(int32_t), stream);
        if (n == 0) return ffi::Error::Success();
        if (insert)
          InsertKernel<K><<<GridFor(n), kBlock, 0, stream>>>(
              slots, cap, k, n, rows->typed_data(), is_new->typed_data(),
              failed);
        else
          FindKernel<K><<<GridFor(n), kBlock, 0, stream>>>(
              slots, cap, k, n, rows->typed_data(), is_new->typed_data());
        return ffi::Error::Success();
      });
  if (err.failure()) return err;
  return LastError("sok_hash_find_or_insert");
}

}  // namespace

SOK_HASH_TARGETS(SOK_CUDA_HANDLER)

void AppendHashTargetsCuda(TargetList& out) {
  out.insert(out.end(), {SOK_HASH_TARGETS(SOK_CUDA_TARGET)});
}

}  // namespace sok
