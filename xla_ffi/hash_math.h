// The hash-table rules shared by the CPU and CUDA find-or-insert kernels (and
// re-implemented bit for bit in sok_jax/ops/hash_ops.py): the EMPTY sentinel,
// the hash of a key, its start slot and the linear probe step. No XLA, no
// nanobind.
//
// A table of `capacity` slots holds one key per slot; the row of a key is its
// slot index. Slots only ever go from EMPTY to a key (no deletion), which is
// what makes lock-free insertion with one compare-and-swap per slot correct.
#pragma once

#include <cstdint>

#include "embed_math.h"  // SOK_HD

namespace sok {

// EMPTY: -1 for int32/int64, 0xFFFFFFFF for uint32. It is also the padding
// ("no key") value of a query, so padding is never inserted nor found.
template <typename K>
SOK_HD K EmptyKey() {
  return static_cast<K>(-1);
}

// murmur3's 32-bit finalizer: a bijection on uint32 with full avalanche.
SOK_HD uint32_t Fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// splitmix64's finalizer: a bijection on uint64 with full avalanche.
SOK_HD uint64_t Mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ull;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebull;
  z ^= z >> 31;
  return z;
}

// A 32-bit hash word per key: fmix32 of the 32-bit pattern for 32-bit keys,
// the high half of splitmix64 of the 64-bit pattern for int64 keys.
SOK_HD uint32_t HashWord(int32_t key) {
  return Fmix32(static_cast<uint32_t>(key));
}
SOK_HD uint32_t HashWord(uint32_t key) { return Fmix32(key); }
SOK_HD uint32_t HashWord(int64_t key) {
  return static_cast<uint32_t>(Mix64(static_cast<uint64_t>(key)) >> 32);
}

// First slot probed for `key`; capacity lies in [1, 2^31).
template <typename K>
SOK_HD int32_t StartSlot(K key, int32_t capacity) {
  return static_cast<int32_t>(HashWord(key) % static_cast<uint32_t>(capacity));
}

// Linear probing: the slot after `s`, wrapping at the end of the table.
SOK_HD int32_t NextSlot(int32_t s, int32_t capacity) {
  ++s;
  return s == capacity ? 0 : s;
}

}  // namespace sok
