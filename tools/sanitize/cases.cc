// The driver's cases (cases.h). Random inputs from one seeded generator,
// never all zeros; the brute forces compute in double from the stored
// inputs and know nothing of the handlers' code beyond the documented
// semantics (embed_math.h RowOf / CombinerScale / WeightGrad, hash_math.h
// HashWord / NumBuckets / BucketStart / OrderWord / SketchCell / EmptyKey,
// which are the targets' definitions; the row movers' rows_checks.h).
#include "cases.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

#include "cpu_types.h"
#include "hash_math.h"

namespace sok {
namespace sanitize {
namespace {

constexpr XLA_FFI_DataType kF32 = XLA_FFI_DataType_F32;
constexpr XLA_FFI_DataType kBF16 = XLA_FFI_DataType_BF16;
constexpr XLA_FFI_DataType kF16 = XLA_FFI_DataType_F16;
constexpr XLA_FFI_DataType kS32 = XLA_FFI_DataType_S32;
constexpr XLA_FFI_DataType kU32 = XLA_FFI_DataType_U32;
constexpr XLA_FFI_DataType kS64 = XLA_FFI_DataType_S64;
constexpr XLA_FFI_DataType kU8 = XLA_FFI_DataType_U8;

constexpr XLA_FFI_DataType kTableTypes[] = {kF32, kBF16, kF16};
constexpr XLA_FFI_DataType kKeyTypes[] = {kS32, kU32, kS64};

enum Combiner { kSum = 0, kMean = 1, kSqrtn = 2 };
const char* const kCombinerNames[] = {"sum", "mean", "sqrtn"};

// The backward's chunk (embed_kernels.cuh kChunk): bags and runs longer than
// this take the chunked path.
constexpr int kChunk = 128;

class Rng {
 public:
  explicit Rng(uint64_t seed) : g_(seed) {}
  double Uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(g_);
  }
  double Normal() { return std::normal_distribution<double>(0.0, 1.0)(g_); }
  int64_t Int(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(g_);
  }
  bool Chance(double p) { return Uniform(0.0, 1.0) < p; }
  std::mt19937_64& engine() { return g_; }

 private:
  std::mt19937_64 g_;
};

std::string Fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string Fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// Tolerance of a float result of this storage type, relative to the
// result's largest magnitude (as sanitize_kernels.py).
double Tol(XLA_FFI_DataType dt) {
  return dt == kF32 ? 2e-5 : dt == kBF16 ? 1.6e-2 : 2e-3;
}

void SetFloat(Tensor& t, int64_t i, double v) {
  const float f = static_cast<float>(v);
  switch (t.dtype) {
    case kF32: t.as<float>()[i] = f; break;
    case kBF16: t.as<bf16_t>()[i] = FromFloat<bf16_t>(f); break;
    case kF16: t.as<f16_t>()[i] = FromFloat<f16_t>(f); break;
    default: std::abort();
  }
}

Tensor Floats(XLA_FFI_DataType dt, std::vector<int64_t> dims,
              const std::vector<double>& v) {
  Tensor t = MakeTensor(dt, std::move(dims));
  for (int64_t i = 0; i < t.count(); ++i) SetFloat(t, i, v[i]);
  return t;
}

Tensor Normals(Rng& rng, XLA_FFI_DataType dt, std::vector<int64_t> dims,
               double scale = 1.0) {
  Tensor t = MakeTensor(dt, std::move(dims));
  for (int64_t i = 0; i < t.count(); ++i) SetFloat(t, i, scale * rng.Normal());
  return t;
}

Tensor Uniforms(Rng& rng, std::vector<int64_t> dims, double lo, double hi,
                XLA_FFI_DataType dt = kF32) {
  Tensor t = MakeTensor(dt, std::move(dims));
  for (int64_t i = 0; i < t.count(); ++i) SetFloat(t, i, rng.Uniform(lo, hi));
  return t;
}

Tensor I32s(std::vector<int64_t> dims, const std::vector<int32_t>& v) {
  Tensor t = MakeTensor(kS32, std::move(dims));
  if (!v.empty()) std::memcpy(t.bytes.data(), v.data(), t.size_bytes());
  return t;
}

Tensor F32s(std::vector<int64_t> dims, const std::vector<float>& v) {
  Tensor t = MakeTensor(kF32, std::move(dims));
  if (!v.empty()) std::memcpy(t.bytes.data(), v.data(), t.size_bytes());
  return t;
}

// Keys stored in `dt` from int64 values (-1 is padding / EMPTY in every
// key type: 0xFFFFFFFF for uint32).
Tensor Keys(XLA_FFI_DataType dt, const std::vector<int64_t>& v) {
  Tensor t = MakeTensor(dt, {static_cast<int64_t>(v.size())});
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == kS32) t.as<int32_t>()[i] = static_cast<int32_t>(v[i]);
    else if (dt == kU32) t.as<uint32_t>()[i] = static_cast<uint32_t>(v[i]);
    else t.as<int64_t>()[i] = v[i];
  }
  return t;
}

// The id at position i as the targets read it (uint32 zero-extends).
int64_t KeyAt(const Tensor& t, int64_t i) {
  if (t.dtype == kS32) return t.as<int32_t>()[i];
  if (t.dtype == kU32) return t.as<uint32_t>()[i];
  return t.as<int64_t>()[i];
}

int64_t RowOfKey(const Tensor& ids, int64_t j, int64_t rows) {
  const int64_t k = KeyAt(ids, j);
  return (k >= 0 && k < rows) ? k : -1;
}

// ----------------------------------------------------------------- bags
struct Bags {
  XLA_FFI_DataType key = kS32;
  std::vector<int64_t> ids;
  std::vector<int32_t> offsets;
  std::vector<float> weights;  // empty: unweighted
  int64_t fixed_nnz = 0;

  int64_t n() const { return static_cast<int64_t>(ids.size()); }
  int64_t m() const { return static_cast<int64_t>(offsets.size()) - 1; }
  Tensor IdsT() const { return Keys(key, ids); }
  Tensor OffsetsT() const { return I32s({m() + 1}, offsets); }
  Tensor WeightsT() const {
    return F32s({static_cast<int64_t>(weights.size())}, weights);
  }
  // [lo, hi) of bag b as the targets read it.
  void Range(int64_t b, int64_t* lo, int64_t* hi) const {
    if (fixed_nnz > 0) {
      *lo = b * fixed_nnz;
      *hi = *lo + fixed_nnz;
      return;
    }
    *lo = std::min<int64_t>(std::max<int64_t>(offsets[b], 0), n());
    *hi = std::min<int64_t>(std::max<int64_t>(offsets[b + 1], *lo), n());
  }
  double W(int64_t j) const { return weights.empty() ? 1.0 : weights[j]; }
};

// Calls fn(bag, j, row) for every position j of every bag, in order, whose
// id names a row of a table of `rows` rows.
template <typename Fn>
void ForEachHit(const Bags& b, const Tensor& ids, int64_t rows, Fn&& fn) {
  for (int64_t bag = 0; bag < b.m(); ++bag) {
    int64_t lo, hi;
    b.Range(bag, &lo, &hi);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t r = RowOfKey(ids, j, rows);
      if (r >= 0) fn(bag, j, r);
    }
  }
}

// An out-of-range id of this key type (never padding).
int64_t BadId(Rng& rng, XLA_FFI_DataType key, int64_t rows) {
  switch (rng.Int(0, key == kS64 ? 3 : 2)) {
    case 0: return rows;
    case 1: return rows + 7;
    case 2: return -5;  // uint32: 0xFFFFFFFB
    default: return rows + (int64_t{1} << 40);
  }
}

// m bags of 0..max_len ids each, some out of range, some padding.
Bags RandomBags(Rng& rng, XLA_FFI_DataType key, int64_t m, int max_len,
                int64_t rows, bool weighted, double p_bad = 0.05,
                double p_pad = 0.1) {
  Bags b;
  b.key = key;
  b.offsets.push_back(0);
  for (int64_t i = 0; i < m; ++i)
    b.offsets.push_back(b.offsets.back() + static_cast<int32_t>(rng.Int(0, max_len)));
  const int64_t n = b.offsets.back();
  for (int64_t j = 0; j < n; ++j) {
    int64_t id = rng.Int(0, rows - 1);
    if (rng.Chance(p_bad)) id = BadId(rng, key, rows);
    if (rng.Chance(p_pad)) id = -1;
    b.ids.push_back(id);
  }
  if (weighted)
    for (int64_t j = 0; j < n; ++j)
      b.weights.push_back(static_cast<float>(rng.Uniform(0.5, 1.5)));
  return b;
}

// m bags of exactly nnz ids (offsets = arange * nnz, as the wrapper passes).
Bags FixedBags(Rng& rng, XLA_FFI_DataType key, int64_t m, int64_t nnz,
               int64_t rows, bool weighted) {
  Bags b;
  b.key = key;
  b.fixed_nnz = nnz;
  for (int64_t i = 0; i <= m; ++i) b.offsets.push_back(static_cast<int32_t>(i * nnz));
  for (int64_t j = 0; j < m * nnz; ++j) {
    int64_t id = rng.Int(0, rows - 1);
    if (rng.Chance(0.05)) id = BadId(rng, key, rows);
    if (rng.Chance(0.1)) id = -1;
    b.ids.push_back(id);
  }
  if (weighted)
    for (int64_t j = 0; j < m * nnz; ++j)
      b.weights.push_back(static_cast<float>(rng.Uniform(0.5, 1.5)));
  return b;
}

// The most positions (in bags, valid) that name one row: how many terms the
// backward sums for it, in float32 on both platforms.
int64_t MaxHits(const Bags& b, int64_t rows) {
  std::map<int64_t, int64_t> hits;
  int64_t most = 0;
  ForEachHit(b, b.IdsT(), rows,
             [&](int64_t, int64_t, int64_t r) { most = std::max(most, ++hits[r]); });
  return most;
}

// A float32 sum's tolerance: `base` up to 100 terms, growing with the number
// of terms past that (the platforms associate long sums differently: in
// position order on the CPU, in 128-position chunks on the GPU).
double SumTol(double base, int64_t terms) {
  return base * std::max(1.0, static_cast<double>(terms) / 100.0);
}

// ------------------------------------------------------------ oracles
double CombinerScale(int combiner, double ws, double w2) {
  if (combiner == kMean) return ws != 0.0 ? 1.0 / ws : 0.0;
  if (combiner == kSqrtn) return w2 > 0.0 ? 1.0 / std::sqrt(w2) : 0.0;
  return 1.0;
}

