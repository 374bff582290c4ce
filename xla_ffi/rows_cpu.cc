// CPU handlers of the row movers: whole rows copied between two row-major
// tables by memcpy. Same targets, arguments and checks (rows_checks.h) as
// rows_cuda.cu.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "cpu_types.h"
#include "rows_checks.h"
#include "signatures.h"

namespace sok {
namespace {

ffi::Error GatherImpl(ffi::AnyBuffer src, ffi::Buffer<ffi::S32> rows,
                      ffi::Result<ffi::AnyBuffer> out) {
  RowsShape s;
  if (auto e = CheckGather(src, rows, *out, &s); e.failure()) return e;
  const char* from = static_cast<const char*>(src.untyped_data());
  char* to = static_cast<char*>(out->untyped_data());
  const int32_t* r = rows.typed_data();
  for (int64_t i = 0; i < s.k; ++i) {
    char* dst = to + i * s.row_bytes;
    if (r[i] >= 0 && r[i] < s.table_rows)
      std::memcpy(dst, from + static_cast<int64_t>(r[i]) * s.row_bytes, s.row_bytes);
    else
      std::memset(dst, 0, s.row_bytes);
  }
  return ffi::Error::Success();
}

ffi::Error ScatterImpl(ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> rows, ffi::AnyBuffer values,
                       ffi::Result<ffi::AnyBuffer> dst_out) {
  RowsShape s;
  if (auto e = CheckScatter(dst, rows, values, *dst_out, &s); e.failure()) return e;
  CopyIfDistinct(dst.untyped_data(), dst_out->untyped_data(), dst.size_bytes());
  char* to = static_cast<char*>(dst_out->untyped_data());
  const char* from = static_cast<const char*>(values.untyped_data());
  const int32_t* r = rows.typed_data();
  for (int64_t i = 0; i < s.k; ++i) {
    if (r[i] >= 0 && r[i] < s.table_rows)
      std::memcpy(to + static_cast<int64_t>(r[i]) * s.row_bytes, from + i * s.row_bytes,
                  s.row_bytes);
  }
  return ffi::Error::Success();
}

// The CPU runs every move at once: the scatter is complete on return.
ffi::Error ScatterAsyncImpl(ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> rows,
                            ffi::AnyBuffer values, ffi::Result<ffi::AnyBuffer> dst_out) {
  return ScatterImpl(dst, rows, values, dst_out);
}

ffi::Error JoinImpl(ffi::AnyBuffer x, ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> x_out) {
  if (x_out->size_bytes() != x.size_bytes()) return InvalidArgument("x_out must match x");
  CopyIfDistinct(x.untyped_data(), x_out->untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

ffi::Error CopyImpl(ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> dst_rows, ffi::AnyBuffer src,
                    ffi::Buffer<ffi::S32> src_rows, ffi::Buffer<ffi::S32> count,
                    ffi::Result<ffi::AnyBuffer> dst_out) {
  CopyShape s;
  if (auto e = CheckCopy(dst, dst_rows, src, src_rows, count, *dst_out, &s); e.failure())
    return e;
  CopyIfDistinct(dst.untyped_data(), dst_out->untyped_data(), dst.size_bytes());
  char* to = static_cast<char*>(dst_out->untyped_data());
  const char* from = static_cast<const char*>(src.untyped_data());
  const int32_t* d = dst_rows.typed_data();
  const int32_t* r = src_rows.typed_data();
  const int64_t bytes = s.dst.row_bytes;
  const int64_t n = std::clamp<int64_t>(count.typed_data()[0], 0, s.dst.k);
  for (int64_t i = 0; i < n; ++i) {
    if (d[i] >= 0 && d[i] < s.dst.table_rows && r[i] >= 0 && r[i] < s.src_rows)
      std::memcpy(to + static_cast<int64_t>(d[i]) * bytes, from + static_cast<int64_t>(r[i]) * bytes,
                  bytes);
  }
  return ffi::Error::Success();
}

// Complete on return, as every CPU move.
ffi::Error CopyAsyncImpl(ffi::AnyBuffer dst, ffi::Buffer<ffi::S32> dst_rows, ffi::AnyBuffer src,
                         ffi::Buffer<ffi::S32> src_rows, ffi::Buffer<ffi::S32> count,
                         ffi::Result<ffi::AnyBuffer> dst_out) {
  return CopyImpl(dst, dst_rows, src, src_rows, count, dst_out);
}

}  // namespace

SOK_ROWS_TARGETS(SOK_CPU_HANDLER)

void AppendRowsTargetsCpu(TargetList& out) {
  out.insert(out.end(), {SOK_ROWS_TARGETS(SOK_CPU_TARGET)});
}

}  // namespace sok
