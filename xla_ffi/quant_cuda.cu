// CUDA handler of the int8 inference lookup (sok_quant_fwd). Same target,
// arguments and checks (quant_checks.h) as quant_cpu.cc; launches
// quant_kernels.cuh on XLA's stream and ends with one LastError check.
#include <cstdint>

#include "common.h"
#include "cuda_common.cuh"
#include "quant_checks.h"
#include "quant_kernels.cuh"
#include "signatures.h"

namespace sok {
namespace {

constexpr int kBlock = 256;

ffi::Error QuantFwdImpl(cudaStream_t stream, ffi::AnyBuffer q,
                        ffi::AnyBuffer scale_bias, ffi::AnyBuffer ids,
                        ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                        ffi::Result<ffi::AnyBuffer> out, int32_t combiner,
                        int64_t fixed_nnz) {
  EmbedShape sh;
  if (auto e = CheckQuantFwd(q, scale_bias, ids, offsets, weights, *out,
                             combiner, fixed_nnz, &sh);
      e.failure())
    return e;
  const int64_t rows = sh.rows, dim = sh.dim, n = sh.n, m = sh.m;
  if (m == 0 || dim == 0) return ffi::Error::Success();
  const uint8_t* qp = q.typed_data<uint8_t>();
  // 4 codes per load where every row start is 4-byte aligned.
  const bool vec4 = dim % 4 == 0 && (reinterpret_cast<uintptr_t>(qp) & 3u) == 0;
  auto err = DispatchKey(ids.element_type(), "ids", [&](auto key) {
    using K = decltype(key);
    auto launch = [&](auto kernel, int64_t chunks) {
      int tpb = 1;  // lanes per bag: a power of two covering the chunks, at most a warp
      while (tpb < 32 && tpb < chunks) tpb *= 2;
      const int64_t threads = m * tpb;
      kernel<<<static_cast<unsigned>((threads + kBlock - 1) / kBlock), kBlock, 0,
               stream>>>(qp, scale_bias.typed_data<float>(), rows, dim,
                         ids.reinterpret_data<K>(), offsets.typed_data<int32_t>(),
                         OptionalWeights(weights), n, m, fixed_nnz, combiner, tpb,
                         out->typed_data<float>());
    };
    if (vec4)
      launch(cuda::QuantFwdKernel<K, 4>, dim / 4);
    else
      launch(cuda::QuantFwdKernel<K, 1>, dim);
    return ffi::Error::Success();
  });
  if (err.failure()) return err;
  return LastError("sok_quant_fwd");
}

}  // namespace

SOK_QUANT_TARGETS(SOK_CUDA_HANDLER)

void AppendQuantTargetsCuda(TargetList& out) {
  out.insert(out.end(), {SOK_QUANT_TARGETS(SOK_CUDA_TARGET)});
}

}  // namespace sok