// The combiner's factor of each bag over its valid ids.
std::vector<double> BagScales(const Bags& b, const Tensor& ids, int64_t rows,
                              int combiner) {
  std::vector<double> ws(b.m(), 0.0), w2(b.m(), 0.0), f(b.m());
  ForEachHit(b, ids, rows, [&](int64_t bag, int64_t j, int64_t) {
    ws[bag] += b.W(j);
    w2[bag] += b.W(j) * b.W(j);
  });
  for (int64_t bag = 0; bag < b.m(); ++bag) f[bag] = CombinerScale(combiner, ws[bag], w2[bag]);
  return f;
}

std::vector<double> RefForward(const Tensor& table, const Bags& b, int combiner) {
  const int64_t rows = table.dims[0], dim = table.dims[1];
  const Tensor ids = b.IdsT();
  const std::vector<double> f = BagScales(b, ids, rows, combiner);
  std::vector<double> out(b.m() * dim, 0.0);
  ForEachHit(b, ids, rows, [&](int64_t bag, int64_t j, int64_t r) {
    for (int64_t d = 0; d < dim; ++d)
      out[bag * dim + d] += b.W(j) * f[bag] * FloatAt(table, r * dim + d);
  });
  return out;
}

// The dense table cotangent: per row, sum of w_j f(bag) grad[bag].
std::map<int64_t, std::vector<double>> RefBackward(const Tensor& grad,
                                                   const Bags& b,
                                                   int64_t rows, int combiner) {
  const int64_t dim = grad.dims[1];
  const Tensor ids = b.IdsT();
  const std::vector<double> f = BagScales(b, ids, rows, combiner);
  std::map<int64_t, std::vector<double>> acc;
  ForEachHit(b, ids, rows, [&](int64_t bag, int64_t j, int64_t r) {
    std::vector<double>& row = acc[r];
    row.resize(dim, 0.0);
    for (int64_t d = 0; d < dim; ++d)
      row[d] += b.W(j) * f[bag] * FloatAt(grad, bag * dim + d);
  });
  return acc;
}

// |got - want| <= tol * (1 + max|want|) over n values, NaN never allowed.
std::string Close(const char* what, int64_t n,
                  const std::function<double(int64_t)>& got,
                  const std::function<double(int64_t)>& want, double tol) {
  double scale = 0.0;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(want(i)));
  const double bound = tol * (1.0 + scale);
  for (int64_t i = 0; i < n; ++i) {
    const double g = got(i), w = want(i);
    if (!(std::fabs(g - w) <= bound))
      return Fmt("%s[%lld] = %.9g, want %.9g (bound %.3g)", what,
                 static_cast<long long>(i), g, w, bound);
  }
  return "";
}

std::string CheckSparse(const std::map<int64_t, std::vector<double>>& ref,
                        const Tensor& ur, const Tensor& rg,
                        const Tensor& count, int64_t dim, double tol) {
  const int64_t n = ur.count();
  const int32_t c = count.as<int32_t>()[0];
  if (c != static_cast<int32_t>(ref.size()))
    return Fmt("num_unique %d, want %zu", c, ref.size());
  int64_t u = 0;
  double scale = 0.0;
  for (const auto& [r, g] : ref)
    for (double v : g) scale = std::max(scale, std::fabs(v));
  const double bound = tol * (1.0 + scale);
  for (const auto& [r, g] : ref) {
    if (ur.as<int32_t>()[u] != r)
      return Fmt("unique_rows[%lld] = %d, want %lld", static_cast<long long>(u),
                 ur.as<int32_t>()[u], static_cast<long long>(r));
    for (int64_t d = 0; d < dim; ++d) {
      const double v = rg.as<float>()[u * dim + d];
      if (!(std::fabs(v - g[d]) <= bound))
        return Fmt("row_grads[%lld, %lld] = %.9g, want %.9g",
                   static_cast<long long>(u), static_cast<long long>(d), v, g[d]);
    }
    ++u;
  }
  for (; u < n; ++u) {
    if (ur.as<int32_t>()[u] != -1)
      return Fmt("unique_rows[%lld] = %d beyond num_unique, want -1",
                 static_cast<long long>(u), ur.as<int32_t>()[u]);
    for (int64_t d = 0; d < dim; ++d)
      if (rg.as<float>()[u * dim + d] != 0.f)
        return Fmt("row_grads[%lld] not zero beyond num_unique",
                   static_cast<long long>(u));
  }
  return "";
}

std::string CheckDense(const std::map<int64_t, std::vector<double>>& ref,
                       const Tensor& dense, double tol) {
  const int64_t dim = dense.dims[1];
  return Close(
      "dense", dense.count(), [&](int64_t i) { return FloatAt(dense, i); },
      [&](int64_t i) {
        auto it = ref.find(i / dim);
        return it == ref.end() ? 0.0 : it->second[i % dim];
      },
      tol);
}

// d out_b / d w_j contracted with g_b (embed_math.h WeightGrad), in double.
double RefWeightGrad(int combiner, double gdot, double w, double s, double ws,
                     double w2) {
  if (combiner == kMean) return ws == 0.0 ? 0.0 : (gdot - s / ws) / ws;
  if (combiner == kSqrtn) {
    if (!(w2 > 0.0)) return 0.0;
    const double r = std::sqrt(w2);
    return gdot / r - s * w / (w2 * r);
  }
  return gdot;
}

std::vector<double> RefWgrad(const Tensor& table, const Tensor& grad,
                             const Bags& b, int combiner) {
  const int64_t rows = table.dims[0], dim = table.dims[1];
  const Tensor ids = b.IdsT();
  std::vector<double> gw(b.n(), 0.0);
  for (int64_t bag = 0; bag < b.m(); ++bag) {
    int64_t lo, hi;
    b.Range(bag, &lo, &hi);
    double ws = 0, w2 = 0, s = 0;
    std::vector<double> gdot(hi - lo, 0.0);
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t r = RowOfKey(ids, j, rows);
      if (r < 0) continue;
      ws += b.W(j);
      w2 += b.W(j) * b.W(j);
      for (int64_t d = 0; d < dim; ++d)
        gdot[j - lo] += FloatAt(grad, bag * dim + d) * FloatAt(table, r * dim + d);
      s += b.W(j) * gdot[j - lo];
    }
    for (int64_t j = lo; j < hi; ++j)
      if (RowOfKey(ids, j, rows) >= 0)
        gw[j] = RefWeightGrad(combiner, gdot[j - lo], b.W(j), s, ws, w2);
  }
  return gw;
}

// ---------------------------------------------------------- case makers
Output Out(std::string name, XLA_FFI_DataType dt, std::vector<int64_t> dims,
           Compare cmp, double tol = 0.0, int alias = -1) {
  Output o;
  o.spec = RetSpec{std::move(name), dt, std::move(dims), alias};
  o.compare = cmp;
  o.tol = tol;
  return o;
}

// As sok_jax/ops/embed_ops.bwd_workspace_bytes.
int64_t WorkspaceBytes(int64_t n, int64_t dim) {
  return 36 * n + (16 * n + (int64_t{4} << 20)) + (n / 64 + 1) * dim * 4 + 8192;
}

std::string BagTag(const Bags& b, int64_t dim, XLA_FFI_DataType dt,
                   int combiner, const char* shape) {
  return Fmt("%s D%lld %s m%lld n%lld %s%s keys %s", DtypeName(dt),
             static_cast<long long>(dim), shape, static_cast<long long>(b.m()),
             static_cast<long long>(b.n()), kCombinerNames[combiner],
             b.weights.empty() ? "" : " w", DtypeName(b.key));
}

// A case of `target` whose arguments are `lead`, then the bags' ids,
// offsets and weights.
Case BagCase(const char* target, const std::string& tag, std::vector<Tensor> lead,
             const Bags& b) {
  Case c;
  c.target = target;
  c.tag = tag;
  c.args = std::move(lead);
  c.args.push_back(b.IdsT());
  c.args.push_back(b.OffsetsT());
  c.args.push_back(b.WeightsT());
  return c;
}

Case Fwd(const Tensor& table, const Bags& b, int combiner, const std::string& tag) {
  Case c = BagCase("sok_embed_fwd", tag, {table}, b);
  const int64_t dim = table.dims[1];
  c.rets = {Out("out", table.dtype, {b.m(), dim}, Compare::kClose, Tol(table.dtype))};
  c.attrs = {Attr::I32("combiner", combiner), Attr::I64("fixed_nnz", b.fixed_nnz)};
  const double tol = Tol(table.dtype);
  c.oracle = [b, combiner, tol](const Case& cs, const std::vector<Tensor>& out) {
    const std::vector<double> want = RefForward(cs.args[0], b, combiner);
    return Close("out", out[0].count(), [&](int64_t i) { return FloatAt(out[0], i); },
                 [&](int64_t i) { return want[i]; }, tol);
  };
  return c;
}

Case Bwd(const Tensor& grad, const Bags& b, int64_t rows, int combiner,
         const std::string& tag) {
  Case c = BagCase("sok_embed_bwd", tag, {grad}, b);
  const int64_t n = b.n(), dim = grad.dims[1];
  const double tol = SumTol(2e-5, MaxHits(b, rows));
  c.rets = {Out("unique_rows", kS32, {n}, Compare::kExact),
            Out("row_grads", kF32, {n, dim}, Compare::kClose, tol),
            Out("num_unique", kS32, {1}, Compare::kExact),
            Out("workspace", kU8, {WorkspaceBytes(n, dim)}, Compare::kNone)};
  c.attrs = {Attr::I32("combiner", combiner), Attr::I64("num_rows", rows)};
  c.oracle = [b, rows, combiner, dim, tol](const Case& cs, const std::vector<Tensor>& out) {
    return CheckSparse(RefBackward(cs.args[0], b, rows, combiner), out[0], out[1],
                       out[2], dim, tol);
  };
  return c;
}

Case BwdDense(const Tensor& grad, const Bags& b, int64_t rows, int combiner,
              const std::string& tag) {
  Case c = BagCase("sok_embed_bwd_dense", tag, {grad}, b);
  const int64_t dim = grad.dims[1];
  const double tol = std::max(Tol(grad.dtype), SumTol(2e-5, MaxHits(b, rows)));
  c.rets = {Out("dense", grad.dtype, {rows, dim}, Compare::kClose, tol),
            Out("workspace", kU8, {WorkspaceBytes(b.n(), dim)}, Compare::kNone)};
  c.attrs = {Attr::I32("combiner", combiner)};
  c.oracle = [b, rows, combiner, tol](const Case& cs, const std::vector<Tensor>& out) {
    return CheckDense(RefBackward(cs.args[0], b, rows, combiner), out[0], tol);
  };
  return c;
}

