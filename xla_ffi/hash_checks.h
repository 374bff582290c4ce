// Argument checks shared by the CPU and CUDA hash find-or-insert handlers,
// and the part of their body that is the same on both platforms. Nothing
// here reads a buffer's contents (the CUDA handler never reads the step on
// the host).
#pragma once

#include <cstdint>
#include <string>

#include "common.h"
#include "hash_math.h"

namespace sok {

// One call's buffers, checked, as the platform's pointers: the table and its
// optional scores and sketch (outputs, aliased to the inputs), the query
// keys and the per-position results.
template <typename K>
struct HashCall {
  int32_t capacity = 0;
  int32_t nb = 0;  // NumBuckets(capacity)
  int64_t n = 0;   // query keys
  bool scores = false;
  int32_t sketch_depth = 0;
  int32_t sketch_width = 0;  // 0: no sketch
  int32_t insert = 0;
  int32_t policy = kNoEviction;
  int32_t admit_after = 0;
  K* slots = nullptr;
  int32_t* last_seen = nullptr;  // [capacity] with scores, else null
  int32_t* count = nullptr;
  int32_t* sketch = nullptr;  // [depth * width], or null
  const K* keys = nullptr;
  const int32_t* step = nullptr;  // [1]: the step this call stamps
  int32_t* rows = nullptr;
  int32_t* is_new = nullptr;
  K* evicted = nullptr;
  int32_t* status = nullptr;
};

// Shapes, dtypes and attributes.
inline ffi::Error CheckHashArgs(
    const ffi::AnyBuffer& slot_keys, const ffi::Buffer<ffi::S32>& last_seen,
    const ffi::Buffer<ffi::S32>& count, const ffi::Buffer<ffi::S32>& sketch,
    const ffi::AnyBuffer& keys, const ffi::Buffer<ffi::S32>& step,
    const ffi::AnyBuffer& slot_keys_out, size_t last_seen_out_count,
    size_t count_out_count, size_t sketch_out_count, size_t rows_count,
    size_t is_new_count, const ffi::AnyBuffer& evicted, size_t status_count,
    int32_t insert, int32_t policy, int32_t admit_after, int32_t sketch_depth) {
  if (slot_keys.dimensions().size() != 1)
    return InvalidArgument("slot_keys must be rank 1 [capacity]");
  if (keys.dimensions().size() != 1)
    return InvalidArgument("keys must be rank 1 [N]");
  if (keys.element_type() != slot_keys.element_type())
    return InvalidArgument("keys must have the dtype of slot_keys");
  const int64_t cap = slot_keys.element_count();
  if (cap < 1 || cap > INT32_MAX)
    return InvalidArgument("capacity (len(slot_keys)) must lie in [1, 2^31), got " +
                           std::to_string(cap));
  const size_t n = keys.element_count();
  if (slot_keys_out.element_type() != slot_keys.element_type() ||
      slot_keys_out.element_count() != static_cast<size_t>(cap))
    return InvalidArgument("slot_keys_out must match slot_keys");
  const size_t sc = last_seen.element_count();
  if ((sc != 0 && sc != static_cast<size_t>(cap)) || count.element_count() != sc)
    return InvalidArgument("last_seen and count must both be [capacity] (scores) or [0]");
  if (last_seen_out_count != sc || count_out_count != sc)
    return InvalidArgument("last_seen and count outputs must match their inputs");
  if (sketch_out_count != sketch.element_count())
    return InvalidArgument("sketch_out must match sketch");
  if (rows_count != n || is_new_count != n || status_count != n ||
      evicted.element_count() != n || evicted.element_type() != slot_keys.element_type())
    return InvalidArgument("rows, is_new, status and evicted must be [N] (evicted of the key dtype)");
  if (step.element_count() != 1) return InvalidArgument("step must be [1]");
  if (insert != 0 && insert != 1)
    return InvalidArgument("insert must be 0 (find only) or 1 (insert)");
  if (policy != kNoEviction && policy != kEvictLru && policy != kEvictLfu)
    return InvalidArgument("policy must be 0 (none), 1 (lru) or 2 (lfu), got " +
                           std::to_string(policy));
  if (policy != kNoEviction && sc == 0)
    return InvalidArgument("an eviction policy needs last_seen and count");
  if (admit_after < 0)
    return InvalidArgument("admit_after must be >= 0 (0: admit every key)");
  const size_t sk = sketch.element_count();
  if (admit_after > 0 || sk > 0) {
    if (sketch_depth < 1 || sketch_depth > kMaxSketchDepth)
      return InvalidArgument("sketch_depth must lie in [1, " +
                             std::to_string(kMaxSketchDepth) + "]");
    if (sk == 0 || sk % sketch_depth != 0 || sk / sketch_depth > INT32_MAX)
      return InvalidArgument("admission needs a sketch of sketch_depth * width counters");
  }
  return ffi::Error::Success();
}

// The find-or-insert target up to its platform's kernels: the arguments
// checked (CheckHashArgs), the key dtype dispatched (K), every output made to
// hold its input by copy(in, out, bytes) (a no-op when XLA aliased them, the
// normal case), then body(call) with the platform's pointers.
template <typename Copy, typename Body>
ffi::Error WithHashTable(
    const ffi::AnyBuffer& slot_keys, const ffi::Buffer<ffi::S32>& last_seen,
    const ffi::Buffer<ffi::S32>& count, const ffi::Buffer<ffi::S32>& sketch,
    const ffi::AnyBuffer& keys, const ffi::Buffer<ffi::S32>& step,
    ffi::Result<ffi::AnyBuffer>& slot_keys_out,
    ffi::Result<ffi::Buffer<ffi::S32>>& last_seen_out,
    ffi::Result<ffi::Buffer<ffi::S32>>& count_out,
    ffi::Result<ffi::Buffer<ffi::S32>>& sketch_out,
    ffi::Result<ffi::Buffer<ffi::S32>>& rows,
    ffi::Result<ffi::Buffer<ffi::S32>>& is_new,
    ffi::Result<ffi::AnyBuffer>& evicted,
    ffi::Result<ffi::Buffer<ffi::S32>>& status, int32_t insert, int32_t policy,
    int32_t admit_after, int32_t sketch_depth, Copy&& copy, Body&& body) {
  if (auto e = CheckHashArgs(
          slot_keys, last_seen, count, sketch, keys, step, *slot_keys_out,
          last_seen_out->element_count(), count_out->element_count(),
          sketch_out->element_count(), rows->element_count(),
          is_new->element_count(), *evicted, status->element_count(), insert,
          policy, admit_after, sketch_depth);
      e.failure())
    return e;
  return DispatchKey(slot_keys.element_type(), "slot_keys", [&](auto key) {
    using K = decltype(key);
    HashCall<K> c;
    c.capacity = static_cast<int32_t>(slot_keys.element_count());
    c.nb = NumBuckets(c.capacity);
    c.n = static_cast<int64_t>(keys.element_count());
    c.scores = last_seen.element_count() != 0;
    c.insert = insert;
    c.policy = policy;
    c.admit_after = admit_after;
    c.slots = slot_keys_out->reinterpret_data<K>();
    copy(slot_keys.untyped_data(), c.slots, c.capacity * sizeof(K));
    if (c.scores) {
      c.last_seen = last_seen_out->typed_data();
      c.count = count_out->typed_data();
      copy(last_seen.untyped_data(), c.last_seen, c.capacity * sizeof(int32_t));
      copy(count.untyped_data(), c.count, c.capacity * sizeof(int32_t));
    }
    if (sketch.element_count() != 0) {
      c.sketch_depth = sketch_depth;
      c.sketch_width = static_cast<int32_t>(sketch.element_count() / sketch_depth);
      c.sketch = sketch_out->typed_data();
      copy(sketch.untyped_data(), c.sketch, sketch.element_count() * sizeof(int32_t));
    }
    c.keys = keys.reinterpret_data<K>();
    c.step = step.typed_data();
    c.rows = rows->typed_data();
    c.is_new = is_new->typed_data();
    c.evicted = evicted->reinterpret_data<K>();
    c.status = status->typed_data();
    return body(c);
  });
}

}  // namespace sok
