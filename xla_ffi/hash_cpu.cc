// CPU handler of the hash find-or-insert target. Same target, arguments,
// checks (hash_checks.h) and rule (hash_math.h) as hash_cuda.cu: here the
// steps of the rule run one after another, with the per-bucket routines the
// CUDA kernels call. The pure-JAX reference (sok_jax/ops/reference.py)
// computes the same function.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu_types.h"
#include "hash_checks.h"
#include "hash_math.h"
#include "signatures.h"

namespace sok {
namespace {

// A distinct new key of the batch: where its positions are in the sorted
// misses, its first position, home bucket and admission.
struct NewKey {
  int64_t begin, end;  // its positions: misses[begin, end)
  int64_t first;
  int32_t home;
  int32_t est;  // initial count (its sketch estimate under admission)
  bool admitted;
  int32_t row = -1;
};

template <typename K>
void Place(HashCall<K>& c, NewKey& nk, int32_t row, K evicted, int32_t step) {
  c.slots[row] = c.keys[nk.first];
  if (c.scores) {
    c.last_seen[row] = step;
    c.count[row] = nk.est;
  }
  c.is_new[nk.first] = 1;
  c.evicted[nk.first] = evicted;
  nk.row = row;
}

template <typename K>
void FindOrInsert(HashCall<K>& c) {
  const K empty = EmptyKey<K>();
  const int32_t step = c.step[0];
  const bool evicting = c.policy != kNoEviction;
  // 1. Every key looked up; found keys stamped once.
  std::vector<int64_t> misses;
  for (int64_t i = 0; i < c.n; ++i) {
    const K k = c.keys[i];
    c.is_new[i] = 0;
    c.evicted[i] = empty;
    c.rows[i] = -1;
    if (k == empty) {
      c.status[i] = kPadding;
      continue;
    }
    const int32_t r = FindRow(c.slots, c.capacity, c.nb, k, evicting);
    if (r >= 0) {
      c.rows[i] = r;
      c.status[i] = kFound;
      if (c.insert && c.scores) StampSeen(c.last_seen, c.count, r, step);
    } else {
      c.status[i] = c.insert ? kFull : kMissing;
      if (c.insert) misses.push_back(i);
    }
  }
  if (!c.insert || misses.empty()) return;
  // 2. The new keys in claim order (OrderWord), each key's positions ascending.
  std::sort(misses.begin(), misses.end(), [&](int64_t a, int64_t b) {
    const auto oa = OrderWord(c.keys[a]), ob = OrderWord(c.keys[b]);
    return oa != ob ? oa < ob : a < b;
  });
  std::vector<NewKey> fresh;
  for (int64_t j = 0; j < static_cast<int64_t>(misses.size());) {
    NewKey nk;
    nk.begin = j;
    nk.first = misses[j];
    const K k = c.keys[nk.first];
    while (j < static_cast<int64_t>(misses.size()) && c.keys[misses[j]] == k) ++j;
    nk.end = j;
    nk.home = HomeBucket(k, c.nb);
    nk.est = 1;
    nk.admitted = true;
    fresh.push_back(nk);
  }
  // 3. Admission: every new key counted once, then estimated.
  if (c.admit_after > 0) {
    for (const NewKey& nk : fresh) {
      for (int32_t h = 0; h < c.sketch_depth; ++h)
        ++c.sketch[SketchCell(c.keys[nk.first], h, c.sketch_width)];
    }
    for (NewKey& nk : fresh) {
      nk.est = SketchEstimate(c.sketch, c.sketch_depth, c.sketch_width, c.keys[nk.first]);
      nk.admitted = nk.est >= c.admit_after;
    }
  }
  // 4. Per home bucket (contiguous in claim order): free slots, then evictions.
  std::vector<NewKey*> leftover;
  for (size_t g = 0; g < fresh.size();) {
    const int32_t b = fresh[g].home;
    BucketPlacer<K> placer;
    placer.Init(c.slots, c.last_seen, c.capacity, c.nb, b, step, evicting);
    for (; g < fresh.size() && fresh[g].home == b; ++g) {
      NewKey& nk = fresh[g];
      if (!nk.admitted) continue;
      K ev;
      const int32_t r = placer.Take(c.slots, c.last_seen, c.count, c.policy, &ev);
      if (r >= 0) {
        Place(c, nk, r, ev, step);
      } else if (!evicting) {
        leftover.push_back(&nk);
      }
    }
  }
  // 5. Without eviction, the leftovers in claim order go to later buckets.
  for (NewKey* nk : leftover) {
    const int32_t r = FirstFreeAfter(c.slots, c.capacity, c.nb, nk->home);
    if (r >= 0) Place(c, *nk, r, empty, step);
  }
  // Every position of a new key: its row, or why it has none.
  for (const NewKey& nk : fresh) {
    const int32_t st = nk.row >= 0 ? kInserted : (nk.admitted ? kFull : kNotAdmitted);
    for (int64_t j = nk.begin; j < nk.end; ++j) {
      c.rows[misses[j]] = nk.row;
      c.status[misses[j]] = st;
    }
  }
}

ffi::Error FindOrInsertImpl(
    ffi::AnyBuffer slot_keys, ffi::Buffer<ffi::S32> last_seen, ffi::Buffer<ffi::S32> count,
    ffi::Buffer<ffi::S32> sketch, ffi::AnyBuffer keys, ffi::Buffer<ffi::S32> step,
    ffi::Result<ffi::AnyBuffer> slot_keys_out, ffi::Result<ffi::Buffer<ffi::S32>> last_seen_out,
    ffi::Result<ffi::Buffer<ffi::S32>> count_out, ffi::Result<ffi::Buffer<ffi::S32>> sketch_out,
    ffi::Result<ffi::Buffer<ffi::S32>> rows, ffi::Result<ffi::Buffer<ffi::S32>> is_new,
    ffi::Result<ffi::AnyBuffer> evicted, ffi::Result<ffi::Buffer<ffi::S32>> status,
    ffi::Result<ffi::AnyBuffer> /*workspace*/, int32_t insert, int32_t policy,
    int32_t admit_after, int32_t sketch_depth) {
  return WithHashTable(slot_keys, last_seen, count, sketch, keys, step, slot_keys_out,
                       last_seen_out, count_out, sketch_out, rows, is_new, evicted, status,
                       insert, policy, admit_after, sketch_depth, HostCopy{}, [&](auto& c) {
                         FindOrInsert(c);
                         return ffi::Error::Success();
                       });
}

}  // namespace

SOK_HASH_TARGETS(SOK_CPU_HANDLER)

void AppendHashTargetsCpu(TargetList& out) {
  out.insert(out.end(), {SOK_HASH_TARGETS(SOK_CPU_TARGET)});
}

}  // namespace sok