Case Wgrad(const Tensor& table, const Tensor& grad, const Bags& b, int combiner,
           const std::string& tag) {
  Case c = BagCase("sok_embed_wgrad", tag, {table, grad}, b);
  c.rets = {Out("weight_grad", kF32, {b.n()}, Compare::kClose, 1e-4)};
  c.attrs = {Attr::I32("combiner", combiner)};
  const double tol = table.dtype == kF32 ? 1e-4 : Tol(table.dtype);
  c.oracle = [b, combiner, tol](const Case& cs, const std::vector<Tensor>& out) {
    const std::vector<double> want = RefWgrad(cs.args[0], cs.args[1], b, combiner);
    return Close("weight_grad", out[0].count(),
                 [&](int64_t i) { return FloatAt(out[0], i); },
                 [&](int64_t i) { return want[i]; }, tol);
  };
  return c;
}

// rows_to_dense of unique rows [cap] with `count` valid entries (a row
// outside [0, rows) or -1 among them is skipped).
Case RowsToDense(Rng& rng, XLA_FFI_DataType dt, int64_t rows, int64_t dim,
                 int64_t cap, int32_t count, bool odd_rows) {
  std::vector<int64_t> all(rows);
  for (int64_t r = 0; r < rows; ++r) all[r] = r;
  std::shuffle(all.begin(), all.end(), rng.engine());
  std::vector<int32_t> ur(cap, -1);
  const int64_t valid = std::min<int64_t>(std::max(count, 0), cap);
  for (int64_t u = 0; u < valid; ++u) ur[u] = static_cast<int32_t>(all[u % rows]);
  if (odd_rows && valid >= 2) {
    ur[0] = static_cast<int32_t>(rows + 3);
    ur[valid - 1] = -1;
  }
  Case c;
  c.target = "sok_rows_to_dense";
  c.tag = Fmt("%s rows%lld D%lld cap%lld count%d%s", DtypeName(dt),
              static_cast<long long>(rows), static_cast<long long>(dim),
              static_cast<long long>(cap), count, odd_rows ? " odd rows" : "");
  c.args = {I32s({cap}, ur), Normals(rng, kF32, {cap, dim}), I32s({1}, {count})};
  c.rets = {Out("dense", dt, {rows, dim}, Compare::kClose, 0.0)};
  c.oracle = [ur, valid, rows, dim](const Case& cs, const std::vector<Tensor>& out) {
    const Tensor& grads = cs.args[1];
    std::vector<double> want(rows * dim, 0.0);
    for (int64_t u = 0; u < valid; ++u) {
      const int64_t r = ur[u];
      if (r < 0 || r >= rows) continue;
      for (int64_t d = 0; d < dim; ++d) want[r * dim + d] = grads.as<float>()[u * dim + d];
    }
    // The stored value is the float32 gradient rounded to the dense type.
    Tensor rounded = Floats(out[0].dtype, {rows, dim}, want);
    return Close("dense", out[0].count(), [&](int64_t i) { return FloatAt(out[0], i); },
                 [&](int64_t i) { return FloatAt(rounded, i); }, 0.0);
  };
  return c;
}

// -------------------------------------------------------------- optimizers
struct Rule {
  const char* update_target;  // sok_<rule>_update
  int fused_id;               // sok_embed_bwd_update's rule id, -1: none
  int slots;                  // slots: [R, D], or [R] when per_row
  std::vector<Attr> attrs;    // the update target's constants
  std::vector<float> consts;  // the same for the fused target, in order
  int hparams;                // learning rate (, step)
  bool per_row = false;       // one accumulator per row (row-wise Adagrad)
  bool stochastic = false;    // stochastic rounding of the table's write
  XLA_FFI_DataType slot_dtype = kF32;  // the slots' storage (slot_dtype)
};

std::vector<Rule> Rules(bool ftrl_pow) {
  const float lrp = ftrl_pow ? -0.7f : -0.5f;
  return {
      {"sok_sgd_update", 0, 0, {}, {0.f}, 1},
      {"sok_adagrad_update", 1, 1, {Attr::F32("eps", 1e-7f)}, {1e-7f}, 1},
      {"sok_adam_update", 2, 2,
       {Attr::F32("b1", 0.9f), Attr::F32("b2", 0.999f), Attr::F32("eps", 1e-8f),
        Attr::F32("eps_root", 0.f)},
       {0.9f, 0.999f, 1e-8f, 0.f}, 2},
      {"sok_ftrl_update", 3, 2,
       {Attr::F32("learning_rate_power", lrp),
        Attr::F32("l1_regularization_strength", 0.01f),
        Attr::F32("l2_regularization_strength", 0.001f),
        Attr::F32("l2_shrinkage_regularization_strength", 0.002f),
        Attr::F32("beta", 0.1f)},
       {lrp, 0.01f, 0.001f, 0.002f, 0.1f}, 1},
  };
}

// Row-wise Adagrad as a rule of the fused target (its update target takes
// Adagrad's signature with an [R] or [R, 1] accumulator).
Rule RowwiseRule() {
  Rule r{"sok_rowwise_adagrad_update", 4, 1, {Attr::F32("eps", 1e-7f)}, {1e-7f}, 1};
  r.per_row = true;
  return r;
}

// Slot k of a rule in its slot_dtype, random and never zero: an accumulator
// in [0.1, 1] (so Adagrad's and FTRL's steps are finite), Adam's m small, v
// in [0.01, 1].
Tensor Slot(Rng& rng, const Rule& rule, int k, std::vector<int64_t> dims) {
  const bool adam = rule.fused_id == 2, ftrl = rule.fused_id == 3;
  if ((adam && k == 0) || (ftrl && k == 1)) return Normals(rng, rule.slot_dtype, dims, 0.1);
  return Uniforms(rng, dims, adam ? 0.01 : 0.1, 1.0, rule.slot_dtype);
}

// A slot result's output spec: its rule's slot dtype, compared within `tol`
// (or one 16-bit slot's rounding, whichever is larger).
Output SlotOut(const Rule& rule, int k, std::vector<int64_t> dims, double tol, int alias) {
  const double t = rule.slot_dtype == kF32 ? tol : std::max(tol, Tol(rule.slot_dtype));
  return Out(Fmt("slot%d", k), rule.slot_dtype, std::move(dims), Compare::kClose, t, alias);
}

// The tag of a rule's slot dtype and rounding in a case's name.
std::string RuleTag(const Rule& rule) {
  return std::string(rule.slot_dtype == kF32 ? "" : Fmt(" slots %s", DtypeName(rule.slot_dtype))) +
         (rule.stochastic ? " sr" : "");
}

// The rule's hparams, then with stochastic rounding its words
// (rounding_math.h StochasticRounding: seed 0xbeef1234 and step 70007 as
// 16-bit halves, low first).
std::vector<float> Hparams(const Rule& rule) {
  std::vector<float> hp =
      rule.hparams == 2 ? std::vector<float>{0.05f, 3.f} : std::vector<float>{0.05f};
  if (rule.stochastic) hp.insert(hp.end(), {0x1234, 0xbeef, 70007 & 0xffff, 70007 >> 16});
  return hp;
}

Tensor HparamsT(const Rule& rule) {
  const std::vector<float> hp = Hparams(rule);
  return F32s({static_cast<int64_t>(hp.size())}, hp);
}

// An update target's attributes: its constants (Adagrad's for the row-wise
// target), then stochastic_rounding.
std::vector<Attr> UpdateAttrs(const Rule& rule, bool rowwise) {
  std::vector<Attr> a = rowwise ? std::vector<Attr>{Attr::F32("eps", 1e-7f)} : rule.attrs;
  a.push_back(Attr::I32("stochastic_rounding", rule.stochastic ? 1 : 0));
  return a;
}

// `rule` writing its table (and 16-bit slots) by stochastic rounding.
Rule Stochastic(Rule rule) {
  rule.stochastic = true;
  return rule;
}

// `rule` with its slots stored as `dt`.
Rule WithSlots(Rule rule, XLA_FFI_DataType dt) {
  rule.slot_dtype = dt;
  return rule;
}

// One sok_*_update call: `cap` unique rows of which `count` are valid (a -1
// and an out-of-range row among them when `odd_rows`).
Case Update(Rng& rng, const Rule& rule, bool rowwise, XLA_FFI_DataType dt,
            int64_t rows, int64_t dim, int64_t cap, int32_t count, bool odd_rows,
            bool alias, bool acc_2d) {
  std::vector<int64_t> perm(rows);
  for (int64_t r = 0; r < rows; ++r) perm[r] = r;
  std::shuffle(perm.begin(), perm.end(), rng.engine());
  std::vector<int32_t> ur(cap, -1);
  const int64_t valid = std::min<int64_t>(std::max(count, 0), cap);
  for (int64_t u = 0; u < valid && u < rows; ++u) ur[u] = static_cast<int32_t>(perm[u]);
  if (odd_rows && valid >= 2) {
    ur[0] = static_cast<int32_t>(rows + 3);
    ur[valid - 1] = -1;
  }
  Case c;
  c.target = rowwise ? "sok_rowwise_adagrad_update" : rule.update_target;
  c.tag = Fmt("%s rows%lld D%lld cap%lld count%d%s%s%s%s", DtypeName(dt),
              static_cast<long long>(rows), static_cast<long long>(dim),
              static_cast<long long>(cap), count, odd_rows ? " odd rows" : "",
              alias ? "" : " unaliased", acc_2d ? " acc[R,1]" : "",
              RuleTag(rule).c_str());
  const double tol = dt == kF32 ? 1e-5 : Tol(dt);
  c.args.push_back(Normals(rng, dt, {rows, dim}));
  c.rets.push_back(Out("table", dt, {rows, dim}, Compare::kClose, tol, alias ? 0 : -1));
  const int slots = rowwise ? 1 : rule.slots;
  for (int k = 0; k < slots; ++k) {
    std::vector<int64_t> sd = rowwise ? (acc_2d ? std::vector<int64_t>{rows, 1}
                                                : std::vector<int64_t>{rows})
                                      : std::vector<int64_t>{rows, dim};
    c.args.push_back(Slot(rng, rule, k, sd));
    c.rets.push_back(SlotOut(rule, k, sd, 1e-5, alias ? 1 + k : -1));
  }
  c.args.push_back(I32s({cap}, ur));
  c.args.push_back(Normals(rng, kF32, {cap, dim}));
  c.args.push_back(I32s({1}, {count}));
  c.args.push_back(HparamsT(rule));
  c.attrs = UpdateAttrs(rule, rowwise);
  return c;
}

