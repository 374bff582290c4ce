// Buffer checks shared by the CPU and CUDA row movers (sok_rows_gather,
// sok_rows_scatter, sok_rows_copy): they copy whole rows between two row-major tables of one
// element type, whatever that type is (vectors, optimizer slots), so a row is
// `row_bytes` opaque bytes. Row indices are int32; an index outside
// [0, table rows) names no row (gather writes zeros, scatter skips it).
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace sok {

struct RowsShape {
  int64_t table_rows = 0;  // rows of the table read (gather) or written (scatter)
  int64_t k = 0;           // listed rows
  int64_t row_bytes = 0;   // bytes of one row
};

// A table of rank 1 ([R], one element per row) or 2 ([R, W]).
inline ffi::Error RowsOf(const ffi::AnyBuffer& b, const char* what, int64_t* rows,
                         int64_t* row_bytes) {
  auto dims = b.dimensions();
  if (dims.size() != 1 && dims.size() != 2)
    return InvalidArgument(std::string(what) + " must be rank 1 or 2, got rank " +
                           std::to_string(dims.size()));
  *rows = dims[0];
  int64_t width = dims.size() == 2 ? dims[1] : 1;
  *row_bytes = width * static_cast<int64_t>(ffi::ByteWidth(b.element_type()));
  return ffi::Error::Success();
}

inline ffi::Error CheckRowList(const ffi::Buffer<ffi::S32>& rows, int64_t* k) {
  if (rows.dimensions().size() != 1) return InvalidArgument("rows must be int32 [K]");
  *k = rows.element_count();
  return ffi::Error::Success();
}

// `values` (gather: out) holds K rows of the table's type and width.
inline ffi::Error CheckListed(const ffi::AnyBuffer& table, const ffi::AnyBuffer& values,
                              const char* what, const RowsShape& s) {
  int64_t vk = 0, vbytes = 0;
  if (auto e = RowsOf(values, what, &vk, &vbytes); e.failure()) return e;
  if (values.element_type() != table.element_type())
    return InvalidArgument(std::string(what) + " must have the table's dtype");
  if (vk != s.k || vbytes != s.row_bytes)
    return InvalidArgument(std::string(what) + " must be [K, W]: one table row per listed row");
  return ffi::Error::Success();
}

// sok_rows_gather: out[i] = src[rows[i]] (zeros where rows[i] names no row).
inline ffi::Error CheckGather(const ffi::AnyBuffer& src, const ffi::Buffer<ffi::S32>& rows,
                              const ffi::AnyBuffer& out, RowsShape* s) {
  if (auto e = RowsOf(src, "src", &s->table_rows, &s->row_bytes); e.failure()) return e;
  if (auto e = CheckRowList(rows, &s->k); e.failure()) return e;
  return CheckListed(src, out, "out", *s);
}

// sok_rows_scatter: dst[rows[i]] = values[i]; the listed rows in range are
// distinct (the caller's invariant: otherwise which value lands is not
// defined on the GPU); dst_out aliases dst.
inline ffi::Error CheckScatter(const ffi::AnyBuffer& dst, const ffi::Buffer<ffi::S32>& rows,
                               const ffi::AnyBuffer& values, const ffi::AnyBuffer& dst_out,
                               RowsShape* s) {
  if (auto e = RowsOf(dst, "dst", &s->table_rows, &s->row_bytes); e.failure()) return e;
  if (auto e = CheckRowList(rows, &s->k); e.failure()) return e;
  if (auto e = CheckListed(dst, values, "values", *s); e.failure()) return e;
  if (dst_out.size_bytes() != dst.size_bytes() || dst_out.element_type() != dst.element_type())
    return InvalidArgument("dst_out must match dst");
  return ffi::Error::Success();
}

// sok_rows_copy: dst[dst_rows[i]] = src[src_rows[i]] for i < count where
// both name a row; the dst rows in range are distinct; dst_out aliases dst.
// `count` lives on the device (a kernel reads it): a list whose live pairs
// lead costs a pass over those only, however long its padding.
struct CopyShape {
  RowsShape dst;
  int64_t src_rows = 0;
};

inline ffi::Error CheckCopy(const ffi::AnyBuffer& dst, const ffi::Buffer<ffi::S32>& dst_rows,
                            const ffi::AnyBuffer& src, const ffi::Buffer<ffi::S32>& src_rows,
                            const ffi::Buffer<ffi::S32>& count, const ffi::AnyBuffer& dst_out,
                            CopyShape* s) {
  if (auto e = RowsOf(dst, "dst", &s->dst.table_rows, &s->dst.row_bytes); e.failure()) return e;
  if (auto e = CheckRowList(dst_rows, &s->dst.k); e.failure()) return e;
  int64_t src_bytes = 0, src_k = 0;
  if (auto e = RowsOf(src, "src", &s->src_rows, &src_bytes); e.failure()) return e;
  if (auto e = CheckRowList(src_rows, &src_k); e.failure()) return e;
  if (src.element_type() != dst.element_type() || src_bytes != s->dst.row_bytes)
    return InvalidArgument("src must have dst's dtype and row width");
  if (src_k != s->dst.k) return InvalidArgument("src_rows and dst_rows must have one length");
  if (count.element_count() != 1) return InvalidArgument("count must be int32 [1]");
  if (dst_out.size_bytes() != dst.size_bytes() || dst_out.element_type() != dst.element_type())
    return InvalidArgument("dst_out must match dst");
  return ffi::Error::Success();
}

}  // namespace sok
