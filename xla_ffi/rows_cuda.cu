// CUDA handlers of the row movers. Same targets, arguments and checks
// (rows_checks.h) as rows_cpu.cc; the kernels are in rows_kernels.cuh.
#include <cuda/std/cstdint>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common.h"
#include "cuda_common.cuh"
#include "rows_checks.h"
#include "rows_kernels.cuh"
#include "side_stream.cuh"
#include "signatures.h"

namespace sok {
namespace {

// Calls fn(W{}) with the widest word W that divides the row and every base
// address: 16 bytes (uint4), 4 or 1.
template <typename Fn>
void WithWord(int64_t row_bytes, std::initializer_list<const void*> bases, Fn&& fn) {
  uintptr_t align = static_cast<uintptr_t>(row_bytes);
  for (const void* p : bases) align |= reinterpret_cast<uintptr_t>(p);
  if (align % 16 == 0)
    fn(uint4{});
  else if (align % 4 == 0)
    fn(uint32_t{});
  else
    fn(uint8_t{});
}

ffi::Error GatherImpl(cudaStream_t stream, ffi::AnyBuffer src, ffi::Buffer<ffi::S32> rows,
                      ffi::Result<ffi::AnyBuffer> out) {
  RowsShape s;
  if (auto e = CheckGather(src, rows, *out, &s); e.failure()) return e;
  if (s.k == 0 || s.row_bytes == 0) return ffi::Error::Success();
  WithWord(s.row_bytes, {src.untyped_data(), out->untyped_data()}, [&](auto word) {
    using W = decltype(word);
    rows_kernels::GatherKernel<W><<<rows_kernels::RowsGrid(s.k), rows_kernels::kBlock, 0,
                                    stream>>>(
        static_cast<const W*>(src.untyped_data()), s.table_rows, rows.typed_data(), s.k,
        s.row_bytes / static_cast<int64_t>(sizeof(W)), static_cast<W*>(out->untyped_data()));
  });
  return LastError("sok_rows_gather");
}

// The scatter's work (checked shape `s`) queued on `stream`, in at most
// `max_blocks` blocks.
void LaunchScatter(cudaStream_t stream, const RowsShape& s, const ffi::AnyBuffer& dst,
                   const ffi::Buffer<ffi::S32>& rows, const ffi::AnyBuffer& values,
                   ffi::AnyBuffer& dst_out, int64_t max_blocks = 65536) {
  CopyIfDistinct(stream, dst.untyped_data(), dst_out.untyped_data(), dst.size_bytes());
  if (s.k == 0 || s.row_bytes == 0) return;
  WithWord(s.row_bytes, {dst_out.untyped_data(), values.untyped_data()}, [&](auto word) {
    using W = decltype(word);
    rows_kernels::ScatterKernel<W><<<rows_kernels::RowsGrid(s.k, max_blocks),
                                     rows_kernels::kBlock, 0, stream>>>(
        static_cast<W*>(dst_out.untyped_data()), s.table_rows, rows.typed_data(), s.k,
        s.row_bytes / static_cast<int64_t>(sizeof(W)),
        static_cast<const W*>(values.untyped_data()));
  });
}

ffi::Error ScatterImpl(cudaStream_t stream, ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> rows,
                       ffi::AnyBuffer values, ffi::Result<ffi::AnyBuffer> dst_out) {
  RowsShape s;
  if (auto e = CheckScatter(dst, rows, values, *dst_out, &s); e.failure()) return e;
  LaunchScatter(stream, s, dst, rows, values, *dst_out);
  return LastError("sok_rows_scatter");
}

ffi::Error SideError(const char* what, cudaError_t e) {
  return Internal(std::string(what) + ": side stream: " + cudaGetErrorString(e));
}

// Blocks that fill half of the device's SMs' block slots (kBlock threads
// each, at most 2048 threads an SM): a grid no larger is resident at once
// and leaves the other half to the kernels queued on the XLA stream.
int64_t HalfTheSlots() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return std::max<int64_t>(1, int64_t{sms} * (2048 / rows_kernels::kBlock) / 2);
}

// The scatter on the side stream: the XLA stream goes on (a load from the
// same host store, say) while it writes; sok_rows_join waits for it. Its
// grid takes half the block slots, so a kernel queued on the XLA stream
// next runs beside it instead of after its last block.
ffi::Error ScatterAsyncImpl(cudaStream_t stream, ffi::AnyBuffer dst,
                            ffi::Buffer<ffi::S32> rows, ffi::AnyBuffer values,
                            ffi::Result<ffi::AnyBuffer> dst_out) {
  RowsShape s;
  if (auto e = CheckScatter(dst, rows, values, *dst_out, &s); e.failure()) return e;
  cudaStream_t side = nullptr;
  if (cudaError_t e = side_stream::Fork(stream, &side); e != cudaSuccess)
    return SideError("sok_rows_scatter_async", e);
  LaunchScatter(side, s, dst, rows, values, *dst_out, HalfTheSlots());
  if (cudaError_t e = side_stream::Forked(stream); e != cudaSuccess)
    return SideError("sok_rows_scatter_async", e);
  return LastError("sok_rows_scatter_async");
}

ffi::Error JoinImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::RemainingArgs,
                    ffi::Result<ffi::AnyBuffer> x_out) {
  if (x_out->size_bytes() != x.size_bytes()) return InvalidArgument("x_out must match x");
  if (cudaError_t e = side_stream::Join(stream); e != cudaSuccess)
    return SideError("sok_rows_join", e);
  CopyIfDistinct(stream, x.untyped_data(), x_out->untyped_data(), x.size_bytes());
  return LastError("sok_rows_join");
}