// One sok_embed_bwd_update call, cross-checked on the CPU against
// sok_embed_bwd followed by the rule's sok_*_update (a per-row rule's
// accumulator [R], or [R, 1] when acc_2d).
Case BwdUpdate(Rng& rng, const Rule& rule, XLA_FFI_DataType dt, int64_t rows,
               int64_t dim, const Bags& b, int combiner, bool grad_f32,
               bool alias, const std::string& shape, bool acc_2d = false) {
  Case c;
  c.target = "sok_embed_bwd_update";
  c.tag = Fmt("%s ", rule.update_target) +
          BagTag(b, dim, dt, combiner, shape.c_str()) + (grad_f32 ? " g32" : "") +
          (alias ? "" : " unaliased") + (acc_2d ? " acc[R,1]" : "") + RuleTag(rule);
  const double sum_tol = SumTol(1e-4, MaxHits(b, rows));
  const double tol = std::max(dt == kF32 ? 0.0 : Tol(dt), sum_tol);
  const std::vector<int64_t> slot_dims =
      !rule.per_row ? std::vector<int64_t>{rows, dim}
                    : (acc_2d ? std::vector<int64_t>{rows, 1} : std::vector<int64_t>{rows});
  c.args.push_back(Normals(rng, dt, {rows, dim}));
  c.rets.push_back(Out("table", dt, {rows, dim}, Compare::kClose, tol, alias ? 0 : -1));
  for (int k = 0; k < 2; ++k) {
    if (k < rule.slots) {
      c.args.push_back(Slot(rng, rule, k, slot_dims));
      c.rets.push_back(SlotOut(rule, k, slot_dims, sum_tol, alias ? 1 + k : -1));
    } else {  // the wrapper's [0] dummy of the slots' dtype, not aliased
      c.args.push_back(MakeTensor(rule.slot_dtype, {0}));
      c.rets.push_back(Out(Fmt("slot%d", k), rule.slot_dtype, {0}, Compare::kExact));
    }
  }
  c.args.push_back(Normals(rng, grad_f32 ? kF32 : dt, {b.m(), dim}));
  c.args.push_back(b.IdsT());
  c.args.push_back(b.OffsetsT());
  c.args.push_back(b.WeightsT());
  c.args.push_back(HparamsT(rule));
  c.rets.push_back(Out("workspace", kU8, {WorkspaceBytes(b.n(), dim)}, Compare::kNone));
  c.attrs = {Attr::I32("combiner", combiner), Attr::I32("rule", rule.fused_id),
             Attr::F32Array("consts", rule.consts),
             Attr::I32("stochastic_rounding", rule.stochastic ? 1 : 0)};
  c.cross = [rule, rows, combiner](const Case& cs, const std::vector<Tensor>& fused,
                                   const CpuCall& call) -> std::string {
    const Tensor& grad = cs.args[3];
    const int64_t n = cs.args[4].count(), dim = grad.dims[1];
    CallResult sp = call(
        "sok_embed_bwd", {grad, cs.args[4], cs.args[5], cs.args[6]},
        {RetSpec{"unique_rows", kS32, {n}}, RetSpec{"row_grads", kF32, {n, dim}},
         RetSpec{"num_unique", kS32, {1}}, RetSpec{"workspace", kU8, {WorkspaceBytes(n, dim)}}},
        {Attr::I32("combiner", combiner), Attr::I64("num_rows", rows)});
    if (!sp.error.empty()) return "sok_embed_bwd: " + sp.error;
    std::vector<Tensor> args = {cs.args[0]};
    std::vector<RetSpec> rets = {RetSpec{"table", cs.args[0].dtype, cs.args[0].dims, 0}};
    for (int k = 0; k < rule.slots; ++k) {
      args.push_back(cs.args[1 + k]);
      rets.push_back(RetSpec{"slot", cs.args[1 + k].dtype, cs.args[1 + k].dims, 1 + k});
    }
    args.insert(args.end(), {sp.rets[0], sp.rets[1], sp.rets[2], cs.args[7]});
    CallResult up = call(rule.update_target, args, rets, UpdateAttrs(rule, false));
    if (!up.error.empty()) return std::string(rule.update_target) + ": " + up.error;
    for (size_t k = 0; k < up.rets.size(); ++k)
      if (up.rets[k].bytes != fused[k].bytes)
        return Fmt("result %zu differs from sok_embed_bwd + %s", k, rule.update_target);
    return "";
  };
  return c;
}

// ------------------------------------------------------------------ hash
// A hash call's setup: the table state before it and how it is called.
struct HashSetup {
  int32_t policy = kNoEviction;
  int32_t admit_after = 0;
  int32_t depth = 2, width = 0;  // width 0: no sketch
  bool scores = false;
  int32_t step = 1;
};

template <typename K>
struct HashRef {
  std::vector<K> slots;
  std::vector<int32_t> last_seen, count, sketch;
  std::vector<int32_t> rows, is_new, status;
  std::vector<K> evicted;
};

// The insertion rule of hash_math.h by brute force: buckets by their bounds,
// the claim order by sorting order words, victims by sorting (score, key),
// every search a full scan of the bucket chain. Uses hash_math.h only for
// the hash words, bucket bounds and sketch cells.
template <typename K>
HashRef<K> RefHash(HashRef<K> t, const std::vector<K>& keys, bool insert,
                   const HashSetup& h) {
  const K empty = EmptyKey<K>();
  const int32_t cap = static_cast<int32_t>(t.slots.size());
  const int32_t nb = NumBuckets(cap);
  const bool evict = h.policy != kNoEviction;
  auto lo = [&](int32_t b) { return BucketStart(b, cap, nb); };
  auto find = [&](K k) -> int32_t {
    int32_t b = HomeBucket(k, nb);
    for (int32_t v = 0; v < nb; ++v, b = (b + 1) % nb) {
      bool open = false;
      for (int32_t s = lo(b); s < lo(b + 1); ++s) {
        if (t.slots[s] == k && (evict || !open)) return s;
        open |= t.slots[s] == empty;
      }
      if (evict || open) return -1;
    }
    return -1;
  };
  const size_t n = keys.size();
  t.rows.assign(n, -1);
  t.is_new.assign(n, 0);
  t.status.assign(n, kPadding);
  t.evicted.assign(n, empty);
  std::map<K, std::vector<size_t>> misses;
  std::set<int32_t> stamped;
  for (size_t i = 0; i < n; ++i) {
    if (keys[i] == empty) continue;
    const int32_t r = find(keys[i]);
    if (r >= 0) {
      t.rows[i] = r;
      t.status[i] = kFound;
      if (insert && h.scores && stamped.insert(r).second && t.last_seen[r] != h.step) {
        t.last_seen[r] = h.step;
        ++t.count[r];
      }
    } else if (insert) {
      misses[keys[i]].push_back(i);
    } else {
      t.status[i] = kMissing;
    }
  }
  if (!insert) return t;
  std::vector<K> order;
  for (auto& kv : misses) order.push_back(kv.first);
  std::sort(order.begin(), order.end(),
            [](K a, K b) { return OrderWord(a) < OrderWord(b); });
  std::map<K, int32_t> est;
  for (K k : order) est[k] = 1;
  if (h.admit_after > 0) {
    for (K k : order)
      for (int32_t d = 0; d < h.depth; ++d) ++t.sketch[SketchCell(k, d, h.width)];
    for (K k : order) {
      int32_t e = INT32_MAX;
      for (int32_t d = 0; d < h.depth; ++d) e = std::min(e, t.sketch[SketchCell(k, d, h.width)]);
      est[k] = e;
    }
  }
  std::map<K, int32_t> placed;
  auto place = [&](K k, int32_t r) {
    const size_t first = misses[k][0];
    t.evicted[first] = t.slots[r];
    t.slots[r] = k;
    if (h.scores) {
      t.last_seen[r] = h.step;
      t.count[r] = est[k];
    }
    t.is_new[first] = 1;
    placed[k] = r;
  };
  std::vector<K> left;
  for (int32_t b = 0; b < nb; ++b) {
    std::vector<int32_t> free_rows, victims;
    for (int32_t s = lo(b); s < lo(b + 1); ++s) {
      if (t.slots[s] == empty) free_rows.push_back(s);
      else if (evict && t.last_seen[s] != h.step) victims.push_back(s);
    }
    const std::vector<int32_t>& score = h.policy == kEvictLru ? t.last_seen : t.count;
    std::sort(victims.begin(), victims.end(), [&](int32_t a, int32_t c) {
      return score[a] != score[c] ? score[a] < score[c] : t.slots[a] < t.slots[c];
    });
    size_t f = 0, v = 0;
    for (K k : order) {
      if (HomeBucket(k, nb) != b || (h.admit_after > 0 && est[k] < h.admit_after)) continue;
      if (f < free_rows.size()) place(k, free_rows[f++]);
      else if (evict && v < victims.size()) place(k, victims[v++]);
      else if (!evict) left.push_back(k);
    }
  }
  for (K k : left) {  // already in claim order
    int32_t b = HomeBucket(k, nb);
    for (int32_t d = 1; d < nb && !placed.count(k); ++d) {
      const int32_t bb = (b + d) % nb;
      for (int32_t s = lo(bb); s < lo(bb + 1); ++s)
        if (t.slots[s] == empty) {
          place(k, s);
          break;
        }
    }
  }
  for (auto& kv : misses)
    for (size_t i : kv.second) {
      if (placed.count(kv.first)) {
        t.rows[i] = placed[kv.first];
        t.status[i] = kInserted;
      } else {
        t.status[i] = h.admit_after > 0 && est[kv.first] < h.admit_after ? kNotAdmitted : kFull;
      }
    }
  return t;
}

template <typename K>
std::vector<K> ToVec(const Tensor& t) {
  return std::vector<K>(t.as<K>(), t.as<K>() + t.count());
}

// As sok_jax/ops/hash_ops.workspace_bytes.
int64_t HashWorkspaceBytes(int64_t n, XLA_FFI_DataType dt) {
  const int64_t order = dt == kS64 ? 8 : 4;
  return n * (12 + 2 * order) + (16 * n + (int64_t{4} << 20)) + 8192;
}

