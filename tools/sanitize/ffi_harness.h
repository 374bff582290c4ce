// Calls sok_jax's FFI handlers the way XLA does, without XLA: a minimal
// XLA_FFI_Api of our own (error create / get-message / destroy and the
// platform stream; every other entry aborts naming itself), call frames
// built from host descriptions of the arguments, results and attributes,
// and the memory of one platform (host, or CUDA device) to hold them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/c_api.h"

namespace sok {
namespace sanitize {

// The data of one buffer, on the host.
struct Tensor {
  XLA_FFI_DataType dtype = XLA_FFI_DataType_INVALID;
  std::vector<int64_t> dims;
  std::vector<uint8_t> bytes;

  int64_t count() const;
  size_t size_bytes() const { return bytes.size(); }
  template <typename T>
  T* as() {
    return reinterpret_cast<T*>(bytes.data());
  }
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(bytes.data());
  }
};

size_t ByteWidthOf(XLA_FFI_DataType dtype);
const char* DtypeName(XLA_FFI_DataType dtype);
bool IsFloat(XLA_FFI_DataType dtype);

// A zero-filled tensor of that shape.
Tensor MakeTensor(XLA_FFI_DataType dtype, std::vector<int64_t> dims);

// Element i of a float32 / bfloat16 / float16 tensor as a double.
double FloatAt(const Tensor& t, int64_t i);

// One attribute as XLA passes it: a scalar (int32, int64, float32) or a
// float32 array.
struct Attr {
  enum class Kind { kI32, kI64, kF32, kF32Array };
  std::string name;
  Kind kind;
  int64_t i = 0;
  float f = 0.f;
  std::vector<float> fs;

  static Attr I32(std::string name, int32_t v);
  static Attr I64(std::string name, int64_t v);
  static Attr F32(std::string name, float v);
  static Attr F32Array(std::string name, std::vector<float> v);
};

// The memory of one platform. Zero-size buffers are passed as nullptr, so a
// handler that touches one fails loudly (a host segfault, or a memcheck
// error on the device).
class Memory {
 public:
  virtual ~Memory() = default;
  virtual void* Alloc(size_t bytes) = 0;
  virtual void Free(void* p) = 0;
  virtual void Upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void Download(void* dst, const void* src, size_t bytes) = 0;
  virtual void Fill(void* dst, uint8_t byte, size_t bytes) = 0;
  // What the handler's stream context resolves to (nullptr on the host).
  virtual void* Stream() = 0;
  // Waits for the stream; "" or the platform's error.
  virtual std::string Finish() = 0;
};

std::unique_ptr<Memory> HostMemory();
#ifdef SOK_SANITIZE_WITH_CUDA
std::unique_ptr<Memory> DeviceMemory();
#endif

// One result of a call: its type and shape, and the argument it aliases (as
// the wrapper's input_output_aliases: the handler gets the same buffer for
// both), or -1 for a fresh buffer filled with `poison` bytes.
struct RetSpec {
  std::string name;
  XLA_FFI_DataType dtype;
  std::vector<int64_t> dims;
  int alias = -1;
};

// The byte a fresh result is filled with before the call: NaN for the float
// types, 0x5A5A... for the integer types (never a value a handler writes on
// purpose, unlike -1).
uint8_t PoisonByte(XLA_FFI_DataType dtype);

struct CallResult {
  std::string error;  // "" on success: the handler's message otherwise
  std::vector<Tensor> rets;
};

// Runs `handler` once on `mem`: uploads the arguments, poisons the fresh
// results, builds the call frame (attributes sorted by name, as XLA passes
// them), calls, waits, downloads every result and frees everything.
CallResult Call(XLA_FFI_Handler* handler, Memory& mem,
                const std::vector<Tensor>& args,
                const std::vector<RetSpec>& rets,
                const std::vector<Attr>& attrs);

// Which fake API entries were called, over the whole run, by name.
std::vector<std::pair<std::string, int64_t>> ApiCallCounts();

}  // namespace sanitize
}  // namespace sok
