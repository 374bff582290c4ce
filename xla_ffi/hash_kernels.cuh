// CUDA kernels of the hash find-or-insert target: the rule of hash_math.h in
// parallel steps, each step a kernel (hash_cuda.cu launches them in order on
// one stream). No XLA, no nanobind.
//
// Why the parallel steps compute the rule exactly (the CPU runs it step by
// step; tests compare them bit for bit):
//  * Lookup: the table does not change while FindKernel runs. A found row is
//    stamped by whichever thread swaps last_seen to the step; only that one
//    adds to count, so count grows by one however often a key repeats.
//  * Claim order: the missing positions are compacted in position order
//    (a stable partition), then sorted by OrderWord with a stable radix sort:
//    each key's positions are adjacent, ascending (its first position
//    comes first), and keys follow the claim order, hence by home bucket.
//  * Admission: SketchAddKernel adds one per distinct key (run heads) with
//    integer atomics, whose sum does not depend on their order; estimates
//    are read by later kernels only.
//  * Placement: one thread per bucket (the first sorted miss of the bucket)
//    walks its bucket's keys in claim order with the BucketPlacer the CPU
//    uses. Buckets are disjoint and each has one thread, so no two threads
//    write a slot; leftovers (no eviction) go to one block that serves them
//    in claim order, as the CPU does.
//  * FinishKernel gives every missing position the row its key now has (or
//    why it has none), from the finished table.
#pragma once

#include <climits>
#include <cstdint>

#include "hash_math.h"