template <typename K>
Case HashCaseT(Rng& rng, XLA_FFI_DataType dt, int32_t cap, int64_t n, int64_t prefill,
               bool insert, bool alias, const HashSetup& h) {
  const K empty = EmptyKey<K>();
  // Keys in [-3, 4 cap), -1 (EMPTY) being padding; int64 keys spread wide.
  auto key = [&]() {
    int64_t k = rng.Int(-3, 4 * static_cast<int64_t>(cap));
    if (dt == kS64 && k > 0 && rng.Chance(0.5)) k += int64_t{1} << 40;
    return static_cast<K>(k);
  };
  std::vector<K> pre;
  for (int64_t i = 0; i < prefill; ++i) pre.push_back(key());
  HashRef<K> t0;
  t0.slots.assign(cap, empty);
  if (h.scores) {
    t0.last_seen.assign(cap, 0);
    t0.count.assign(cap, 0);
  }
  t0.sketch.assign(h.width ? h.depth * h.width : 0, 0);
  HashSetup fill = h;
  fill.step = h.step - 1;
  fill.admit_after = 0;
  t0 = RefHash<K>(t0, pre, true, fill);
  std::vector<K> keys;
  for (int64_t i = 0; i < n; ++i) {
    // A find over a filled table asks for stored keys half the time.
    if (prefill > 0 && rng.Chance(insert ? 0.3 : 0.5)) keys.push_back(pre[rng.Int(0, prefill - 1)]);
    else keys.push_back(key());
  }
  Case c;
  c.target = "sok_hash_find_or_insert";
  c.tag = Fmt("%s cap%d keys%lld prefill%lld %s policy%d admit%d%s%s", DtypeName(dt), cap,
              static_cast<long long>(n), static_cast<long long>(prefill),
              insert ? "insert" : "find", h.policy, h.admit_after, h.scores ? " scores" : "",
              alias ? "" : " unaliased");
  auto tensor = [](XLA_FFI_DataType d, const void* data, int64_t count, size_t item) {
    Tensor x = MakeTensor(d, {count});
    if (count) std::memcpy(x.bytes.data(), data, count * item);
    return x;
  };
  const int64_t sc = h.scores ? cap : 0, sk = static_cast<int64_t>(t0.sketch.size());
  const int32_t step = h.step;
  c.args = {tensor(dt, t0.slots.data(), cap, sizeof(K)),
            tensor(kS32, t0.last_seen.data(), sc, 4),
            tensor(kS32, t0.count.data(), sc, 4),
            tensor(kS32, t0.sketch.data(), sk, 4),
            tensor(dt, keys.data(), n, sizeof(K)),
            tensor(kS32, &step, 1, 4)};
  const int a = alias ? 0 : -1;
  c.rets = {Out("slot_keys", dt, {cap}, Compare::kExact, 0.0, alias ? 0 : -1),
            Out("last_seen", kS32, {sc}, Compare::kExact, 0.0, alias ? 1 : a),
            Out("count", kS32, {sc}, Compare::kExact, 0.0, alias ? 2 : a),
            Out("sketch", kS32, {sk}, Compare::kExact, 0.0, alias ? 3 : a),
            Out("rows", kS32, {n}, Compare::kExact),
            Out("is_new", kS32, {n}, Compare::kExact),
            Out("evicted", dt, {n}, Compare::kExact),
            Out("status", kS32, {n}, Compare::kExact),
            Out("workspace", kU8, {insert ? HashWorkspaceBytes(n, dt) : 1}, Compare::kNone)};
  c.attrs = {Attr::I32("insert", insert ? 1 : 0), Attr::I32("policy", h.policy),
             Attr::I32("admit_after", h.admit_after), Attr::I32("sketch_depth", h.depth)};
  c.oracle = [t0, keys, insert, h](const Case&, const std::vector<Tensor>& out) -> std::string {
    const HashRef<K> ref = RefHash<K>(t0, keys, insert, h);
    if (ToVec<K>(out[0]) != ref.slots) return "slot_keys differ from the brute force";
    if (ToVec<int32_t>(out[1]) != ref.last_seen) return "last_seen differs from the brute force";
    if (ToVec<int32_t>(out[2]) != ref.count) return "count differs from the brute force";
    if (ToVec<int32_t>(out[3]) != ref.sketch) return "sketch differs from the brute force";
    if (ToVec<int32_t>(out[4]) != ref.rows) return "rows differ from the brute force";
    if (ToVec<int32_t>(out[5]) != ref.is_new) return "is_new differs from the brute force";
    if (ToVec<K>(out[6]) != ref.evicted) return "evicted differs from the brute force";
    if (ToVec<int32_t>(out[7]) != ref.status) return "status differs from the brute force";
    return "";
  };
  return c;
}

Case HashCase(Rng& rng, XLA_FFI_DataType dt, int32_t cap, int64_t n, int64_t prefill,
              bool insert, bool alias, const HashSetup& h = HashSetup{}) {
  if (dt == kS32) return HashCaseT<int32_t>(rng, dt, cap, n, prefill, insert, alias, h);
  if (dt == kU32) return HashCaseT<uint32_t>(rng, dt, cap, n, prefill, insert, alias, h);
  return HashCaseT<int64_t>(rng, dt, cap, n, prefill, insert, alias, h);
}

// ------------------------------------------------------------------ rows
// A row mover's table: [rows] when width < 0 (rank 1), else [rows, width].
std::vector<int64_t> TableDims(int64_t rows, int64_t width) {
  return width < 0 ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, width};
}

// The bytes of one row of a rank-1 or rank-2 table (rows_checks.h RowsOf).
int64_t RowBytes(const Tensor& t) {
  return (t.dims.size() == 2 ? t.dims[1] : 1) * static_cast<int64_t>(ByteWidthOf(t.dtype));
}

// Random bytes of any dtype (NaN and subnormal patterns included): the movers
// copy rows without reading their values.
Tensor RandomBytes(Rng& rng, XLA_FFI_DataType dt, std::vector<int64_t> dims) {
  Tensor t = MakeTensor(dt, std::move(dims));
  for (uint8_t& b : t.bytes) b = static_cast<uint8_t>(rng.Int(0, 255));
  return t;
}

// Row r of `from` written over row i of `to` (one row width).
void CopyRow(const Tensor& from, int64_t r, Tensor& to, int64_t i) {
  const int64_t b = RowBytes(from);
  if (b) std::memcpy(to.bytes.data() + i * b, from.bytes.data() + r * b, b);
}

bool NamesRow(int32_t r, int64_t rows) { return r >= 0 && r < rows; }

// A row index that names no row of a table of `rows` rows.
int32_t BadRow(Rng& rng, int64_t rows) {
  switch (rng.Int(0, 4)) {
    case 0: return static_cast<int32_t>(rows);
    case 1: return -1;
    case 2: return -7;
    case 3: return INT32_MAX;
    default: return INT32_MIN;
  }
}

// k row indices into a table of `rows` rows, about a tenth naming no row;
// with `distinct` the ones naming a row are distinct (once the table's rows
// run out, the rest name none).
std::vector<int32_t> RowList(Rng& rng, int64_t k, int64_t rows, bool distinct) {
  std::vector<int32_t> perm(distinct ? rows : 0);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng.engine());
  std::vector<int32_t> out;
  size_t next = 0;
  for (int64_t i = 0; i < k; ++i) {
    if (rows == 0 || rng.Chance(0.1) || (distinct && next == perm.size()))
      out.push_back(BadRow(rng, rows));
    else
      out.push_back(distinct ? perm[next++] : static_cast<int32_t>(rng.Int(0, rows - 1)));
  }
  return out;
}

// A row mover case's tag: dtype, table shape, rows listed, bytes a row (which
// word path the CUDA kernel takes).
std::string RowsTag(const Tensor& table, int64_t k, const char* shape) {
  std::string dims;
  for (int64_t d : table.dims)
    dims += Fmt("%s%lld", dims.empty() ? "[" : ", ", static_cast<long long>(d));
  dims += "]";
  return Fmt("%s %s K%lld %lldB rows%s", DtypeName(table.dtype), dims.c_str(),
             static_cast<long long>(k), static_cast<long long>(RowBytes(table)), shape);
}

// sok_rows_gather: out[i] = src[rows[i]], zeros where rows[i] names no row.
Case RowsGather(const Tensor& src, const std::vector<int32_t>& rows, const char* shape = "") {
  const int64_t k = static_cast<int64_t>(rows.size());
  std::vector<int64_t> dims = src.dims;
  dims[0] = k;
  Case c;
  c.target = "sok_rows_gather";
  c.tag = RowsTag(src, k, shape);
  c.args = {src, I32s({k}, rows)};
  c.rets = {Out("out", src.dtype, dims, Compare::kExact)};
  c.oracle = [](const Case& cs, const std::vector<Tensor>& out) {
    const Tensor &table = cs.args[0], &rows = cs.args[1];
    Tensor want = MakeTensor(out[0].dtype, out[0].dims);
    for (int64_t i = 0; i < rows.count(); ++i)
      if (NamesRow(rows.as<int32_t>()[i], table.dims[0]))
        CopyRow(table, rows.as<int32_t>()[i], want, i);
    return CompareOutputs(cs, out, {want});
  };
  return c;
}

// sok_rows_scatter (or `target`, sok_rows_scatter_async, finished by the
// time the harness reads it back): dst[rows[i]] = values[i] where rows[i]
// names a row (those distinct); dst_out aliases dst unless `alias` is false.
Case RowsScatter(const Tensor& dst, const std::vector<int32_t>& rows, const Tensor& values,
                 bool alias, const char* shape = "", const char* target = "sok_rows_scatter") {
  const int64_t k = static_cast<int64_t>(rows.size());
  Case c;
  c.target = target;
  c.tag = RowsTag(dst, k, shape) + (alias ? "" : " unaliased");
  c.args = {dst, I32s({k}, rows), values};
  c.rets = {Out("dst_out", dst.dtype, dst.dims, Compare::kExact, 0.0, alias ? 0 : -1)};
  c.oracle = [](const Case& cs, const std::vector<Tensor>& out) {
    const Tensor &rows = cs.args[1], &values = cs.args[2];
    Tensor want = cs.args[0];
    for (int64_t i = 0; i < rows.count(); ++i)
      if (NamesRow(rows.as<int32_t>()[i], want.dims[0]))
        CopyRow(values, i, want, rows.as<int32_t>()[i]);
    return CompareOutputs(cs, out, {want});
  };
  return c;
}

// sok_rows_join: x unchanged (waiting for the side stream's scatters), the
// other operands only held; x_out aliases x.
Case RowsJoin(const Tensor& x, const std::vector<Tensor>& kept) {
  Case c;
  c.target = "sok_rows_join";
  c.tag = Fmt("%s, %zu kept", RowsTag(x, x.dims[0], "").c_str(), kept.size());
  c.args = {x};
  c.args.insert(c.args.end(), kept.begin(), kept.end());
  c.rets = {Out("x_out", x.dtype, x.dims, Compare::kExact, 0.0, 0)};
  c.oracle = [](const Case& cs, const std::vector<Tensor>& out) {
    return CompareOutputs(cs, out, {cs.args[0]});
  };
  return c;
}