// The copy's kernel (checked shape `s`) queued on `stream`, in at most
// `max_blocks` blocks, reading the row lists and count at the pointers given.
void LaunchCopy(cudaStream_t stream, const CopyShape& s, void* dst_out, const int32_t* dst_rows,
                const void* src, const int32_t* src_rows, const int32_t* count,
                int64_t max_blocks = 65536) {
  WithWord(s.dst.row_bytes, {dst_out, src}, [&](auto word) {
    using W = decltype(word);
    rows_kernels::CopyKernel<W><<<rows_kernels::RowsGrid(s.dst.k, max_blocks),
                                  rows_kernels::kBlock, 0, stream>>>(
        static_cast<W*>(dst_out), s.dst.table_rows, dst_rows, static_cast<const W*>(src),
        s.src_rows, src_rows, count, s.dst.k, s.dst.row_bytes / static_cast<int64_t>(sizeof(W)));
  });
}

// A copy's checks, and dst's contents in dst_out where XLA gave it a buffer
// of its own.
ffi::Error StartCopy(cudaStream_t stream, const ffi::AnyBuffer& dst,
                     const ffi::Buffer<ffi::S32>& dst_rows, const ffi::AnyBuffer& src,
                     const ffi::Buffer<ffi::S32>& src_rows, const ffi::Buffer<ffi::S32>& count,
                     ffi::AnyBuffer& dst_out, CopyShape* s) {
  if (auto e = CheckCopy(dst, dst_rows, src, src_rows, count, dst_out, s); e.failure()) return e;
  CopyIfDistinct(stream, dst.untyped_data(), dst_out.untyped_data(), dst.size_bytes());
  return ffi::Error::Success();
}

bool NoRows(const CopyShape& s) { return s.dst.k == 0 || s.dst.row_bytes == 0; }

ffi::Error CopyImpl(cudaStream_t stream, ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> dst_rows,
                    ffi::AnyBuffer src, ffi::Buffer<ffi::S32> src_rows,
                    ffi::Buffer<ffi::S32> count, ffi::Result<ffi::AnyBuffer> dst_out) {
  CopyShape s;
  if (auto e = StartCopy(stream, dst, dst_rows, src, src_rows, count, *dst_out, &s); e.failure())
    return e;
  if (NoRows(s)) return LastError("sok_rows_copy");
  LaunchCopy(stream, s, dst_out->untyped_data(), dst_rows.typed_data(), src.untyped_data(),
             src_rows.typed_data(), count.typed_data());
  return LastError("sok_rows_copy");
}

// The copy on the side stream (sok_rows_join waits for it), in half the
// block slots so that the XLA stream's kernels run beside it. XLA may reuse
// the row lists' and count's buffers once the call returns, so the kernel
// reads copies of them: made on the XLA stream (ordered after their
// producers), freed on the side stream after the kernel.
ffi::Error CopyAsyncImpl(cudaStream_t stream, ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> dst_rows,
                         ffi::AnyBuffer src, ffi::Buffer<ffi::S32> src_rows,
                         ffi::Buffer<ffi::S32> count, ffi::Result<ffi::AnyBuffer> dst_out) {
  CopyShape s;
  if (auto e = StartCopy(stream, dst, dst_rows, src, src_rows, count, *dst_out, &s); e.failure())
    return e;
  if (NoRows(s)) return LastError("sok_rows_copy_async");
  const size_t list = static_cast<size_t>(s.dst.k) * sizeof(int32_t);
  int32_t* own = nullptr;  // dst_rows [k], src_rows [k], count [1]
  if (cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&own), 2 * list + sizeof(int32_t),
                                      stream);
      e != cudaSuccess)
    return SideError("sok_rows_copy_async", e);
  cudaMemcpyAsync(own, dst_rows.typed_data(), list, cudaMemcpyDeviceToDevice, stream);
  cudaMemcpyAsync(own + s.dst.k, src_rows.typed_data(), list, cudaMemcpyDeviceToDevice, stream);
  cudaMemcpyAsync(own + 2 * s.dst.k, count.typed_data(), sizeof(int32_t),
                  cudaMemcpyDeviceToDevice, stream);
  cudaStream_t side = nullptr;
  if (cudaError_t e = side_stream::Fork(stream, &side); e != cudaSuccess)
    return SideError("sok_rows_copy_async", e);
  LaunchCopy(side, s, dst_out->untyped_data(), own, src.untyped_data(), own + s.dst.k,
             own + 2 * s.dst.k, HalfTheSlots());
  if (cudaError_t e = cudaFreeAsync(own, side); e != cudaSuccess)
    return SideError("sok_rows_copy_async", e);
  if (cudaError_t e = side_stream::Forked(stream); e != cudaSuccess)
    return SideError("sok_rows_copy_async", e);
  return LastError("sok_rows_copy_async");
}

}  // namespace

SOK_ROWS_TARGETS(SOK_CUDA_HANDLER)

void AppendRowsTargetsCuda(TargetList& out) {
  out.insert(out.end(), {SOK_ROWS_TARGETS(SOK_CUDA_TARGET)});
}

}  // namespace sok
