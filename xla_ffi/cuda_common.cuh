// Shared by the CUDA handlers: the device type of each table storage tag and
// the one end-of-handler launch check. No kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace sok {

template <typename Tag>
struct DevType;
template <>
struct DevType<F32Tag> {
  using type = float;
};
template <>
struct DevType<BF16Tag> {
  using type = __nv_bfloat16;
};
template <>
struct DevType<F16Tag> {
  using type = __half;
};

// The CUDA handlers' binding: XLA's stream as context, then the target's
// signature (signatures.h).
inline auto CudaBind() {
  return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>();
}

// The CUDA expansions of a family's target table (signatures.h), as
// common.h SOK_CPU_HANDLER / SOK_CPU_TARGET: handlers `<stem>Cuda`.
#define SOK_CUDA_HANDLER(name, stem, impl, signature) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(stem##Cuda, impl, sig::signature(CudaBind()));
#define SOK_CUDA_TARGET(name, stem, impl, signature) \
  Target{name, reinterpret_cast<void*>(stem##Cuda)},

// The last launch error on this thread, as an FFI Internal error.
inline ffi::Error LastError(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return Internal(std::string(what) + ": " + cudaGetErrorString(e));
  return ffi::Error::Success();
}

// Makes `out` hold `in` on the stream (a no-op when XLA aliased them, the
// normal case for the in-place updates).
inline void CopyIfDistinct(cudaStream_t stream, const void* in, void* out,
                           size_t bytes) {
  if (in != out && bytes)
    cudaMemcpyAsync(out, in, bytes, cudaMemcpyDeviceToDevice, stream);
}

// CopyIfDistinct on one stream, as the copy(in, out, bytes) the shared
// handler bodies take (embed_checks.h, optim_checks.h, hash_checks.h).
struct StreamCopy {
  cudaStream_t stream;
  void operator()(const void* in, void* out, size_t bytes) const {
    CopyIfDistinct(stream, in, out, bytes);
  }
};

// A workspace output buffer (sized by the Python wrapper, planned by XLA with
// the program's other buffers) carved into pieces: `needed` bytes of them
// plus up to 256 for aligning its start.
inline ffi::Error CheckWorkspace(const char* what, size_t have, size_t needed) {
  if (have < needed + 256)
    return InvalidArgument(std::string(what) + ": workspace of " + std::to_string(have) +
                           " bytes, needs " + std::to_string(needed + 256));
  return ffi::Error::Success();
}

// Bump allocator over one workspace block: its start aligned up to 256
// bytes, every piece 256-byte aligned.
struct Carver {
  explicit Carver(void* block)
      : base(reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(block) + 255) &
                                     ~uintptr_t{255})) {}
  char* base;
  size_t used = 0;
  template <typename P>
  P* Take(size_t count) {
    used = (used + 255) & ~size_t{255};
    P* p = reinterpret_cast<P*>(base + used);
    used += count * sizeof(P);
    return p;
  }
};

}  // namespace sok