// sok_rows_copy: dst[dst_rows[i]] = src[src_rows[i]] for i < count (all
// pairs when count is -1) where both name a row (the dst ones distinct);
// dst_out aliases dst unless `alias` is false.
Case RowsCopy(const Tensor& dst, const std::vector<int32_t>& dst_rows, const Tensor& src,
              const std::vector<int32_t>& src_rows, bool alias, const char* shape = "",
              int32_t count = -1) {
  const int64_t k = static_cast<int64_t>(dst_rows.size());
  if (count < 0) count = static_cast<int32_t>(k);
  Case c;
  c.target = "sok_rows_copy";
  c.tag = RowsTag(dst, k, shape) + Fmt(" from %lld rows", static_cast<long long>(src.dims[0])) +
          (count == k ? "" : Fmt(" count %d", count)) + (alias ? "" : " unaliased");
  c.args = {dst, I32s({k}, dst_rows), src,
            I32s({static_cast<int64_t>(src_rows.size())}, src_rows), I32s({1}, {count})};
  c.rets = {Out("dst_out", dst.dtype, dst.dims, Compare::kExact, 0.0, alias ? 0 : -1)};
  c.oracle = [](const Case& cs, const std::vector<Tensor>& out) {
    const Tensor &to = cs.args[1], &src = cs.args[2], &from = cs.args[3];
    const int64_t live = std::min<int64_t>(to.count(), cs.args[4].as<int32_t>()[0]);
    Tensor want = cs.args[0];
    for (int64_t i = 0; i < live; ++i) {
      const int32_t d = to.as<int32_t>()[i], r = from.as<int32_t>()[i];
      if (NamesRow(d, want.dims[0]) && NamesRow(r, src.dims[0])) CopyRow(src, r, want, d);
    }
    return CompareOutputs(cs, out, {want});
  };
  return c;
}

// The int8 inference lookup (sok_quant_fwd): q uint8 [rows, D] codes and a
// float32 (scale, bias) per row; the brute force dequantizes
// (q * scale + bias, quant_math.h) and combines as RefForward.
Case QuantFwd(Rng& rng, int64_t rows, int64_t dim, const Bags& b, int combiner,
              const std::string& tag) {
  Tensor q = RandomBytes(rng, kU8, {rows, dim});
  Tensor sb = MakeTensor(kF32, {rows, 2});
  for (int64_t r = 0; r < rows; ++r) {
    sb.as<float>()[2 * r] = static_cast<float>(rng.Uniform(1e-3, 0.05));
    sb.as<float>()[2 * r + 1] = static_cast<float>(rng.Uniform(-1.0, 1.0));
  }
  Case c = BagCase("sok_quant_fwd", "int8 " + tag, {q, sb}, b);
  c.rets = {Out("out", kF32, {b.m(), dim}, Compare::kClose, Tol(kF32))};
  c.attrs = {Attr::I32("combiner", combiner), Attr::I64("fixed_nnz", b.fixed_nnz)};
  c.oracle = [b, combiner](const Case& cs, const std::vector<Tensor>& out) {
    const Tensor &codes = cs.args[0], &scale_bias = cs.args[1];
    Tensor table = MakeTensor(kF32, codes.dims);
    const int64_t cols = codes.dims[1];
    for (int64_t i = 0; i < codes.count(); ++i) {
      const float* s = scale_bias.as<float>() + 2 * (i / cols);
      table.as<float>()[i] = static_cast<float>(codes.as<uint8_t>()[i] * double(s[0]) + s[1]);
    }
    const std::vector<double> want = RefForward(table, b, combiner);
    return Close("out", out[0].count(), [&](int64_t i) { return FloatAt(out[0], i); },
                 [&](int64_t i) { return want[i]; }, Tol(kF32));
  };
  return c;
}

// ----------------------------------------------------------------- groups
// The lookup family over one bag layout: forward, sparse and dense backward,
// weight gradient (weighted bags), rows_to_dense of the oracle's sparse form.
void EmbedGroup(Rng& rng, std::vector<Case>& out, XLA_FFI_DataType dt,
                int64_t rows, int64_t dim, const Bags& b, int combiner,
                const std::string& shape, bool backward = true) {
  const std::string tag = BagTag(b, dim, dt, combiner, shape.c_str());
  Tensor table = Normals(rng, dt, {rows, dim});
  out.push_back(Fwd(table, b, combiner, tag));
  if (!backward || b.fixed_nnz > 0) return;
  Tensor grad = Normals(rng, dt, {b.m(), dim});
  out.push_back(Bwd(grad, b, rows, combiner, tag));
  out.push_back(BwdDense(grad, b, rows, combiner, tag));
  if (!b.weights.empty()) out.push_back(Wgrad(table, grad, b, combiner, tag));
}

// The three row movers on one table shape: a gather of k rows (repeated
// rows and indices naming no row among them), a scatter of k rows distinct where in
// range, and a copy of k rows from a second table of another row count.
void RowsGroup(Rng& rng, std::vector<Case>& out, XLA_FFI_DataType dt, int64_t width,
               int64_t rows, int64_t k, bool alias) {
  const Tensor table = RandomBytes(rng, dt, TableDims(rows, width));
  out.push_back(RowsGather(table, RowList(rng, k, rows, false)));
  out.push_back(RowsScatter(table, RowList(rng, k, rows, true),
                            RandomBytes(rng, dt, TableDims(k, width)), alias));
  const std::vector<int32_t> side_rows = RowList(rng, k, rows, true);
  const Tensor side_values = RandomBytes(rng, dt, TableDims(k, width));
  out.push_back(RowsScatter(table, side_rows, side_values, alias, "", "sok_rows_scatter_async"));
  out.push_back(RowsJoin(table, {I32s({k}, side_rows), side_values}));
  const int64_t src_rows = rows / 2 + 3;
  out.push_back(RowsCopy(table, RowList(rng, k, rows, true),
                         RandomBytes(rng, dt, TableDims(src_rows, width)),
                         RowList(rng, k, src_rows, false), alias));
  // Only the leading pairs (a padded list's live ones): count 0 and a few.
  for (const int32_t count : {0, static_cast<int32_t>(rng.Int(0, k))})
    out.push_back(RowsCopy(table, RowList(rng, k, rows, true),
                           RandomBytes(rng, dt, TableDims(src_rows, width)),
                           RowList(rng, k, src_rows, false), alias, "", count));
}

void ErrorCases(Rng& rng, std::vector<Case>& out) {
  Bags b = RandomBags(rng, kS32, 4, 3, 10, false);
  Tensor table = Normals(rng, kF32, {10, 4});
  Case c = Fwd(table, b, kSum, "out of the wrong shape");
  c.rets[0].spec.dims = {b.m(), 5};
  c.expect_error = "out must be [num_bags, D]";
  c.oracle = nullptr;
  out.push_back(c);

  c = Fwd(table, b, kSum, "misnamed attribute (decoding error)");
  c.attrs[0].name = "combinr";
  c.expect_error = "Attribute name mismatch";
  c.oracle = nullptr;
  out.push_back(c);

  c = Fwd(table, b, kSum, "a missing argument (decoding error)");
  c.args.pop_back();
  c.expect_error = "Wrong number of arguments";
  c.oracle = nullptr;
  out.push_back(c);

  c = Fwd(MakeTensor(kS32, {10, 4}), b, kSum, "an int32 table");
  c.rets[0].spec.dtype = kS32;
  c.expect_error = "table: unsupported dtype";
  c.oracle = nullptr;
  out.push_back(c);

  c = QuantFwd(rng, 10, 4, b, kSum, "codes of int8, not uint8");
  c.args[0].dtype = XLA_FFI_DataType_S8;
  c.expect_error = "q must be uint8";
  c.oracle = nullptr;
  out.push_back(c);
  c = QuantFwd(rng, 10, 4, b, kSum, "scale_bias of another row count");
  c.args[1] = MakeTensor(kF32, {9, 2});
  c.expect_error = "scale_bias must be float32 [rows, 2]";
  c.oracle = nullptr;
  out.push_back(c);

  Rule sgd = Rules(false)[0];
  c = Update(rng, sgd, false, kF32, 10, 4, 3, 2, false, true, false);
  c.args.back() = MakeTensor(kF32, {0});
  c.tag = "no hparams";
  c.expect_error = "hparams must hold 1 float32 values";
  out.push_back(c);

  c = Update(rng, Stochastic(sgd), false, kBF16, 10, 4, 3, 2, false, true, false);
  c.args.back() = F32s({1}, {0.05f});
  c.tag = "stochastic rounding without its words";
  c.expect_error = "hparams must hold 5 float32 values";
  out.push_back(c);

  Rule bad = Rules(false)[1];
  bad.fused_id = 9;
  c = BwdUpdate(rng, bad, kF32, 10, 4, b, kSum, false, true, "unknown rule");
  c.expect_error = "unknown rule 9";
  c.cross = nullptr;
  out.push_back(c);

  Rule few = RowwiseRule();
  few.consts.clear();
  c = BwdUpdate(rng, few, kF32, 10, 4, b, kSum, false, true, "rowwise, no consts");
  c.expect_error = "unknown rule 4 or too few constants (0)";
  c.cross = nullptr;
  out.push_back(c);

  Rule wide = RowwiseRule();
  wide.per_row = false;  // an [R, D] accumulator: not row-wise Adagrad's
  c = BwdUpdate(rng, wide, kF32, 10, 4, b, kSum, false, true, "rowwise, [R, D] slot");
  c.expect_error = "slot 0 must have 10 elements";
  c.cross = nullptr;
  out.push_back(c);

  c = Update(rng, WithSlots(Rules(false)[2], kBF16), false, kF32, 10, 4, 3, 2, false, true,
             false);
  c.args[2] = Normals(rng, kF32, {10, 4});  // v float32 beside a bfloat16 m
  c.rets[2].spec.dtype = kF32;
  c.tag = "mixed slot dtypes";
  c.expect_error = "v must have the dtype of the first slot";
  out.push_back(c);

  c = BwdUpdate(rng, Rules(false)[1], kF32, 10, 4, b, kSum, false, true, "int32 slot");
  c.args[1] = MakeTensor(kS32, {10, 4});
  c.rets[1].spec.dtype = kS32;
  c.expect_error = "optimizer slots: unsupported dtype";
  c.cross = nullptr;
  out.push_back(c);

  c = HashCase(rng, kS32, 8, 4, 0, true, true);
  c.attrs[0].i = 2;
  c.tag = "insert=2";
  c.expect_error = "insert must be 0 (find only) or 1 (insert)";
  c.oracle = nullptr;
  out.push_back(c);

  c = HashCase(rng, kS32, 8, 4, 0, true, true);
  c.attrs[1].i = 1;
  c.tag = "lru without scores";
  c.expect_error = "an eviction policy needs last_seen and count";
  c.oracle = nullptr;
  out.push_back(c);

  const Tensor rt = RandomBytes(rng, kF32, {10, 4});
  const std::vector<int32_t> r4 = {3, 0, -1, 9};
  c = RowsGather(RandomBytes(rng, kF32, {10, 2, 2}), r4, " rank-3 src");
  c.expect_error = "src must be rank 1 or 2";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsGather(rt, r4, " int32 out");
  c.rets[0].spec.dtype = kS32;
  c.expect_error = "out must have the table's dtype";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsGather(rt, r4, " rows [K, 1]");
  c.args[1].dims = {4, 1};
  c.expect_error = "rows must be int32 [K]";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsScatter(rt, r4, RandomBytes(rng, kF32, {5, 4}), true, " 5 values for 4 rows");
  c.expect_error = "values must be [K, W]";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsScatter(rt, r4, RandomBytes(rng, kF32, {4, 4}), false, " dst_out [10, 3]");
  c.rets[0].spec.dims = {10, 3};
  c.expect_error = "dst_out must match dst";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsCopy(rt, r4, RandomBytes(rng, kF32, {6, 3}), r4, true, " src rows of 3");
  c.expect_error = "src must have dst's dtype and row width";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsCopy(rt, r4, RandomBytes(rng, kS32, {6, 4}), r4, true, " int32 src");
  c.expect_error = "src must have dst's dtype and row width";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsCopy(rt, r4, RandomBytes(rng, kF32, {6, 4}), {1, 2, 3}, true, " 3 src rows");
  c.expect_error = "src_rows and dst_rows must have one length";
  c.oracle = nullptr;
  out.push_back(c);

  c = RowsCopy(rt, r4, RandomBytes(rng, kF32, {6, 4}), r4, true, " count [2]");
  c.args[4] = I32s({2}, {1, 1});
  c.expect_error = "count must be int32 [1]";
  c.oracle = nullptr;
  out.push_back(c);
}

