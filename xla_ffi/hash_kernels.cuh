// CUDA kernels of the hash find-or-insert target: one thread per query key,
// linear probing from StartSlot (hash_math.h). No XLA, no nanobind.
//
// Insertion is lock-free: a thread that meets an EMPTY slot claims it with one
// atomicCAS. Because a slot only ever goes EMPTY -> key, a plain (possibly
// stale) load can only be wrong by showing EMPTY, and the CAS then returns
// the true content; so two threads inserting the same key walk the same
// probe sequence and meet at one slot, and exactly one of them wins it.
#pragma once

#include <cstdint>

#include "hash_math.h"

namespace sok {
namespace hash_kernels {

constexpr int kBlock = 256;

// The word atomicCAS works on for a key type.
template <typename K>
struct CasWord {
  using type = unsigned int;
};
template <>
struct CasWord<int64_t> {
  using type = unsigned long long;
};

// Compare-and-swap of a key slot; returns the slot's previous content.
template <typename K>
__device__ __forceinline__ K CasKey(K* addr, K expected, K desired) {
  using W = typename CasWord<K>::type;
  static_assert(sizeof(W) == sizeof(K), "key and CAS word differ in size");
  W old = atomicCAS(reinterpret_cast<W*>(addr), static_cast<W>(expected),
                    static_cast<W>(desired));
  return static_cast<K>(old);
}

// Find only: the table is read-only for the whole kernel, so slots are read
// through the read-only cache.
template <typename K>
__global__ void __launch_bounds__(kBlock)
    FindKernel(const K* __restrict__ slots, int32_t cap,
               const K* __restrict__ keys, int64_t n, int32_t* __restrict__ rows,
               int32_t* __restrict__ is_new) {
  const K empty = EmptyKey<K>();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const K k = keys[i];
    int32_t row = -1;
    if (k != empty) {
      int32_t s = StartSlot(k, cap);
      for (int32_t p = 0; p < cap; ++p) {
        const K cur = __ldg(slots + s);
        if (cur == k) {
          row = s;
          break;
        }
        if (cur == empty) break;
        s = NextSlot(s, cap);
      }
    }
    rows[i] = row;
    is_new[i] = 0;
  }
}

// Find or insert. Positions that meet a full table add to *num_failed (one
// atomicAdd per warp).
template <typename K>
__global__ void __launch_bounds__(kBlock)
    InsertKernel(K* slots, int32_t cap, const K* __restrict__ keys, int64_t n,
                 int32_t* __restrict__ rows, int32_t* __restrict__ is_new,
                 int32_t* num_failed) {
  const K empty = EmptyKey<K>();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int32_t failed = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    const K k = keys[i];
    int32_t row = -1, fresh = 0;
    if (k != empty) {
      int32_t s = StartSlot(k, cap);
      for (int32_t p = 0; p < cap; ++p) {
        K cur = slots[s];
        if (cur == empty) {
          cur = CasKey(slots + s, empty, k);
          if (cur == empty) {  // this thread claimed the slot
            row = s;
            fresh = 1;
            break;
          }
        }
        if (cur == k) {  // already there, or inserted by another thread
          row = s;
          break;
        }
        s = NextSlot(s, cap);
      }
      if (row < 0) ++failed;  // probed all `cap` slots: full
    }
    rows[i] = row;
    is_new[i] = fresh;
  }
  // Every lane of the warp reaches here (no early return; kBlock % 32 == 0).
  for (int off = 16; off > 0; off >>= 1)
    failed += __shfl_down_sync(0xffffffffu, failed, off);
  if ((threadIdx.x & 31) == 0 && failed != 0) atomicAdd(num_failed, failed);
}

// Blocks for n keys: one thread per key, capped (the loops are grid-strided).
inline unsigned int GridFor(int64_t n) {
  int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t kMaxBlocks = int64_t{1} << 20;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

}  // namespace hash_kernels
}  // namespace sok
