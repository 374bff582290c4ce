// Argument checks shared by the CPU and CUDA hash find-or-insert handlers,
// and the part of their body that is the same on both platforms.
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace sok {

// Shapes, dtypes and the insert flag; sets *capacity and *n.
inline ffi::Error CheckHashArgs(const ffi::AnyBuffer& slot_keys,
                                const ffi::AnyBuffer& keys,
                                const ffi::AnyBuffer& slot_keys_out,
                                size_t rows_count, size_t is_new_count,
                                size_t num_failed_count, int32_t insert,
                                int32_t* capacity, int64_t* n) {
  if (slot_keys.dimensions().size() != 1)
    return InvalidArgument("slot_keys must be rank 1 [capacity]");
  if (keys.dimensions().size() != 1)
    return InvalidArgument("keys must be rank 1 [N]");
  if (keys.element_type() != slot_keys.element_type())
    return InvalidArgument("keys must have the dtype of slot_keys");
  int64_t cap = slot_keys.element_count();
  if (cap < 1 || cap > INT32_MAX)
    return InvalidArgument("capacity (len(slot_keys)) must lie in [1, 2^31), got " +
                           std::to_string(cap));
  *capacity = static_cast<int32_t>(cap);
  *n = keys.element_count();
  if (slot_keys_out.element_type() != slot_keys.element_type() ||
      slot_keys_out.element_count() != static_cast<size_t>(cap))
    return InvalidArgument("slot_keys_out must match slot_keys");
  if (rows_count != static_cast<size_t>(*n) ||
      is_new_count != static_cast<size_t>(*n))
    return InvalidArgument("rows and is_new must be [N]");
  if (num_failed_count != 1)
    return InvalidArgument("num_failed must be [1]");
  if (insert != 0 && insert != 1)
    return InvalidArgument("insert must be 0 (find only) or 1 (insert)");
  return ffi::Error::Success();
}

// The find-or-insert target up to its platform's kernel: the arguments
// checked (CheckHashArgs), the key dtype dispatched (K), slot_keys_out made
// to hold slot_keys by copy(in, out, bytes) (a no-op when XLA aliased them,
// the normal case), then body(slots, keys, capacity, n) with the output
// table as K* and the query keys as const K*.
template <typename Copy, typename Body>
ffi::Error WithHashTable(const ffi::AnyBuffer& slot_keys,
                         const ffi::AnyBuffer& keys,
                         ffi::Result<ffi::AnyBuffer>& slot_keys_out,
                         ffi::Result<ffi::Buffer<ffi::S32>>& rows,
                         ffi::Result<ffi::Buffer<ffi::S32>>& is_new,
                         ffi::Result<ffi::Buffer<ffi::S32>>& num_failed,
                         int32_t insert, Copy&& copy, Body&& body) {
  int32_t cap;
  int64_t n;
  if (auto e = CheckHashArgs(slot_keys, keys, *slot_keys_out,
                             rows->element_count(), is_new->element_count(),
                             num_failed->element_count(), insert, &cap, &n);
      e.failure())
    return e;
  return DispatchKey(slot_keys.element_type(), "slot_keys", [&](auto key) {
    using K = decltype(key);
    K* slots = slot_keys_out->reinterpret_data<K>();
    copy(slot_keys.untyped_data(), slots, cap * sizeof(K));
    return body(slots, keys.reinterpret_data<K>(), cap, n);
  });
}

}  // namespace sok