// Edge layouts the random ones may miss.
void SpecialCases(Rng& rng, std::vector<Case>& out) {
  const int64_t rows = 16, dim = 8;
  // Padding runs far longer than a chunk: ids -1 but every 97th.
  Bags pad;
  pad.key = kS32;
  pad.offsets = {0, 400, 1000};
  for (int j = 0; j < 1000; ++j) pad.ids.push_back(j % 97 == 0 ? 5 : -1);
  EmbedGroup(rng, out, kF32, rows, dim, pad, kMean, "padding runs");
  // Two rows repeated far past a chunk (the chunked long-run path).
  Bags hot;
  hot.key = kU32;
  hot.offsets = {0, 400, 1000};
  for (int j = 0; j < 1000; ++j) hot.ids.push_back(j % 50 == 0 ? 7 : 5);
  for (int j = 0; j < 1000; ++j) hot.weights.push_back(static_cast<float>(rng.Uniform(0.5, 1.5)));
  EmbedGroup(rng, out, kF32, rows, dim, hot, kSqrtn, "hot rows");
  EmbedGroup(rng, out, kBF16, rows, 33, hot, kSum, "hot rows");
  // Many long runs at once: 24 bags of 300 ids over 3 rows.
  Bags many;
  many.key = kS64;
  many.offsets.push_back(0);
  for (int b = 0; b < 24; ++b) many.offsets.push_back(many.offsets.back() + 300);
  for (int j = 0; j < 24 * 300; ++j) many.ids.push_back(rng.Int(0, 2));
  EmbedGroup(rng, out, kF16, rows, 5, many, kMean, "many long runs");
  EmbedGroup(rng, out, kF32, rows, 128, many, kSum, "many long runs");
  // No ids at all (every bag empty), and no bags at all (ids outside every bag).
  Bags empty;
  empty.key = kS32;
  empty.offsets = {0, 0, 0, 0, 0, 0};
  empty.weights = {};
  EmbedGroup(rng, out, kF32, rows, dim, empty, kMean, "all bags empty");
  Bags no_bags;
  no_bags.key = kS32;
  no_bags.offsets = {0};
  no_bags.ids = {1, 2, 3, -1, 4, 5, 6};
  no_bags.weights = {0.5f, 1.f, 1.5f, 1.f, 0.7f, 0.9f, 1.1f};
  EmbedGroup(rng, out, kF32, rows, dim, no_bags, kSqrtn, "no bags");
  // Offsets outside [0, N] (clamped) and ids past the last bag; decreasing
  // offsets (overlapping bags) only for the forward, which only reads.
  Bags clamp = RandomBags(rng, kS32, 6, 5, rows, true);
  clamp.ids.resize(clamp.n() + 9, 3);
  clamp.weights.resize(clamp.ids.size(), 1.25f);
  clamp.offsets.front() = -4;
  clamp.offsets[3] = clamp.offsets[2];
  EmbedGroup(rng, out, kF32, rows, dim, clamp, kMean, "clamped offsets");
  Bags over = clamp;
  over.offsets.back() = static_cast<int32_t>(over.n() + 40);
  EmbedGroup(rng, out, kBF16, rows, dim, over, kSum, "offsets past N");
  Bags dec = clamp;
  dec.offsets[2] = dec.offsets[1] - 2;
  EmbedGroup(rng, out, kF32, rows, dim, dec, kSqrtn, "decreasing offsets", false);
  // Every id out of range: a table of no rows for the backward.
  Bags any = RandomBags(rng, kS32, 8, 6, rows, false);
  out.push_back(Bwd(Normals(rng, kF32, {8, 3}), any, 0, kSum, "num_rows 0"));
  // A one-row table.
  EmbedGroup(rng, out, kF16, 1, 3, RandomBags(rng, kS64, 8, 6, 1, true), kMean, "one row");
  // The fixed-length forward with zeroed offsets (it must not read them).
  Bags fixed = FixedBags(rng, kS32, 20, 3, rows, true);
  std::fill(fixed.offsets.begin(), fixed.offsets.end(), 0);
  Case c = Fwd(Normals(rng, kF32, {rows, 16}), fixed, kMean,
               "fixed_nnz 3, offsets zeroed (unread)");
  out.push_back(c);
  // The fused update on the edge layouts.
  std::vector<Rule> fused = Rules(false);
  fused.push_back(RowwiseRule());
  for (const Rule& rule : fused) {
    out.push_back(BwdUpdate(rng, rule, kF32, rows, dim, hot, kSqrtn, false, true, "hot rows"));
    out.push_back(BwdUpdate(rng, rule, kBF16, rows, 4, pad, kMean, true, true, "padding runs"));
    out.push_back(BwdUpdate(rng, rule, kF32, rows, 3, empty, kSum, false, true, "all bags empty"));
    out.push_back(BwdUpdate(rng, rule, kF16, rows, 5, no_bags, kMean, true, true, "no bags"));
  }
  // Row-wise Adagrad's long runs on rows wider than one pass of a warp (the
  // chunk partials summed twice: for the row's sum of squares, then the step).
  const Rule rowwise = RowwiseRule();
  out.push_back(BwdUpdate(rng, rowwise, kF16, rows, 67, hot, kSum, false, true, "hot rows"));
  out.push_back(BwdUpdate(rng, rowwise, kBF16, rows, 264, hot, kMean, true, true, "hot rows"));
  out.push_back(BwdUpdate(rng, rowwise, kF32, rows, 600, many, kSqrtn, false, false,
                          "many long runs", true));
}

}  // namespace

std::vector<RetSpec> Specs(const Case& c) {
  std::vector<RetSpec> s;
  for (const Output& o : c.rets) s.push_back(o.spec);
  return s;
}

std::string CompareOutputs(const Case& c, const std::vector<Tensor>& cpu,
                           const std::vector<Tensor>& cuda) {
  for (size_t k = 0; k < c.rets.size(); ++k) {
    const Output& o = c.rets[k];
    if (o.compare == Compare::kNone) continue;
    if (o.compare == Compare::kExact) {
      if (cpu[k].bytes != cuda[k].bytes) {
        size_t i = 0;
        const size_t w = ByteWidthOf(cpu[k].dtype);
        while (i < cpu[k].bytes.size() && cpu[k].bytes[i] == cuda[k].bytes[i]) ++i;
        return Fmt("%s differs at element %zu", o.spec.name.c_str(), w ? i / w : i);
      }
      continue;
    }
    std::string e = Close(o.spec.name.c_str(), cpu[k].count(),
                          [&](int64_t i) { return FloatAt(cuda[k], i); },
                          [&](int64_t i) { return FloatAt(cpu[k], i); }, o.tol);
    if (!e.empty()) return e;
  }
  return "";
}

