// The fake XLA runtime of ffi_harness.h: XLA's side of the FFI C API
// (xla/ffi/api/c_api.h), implemented only as far as sok_jax's handlers and
// the header-only decoding in api.h / ffi.h use it:
//   - Handler::Call checks the call frame's struct_size and stage, that
//     extension_start is null (else it answers a metadata query), and the
//     numbers of arguments, results and attributes; then decodes each by
//     position (attributes by their index in the name-sorted list, checking
//     the name);
//   - errors go through XLA_FFI_Error_Create (and Error_GetMessage, where the
//     header has it, / Error_Destroy when a context decoding fails);
//   - PlatformStream<cudaStream_t> calls XLA_FFI_Stream_Get with the frame's
//     ctx (opaque to the handlers: here a HarnessContext).
// Every other entry of XLA_FFI_Api that the header has aborts with its
// argument type's name. The API's names differ between jax releases (0.10:
// ExecutionContext, Error_GetMessage; 0.11: InvokeContext, Error_GetDetails):
// the entries are set where the header has them (HAS_ENTRY below).
#include "ffi_harness.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "cpu_types.h"  // bf16_t, f16_t, ToFloat
#include "xla/ffi/api/ffi.h"

#ifdef SOK_SANITIZE_WITH_CUDA
#include <cuda_runtime.h>
#endif

// The runtime's halves of the opaque C API types.
struct XLA_FFI_Error {
  XLA_FFI_Error_Code errc;
  std::string message;
};

