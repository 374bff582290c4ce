// A side stream beside each XLA stream, for row moves that may run while the
// XLA stream goes on (sok_rows_scatter_async, then sok_rows_join):
//   Fork(stream): a side stream ordered after everything queued on `stream`
//     so far; Forked(stream) marks the end of the work then queued on it;
//   Join(stream): `stream` waits for the side work marked so far.
// Each XLA stream gets its side stream and two events once, on the stream's
// device, kept for the process's life as XLA keeps its streams. A Join with
// nothing forked waits for nothing. No XLA or nanobind headers.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>

namespace sok {
namespace side_stream {

struct Side {
  cudaStream_t stream = nullptr;
  cudaEvent_t forked = nullptr;  // recorded on the XLA stream at each Fork
  cudaEvent_t done = nullptr;    // recorded on the side stream at each Forked
};

inline cudaError_t Of(cudaStream_t stream, Side* out) {
  static std::mutex mu;
  static std::unordered_map<cudaStream_t, Side> sides;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = sides.find(stream); it != sides.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  int device = 0, current = 0;
  cudaError_t e = cudaStreamGetDevice(stream, &device);
  if (e != cudaSuccess) return e;
  if ((e = cudaGetDevice(&current)) != cudaSuccess) return e;
  if ((e = cudaSetDevice(device)) != cudaSuccess) return e;
  Side s;
  e = cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&s.forked, cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming);
  cudaError_t back = cudaSetDevice(current);
  if (e != cudaSuccess) return e;
  if (back != cudaSuccess) return back;
  sides.emplace(stream, s);
  *out = s;
  return cudaSuccess;
}

inline cudaError_t Fork(cudaStream_t stream, cudaStream_t* side) {
  Side s;
  if (cudaError_t e = Of(stream, &s); e != cudaSuccess) return e;
  if (cudaError_t e = cudaEventRecord(s.forked, stream); e != cudaSuccess) return e;
  if (cudaError_t e = cudaStreamWaitEvent(s.stream, s.forked, 0); e != cudaSuccess) return e;
  *side = s.stream;
  return cudaSuccess;
}

inline cudaError_t Forked(cudaStream_t stream) {
  Side s;
  if (cudaError_t e = Of(stream, &s); e != cudaSuccess) return e;
  return cudaEventRecord(s.done, s.stream);
}

inline cudaError_t Join(cudaStream_t stream) {
  Side s;
  if (cudaError_t e = Of(stream, &s); e != cudaSuccess) return e;
  return cudaStreamWaitEvent(stream, s.done, 0);
}

}  // namespace side_stream
}  // namespace sok
