// The dense-cotangent writer (memset + ReduceRuns) against a memset, then shapes of
// the fixed-length forward kernel (embed_kernels.cuh,
// EmbedFwdFixedKernel) timed against each other and against the physical
// limits on one GPU, without JAX: a device-to-device copy (bandwidth
// ceiling) and a plain gather that moves exactly the bytes a one-key bag
// must move (16 bytes per thread, no combiner). Every variant's output is
// checked against the first variant's.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -Ixla_ffi tools/kernel_variants.cu \
//        -o /tmp/kv && /tmp/kv   (optional args: table GiB, batch, and any
//                                 third to stop after the dense-fill part)
//
// Table float32 of `gib` GiB, batch x 26 bags, D in {16, 64, 128}, nnz 1
// and 4, uniform and Zipf(1.1) keys, combiner mean, int32 keys. Prints one
// line per (point, variant): median us of 20 event-timed runs, effective
// GB/s (valid rows read + output written + ids read, over time) and its
// fraction of the copy bandwidth.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "embed_kernels.cuh"

#define CK(x)                                                             \
  do {                                                                    \
    cudaError_t e_ = (x);                                                 \
    if (e_ != cudaSuccess) {                                              \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__,              \
                   cudaGetErrorString(e_));                               \
      std::exit(1);                                                       \
    }                                                                     \
  } while (0)

namespace {

constexpr int kBlock = 256;
constexpr int kSlots = 26;

__global__ void FillTable(float* t, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u;
    t[i] = static_cast<float>(h >> 8) * (1.0f / 16777216.0f) - 0.5f;
  }
}

// The gather floor: one 16-byte chunk per thread, row = ids[bag].
__global__ void PlainGather(const float4* __restrict__ table, int64_t chunks,
                            const int32_t* __restrict__ ids, int64_t m,
                            float4* __restrict__ out) {
  int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= m * chunks) return;
  int64_t b = t / chunks, c = t - b * chunks;
  out[t] = __ldg(table + ids[b] * chunks + c);
}

float TimeUs(const std::function<void()>& f) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ts;
  for (int i = 0; i < 20; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1000.f);
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

std::vector<int32_t> MakeKeys(std::mt19937_64& g, int64_t n, int64_t rows,
                              bool zipf) {
  std::vector<int32_t> k(n);
  if (!zipf) {
    std::uniform_int_distribution<int64_t> u(0, rows - 1);
    for (auto& x : k) x = static_cast<int32_t>(u(g));
    return k;
  }
  // Zipf(1.1) over the rows by inverse CDF, ranks scattered over the table.
  std::vector<double> cdf(rows);
  double s = 0;
  for (int64_t r = 0; r < rows; ++r) cdf[r] = (s += std::pow(r + 1.0, -1.1));
  std::uniform_real_distribution<double> u(0, s);
  for (auto& x : k) {
    int64_t r = std::lower_bound(cdf.begin(), cdf.end(), u(g)) - cdf.begin();
    x = static_cast<int32_t>((r * 2654435761ll) % rows);
  }
  return k;
}

struct Variant {
  const char* name;
  int cpl;
  void (*kernel)(const float*, int64_t, int64_t, const int32_t*, const float*,
                 int64_t, int64_t, int32_t, int, float*);
};

