// CUDA handler of the hash find-or-insert target. Same target, arguments,
// checks (hash_checks.h) and rule (hash_math.h) as hash_cpu.cc, with the
// same result bit for bit: find only is one kernel; insertion is the rule's
// steps as kernels (hash_kernels.cuh) around a stable cub partition and
// radix sort, all on XLA's stream, with their scratch carved out of the
// workspace output (sok_jax.ops.hash_ops.workspace_bytes sizes it). Nothing
// is read back to the host.
#include <cub/cub.cuh>

#include <algorithm>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda_common.cuh"
#include "hash_checks.h"
#include "hash_kernels.cuh"
#include "signatures.h"

namespace sok {
namespace {

template <typename K>
ffi::Error Insert(cudaStream_t stream, HashCall<K>& c, ffi::AnyBuffer& workspace) {
  using namespace hash_kernels;
  using O = typename OrderType<K>::type;
  const int64_t n = c.n;
  const int ni = static_cast<int>(n);
  // cub's temporaries: the partition and the sort run one after the other.
  size_t part_bytes = 0, sort_bytes = 0;
  cub::DoubleBuffer<O> okeys(nullptr, nullptr);
  cub::DoubleBuffer<int32_t> ovals(nullptr, nullptr);
  cub::DevicePartition::Flagged(nullptr, part_bytes, (const int32_t*)nullptr,
                                (const int32_t*)nullptr, (int32_t*)nullptr,
                                (int32_t*)nullptr, ni, stream);
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, okeys, ovals, ni, 0,
                                  static_cast<int>(8 * sizeof(O)), stream);
  const size_t cub_bytes = std::max(part_bytes, sort_bytes);
  const size_t total = 8 * 256 + n * (3 * sizeof(int32_t) + 2 * sizeof(O)) + 2 * sizeof(int32_t) +
                       cub_bytes;
  if (auto e = CheckWorkspace("sok_hash_find_or_insert", workspace.size_bytes(), total);
      e.failure())
    return e;
  Carver cv(workspace.untyped_data());
  int32_t* miss = cv.Take<int32_t>(n);
  int32_t* part = cv.Take<int32_t>(n);
  int32_t* vals_alt = cv.Take<int32_t>(n);
  O* order = cv.Take<O>(n);
  O* order_alt = cv.Take<O>(n);
  int32_t* flags = cv.Take<int32_t>(2);  // [number of misses, any leftover]
  void* cub_tmp = cv.Take<char>(cub_bytes);
  int32_t* num_miss = flags;
  int32_t* any_leftover = flags + 1;

  const bool evicting = c.policy != kNoEviction;
  const unsigned grid = GridFor(n);
  cudaMemsetAsync(flags, 0, 2 * sizeof(int32_t), stream);
  // 1. Lookup, stamps, miss flags.
  FindKernel<K><<<grid, kBlock, 0, stream>>>(c.slots, c.capacity, c.nb, evicting, c.keys, n, 1,
                                             c.last_seen, c.count, c.step, c.rows, c.is_new,
                                             c.evicted, c.status, miss, vals_alt);
  // 2. The misses in position order, then sorted (stably) by order word.
  size_t bytes = part_bytes;
  cub::DevicePartition::Flagged(cub_tmp, bytes, static_cast<const int32_t*>(vals_alt),
                                static_cast<const int32_t*>(miss), part, num_miss, ni, stream);
  OrderKeysKernel<K><<<grid, kBlock, 0, stream>>>(c.keys, part, num_miss, n, order);
  okeys = cub::DoubleBuffer<O>(order, order_alt);
  ovals = cub::DoubleBuffer<int32_t>(part, vals_alt);
  bytes = sort_bytes;
  cub::DeviceRadixSort::SortPairs(cub_tmp, bytes, okeys, ovals, ni, 0,
                                  static_cast<int>(8 * sizeof(O)), stream);
  const O* sorted = okeys.Current();
  const int32_t* pos = ovals.Current();

  PlaceArgs<K> a;
  a.slots = c.slots;
  a.cap = c.capacity;
  a.nb = c.nb;
  a.last_seen = c.last_seen;
  a.count = c.count;
  a.sketch = c.admit_after > 0 ? c.sketch : nullptr;
  a.depth = c.sketch_depth;
  a.width = c.sketch_width;
  a.admit_after = c.admit_after;
  a.policy = c.policy;
  a.keys = c.keys;
  a.step = c.step;
  a.rows = c.rows;
  a.is_new = c.is_new;
  a.evicted = c.evicted;
  a.status = c.status;
  // 3. Admission counts.
  if (a.sketch)
    SketchAddKernel<K><<<grid, kBlock, 0, stream>>>(c.keys, sorted, pos, num_miss, c.sketch,
                                                    c.sketch_depth, c.sketch_width);
  // 4. Per bucket; 5. leftovers (no eviction).
  BucketKernel<K><<<grid, kBlock, 0, stream>>>(a, sorted, pos, num_miss, any_leftover);
  if (!evicting)
    OverflowKernel<K><<<1, kOverflowBlock, 0, stream>>>(a, sorted, pos, num_miss, any_leftover);
  FinishKernel<K><<<grid, kBlock, 0, stream>>>(a, pos, num_miss);
  return ffi::Error::Success();
}

ffi::Error FindOrInsertImpl(
    cudaStream_t stream, ffi::AnyBuffer slot_keys, ffi::Buffer<ffi::S32> last_seen,
    ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::S32> sketch, ffi::AnyBuffer keys,
    ffi::Buffer<ffi::S32> step, ffi::Result<ffi::AnyBuffer> slot_keys_out,
    ffi::Result<ffi::Buffer<ffi::S32>> last_seen_out, ffi::Result<ffi::Buffer<ffi::S32>> count_out,
    ffi::Result<ffi::Buffer<ffi::S32>> sketch_out, ffi::Result<ffi::Buffer<ffi::S32>> rows,
    ffi::Result<ffi::Buffer<ffi::S32>> is_new, ffi::Result<ffi::AnyBuffer> evicted,
    ffi::Result<ffi::Buffer<ffi::S32>> status, ffi::Result<ffi::AnyBuffer> workspace,
    int32_t insert, int32_t policy, int32_t admit_after, int32_t sketch_depth) {
  auto err = WithHashTable(
      slot_keys, last_seen, count, sketch, keys, step, slot_keys_out, last_seen_out, count_out,
      sketch_out, rows, is_new, evicted, status, insert, policy, admit_after, sketch_depth,
      StreamCopy{stream}, [&](auto& c) -> ffi::Error {
        using K = std::remove_pointer_t<decltype(c.slots)>;
        using namespace hash_kernels;
        if (c.n == 0) return ffi::Error::Success();
        if (c.n > INT32_MAX)
          return InvalidArgument("sok_hash_find_or_insert: at most 2^31 - 1 keys per call");
        if (c.insert) return Insert<K>(stream, c, *workspace);
        FindKernel<K><<<GridFor(c.n), kBlock, 0, stream>>>(
            c.slots, c.capacity, c.nb, c.policy != kNoEviction, c.keys, c.n, 0, nullptr,
            nullptr, c.step, c.rows, c.is_new, c.evicted, c.status, nullptr, nullptr);
        return ffi::Error::Success();
      });
  if (err.failure()) return err;
  return LastError("sok_hash_find_or_insert");
}

}  // namespace

SOK_HASH_TARGETS(SOK_CUDA_HANDLER)

void AppendHashTargetsCuda(TargetList& out) {
  out.insert(out.end(), {SOK_HASH_TARGETS(SOK_CUDA_TARGET)});
}

}  // namespace sok
