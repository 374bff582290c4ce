// Buffer checks shared by the CPU and CUDA optimizer handlers (optim_cpu.cc,
// optim_cuda.cu): the unique-row gradient of one step against the table, the
// slots (float32 or 16-bit, one dtype per update), and the copy of each input
// into its output. Nothing here reads a buffer's contents, so the CUDA
// handlers never read num_unique or hparams on the host.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "common.h"

namespace sok {

// The unique-row gradient of one step, checked against the table's [R, D]:
// the first num_unique[0] entries of unique_rows (clamped to [0, capacity],
// optim_math.h ClampCount) name the rows to update, and row u's gradient is
// grads[u * D, (u + 1) * D). The pointers are where the handler's platform
// holds the buffers: device memory for CUDA, so the count and hparams are
// read where the update runs.
struct RowGrads {
  int64_t rows = 0;
  int64_t dim = 0;
  int64_t capacity = 0;  // len(unique_rows)
  const int32_t* unique_rows = nullptr;
  const float* grads = nullptr;
  const int32_t* num_unique = nullptr;
  const float* hparams = nullptr;
};

inline ffi::Error CheckRowGrads(const ffi::AnyBuffer& table,
                                ffi::Result<ffi::AnyBuffer>& table_out,
                                const ffi::Buffer<ffi::S32>& unique_rows,
                                const ffi::Buffer<ffi::F32>& row_grads,
                                const ffi::Buffer<ffi::S32>& num_unique,
                                const ffi::Buffer<ffi::F32>& hparams,
                                size_t num_hparams, RowGrads* rg) {
  if (auto e = Rank2(table, "table", &rg->rows, &rg->dim); e.failure())
    return e;
  if (table_out->element_type() != table.element_type() ||
      table_out->element_count() != table.element_count())
    return InvalidArgument("table output must match the table");
  if (unique_rows.dimensions().size() != 1)
    return InvalidArgument("unique_rows must be rank 1");
  rg->capacity = unique_rows.element_count();
  auto gd = row_grads.dimensions();
  if (gd.size() != 2 || gd[0] != rg->capacity || gd[1] != rg->dim)
    return InvalidArgument("row_grads must be [len(unique_rows), D]");
  if (num_unique.element_count() < 1)
    return InvalidArgument("num_unique must hold one int32");
  if (hparams.element_count() < num_hparams)
    return InvalidArgument("hparams must hold " + std::to_string(num_hparams) +
                           " float32 values");
  rg->unique_rows = unique_rows.typed_data();
  rg->grads = row_grads.typed_data();
  rg->num_unique = num_unique.typed_data();
  rg->hparams = hparams.typed_data();
  return ffi::Error::Success();
}

// A slot of `count` elements stored as `dtype` (an optimizer's slots share
// one slot_dtype: float32, bfloat16 or float16); its output must match it.
inline ffi::Error CheckSlot(const ffi::AnyBuffer& slot,
                            ffi::Result<ffi::AnyBuffer>& out, int64_t count,
                            ffi::DataType dtype, const std::string& what) {
  if (static_cast<int64_t>(slot.element_count()) != count ||
      out->element_count() != slot.element_count())
    return InvalidArgument(what + " must have " + std::to_string(count) +
                           " elements");
  if (slot.element_type() != dtype || out->element_type() != dtype)
    return InvalidArgument(what +
                           " must have the dtype of the first slot (an "
                           "optimizer's slots share one slot_dtype), its "
                           "output too");
  return ffi::Error::Success();
}

// Calls fn(Tag{}) for a slot dtype: float32, bfloat16 or float16 (each
// element loaded to float32, updated, and stored back by the update's
// rounding policy); InvalidArgument naming the slots for anything else.
template <typename Fn>
ffi::Error DispatchSlots(ffi::DataType dtype, Fn&& fn) {
  return DispatchFloat(dtype, "optimizer slots", std::forward<Fn>(fn));
}

// The arguments every optimizer target takes besides its slots and
// attributes (signatures.h RowsAndHparams), and the table's output.
struct UpdateArgs {
  const ffi::AnyBuffer& table;
  const ffi::Buffer<ffi::S32>& unique_rows;
  const ffi::Buffer<ffi::F32>& row_grads;
  const ffi::Buffer<ffi::S32>& num_unique;
  const ffi::Buffer<ffi::F32>& hparams;
  ffi::Result<ffi::AnyBuffer>& table_out;
};

// One slot of an optimizer target with its output, named as in the error
// messages.
struct SlotArg {
  const ffi::AnyBuffer& in;
  ffi::Result<ffi::AnyBuffer>& out;
  const char* name;
};

// How many elements a rule's slots have: one per table element ([R, D]), or
// one per row (row-wise Adagrad's [R] or [R, 1] accumulator).
enum class SlotShape { kPerElement, kPerRow };

// One optimizer step, the same on both platforms up to its last call: the
// row gradient checked with `num_hparams` hparams (CheckRowGrads), each of
// the (at most two) `slots` checked against `shape` and the first slot's
// dtype (CheckSlot), the table and slot dtypes dispatched to the platform's
// storage types StorageOf<Tag>::type (T, S; S is float when there are no
// slots), every output made to hold its input by copy(in, out, bytes) (a
// no-op when XLA aliased them), then body(table_out as T*, rg, slot) with
// the slot outputs as S* (nullptr beyond the slots given).
template <template <typename> class StorageOf, typename Copy, typename Body>
ffi::Error WithRowUpdate(const UpdateArgs& a, int num_hparams,
                         std::initializer_list<SlotArg> slots, SlotShape shape,
                         Copy&& copy, Body&& body) {
  RowGrads rg;
  if (auto e = CheckRowGrads(a.table, a.table_out, a.unique_rows, a.row_grads,
                             a.num_unique, a.hparams, num_hparams, &rg);
      e.failure())
    return e;
  const int64_t count =
      shape == SlotShape::kPerRow ? rg.rows : rg.rows * rg.dim;
  const ffi::DataType slot_dtype =
      slots.size() ? slots.begin()->in.element_type() : ffi::DataType::F32;
  for (const SlotArg& s : slots)
    if (auto e = CheckSlot(s.in, s.out, count, slot_dtype, s.name);
        e.failure())
      return e;
  return DispatchFloat(a.table.element_type(), "table", [&](auto tag) {
    return DispatchSlots(slot_dtype, [&](auto slot_tag) {
      using T = typename StorageOf<decltype(tag)>::type;
      using S = typename StorageOf<decltype(slot_tag)>::type;
      copy(a.table.untyped_data(), a.table_out->untyped_data(),
           a.table.size_bytes());
      S* slot[2] = {nullptr, nullptr};
      int k = 0;
      for (const SlotArg& s : slots) {
        slot[k] = s.out->template reinterpret_data<S>();
        copy(s.in.untyped_data(), slot[k], s.in.size_bytes());
        ++k;
      }
      return body(a.table_out->template reinterpret_data<T>(), rg,
                  static_cast<S* const*>(slot));
    });
  });
}

}  // namespace sok
