// Shared aliases, dtype dispatch and target-list plumbing for every sok_jax
// FFI handler. Handlers include this; kernels (*.cuh, *_kernels.h) do not.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace sok {

// One FFI target: its registered name and the handler symbol.
struct Target {
  const char* name;
  void* handler;
};
using TargetList = std::vector<Target>;

// Each op family appends its handlers for one platform to a list that the
// nanobind module turns into the `registrations()` dict.
void AppendEmbedTargetsCpu(TargetList& out);
void AppendOptimTargetsCpu(TargetList& out);
void AppendHashTargetsCpu(TargetList& out);
void AppendRowsTargetsCpu(TargetList& out);
void AppendQuantTargetsCpu(TargetList& out);
#ifdef SOK_WITH_CUDA
void AppendEmbedTargetsCuda(TargetList& out);
void AppendOptimTargetsCuda(TargetList& out);
void AppendHashTargetsCuda(TargetList& out);
void AppendRowsTargetsCuda(TargetList& out);
void AppendQuantTargetsCuda(TargetList& out);
#endif

// The CPU expansions of a family's target table (signatures.h): at namespace
// scope, SOK_<FAMILY>_TARGETS(SOK_CPU_HANDLER) defines every handler
// `<stem>Cpu`; inside an initializer list, SOK_<FAMILY>_TARGETS(SOK_CPU_TARGET)
// gives their Target entries.
#define SOK_CPU_HANDLER(name, stem, impl, signature)  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(stem##Cpu, impl,       \
                                sig::signature(ffi::Ffi::Bind()));
#define SOK_CPU_TARGET(name, stem, impl, signature) \
  Target{name, reinterpret_cast<void*>(stem##Cpu)},

inline ffi::Error InvalidArgument(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, msg);
}

inline ffi::Error Internal(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInternal, msg);
}

// Storage tags for the floating types a table may hold. The kernels map them
// onto their platform's native half types.
struct F32Tag {};
struct BF16Tag {};
struct F16Tag {};

// Calls fn(Tag{}) for the table dtype; InvalidArgument for anything else.
template <typename Fn>
ffi::Error DispatchFloat(ffi::DataType dt, const char* what, Fn&& fn) {
  switch (dt) {
    case ffi::DataType::F32:
      return fn(F32Tag{});
    case ffi::DataType::BF16:
      return fn(BF16Tag{});
    case ffi::DataType::F16:
      return fn(F16Tag{});
    default:
      return InvalidArgument(std::string(what) +
                             ": unsupported dtype, expected float32, "
                             "bfloat16 or float16");
  }
}

// Calls fn(key_type{}) for the id dtype; InvalidArgument for anything else.
template <typename Fn>
ffi::Error DispatchKey(ffi::DataType dt, const char* what, Fn&& fn) {
  switch (dt) {
    case ffi::DataType::S32:
      return fn(int32_t{});
    case ffi::DataType::U32:
      return fn(uint32_t{});
    case ffi::DataType::S64:
      return fn(int64_t{});
    default:
      return InvalidArgument(std::string(what) +
                             ": unsupported dtype, expected int32, uint32 "
                             "or int64");
  }
}

// Rows and columns of a rank-2 buffer, checked.
inline ffi::Error Rank2(const ffi::AnyBuffer& b, const char* what, int64_t* rows,
                        int64_t* cols) {
  auto dims = b.dimensions();
  if (dims.size() != 2) {
    return InvalidArgument(std::string(what) + " must be rank 2, got rank " +
                           std::to_string(dims.size()));
  }
  *rows = dims[0];
  *cols = dims[1];
  return ffi::Error::Success();
}

}  // namespace sok
