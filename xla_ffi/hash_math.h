// The hash-table rules shared by the CPU and CUDA find-or-insert handlers (and
// re-implemented in sok_jax/ops/reference.py): the EMPTY sentinel, the hash
// of a key, the bucket layout, the claim order of new keys, the admission
// sketch, and the per-bucket routines both platforms call, so that they
// compute the same function. No XLA, no nanobind.
//
// A shard of `capacity` rows is an array of slots, one key per slot; the row
// of a key is its slot index. The slots are cut into NumBuckets(capacity)
// buckets of at most kBucketSlots consecutive slots (sizes differ by at most
// one). A key's home bucket is picked by its hash word.
//
// Insertion rule of one call (insert=1), for the distinct keys of the batch
// (xla_ffi/hash_cpu.cc runs it step by step; hash_cuda.cu in parallel):
//  1. every key is looked up (FindRow); found keys keep their row, and with
//     scores their row is stamped with the call's step once (last_seen = step,
//     count += 1);
//  2. the new keys are ordered by OrderWord (a bijection of the key, whose
//     leading bits are the hash word: the order groups them by home bucket);
//  3. admission (admit_after > 0): each new key adds one to its sketch cells;
//     then a key is admitted when its estimate (the least of its cells) is at
//     least admit_after; the others get no row;
//  4. per home bucket, independently, its admitted new keys in claim order
//     take its EMPTY slots in ascending slot order (BucketPlacer); with an
//     eviction policy, the next ones take the bucket's rows not seen in this
//     call in ascending (score, key) order, score = last_seen (LRU) or count
//     (LFU); the rest fail;
//  5. without eviction, the keys step 4 left over, in claim order, one after
//     another take the lowest EMPTY slot of the first bucket after their home
//     bucket that has one (FirstFreeAfter); the rest fail.
// A key placed in this call gets is_new at its first position, last_seen =
// step and count = 1 (its sketch estimate under admission).
//
// Without eviction, slots only go EMPTY -> key and every bucket fills from
// its first slot, so a search may stop at the first EMPTY slot, and follows
// full buckets onward. With eviction a key lives in its home bucket only, and
// a row may be freed (sok_jax's maintenance call), so a search reads the
// whole home bucket.
#pragma once

#include <cstdint>

#include "embed_math.h"  // SOK_HD

namespace sok {

// Eviction policy of a table (the `policy` attribute).
enum HashPolicy : int32_t { kNoEviction = 0, kEvictLru = 1, kEvictLfu = 2 };

// Per-position outcome of a call (the `status` result).
enum HashStatus : int32_t {
  kFound = 0,        // the key had a row
  kInserted = 1,     // the key got a row in this call
  kMissing = 2,      // find only: the key has no row
  kFull = 3,         // insert: no free or evictable row for the key
  kNotAdmitted = 4,  // insert: the key has not been seen in enough batches
  kPadding = 5,      // no key
};

constexpr int32_t kBucketSlots = 16;
constexpr int32_t kMaxSketchDepth = 8;

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

// The claim order of new keys: a bijection of the key's bits onto an
// unsigned word of its width (fmix32 for 32-bit keys, splitmix64's finalizer
// for int64 keys). Distinct keys have distinct words.
SOK_HD uint32_t OrderWord(int32_t key) {
  return Fmix32(static_cast<uint32_t>(key));
}
SOK_HD uint32_t OrderWord(uint32_t key) { return Fmix32(key); }
SOK_HD uint64_t OrderWord(int64_t key) {
  return Mix64(static_cast<uint64_t>(key));
}

// The 32-bit hash word of a key: the leading 32 bits of its order word.
SOK_HD uint32_t HashWordOf(uint32_t order) { return order; }
SOK_HD uint32_t HashWordOf(uint64_t order) {
  return static_cast<uint32_t>(order >> 32);
}
template <typename K>
SOK_HD uint32_t HashWord(K key) {
  return HashWordOf(OrderWord(key));
}

// Buckets of a shard of `capacity` slots, capacity in [1, 2^31).
SOK_HD int32_t NumBuckets(int32_t capacity) {
  return static_cast<int32_t>(
      (static_cast<int64_t>(capacity) + kBucketSlots - 1) / kBucketSlots);
}

// First slot of bucket b (b == nb gives capacity, the end of the last one).
SOK_HD int32_t BucketStart(int32_t b, int32_t capacity, int32_t nb) {
  return static_cast<int32_t>(static_cast<int64_t>(b) * capacity / nb);
}

// The bucket of a hash word: its position in [0, nb) scaled from [0, 2^32)
// (monotone in the word, so ordering by OrderWord orders by bucket).
SOK_HD int32_t BucketOfWord(uint32_t word, int32_t nb) {
  return static_cast<int32_t>((static_cast<uint64_t>(word) * nb) >> 32);
}

template <typename K>
SOK_HD int32_t HomeBucket(K key, int32_t nb) {
  return BucketOfWord(HashWord(key), nb);
}

SOK_HD int32_t NextBucket(int32_t b, int32_t nb) {
  return b + 1 == nb ? 0 : b + 1;
}

// The row of `key`, or -1. `home_only` (tables with eviction): read the
// whole home bucket and stop. Otherwise stop at the first EMPTY slot, and
// go on to the next bucket while the buckets are full.
template <typename K>
SOK_HD int32_t FindRow(const K* slots, int32_t capacity, int32_t nb, K key,
                       bool home_only) {
  const K empty = EmptyKey<K>();
  int32_t b = HomeBucket(key, nb);
  for (int32_t t = 0; t < nb; ++t) {
    const int32_t lo = BucketStart(b, capacity, nb);
    const int32_t hi = BucketStart(b + 1, capacity, nb);
    bool open = false;
    for (int32_t s = lo; s < hi; ++s) {
      const K cur = slots[s];
      if (cur == key) return s;
      if (cur == empty) {
        open = true;
        if (!home_only) break;
      }
    }
    if (home_only || open) return -1;
    b = NextBucket(b, nb);
  }
  return -1;
}

// Step 1 for a found key: stamp its row once per call. Returns whether this
// call stamped it (so count grows by one however often the key repeats).
SOK_HD bool StampSeen(int32_t* last_seen, int32_t* count, int32_t row,
                      int32_t step) {
  if (last_seen[row] == step) return false;
  last_seen[row] = step;
  ++count[row];
  return true;
}

// The per-bucket step 4: reads one bucket, then hands out its rows to the
// bucket's new keys in claim order (Take). One bucket is served by one
// caller (a CPU loop, or one CUDA thread), so no two callers touch it.
template <typename K>
struct BucketPlacer {
  int32_t lo = 0;
  int32_t free_slot[kBucketSlots];
  int32_t nfree = 0;
  int32_t next_free = 0;
  uint32_t evictable = 0;  // bit j: slot lo + j holds a key not seen this call

