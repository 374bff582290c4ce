// The cases the sanitizer driver runs: every sok_jax FFI target over the
// edge shapes of benchmarks/sanitize_kernels.py and more, each with how its
// CPU and CUDA results must agree and, where the driver has one, a brute
// force of the CPU result.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ffi_harness.h"

namespace sok {
namespace sanitize {

// How a result of the CUDA handler must match the CPU handler's.
enum class Compare {
  kExact,  // byte for byte (integer results)
  kClose,  // |cuda - cpu| <= tol * (1 + max|cpu|), as floats
  kNone,   // not compared (the CUDA-only workspace)
};

struct Output {
  RetSpec spec;
  Compare compare = Compare::kExact;
  double tol = 0.0;
};

// Calls another target's CPU handler (for checks that compose targets).
using CpuCall = std::function<CallResult(const std::string& target,
                                         const std::vector<Tensor>& args,
                                         const std::vector<RetSpec>& rets,
                                         const std::vector<Attr>& attrs)>;

struct Case {
  std::string target;  // the FFI target name, as registered
  std::string tag;     // what the case covers, for the log
  std::vector<Tensor> args;
  std::vector<Output> rets;
  std::vector<Attr> attrs;
  // Non-empty: both platforms must fail, with messages containing this.
  std::string expect_error;
  // The brute force of the CPU results: "" when they hold, else what failed.
  std::function<std::string(const Case&, const std::vector<Tensor>& cpu)> oracle;
  // Replaces the per-result Compare where the platforms may differ by design
  // (which slot a racing new hash key takes): "" when the CUDA results are
  // equivalent to the CPU results.
  std::function<std::string(const Case&, const std::vector<Tensor>& cpu,
                            const std::vector<Tensor>& cuda)>
      equivalent;
  // A check of the CPU results through other CPU targets (the fused update
  // against the backward followed by the update): "" when it holds.
  std::function<std::string(const Case&, const std::vector<Tensor>& cpu,
                            const CpuCall& call)>
      cross;
};

std::vector<RetSpec> Specs(const Case& c);

// Every case, in a fixed order, from one seed.
std::vector<Case> AllCases(uint64_t seed);

// Results compared by each Output's Compare: "" or the first mismatch.
std::string CompareOutputs(const Case& c, const std::vector<Tensor>& cpu,
                           const std::vector<Tensor>& cuda);

}  // namespace sanitize
}  // namespace sok
