// sok_sanitize: every sok_jax FFI target called through its real handlers
// with no XLA and no Python, so that compute-sanitizer sees only our code.
// Each case runs the CPU handler (checked against a brute force where the
// case has one), then, when built with CUDA, the CUDA handler of the same
// target on the same inputs, compared with the CPU results.
//
//   sok_sanitize [--cpu-only] [--filter T1,T2] [--stride K] [--offset I]
//                [--seed N] [--list] [--verbose] [--progress]
//
// --filter keeps the cases whose target name contains one of the strings;
// --progress prints a line every 100 cases (to see how far a slow tool got);
// --stride K --offset I keeps every K-th of those from the I-th. Exit status
// 0 when every case passed and every selected target ran, 1 on a failure, 3
// when the CUDA context broke (the remaining cases are not run).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "cases.h"
#include "common.h"
#include "ffi_harness.h"

namespace sok {
namespace sanitize {
namespace {

struct Options {
  bool cpu_only = false;
  bool list = false;
  bool verbose = false;
  bool progress = false;
  std::vector<std::string> filter;
  int64_t stride = 1;
  int64_t offset = 0;
  uint64_t seed = 20251;
};

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--cpu-only") o.cpu_only = true;
    else if (a == "--list") o.list = true;
    else if (a == "--verbose") o.verbose = true;
    else if (a == "--progress") o.progress = true;
    else if (a == "--filter") o.filter = Split(value());
    else if (a == "--stride") o.stride = std::max<int64_t>(1, std::atoll(value().c_str()));
    else if (a == "--offset") o.offset = std::atoll(value().c_str());
    else if (a == "--seed") o.seed = std::strtoull(value().c_str(), nullptr, 10);
    else {
      std::fprintf(stderr, "unknown argument %s (see the header of main.cc)\n", a.c_str());
      std::exit(2);
    }
  }
  return o;
}

std::map<std::string, XLA_FFI_Handler*> Handlers(const TargetList& targets) {
  std::map<std::string, XLA_FFI_Handler*> m;
  for (const Target& t : targets) m[t.name] = reinterpret_cast<XLA_FFI_Handler*>(t.handler);
  return m;
}

bool Selected(const Options& o, const std::string& target) {
  if (o.filter.empty()) return true;
  for (const std::string& f : o.filter)
    if (target.find(f) != std::string::npos) return true;
  return false;
}

std::string ExpectError(const char* platform, const Case& c, const CallResult& r) {
  if (r.error.empty()) return std::string(platform) + ": succeeded, expected an error";
  if (r.error.find(c.expect_error) == std::string::npos)
    return std::string(platform) + ": error \"" + r.error + "\", expected \"" +
           c.expect_error + "\"";
  return "";
}

int Main(int argc, char** argv) {
  const Options opt = Parse(argc, argv);
  TargetList cpu_targets;
  AppendEmbedTargetsCpu(cpu_targets);
  AppendOptimTargetsCpu(cpu_targets);
  AppendHashTargetsCpu(cpu_targets);
  AppendRowsTargetsCpu(cpu_targets);
  AppendQuantTargetsCpu(cpu_targets);
  const auto cpu = Handlers(cpu_targets);
  std::map<std::string, XLA_FFI_Handler*> cuda;
#ifdef SOK_SANITIZE_WITH_CUDA
  const bool with_cuda = !opt.cpu_only;
  TargetList cuda_targets;
  AppendEmbedTargetsCuda(cuda_targets);
  AppendOptimTargetsCuda(cuda_targets);
  AppendHashTargetsCuda(cuda_targets);
  AppendRowsTargetsCuda(cuda_targets);
  AppendQuantTargetsCuda(cuda_targets);
  cuda = Handlers(cuda_targets);
#else
  const bool with_cuda = false;
#endif

  const std::vector<Case> all = AllCases(opt.seed);
  std::vector<const Case*> cases;
  int64_t seen = 0;
  for (const Case& c : all) {
    if (!Selected(opt, c.target)) continue;
    if (seen++ % opt.stride == opt.offset % opt.stride) cases.push_back(&c);
  }
  if (opt.list) {
    for (const Case* c : cases) std::printf("%s  %s\n", c->target.c_str(), c->tag.c_str());
    return 0;
  }

  auto host = HostMemory();
  std::unique_ptr<Memory> device;
#ifdef SOK_SANITIZE_WITH_CUDA
  if (with_cuda) device = DeviceMemory();
#endif
  const CpuCall call_cpu = [&](const std::string& target, const std::vector<Tensor>& args,
                               const std::vector<RetSpec>& rets,
                               const std::vector<Attr>& attrs) {
    return Call(cpu.at(target), *host, args, rets, attrs);
  };

  struct Stats {
    int64_t cases = 0, failed = 0;
  };
  std::map<std::string, Stats> stats;
  for (const auto& [name, h] : cpu)
    if (Selected(opt, name)) stats[name];
  int64_t failed = 0;
  int status = 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::printf("sok_sanitize: %zu cases (%s)\n", cases.size(),
              with_cuda ? "CPU and CUDA handlers" : "CPU handlers only");
  int64_t done = 0;
  for (const Case* cp : cases) {
    const Case& c = *cp;
    if (opt.progress && done++ % 100 == 0)
      std::printf("[%lld/%zu %.0f s] %s\n", static_cast<long long>(done - 1), cases.size(),
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                  c.target.c_str());
    std::vector<std::string> problems;
    auto it = cpu.find(c.target);
    if (it == cpu.end() || (with_cuda && !cuda.count(c.target))) {
      problems.push_back("no handler registered under this name");
    } else {
      const std::vector<RetSpec> specs = Specs(c);
      const CallResult hr = Call(it->second, *host, c.args, specs, c.attrs);
      if (!c.expect_error.empty()) {
        if (auto e = ExpectError("cpu", c, hr); !e.empty()) problems.push_back(e);
      } else if (!hr.error.empty()) {
        problems.push_back("cpu: " + hr.error);
      } else {
        if (c.oracle)
          if (auto e = c.oracle(c, hr.rets); !e.empty()) problems.push_back("cpu vs brute force: " + e);
        if (c.cross)
          if (auto e = c.cross(c, hr.rets, call_cpu); !e.empty()) problems.push_back("cpu: " + e);
      }
      if (with_cuda) {
        const CallResult dr = Call(cuda.at(c.target), *device, c.args, specs, c.attrs);
        if (dr.error.find("after the call") != std::string::npos) {
          std::printf("FAIL %s  %s: cuda: %s\n", c.target.c_str(), c.tag.c_str(),
                      dr.error.c_str());
          std::printf("the CUDA context is broken: stopping\n");
          status = 3;
          ++stats[c.target].cases;
          ++stats[c.target].failed;
          ++failed;
          break;
        }
        if (!c.expect_error.empty()) {
          if (auto e = ExpectError("cuda", c, dr); !e.empty()) problems.push_back(e);
        } else if (!dr.error.empty()) {
          problems.push_back("cuda: " + dr.error);
        } else if (hr.error.empty()) {
          const std::string e = c.equivalent ? c.equivalent(c, hr.rets, dr.rets)
                                             : CompareOutputs(c, hr.rets, dr.rets);
          if (!e.empty()) problems.push_back("cuda vs cpu: " + e);
        }
      }
    }
    Stats& s = stats[c.target];
    ++s.cases;
    if (!problems.empty()) {
      ++s.failed;
      ++failed;
      for (const std::string& p : problems)
        std::printf("FAIL %s  %s: %s\n", c.target.c_str(), c.tag.c_str(), p.c_str());
    } else if (opt.verbose) {
      std::printf("ok   %s  %s\n", c.target.c_str(), c.tag.c_str());
    }
    std::fflush(stdout);
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::printf("\n%-28s %7s %7s\n", "target", "cases", "failed");
  int covered = 0;
  for (const auto& [name, s] : stats) {
    std::printf("%-28s %7lld %7lld\n", name.c_str(), static_cast<long long>(s.cases),
                static_cast<long long>(s.failed));
    if (s.cases > 0) ++covered;
  }
  std::printf("fake XLA FFI API calls:");
  for (const auto& [name, n] : ApiCallCounts())
    std::printf(" %s %lld", name.c_str(), static_cast<long long>(n));
  std::printf("\n");
  const int selected = static_cast<int>(stats.size());
  if (status == 0 && (failed > 0 || covered < selected)) status = 1;
  std::printf("SUMMARY %s: %zu cases, %lld failed, %d/%d targets covered, %.1f s%s\n",
              with_cuda ? "cpu+cuda" : "cpu", cases.size(), static_cast<long long>(failed),
              covered, selected, secs, status == 3 ? " (stopped early)" : "");
  return status;
}

}  // namespace
}  // namespace sanitize
}  // namespace sok

int main(int argc, char** argv) { return sok::sanitize::Main(argc, argv); }