// The dense cotangent of a one-id-per-bag batch: `v` distinct rows of a
// 4 GiB D=128 table, each summed from one bag: memset + ReduceRuns (dense
// form, as sok_embed_bwd_dense runs them) against a bare memset (the
// floor); the touched rows are checked against a host sum.
void DenseFillBench(double gib, int64_t m, std::mt19937_64& g, double copy_gbs) {
  const int64_t dim = 128, rows = static_cast<int64_t>(gib * (1ll << 30)) / (dim * 4);
  std::vector<uint32_t> keys(m);
  std::uniform_int_distribution<int64_t> ud(0, rows - 1);
  for (auto& k : keys) k = static_cast<uint32_t>(ud(g));
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  const int64_t v = keys.size();
  std::vector<int32_t> ones(v, 1), seq(v), bags(v);
  std::uniform_int_distribution<int64_t> ub(0, m - 1);
  for (int64_t i = 0; i < v; ++i) seq[i] = static_cast<int32_t>(i), bags[i] = static_cast<int32_t>(ub(g));
  std::vector<float> sc(v, 0.5f);
  std::vector<int32_t> zeros(v, 0);
  int32_t nr = static_cast<int32_t>(v);
  auto up = [](const auto& h) {
    using E = typename std::decay_t<decltype(h)>::value_type;
    E* d;
    CK(cudaMalloc(&d, h.size() * sizeof(E)));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(E), cudaMemcpyHostToDevice));
    return d;
  };
  uint32_t* d_keys = up(keys);
  int32_t *d_counts = up(ones), *d_starts = up(seq), *d_spos = up(seq), *d_bags = up(bags),
          *d_chunks = up(zeros), *d_nr = up(std::vector<int32_t>{nr});
  float* d_sc = up(sc);
  float *grad, *a, *b;
  CK(cudaMalloc(&grad, m * dim * 4));
  FillTable<<<1024, kBlock>>>(grad, m * dim);
  CK(cudaMalloc(&a, rows * dim * 4));
  CK(cudaMalloc(&b, rows * dim * 4));
  const size_t bytes = size_t(rows) * dim * 4;
  const int tpb = sok::cuda::ThreadsPerBag(dim / 4, sok::cuda::kRunCpl);
  const float t_memset = TimeUs([&] { cudaMemsetAsync(a, 0, bytes); });
  const float t_dense = TimeUs([&] {
    cudaMemsetAsync(b, 0, bytes);
    using Sink = sok::cuda::DenseSink<float>;
    sok::cuda::ReduceRuns<float, 4, Sink><<<(v * tpb + kBlock - 1) / kBlock, kBlock>>>(
        grad, dim, d_keys, d_counts, d_starts, d_nr, d_chunks, d_spos, d_bags, d_sc, v,
        static_cast<uint32_t>(rows), tpb, Sink(b));
  });
  // Check: touched row keys[i] == 0.5 * grad[bags[i]]; an untouched row is 0.
  std::vector<float> hg(m * dim), row(dim);
  CK(cudaMemcpy(hg.data(), grad, hg.size() * 4, cudaMemcpyDeviceToHost));
  int64_t bad = 0;
  for (int64_t i = 0; i < v; i += 97) {
    CK(cudaMemcpy(row.data(), b + int64_t{keys[i]} * dim, dim * 4, cudaMemcpyDeviceToHost));
    for (int64_t d = 0; d < dim; ++d) bad += row[d] != 0.5f * hg[bags[i] * dim + d];
  }
  CK(cudaMemcpy(row.data(), b + (int64_t{keys[0]} == 0 ? 1 : 0) * dim, dim * 4,
                cudaMemcpyDeviceToHost));
  for (int64_t d = 0; d < dim; ++d) bad += row[d] != 0.f;
  const double gb = bytes / 1e9;
  std::printf("dense cotangent D128 %.1f GiB, %ld touched rows: memset %.1f us (%.0f GB/s "
              "write), memset + ReduceRuns %.1f us (%.2f x the memset), check %s\n",
              gib, (long)v, t_memset, gb / (t_memset * 1e-6), t_dense, t_dense / t_memset,
              bad ? "FAILED" : "ok");
  for (void* p : {(void*)d_keys, (void*)d_counts, (void*)d_starts, (void*)d_spos,
                  (void*)d_bags, (void*)d_chunks, (void*)d_nr, (void*)d_sc, (void*)grad,
                  (void*)a, (void*)b})
    CK(cudaFree(p));
}

template <int CPL, int U, int MINB>
Variant V(const char* name) {
  return {name, CPL, sok::cuda::EmbedFwdFixedKernel<float, int32_t, 4, CPL, U, MINB>};
}

}  // namespace

