// Kernels of the row movers: one warp per listed row copies its bytes between
// two row-major tables, in words of type W (16, 4 or 1 bytes: the widest that
// divides the row and both base addresses). Either table may live in pinned
// host memory: the warp's loads or stores then cross the host link, which is
// how a host-resident table's rows reach the device cache and go back.
// No XLA or nanobind headers.
#pragma once

#include <cstdint>

namespace sok {
namespace rows_kernels {

constexpr int kWarpsPerBlock = 8;
constexpr int kBlock = 32 * kWarpsPerBlock;

// out[i] = src[rows[i]], zeros where rows[i] is outside [0, table_rows).
template <typename W>
__global__ void __launch_bounds__(kBlock)
GatherKernel(const W* __restrict__ src, int64_t table_rows, const int32_t* __restrict__ rows,
             int64_t k, int64_t row_words, W* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5); i < k; i += warps) {
    const int32_t r = rows[i];
    W* to = out + i * row_words;
    if (r >= 0 && r < table_rows) {
      const W* from = src + static_cast<int64_t>(r) * row_words;
      for (int64_t w = lane; w < row_words; w += 32) to[w] = from[w];
    } else {
      for (int64_t w = lane; w < row_words; w += 32) to[w] = W{};
    }
  }
}

// dst[rows[i]] = values[i] where rows[i] is in [0, table_rows); the listed
// rows in range are distinct.
template <typename W>
__global__ void __launch_bounds__(kBlock)
ScatterKernel(W* __restrict__ dst, int64_t table_rows, const int32_t* __restrict__ rows,
              int64_t k, int64_t row_words, const W* __restrict__ values) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t i = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5); i < k; i += warps) {
    const int32_t r = rows[i];
    if (r < 0 || r >= table_rows) continue;
    W* to = dst + static_cast<int64_t>(r) * row_words;
    const W* from = values + i * row_words;
    for (int64_t w = lane; w < row_words; w += 32) to[w] = from[w];
  }
}

// dst[dst_rows[i]] = src[src_rows[i]] for i < min(k, *count) where both
// name a row; the dst rows in range are distinct. Warps past the count
// read no index, so a long list of mostly padding costs little.
template <typename W>
__global__ void __launch_bounds__(kBlock)
CopyKernel(W* __restrict__ dst, int64_t dst_table_rows, const int32_t* __restrict__ dst_rows,
           const W* __restrict__ src, int64_t src_table_rows, const int32_t* __restrict__ src_rows,
           const int32_t* __restrict__ count, int64_t k, int64_t row_words) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t n = min(k, static_cast<int64_t>(max(*count, 0)));
  for (int64_t i = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5); i < n; i += warps) {
    const int32_t d = dst_rows[i], r = src_rows[i];
    if (d < 0 || d >= dst_table_rows || r < 0 || r >= src_table_rows) continue;
    W* to = dst + static_cast<int64_t>(d) * row_words;
    const W* from = src + static_cast<int64_t>(r) * row_words;
    for (int64_t w = lane; w < row_words; w += 32) to[w] = from[w];
  }
}

// Blocks for k rows: one warp per row, at most `cap` blocks (the warps
// stride over the rest).
inline unsigned int RowsGrid(int64_t k, int64_t cap = 65536) {
  int64_t blocks = (k + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

}  // namespace rows_kernels
}  // namespace sok
