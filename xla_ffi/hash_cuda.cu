// CUDA handler of the hash find-or-insert target. Same target, arguments and
// probe rule as hash_cpu.cc. With insert=1, keys new to the table race for
// slots, so which free slot a new key gets may vary run to run; every key
// still gets exactly one row and exactly one position reports is_new=1.
#include <cuda_runtime.h>

#include <string>

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
  int32_t cap;
  int64_t n;
  if (auto e = CheckHashArgs(slot_keys, keys, *slot_keys_out,
                             rows->element_count(), is_new->element_count(),
                             num_failed->element_count(), insert, &cap, &n);
      e.failure())
    return e;
  auto err = DispatchKey(slot_keys.element_type(), "slot_keys", [&](auto key) {
    using K = decltype(key);
    using namespace hash_kernels;
    K* slots = slot_keys_out->reinterpret_data<K>();
    // Aliased by input_output_aliases, so normally the same buffer.
    if (slots != slot_keys.reinterpret_data<K>())
      cudaMemcpyAsync(slots, slot_keys.reinterpret_data<K>(), cap * sizeof(K),
                      cudaMemcpyDeviceToDevice, stream);
    int32_t* failed = num_failed->typed_data();
    cudaMemsetAsync(failed, 0, sizeof(int32_t), stream);
    if (n > 0) {
      const K* k = keys.reinterpret_data<K>();
      if (insert)
        InsertKernel<K><<<GridFor(n), kBlock, 0, stream>>>(
            slots, cap, k, n, rows->typed_data(), is_new->typed_data(), failed);
      else
        FindKernel<K><<<GridFor(n), kBlock, 0, stream>>>(
            slots, cap, k, n, rows->typed_data(), is_new->typed_data());
    }
    return ffi::Error::Success();
  });
  if (err.failure()) return err;
  cudaError_t last = cudaGetLastError();
  if (last != cudaSuccess)
    return Internal(std::string("sok_hash_find_or_insert: ") +
                    cudaGetErrorString(last));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SokHashFindOrInsertCuda, FindOrInsertImpl,
                              sig::HashFindOrInsert(CudaBind()));

void AppendHashTargetsCuda(TargetList& out) {
  out.push_back({"sok_hash_find_or_insert",
                 reinterpret_cast<void*>(SokHashFindOrInsertCuda)});
}

}  // namespace sok