int main(int argc, char** argv) {
  const double gib = argc > 1 ? std::atof(argv[1]) : 4.0;
  const int64_t batch = argc > 2 ? std::atoll(argv[2]) : 16384;
  const int64_t m = batch * kSlots;
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs, L2 %d MiB\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20);

  const size_t copy_bytes = size_t{2} << 30;
  void *ca, *cb;
  CK(cudaMalloc(&ca, copy_bytes));
  CK(cudaMalloc(&cb, copy_bytes));
  CK(cudaMemset(ca, 1, copy_bytes));
  const float copy_us = TimeUs([&] { cudaMemcpyAsync(cb, ca, copy_bytes, cudaMemcpyDeviceToDevice); });
  const double copy_gbs = 2.0 * copy_bytes / (copy_us * 1e3);
  std::printf("copy bandwidth (read + write): %.0f GB/s\n", copy_gbs);
  CK(cudaFree(ca));
  CK(cudaFree(cb));

  const std::vector<Variant> one = {
      V<4, 1, 4>("cpl4 u1 b4 (built)"), V<4, 1, 8>("cpl4 u1 b8"),
      V<2, 1, 8>("cpl2 u1 b8"), V<1, 1, 8>("cpl1 u1 b8"),
      V<2, 1, 4>("cpl2 u1 b4")};
  const std::vector<Variant> four = {
      V<1, 4, 4>("cpl1 u4 b4 (built)"), V<2, 2, 4>("cpl2 u2 b4"),
      V<1, 2, 8>("cpl1 u2 b8"), V<2, 4, 4>("cpl2 u4 b4"),
      V<4, 1, 4>("cpl4 u1 b4"), V<1, 4, 6>("cpl1 u4 b6")};

  std::mt19937_64 g(0);
  DenseFillBench(gib, m, g, copy_gbs);
  if (argc > 3) return 0;  // dense fill only
  std::printf("%4s %4s %-8s %-20s %9s %8s %7s %s\n", "D", "nnz", "keys", "variant",
              "us", "GB/s", "%copy", "check");
  for (int64_t dim : {16, 64, 128}) {
    const int64_t rows = static_cast<int64_t>(gib * (1ll << 30)) / (dim * 4);
    float* table;
    CK(cudaMalloc(&table, rows * dim * sizeof(float)));
    FillTable<<<4096, kBlock>>>(table, rows * dim);
    float* out;
    CK(cudaMalloc(&out, m * dim * sizeof(float)));
    std::vector<float> ref(m * dim), got(m * dim);
    for (int nnz : {1, 4}) {
      for (bool zipf : {false, true}) {
        const int64_t n = m * nnz;
        auto keys = MakeKeys(g, n, rows, zipf);
        int32_t* ids;
        CK(cudaMalloc(&ids, n * sizeof(int32_t)));
        CK(cudaMemcpy(ids, keys.data(), n * sizeof(int32_t), cudaMemcpyHostToDevice));
        const double bytes = double(n) * dim * 4 + double(m) * dim * 4 + double(n) * 4;
        auto report = [&](const char* name, float us, const char* check) {
          const double gbs = bytes / (us * 1e3);
          std::printf("%4ld %4d %-8s %-20s %9.1f %8.0f %7.1f %s\n", (long)dim, nnz,
                      zipf ? "zipf" : "uniform", name, us, gbs, 100.0 * gbs / copy_gbs,
                      check);
        };
        if (nnz == 1) {
          const int64_t chunks = dim / 4;
          const int64_t threads = m * chunks;
          float us = TimeUs([&] {
            PlainGather<<<(threads + kBlock - 1) / kBlock, kBlock>>>(
                reinterpret_cast<const float4*>(table), chunks, ids, m,
                reinterpret_cast<float4*>(out));
          });
          report("plain gather (floor)", us, "-");
        }
        const auto& vs = nnz == 1 ? one : four;
        for (size_t i = 0; i < vs.size(); ++i) {
          const auto& v = vs[i];
          const int tpb = sok::cuda::ThreadsPerBag(dim / 4, v.cpl);
          const unsigned blocks = static_cast<unsigned>((m * tpb + kBlock - 1) / kBlock);
          CK(cudaMemset(out, 0xff, m * dim * sizeof(float)));  // poison
          float us = TimeUs([&] {
            v.kernel<<<blocks, kBlock>>>(table, rows, dim, ids, nullptr, nnz, m,
                                         sok::kMean, tpb, out);
          });
          auto& dst = i == 0 ? ref : got;
          CK(cudaMemcpy(dst.data(), out, m * dim * sizeof(float), cudaMemcpyDeviceToHost));
          bool ok = true;
          for (int64_t j = 0; j < m * dim && ok; ++j)
            ok = std::isfinite(dst[j]) && std::fabs(dst[j] - ref[j]) <= 1e-6f * (1 + std::fabs(ref[j]));
          report(v.name, us, ok ? "ok" : "MISMATCH");
        }
        CK(cudaFree(ids));
      }
    }
    CK(cudaFree(out));
    CK(cudaFree(table));
  }
  return 0;
}