namespace sok {
namespace sanitize {
namespace {

// What the frame's ctx points to (the handlers only pass it back to
// XLA_FFI_Stream_Get).
struct HarnessContext {
  void* stream;
};

// HasEntry_<name><Api>: whether XLA_FFI_Api has the entry `name`.
#define SOK_HAS_ENTRY(name)                                             \
  template <typename T, typename = void>                                \
  struct HasEntry_##name : std::false_type {};                          \
  template <typename T>                                                 \
  struct HasEntry_##name<T, std::void_t<decltype(&T::name)>> : std::true_type {}
SOK_HAS_ENTRY(XLA_FFI_Error_GetMessage);
SOK_HAS_ENTRY(XLA_FFI_ExecutionContext_Get);
SOK_HAS_ENTRY(XLA_FFI_InvokeContext_Get);
#undef SOK_HAS_ENTRY

enum Entry { kErrorCreate, kErrorGetMessage, kErrorDestroy, kStreamGet, kEntries };
const char* const kEntryNames[kEntries] = {
    "XLA_FFI_Error_Create", "XLA_FFI_Error_GetMessage",
    "XLA_FFI_Error_Destroy", "XLA_FFI_Stream_Get"};
std::array<std::atomic<int64_t>, kEntries> g_calls{};

void CheckSize(const char* what, size_t expected, size_t got) {
  if (got != expected) {
    std::fprintf(stderr, "fake XLA FFI API: %s struct_size %zu, expected %zu\n",
                 what, got, expected);
    std::abort();
  }
}

XLA_FFI_Error* ErrorCreate(XLA_FFI_Error_Create_Args* args) {
  ++g_calls[kErrorCreate];
  CheckSize("XLA_FFI_Error_Create_Args", XLA_FFI_Error_Create_Args_STRUCT_SIZE,
            args->struct_size);
  return new XLA_FFI_Error{args->errc, args->message ? args->message : ""};
}

// Error_GetMessage for the headers that have it (the args type is deduced
// from the entry, so this compiles where the header has none).
template <typename R, typename A>
void SetErrorGetMessage(R (*&entry)(A*)) {
  entry = [](A* args) -> R {
    ++g_calls[kErrorGetMessage];
    args->message = args->error->message.c_str();
  };
}

void ErrorDestroy(XLA_FFI_Error_Destroy_Args* args) {
  ++g_calls[kErrorDestroy];
  CheckSize("XLA_FFI_Error_Destroy_Args", XLA_FFI_Error_Destroy_Args_STRUCT_SIZE,
            args->struct_size);
  delete args->error;
}

XLA_FFI_Error* StreamGet(XLA_FFI_Stream_Get_Args* args) {
  ++g_calls[kStreamGet];
  CheckSize("XLA_FFI_Stream_Get_Args", XLA_FFI_Stream_Get_Args_STRUCT_SIZE,
            args->struct_size);
  auto* ctx = reinterpret_cast<HarnessContext*>(args->ctx);
  if (ctx == nullptr || ctx->stream == nullptr)
    return new XLA_FFI_Error{XLA_FFI_Error_Code_FAILED_PRECONDITION,
                             "no stream: a CUDA handler called on the host"};
  args->stream = ctx->stream;
  return nullptr;
}

// Any entry the handlers are not expected to call.
template <typename R, typename A>
R Unimplemented(A*) {
  std::fprintf(stderr, "fake XLA FFI API: unimplemented entry called: %s\n",
               __PRETTY_FUNCTION__);
  std::abort();
}

template <typename R, typename A>
void Stub(R (*&entry)(A*)) {
  entry = &Unimplemented<R, A>;
}

template <typename Api>
Api MakeApi() {
  Api api{};  // entries a newer header adds stay null
  api.struct_size = XLA_FFI_Api_STRUCT_SIZE;
  api.extension_start = nullptr;
  api.api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
  api.api_version.extension_start = nullptr;
  api.api_version.major_version = XLA_FFI_API_MAJOR;
  api.api_version.minor_version = XLA_FFI_API_MINOR;
  api.internal_api = nullptr;
  api.XLA_FFI_Error_Create = &ErrorCreate;
  if constexpr (HasEntry_XLA_FFI_Error_GetMessage<Api>::value)
    SetErrorGetMessage(api.XLA_FFI_Error_GetMessage);
  api.XLA_FFI_Error_Destroy = &ErrorDestroy;
  api.XLA_FFI_Stream_Get = &StreamGet;
  Stub(api.XLA_FFI_Handler_Register);
  Stub(api.XLA_FFI_Type_Register);
  if constexpr (HasEntry_XLA_FFI_ExecutionContext_Get<Api>::value)
    Stub(api.XLA_FFI_ExecutionContext_Get);
  if constexpr (HasEntry_XLA_FFI_InvokeContext_Get<Api>::value)
    Stub(api.XLA_FFI_InvokeContext_Get);
  Stub(api.XLA_FFI_State_Set);
  Stub(api.XLA_FFI_State_Get);
  Stub(api.XLA_FFI_DeviceMemory_Allocate);
  Stub(api.XLA_FFI_DeviceMemory_Free);
  Stub(api.XLA_FFI_ThreadPool_Schedule);
  Stub(api.XLA_FFI_ThreadPool_NumThreads);
  Stub(api.XLA_FFI_Future_Create);
  Stub(api.XLA_FFI_Future_SetAvailable);
  Stub(api.XLA_FFI_Future_SetError);
  Stub(api.XLA_FFI_RunId_Get);
  Stub(api.XLA_FFI_DeviceOrdinal_Get);
  return api;
}

const XLA_FFI_Api& Api() {
  static const XLA_FFI_Api api = MakeApi<XLA_FFI_Api>();
  return api;
}

class Host : public Memory {
 public:
  void* Alloc(size_t bytes) override {
    // 64-byte aligned, as XLA's CPU buffers; the size rounded up as
    // aligned_alloc requires.
    return bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr;
  }
  void Free(void* p) override { std::free(p); }
  void Upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void Download(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void Fill(void* dst, uint8_t byte, size_t bytes) override {
    if (bytes) std::memset(dst, byte, bytes);
  }
  void* Stream() override { return nullptr; }
  std::string Finish() override { return ""; }
};

#ifdef SOK_SANITIZE_WITH_CUDA
std::string CudaCheck(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return "";
  return std::string(what) + ": " + cudaGetErrorString(e);
}

void CudaOrDie(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

// Exact-size cudaMalloc per buffer, so memcheck bounds every buffer by its
// own size; copies and fills on the handlers' stream, in order.
class Device : public Memory {
 public:
  Device() { CudaOrDie(cudaStreamCreate(&stream_), "cudaStreamCreate"); }
  ~Device() override { cudaStreamDestroy(stream_); }
  void* Alloc(size_t bytes) override {
    void* p = nullptr;
    if (bytes) CudaOrDie(cudaMalloc(&p, bytes), "cudaMalloc");
    return p;
  }
  void Free(void* p) override {
    if (p) CudaOrDie(cudaFree(p), "cudaFree");
  }
  void Upload(void* dst, const void* src, size_t bytes) override {
    if (bytes)
      CudaOrDie(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_),
                "cudaMemcpyAsync H2D");
  }
  void Download(void* dst, const void* src, size_t bytes) override {
    if (bytes) {
      CudaOrDie(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_),
                "cudaMemcpyAsync D2H");
      CudaOrDie(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }
  }
  void Fill(void* dst, uint8_t byte, size_t bytes) override {
    if (bytes)
      CudaOrDie(cudaMemsetAsync(dst, byte, bytes, stream_), "cudaMemsetAsync");
  }
  void* Stream() override { return stream_; }
  // The whole device: a target may leave work on its own side stream
  // (sok_rows_scatter_async, which a graph reads only after sok_rows_join).
  std::string Finish() override {
    std::string e = CudaCheck(cudaDeviceSynchronize(), "after the call");
    if (e.empty()) e = CudaCheck(cudaGetLastError(), "after the call");
    return e;
  }

 private:
  cudaStream_t stream_ = nullptr;
};
#endif

}  // namespace

int64_t Tensor::count() const {
  return std::accumulate(dims.begin(), dims.end(), int64_t{1},
                         std::multiplies<int64_t>());
}

size_t ByteWidthOf(XLA_FFI_DataType dtype) {
  return ffi::ByteWidth(static_cast<ffi::DataType>(dtype));
}

const char* DtypeName(XLA_FFI_DataType dtype) {
  switch (dtype) {
    case XLA_FFI_DataType_F32: return "f32";
    case XLA_FFI_DataType_BF16: return "bf16";
    case XLA_FFI_DataType_F16: return "f16";
    case XLA_FFI_DataType_S32: return "s32";
    case XLA_FFI_DataType_U32: return "u32";
    case XLA_FFI_DataType_S64: return "s64";
    case XLA_FFI_DataType_U8: return "u8";
    default: return "?";
  }
}

bool IsFloat(XLA_FFI_DataType dtype) {
  return dtype == XLA_FFI_DataType_F32 || dtype == XLA_FFI_DataType_BF16 ||
         dtype == XLA_FFI_DataType_F16;
}

Tensor MakeTensor(XLA_FFI_DataType dtype, std::vector<int64_t> dims) {
  Tensor t;
  t.dtype = dtype;
  t.dims = std::move(dims);
  t.bytes.assign(static_cast<size_t>(t.count()) * ByteWidthOf(dtype), 0);
  return t;
}

double FloatAt(const Tensor& t, int64_t i) {
  switch (t.dtype) {
    case XLA_FFI_DataType_F32: return t.as<float>()[i];
    case XLA_FFI_DataType_BF16: return ToFloat(t.as<bf16_t>()[i]);
    case XLA_FFI_DataType_F16: return ToFloat(t.as<f16_t>()[i]);
    default: std::abort();
  }
}

Attr Attr::I32(std::string name, int32_t v) {
  Attr a{std::move(name), Kind::kI32};
  a.i = v;
  return a;
}
Attr Attr::I64(std::string name, int64_t v) {
  Attr a{std::move(name), Kind::kI64};
  a.i = v;
  return a;
}
Attr Attr::F32(std::string name, float v) {
  Attr a{std::move(name), Kind::kF32};
  a.f = v;
  return a;
}
Attr Attr::F32Array(std::string name, std::vector<float> v) {
  Attr a{std::move(name), Kind::kF32Array};
  a.fs = std::move(v);
  return a;
}

std::unique_ptr<Memory> HostMemory() { return std::make_unique<Host>(); }
#ifdef SOK_SANITIZE_WITH_CUDA
std::unique_ptr<Memory> DeviceMemory() { return std::make_unique<Device>(); }
#endif

uint8_t PoisonByte(XLA_FFI_DataType dtype) {
  return IsFloat(dtype) ? 0xFF : 0x5A;
}

CallResult Call(XLA_FFI_Handler* handler, Memory& mem,
                const std::vector<Tensor>& args,
                const std::vector<RetSpec>& rets,
                const std::vector<Attr>& attrs) {
  CallResult result;
  // Buffers, and their C descriptions (dims copied: XLA_FFI_Buffer holds a
  // non-const pointer).
  std::vector<void*> arg_data(args.size()), ret_data(rets.size());
  std::vector<std::vector<int64_t>> dims;
  dims.reserve(args.size() + rets.size());
  std::vector<XLA_FFI_Buffer> bufs(args.size() + rets.size());
  auto describe = [&](XLA_FFI_Buffer& b, XLA_FFI_DataType dtype,
                      const std::vector<int64_t>& d, void* data) {
    dims.push_back(d);
    b = XLA_FFI_Buffer{};
    b.struct_size = XLA_FFI_Buffer_STRUCT_SIZE;
    b.extension_start = nullptr;
    b.dtype = dtype;
    b.data = data;
    b.rank = static_cast<int64_t>(d.size());
    b.dims = dims.back().data();
  };
  for (size_t i = 0; i < args.size(); ++i) {
    arg_data[i] = mem.Alloc(args[i].size_bytes());
    mem.Upload(arg_data[i], args[i].bytes.data(), args[i].size_bytes());
    describe(bufs[i], args[i].dtype, args[i].dims, arg_data[i]);
  }
  std::vector<size_t> ret_bytes(rets.size());
  for (size_t i = 0; i < rets.size(); ++i) {
    const RetSpec& r = rets[i];
    int64_t count = std::accumulate(r.dims.begin(), r.dims.end(), int64_t{1},
                                    std::multiplies<int64_t>());
    ret_bytes[i] = static_cast<size_t>(count) * ByteWidthOf(r.dtype);
    if (r.alias >= 0) {
      if (args[r.alias].size_bytes() != ret_bytes[i]) {
        std::fprintf(stderr, "driver: result %s aliases an argument of another size\n",
                     r.name.c_str());
        std::abort();
      }
      ret_data[i] = arg_data[r.alias];
    } else {
      ret_data[i] = mem.Alloc(ret_bytes[i]);
      mem.Fill(ret_data[i], PoisonByte(r.dtype), ret_bytes[i]);
    }
    describe(bufs[args.size() + i], r.dtype, r.dims, ret_data[i]);
  }
  std::vector<XLA_FFI_ArgType> arg_types(args.size(), XLA_FFI_ArgType_BUFFER);
  std::vector<XLA_FFI_RetType> ret_types(rets.size(), XLA_FFI_RetType_BUFFER);
  std::vector<void*> arg_ptrs(args.size()), ret_ptrs(rets.size());
  for (size_t i = 0; i < args.size(); ++i) arg_ptrs[i] = &bufs[i];
  for (size_t i = 0; i < rets.size(); ++i) ret_ptrs[i] = &bufs[args.size() + i];

  // Attributes, sorted by name as XLA passes them.
  struct AttrStorage {
    XLA_FFI_ByteSpan name;
    int32_t i32;
    int64_t i64;
    float f32;
    XLA_FFI_Scalar scalar;
    XLA_FFI_Array array;
  };
  std::vector<size_t> order(attrs.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return attrs[a].name < attrs[b].name; });
  std::vector<AttrStorage> store(attrs.size());
  std::vector<XLA_FFI_AttrType> attr_types(attrs.size());
  std::vector<XLA_FFI_ByteSpan*> attr_names(attrs.size());
  std::vector<void*> attr_ptrs(attrs.size());
  for (size_t k = 0; k < order.size(); ++k) {
    const Attr& a = attrs[order[k]];
    AttrStorage& s = store[k];
    s.name = XLA_FFI_ByteSpan{a.name.data(), a.name.size()};
    attr_names[k] = &s.name;
    switch (a.kind) {
      case Attr::Kind::kI32:
        s.i32 = static_cast<int32_t>(a.i);
        s.scalar = XLA_FFI_Scalar{XLA_FFI_DataType_S32, &s.i32};
        break;
      case Attr::Kind::kI64:
        s.i64 = a.i;
        s.scalar = XLA_FFI_Scalar{XLA_FFI_DataType_S64, &s.i64};
        break;
      case Attr::Kind::kF32:
        s.f32 = a.f;
        s.scalar = XLA_FFI_Scalar{XLA_FFI_DataType_F32, &s.f32};
        break;
      case Attr::Kind::kF32Array:
        s.array = XLA_FFI_Array{XLA_FFI_DataType_F32, a.fs.size(),
                                const_cast<float*>(a.fs.data())};
        break;
    }
    const bool array = a.kind == Attr::Kind::kF32Array;
    attr_types[k] = array ? XLA_FFI_AttrType_ARRAY : XLA_FFI_AttrType_SCALAR;
    attr_ptrs[k] = array ? static_cast<void*>(&s.array)
                         : static_cast<void*>(&s.scalar);
  }