namespace sok {
namespace hash_kernels {

constexpr int kBlock = 256;
constexpr int kOverflowBlock = 1024;
// Internal status of a first position whose key step 4 left over (no
// eviction); OverflowKernel and FinishKernel replace it.
constexpr int32_t kPendingOverflow = 100;

template <typename K>
struct OrderType {
  using type = uint32_t;
};
template <>
struct OrderType<int64_t> {
  using type = uint64_t;
};

// Blocks for n items: one thread each, capped (the loops are grid-strided).
inline unsigned int GridFor(int64_t n) {
  int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t kMaxBlocks = int64_t{1} << 20;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

#define SOK_GRID_LOOP(i, n)                                                      \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       i < (n); i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Step 1. Every position: found (stamped when inserting), padding, or a miss
// (flagged, with its index, for the partition when inserting).
template <typename K>
__global__ void __launch_bounds__(kBlock)
    FindKernel(const K* __restrict__ slots, int32_t cap, int32_t nb, bool home_only,
               const K* __restrict__ keys, int64_t n, int32_t insert, int32_t* last_seen,
               int32_t* count, const int32_t* __restrict__ step, int32_t* __restrict__ rows,
               int32_t* __restrict__ is_new, K* __restrict__ evicted,
               int32_t* __restrict__ status, int32_t* __restrict__ miss,
               int32_t* __restrict__ index) {
  const K empty = EmptyKey<K>();
  const int32_t now = insert && last_seen ? *step : 0;
  SOK_GRID_LOOP(i, n) {
    const K k = keys[i];
    int32_t row = -1, st = kPadding, flag = 0;
    if (k != empty) {
      row = FindRow(slots, cap, nb, k, home_only);
      if (row >= 0) {
        st = kFound;
        if (insert && last_seen && atomicExch(last_seen + row, now) != now)
          atomicAdd(count + row, 1);
      } else {
        st = insert ? kFull : kMissing;
        flag = insert;
      }
    }
    rows[i] = row;
    status[i] = st;
    is_new[i] = 0;
    evicted[i] = empty;
    if (miss) {
      miss[i] = flag;
      index[i] = static_cast<int32_t>(i);
    }
  }
}

// Step 2's sort keys: the order word of each compacted miss, the largest
// word past the misses (they sort after every miss: the sort is stable and
// the misses come first).
template <typename K>
__global__ void __launch_bounds__(kBlock)
    OrderKeysKernel(const K* __restrict__ keys, const int32_t* __restrict__ part,
                    const int32_t* __restrict__ num_miss, int64_t n,
                    typename OrderType<K>::type* __restrict__ order) {
  using O = typename OrderType<K>::type;
  const int64_t nm = *num_miss;
  SOK_GRID_LOOP(i, n) { order[i] = i < nm ? OrderWord(keys[part[i]]) : ~O{0}; }
}

template <typename O>
__device__ __forceinline__ int32_t BucketOfOrder(O order, int32_t nb) {
  return BucketOfWord(HashWordOf(order), nb);
}

// Step 3: one count per distinct new key (the first of its sorted run).
template <typename K>
__global__ void __launch_bounds__(kBlock)
    SketchAddKernel(const K* __restrict__ keys, const typename OrderType<K>::type* __restrict__ order,
                    const int32_t* __restrict__ pos, const int32_t* __restrict__ num_miss,
                    int32_t* sketch, int32_t depth, int32_t width) {
  const int64_t nm = *num_miss;
  SOK_GRID_LOOP(i, nm) {
    if (i > 0 && order[i - 1] == order[i]) continue;
    const K key = keys[pos[i]];
    for (int32_t h = 0; h < depth; ++h) atomicAdd(sketch + SketchCell(key, h, width), 1);
  }
}

// The arrays every placement step reads or writes.
template <typename K>
struct PlaceArgs {
  K* slots;
  int32_t cap, nb;
  int32_t* last_seen;  // null without scores
  int32_t* count;
  const int32_t* sketch;  // null without admission
  int32_t depth, width, admit_after;
  int32_t policy;
  const K* keys;
  const int32_t* step;
  int32_t* rows;
  int32_t* is_new;
  K* evicted;
  int32_t* status;
};

template <typename K>
__device__ __forceinline__ void PlaceKey(const PlaceArgs<K>& a, int32_t first, int32_t row,
                                         int32_t est, K evicted, int32_t now) {
  a.slots[row] = a.keys[first];
  if (a.last_seen) {
    a.last_seen[row] = now;
    a.count[row] = est;
  }
  a.is_new[first] = 1;
  a.evicted[first] = evicted;
  a.rows[first] = row;
  a.status[first] = kInserted;
}

// Step 4: the thread of the first sorted miss of each bucket serves the
// bucket's new keys (its run heads) in claim order.
template <typename K>
__global__ void __launch_bounds__(kBlock)
    BucketKernel(PlaceArgs<K> a, const typename OrderType<K>::type* __restrict__ order,
                 const int32_t* __restrict__ pos, const int32_t* __restrict__ num_miss,
                 int32_t* any_leftover) {
  const int64_t nm = *num_miss;
  const int32_t now = *a.step;
  const bool evicting = a.policy != kNoEviction;
  SOK_GRID_LOOP(i, nm) {
    const int32_t b = BucketOfOrder(order[i], a.nb);
    if (i > 0 && BucketOfOrder(order[i - 1], a.nb) == b) continue;
    BucketPlacer<K> placer;
    placer.Init(a.slots, a.last_seen, a.cap, a.nb, b, now, evicting);
    bool left = false;
    for (int64_t j = i; j < nm && BucketOfOrder(order[j], a.nb) == b;) {
      int64_t e = j + 1;
      while (e < nm && order[e] == order[j]) ++e;
      const int32_t first = pos[j];
      const K key = a.keys[first];
      const int32_t est = a.sketch ? SketchEstimate(a.sketch, a.depth, a.width, key) : 1;
      if (!a.sketch || est >= a.admit_after) {
        K ev;
        const int32_t r = placer.Take(a.slots, a.last_seen, a.count, a.policy, &ev);
        if (r >= 0) {
          PlaceKey(a, first, r, est, ev, now);
        } else if (!evicting) {
          a.status[first] = kPendingOverflow;
          left = true;
        }
      }
      j = e;
    }
    if (left) atomicExch(any_leftover, 1);
  }
}

// Step 5 (no eviction): one block serves the leftovers in claim order; for
// each, its threads check the following buckets a window at a time, and the
// nearest with an EMPTY slot (FirstFreeAfter's choice) takes the key.
template <typename K>
__global__ void __launch_bounds__(kOverflowBlock)
    OverflowKernel(PlaceArgs<K> a, const typename OrderType<K>::type* __restrict__ order,
                   const int32_t* __restrict__ pos, const int32_t* __restrict__ num_miss,
                   const int32_t* any_leftover) {
  if (*any_leftover == 0) return;
  const K empty = EmptyKey<K>();
  const int64_t nm = *num_miss;
  const int32_t now = *a.step;
  __shared__ int32_t flagged[kOverflowBlock];
  __shared__ int32_t nearest;
  for (int64_t base = 0; base < nm; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int32_t flag = i < nm && (i == 0 || order[i - 1] != order[i]) &&
                         a.status[pos[i]] == kPendingOverflow;
    flagged[threadIdx.x] = flag;
    if (!__syncthreads_or(flag)) continue;
    for (int t = 0; t < static_cast<int>(blockDim.x); ++t) {
      if (!flagged[t]) continue;  // the same for every thread (shared)
      const int64_t j = base + t;
      const int32_t first = pos[j];
      const int32_t home = BucketOfOrder(order[j], a.nb);
      int32_t slot = -1;
      for (int64_t d0 = 1; d0 < a.nb && slot < 0; d0 += blockDim.x) {
        if (threadIdx.x == 0) nearest = INT_MAX;
        __syncthreads();
        const int64_t d = d0 + threadIdx.x;
        if (d < a.nb) {
          const int32_t b = static_cast<int32_t>((home + d) % a.nb);
          const int32_t hi = BucketStart(b + 1, a.cap, a.nb);
          for (int32_t s = BucketStart(b, a.cap, a.nb); s < hi; ++s)
            if (a.slots[s] == empty) {
              atomicMin(&nearest, static_cast<int32_t>(d));
              break;
            }
        }
        __syncthreads();
        if (nearest != INT_MAX) {
          const int32_t b = static_cast<int32_t>((home + nearest) % a.nb);
          const int32_t hi = BucketStart(b + 1, a.cap, a.nb);
          for (int32_t s = BucketStart(b, a.cap, a.nb); s < hi; ++s)
            if (a.slots[s] == empty) {
              slot = s;
              break;
            }
        }
        __syncthreads();  // every thread has read `nearest` and the bucket
      }
      if (threadIdx.x == 0) {
        if (slot >= 0) {
          PlaceKey(a, first, slot, a.sketch ? SketchEstimate(a.sketch, a.depth, a.width,
                                                             a.keys[first])
                                            : 1,
                   empty, now);
        } else {
          a.status[first] = kFull;
        }
      }
      __syncthreads();  // the placed key is visible to the next search
    }
    __syncthreads();  // every thread is done with `flagged` before it is refilled
  }
}

// Every missing position: the row its key has now, or why it has none.
template <typename K>
__global__ void __launch_bounds__(kBlock)
    FinishKernel(PlaceArgs<K> a, const int32_t* __restrict__ pos,
                 const int32_t* __restrict__ num_miss) {
  const int64_t nm = *num_miss;
  const bool home_only = a.policy != kNoEviction;
  SOK_GRID_LOOP(i, nm) {
    const int32_t p = pos[i];
    const K key = a.keys[p];
    int32_t row = -1, st;
    if (a.sketch && SketchEstimate(a.sketch, a.depth, a.width, key) < a.admit_after) {
      st = kNotAdmitted;
    } else {
      row = FindRow(a.slots, a.cap, a.nb, key, home_only);
      st = row >= 0 ? kInserted : kFull;
    }
    a.rows[p] = row;
    a.status[p] = st;
  }
}

#undef SOK_GRID_LOOP

}  // namespace hash_kernels
}  // namespace sok
