// CPU handler of the hash find-or-insert target. Same target, arguments,
// checks (hash_checks.h) and probe rule (hash_math.h) as hash_cuda.cu; here
// keys are processed one after another in position order, so the result is
// deterministic (the pure-JAX reference in sok_jax/ops/hash_ops.py
// reproduces it exactly).
#include <cstdint>

#include "common.h"
#include "cpu_types.h"
#include "hash_checks.h"
#include "hash_math.h"
#include "signatures.h"

namespace sok {
namespace {

// Finds (and with `insert`, inserts) each key in turn; returns the number of
// non-padding positions that found no free slot in a full table.
template <typename K>
int32_t FindOrInsert(K* slots, int32_t cap, const K* keys, int64_t n,
                     bool insert, int32_t* rows, int32_t* is_new) {
  const K empty = EmptyKey<K>();
  int32_t failed = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K k = keys[i];
    int32_t row = -1, fresh = 0;
    bool full = k != empty;  // stays true only if every slot holds another key
    if (k != empty) {
      int32_t s = StartSlot(k, cap);
      for (int32_t p = 0; p < cap; ++p, s = NextSlot(s, cap)) {
        const K cur = slots[s];
        if (cur == k) {
          row = s;
          full = false;
          break;
        }
        if (cur == empty) {
          if (insert) {
            slots[s] = k;
            row = s;
            fresh = 1;
          }
          full = false;
          break;
        }
      }
    }
    if (full && insert) ++failed;
    rows[i] = row;
    is_new[i] = fresh;
  }
  return failed;
}

ffi::Error FindOrInsertImpl(ffi::AnyBuffer slot_keys, ffi::AnyBuffer keys,
                            ffi::Result<ffi::AnyBuffer> slot_keys_out,
                            ffi::Result<ffi::Buffer<ffi::S32>> rows,
                            ffi::Result<ffi::Buffer<ffi::S32>> is_new,
                            ffi::Result<ffi::Buffer<ffi::S32>> num_failed,
                            int32_t insert) {
  return WithHashTable(
      slot_keys, keys, slot_keys_out, rows, is_new, num_failed, insert,
      HostCopy{}, [&](auto* slots, const auto* k, int32_t cap, int64_t n) {
        num_failed->typed_data()[0] =
            FindOrInsert(slots, cap, k, n, insert != 0, rows->typed_data(),
                         is_new->typed_data());
        return ffi::Error::Success();
      });
}

}  // namespace

SOK_HASH_TARGETS(SOK_CPU_HANDLER)

void AppendHashTargetsCpu(TargetList& out) {
  out.insert(out.end(), {SOK_HASH_TARGETS(SOK_CPU_TARGET)});
}

}  // namespace sok