  SOK_HD void Init(const K* slots, const int32_t* last_seen, int32_t capacity,
                   int32_t nb, int32_t b, int32_t step, bool evicting) {
    const K empty = EmptyKey<K>();
    lo = BucketStart(b, capacity, nb);
    const int32_t hi = BucketStart(b + 1, capacity, nb);
    nfree = next_free = 0;
    evictable = 0;
    for (int32_t s = lo; s < hi; ++s) {
      if (slots[s] == empty) {
        free_slot[nfree++] = s;
      } else if (evicting && last_seen[s] != step) {
        evictable |= 1u << (s - lo);
      }
    }
  }

  // The row of the next new key: a free slot, else (evicting) the lowest
  // (score, key) row not seen this call, whose key goes to *evicted; -1 when
  // none is left. The caller writes the key and its scores.
  SOK_HD int32_t Take(const K* slots, const int32_t* last_seen,
                      const int32_t* count, int32_t policy, K* evicted) {
    *evicted = EmptyKey<K>();
    if (next_free < nfree) return free_slot[next_free++];
    if (policy == kNoEviction || evictable == 0) return -1;
    const int32_t* score = policy == kEvictLru ? last_seen : count;
    int32_t best = -1;
    for (uint32_t m = evictable; m != 0; m &= m - 1) {
      int32_t j = 0;
      while (!((m >> j) & 1u)) ++j;
      const int32_t s = lo + j;
      if (best < 0 || score[s] < score[best] ||
          (score[s] == score[best] && slots[s] < slots[best]))
        best = s;
    }
    evictable &= ~(1u << (best - lo));
    *evicted = slots[best];
    return best;
  }
};

// Step 5: the lowest EMPTY slot of the first bucket after `home` (wrapping,
// at most nb - 1 buckets) that has one, or -1.
template <typename K>
SOK_HD int32_t FirstFreeAfter(const K* slots, int32_t capacity, int32_t nb,
                              int32_t home) {
  const K empty = EmptyKey<K>();
  int32_t b = home;
  for (int32_t t = 1; t < nb; ++t) {
    b = NextBucket(b, nb);
    const int32_t hi = BucketStart(b + 1, capacity, nb);
    for (int32_t s = BucketStart(b, capacity, nb); s < hi; ++s)
      if (slots[s] == empty) return s;
  }
  return -1;
}

// ------------------------------------------------------------ admission
// A count-min sketch of `depth` rows of `width` int32 counters: row h of a
// key is counter h * width + (its row-h hash scaled to [0, width)). Its
// estimate (the least of its counters) never undercounts: with w = width,
// d = depth and N increments in all, it overcounts by more than e N / w with
// probability at most exp(-d). 32-bit keys hash with 32-bit arithmetic only.
SOK_HD uint32_t SketchHash(uint32_t order, int32_t h) {
  return Fmix32(order + static_cast<uint32_t>(h + 1) * 0x9e3779b9u);
}
SOK_HD uint32_t SketchHash(uint64_t order, int32_t h) {
  return static_cast<uint32_t>(
      Mix64(order + static_cast<uint64_t>(h + 1) * 0x9e3779b97f4a7c15ull) >> 32);
}

template <typename K>
SOK_HD int32_t SketchCell(K key, int32_t h, int32_t width) {
  return h * width + BucketOfWord(SketchHash(OrderWord(key), h), width);
}

template <typename K>
SOK_HD int32_t SketchEstimate(const int32_t* sketch, int32_t depth, int32_t width, K key) {
  int32_t est = sketch[SketchCell(key, 0, width)];
  for (int32_t h = 1; h < depth; ++h) {
    const int32_t c = sketch[SketchCell(key, h, width)];
    est = c < est ? c : est;
  }
  return est;
}

}  // namespace sok
