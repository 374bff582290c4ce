// The nanobind module of one platform: `registrations()` maps every FFI
// target name to a capsule of its handler. Built twice, as _sok_cpu and (with
// SOK_WITH_CUDA) as _sok_cuda, from the target lists each op family appends.
#include <nanobind/nanobind.h>

#include "common.h"

namespace nb = nanobind;

namespace {

nb::dict Registrations() {
  sok::TargetList targets;
#ifdef SOK_WITH_CUDA
  sok::AppendEmbedTargetsCuda(targets);
  sok::AppendOptimTargetsCuda(targets);
  sok::AppendHashTargetsCuda(targets);
  sok::AppendRowsTargetsCuda(targets);
  sok::AppendQuantTargetsCuda(targets);
#else
  sok::AppendEmbedTargetsCpu(targets);
  sok::AppendOptimTargetsCpu(targets);
  sok::AppendHashTargetsCpu(targets);
  sok::AppendRowsTargetsCpu(targets);
  sok::AppendQuantTargetsCpu(targets);
#endif
  nb::dict d;
  for (const auto& t : targets) d[t.name] = nb::capsule(t.handler);
  return d;
}

}  // namespace

#ifdef SOK_WITH_CUDA
NB_MODULE(_sok_cuda, m) {
#else
NB_MODULE(_sok_cpu, m) {
#endif
  m.def("registrations", &Registrations,
        "Maps each sok_jax FFI target name to its handler capsule.");
}