std::vector<Case> AllCases(uint64_t seed) {
  Rng rng(seed);
  std::vector<Case> out;
  const int64_t rows = 997, m = 96;
  const int combos[3][2] = {{kSum, 0}, {kMean, 1}, {kSqrtn, 0}};
  int k = 0;
  // Ragged bags: one id on average (the short-bag forward shape), a few,
  // and runs past the backward's chunk.
  for (XLA_FFI_DataType dt : kTableTypes)
    for (int64_t dim : {1, 3, 4, 5, 16, 33, 128})
      for (int max_len : {1, 4, 300})
        for (const auto& cw : combos) {
          const XLA_FFI_DataType key = kKeyTypes[k++ % 3];
          Bags b = RandomBags(rng, key, m, max_len, rows, cw[1] != 0);
          EmbedGroup(rng, out, dt, rows, dim, b, cw[0], Fmt("len<=%d", max_len));
        }
  // Fixed-length bags (fixed_nnz > 0: no offsets read).
  for (XLA_FFI_DataType dt : kTableTypes)
    for (int64_t dim : {1, 3, 4, 5, 33, 128, 129, 600})
      for (int64_t nnz : {1, 2, 5})
        for (const auto& cw : {std::array<int, 2>{kSum, 1}, std::array<int, 2>{kMean, 0},
                               std::array<int, 2>{kSqrtn, 1}}) {
          const XLA_FFI_DataType key = kKeyTypes[k++ % 3];
          Bags b = FixedBags(rng, key, 77, nnz, rows, cw[1] != 0);
          EmbedGroup(rng, out, dt, rows, dim, b, cw[0], Fmt("fixed_nnz=%lld", static_cast<long long>(nnz)));
        }
  // rows_to_dense on its own: counts within, at and past the capacity.
  for (XLA_FFI_DataType dt : kTableTypes)
    for (int64_t dim : {1, 5, 16, 33}) {
      out.push_back(RowsToDense(rng, dt, 211, dim, 50, 37, true));
      out.push_back(RowsToDense(rng, dt, 211, dim, 50, 55, false));
    }
  out.push_back(RowsToDense(rng, kF32, 211, 4, 0, 0, false));
  out.push_back(RowsToDense(rng, kBF16, 211, 8, 1, 1, false));
  // The optimizer updates.
  int a = 0;
  for (const Rule& rule : Rules(false))
    for (XLA_FFI_DataType dt : kTableTypes)
      for (int64_t dim : {1, 3, 4, 5, 33, 128}) {
        const bool alias = a++ % 3 != 2;
        out.push_back(Update(rng, rule, false, dt, 211, dim, 64, 41, a % 2 == 0, alias, false));
        if (rule.fused_id == 1)  // row-wise Adagrad takes Adagrad's signature
          out.push_back(Update(rng, rule, true, dt, 211, dim, 64, 41, a % 2 == 0, alias, a % 4 == 0));
      }
  for (const Rule& rule : Rules(true)) {
    out.push_back(Update(rng, rule, false, kF32, 211, 16, 64, 70, false, true, false));  // past cap
    out.push_back(Update(rng, rule, false, kBF16, 211, 16, 64, -3, false, true, false));  // negative
    out.push_back(Update(rng, rule, false, kF16, 211, 16, 0, 0, false, true, false));  // no rows
    if (rule.fused_id == 1) {
      out.push_back(Update(rng, rule, true, kF32, 211, 16, 64, 70, true, false, true));
      out.push_back(Update(rng, rule, true, kF16, 211, 3, 0, 0, false, true, false));
    }
  }
  // The fused backward + update.
  int f = 0;
  for (const Rule& rule : Rules(false))
    for (XLA_FFI_DataType dt : kTableTypes)
      for (int64_t dim : {1, 3, 4, 33, 128})
        for (int max_len : {1, 300}) {
          const XLA_FFI_DataType key = kKeyTypes[f % 3];
          const int combiner = f % 3;
          Bags b = RandomBags(rng, key, m, max_len, rows, f % 2 == 0);
          out.push_back(BwdUpdate(rng, rule, dt, rows, dim, b, combiner, f % 4 == 1,
                                  f % 5 != 4, Fmt("len<=%d", max_len)));
          ++f;
        }
  {
    Rule ftrl = Rules(true)[3];
    Bags b = RandomBags(rng, kS32, m, 4, rows, true);
    out.push_back(BwdUpdate(rng, ftrl, kF32, rows, 16, b, kMean, false, true,
                            "len<=4 lr_power -0.7"));
  }
  // Row-wise Adagrad fused: rows of one pass of a lane group and wider
  // (D = 67: the scalar path past 64 columns; 264 and 600: the 4-wide path
  // past 256), bags of one id and of up to 300, every table type (its long
  // runs: SpecialCases).
  for (XLA_FFI_DataType dt : kTableTypes)
    for (int64_t dim : {1, 3, 4, 33, 67, 128, 264, 600})
      for (int max_len : {1, 300}) {
        const XLA_FFI_DataType key = kKeyTypes[f % 3];
        const int combiner = f % 3;
        Bags b = RandomBags(rng, key, m, max_len, rows, f % 2 == 0);
        out.push_back(BwdUpdate(rng, RowwiseRule(), dt, rows, dim, b, combiner, f % 4 == 1,
                                f % 5 != 4, Fmt("len<=%d", max_len), f % 3 == 2));
        ++f;
      }
  // Stochastic rounding of the table's write (rounding_math.h): every rule,
  // unfused and fused, 16-bit tables on the 4-wide and scalar paths, and a
  // float32 table (which stores its values as they are).
  {
    std::vector<Rule> sr = Rules(false);
    sr.push_back(RowwiseRule());
    for (Rule& rule : sr) rule = Stochastic(rule);
    for (const Rule& rule : sr)
      for (XLA_FFI_DataType dt : kTableTypes)
        for (int64_t dim : {3, 4, 33, 128}) {
          const bool rowwise = rule.per_row;
          Rule unfused = rule;
          if (rowwise) unfused = Stochastic(Rules(false)[1]);  // Adagrad's signature
          out.push_back(Update(rng, unfused, rowwise, dt, 211, dim, 64, 41, f % 2 == 0,
                               f % 3 != 2, false));
          Bags b = RandomBags(rng, kKeyTypes[f % 3], m, dim == 33 ? 300 : 4, rows, f % 2 == 0);
          out.push_back(BwdUpdate(rng, rule, dt, rows, dim, b, f % 3, f % 4 == 1, f % 5 != 4,
                                  Fmt("len<=%d", dim == 33 ? 300 : 4)));
          ++f;
        }
  }
  // 16-bit optimizer slots (slot_dtype): every rule with slots, unfused and
  // fused, bfloat16 and float16 slots rounded to nearest and
  // stochastically, on the scalar (D 3) and 4-wide (D 128) paths, beside
  // each table type.
  {
    std::vector<Rule> rules = Rules(false);
    rules.push_back(RowwiseRule());
    const Rule adagrad = Rules(false)[1];  // the row-wise update's signature
    int s = 0;
    for (const Rule& base : rules) {
      if (base.slots == 0) continue;
      for (XLA_FFI_DataType sdt : {kBF16, kF16})
        for (bool sr : {false, true})
          for (int64_t dim : {3, 128}) {
            const Rule rule = WithSlots(sr ? Stochastic(base) : base, sdt);
            const bool rowwise = rule.per_row, acc_2d = rowwise && s % 4 == 0;
            const Rule unfused = rowwise ? WithSlots(sr ? Stochastic(adagrad) : adagrad, sdt) : rule;
            const XLA_FFI_DataType dt = kTableTypes[s % 3];
            out.push_back(Update(rng, unfused, rowwise, dt, 211, dim, 64, 41, s % 2 == 0,
                                 s % 3 != 2, acc_2d));
            const int max_len = dim == 3 ? 300 : 4;
            Bags b = RandomBags(rng, kKeyTypes[s % 3], m, max_len, rows, s % 2 == 0);
            out.push_back(BwdUpdate(rng, rule, dt, rows, dim, b, s % 3, s % 4 == 1, s % 5 != 4,
                                    Fmt("len<=%d", max_len), acc_2d));
            ++s;
          }
    }
  }
  // The int8 inference lookup: ragged and fixed-length bags, D of the
  // 1-code and 4-code loads and past one warp's chunks.
  int qk = 0;
  for (int64_t dim : {1, 3, 4, 16, 33, 600})
    for (int max_len : {1, 4, 300})
      for (const auto& cw : combos) {
        const XLA_FFI_DataType key = kKeyTypes[qk++ % 3];
        Bags b = RandomBags(rng, key, m, max_len, rows, cw[1] != 0);
        out.push_back(QuantFwd(rng, rows, dim, b, cw[0],
                               BagTag(b, dim, kU8, cw[0], Fmt("len<=%d", max_len).c_str())));
        Bags fixed = FixedBags(rng, key, 77, 1 + max_len % 5, rows, cw[1] == 0);
        out.push_back(QuantFwd(rng, rows, dim, fixed, cw[0],
                               BagTag(fixed, dim, kU8, cw[0], "fixed_nnz")));
      }
  SpecialCases(rng, out);
  // Hash find-or-insert: roomy, overfull, one slot, prefilled; then finds.
  for (XLA_FFI_DataType dt : kKeyTypes) {
    out.push_back(HashCase(rng, dt, 64, 40, 0, true, true));
    out.push_back(HashCase(rng, dt, 64, 500, 0, true, true));
    out.push_back(HashCase(rng, dt, 4096, 3000, 0, true, true));
    out.push_back(HashCase(rng, dt, 1, 5, 0, true, false));
    out.push_back(HashCase(rng, dt, 97, 300, 30, true, false));
    out.push_back(HashCase(rng, dt, 97, 0, 30, true, true));
    out.push_back(HashCase(rng, dt, 97, 300, 60, false, true));
    out.push_back(HashCase(rng, dt, 64, 200, 64, false, true));  // a full table
    out.push_back(HashCase(rng, dt, 64, 50, 0, false, false));   // an empty one
    // Scores, eviction and admission: a hot stream on full buckets.
    HashSetup h;
    h.scores = true;
    h.step = 5;
    out.push_back(HashCase(rng, dt, 97, 300, 80, true, true, h));  // scores only
    h.policy = kEvictLru;
    out.push_back(HashCase(rng, dt, 64, 300, 64, true, true, h));
    out.push_back(HashCase(rng, dt, 4096, 6000, 4000, true, false, h));
    h.policy = kEvictLfu;
    out.push_back(HashCase(rng, dt, 40, 200, 40, true, true, h));
    out.push_back(HashCase(rng, dt, 64, 200, 64, false, true, h));  // find, evicting layout
    h.admit_after = 1;
    h.width = 64;
    out.push_back(HashCase(rng, dt, 64, 300, 30, true, true, h));
    h.admit_after = 2;
    h.policy = kNoEviction;
    out.push_back(HashCase(rng, dt, 97, 400, 50, true, true, h));
  }
  // The row movers: rank 1 and every word path of their kernels (rows of 16k
  // bytes move in uint4, 4k in uint32, the rest byte by byte: f32 W4/W16, f32
  // W3, f16 W3), rows longer than a warp's 32 words, no rows listed, more
  // listed rows than the table has, tables of no rows and rows of no bytes.
  int v = 0;
  for (XLA_FFI_DataType dt : {kF32, kBF16, kF16, kS32})
    for (int64_t width : {-1, 1, 2, 3, 4, 8, 16, 33})
      for (const auto& rk : {std::array<int64_t, 2>{211, 0}, std::array<int64_t, 2>{211, 37},
                             std::array<int64_t, 2>{997, 3000}})
        RowsGroup(rng, out, dt, width, rk[0], rk[1], v++ % 3 != 2);
  RowsGroup(rng, out, kF32, 600, 500, 300, true);
  RowsGroup(rng, out, kBF16, 301, 500, 300, false);
  RowsGroup(rng, out, kU8, 3, 211, 37, true);
  RowsGroup(rng, out, kS64, -1, 211, 37, false);
  RowsGroup(rng, out, kF16, 5, 0, 20, true);
  RowsGroup(rng, out, kF32, 0, 211, 37, true);
  // Past the grid's 65536-block cap (8 rows a block): warps stride over rows.
  RowsGroup(rng, out, kS32, -1, 600000, 65536 * 8 + 4099, true);
  // A rank-1 dst and a [S, 1] src: one row width, as the handlers see it.
  {
    const Tensor dst = RandomBytes(rng, kF32, {211});
    out.push_back(RowsCopy(dst, RowList(rng, 37, 211, true), RandomBytes(rng, kF32, {50, 1}),
                           RowList(rng, 37, 50, false), true, " src [S, 1]"));
  }
  ErrorCases(rng, out);
  return out;
}

}  // namespace sanitize
}  // namespace sok