  HarnessContext ctx{mem.Stream()};
  XLA_FFI_CallFrame frame{};
  frame.struct_size = XLA_FFI_CallFrame_STRUCT_SIZE;
  frame.extension_start = nullptr;
  frame.api = &Api();
  frame.ctx = reinterpret_cast<decltype(frame.ctx)>(&ctx);
  frame.stage = XLA_FFI_ExecutionStage_EXECUTE;
  frame.args.struct_size = XLA_FFI_Args_STRUCT_SIZE;
  frame.args.size = static_cast<int64_t>(args.size());
  frame.args.types = arg_types.data();
  frame.args.args = arg_ptrs.data();
  frame.rets.struct_size = XLA_FFI_Rets_STRUCT_SIZE;
  frame.rets.size = static_cast<int64_t>(rets.size());
  frame.rets.types = ret_types.data();
  frame.rets.rets = ret_ptrs.data();
  frame.attrs.struct_size = XLA_FFI_Attrs_STRUCT_SIZE;
  frame.attrs.size = static_cast<int64_t>(attrs.size());
  frame.attrs.types = attr_types.data();
  frame.attrs.names = attr_names.data();
  frame.attrs.attrs = attr_ptrs.data();
  frame.future = nullptr;

  if (XLA_FFI_Error* err = handler(&frame)) {
    // Our own error type (ErrorCreate): read it directly.
    result.error = err->message.empty() ? "(no message)" : err->message;
    XLA_FFI_Error_Destroy_Args destroy{};
    destroy.struct_size = XLA_FFI_Error_Destroy_Args_STRUCT_SIZE;
    destroy.error = err;
    Api().XLA_FFI_Error_Destroy(&destroy);
  }
  if (frame.future != nullptr) result.error += " (the handler returned a future)";
  std::string platform = mem.Finish();
  if (!platform.empty()) result.error += (result.error.empty() ? "" : "; ") + platform;

  result.rets.resize(rets.size());
  for (size_t i = 0; i < rets.size(); ++i) {
    result.rets[i] = MakeTensor(rets[i].dtype, rets[i].dims);
    mem.Download(result.rets[i].bytes.data(), ret_data[i], ret_bytes[i]);
  }
  for (void* p : arg_data) mem.Free(p);
  for (size_t i = 0; i < rets.size(); ++i)
    if (rets[i].alias < 0) mem.Free(ret_data[i]);
  return result;
}

std::vector<std::pair<std::string, int64_t>> ApiCallCounts() {
  std::vector<std::pair<std::string, int64_t>> out;
  for (int e = 0; e < kEntries; ++e) out.emplace_back(kEntryNames[e], g_calls[e].load());
  return out;
}

}  // namespace sanitize
}  // namespace sok
